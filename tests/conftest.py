"""Shared fixtures: one local Ray for the whole session (2 CPUs, loopback only)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A real local Ray with this machine's 2 CPUs; jobs reuse it instead of starting their own."""
    import ray

    from pipeline.cluster import quiet_ray_env

    quiet_ray_env()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()
