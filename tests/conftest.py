"""Shared fixtures: one local Ray for the whole session (2 CPUs, loopback only); and, when
SUPSUP_TEST_STATE names a file, the test that is running right now is kept in it, so that a run
that dies without pytest's summary (a signal, a native `_exit`) can still be told what died."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

STATE_ENV = "SUPSUP_TEST_STATE"


def _note(state: str) -> None:
    """Replace the state file's one line (a rename, so a kill never leaves half a line)."""
    path = os.environ.get(STATE_ENV)
    if not path:
        return
    temporary = Path(f"{path}.tmp")
    temporary.write_text(f"{state}\n")
    os.replace(temporary, path)


def pytest_sessionstart(session: pytest.Session) -> None:
    _note("collecting")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _note(f"setup of {item.nodeid}")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    _note(f"call of {item.nodeid}")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    _note(f"teardown of {item.nodeid}")  # the last test's also ends session fixtures (Ray)


def pytest_runtest_logfinish(nodeid: str) -> None:
    _note(f"between tests, after {nodeid}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _note(f"finished {int(exitstatus)}")


@pytest.fixture(autouse=True)
def tracking_uri_left_as_found() -> Iterator[None]:
    """MLFLOW_TRACKING_URI as before each test: `mlflow.set_tracking_uri` writes it into the
    environment, where later tests (and the servers and Ray heads they start) would inherit a
    store that is not theirs."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if os.environ.get("MLFLOW_TRACKING_URI") != before:
        import mlflow

        mlflow.set_tracking_uri(before)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A real local Ray with this machine's 2 CPUs; jobs reuse it instead of starting their own.

    It declares the machine's GPUs, or one GPU with no device behind it where there are none, so
    the scheduling of GPU tasks (slots, worker reuse) is tested on machines without one too."""
    import ray
    import torch

    from pipeline.cluster import quiet_ray_env

    quiet_ray_env()
    # This process is the session Ray's driver: once its raylet or GCS is gone, Ray's native
    # code ends it with status 1 at its next call (no summary, no finalizers). On a machine
    # loaded far beyond its cores a starved raylet can miss the GCS's health checks (by default
    # about half a minute of them) and be declared dead; these tolerate minutes.
    tolerant = {"health_check_timeout_ms": 30_000, "health_check_failure_threshold": 10,
                "gcs_rpc_server_reconnect_timeout_s": 300}
    ray.init(num_cpus=2, num_gpus=torch.cuda.device_count() or 1, include_dashboard=False,
             log_to_driver=False, configure_logging=False, _system_config=tolerant)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op torch thread while a module trains: on two cores shared with Ray workers and
    other processes, two threads per process oversubscribe them (measured 4x slower per step)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
