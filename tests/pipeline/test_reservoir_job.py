"""The reservoir job on real Ray, real registry files and MLflow on SQLite: SplitMNIST gates stored
in a constant-size Hopfield reservoir, recalled from test batches, measured and tracked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from pipeline.cli import main
from pipeline.config import ConfigError, ExperimentConfig, parse_config
from pipeline.jobs.reservoir import prepare_reservoir_bank, run_reservoir
from pipeline.registry import MaskRegistry, RegistryConflictError, ReservoirRegistry
from pipeline.registry.manifest import describe_recipe
from pipeline.tracking import Tracker

WIDTH = 1024  # d; the paper's 2048 recalls exactly too but trains 3x slower on a CPU
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def make_config(root: Path, name: str, num_tasks: int = 5, hidden: list[int] | None = None,
                **hopfield: object) -> ExperimentConfig:
    """Settings tests/supsup/test_hopfield.py found to recall every task: gates 784-1024-1024-10,
    15 epochs of the ~800 bundled digits per pair (about the steps one epoch of full MNIST
    gives), 30 recall steps at the paper's lr 500, momentum 0.9, gamma 1.5e-3. The capacity
    curve is the quick d = 64 one: 2 patterns come back, 60 (past ~22) do not."""
    return parse_config(settings(root, name, num_tasks, hidden, **hopfield))


def settings(root: Path, name: str, num_tasks: int = 5, hidden: list[int] | None = None,
             **hopfield: object) -> dict[str, Any]:
    """make_config's settings as the mapping a config file holds."""
    return {
        "name": name,
        "output_dir": str(root / "runs"),
        "scenario": "hopfield",
        "network": {"name": "fc", "num_outputs": 10, "hidden": hidden or [WIDTH, WIDTH]},
        "tasks": {"family": "split", "num_tasks": num_tasks, "classes_per_task": 2},
        "hopfield": {"d": WIDTH, "epochs": 15, "capacity_d": 64, "capacity_counts": [2, 60],
                     "capacity_flip": 0.05, **hopfield},
        "registry": {"root": str(root / "registry")},
    }


