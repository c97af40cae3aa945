"""The discovery job on real Ray, real registry files and MLflow on SQLite: five permuted-MNIST
tasks streamed with their ids hidden are found, stored, reported and tracked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import ConfigError, ExperimentConfig, parse_config
from pipeline.jobs.discovery import prepare_discovery_bank, run_discovery
from pipeline.registry import BankMismatchError, MaskRegistry, load_bank
from pipeline.registry.manifest import describe_recipe
from pipeline.tracking import Tracker

NUM_TASKS = 5
BATCHES_PER_TASK = 200
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def make_config(tmp_path: Path, name: str = "nnstest", **discovery: object) -> ExperimentConfig:
    """The settings tests/supsup/test_discovery.py found to separate five tasks: 200 batches of
    128 per task, a check every 50 batches, RMSprop at 5e-4 (a fresh mask must stand out at the
    first check after its allocation)."""
    return parse_config(settings(tmp_path, name, **discovery))


def settings(tmp_path: Path, name: str = "nnstest", **discovery: object) -> dict[str, Any]:
    """make_config's settings as the mapping a config file holds."""
    return {
        "name": name,
        "output_dir": str(tmp_path / "runs"),
        "scenario": "nns",
        "network": {"name": "lenet", "num_outputs": 100},
        "tasks": {"family": "permuted", "num_tasks": NUM_TASKS},
        "train": {"batch_size": 128, "optimizer": "rmsprop", "lr": 1e-4},
        "discovery": {"check_every": 50, "batches_per_task": BATCHES_PER_TASK, "lr": 5e-4,
                      **discovery},
        "evaluate": {"method": "one_shot", "objective": "entropy", "mode": "one_image"},
        "registry": {"root": str(tmp_path / "registry")},
    }


@pytest.mark.slow
def test_hidden_tasks_are_discovered_stored_reported_and_tracked(
    ray_local: None, tmp_path: Path
) -> None:
    """Tolerances as in the library's test: the mask count may be off by one, purity >= 0.95.
    Test accuracy >= 0.85 with the inferred masks: 200 steps per task reach about 0.94 (measured
    0.93 to 0.94 per task, 1,000 test digits each); a task whose batches go to a wrong mask falls
    to about 0.1, so one such task among five pulls the mean to about 0.77."""
    config = make_config(tmp_path)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "nns")
    seen: list[tuple[int, int]] = []
    summary = run_discovery(config, progress=lambda d, t: seen.append((d, t)), tracker=tracker)

    assert abs(summary["num_masks"] - NUM_TASKS) <= 1, summary
    assert summary["num_true_tasks"] == NUM_TASKS
    assert summary["purity"] >= 0.95, summary
    assert summary["test_accuracy"] >= 0.85, summary
    assert 0.5 < summary["stream_accuracy"] < 1.0
    assert summary["stream_batches"] == NUM_TASKS * BATCHES_PER_TASK
    assert seen[0] == (0, NUM_TASKS) and seen[-1] == (NUM_TASKS, NUM_TASKS)
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))

    registry = MaskRegistry(config.registry.root)
    masks = registry.tasks(config.bank)
    assert masks == list(range(summary["num_masks"]))
    assert registry.verify(config.bank).all_ok
    assert registry.manifest(config.bank)["mask"]["scenario"] == "nns"
    records = [registry.read_task(config.bank, m) for m in masks]
    assert sum(r.metadata["batches"] for r in records) == NUM_TASKS * BATCHES_PER_TASK
    assert {r.metadata["majority_task"] for r in records} == set(range(NUM_TASKS))
    for r in records:
        assert r.metadata["scenario"] == "nns" and 0.5 < r.metadata["purity"] <= 1.0
        assert summary["mask_to_task"][r.task_id] == r.metadata["majority_task"]
        first, last = r.metadata["segments"][0]
        assert 0 <= first <= last < NUM_TASKS * BATCHES_PER_TASK
    bank, _ = load_bank(registry.source(config.bank))
    assert bank.num_tasks == summary["num_masks"]

    report = json.loads(Path(summary["files"]["json"]).read_text())
    assert Path(summary["files"]["json"]).parent == config.run_dir / "discovery"
    assert report["summary"]["num_masks"] == summary["num_masks"]
    assert [t["task_id"] for t in report["tasks"]] == list(range(NUM_TASKS))
    assert report["allocations"][0] == [0, 0]
    assert Path(summary["files"]["plot"]).read_bytes()[:8] == PNG_MAGIC

    run = tracker.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for key in ("num_masks", "purity", "stream_accuracy", "test_accuracy"):
        assert metrics[key] == pytest.approx(float(summary[key])), key
    assert run.data.params["discovery.check_every"] == "50"
    assert "task/test_accuracy" in metrics and "mask/purity" in metrics
    history = tracker.client.get_metric_history(summary["run_id"], "stream/num_masks")
    assert max(m.value for m in history) == summary["num_masks"]
    artifacts = {a.path for a in tracker.client.list_artifacts(summary["run_id"], "discovery")}
    assert artifacts == {"discovery/report.json", "discovery/discovery.png"}

    # A stream is not resumable: the same bank is refused rather than mixed with a new run; one
    # with another recipe is refused for that first, naming the setting.
    assert registry.manifest(config.bank)["recipe"]["discovery.batches_per_task"] == 200
    with pytest.raises(ValueError, match=r"already holds \d+ discovered masks.*registry\.bank"):
        run_discovery(config)
    with pytest.raises(BankMismatchError, match=r"discovery\.batches_per_task: bank has 200, "
                                                r"given 100\..*registry\.bank=nnstest-batches"):
        run_discovery(make_config(tmp_path, batches_per_task=100))


