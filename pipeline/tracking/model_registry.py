"""MLflow's model registry for mask banks: register a bank's content once, find versions, and
turn a model version back into the BankSource it pins.

A version is registered per distinct content: its tag `supsup.snapshot` is the bank's snapshot
hash, and registering content that a version of the model already holds registers nothing (the
alias moves to that version, or is kept). Two drivers registering the same content at once both
end on the lowest such version; the other is deleted. Versions are found by alias
(`models:/NAME@ALIAS`) or number (`models:/NAME/VERSION`); stages are not used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pyarrow.parquet as pq
import torch
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.bank_source import BankSource
from pipeline.paths import resolve_tracking_uri
from pipeline.registry import BankMismatchError, load_bank, read_manifest
from pipeline.registry.transfer import KEY_SNAPSHOT
from pipeline.tracking.client import (
    as_text,
    client_for,
    global_tracking_uri,
    is_missing,
    resumed_run,
)
from pipeline.tracking.pyfunc import (
    BANK_FILE,
    MODEL_FORMAT,
    MODEL_JSON,
    MODEL_KIND,
    check_inference_defaults,
    code_paths,
    input_normalization,
    model_bank_source,
    model_code_path,
    pip_requirements,
    read_model_json,
    signature,
)
from pipeline.tracking.runs import Tracker
from supsup.bank import MaskBank, describe_ids
from supsup.networks import NetworkSpec

logger = logging.getLogger(__name__)

TAG_PREFIX = "supsup."
SNAPSHOT_TAG = f"{TAG_PREFIX}snapshot"
_RESERVED_ALIAS = "latest"  # MLflow reserves it: models:/NAME/latest is always the newest version
_MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))")
_ALIAS = re.compile(r"[\w-]+")


@dataclass
class Registration:
    """The model version that holds a bank's content, and whether this call created it."""

    name: str
    version: int
    created: bool
    aliases: list[str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def check_alias(alias: str) -> str:
    """MLflow's alias rules, checked before anything is logged."""
    if (not isinstance(alias, str) or not _ALIAS.fullmatch(alias) or len(alias) > 255
            or re.fullmatch(r"[vV]\d+", alias)):
        raise ValueError(f"alias {alias!r} is not allowed: use letters, digits, '_' and '-' "
                         "(not v<number>, which MLflow keeps for versions)")
    return alias


def check_model_name(name: str) -> str:
    if not isinstance(name, str) or not name or any(c in name for c in "/:@\\") or name in (
            ".", ".."):
        raise ValueError(f"model name {name!r} must be non-empty without '/', '\\', ':' or '@'")
    return name


def _version_tags(source: BankSource, spec: NetworkSpec, embedded: bool,
                  extra: Mapping[str, Any] | None) -> dict[str, str]:
    """Model version tags: enough to see in the MLflow UI what a version holds."""
    return {
        f"{TAG_PREFIX}bank": source.bank, f"{TAG_PREFIX}registry_root": str(source.root),
        SNAPSHOT_TAG: source.snapshot_sha256,
        f"{TAG_PREFIX}manifest": source.manifest_sha256,
        f"{TAG_PREFIX}num_tasks": str(source.num_tasks),
        f"{TAG_PREFIX}tasks": describe_ids(source.task_ids)[:4000],
        f"{TAG_PREFIX}network": json.dumps(spec.to_dict()),
        f"{TAG_PREFIX}embedded": str(embedded).lower(),
        **{str(k): as_text(v) for k, v in (extra or {}).items()},
    }


def _holding(client: MlflowClient, name: str, source: BankSource) -> list[int]:
    """Versions of model `name` that hold exactly `source`'s content (bank and snapshot)."""
    try:
        versions = client.search_model_versions(f"name = '{name}'", max_results=10000)
    except MlflowException as exc:
        if is_missing(exc):
            return []
        raise
    return sorted(int(mv.version) for mv in versions
                  if (mv.tags or {}).get(SNAPSHOT_TAG) == source.snapshot_sha256
                  and (mv.tags or {}).get(f"{TAG_PREFIX}bank") == source.bank)


def register_bank(
    tracker: Tracker,
    run_id: str,
    model_name: str,
    source: BankSource,
    *,
    bank_file: str | Path | None = None,
    inference_defaults: Mapping[str, str] | None = None,
    aliases: Sequence[str] = (),
    tags: Mapping[str, Any] | None = None,
) -> Registration:
    """The model version holding `source`'s content, registered from `run_id` if none does yet.

    `source` is located in a mask registry (as `export_bank` returns it); `bank_file` is the
    bank file written in the same pass (its footer must name the same snapshot): the model then
    carries its masks and loads without the registry. Each alias ends on the returned version
    ("latest" is MLflow's own name for the newest version and is not set).
    """
    client = tracker.client
    check_model_name(model_name)
    defaults = check_inference_defaults(inference_defaults)
    if isinstance(aliases, str):
        raise ValueError(f"aliases must be a list of names, got the string {aliases!r}")
    aliases = [check_alias(a) for a in aliases]
    if source.root is None:
        raise ValueError(f"{source.describe()}: register a bank from its mask registry, so the "
                         "model can pin where its masks live")
    if not source.task_ids:
        raise ValueError(f"{source.describe()} holds no tasks: train some before registering it")
    manifest = read_manifest(source)
    spec = NetworkSpec.from_dict(manifest["network"])
    if bank_file is not None:
        _check_bank_file(Path(bank_file), source)
    held = _holding(client, model_name, source)
    created = not held
    if created:
        version = _log_and_create(tracker, run_id, model_name, source, spec, manifest, defaults,
                                  bank_file, tags)
        held = _holding(client, model_name, source)
        if held and held[0] < version:  # another driver registered this content first
            client.delete_model_version(model_name, str(version))
            logger.info("models:/%s/%d already held this bank; dropped the duplicate version %d",
                        model_name, held[0], version)
            created = False
        else:
            held = [version]
    version = held[0]
    for alias in aliases:
        if alias.lower() == _RESERVED_ALIAS:
            continue
        try:
            current = int(client.get_model_version_by_alias(model_name, alias).version)
        except MlflowException:
            current = None
        if current != version:
            client.set_registered_model_alias(model_name, alias, str(version))
    if not created:
        logger.info("models:/%s/%d already holds %s: no new version registered",
                    model_name, version, source.describe())
    return Registration(model_name, version, created, aliases)


def _check_bank_file(path: Path, source: BankSource) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"bank file {path} does not exist; write it with "
                                "pipeline.registry.export_bank")
    kv = pq.read_metadata(path).metadata or {}
    if kv.get(KEY_SNAPSHOT, b"").decode() != source.snapshot_sha256:
        raise ValueError(f"bank file {path} does not hold {source.describe()}; export the bank "
                         "and register it from the same pass")