@pytest.fixture(scope="module")
def five_tasks(ray_local: None, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[ExperimentConfig, Tracker, dict[str, Any]]:
    root = tmp_path_factory.mktemp("hopfield")
    config = make_config(root, "hopfield5")
    tracker = Tracker(f"sqlite:///{root / 'mlflow.db'}", "hopfield")
    seen: list[tuple[int, int]] = []
    summary = run_reservoir(config, progress=lambda d, t: seen.append((d, t)), tracker=tracker)
    summary["progress"] = seen
    return config, tracker, summary


@pytest.mark.slow
def test_gates_are_recalled_from_test_batches(
    five_tasks: tuple[ExperimentConfig, Tracker, dict[str, Any]],
) -> None:
    """Tolerances from the library's test: recalled gates nearest their own task's stored gates
    and at most 10% of the 2 x 1024 bits away (a recall landing on another task or a mixture is
    500+ bits away); accuracy with them within 5 points of the stored gates' (about 200 test
    digits per pair: one digit is 0.5 points)."""
    _, _, summary = five_tasks
    assert summary["num_stored"] == 5 and summary["reservoir_status"] == "written"
    assert summary["progress"][0] == (0, 10) and summary["progress"][-1] == (10, 10)
    for row in summary["tasks"]:
        assert row["recalled_right"] and row["nearest_task"] == row["task_id"], row
        assert row["hamming"] <= 0.1 * 2 * WIDTH, row
        assert row["accuracy_stored"] >= 0.85, row
        assert row["accuracy_recalled"] >= row["accuracy_stored"] - 0.05, row
        assert row["steps"] == 30 and 0 <= row["settled_at"] <= 30
    assert summary["recall_accuracy"] == 1.0


@pytest.mark.slow
def test_registry_holds_a_constant_size_reservoir_and_no_task_files(
    five_tasks: tuple[ExperimentConfig, Tracker, dict[str, Any]], tmp_path: Path,
) -> None:
    config, _, summary = five_tasks
    registry = MaskRegistry(config.registry.root)
    reservoirs = ReservoirRegistry(registry)
    assert registry.tasks(config.bank) == []  # the reservoir replaces per-task masks
    assert registry.manifest(config.bank)["mask"]["scenario"] == "hopfield"
    assert registry.manifest(config.bank)["recipe"]["hopfield.epochs"] == 15.0
    report = registry.verify(config.bank)
    assert report.all_ok and report.reservoir and report.reservoir_problem is None
    arrays, meta = reservoirs.read(config.bank)
    psi, pattern_sum = arrays["psi"], arrays["pattern_sum"]
    assert psi.shape == (2, WIDTH, WIDTH) and psi.dtype == np.float32
    assert pattern_sum.shape == (2, WIDTH)
    assert meta["num_stored"] == 5 and meta["task_ids"] == [0, 1, 2, 3, 4]
    # The Storkey rule is symmetric; float32 sums in different orders differ by rounding only.
    np.testing.assert_allclose(psi, psi.transpose(0, 2, 1), rtol=0, atol=1e-7)
    # A sum of five +-1 patterns: odd integers in [-5, 5].
    assert set(np.unique(pattern_sum).tolist()) <= {-5.0, -3.0, -1.0, 1.0, 3.0, 5.0}
    assert summary["reservoir_bytes"] == psi.nbytes + pattern_sum.nbytes

    # Three tasks into another bank: the same arrays' shapes and bytes, fewer patterns inside.
    small = make_config(Path(config.registry.root).parent, "hopfield3", num_tasks=3, epochs=2,
                        capacity_counts=[2])
    three = run_reservoir(small)
    arrays3, meta3 = reservoirs.read(small.bank)
    assert meta3["num_stored"] == 3
    assert {k: (a.shape, a.nbytes) for k, a in arrays3.items()} == {
        k: (a.shape, a.nbytes) for k, a in arrays.items()}
    assert three["reservoir_bytes"] == summary["reservoir_bytes"]

    # Never overwritten silently: another reservoir conflicts and the stored one stays.
    with pytest.raises(RegistryConflictError, match="already holds a different reservoir"):
        reservoirs.write(config.bank, arrays3, meta3)
    np.testing.assert_array_equal(reservoirs.read(config.bank)[0]["psi"], psi)
    assert reservoirs.write(config.bank, arrays, meta) == "unchanged"
    copy = reservoirs.copy(config.bank, tmp_path / "copy" / "r.parquet")
    stored = Path(config.registry.root) / config.bank / "reservoir.parquet"
    assert copy.read_bytes() == stored.read_bytes()
    assert reservoirs.write(small.bank, arrays, meta, overwrite=True) == "replaced"
    assert reservoirs.read(small.bank)[1]["num_stored"] == 5


@pytest.mark.slow
def test_report_capacity_curve_and_mlflow_run(
    five_tasks: tuple[ExperimentConfig, Tracker, dict[str, Any]],
) -> None:
    config, tracker, summary = five_tasks
    out = config.run_dir / "hopfield"
    assert Path(summary["files"]["json"]) == out / "report.json"
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["recall_accuracy"] == summary["recall_accuracy"]
    assert [r["task_id"] for r in report["tasks"]] == [0, 1, 2, 3, 4]
    curve = report["capacity"]["curve"]
    assert report["capacity"]["d"] == 64
    assert curve[0] == {"stored": 2, "recall_rate": 1.0}
    assert curve[1]["stored"] == 60 and curve[1]["recall_rate"] < 0.5
    assert json.loads((out / "capacity.json").read_text()) == report["capacity"]
    assert (out / "capacity.png").read_bytes()[:8] == PNG_MAGIC

    run = tracker.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for key in ("recall_accuracy", "hamming_mean", "settled_at_mean", "accuracy_recalled_mean",
                "reservoir_bytes"):
        assert metrics[key] == pytest.approx(float(summary[key])), key
    assert run.data.params["hopfield.d"] == str(WIDTH)
    history = tracker.client.get_metric_history(summary["run_id"], "capacity/recall_rate")
    assert sorted((m.step, m.value) for m in history) == [(2, 1.0), (60, curve[1]["recall_rate"])]
    artifacts = {a.path for a in tracker.client.list_artifacts(summary["run_id"], "hopfield")}
    assert artifacts == {"hopfield/report.json", "hopfield/capacity.json",
                         "hopfield/capacity.png", "hopfield/reservoir.parquet"}


def test_bad_settings_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"hopfield\.d = 32 does not match the gated network: "
                                         r"network\.hidden = \[64, 64\]"):
        run_reservoir(make_config(tmp_path, "bad", hidden=[64, 64], d=32))
    with pytest.raises(ValueError, match=r"hopfield\.d = 64 .* network\.hidden = \[64, 32\]"):
        run_reservoir(make_config(tmp_path, "bad", hidden=[64, 32], d=64))
    assert not (tmp_path / "registry").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match=r"hopfield\.recall_steps: .*less than or equal to 30"):
        make_config(tmp_path, "bad", recall_steps=31)
    with pytest.raises(ConfigError, match=r"hopfield\.capacity_counts"):
        make_config(tmp_path, "bad", capacity_counts=[8, 4])


