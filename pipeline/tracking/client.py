"""MLflow clients for one tracking URI, and the process-wide settings MLflow needs.

Tracking URIs are checked and resolved by `pipeline.paths.resolve_tracking_uri`. Every function
that talks to MLflow first calls `quiet()`, so no telemetry host is contacted.

At cluster scale two things go wrong before anything is logged, and `client_for` guards both once
per URI per process: a server that is not there (MLflow's own requests retry for minutes, so an
http(s) URI is first asked for /health with a short timeout), and several drivers creating one
new SQLite store at once (MLflow's schema migration is not safe against a concurrent one, so it
runs under an exclusive file lock beside the database).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import mlflow
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.credentials import get_default_host_creds

from pipeline.paths import resolve_tracking_uri, sqlite_path

_GLOBAL_URI_LOCK = threading.Lock()
HEALTH_TIMEOUT_S = 5.0  # connect + answer; a live server answers /health in milliseconds
_REACHABLE: set[str] = set()  # http(s) URIs whose /health answered in this process
_SQLITE_READY: set[str] = set()  # sqlite URIs whose schema this process saw complete


def quiet() -> None:
    """Keep MLflow from contacting its telemetry host; called by everything that talks to it."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    telemetry = getattr(mlflow, "telemetry", None)
    if telemetry is not None and telemetry.get_telemetry_client() is not None:
        telemetry.set_telemetry_client()  # made at `import mlflow`; re-reading the setting drops it


def client_for(tracking_uri: str) -> MlflowClient:
    """A client whose runs and model registry both live at `tracking_uri`.

    An http(s) server must answer /health first (ValueError naming the URI otherwise); a SQLite
    store is created, or found complete, under `<db>.lock` before the client is handed out.
    """
    quiet()
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        check_reachable(uri)
    path = sqlite_path(uri)
    if path is None or uri in _SQLITE_READY:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(path.with_name(path.name + ".lock")):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        # The tracking store creates and migrates the schema when first opened, the registry
        # store then checks its tables: both happen here, one process at a time.
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)
    _SQLITE_READY.add(uri)
    return client


def check_reachable(uri: str) -> None:
    """ValueError unless the `mlflow server` at `uri` answers GET /health within about
    HEALTH_TIMEOUT_S. Without it a wrong or stopped server shows only after MLflow's request
    retries give up, minutes later. Successes are remembered for the process.

    The server's TLS settings (MLFLOW_TRACKING_INSECURE_TLS, MLFLOW_TRACKING_SERVER_CERT_PATH,
    MLFLOW_TRACKING_CLIENT_CERT_PATH) apply. /health needs no login on an `mlflow server`, so 401
    and 403 (an authenticating proxy in front of it) count as reachable: MLflow's own requests
    carry the credentials.
    """
    if uri in _REACHABLE:
        return
    url = f"{uri.rstrip('/')}/health"
    creds = get_default_host_creds(uri)
    half = HEALTH_TIMEOUT_S / 2  # connect, then answer: about HEALTH_TIMEOUT_S in all
    try:
        response = requests.get(url, timeout=(half, half), verify=creds.verify,
                                cert=creds.client_cert_path)
    except requests.exceptions.Timeout:
        what = f"no answer from {url} within {half:g} s (timed out)"
    except requests.exceptions.SSLError as exc:
        what = f"TLS failed on {url} ({_innermost(exc)})"
    except requests.exceptions.RequestException as exc:
        what = f"GET {url} failed: {_innermost(exc)}"
    else:
        if response.ok or response.status_code in (401, 403):
            _REACHABLE.add(uri)
            return
        what = f"GET {url} answered HTTP {response.status_code} {response.reason}"
    raise ValueError(
        f"MLflow tracking server {uri} is not reachable: {what}. Start the server (`mlflow "
        "server --host HOST --port PORT`) or point tracking.uri (--set tracking.uri=URI, or "
        "MLFLOW_TRACKING_URI) at one that runs")


def _innermost(exc: BaseException) -> str:
    """The socket-level reason under requests' and urllib3's wrappers, e.g. "connection
    refused", so the message says what happened rather than "Max retries exceeded"."""
    seen: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in seen:
        seen.append(cause)
        reason = getattr(cause, "reason", None)
        cause = cause.__cause__ or cause.__context__ or (
            reason if isinstance(reason, BaseException) else None)
    last = seen[-1]
    if isinstance(last, ConnectionRefusedError):
        return "connection refused"
    if isinstance(last, OSError) and last.strerror:
        return last.strerror  # e.g. "Name or service not known"
    return str(last)


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive flock on `lock_file` (created if missing, never removed: removing it
    would let a third process lock a new file while another holds the old one)."""
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
