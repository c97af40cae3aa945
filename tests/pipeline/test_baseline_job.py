"""The baseline job on the bundled MNIST digits: each baseline trains three permuted tasks on
LeNet and writes a report with the fields a results table needs; bad models are named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import ExperimentConfig, parse_config
from pipeline.jobs.baseline import report_path, run_baseline

pytestmark = pytest.mark.slow

KINDS = ("dense", "batchensemble", "psp")
LENET_WEIGHTS = 300 * 784 + 100 * 300 + 10 * 100  # 784-300-100-10


def make_config(tmp_path: Path, model: str, **network: object) -> ExperimentConfig:
    return parse_config({
        "name": f"baseline-{model}",
        "output_dir": str(tmp_path / "runs"),
        "model": model,
        "network": {"name": "lenet", "num_outputs": 10, **network},
        "tasks": {"family": "permuted", "num_tasks": 3},
        "train": {"steps": 40, "batch_size": 64, "optimizer": "adam", "lr": 1e-3,
                  "log_every": 20},
    })


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[ExperimentConfig,
                                                                     dict[str, Any], list]]:
    tmp = tmp_path_factory.mktemp("baselines")
    out = {}
    for kind in KINDS:
        config = make_config(tmp, kind)
        seen: list[tuple[int, int]] = []
        report = run_baseline(config, progress=lambda d, t, seen=seen: seen.append((d, t)))
        out[kind] = (config, report, seen)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_report_is_written_with_its_fields(kind: str, reports: dict) -> None:
    config, report, seen = reports[kind]
    path = report_path(config)
    assert path == config.run_dir / "baseline" / "report.json"
    assert report["path"] == str(path)
    assert json.loads(path.read_text()) == report
    assert report["kind"] == kind and report["name"] == config.name
    assert report["num_tasks"] == 3 and set(report["accuracy"]) == {"0", "1", "2"}
    assert [r["task_id"] for r in report["tasks"]] == [0, 1, 2]
    assert all(r["examples"] == 1000 and r["steps"] == 40 for r in report["tasks"])
    assert 0.0 <= report["mean_accuracy"] <= 1.0
    assert report["seconds"] >= report["train_seconds"] > 0
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert not list(path.parent.glob(".report-*"))  # the temp file was renamed away


def test_bytes_per_task_per_kind(reports: dict) -> None:
    got = {k: (r["shared_bytes"], r["bytes_per_task"]) for k, (_, r, _) in reports.items()}
    assert got == {
        "dense": (0, 4 * LENET_WEIGHTS),
        "batchensemble": (4 * LENET_WEIGHTS, 4 * ((300 + 784) + (100 + 300) + (10 + 100))),
        "psp": (4 * LENET_WEIGHTS, 0),
    }
    assert reports["dense"][1]["bytes_per_task"] == 1_064_800


def test_baselines_learn_the_digits(reports: dict) -> None:
    # 40 Adam steps of 64 digits: dense and psp measured about 0.88-0.91 on every task (chance
    # 0.1). BatchE trains W on task 0 only; its later tasks learn little in 40 steps.
    for kind in ("dense", "psp"):
        assert all(a > 0.6 for a in reports[kind][1]["accuracy"].values()), kind
    assert reports["batchensemble"][1]["accuracy"]["0"] > 0.6


def test_supsup_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model is 'supsup': the baseline job trains one of"):
        run_baseline(make_config(tmp_path, "supsup"))
    assert not (tmp_path / "runs").exists()


def test_conv_network_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fc-family network .* got network 'conv'"):
        run_baseline(make_config(tmp_path, "dense", name="conv"))
