"""Shared fixtures: one local Ray for the whole session (2 CPUs, loopback only)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A real local Ray with this machine's 2 CPUs; jobs reuse it instead of starting their own.

    It declares the machine's GPUs, or one GPU with no device behind it where there are none, so
    the scheduling of GPU tasks (slots, worker reuse) is tested on machines without one too."""
    import ray
    import torch

    from pipeline.cluster import quiet_ray_env

    quiet_ray_env()
    ray.init(num_cpus=2, num_gpus=torch.cuda.device_count() or 1, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
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
