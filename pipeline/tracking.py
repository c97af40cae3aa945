"""MLflow tracking and model registry for SupSup runs: the only module that imports mlflow.

Runs record the resolved config (params and a config.yaml artifact), training and evaluation
metrics, per-task metrics plotted against the task id, and report files. At the end of training a
mask bank is registered as an MLflow model version: a pyfunc model (`SupSupModel`) whose artifacts
hold `model.json` (network spec, mask registry root, bank, snapshot hash, task ids, inference
defaults) and, for small banks, the bank's consolidated Parquet export. Loading the model rebuilds
the fixed random network from its seed (Section 3.1) and the bank of packed masks, and `predict`
infers the task of each input from the gradient of the objective with respect to the superposition
coefficients (Section 3.3) before classifying with the inferred task's mask. Versions are found by
alias (`models:/NAME@ALIAS`) or number (`models:/NAME/VERSION`); stages are not used.

Tracking URIs: `sqlite:///ABS/PATH/mlflow.db` (a local file; MLflow 3 refuses its plain file store)
or `http(s)://HOST:PORT` (an `mlflow server`). SQLite takes one writer at a time, so only the driver
process writes to MLflow; workers report results to the driver, which logs them. Every function
that talks to MLflow first sets MLFLOW_DISABLE_TELEMETRY=true, so no telemetry host is contacted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.pyfunc import PythonModelContext
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from pipeline.registry import MaskRegistry
from supsup.bank import MaskBank
from supsup.binding import use_task
from supsup.inference import METHODS, MODES, infer_task
from supsup.networks import NetworkSpec, SupermaskNet, build_network
from supsup.objectives import OBJECTIVES

logger = logging.getLogger(__name__)

MODEL_FORMAT = 1
MODEL_KIND = "supsup-mask-bank"
MODEL_JSON = "model.json"
BANK_FILE = "bank.parquet"
PARAM_VALUE_LIMIT = 500  # the oldest MLflow servers' limit; longer values go to an artifact
TAG_PREFIX = "supsup."
INFERENCE_DEFAULTS = {"method": "one_shot", "objective": "entropy", "mode": "batch"}
_INFERENCE_CHOICES = {"method": METHODS, "objective": OBJECTIVES, "mode": MODES}
_PER_EXAMPLE_ROWS = 64  # per_example inference keeps (rows, weights) gradients: bound the rows
_BATCH = 100  # MLflow's limit on params/tags per log_batch call
_METRIC_BATCH = 1000
_RESERVED_ALIAS = "latest"  # MLflow reserves it: models:/NAME/latest is always the newest version
_MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))")
_ALIAS = re.compile(r"[\w-]+")
_GLOBAL_URI_LOCK = threading.Lock()


# ------------------------------------------------------------------------------- helpers
def _quiet() -> None:
    """Keep MLflow from contacting its telemetry host; called by everything that talks to it."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    telemetry = getattr(mlflow, "telemetry", None)
    if telemetry is not None and telemetry.get_telemetry_client() is not None:
        telemetry.set_telemetry_client()  # made at `import mlflow`; re-reading the setting drops it


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (None for other URIs)."""
    if not uri.startswith("sqlite:"):
        return None
    if not uri.startswith("sqlite:///"):
        raise ValueError(f"tracking URI {uri!r}: write SQLite URIs as sqlite:///ABS/PATH/mlflow.db")
    rest = uri[len("sqlite:///"):]
    if rest in ("", ":memory:"):
        raise ValueError(f"tracking URI {uri!r}: an in-memory database keeps nothing; use "
                         "sqlite:///ABS/PATH/mlflow.db")
    return Path(rest.split("?", 1)[0])


def resolve_tracking_uri(uri: str) -> str:
    """`uri` checked, with a relative SQLite path made absolute (runs may change directory).

    ValueError for plain paths and file: URIs, which MLflow 3 refuses as tracking stores.
    """
    uri = str(uri).strip()
    if not uri or "://" not in uri and not uri.startswith("sqlite:"):
        raise ValueError(
            f"tracking URI {uri!r} is not supported: MLflow 3 refuses the plain file store; use "
            "sqlite:///ABS/PATH/mlflow.db or the http://HOST:PORT of an `mlflow server`")
    if uri.startswith("file:"):
        raise ValueError(
            f"tracking URI {uri!r}: MLflow 3 refuses the file store; use "
            "sqlite:///ABS/PATH/mlflow.db or the http://HOST:PORT of an `mlflow server`")
    path = _sqlite_path(uri)
    if path is not None and not path.is_absolute():
        query = uri.split("?", 1)[1] if "?" in uri else ""
        uri = f"sqlite:///{path.resolve()}" + (f"?{query}" if query else "")
    return uri


def _client(tracking_uri: str) -> MlflowClient:
    """A client whose runs and model registry both live at `tracking_uri`."""
    _quiet()
    uri = resolve_tracking_uri(tracking_uri)
    path = _sqlite_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI at `uri`, then restore it: model logging, and the
    SQL model registry when it resolves a logged model, read only the global URI."""
    with _GLOBAL_URI_LOCK:
        previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
        env = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]  # None unsets it
            if env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = env


