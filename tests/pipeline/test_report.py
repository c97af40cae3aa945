"""pipeline.report: report.json says where it came from, counts are ints, plots are written."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from pipeline.accuracy_matrix import AccuracyMatrix, continual_metrics
from pipeline.jobs.evaluate import REPORT_SCHEMA_VERSION, EvalReport
from pipeline.report import plot_training, write_report


def _report() -> EvalReport:
    tasks = [{"task_id": t, "examples": 100, "accuracy_gg": 0.9, "accuracy_gn": 0.9,
              "accuracy_gn_per_example": 0.9, "task_inference_accuracy": 1.0 if t else 0.5,
              "inferences": 2, "inferred": {str(t): 2} if t else {"0": 1, "2": 1}}
             for t in range(3)]
    summary = {"tasks": 3.0, "examples": 300.0, "accuracy_gg": 0.9, "accuracy_gn": 0.9,
               "accuracy_gn_per_example": 0.9, "task_inference_accuracy": 5 / 6}
    curve = [{"tasks_learned": 2, **summary}, {"tasks_learned": 3, **summary}]
    matrices = {
        "gg": AccuracyMatrix.from_cells([2, 3], [0, 1, 2], {
            (2, 0): 0.9, (2, 1): 0.9, (3, 0): 0.9, (3, 1): 0.9, (3, 2): 0.9}),
        "gn": AccuracyMatrix.from_cells([2, 3], [0, 1, 2], {
            (2, 0): 0.9, (2, 1): 0.9, (3, 0): 0.45, (3, 1): 0.9, (3, 2): 0.9}),
    }
    continual = continual_metrics(matrices, {"gg": [0.9] * 3, "gn": [0.45, 0.9, 0.9]})
    return EvalReport("b", {"bank": "b", "snapshot_sha256": "f" * 64}, tasks, summary, curve,
                      {"method": "one_shot", "objective": "entropy", "mode": "one_image"}, 1.5,
                      run_id="0123abcd", model_version=4, matrices=matrices,
                      continual=continual)


def test_report_json_carries_its_provenance_and_int_counts(tmp_path: Path) -> None:
    files = write_report(_report(), tmp_path, "b: evaluation")
    data = json.loads(files["json"].read_text())
    assert data["schema_version"] == REPORT_SCHEMA_VERSION
    assert (data["run_id"], data["model_version"]) == ("0123abcd", 4)
    assert data["snapshot_sha256"] == "f" * 64
    assert datetime.fromisoformat(data["created"]).tzinfo is not None
    assert isinstance(data["summary"]["tasks"], int) and data["summary"]["examples"] == 300
    assert all(isinstance(c["tasks_learned"], int) and isinstance(c["tasks"], int)
               for c in data["curve"])
    assert data["confusions"] == [[0, 2, 1]]
    for name in ("curve", "accuracy_matrix", "confusion"):
        assert files[name].stat().st_size > 10_000, name  # a drawn PNG, not an empty canvas


def test_training_plot_is_written(tmp_path: Path) -> None:
    path = plot_training({0: {"train_accuracy": 0.9, "density": 0.5},
                          1: {"train_accuracy": 0.8, "density": 0.4}}, tmp_path / "t.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_training({}, tmp_path / "none.png") is None


def test_continual_learning_summaries_and_matrix_in_json_and_markdown(tmp_path: Path) -> None:
    files = write_report(_report(), tmp_path, "b: evaluation")
    data = json.loads(files["json"].read_text())
    c = data["continual"]
    assert c["forgetting_gg"] == 0.0 and c["backward_transfer_gg"] == 0.0
    assert c["forgetting_gn"] == pytest.approx(0.45 / 2)  # task 0 fell 45 points, task 1 none
    assert c["backward_transfer_gn"] == pytest.approx(-0.45 / 2)
    assert c["average_accuracy_gn"] == pytest.approx(0.75)
    gn = data["accuracy_matrix"]["gn"]
    assert gn["tasks_learned"] == [2, 3] and gn["task_ids"] == [0, 1, 2]
    assert gn["values"] == [[0.9, 0.9, None], [0.45, 0.9, 0.9]]  # task 2 not learned at row 2
    assert AccuracyMatrix.from_dict(gn) == _report().matrices["gn"]
    text = files["markdown"].read_text()
    assert "| forgetting | 0.00 points | +22.50 points |" in text
    assert "| backward transfer | 0.00 points | -22.50 points |" in text
    assert "| tasks learned | task 0 | task 1 | task 2 |" in text
    assert "| 2 | 90.00% | 90.00% |  |" in text and "| 3 | 45.00% | 90.00% | 90.00% |" in text


def test_a_report_without_gn_has_no_matrix(tmp_path: Path) -> None:
    r = _report()
    r.matrices, r.continual = {}, {}
    files = write_report(r, tmp_path, "b")
    assert "accuracy_matrix" not in files and "Continual learning" not in (
        files["markdown"].read_text())
    assert json.loads(files["json"].read_text())["accuracy_matrix"] == {}
