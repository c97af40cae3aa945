"""pipeline.cluster without a cluster: how many workers fit, and the options they get."""

from __future__ import annotations

import pytest

from pipeline.cluster import check_address, cluster_address, fits, remote_options, worker_slots
from pipeline.config import ClusterSection


@pytest.mark.parametrize("total, per, expected", [
    (1.0, 0.2, 5), (1.0, 0.1, 10), (3.0, 0.3, 10), (2.0, 1.0, 2), (1.0, 0.3, 3), (0.5, 1.0, 0),
])
def test_fits_counts_workers_without_float_floor_errors(total: float, per: float,
                                                        expected: int) -> None:
    assert fits(total, per) == expected
    # Ray counts resources in fixed point, 1/10000 of a unit: its own count of such workers
    assert fits(total, per) == round(total * 10_000) // round(per * 10_000)


def test_worker_slots_take_the_scarcer_resource() -> None:
    cluster = ClusterSection(cpus_per_worker=1, gpus_per_worker=0.2)
    assert worker_slots(cluster, {"CPU": 16, "GPU": 1}) == 5
    assert worker_slots(ClusterSection(cpus_per_worker=4), {"CPU": 16}) == 4
    with pytest.raises(ValueError, match="gpus_per_worker is 0.2 but the cluster has 0 GPUs"):
        worker_slots(cluster, {"CPU": 16})
    options = remote_options(cluster, 3)
    assert options == {"num_cpus": 1, "num_gpus": 0.2, "max_calls": 0, "max_retries": 3,
                       "retry_exceptions": False}


def test_gpu_workers_live_across_groups(ray_local: None) -> None:
    """Ray ends a GPU task's process after one call unless told otherwise; the job's options keep
    it, so torch, the data, the network and the bank are loaded once per worker, not per group."""
    import ray

    def _pid() -> int:  # defined here so Ray ships it by value to its workers
        import os

        return os.getpid()

    options = remote_options(ClusterSection(cpus_per_worker=1, gpus_per_worker=1), 0)
    reused = ray.remote(**options)(_pid)
    pids = {ray.get(reused.remote()) for _ in range(3)}
    assert len(pids) == 1
    ray_default = ray.remote(num_cpus=1, num_gpus=1)(_pid)  # the control: one call per process
    assert len({ray.get(ray_default.remote()) for _ in range(3)}) == 3


def test_the_address_comes_from_the_flag_the_config_or_ray_address(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(ClusterSection()) is None  # a new local Ray
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cluster_address(ClusterSection()) == "10.0.0.1:6379"
    assert cluster_address(ClusterSection(address="head:6379")) == "head:6379"
    assert cluster_address(ClusterSection(address="head:6379"), "other:1") == "other:1"


def test_a_cluster_to_join_must_accept_a_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        check_address(ClusterSection(), f"127.0.0.1:{port}")
        check_address(ClusterSection(address=f"ray://127.0.0.1:{port}"))
    with pytest.raises(ValueError, match=rf"cannot reach the Ray cluster \(GCS\) at "
                                         rf"'127\.0\.0\.1:{port}' \(RAY_ADDRESS\): "):
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        check_address(ClusterSection())
    monkeypatch.delenv("RAY_ADDRESS")
    for address in (None, "auto", "local"):  # a new local Ray, or Ray finds its own cluster
        check_address(ClusterSection(address=address))
    with pytest.raises(ValueError, match=r"--address 'head:port' is not a Ray address"):
        check_address(ClusterSection(), "head:port")
