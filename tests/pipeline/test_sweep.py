"""`supsup sweep` on real Ray Tune and MLflow on SQLite: trials as child runs, the best config,
results and plots; ASHA stopping; a bad search space refused before anything starts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from pipeline.builders import build_net, build_spec, build_tasks
from pipeline.config import ConfigError, load_config, parse_config
from pipeline.jobs.sweep import (
    best_config,
    cmd_sweep,
    mask_bytes,
    param_space,
    trial_task_ids,
    validate_space,
    validation_tasks,
)
from pipeline.tracking import Tracker
from supsup.scores import TaskScores

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DENSITIES = [0.5, 0.2, 0.05, 0.02]  # best first: ASHA's first rung then stops the weak ones
LENET_BYTES = (784 * 300 + 300 * 100 + 100 * 10) // 8  # one bit per weight, 10 outputs


def base(tmp_path: Path, **sweep: Any) -> dict[str, Any]:
    return {
        "name": "sweeptest",
        "output_dir": str(tmp_path / "runs"),
        "network": {"name": "lenet", "num_outputs": 10},
        "tasks": {"family": "permuted", "num_tasks": 3},
        "train": {"steps": 30, "log_every": 10, "optimizer": "adam", "lr": 1e-2,
                  "rule": "topk", "density": 0.1},
        "sweep": {"space": {"train.density": {"grid": DENSITIES}}, "sample_tasks": 2, **sweep},
    }


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# --------------------------------------------------------------------------- the real sweep
@pytest.mark.slow
def test_asha_sweep_logs_child_runs_and_writes_best_config(
    ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, base(tmp_path, scheduler={"type": "asha", "grace_period": 1,
                                                       "reduction_factor": 2}))
    assert cmd_sweep(str(path)) == 0
    out = capsys.readouterr().out
    sweep_dir = tmp_path / "runs" / "sweeptest" / "sweep"
    assert f"best config: {sweep_dir / 'best.yaml'}" in out
    results = json.loads((sweep_dir / "trials.json").read_text())
    trials = results["trials"]
    assert sorted(t["train.density"] for t in trials) == sorted(DENSITIES)
    assert all(t["status"] != "error" for t in trials)
    for t in trials:
        assert f"{t['trial_id']}" in out
        assert 0.0 <= t["val_accuracy"] <= 1.0
        assert t["density"] == pytest.approx(t["train.density"], abs=1e-3)
        assert t["stored_bytes_per_task"] == LENET_BYTES
    # Chance is 10%: most trials must clear it by 10 points (the sparsest may lag).
    assert sum(t["val_accuracy"] > 0.2 for t in trials) >= 3
    by_density = {t["train.density"]: t for t in trials}
    assert by_density[0.02]["compressed_bytes_per_task"] < by_density[0.5][
        "compressed_bytes_per_task"]
    # ASHA: densities 0.5 and 0.2 run first and set the first rung's cut (after 10 steps); the
    # sparsest mask, far below them there, is stopped. The first trial at each rung goes on.
    assert by_density[0.02]["status"] == "stopped early"
    stopped = [t for t in trials if t["status"] == "stopped early"]
    assert all(t["train_step"] < t["steps"] == 30 for t in stopped)
    assert any(t["status"] == "completed" and t["train_step"] == 30 for t in trials)

    best = max(trials, key=lambda t: t["val_accuracy"])
    assert results["best"]["trial_id"] == best["trial_id"]
    config = load_config(sweep_dir / "best.yaml")  # what `supsup train` reads
    assert config.name == "sweeptest-best" and config.sweep is None
    assert config.train.density == best["train.density"]
    assert config.train.steps == 30 and config.tasks.num_tasks == 3
    csv_lines = (sweep_dir / "trials.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + len(DENSITIES) and "val_accuracy" in csv_lines[0]
    for name in ("accuracy_vs_density", "accuracy_vs_bytes"):
        assert (sweep_dir / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    tracker = Tracker(parse_config(base(tmp_path)).tracking_uri, "sweeptest")
    runs = tracker.client.search_runs([tracker.experiment_id])
    parents = [r for r in runs if r.data.tags.get("job") == "sweep"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_name.startswith("sweeptest-sweep-3tasks-train.density-")
    assert "train.density" not in parent.data.params  # only the trials used a density
    assert parent.data.params["best.train.density"] == str(best["train.density"])
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(best["val_accuracy"])
    assert parent.data.metrics["trials_stopped_early"] == len(stopped)
    artifacts = {a.path for a in tracker.client.list_artifacts(parent.info.run_id)}
    artifacts |= {a.path for a in tracker.client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"best.yaml", "config.yaml", "sweep/trials.csv",
            "sweep/accuracy_vs_density.png", "sweep/accuracy_vs_bytes.png"} <= artifacts
    children = {r.info.run_id: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert len(children) == len(DENSITIES)
    for t in trials:
        child = children[t["run_id"]]
        assert child.info.status == "FINISHED"
        assert child.data.params == {"train.density": str(t["train.density"])}
        assert child.data.tags["status"] == t["status"]
        history = tracker.client.get_metric_history(t["run_id"], "val_accuracy")
        steps = sorted(m.step for m in history)
        assert steps == list(range(10, t["train_step"] + 1, 10))
        assert max(history, key=lambda m: m.step).value == pytest.approx(t["val_accuracy"])


# ----------------------------------------------------------- refused before anything starts
@pytest.mark.parametrize(
    ("space", "match"),
    [
        ({"train.density": {"grid": [0.1, 0.0]}}, r"train\.density = 0\.0 .*\(0, 1\]"),
        ({"train.density": {"uniform": [0.05, 1.5]}}, r"train\.density = 1\.5"),
        ({"train.density": {"uniform": [0.0, 0.5]}}, r"train\.density = 0\.0"),
        ({"train.lr": {"loguniform": [1e-4, 1e-2]}, "train.optimizer": {"choice": ["adamw"]}},
         r"train\.optimizer = 'adamw'"),
        ({"train.steps": {"uniform": [10, 40]}}, r"train\.steps is an integer field"),
        ({"train.steps": {"grid": [0, 10]}}, r"needs train\.steps >= 1"),
    ],
)
def test_invalid_values_fail_before_any_trial(tmp_path: Path, space: dict[str, Any],
                                              match: str) -> None:
    raw = base(tmp_path)
    raw["sweep"]["space"] = space
    with pytest.raises(ConfigError, match=match):
        cmd_sweep(str(write(tmp_path, raw)))
    run_dir = tmp_path / "runs" / "sweeptest"
    assert not (run_dir / "sweep").exists()  # no Tune storage, no results
    assert not (run_dir / "mlflow.db").exists()  # no parent run, no child run


@pytest.mark.parametrize(
    ("key", "match"),
    [
        ("train.nope", r"sweep\.space: .*unknown config field 'train\.nope'"),
        ("nope", r"unknown config field 'nope'"),
        ("train.lr.low", r"train\.lr is a value, not a section"),
        ("train", r"'train' is a whole section"),
        ("sweep.metric", r"cannot sweep itself"),
    ],
)
def test_unknown_field_fails_when_the_file_loads(tmp_path: Path, key: str, match: str) -> None:
    raw = base(tmp_path)
    raw["sweep"]["space"] = {key: {"grid": [1]}}
    with pytest.raises(ConfigError, match=match):
        cmd_sweep(str(write(tmp_path, raw)))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("sweep", "match"),
    [
        ({"space": {}}, r"search space is empty"),
        ({"space": {"train.lr": {"grid": [1e-3], "choice": [1e-2]}}}, r"exactly one of"),
        ({"space": {"train.lr": {"uniform": [0.1, 0.01]}}}, r"low < high"),
        ({"space": {"train.lr": {"loguniform": [0, 0.1]}}}, r"loguniform bounds must be > 0"),
        ({"space": {"train.lr": {"grid": [1e-3]}}, "scheduler": "hyperband"},
         r"sweep\.scheduler\.type"),
        ({"space": {"train.lr": {"grid": [1e-3]}}, "tasks": [1, 1]}, r"distinct"),
    ],
)
def test_malformed_sweep_section(sweep: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config({"sweep": sweep}, "exp.yaml")


def test_sample_tasks_are_checked_against_num_tasks(tmp_path: Path) -> None:
    config = parse_config(base(tmp_path, sample_tasks=5))
    with pytest.raises(ValueError, match=r"sweep\.sample_tasks \(5\) exceeds tasks\.num_tasks"):
        validate_space(config)
    config = parse_config(base(tmp_path, tasks=[0, 7]))
    with pytest.raises(ValueError, match=r"sweep\.tasks: tasks \[7\] are outside"):
        validate_space(config)
    assert trial_task_ids(parse_config(base(tmp_path, tasks=[2, 0]))) == [2, 0]
    assert trial_task_ids(parse_config(base(tmp_path))) == [0, 1]


def test_config_without_sweep_section(tmp_path: Path) -> None:
    raw = base(tmp_path)
    del raw["sweep"]
    with pytest.raises(ValueError, match="has no sweep section"):
        cmd_sweep(str(write(tmp_path, raw)))


# --------------------------------------------------------------------------- building blocks
def test_values_are_checked_together_with_the_reference(tmp_path: Path) -> None:
    """A rule and its density are validated as a pair: threshold -> topk needs the density."""
    raw = base(tmp_path)
    raw["train"] = {"rule": "threshold"}
    raw["sweep"]["space"] = {"train.rule": {"grid": ["threshold", "topk"]},
                             "train.density": {"choice": [0.1, 0.3]}}
    probes = validate_space(parse_config(raw))
    assert {(p.train.rule, p.train.density) for p in probes} == {
        ("threshold", 0.1), ("topk", 0.1), ("threshold", 0.3)}


def test_param_space_kinds(tmp_path: Path) -> None:
    raw = base(tmp_path)
    raw["sweep"]["space"] = {"train.density": {"grid": [0.1, 0.2]},
                             "train.lr": {"loguniform": [1e-4, 1e-2]},
                             "train.momentum": {"uniform": [0.5, 0.9]},
                             "network.hidden": {"choice": [[300, 100], [100]]}}
    space = param_space(parse_config(raw).sweep)
    assert space["train.density"] == {"grid_search": [0.1, 0.2]}
    assert (space["train.lr"].lower, space["train.lr"].upper) == (1e-4, 1e-2)
    assert type(space["train.lr"].get_sampler()).__name__ == "_LogUniform"
    assert (space["train.momentum"].lower, space["train.momentum"].upper) == (0.5, 0.9)
    assert space["network.hidden"].categories == [[300, 100], [100]]


def test_validation_split_comes_from_train_data_only(tmp_path: Path) -> None:
    config = parse_config(base(tmp_path))
    full, held = build_tasks(config), validation_tasks(config)
    train, test = full.data["train"], full.data["test"]
    fit, val = held.data["train"], held.data["test"]
    assert len(val) == round(0.1 * len(train)) and len(fit) + len(val) == len(train)

    def rows(x: torch.Tensor) -> set[bytes]:
        return {r.numpy().tobytes() for r in x.reshape(len(x), -1)}

    val_rows = rows(val.x)
    assert val_rows <= rows(train.x)  # selection never sees the test split
    assert not val_rows & rows(fit.x)
    assert len(test) > 0 and not torch.equal(val.x[:1], test.x[:1])


def test_mask_bytes_packed_and_compressed(tmp_path: Path) -> None:
    config = parse_config(base(tmp_path))
    tasks = build_tasks(config)
    net = build_net(build_spec(config, tasks))
    sizes = {d: mask_bytes(TaskScores(net, [0, 1], rule="topk", density=d))
             for d in (0.01, 0.1, 0.5)}
    for s in sizes.values():
        assert s["stored_bytes_per_task"] == LENET_BYTES == math.ceil(266200 / 8)
    compressed = [sizes[d]["compressed_bytes_per_task"] for d in (0.01, 0.1, 0.5)]
    assert compressed == sorted(compressed)  # sparser masks compress further
    assert compressed[0] < LENET_BYTES / 4


def test_best_config_is_a_training_config(tmp_path: Path) -> None:
    raw = base(tmp_path)
    raw["registry"] = {"root": str(tmp_path / "registry"), "bank": "masks"}
    config = parse_config(raw)
    best = best_config(config, {"train.density": 0.2}, ["train.density"])
    assert (best.name, best.registry.bank, best.train.density) == ("sweeptest-best",
                                                                    "masks-best", 0.2)
    assert best.sweep is None and best.train.steps == config.train.steps


def test_shipped_density_sweep_is_valid() -> None:
    config = load_config(CONFIGS / "sweep_density.yaml")
    assert config.sweep is not None and config.train.rule == "topk"
    assert list(config.sweep.space) == ["train.density"]
    probes = validate_space(config)
    assert {p.train.density for p in probes} == set(config.sweep.space["train.density"].grid)
