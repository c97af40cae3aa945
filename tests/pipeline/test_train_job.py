"""The training job on real Ray and real files: parallel groups, bit-identity, faults, resume."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.config import ExperimentConfig, parse_config
from pipeline.jobs.train import prepare_bank, run_training, train_group_worker
from pipeline.registry import MaskRegistry

pytestmark = pytest.mark.slow


def make_config(tmp_path: Path, name: str = "jobtest", **train: object) -> ExperimentConfig:
    return parse_config({
        "name": name,
        "output_dir": str(tmp_path / "runs"),
        "network": {"name": "lenet", "num_outputs": 100},
        "tasks": {"family": "permuted", "num_tasks": 6},
        "train": {"steps": 40, "group_size": 3, "log_every": 20, **train},
        "registry": {"root": str(tmp_path / "registry")},
    })


def stored_bytes(registry: MaskRegistry, bank: str) -> dict[int, dict[str, bytes]]:
    out = {}
    for t in registry.tasks(bank):
        record = registry.read_task(bank, t)
        out[t] = {k: np.asarray(v).tobytes() for k, v in record.packed.items()}
    return out


def reference(tmp_path: Path, config: ExperimentConfig) -> dict[int, dict[str, bytes]]:
    """The same groups trained in this process, without Ray, into another registry."""
    ref = parse_config({**config.model_dump(),
                        "registry": {"root": str(tmp_path / "reference"), "bank": config.bank}})
    prepare_bank(ref)
    for start in range(0, ref.tasks.num_tasks, ref.train.group_size):
        group = list(range(start, min(ref.tasks.num_tasks, start + ref.train.group_size)))
        train_group_worker(ref.model_dump(), group)
    return stored_bytes(MaskRegistry(ref.registry.root), ref.bank)


@pytest.fixture(scope="module")
def reference_masks(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, bytes]]:
    tmp = tmp_path_factory.mktemp("reference")
    return reference(tmp, make_config(tmp))


def test_a_retried_group_writes_only_the_tasks_not_stored_yet(
        tmp_path: Path, reference_masks: dict[int, dict[str, bytes]]) -> None:
    """As if a first attempt of group [0, 1, 2] had stored task 0 with other bits (GPU kernels
    are not bit-identical) and died: the retry keeps it and writes only tasks 1 and 2."""
    config = make_config(tmp_path)
    registry, _ = prepare_bank(config)
    rng = np.random.default_rng(7)
    shapes = {k: len(v) for k, v in reference_masks[0].items()}
    planted = {k: rng.integers(0, 256, n, dtype=np.uint8) for k, n in shapes.items()}
    registry.write_task(config.bank, 0, planted)
    results = train_group_worker(config.model_dump(), [0, 1, 2])
    assert [r["status"] for r in results] == ["kept", "written", "written"]
    stored = stored_bytes(registry, config.bank)
    assert stored[0] == {k: v.tobytes() for k, v in planted.items()}  # the first one stays
    assert stored[1] == reference_masks[1] and stored[2] == reference_masks[2]


def test_parallel_groups_match_single_process(
    ray_local: None, tmp_path: Path, reference_masks: dict[int, dict[str, bytes]]
) -> None:
    config = make_config(tmp_path)
    seen: list[tuple[int, int]] = []
    summary = run_training(config, progress=lambda d, t: seen.append((d, t)))
    registry = MaskRegistry(config.registry.root)
    assert registry.tasks(config.bank) == list(range(6))
    assert sorted(summary.trained) == list(range(6))
    assert seen[0] == (0, 6) and seen[-1] == (6, 6)
    assert stored_bytes(registry, config.bank) == reference_masks
    for metrics in summary.trained.values():
        assert 0.0 < metrics["density"] < 1.0
        assert metrics["train_accuracy"] > 0.2  # well above 10% chance after 40 steps
    # A second run finds everything stored and trains nothing.
    again = run_training(config)
    assert again.trained == {} and again.skipped == list(range(6))


def test_progress_moves_while_a_group_trains(ray_local: None, tmp_path: Path) -> None:
    """One group of two tasks: the bar must not sit at 0/2 until the group ends. The worker posts
    its share of steps to a Ray actor and the driver adds it (fractions of a task)."""
    config = make_config(tmp_path, "progress", steps=1000, group_size=2, log_every=10)
    config = parse_config({**config.model_dump(), "tasks": {"family": "permuted",
                                                            "num_tasks": 2}})
    seen: list[float] = []
    run_training(config, progress=lambda d, t: seen.append(d))
    inside = [d for d in seen if 0 < d < 2]
    assert inside, seen  # reported part-way through the group, not only at its end
    assert seen == sorted(seen) and seen[0] == 0 and seen[-1] == 2


def _worker_pids(name: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith(f"ray::{name}"):
            pids.append(int(entry))
    return pids


def test_killed_worker_is_retried_and_bits_match(
    ray_local: None, tmp_path: Path, reference_masks: dict[int, dict[str, bytes]]
) -> None:
    config = make_config(tmp_path, max_retries=3)
    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            for pid in _worker_pids("train_group_worker"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.05)

    thread = threading.Thread(target=killer)
    thread.start()
    summary = run_training(config)
    thread.join()
    assert killed, "no training worker was seen running"
    registry = MaskRegistry(config.registry.root)
    assert registry.tasks(config.bank) == list(range(6))
    assert sorted(summary.trained) == list(range(6))
    assert stored_bytes(registry, config.bank) == reference_masks
    assert registry.verify(config.bank).problems == {}


def _run_statuses(config: ExperimentConfig) -> list[str]:
    with sqlite3.connect(config.run_dir / "mlflow.db") as conn:
        return sorted(status for (status,) in conn.execute("select status from runs"))


def test_killed_driver_resumes_to_identical_bits(
    tmp_path: Path, reference_masks: dict[int, dict[str, bytes]]
) -> None:
    """SIGKILL to the driver and the Ray it started (no clean-up at all): the rerun of the same
    command stores the missing tasks bit for bit and closes the run the kill left RUNNING."""
    config = make_config(tmp_path, steps=40, group_size=1)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config.model_dump()))
    cmd = [sys.executable, "-m", "pipeline", "train", str(path)]
    registry = MaskRegistry(config.registry.root)
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if (tmp_path / "registry" / config.bank).exists() and registry.tasks(config.bank):
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the driver finished before it could be interrupted"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, no clean-up
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    partial = registry.tasks(config.bank)
    assert 0 < len(partial) < 6
    assert _run_statuses(config) == ["RUNNING"]  # what a SIGKILL leaves behind
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # the killed train run, closed by the rerun; the rerun's train and register runs
    assert _run_statuses(config) == ["FINISHED", "FINISHED", "KILLED"]
    assert registry.tasks(config.bank) == list(range(6))
    assert stored_bytes(registry, config.bank) == reference_masks
    report = registry.verify(config.bank)
    assert report.problems == {}
    # A writer killed mid-write may leave its temporary file; it is never taken for a task.
    assert report.foreign == [] and all(".tmp-" in name for name in report.temporary)


def test_missing_data_root_fails_before_anything_is_written(tmp_path: Path) -> None:
    config = parse_config({
        "name": "nodata", "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "mnist", "root": str(tmp_path / "absent")},
        "registry": {"root": str(tmp_path / "registry")},
    })
    with pytest.raises(FileNotFoundError, match="absent"):
        run_training(config)
    assert not (tmp_path / "registry").exists()


def test_changed_network_is_refused_and_registry_kept(
    ray_local: None, tmp_path: Path
) -> None:
    config = make_config(tmp_path, steps=5)
    config = parse_config({**config.model_dump(), "tasks": {"num_tasks": 2}})
    run_training(config)
    registry = MaskRegistry(config.registry.root)
    before = stored_bytes(registry, config.bank)
    other = parse_config({**config.model_dump(), "seed": 1})
    with pytest.raises(ValueError, match="network"):
        run_training(other)
    assert stored_bytes(registry, config.bank) == before
