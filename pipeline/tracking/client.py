"""MLflow clients for one tracking URI, and the process-wide settings MLflow needs.

Tracking URIs are checked and resolved by `pipeline.paths.resolve_tracking_uri`. Every function
that talks to MLflow first calls `quiet()`, so no telemetry host is contacted.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.paths import resolve_tracking_uri, sqlite_path

_GLOBAL_URI_LOCK = threading.Lock()


def quiet() -> None:
    """Keep MLflow from contacting its telemetry host; called by everything that talks to it."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    telemetry = getattr(mlflow, "telemetry", None)
    if telemetry is not None and telemetry.get_telemetry_client() is not None:
        telemetry.set_telemetry_client()  # made at `import mlflow`; re-reading the setting drops it


def client_for(tracking_uri: str) -> MlflowClient:
    """A client whose runs and model registry both live at `tracking_uri`."""
    quiet()
    uri = resolve_tracking_uri(tracking_uri)
    path = sqlite_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def global_tracking_uri(uri: str) -> Iterator[None]:
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
def resumed_run(run_id: str) -> Iterator[None]:
    """Make `run_id` the active fluent run (under the global URI), as model logging requires: the
    logged model then belongs to the run's experiment. Leaving a resumed run marks it FINISHED;
    register_bank puts a run that a Tracker.run still holds open back to RUNNING."""
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    with mlflow.start_run(run_id=run_id, nested=active is not None):
        yield


def is_missing(exc: MlflowException) -> bool:
    return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)
