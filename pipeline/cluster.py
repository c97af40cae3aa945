"""The one place that starts or joins Ray.

Local by default (this machine's CPUs and GPUs, quiet and bound to loopback); an address
(`--address`, `cluster.address` or RAY_ADDRESS) joins an existing cluster instead. A Ray session
that is already up (a test fixture, a notebook, a `ray job submit` entrypoint) is reused and left
running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

from pipeline.config import ClusterSection, shown

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


def cluster_address(cluster: ClusterSection, address: str | None = None) -> str | None:
    """The cluster to join, as Ray users name it: `--address`, else `cluster.address`, else the
    standard RAY_ADDRESS variable (which `ray job submit` sets for its entrypoint); None for a
    new local Ray."""
    return address or cluster.address or os.environ.get("RAY_ADDRESS") or None


# Seconds to wait for the cluster's port to accept a connection: a live head answers in
# milliseconds, even across a data centre; without this check ray.init retries for minutes.
CONNECT_TIMEOUT = 5.0
# Ray's default ports: the head's GCS, and the Ray Client server of ray:// addresses.
GCS_PORT, CLIENT_PORT = 6379, 10001


def _where_from(cluster: ClusterSection, address: str | None) -> str:
    if address:
        return "--address"
    return "cluster.address" if cluster.address else "RAY_ADDRESS"


def check_address(cluster: ClusterSection, address: str | None = None,
                  timeout: float = CONNECT_TIMEOUT) -> None:
    """ValueError unless the cluster to join accepts a TCP connection on its port: the GCS port
    of HOST:PORT, the client port of ray://HOST:PORT. Nothing to check for a new local Ray or
    "auto" (Ray finds the cluster this machine belongs to)."""
    target = cluster_address(cluster, address)
    if not target or target in ("auto", "local"):
        return
    if "://" in target and not target.startswith("ray://"):
        return  # a client scheme of a Ray plugin: its own library connects
    where = _where_from(cluster, address)
    client = target.startswith("ray://")
    rest = target[len("ray://"):] if client else target
    default = CLIENT_PORT if client else GCS_PORT
    try:
        parts = urlsplit(f"//{rest}")
        host, port, path = parts.hostname, parts.port or default, parts.path
    except ValueError:  # a port that is not a number, or out of range
        host, port, path = None, default, ""
    if not host or path not in ("", "/"):
        raise ValueError(f"{where} {shown(target)} is not a Ray address: write HOST:PORT (the "
                         f"head's GCS port, {GCS_PORT} by default), ray://HOST:PORT (Ray Client, "
                         f"{CLIENT_PORT} by default) or auto")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        reason = "no answer" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        what = "Ray Client server" if client else "Ray cluster (GCS)"
        raise ValueError(
            f"cannot reach the {what} at {shown(target)} ({where}): {reason}. Start the "
            f"cluster (`ray start --head` on {shown(host)}), or pass the address of a running "
            "one with --address, or leave --address, cluster.address and RAY_ADDRESS unset to "
            "start a local Ray") from None


@contextlib.contextmanager
def ray_session(cluster: ClusterSection, address: str | None = None) -> Iterator[dict[str, Any]]:
    """Start (or join) Ray for the duration of a job; yields the cluster's resources.

    With no address anywhere, a new local Ray is started explicitly (`address="local"`): a
    `ray_current_cluster` file left by a killed `ray start --head` is never taken for a cluster
    to join. Joining passes no CPU or GPU counts (the cluster has its own).
    """
    import ray

    quiet_ray_env()
    owned = False
    handler = signal.getsignal(signal.SIGTERM)
    if not ray.is_initialized():
        from pipeline.console import native_stderr_to_log

        target = cluster_address(cluster, address)
        if target:
            check_address(cluster, address)  # ray.init would retry for minutes
            log.info("joining Ray cluster at %s", target)
        with native_stderr_to_log():
            if target:
                ray.init(address=target, log_to_driver=False, configure_logging=False)
            else:
                ray.init(
                    address="local",
                    num_cpus=cluster.num_cpus or os.cpu_count() or 1,
                    num_gpus=cluster.num_gpus,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
        owned = True
        if callable(handler) and threading.current_thread() is threading.main_thread():
            # Ray's core installs a crash handler for SIGTERM that aborts the process; keep the
            # caller's, so a terminated job marks its runs and shuts Ray down like Ctrl-C.
            signal.signal(signal.SIGTERM, handler)
    try:
        yield ray.cluster_resources()
    finally:
        if owned:
            ray.shutdown()


def alive_nodes() -> list[dict[str, Any]]:
    """The cluster's live nodes (Ray's node records: NodeID, NodeManagerAddress, ...)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def check_shared(root: str, probe: str, exists: Callable[[str, str], bool],
                 key: str = "registry.root") -> None:
    """ValueError unless every node of a multi-node cluster sees `probe` under `root`.

    The driver has just written `probe`; a tiny task pinned to each node asks
    `exists(root, probe)` there. A local folder that is not shared storage (or an object store
    whose credentials a node lacks) fails here, before any training, instead of each node
    writing masks to its own disk. `key` names the setting that chose `root`.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = alive_nodes()
    if len(nodes) <= 1:
        return
    check = ray.remote(num_cpus=0, max_retries=0)(exists)
    refs = {n["NodeManagerAddress"]: check.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            root, probe) for n in nodes}
    blind = []
    for where, ref in refs.items():
        try:
            seen = ray.get(ref, timeout=120)
        except Exception as exc:  # noqa: BLE001  (any failure there means: not reachable)
            seen, where = False, f"{where} ({type(exc).__name__}: {exc})"
        if not seen:
            blind.append(where)
    if blind:
        raise ValueError(
            f"{key} {root} is not shared by every node of the Ray cluster: nodes "
            f"{', '.join(blind)} do not see it. Each node would write to its own disk: use "
            "shared storage mounted at the same path on every node, or an object store "
            f"({key}: s3://BUCKET/PREFIX, credentials from the AWS environment)")


def worker_slots(cluster: ClusterSection, resources: dict[str, Any]) -> int:
    """How many workers of the configured size fit in the cluster at once."""
    cpus = float(resources.get("CPU", 1))
    slots = fits(cpus, cluster.cpus_per_worker) or 1
    if cluster.gpus_per_worker > 0:
        gpus = float(resources.get("GPU", 0))
        if fits(gpus, cluster.gpus_per_worker) < 1:
            raise ValueError(f"cluster.gpus_per_worker is {cluster.gpus_per_worker} but the "
                             f"cluster has {gpus:g} GPUs; set it to 0 to train on CPUs")
        slots = min(slots, fits(gpus, cluster.gpus_per_worker))
    return max(1, slots)


def fits(total: float, per_worker: float) -> int:
    """How many workers of `per_worker` fit in `total`, without float floor errors: in floats
    1.0 // 0.2 is 4.0 (0.2 is a hair above 1/5), while Ray itself places 5 such workers."""
    return int(total / per_worker + 1e-9)


def remote_options(cluster: ClusterSection, max_retries: int) -> dict[str, Any]:
    """Ray task options: resources per worker and retries when a worker process dies.

    `max_calls=0` keeps worker processes alive across groups. Ray's default for GPU tasks is
    one call per process, which would re-import torch, create a CUDA context and reload the
    data, the network and (evaluating) the whole bank for every group; a long-lived worker
    keeps them in its per-process caches (`pipeline.builders.worker_tasks`, `worker_net`,
    `pipeline.registry.load_bank(cache=True)`) and pays compilation once.
    """
    return {
        "num_cpus": cluster.cpus_per_worker,
        "num_gpus": cluster.gpus_per_worker,
        "max_calls": 0,
        "max_retries": max_retries,
        "retry_exceptions": False,
    }


def worker_threads(cluster: ClusterSection) -> int:
    """Torch threads inside a worker (Ray sets OMP_NUM_THREADS=1 for 1-CPU tasks)."""
    return cluster.threads_per_worker or max(1, int(cluster.cpus_per_worker))
