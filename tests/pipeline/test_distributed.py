"""Data-parallel training of one task with Ray Train: real Ray, real gloo, real registry files."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from pipeline.builders import build_net, build_spec, build_tasks
from pipeline.config import ConfigError, ExperimentConfig, parse_config
from pipeline.jobs.distributed import (
    collective_backend,
    data_parallel_steps,
    rank_seed,
    scaling_options,
    train_task_distributed,
)
from pipeline.jobs.gloo import ENV as GLOO_ENV
from pipeline.jobs.gloo import host_address, interface_of, node_interface
from pipeline.jobs.train import TrainSummary, prepare_bank, run_training, train_group_worker
from pipeline.registry import MaskRegistry, load_bank
from supsup.bank import MaskBank
from supsup.binding import use_task
from supsup.networks import SupermaskNet
from supsup.scores import TaskScores
from supsup.tasks import TaskSet
from supsup.train import TrainConfig

pytestmark = pytest.mark.slow

NUM_TASKS = 2


def make_config(tmp_path: Path, name: str = "dptest", **train: Any) -> ExperimentConfig:
    """Split MNIST digit pairs on the small conv net (per-task BN), 2 workers of 1 CPU each."""
    return parse_config({
        "name": name,
        "output_dir": str(tmp_path / "runs"),
        "network": {"name": "conv", "num_outputs": 10, "width": 8},
        "tasks": {"family": "split", "num_tasks": NUM_TASKS, "classes_per_task": 2},
        "train": {"steps": 30, "batch_size": 32, "optimizer": "adam", "lr": 0.01,
                  "log_every": 10, "data_parallel_workers": 2, **train},
        "cluster": {"cpus_per_worker": 1},
        "registry": {"root": str(tmp_path / "registry")},
    })


def gg_accuracy(net: SupermaskNet, bank: MaskBank, tasks: TaskSet, task_id: int) -> float:
    """Held-out accuracy with the task given, its masks and BN stats bound from `bank`."""
    net.eval()
    correct = total = 0
    with use_task(net, bank, task_id), torch.no_grad():
        for x, y in tasks.eval_batches(task_id, "test"):
            correct += int((net(x)[:, :tasks.num_classes].argmax(-1) == y).sum())
            total += y.numel()
    return correct / total


# ------------------------------------------------------------------- without a worker group
def test_zero_workers_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"train\.data_parallel_workers"):
        parse_config({"train": {"data_parallel_workers": 0}})
    with pytest.raises(ConfigError, match=r"train\.backend"):
        parse_config({"train": {"backend": "mpi"}})


def test_the_fused_step_with_data_parallel_workers_is_refused_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Its gradients sit on the fused step's own effective weights, out of reach of the score
    averaging: each rank would train alone. `supsup train` refuses it from the file."""
    from pipeline.cli import main

    path = tmp_path / "dp.yaml"
    path.write_text(yaml.safe_dump(make_config(tmp_path).model_dump(exclude={"reduced"})))
    capsys.readouterr()
    assert main(["train", str(path), "--set", "train.fused=true"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {path}: --set 'train.fused=true': train.fused: cannot be true with "
                   "train.data_parallel_workers=2: the data-parallel ranks average score "
                   "gradients, which the fused step never forms, so each rank would train alone; "
                   "set train.fused: false, or train.data_parallel_workers: 1\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dp.yaml"]
    # One rank is the single-process job, where the fused step is the whole story.
    assert make_config(tmp_path, fused=True, data_parallel_workers=1).train.fused


def test_backend_auto_picks_by_device(tmp_path: Path) -> None:
    train = make_config(tmp_path).train
    assert collective_backend(train, 0) == "gloo"
    assert collective_backend(train, 1) == "nccl"
    assert collective_backend(train, 0.5) == "gloo"  # ranks may share a GPU: not NCCL
    gloo = make_config(tmp_path, backend="gloo").train
    assert collective_backend(gloo, 1) == "gloo"


def test_nccl_with_fractional_gpus_is_refused_with_the_reason(tmp_path: Path) -> None:
    nccl = make_config(tmp_path, backend="nccl").train
    assert collective_backend(nccl, 2) == "nccl"
    with pytest.raises(ValueError, match=r"gpus_per_worker=0\.5: .*Duplicate GPU detected.*"
                                         r"whole GPU"):
        collective_backend(nccl, 0.5)


def test_nccl_needs_gpu_workers(tmp_path: Path) -> None:
    config = make_config(tmp_path, backend="nccl")
    with pytest.raises(ValueError, match=r"train\.backend is 'nccl' but cluster\.gpus_per_worker"):
        train_task_distributed(config, 0)


def test_task_outside_the_family(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"task 7 is outside tasks\.num_tasks=2"):
        train_task_distributed(make_config(tmp_path), 7)


def test_scaling_options_follow_the_cluster_section(tmp_path: Path) -> None:
    cpu = make_config(tmp_path)
    assert scaling_options(cpu) == {"num_workers": 2, "use_gpu": False,
                                    "resources_per_worker": {"CPU": 1.0}}
    gpu = parse_config({**cpu.model_dump(), "cluster": {"cpus_per_worker": 4,
                                                        "gpus_per_worker": 1}})
    assert scaling_options(gpu) == {"num_workers": 2, "use_gpu": True,
                                    "resources_per_worker": {"CPU": 4.0, "GPU": 1.0}}


def test_epochs_count_the_effective_batch() -> None:
    by_epochs = TrainConfig(epochs=2, batch_size=32)
    assert data_parallel_steps(by_epochs, 1000, 1) == 63  # ceil(2000 / 32)
    assert data_parallel_steps(by_epochs, 1000, 2) == 32  # ceil(2000 / 64)
    assert data_parallel_steps(TrainConfig(steps=30), 1000, 4) == 30  # steps are optimiser steps


def test_rank_seeds() -> None:
    assert rank_seed(5, 0) == 5  # rank 0 sees the single-worker batches
    seeds = {rank_seed(5, r) for r in range(8)}
    assert len(seeds) == 8 and rank_seed(5, 3) == rank_seed(5, 3)


def test_the_interface_holding_an_address_is_found_by_that_address() -> None:
    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("198.51.100.7") is None  # a documentation address nobody holds


@pytest.fixture
def node_link() -> Iterator[tuple[str, str]]:
    """One end of a veth pair holding a documentation address, as a node's link (root)."""
    name, ip = "sgloo0", "198.51.100.9"
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to add an interface")
    added = subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name",
                            "sgloo1"], capture_output=True)
    if added.returncode != 0:
        pytest.skip(f"cannot add an interface: {added.stderr.decode().strip()}")
    try:
        subprocess.run(["ip", "addr", "add", f"{ip}/32", "dev", name], check=True)
        yield name, ip
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)


