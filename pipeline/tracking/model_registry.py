"""MLflow's model registry for mask banks: register a bank's content once, find versions, and
turn a model version back into the BankSource it pins.

A version is registered per distinct content: its tag `supsup.snapshot` is the bank's snapshot
hash, and registering content that a version of the model already holds registers nothing (the
alias moves to that version, or is kept), unless that version can no longer load: when its
artifacts lost their model.json or their embedded bank file, the content is registered again as a
new version, which the aliases move to (the broken version is tagged `supsup.unloadable`). Two
drivers registering the same content at once both end on the lowest such version; the other is
deleted. Versions are found by alias (`models:/NAME@ALIAS`) or number (`models:/NAME/VERSION`);
stages are not used. The tag `supsup.model_json` is the sha256 of the version's model.json,
which loading checks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pyarrow.parquet as pq
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.bank_source import BankSource
from pipeline.registry import read_manifest
from pipeline.registry.transfer import KEY_SNAPSHOT
from pipeline.tracking.client import (
    as_text,
    global_tracking_uri,
    is_missing,
    resumed_run,
)
from pipeline.tracking.pyfunc import (
    BANK_FILE,
    MODEL_FORMAT,
    MODEL_JSON,
    MODEL_JSON_KEY,
    MODEL_KIND,
    check_inference_defaults,
    code_paths,
    file_sha256,
    input_normalization,
    model_code_path,
    pip_requirements,
    signature,
)
from pipeline.tracking.runs import Tracker
from supsup.bank import describe_ids
from supsup.networks import NetworkSpec

logger = logging.getLogger(__name__)

TAG_PREFIX = "supsup."
SNAPSHOT_TAG = f"{TAG_PREFIX}snapshot"
MODEL_JSON_TAG = f"{TAG_PREFIX}model_json"  # sha256 of the version's model.json
UNLOADABLE_TAG = f"{TAG_PREFIX}unloadable"  # why a version's artifacts can no longer load
RESERVED_ALIAS = "latest"  # MLflow reserves it: models:/NAME/latest is always the newest version
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


def _holding(client: MlflowClient, name: str, source: BankSource,
             tracking_uri: str) -> list[int]:
    """Versions of model `name` that hold exactly `source`'s content (bank and snapshot) and
    can still load it; a version whose artifacts lost a file is tagged `supsup.unloadable` and
    left out."""
    try:
        versions = client.search_model_versions(f"name = '{name}'", max_results=10000)
    except MlflowException as exc:
        if is_missing(exc):
            return []
        raise
    held = []
    for mv in versions:
        tags = mv.tags or {}
        if (tags.get(SNAPSHOT_TAG) != source.snapshot_sha256
                or tags.get(f"{TAG_PREFIX}bank") != source.bank):
            continue
        problem = _missing_artifacts(client, mv, tracking_uri)
        if problem is None:
            held.append(int(mv.version))
            continue
        logger.warning("models:/%s/%s holds %s but cannot load it: %s; registering the bank "
                       "again", name, mv.version, source.describe(), problem)
        if tags.get(UNLOADABLE_TAG) != problem:
            client.set_model_version_tag(name, mv.version, UNLOADABLE_TAG, problem)
    return sorted(held)


def _missing_artifacts(client: MlflowClient, mv: Any, tracking_uri: str) -> str | None:
    """What a version's artifacts lack to load (model.json, the embedded bank file), or None."""
    needed = [MODEL_JSON] + ([BANK_FILE] if (mv.tags or {}).get(
        f"{TAG_PREFIX}embedded") == "true" else [])
    location = client.get_model_version_download_uri(mv.name, str(mv.version))
    try:
        found = {Path(f.path).name for f in mlflow.artifacts.list_artifacts(
            artifact_uri=f"{location.rstrip('/')}/artifacts", tracking_uri=tracking_uri)}
    except (MlflowException, OSError) as exc:  # cannot tell: never re-register on a doubt
        logger.warning("could not list the artifacts of models:/%s/%s (%s); taking it as "
                       "loadable", mv.name, mv.version, exc)
        return None
    missing = [n for n in needed if n not in found]
    if not missing:
        return None
    return f"its artifact {', '.join(missing)} is gone from {location}/artifacts"


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
    held = _holding(client, model_name, source, tracker.tracking_uri)
    created = not held
    if created:
        version = _log_and_create(tracker, run_id, model_name, source, spec, manifest, defaults,
                                  bank_file, tags)
        held = _holding(client, model_name, source, tracker.tracking_uri)
        if held and held[0] < version:  # another driver registered this content first
            client.delete_model_version(model_name, str(version))
            logger.info("models:/%s/%d already held this bank; dropped the duplicate version %d",
                        model_name, held[0], version)
            created = False
        else:
            held = [version]
    version = held[0]
    for alias in aliases:
        if alias.lower() == RESERVED_ALIAS:
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
    if "recipe" in manifest:
        info["recipe"] = manifest["recipe"]
    with tempfile.TemporaryDirectory(prefix="supsup-model-") as tmp:
        info_path = Path(tmp) / MODEL_JSON
        info_path.write_text(json.dumps(info, indent=1))
        digest = file_sha256(info_path)
        artifacts = {"model_json": str(info_path)}
        if bank_file is not None:
            copy = Path(tmp) / BANK_FILE  # the artifact keeps its file name: fix it
            shutil.copyfile(bank_file, copy)
            artifacts["bank"] = str(copy)
        # The input example is one blank row in the served form; MLflow loads the model once
        # to check that it answers it (so a model that cannot serve shows at registration).
        # A model pinned to the registry (a bank too large to embed) gets none: that load would
        # read every task file a second time, doubling what publishing a large bank costs.
        # The model is its code file (models-from-code), so nothing is pickled.
        with global_tracking_uri(tracker.tracking_uri), resumed_run(run_id):
            model_info = mlflow.pyfunc.log_model(
                name="model", python_model=model_code_path(), artifacts=artifacts,
                signature=signature(spec, defaults),
                input_example=_input_example(spec) if bank_file is not None else None,
                pip_requirements=pip_requirements(), code_paths=code_paths(),
                metadata={MODEL_JSON_KEY: digest},
            )
            try:
                _ensure_registered_model(client, model_name, source.bank, spec)
                # Created from the LoggedModel's URI (models:/<model_id>): the version's source
                # names its LoggedModel, whose mlflow.modelVersions tag names the version back.
                mv = client.create_model_version(
                    model_name, model_info.model_uri, run_id=run_id,
                    model_id=model_info.model_id,
                    description=inputs_description(spec, info["input"]),
                    tags={**_version_tags(source, spec, bank_file is not None, tags),
                          MODEL_JSON_TAG: digest})
                _link_logged_model(client, model_info.model_id, model_name, int(mv.version))
            except BaseException:
                # A logged model that no version holds is litter: remove it (best effort).
                with contextlib.suppress(Exception):
                    client.delete_logged_model(model_info.model_id)
                raise
    if run_id in tracker.open_runs:  # leaving the resumed run marked it FINISHED; it goes on
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    logger.debug("registered %s as models:/%s/%s", source.describe(), model_name, mv.version)
    return int(mv.version)