def _log_and_create(tracker: Tracker, run_id: str, model_name: str, source: BankSource,
                    spec: NetworkSpec, manifest: Mapping[str, Any], defaults: dict[str, str],
                    bank_file: str | Path | None, tags: Mapping[str, Any] | None) -> int:
    client = tracker.client
    info = {
        "format": MODEL_FORMAT, "kind": MODEL_KIND, "model_name": model_name, "run_id": run_id,
        "source": source.to_dict(), "network": spec.to_dict(), "mask": manifest["mask"],
        "inference_defaults": defaults, "embedded": bank_file is not None,
        "input": input_normalization(manifest["mask"].get("dataset")),
    }
    with tempfile.TemporaryDirectory(prefix="supsup-model-") as tmp:
        info_path = Path(tmp) / MODEL_JSON
        info_path.write_text(json.dumps(info, indent=1))
        artifacts = {"model_json": str(info_path)}
        if bank_file is not None:
            copy = Path(tmp) / BANK_FILE  # the artifact keeps its file name: fix it
            shutil.copyfile(bank_file, copy)
            artifacts["bank"] = str(copy)
        # No input example: MLflow would load the model to check it, reading the whole bank a
        # second time; the signature states the input already. The model is its code file
        # (models-from-code), so nothing is pickled into the artifact store.
        with global_tracking_uri(tracker.tracking_uri), resumed_run(run_id), \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            model_info = mlflow.pyfunc.log_model(
                name="model", python_model=model_code_path(), artifacts=artifacts,
                signature=signature(spec, defaults),
                pip_requirements=pip_requirements(), code_paths=code_paths(),
            )
            try:
                try:
                    client.create_registered_model(model_name)
                except MlflowException as exc:
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                mv = client.create_model_version(
                    model_name, model_info.model_uri, run_id=run_id,
                    model_id=model_info.model_id,
                    tags=_version_tags(source, spec, bank_file is not None, tags))
            except BaseException:
                # A logged model that no version holds is litter: remove it (best effort).
                with contextlib.suppress(Exception):
                    client.delete_logged_model(model_info.model_id)
                raise
    if run_id in tracker.open_runs:  # leaving the resumed run marked it FINISHED; it goes on
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    logger.debug("registered %s as models:/%s/%s", source.describe(), model_name, mv.version)
    return int(mv.version)


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
        return (name, None, None) if alias.lower() == _RESERVED_ALIAS else (name, alias, None)
    if version.lower() == _RESERVED_ALIAS:
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
        info = read_model_json(_download(client, uri, mv.name, version, MODEL_JSON, tmp))
    source = info["source"]
    return {
        "model_uri": f"models:/{mv.name}/{version}", "name": mv.name, "version": version,
        "aliases": sorted(mv.aliases or []), "run_id": mv.run_id, "tags": dict(mv.tags or {}),
        "network": info["network"], "bank": source["bank"], "registry_root": source["root"],
        "snapshot": source["snapshot_sha256"], "tasks": source["task_ids"],
        "source": source, "embedded": info["embedded"], "mask": info.get("mask", {}),
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