def test_bad_settings_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"discovery\.budget: .*greater than or equal to 1"):
        make_config(tmp_path, budget=0)
    with pytest.raises(ConfigError, match=r"discovery\.eps"):
        make_config(tmp_path, eps=float("nan"))
    with pytest.raises(ValueError, match=r"discovery\.task_order names tasks \[7\]"):
        run_discovery(make_config(tmp_path, task_order=[0, 7]))
    cosine = parse_config({**make_config(tmp_path).model_dump(),
                           "train": {"schedule": "cosine"}})
    with pytest.raises(ValueError, match=r"train\.schedule to 'constant'"):
        run_discovery(cosine)
    assert not (tmp_path / "registry").exists()  # nothing was written for bad settings


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_a_rerun_with_another_recipe_is_refused_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The bank's manifest records how the stream trains its masks; a rerun that would train
    them otherwise exits 2 with one line naming the setting and a new bank name, and leaves the
    bank's files as they were. A setting discovery never reads (train.lr while discovery.lr is
    set) changes nothing and is accepted."""
    data = settings(tmp_path)
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(data))
    config = parse_config(data)
    prepare_discovery_bank(config)
    root = Path(config.registry.root)
    recipe = MaskRegistry(root).manifest(config.bank)["recipe"]
    assert recipe == {"optimizer": "rmsprop", "batch_size": 128,
                      "weight_decay": config.train.weight_decay, "discovery.lr": 5e-4,
                      "discovery.batches_per_task": BATCHES_PER_TASK,
                      "discovery.task_order": list(range(NUM_TASKS))}
    before = _files(root)
    for option, named, bank in (
            ("discovery.batches_per_task=100",
             "discovery.batches_per_task: bank has 200, given 100", "nnstest-batches-per-task100"),
            ("discovery.lr=0.001", "discovery.lr: bank has 0.0005, given 0.001", "nnstest-lr0.001"),
            ("train.batch_size=64", "train.batch_size: bank has 128, given 64", "nnstest-batch64")):
        capsys.readouterr()
        assert main(["train", str(exp), "--set", option]) == 2, option
        err = capsys.readouterr().err
        assert err.startswith(f"error: bank 'nnstest' in {root} was trained with another recipe: "
                              f"{named}. Use the bank's recipe ({describe_recipe(recipe)}), or "
                              f"train into a new bank instead: --set registry.bank={bank} "), err
        assert len(err.strip().splitlines()) == 1, err
    assert _files(root) == before
    same = {**data, "train": {**data["train"], "lr": 1e-3}}
    prepare_discovery_bank(parse_config(same))  # the same recipe: accepted
    assert _files(root) == before