def test_registry_reservoir_round_trip_and_checks(tmp_path: Path) -> None:
    """The bank's manifest lists gated layers of width d = 8; a d = 4 reservoir does not fit,
    and a damaged file is reported by verify."""
    registry = MaskRegistry(tmp_path / "registry")
    reservoirs = ReservoirRegistry(registry)
    spec = {"name": "fc", "num_outputs": 10, "num_classes": 2, "seed": 0,
            "input_shape": [1, 28, 28], "hidden": [8, 8], "width": 0}
    registry.create_bank("gates", spec, {"gates.0": [8], "gates.1": [8]}, None,
                         {"scenario": "hopfield"})
    with pytest.raises(ValueError, match=r"'psi' has shape \(2, 4, 4\).* width d=8, so it must "
                                         r"be \(2, 8, 8\)"):
        reservoirs.write("gates", {"psi": np.zeros((2, 4, 4)), "pattern_sum": np.zeros((2, 4))})
    with pytest.raises(ValueError, match=r"exactly the arrays \['pattern_sum', 'psi'\]"):
        reservoirs.write("gates", {"psi": np.zeros((2, 8, 8))})
    with pytest.raises(FileNotFoundError, match="holds no reservoir"):
        reservoirs.read("gates")
    assert not reservoirs.exists("gates") and not registry.verify("gates").reservoir
    g = np.random.default_rng(0)
    arrays = {"psi": g.standard_normal((2, 8, 8)), "pattern_sum": g.standard_normal((2, 8))}
    assert reservoirs.write("gates", arrays, {"num_stored": 1}) == "written"
    back, meta = reservoirs.read("gates")
    assert meta == {"num_stored": 1}
    for k, a in arrays.items():
        np.testing.assert_array_equal(back[k], a.astype(np.float32))
    path = tmp_path / "registry" / "gates" / "reservoir.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    report = registry.verify("gates")
    assert report.reservoir and not report.all_ok
    assert "reservoir.parquet" in report.reservoir_problem
    registry.create_bank("weights", spec, {"w": [8, 784]}, None, {"scenario": "gg_gn"})
    with pytest.raises(ValueError, match="gated units of one width d"):
        reservoirs.write("weights", {"psi": np.zeros((1, 8, 8)), "pattern_sum": np.zeros((1, 8))})


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_a_rerun_with_another_recipe_is_refused_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The bank's manifest records how its gates are learned and stored; a rerun that would
    learn them otherwise exits 2 with one line naming the setting and a new bank name, and
    leaves the bank's files (its reservoir included) as they were. Recall and capacity settings
    never change the reservoir and are accepted."""
    data = settings(tmp_path, "gates", 2, [64, 64], d=64)
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(data))
    config = parse_config(data)
    registry = prepare_reservoir_bank(config)
    recipe = registry.manifest("gates")["recipe"]
    assert recipe == {"hopfield.epochs": 15.0, "hopfield.batch_size": 128,
                      "hopfield.train_lr": 0.1, "hopfield.train_momentum": 0.9,
                      "hopfield.weight_decay": 1e-4, "optimizer": "sgd", "storage": "storkey"}
    g = np.random.default_rng(0)
    ReservoirRegistry(registry).write("gates", {"psi": g.standard_normal((2, 64, 64)),
                                                "pattern_sum": g.standard_normal((2, 64))})
    root = Path(config.registry.root)
    before = _files(root)
    for option, named, bank in (
            ("hopfield.epochs=3", "hopfield.epochs: bank has 15.0, given 3.0", "gates-epochs3.0"),
            ("hopfield.train_lr=0.05", "hopfield.train_lr: bank has 0.1, given 0.05",
             "gates-train-lr0.05")):
        capsys.readouterr()
        assert main(["train", str(exp), "--set", option]) == 2, option
        err = capsys.readouterr().err
        assert err.startswith(f"error: bank 'gates' in {root} was trained with another recipe: "
                              f"{named}. Use the bank's recipe ({describe_recipe(recipe)}), or "
                              f"train into a new bank instead: --set registry.bank={bank} "), err
        assert len(err.strip().splitlines()) == 1, err
    assert _files(root) == before
    same = {**data, "hopfield": {**data["hopfield"], "gamma": 0.01, "recall_steps": 10,
                                 "capacity_flip": 0.2}}
    prepare_reservoir_bank(parse_config(same))  # the same recipe: accepted
    assert _files(root) == before