@contextlib.contextmanager
def _resumed_run(run_id: str) -> Iterator[None]:
    """Make `run_id` the active fluent run (under the global URI), as model logging requires: the
    logged model then belongs to the run's experiment. Leaving a resumed run marks it FINISHED;
    register_bank puts a run that a Tracker.run still holds open back to RUNNING."""
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    with mlflow.start_run(run_id=run_id, nested=active is not None):
        yield


def _is_missing(exc: MlflowException) -> bool:
    return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def _describe_ids(ids: Sequence[int]) -> str:
    """Task ids as compact ranges, e.g. "0-249,300" (for tags and messages)."""
    ranges: list[list[int]] = []
    for t in sorted(ids):
        if ranges and t == ranges[-1][1] + 1:
            ranges[-1][1] = t
        else:
            ranges.append([t, t])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


# ------------------------------------------------------------------------------- Tracker
class Tracker:
    """Runs of one MLflow experiment: params, metrics, per-task metrics, artifacts, model versions.

    Only the driver process uses a Tracker: SQLite takes no concurrent writers ("database is
    locked"), so Ray workers return their results and the driver logs them. Not thread-safe.
    The experiment is created if missing; its artifacts go to `artifact_location`, by default a
    folder `mlartifacts` beside the SQLite file (for http URIs the server decides), so nothing
    lands in ./mlruns.
    """

    def __init__(self, tracking_uri: str, experiment: str,
                 artifact_location: str | os.PathLike[str] | None = None) -> None:
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        if not experiment or not isinstance(experiment, str):
            raise ValueError(f"experiment must be a non-empty name, got {experiment!r}")
        self.experiment = experiment
        self.client = _client(self.tracking_uri)
        self.experiment_id = self._ensure_experiment(artifact_location)
        self._runs: list[str] = []

    def __repr__(self) -> str:
        return f"Tracker({self.tracking_uri!r}, {self.experiment!r})"

    def _default_artifact_location(self) -> str | None:
        db = _sqlite_path(self.tracking_uri)
        if db is not None:
            return (db.parent / "mlartifacts").resolve().as_uri()
        if self.tracking_uri.startswith(("http://", "https://")):
            return None  # the server's --artifacts-destination
        raise ValueError(
            f"tracking URI {self.tracking_uri!r}: pass artifact_location (a folder or object-store "
            "URI) so artifacts do not land in ./mlruns")

    def _ensure_experiment(self, artifact_location: str | os.PathLike[str] | None) -> str:
        wanted = None
        if artifact_location is not None:
            loc = os.fspath(artifact_location)
            wanted = loc if "://" in loc else Path(loc).resolve().as_uri()
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            location = wanted or self._default_artifact_location()
            try:
                return self.client.create_experiment(self.experiment, location)
            except MlflowException as exc:  # another driver created it meanwhile
                exp = self.client.get_experiment_by_name(self.experiment)
                if exp is None:
                    raise ValueError(f"could not create experiment {self.experiment!r} at "
                                     f"{self.tracking_uri}: {exc.message}") from None
        if exp.lifecycle_stage == "deleted":
            raise ValueError(
                f"experiment {self.experiment!r} at {self.tracking_uri} is deleted: restore it "
                f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or choose "
                "another experiment name")
        if wanted is not None and exp.artifact_location.rstrip("/") != wanted.rstrip("/"):
            raise ValueError(
                f"experiment {self.experiment!r} already stores its artifacts at "
                f"{exp.artifact_location}, not {wanted}: leave artifact_location unset or choose "
                "another experiment name")
        return exp.experiment_id

    # ------------------------------------------------------------------------------ runs
    @property
    def run_id(self) -> str:
        """The innermost run opened with `run()`; ValueError outside one."""
        if not self._runs:
            raise ValueError("no active run: log inside `with tracker.run(...)` or pass run_id")
        return self._runs[-1]

    @contextlib.contextmanager
    def run(self, run_name: str, tags: Mapping[str, Any] | None = None,
            parent_run_id: str | None = None) -> Iterator[str]:
        """Open a run and yield its id; it ends FINISHED, or FAILED/KILLED on an exception.

        A run opened inside another one (or given `parent_run_id`) is its nested child, as MLflow
        shows sweeps: the child carries the parent's id in the mlflow.parentRunId tag.
        """
        parent = parent_run_id or (self._runs[-1] if self._runs else None)
        all_tags = {k: _text(v) for k, v in (tags or {}).items()}
        all_tags["mlflow.runName"] = run_name
        if parent is not None:
            try:
                self.client.get_run(parent)
            except MlflowException as exc:
                if _is_missing(exc):
                    raise KeyError(f"parent run {parent!r} does not exist at "
                                   f"{self.tracking_uri}") from None
                raise
            all_tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        run_id = run.info.run_id
        self._runs.append(run_id)
        status = RunStatus.to_string(RunStatus.FAILED)
        try:
            yield run_id
            status = RunStatus.to_string(RunStatus.FINISHED)
        except KeyboardInterrupt:
            status = RunStatus.to_string(RunStatus.KILLED)
            raise
        finally:
            self._runs.remove(run_id)
            try:
                self.client.set_terminated(run_id, status)
            except MlflowException as exc:
                logger.warning("could not mark run %s %s: %s", run_id, status, exc.message)

    def log_params(self, params: Mapping[str, Any], run_id: str | None = None) -> None:
        """Log params as strings. Values longer than PARAM_VALUE_LIMIT are cut, and the whole
        value goes to the artifact params/<key>.txt. Params are immutable in MLflow: logging a
        key again with another value is a ValueError naming the key."""
        run_id = run_id or self.run_id
        entries = []
        for key, value in params.items():
            text = _text(value)
            if len(text) > PARAM_VALUE_LIMIT:
                marker = f"... [{len(text)} chars: see artifact params/{key}.txt]"
                self.client.log_text(run_id, text, f"params/{key}.txt")
                text = text[:PARAM_VALUE_LIMIT - len(marker)] + marker
            entries.append(Param(str(key), text))
        for chunk in _chunks(entries, _BATCH):
            try:
                self.client.log_batch(run_id, params=list(chunk))
            except MlflowException as exc:
                stored = self.client.get_run(run_id).data.params
                clash = [p.key for p in chunk if p.key in stored and stored[p.key] != p.value]
                if clash:
                    raise ValueError(
                        f"run {run_id} already has params {clash} with other values (stored "
                        f"{[stored[k] for k in clash]}); params never change: start a new run or "
                        "log the new values as metrics or tags") from None
                raise ValueError(f"MLflow rejected params {[p.key for p in chunk][:10]} of run "
                                 f"{run_id}: {exc.message}") from None

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None,
                    run_id: str | None = None) -> None:
        """Log numeric metrics at `step` (0 when None); ValueError naming a non-numeric one."""
        run_id = run_id or self.run_id
        now = int(time.time() * 1000)
        entries = []
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise ValueError(f"metric {key!r} must be a number, got {value!r} "
                                 f"({type(value).__name__})")
            entries.append(Metric(str(key), float(value), now, int(step or 0)))
        for chunk in _chunks(entries, _METRIC_BATCH):
            try:
                self.client.log_batch(run_id, metrics=list(chunk))
            except MlflowException as exc:
                raise ValueError(f"MLflow rejected metrics {[m.key for m in chunk][:10]} of run "
                                 f"{run_id}: {exc.message}") from None

    def log_task_metrics(self, task_id: int, metrics: Mapping[str, Any],
                         run_id: str | None = None, prefix: str = "task") -> None:
        """Per-task metrics as `task/<name>` at step = task_id, so MLflow plots them per task."""
        if isinstance(task_id, bool) or not isinstance(task_id, (int, np.integer)) or task_id < 0:
            raise ValueError(f"task_id must be a non-negative integer, got {task_id!r}")
        self.log_metrics({f"{prefix}/{k}": v for k, v in metrics.items()}, step=int(task_id),
                         run_id=run_id)

    def set_tags(self, tags: Mapping[str, Any], run_id: str | None = None) -> None:
        """Set run tags (values as strings; tags, unlike params, may be overwritten)."""
        run_id = run_id or self.run_id
        entries = [RunTag(str(k), _text(v)) for k, v in tags.items()]
        for chunk in _chunks(entries, _BATCH):
            self.client.log_batch(run_id, tags=list(chunk))

    def log_text(self, text: str, artifact_file: str, run_id: str | None = None) -> None:
        """Store `text` as the run artifact `artifact_file` (e.g. "config.yaml")."""
        self.client.log_text(run_id or self.run_id, text, artifact_file)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str,
                 run_id: str | None = None) -> None:
        """Store `data` as a JSON (or YAML, by extension) run artifact."""
        self.client.log_dict(run_id or self.run_id, dict(data), artifact_file)

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None,
                     run_id: str | None = None) -> None:
        """Copy a local file or folder into the run's artifacts (under `artifact_path`)."""
        local = Path(path)
        if not local.exists():
            raise FileNotFoundError(f"artifact {local} does not exist")
        run_id = run_id or self.run_id
        if local.is_dir():
            self.client.log_artifacts(run_id, str(local), artifact_path)
        else:
            self.client.log_artifact(run_id, str(local), artifact_path)

    def get_run(self, run_id: str | None = None) -> Any:
        """The MLflow Run entity (info, data.params, data.metrics, data.tags)."""
        return self.client.get_run(run_id or self.run_id)

    # --------------------------------------------------------------------- model registry
    def register_bank(
        self,
        run_id: str,
        model_name: str,
        *,
        network_spec: Mapping[str, Any] | NetworkSpec,
        registry_root: str | os.PathLike[str],
        bank: str,
        snapshot: Mapping[str, Any] | None = None,
        embed_file: str | os.PathLike[str] | None = None,
        inference_defaults: Mapping[str, str] | None = None,
        aliases: Sequence[str] = (),
        tags: Mapping[str, Any] | None = None,
    ) -> int:
        """Log the bank as a pyfunc model in `run_id` and register it as a new version.

        `snapshot` is MaskRegistry.snapshot(bank) (computed when None); it pins the bank's
        content, and a model without `embed_file` refuses to load once the bank has changed.
        `embed_file` is the bank's MaskRegistry.export (small banks): the model then carries its
        masks and loads without the registry. Each alias is moved to the new version ("latest" is
        MLflow's own name for the newest version and is not set). Returns the version number.
        """
        client = self.client
        if not model_name or any(c in model_name for c in "/:@"):
            raise ValueError(f"model_name {model_name!r} must be non-empty without '/', ':' or '@'")
        defaults = _check_inference_defaults(inference_defaults)
        if isinstance(aliases, str):
            raise ValueError(f"aliases must be a list of names, got the string {aliases!r}")
        aliases = [_check_alias(a) for a in aliases]
        root = os.fspath(registry_root)
        root = root if "://" in root else os.path.abspath(root)
        registry = MaskRegistry(root)
        manifest = registry.manifest(bank)
        spec = (network_spec if isinstance(network_spec, NetworkSpec)
                else NetworkSpec.from_dict(dict(network_spec)))
        if spec.to_dict() != manifest["network"]:
            raise ValueError(f"network_spec {spec.to_dict()} is not the network of bank {bank!r} "
                             f"in {root} ({manifest['network']}); pass the bank's own spec")
        task_ids = registry.tasks(bank)
        if not task_ids:
            raise ValueError(f"bank {bank!r} in {root} holds no tasks: train some before "
                             "registering it")
        snap = dict(snapshot) if snapshot is not None else registry.snapshot(bank)
        ids_hash = hashlib.sha256(json.dumps(task_ids).encode()).hexdigest()
        if snap.get("bank") != bank or snap.get("task_ids_hash") != ids_hash:
            raise ValueError(
                f"snapshot {snap} does not describe bank {bank!r} as it is now ({len(task_ids)} "
                f"tasks {_describe_ids(task_ids)[:80]}): take it again with "
                "MaskRegistry.snapshot right before registering")
        info = {
            "format": MODEL_FORMAT, "kind": MODEL_KIND, "model_name": model_name,
            "run_id": run_id, "network": spec.to_dict(), "registry_root": root, "bank": bank,
            "snapshot": snap, "tasks": task_ids, "mask": manifest["mask"],
            "inference_defaults": defaults, "embedded": embed_file is not None,
        }
        with tempfile.TemporaryDirectory(prefix="supsup-model-") as tmp:
            info_path = Path(tmp) / MODEL_JSON
            info_path.write_text(json.dumps(info, indent=1))
            artifacts = {"model_json": str(info_path)}
            if embed_file is not None:
                embed = Path(embed_file)
                if not embed.is_file():
                    raise FileNotFoundError(f"embed_file {embed} does not exist; make it with "
                                            f"MaskRegistry.export({bank!r}, PATH)")
                copy = Path(tmp) / BANK_FILE  # the artifact keeps its file name: fix it
                shutil.copyfile(embed, copy)
                _bank_from_export(str(copy), info, lambda: f"embed_file {embed}")  # checks it
                artifacts["bank"] = str(copy)
            with _global_tracking_uri(self.tracking_uri), _resumed_run(run_id):
                model_info = mlflow.pyfunc.log_model(
                    name="model", python_model=SupSupModel(), artifacts=artifacts,
                    signature=_signature(spec, defaults),
                    input_example=np.zeros((2, math.prod(spec.input_shape)), np.float32),
                    pip_requirements=_pip_requirements(), code_paths=_code_paths(),
                )
                try:
                    client.create_registered_model(model_name)
                except MlflowException as exc:
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                mv = client.create_model_version(
                    model_name, model_info.model_uri, run_id=run_id, model_id=model_info.model_id,
                    tags=_version_tags(bank, root, snap, task_ids, spec, embed_file is not None,
                                       tags))
        if run_id in self._runs:  # leaving the resumed run marked it FINISHED; it goes on
            client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        version = int(mv.version)
        for alias in aliases:
            if alias.lower() == _RESERVED_ALIAS:
                logger.info("alias %r is MLflow's own: models:/%s/latest names version %d",
                            alias, model_name, version)
                continue
            client.set_registered_model_alias(model_name, alias, str(version))
        logger.info("registered bank %r (%d tasks) as models:/%s/%d", bank, len(task_ids),
                    model_name, version)
        return version


