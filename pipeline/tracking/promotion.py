"""Promotion: moving a serving alias (`champion` by default) to a model version on purpose.

Registration only ever moves the "latest" alias; the alias that serving and evaluation read
moves here, by hand (`supsup promote`) or when an evaluation meets a rule (`evaluate
--promote-if`). A promotion first loads the version's bank and checks it against its snapshot, so
an alias never points at a version that cannot load, and it writes onto the version which
evaluation promoted it (tags `supsup.promoted_by_run`, `supsup.promotion.<alias>` and a line of
its description), and onto the evaluation run which version it promoted.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from mlflow.exceptions import MlflowException

from pipeline.paths import resolve_tracking_uri
from pipeline.tracking.client import client_for
from pipeline.tracking.model_registry import check_alias
from pipeline.tracking.versions import load_bank_from_model, lookup

logger = logging.getLogger(__name__)

PROMOTED_BY_TAG = "supsup.promoted_by_run"  # on a version: the evaluation run that promoted it
PROMOTION_TAG = "supsup.promotion."  # + alias, on a version: JSON of what promoted it
PROMOTED_TAG = "promoted"  # on an evaluation run: models:/NAME/VERSION@ALIAS it promoted
_SHOWN = ("accuracy_gg", "accuracy_gn", "task_inference_accuracy")
_PROMOTIONS_KEPT = 10  # promotion lines a version description keeps, newest last


@dataclass
class Promotion:
    """A version an alias now points at, and the evaluation that earned it (if any)."""

    name: str
    version: int
    alias: str
    previous: int | None  # the version the alias pointed at before, None if unset
    evaluation_run: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    rule: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"


def promote(model_uri: str, tracking_uri: str, alias: str, *,
            evaluation_run: str | None = None, metrics: Mapping[str, float] | None = None,
            rule: str | None = None) -> Promotion:
    """Point `alias` at the version `model_uri` names, once its bank loads and matches its
    snapshot (ValueError naming the version and why otherwise; nothing is changed then).

    `evaluation_run` and `metrics` name the evaluation that earned the promotion (with the
    `rule` it met); without them, the version's newest recorded evaluation is named, or the
    promotion is recorded as made by hand without one.
    """
    check_alias(alias)
    uri = resolve_tracking_uri(tracking_uri)
    info = lookup(model_uri, uri)  # KeyError naming the registered models when it is not there
    name, version = info["name"], int(info["version"])
    pinned = f"models:/{name}/{version}"
    try:
        load_bank_from_model(pinned, uri)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{pinned} cannot load its bank, so @{alias} is not moved to it: "
                         f"{exc}. Promote a version that loads (`supsup lookup models:/{name}/N` "
                         "shows each), or register the bank again with `supsup train`") from None
    if evaluation_run is None and info["lineage"]["evaluations"]:
        newest = info["lineage"]["evaluations"][0]
        evaluation_run = newest["run_id"]
        metrics = {k: v for k, v in newest.items() if k in _SHOWN}
    metrics = {k: float(v) for k, v in (metrics or {}).items()}
    client = client_for(uri)
    try:
        previous: int | None = int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        previous = None
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    record = {"alias": alias, "evaluation_run": evaluation_run, "metrics": metrics,
              "rule": rule, "at": when, "previous_version": previous}
    client.set_model_version_tag(name, str(version), PROMOTION_TAG + alias, json.dumps(record))
    client.set_model_version_tag(name, str(version), PROMOTED_BY_TAG, evaluation_run or "by hand")
    line = _describe(alias, evaluation_run, metrics, rule, when)
    mv = client.get_model_version(name, str(version))
    # The evaluation summary first, then the newest promotions (MLflow keeps 5000 characters).
    paragraphs = mv.description.split("\n\n") if mv.description else []
    inputs = [p for p in paragraphs if p.startswith("Inputs: ")][:1]  # what predict() takes
    others = [p for p in paragraphs if not p.startswith("Inputs: ")]
    kept = others[:1] + inputs + others[1:][-(_PROMOTIONS_KEPT - 1):]
    client.update_model_version(name, str(version), description="\n\n".join([*kept, line]))
    client.set_registered_model_alias(name, alias, str(version))
    if evaluation_run is not None:
        try:
            client.set_tag(evaluation_run, PROMOTED_TAG, f"{pinned}@{alias}")
        except MlflowException as exc:  # the run lives in another store: the version says it
            logger.warning("could not tag evaluation run %s: %s", evaluation_run, exc.message)
    logger.info("@%s of %s: version %s -> %d", alias, name, previous, version)
    return Promotion(name, version, alias, previous, evaluation_run, metrics, rule)


def _describe(alias: str, run: str | None, metrics: Mapping[str, float], rule: str | None,
              when: str) -> str:
    """One line of the version description: to which alias, when, on what evidence."""
    shown = ", ".join(f"{k} {100 * v:.2f}%" for k, v in metrics.items() if k in _SHOWN)
    if run is None:
        return f"Promoted to @{alias} by hand on {when}; no evaluation of this version recorded."
    why = f", meeting {rule}" if rule else ""
    return (f"Promoted to @{alias} on {when} by evaluate run {run}"
            f"{' (' + shown + ')' if shown else ''}{why}.")