def test_gloo_gets_the_node_ip_interface_where_the_host_name_is_loopback(
        node_link: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the host name resolves to loopback, gloo would bind there: the interface holding
    the Ray node IP is named instead; GLOO_SOCKET_IFNAME set by the user, or a loopback node IP
    (a one-machine Ray), leave gloo alone."""
    name, ip = node_link
    monkeypatch.delenv(GLOO_ENV, raising=False)
    assert interface_of(ip) == name
    assert node_interface("127.0.0.1") == (None, None)
    if not ipaddress.ip_address(host_address() or "127.0.0.1").is_loopback:
        assert node_interface(ip) == (None, None)  # gloo binds to a reachable address already
        return
    assert node_interface(ip) == (name, None)
    unknown, problem = node_interface("198.51.100.7")
    assert unknown is None and "no interface holds its Ray node IP 198.51.100.7" in str(problem)
    monkeypatch.setenv(GLOO_ENV, "eth9")
    assert node_interface(ip) == (None, None)


def test_worker_group_must_fit_the_cluster(ray_local: None, tmp_path: Path) -> None:
    config = make_config(tmp_path, data_parallel_workers=3)
    with pytest.raises(ValueError, match=r"data_parallel_workers=3 x cluster\.cpus_per_worker=1"):
        train_task_distributed(config, 0)


# ------------------------------------------------------------ two gloo workers, end to end
@pytest.fixture(scope="module")
def trained(ray_local: None, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[ExperimentConfig, TrainSummary, dict[int, dict[str, Any]], list]:
    """Both tasks trained through run_training with 2 Ray Train workers each."""
    config = make_config(tmp_path_factory.mktemp("dp"))
    reports: dict[int, dict[str, Any]] = {}
    seen: list[tuple[int, int]] = []
    summary = run_training(config, progress=lambda d, t: seen.append((d, t)),
                           on_task=lambda r: reports.__setitem__(r["task_id"], r))
    return config, summary, reports, seen


def test_run_training_stores_every_task(trained: tuple) -> None:
    config, summary, reports, seen = trained
    registry = MaskRegistry(config.registry.root)
    assert registry.tasks(config.bank) == list(range(NUM_TASKS))
    report = registry.verify(config.bank)
    assert report.all_ok and report.ok == list(range(NUM_TASKS)) and not report.temporary
    assert sorted(summary.trained) == sorted(reports) == list(range(NUM_TASKS))
    assert seen[0] == (0, NUM_TASKS) and seen[-1] == (NUM_TASKS, NUM_TASKS)
    for t in range(NUM_TASKS):
        assert reports[t]["status"] == "written"
        assert summary.trained[t]["workers"] == 2.0
        meta = registry.read_task(config.bank, t).metadata
        assert meta["workers"] == 2 and meta["effective_batch_size"] == 64
        assert meta["steps"] == 30
        assert meta["train_accuracy"] == pytest.approx(reports[t]["train_accuracy"])
    # Ray Train kept its record of each run on shared storage (under the registry's root,
    # where every node writes), not on the driver's disk.
    assert len(list((Path(config.registry.root) / ".ray_train").iterdir())) == NUM_TASKS
    assert not (config.run_dir / "ray_train").exists()
    assert MaskRegistry(config.registry.root).banks() == [config.bank]
    # A rerun finds every task stored and starts no worker group.
    again = run_training(config)
    assert again.trained == {} and again.skipped == list(range(NUM_TASKS))


def test_ranks_saw_different_batches_and_ended_equal(trained: tuple) -> None:
    _, _, reports, _ = trained
    for r in reports.values():
        checksums = r["score_checksums"]
        assert len(checksums) == 2 and checksums[0] == checksums[1]
        # Before pooling the ranks' BN running stats differed: each drew its own batches, so
        # equal scores came from averaged gradients, not from identical data.
        assert r["bn_rank_spread"] > 0.0


def test_trained_masks_beat_initial_masks(trained: tuple) -> None:
    config, _, _, _ = trained
    registry = MaskRegistry(config.registry.root)
    bank, spec = load_bank(registry.source(config.bank))
    tasks = build_tasks(config)
    assert spec == build_spec(config, tasks)
    net = build_net(spec)
    for t in range(NUM_TASKS):
        # Fresh scores of the same task are the masks training started from (BN: mean 0, var 1).
        masks, stats = TaskScores(net, [t]).export()[t]
        initial = MaskBank(net.layer_shapes(), net.bn_features())
        initial.add(t, masks, stats)
        before = gg_accuracy(net, initial, tasks, t)
        after = gg_accuracy(net, bank, tasks, t)
        # Digit pairs: chance is 0.5 and the initial masks sit near it (0.54 and 0.53 here);
        # 30 steps of an effective batch of 64 reach > 0.9, so 0.25 above is a wide margin.
        assert after >= before + 0.25, (t, before, after)
        assert after >= 0.8, (t, after)
        stored = registry.read_task(config.bank, t).bn_stats
        assert set(stored) == set(net.bn_features())
        for s in stored.values():  # pooled running stats, moved away from (0, 1)
            assert np.isfinite(s).all() and not np.allclose(s[0], 0.0)


def test_one_worker_reproduces_the_single_process_job(ray_local: None, tmp_path: Path) -> None:
    """World size 1: rank 0 keeps the config seed, the all-reduce is the identity."""
    config = make_config(tmp_path, name="dpone", data_parallel_workers=1)
    result = train_task_distributed(config, 1)
    assert result["status"] == "written" and result["workers"] == 1
    reference = parse_config({**config.model_dump(),
                              "registry": {"root": str(tmp_path / "reference")}})
    prepare_bank(reference)
    train_group_worker(reference.model_dump(), [1])
    ours = MaskRegistry(config.registry.root).read_task(config.bank, 1)
    theirs = MaskRegistry(reference.registry.root).read_task(reference.bank, 1)
    assert ours.packed.keys() == theirs.packed.keys()
    for k in ours.packed:
        assert np.array_equal(ours.packed[k], theirs.packed[k]), k
    for k in ours.bn_stats:
        assert np.array_equal(ours.bn_stats[k], theirs.bn_stats[k]), k
