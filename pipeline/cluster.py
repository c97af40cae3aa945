"""The one place that starts or joins Ray.

Local by default (this machine's CPUs and GPUs, quiet and bound to loopback); an address joins an
existing cluster instead. A Ray session that is already up (a test fixture, a notebook) is reused
and left running.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from pipeline.config import ClusterSection

log = logging.getLogger(__name__)

_QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_DEDUP_LOGS": "0",
}


def quiet_ray_env() -> None:
    """Keep Ray local and silent: no usage stats, no auth token, loopback binding."""
    for k, v in _QUIET_ENV.items():
        os.environ.setdefault(k, v)


@contextlib.contextmanager
def ray_session(cluster: ClusterSection, address: str | None = None) -> Iterator[dict[str, Any]]:
    """Start (or join) Ray for the duration of a job; yields the cluster's resources."""
    import ray

    quiet_ray_env()
    owned = False
    if not ray.is_initialized():
        target = address or cluster.address
        if target:
            log.info("joining Ray cluster at %s", target)
            ray.init(address=target, log_to_driver=False)
        else:
            ray.init(
                num_cpus=cluster.num_cpus or os.cpu_count() or 1,
                num_gpus=cluster.num_gpus,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        owned = True
    try:
        yield ray.cluster_resources()
    finally:
        if owned:
            ray.shutdown()


def worker_slots(cluster: ClusterSection, resources: dict[str, Any]) -> int:
    """How many workers of the configured size fit in the cluster at once."""
    cpus = float(resources.get("CPU", 1))
    slots = int(cpus // cluster.cpus_per_worker) or 1
    if cluster.gpus_per_worker > 0:
        gpus = float(resources.get("GPU", 0))
        if gpus < cluster.gpus_per_worker:
            raise ValueError(f"cluster.gpus_per_worker is {cluster.gpus_per_worker} but the "
                             f"cluster has {gpus} GPUs; set it to 0 to train on CPUs")
        slots = min(slots, int(gpus // cluster.gpus_per_worker))
    return max(1, slots)


def remote_options(cluster: ClusterSection, max_retries: int) -> dict[str, Any]:
    """Ray task options: resources per worker and retries when a worker process dies."""
    return {
        "num_cpus": cluster.cpus_per_worker,
        "num_gpus": cluster.gpus_per_worker,
        "max_retries": max_retries,
        "retry_exceptions": False,
    }


def worker_threads(cluster: ClusterSection) -> int:
    """Torch threads inside a worker (Ray sets OMP_NUM_THREADS=1 for 1-CPU tasks)."""
    return cluster.threads_per_worker or max(1, int(cluster.cpus_per_worker))