INPUTS_PREFIX = "Inputs: "  # the version description's paragraph that evaluations keep


def inputs_description(spec: NetworkSpec, norm: dict[str, Any] | None) -> str:
    """What the version's predict() expects, for its description: rows, scales, parameters."""
    width = int(np.prod(spec.input_shape))
    if norm is None:
        scales = ("normalised as in training only (this data set records no mean/std, so raw "
                  "pixels are refused)")
    else:
        scales = (f"input_scale 'normalized' (default: as in training, mean {norm['mean']} std "
                  f"{norm['std']} of {norm['dataset']}), '0-1' or '0-255' raw pixels, "
                  "normalised here")
    return (f"{INPUTS_PREFIX}rows of {width} numbers (images {list(spec.input_shape)} "
            f"flattened, any float or integer dtype); {scales}. Each row gets its own task "
            "(mode per_example, the default; one_image and batch give a request one task), "
            "method one_shot or binary, objective entropy or g. Output per row: task_id, class, "
            "confidence.")


def _input_example(spec: NetworkSpec) -> np.ndarray:
    """One blank row in the form predict() takes: the image flattened, float32."""
    return np.zeros((1, int(np.prod(spec.input_shape))), dtype=np.float32)


def _ensure_registered_model(client: MlflowClient, name: str, bank: str,
                             spec: NetworkSpec) -> None:
    """The registered model, created with a description of what its versions hold and how its
    aliases move; an existing model without a description gets one, others keep theirs."""
    width = int(np.prod(spec.input_shape))
    description = (
        f"SupSup mask bank {bank!r} over a fixed random {spec.name} network: each version holds "
        "one distinct set of learned task masks. predict() takes rows of "
        f"{width} floats (images of shape {list(spec.input_shape)}, flattened) and returns each "
        "row's inferred task_id, class and confidence. New versions get the latest alias; the "
        "serving alias (e.g. @champion) moves only by promotion (`supsup promote`, or `supsup "
        "evaluate --promote-if`).")
    try:
        client.create_registered_model(name, description=description)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        if not client.get_registered_model(name).description:
            client.update_registered_model(name, description=description)


def _link_logged_model(client: MlflowClient, model_id: str, name: str, version: int) -> None:
    """Name the version on its LoggedModel (tag mlflow.modelVersions, as mlflow.register_model
    sets it), so the model's page in the UI links to the registered version."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    model = client.get_logged_model(model_id)
    linked = json.loads(model.tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    entry = {"name": name, "version": version}
    if entry not in linked:
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(
            [*linked, entry])})