def _version_tags(bank: str, root: str, snapshot: Mapping[str, Any], task_ids: Sequence[int],
                  spec: NetworkSpec, embedded: bool, extra: Mapping[str, Any] | None
                  ) -> dict[str, str]:
    """Model version tags: enough to see in the MLflow UI what a version holds."""
    return {
        f"{TAG_PREFIX}bank": bank, f"{TAG_PREFIX}registry_root": root,
        f"{TAG_PREFIX}snapshot": snapshot["content_sha256"],
        f"{TAG_PREFIX}num_tasks": str(len(task_ids)),
        f"{TAG_PREFIX}tasks": _describe_ids(task_ids)[:4000],
        f"{TAG_PREFIX}network": json.dumps(spec.to_dict()),
        f"{TAG_PREFIX}embedded": str(embedded).lower(),
        **{str(k): _text(v) for k, v in (extra or {}).items()},
    }


def _check_alias(alias: str) -> str:
    """MLflow's alias rules, checked before anything is logged."""
    if (not isinstance(alias, str) or not _ALIAS.fullmatch(alias) or len(alias) > 255
            or re.fullmatch(r"[vV]\d+", alias)):
        raise ValueError(f"alias {alias!r} is not allowed: use letters, digits, '_' and '-' "
                         "(not v<number>, which MLflow keeps for versions)")
    return alias


