"""Reading a registered bank back: what a version holds and pins (`lookup`, `model_source`),
where it came from and what measured it (lineage, `record_evaluation`).

Registering lives in model_registry; this module only reads versions, except that an
evaluation's metrics are recorded onto the version it evaluated.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.bank_source import BankSource
from pipeline.paths import resolve_tracking_uri
from pipeline.registry import BankMismatchError, load_bank
from pipeline.registry.manifest import describe_recipe
from pipeline.tracking.client import client_for, is_missing
from pipeline.tracking.model_registry import MODEL_JSON_TAG, RESERVED_ALIAS, SNAPSHOT_TAG
from pipeline.tracking.pyfunc import (
    BANK_FILE,
    MODEL_JSON,
    file_sha256,
    model_bank_source,
    read_model_json,
)
from pipeline.tracking.runs import Tracker
from supsup.bank import MaskBank
from supsup.networks import NetworkSpec

logger = logging.getLogger(__name__)
_MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))")


def logged_model_id(mv: Any) -> str | None:
    """The logged model behind a version: its `model_id`, or (SQL stores keep only the source)
    the id in its source URI, models:/m-<id>."""
    if getattr(mv, "model_id", None):
        return str(mv.model_id)
    m = re.fullmatch(r"models:/(m-[0-9a-f]+)", mv.source or "")
    return m.group(1) if m else None


EVALUATED_TAG = "evaluated_model"  # on an evaluation run: models:/NAME/VERSION it evaluated


def _lineage(client: MlflowClient, name: str, version: int, run_id: str | None
             ) -> dict[str, Any]:
    """Where a version came from and what measured it: the run that registered it, the run
    that trained its masks, their parent (a `supsup run`), and the evaluation runs of exactly
    this version, newest first."""
    if not run_id:
        return {"registered_by_run": None, "trained_by_run": None, "parent_run": None,
                "evaluations": []}
    run = client.get_run(run_id)
    found = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.{EVALUATED_TAG} = 'models:/{name}/{version}'",
        order_by=["attributes.start_time DESC"], max_results=20)
    keys = ("accuracy_gg", "accuracy_gn", "task_inference_accuracy")
    return {
        "registered_by_run": run_id,
        "trained_by_run": run.data.tags.get("train_run_id") or None,
        "parent_run": run.data.tags.get("mlflow.parentRunId"),
        "evaluations": [{"run_id": r.info.run_id, "status": r.info.status,
                         **{k: r.data.metrics[k] for k in keys if k in r.data.metrics}}
                        for r in found],
    }


def record_evaluation(tracker: Tracker, model_name: str, version: int, run_id: str,
                      summary: Mapping[str, float]) -> None:
    """Put an evaluation's metrics on the model version it evaluated: logged against the
    version's logged model (MLflow shows them on the model's page) and summarised in the version
    description, naming the evaluation run and its time."""
    import datetime

    client = tracker.client
    try:
        mv = client.get_model_version(model_name, str(version))
    except MlflowException as exc:  # registered in another store than this run's
        logger.warning("models:/%s/%s is not in %s (%s): its page does not show this evaluation",
                       model_name, version, tracker.tracking_uri, exc.message)
        return
    client.set_tag(run_id, EVALUATED_TAG, f"models:/{model_name}/{version}")
    model_id = logged_model_id(mv)
    if model_id is not None:
        for key, value in summary.items():
            client.log_metric(run_id, key, float(value), model_id=model_id)
    pct = {k: f"{100 * summary[k]:.2f}%" for k in ("accuracy_gg", "accuracy_gn",
                                                    "task_inference_accuracy") if k in summary}
    what = ", ".join(f"{k.replace('accuracy_gg', 'GG').replace('accuracy_gn', 'GN')} {v}"
                     .replace("task_inference_accuracy", "task inference")
                     for k, v in pct.items())
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    description = (f"{int(summary.get('tasks', 0))} tasks evaluated: {what} "
                   f"(evaluate run {run_id}, {when})")
    # The newest evaluation replaces the last one; the promotions of the version stay.
    paragraphs = (mv.description or "").split("\n\n")
    inputs = [p for p in paragraphs if p.startswith("Inputs: ")][:1]
    promotions = [p for p in paragraphs if p.startswith("Promoted ")]
    description = "\n\n".join([description, *inputs, *promotions[-10:]])
    client.update_model_version(model_name, str(version), description=description)


def parse_model_uri(model_uri: str) -> tuple[str, str | None, int | None]:
    """(name, alias, version) of models:/NAME@ALIAS, models:/NAME/VERSION or models:/NAME/latest
    (alias and version both None for the newest version)."""
    m = _MODEL_URI.fullmatch(str(model_uri).strip())
    if m is None:
        raise ValueError(f"model URI {model_uri!r}: expected models:/NAME@ALIAS or "
                         "models:/NAME/VERSION")
    name, alias, version = m.group("name"), m.group("alias"), m.group("version")
    if alias is not None:
        return (name, None, None) if alias.lower() == RESERVED_ALIAS else (name, alias, None)
    if version.lower() == RESERVED_ALIAS:
        return name, None, None
    if not version.isdigit():
        raise ValueError(f"model URI {model_uri!r}: {version!r} is not a version number; stages "
                         "are not used, address versions by number or alias (models:/NAME@ALIAS)")
    return name, None, int(version)


def _what_exists(client: MlflowClient) -> str:
    parts = []
    for rm in client.search_registered_models(max_results=50):
        versions = client.search_model_versions(f"name = '{rm.name}'", max_results=1000)
        aliases = ", ".join(f"@{a} -> {v}" for a, v in sorted((rm.aliases or {}).items()))
        parts.append(f"{rm.name} ({len(versions)} versions"
                     f"{'; aliases ' + aliases if aliases else '; no aliases'})")
    return "; ".join(parts) if parts else "none"


def _model_version(client: MlflowClient, model_uri: str, tracking_uri: str) -> Any:
    name, alias, version = parse_model_uri(model_uri)
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        if version is not None:
            return client.get_model_version(name, str(version))
        versions = client.search_model_versions(f"name = '{name}'", max_results=10000)
        if versions:
            return max(versions, key=lambda mv: int(mv.version))
        problem = f"model {name!r} has no versions"
    except MlflowException as exc:
        if not is_missing(exc) and exc.error_code != "INVALID_PARAMETER_VALUE":
            raise
        problem = exc.message
    raise KeyError(f"no model version {model_uri} in the registry at {tracking_uri} ({problem}); "
                   f"registered models: {_what_exists(client)}")


def _download(client: MlflowClient, tracking_uri: str, name: str, version: int,
              artifact: str, dest: str) -> str:
    """One file of a model version's artifacts, downloaded under `dest`.

    Goes through the version's storage location: MLflow resolves models:/ artifact URIs with the
    process-wide registry URI, not the one given."""
    location = client.get_model_version_download_uri(name, str(version))
    try:
        return mlflow.artifacts.download_artifacts(
            artifact_uri=f"{location.rstrip('/')}/artifacts/{artifact}", dst_path=dest,
            tracking_uri=tracking_uri)
    except (MlflowException, OSError) as exc:
        message = exc.message if isinstance(exc, MlflowException) else str(exc)
        raise FileNotFoundError(f"models:/{name}/{version} has no artifact {artifact!r} at "
                                f"{location} ({message}); was it registered by "
                                "pipeline.tracking?") from None


def lookup(model_uri: str, tracking_uri: str) -> dict[str, Any]:
    """What a model version holds: name, version, aliases, run_id, tags, network, the BankSource
    it pins (bank, registry root, snapshot, task ids), embedded, mask rule, inference defaults.

    KeyError naming the URI and listing the registered models and aliases when it does not exist.
    """
    uri = resolve_tracking_uri(tracking_uri)
    client = client_for(uri)
    mv = _model_version(client, model_uri, uri)
    version = int(mv.version)
    with tempfile.TemporaryDirectory(prefix="supsup-lookup-") as tmp:
        path = _download(client, uri, mv.name, version, MODEL_JSON, tmp)
        info = read_model_json(path)
        digest = file_sha256(path)
    source = info["source"]
    return {
        "model_uri": f"models:/{mv.name}/{version}", "name": mv.name, "version": version,
        "aliases": sorted(mv.aliases or []), "run_id": mv.run_id, "tags": dict(mv.tags or {}),
        "network": info["network"], "bank": source["bank"], "registry_root": source["root"],
        "snapshot": source["snapshot_sha256"], "tasks": source["task_ids"],
        "source": source, "embedded": info["embedded"], "mask": info.get("mask", {}),
        "recipe": describe_recipe(info.get("recipe")), "model_json_sha256": digest,
        "inference_defaults": info["inference_defaults"],
        "description": mv.description or "",
        "lineage": _lineage(client, mv.name, version, mv.run_id),
    }


def model_source(model_uri: str, tracking_uri: str, download_dir: str | Path
                 ) -> tuple[dict[str, Any], BankSource]:
    """(lookup of the version, the BankSource it pins). Embedded masks are downloaded into
    `download_dir` and the source reads them there; otherwise it reads the mask registry, and
    loading refuses if the registry no longer holds the registered content.

    BankMismatchError when the version's model.json names other content than its
    `supsup.snapshot` tag: the tag lives in the tracking store, apart from the artifact store, so a
    model.json and bank file swapped together in the artifact store are still refused here."""
    info = lookup(model_uri, tracking_uri)
    registered = info["tags"].get(SNAPSHOT_TAG)
    if registered is not None and registered != info["snapshot"]:
        raise BankMismatchError(
            f"{info['model_uri']}: its model.json names snapshot {info['snapshot'][:12]}, but the "
            f"version was registered with snapshot {registered[:12]}; the model's artifacts were "
            "replaced after registration, so it is refused (restore them, or delete the version "
            "and register the bank again)")
    recorded = info["tags"].get(MODEL_JSON_TAG)
    if recorded is not None and recorded != info["model_json_sha256"]:
        raise BankMismatchError(
            f"{info['model_uri']}: its {MODEL_JSON} hashes to {info['model_json_sha256'][:12]}, "
            f"but the version was registered with {recorded[:12]}; the model's description was "
            "edited after registration, so it is refused (restore it, or delete the version and "
            "register the bank again)")
    bank_file = None
    if info["embedded"]:
        uri = resolve_tracking_uri(tracking_uri)
        bank_file = _download(client_for(uri), uri, info["name"], info["version"], BANK_FILE,
                              str(download_dir))
    return info, model_bank_source({"source": info["source"]}, bank_file)


def load_bank_from_model(model_uri: str, tracking_uri: str,
                         device: torch.device | str = "cpu") -> tuple[MaskBank, NetworkSpec]:
    """The registered MaskBank and NetworkSpec of a model version, checked against its snapshot."""
    with tempfile.TemporaryDirectory(prefix="supsup-model-") as tmp:
        _, source = model_source(model_uri, tracking_uri, tmp)
        return load_bank(source, device)


def run_config_text(run_id: str, tracking_uri: str, artifact_file: str = "config.yaml") -> str:
    """The text of a run's artifact (by default the resolved config it logged)."""
    uri = resolve_tracking_uri(tracking_uri)
    client_for(uri)
    with tempfile.TemporaryDirectory(prefix="supsup-run-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact_file, dst_path=tmp, tracking_uri=uri)
        except MlflowException as exc:
            raise FileNotFoundError(f"run {run_id} at {uri} has no artifact {artifact_file!r} "
                                    f"({exc.message})") from None
        return Path(path).read_text()