def _check_inference_defaults(given: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(INFERENCE_DEFAULTS)
    for key, value in (given or {}).items():
        if key not in _INFERENCE_CHOICES:
            raise ValueError(f"inference_defaults: unknown key {key!r}; known: "
                             f"{sorted(_INFERENCE_CHOICES)}")
        if value not in _INFERENCE_CHOICES[key]:
            raise ValueError(f"inference_defaults[{key!r}] = {value!r}; choose one of "
                             f"{_INFERENCE_CHOICES[key]}")
        out[key] = value
    return out


def _signature(spec: NetworkSpec, defaults: Mapping[str, str]) -> ModelSignature:
    """Flattened float32 rows in; task_id, class and confidence per row out; inference params."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, math.prod(spec.input_shape)))]),
        outputs=Schema([ColSpec("long", "task_id"), ColSpec("long", "class"),
                        ColSpec("double", "confidence")]),
        params=ParamSchema([ParamSpec(k, "string", v) for k, v in defaults.items()]),
    )


def _pip_requirements() -> list[str]:
    """The packages the model needs at load time (given, so MLflow does not load it to guess)."""
    import pyarrow

    def pin(name: str, version: str) -> str:
        return f"{name}=={version.split('+')[0]}"

    return [pin("mlflow", mlflow.__version__), pin("torch", torch.__version__),
            pin("numpy", np.__version__), pin("pandas", pd.__version__),
            pin("pyarrow", pyarrow.__version__)]


def _code_paths() -> list[str]:
    """supsup and pipeline travel with the model, so a bare environment can load it."""
    import supsup

    return [str(Path(supsup.__file__).parent), str(Path(__file__).parent)]


# --------------------------------------------------------------------------- the model
class SupSupModel(mlflow.pyfunc.PythonModel):
    """A registered mask bank: infers each input's task, then classifies with that task's mask.

    Input: float32 rows, already normalised as in training, flattened to (B, prod(input_shape))
    (the signature's form, also as a DataFrame of that many columns); called directly, `predict`
    also takes (B, *input_shape). Output: a DataFrame with task_id, class and confidence per row.
    Params: method (one_shot | binary), objective (entropy | g), mode (one_image | batch: one task
    per call; per_example: one task per row); defaults come from the registration.
    """

    def load_context(self, context: PythonModelContext) -> None:
        """Rebuild the base network from its spec and the bank from the embedded export, or from
        the registry after checking that the bank still has the registered content."""
        _quiet()
        info = _read_model_json(context.artifacts["model_json"])
        self.info = info
        self.spec = NetworkSpec.from_dict(info["network"])
        self.defaults = dict(info["inference_defaults"])

        def where() -> str:  # asks the registry, so only when there is something to report
            return _describe_local_model(context.artifacts["model_json"], info)

        if "bank" in context.artifacts:
            self.bank = _bank_from_export(context.artifacts["bank"], info, where)
        else:
            self.bank = _bank_from_registry(info, where)
        self.net: SupermaskNet = build_network(self.spec).eval()
        self._lock = threading.Lock()  # bindings are installed on the shared network per call

    def predict(self, context: PythonModelContext, model_input: np.ndarray,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Task, class and confidence for each row of `model_input` (see the class docstring)."""
        options = dict(self.defaults)
        for key, value in (params or {}).items():
            if key not in _INFERENCE_CHOICES:
                raise ValueError(f"unknown param {key!r}; known: {sorted(_INFERENCE_CHOICES)}")
            if value is not None:
                if value not in _INFERENCE_CHOICES[key]:
                    raise ValueError(f"param {key}={value!r}; choose one of "
                                     f"{_INFERENCE_CHOICES[key]}")
                options[key] = value
        x = _as_batch(model_input, self.spec.input_shape)
        with self._lock:
            return _predict(self.net, self.bank, x, options)


def _as_batch(model_input: Any, input_shape: Sequence[int]) -> torch.Tensor:
    """(B, *input_shape) float32 from rows (B, prod(shape)) or images; ValueError otherwise."""
    if isinstance(model_input, pd.DataFrame):
        model_input = model_input.to_numpy()
    if isinstance(model_input, torch.Tensor):
        model_input = model_input.detach().cpu().numpy()
    arr = np.asarray(model_input)
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"model input must be numeric, got dtype {arr.dtype}")
    shape = tuple(int(d) for d in input_shape)
    flat = math.prod(shape)
    if arr.ndim == 2 and arr.shape[1] == flat:
        arr = arr.reshape(arr.shape[0], *shape)
    elif arr.ndim != 1 + len(shape) or tuple(arr.shape[1:]) != shape:
        raise ValueError(f"model input has shape {arr.shape}; expected (B, {flat}) flattened rows "
                         f"or (B, {', '.join(map(str, shape))})")
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if not bool(torch.isfinite(x).all()):
        raise ValueError("model input holds NaN or infinite values")
    return x


def _predict(net: SupermaskNet, bank: MaskBank, x: torch.Tensor,
             options: Mapping[str, str]) -> pd.DataFrame:
    n = x.shape[0]
    if n == 0:
        return pd.DataFrame({"task_id": np.zeros(0, np.int64), "class": np.zeros(0, np.int64),
                             "confidence": np.zeros(0, np.float64)})
    mode = options["mode"]
    step = _PER_EXAMPLE_ROWS if mode == "per_example" else n
    task_ids, confidence = [], []
    for start in range(0, n, step):
        result = infer_task(net, bank, x[start:start + step], method=options["method"],
                            objective=options["objective"], mode=mode)
        task_ids.append(result.task_ids)
        confidence.append(result.confidence)
    chosen = torch.cat(task_ids)
    classes = torch.empty(n, dtype=torch.long)
    with torch.no_grad():
        for t in chosen.unique().tolist():
            sel = chosen == t
            with use_task(net, bank, int(t)):
                classes[sel] = net(x[sel])[:, :net.spec.num_classes].argmax(-1)
    return pd.DataFrame({"task_id": chosen.numpy().astype(np.int64),
                         "class": classes.numpy().astype(np.int64),
                         "confidence": torch.cat(confidence).numpy().astype(np.float64)})


# ------------------------------------------------------------------ loading the masks
def _read_model_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        info = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable model description ({exc})") from None
    if not isinstance(info, dict) or info.get("kind") != MODEL_KIND:
        raise ValueError(f"{path} does not describe a SupSup mask bank model")
    if info.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: model format {info.get('format')!r} is not supported (this "
                         f"version reads format {MODEL_FORMAT}); upgrade supsup-pipeline")
    return info


def _describe_local_model(model_json: str, info: Mapping[str, Any]) -> str:
    """Best-effort model URI of a loaded model (for messages): models:/NAME/VERSION if the
    registry can tell, else the logged model's models:/ID."""
    name = info.get("model_name", "?")
    try:
        model_dir = Path(model_json).parent.parent  # <model>/artifacts/model.json
        model_id = Model.load(str(model_dir)).model_id
    except Exception:  # noqa: BLE001  (messages only: never mask the real error)
        return f"model {name!r} of run {info.get('run_id')}"
    if not mlflow.is_tracking_uri_set():  # a default client would create ./mlflow.db
        return f"models:/{model_id} (model {name!r})"
    try:
        for mv in MlflowClient().search_model_versions(f"name = '{name}'"):
            if mv.model_id == model_id:
                return f"models:/{name}/{mv.version}"
    except Exception:  # noqa: BLE001
        pass
    return f"models:/{model_id} (model {name!r})"


def _bank_from_export(path: str, info: Mapping[str, Any], where: Callable[[], str]) -> MaskBank:
    """The registered tasks of an embedded export, checked against the registered snapshot."""
    bank_name = info["bank"]
    with tempfile.TemporaryDirectory(prefix="supsup-bank-") as tmp:
        registry = MaskRegistry(tmp)
        registry.import_file(path, bank=bank_name)
        now = registry.snapshot(bank_name)
        if now["content_sha256"] != info["snapshot"]["content_sha256"]:
            raise ValueError(
                f"{where()}: the embedded masks of bank {bank_name!r} do not match the registered "
                f"snapshot ({now['tasks']} tasks, hash {now['content_sha256'][:12]}; registered "
                f"{info['snapshot']['tasks']} tasks, hash "
                f"{info['snapshot']['content_sha256'][:12]}); register the bank again")
        bank, _ = registry.load_bank(bank_name, task_ids=info["tasks"])
    return bank


def _bank_from_registry(info: Mapping[str, Any], where: Callable[[], str]) -> MaskBank:
    """The registered tasks read from the mask registry, if the bank is unchanged."""
    root, bank_name = info["registry_root"], info["bank"]
    registry = MaskRegistry(root)
    try:
        now = registry.snapshot(bank_name)
    except KeyError as exc:
        raise KeyError(f"{where()}: bank {bank_name!r} is no longer in the mask registry at {root} "
                       f"({exc.args[0]}); restore it or register a model that embeds its masks"
                       ) from None
    registered = info["snapshot"]
    if now["content_sha256"] != registered["content_sha256"]:
        raise ValueError(
            f"{where()}: bank {bank_name!r} in the mask registry at {root} changed since the model "
            f"was registered (then {registered['tasks']} tasks, hash "
            f"{registered['content_sha256'][:12]}; now {now['tasks']} tasks, hash "
            f"{now['content_sha256'][:12]}); register a new model version from the bank as it "
            "is now, or load the bank from the registry directly")
    bank, _ = registry.load_bank(bank_name, task_ids=info["tasks"])
    return bank


# ------------------------------------------------------------------ finding model versions
def _parse_model_uri(model_uri: str) -> tuple[str, str | None, int | None]:
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
    name, alias, version = _parse_model_uri(model_uri)
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
        if not _is_missing(exc) and exc.error_code != "INVALID_PARAMETER_VALUE":
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
    """What a model version holds: name, version, aliases, run_id, tags, network, bank, registry
    root, snapshot, tasks, embedded, inference defaults.

    KeyError naming the URI and listing the registered models and aliases when it does not exist.
    """
    uri = resolve_tracking_uri(tracking_uri)
    client = _client(uri)
    mv = _model_version(client, model_uri, uri)
    version = int(mv.version)
    with tempfile.TemporaryDirectory(prefix="supsup-lookup-") as tmp:
        info = _read_model_json(_download(client, uri, mv.name, version, MODEL_JSON, tmp))
    aliases = list(mv.aliases or [])
    return {
        "model_uri": f"models:/{mv.name}/{version}", "name": mv.name, "version": version,
        "aliases": sorted(aliases), "run_id": mv.run_id, "tags": dict(mv.tags or {}),
        "network": info["network"], "bank": info["bank"],
        "registry_root": info["registry_root"], "snapshot": info["snapshot"],
        "tasks": info["tasks"], "embedded": info["embedded"], "mask": info.get("mask", {}),
        "inference_defaults": info["inference_defaults"],
    }


def load_bank_from_model(model_uri: str, tracking_uri: str,
                         device: torch.device | str = "cpu") -> tuple[MaskBank, NetworkSpec]:
    """The registered MaskBank and NetworkSpec of a model version, for evaluation jobs.

    Embedded masks are read from the model; otherwise the registry bank is loaded after checking
    that it still has the registered content (ValueError naming the URI and the bank if not).
    """
    uri = resolve_tracking_uri(tracking_uri)
    client = _client(uri)
    mv = _model_version(client, model_uri, uri)
    version = int(mv.version)

    def where() -> str:
        return f"{model_uri} (models:/{mv.name}/{version})"

    with tempfile.TemporaryDirectory(prefix="supsup-model-") as tmp:
        info = _read_model_json(_download(client, uri, mv.name, version, MODEL_JSON, tmp))
        if info["embedded"]:
            path = _download(client, uri, mv.name, version, BANK_FILE, tmp)
            bank = _bank_from_export(path, info, where)
        else:
            bank = _bank_from_registry(info, where)
    return bank.to(device), NetworkSpec.from_dict(info["network"])


def run_config_text(run_id: str, tracking_uri: str, artifact_file: str = "config.yaml") -> str:
    """The text of a run's artifact (by default the resolved config it logged)."""
    uri = resolve_tracking_uri(tracking_uri)
    _client(uri)
    with tempfile.TemporaryDirectory(prefix="supsup-run-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact_file, dst_path=tmp, tracking_uri=uri)
        except MlflowException as exc:
            raise FileNotFoundError(f"run {run_id} at {uri} has no artifact {artifact_file!r} "
                                    f"({exc.message})") from None
        return Path(path).read_text()


__all__ = [
    "BANK_FILE",
    "MODEL_JSON",
    "PARAM_VALUE_LIMIT",
    "SupSupModel",
    "Tracker",
    "load_bank_from_model",
    "lookup",
    "resolve_tracking_uri",
    "run_config_text",
]
