"""pipeline.report: report.json says where it came from, counts are ints, plots are written."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

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
    return EvalReport("b", {"bank": "b", "snapshot_sha256": "f" * 64}, tasks, summary, curve,
                      {"method": "one_shot", "objective": "entropy", "mode": "one_image"}, 1.5,
                      run_id="0123abcd", model_version=4)


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
    for name in ("curve", "confusion"):
        assert files[name].stat().st_size > 10_000, name  # a drawn PNG, not an empty canvas


def test_training_plot_is_written(tmp_path: Path) -> None:
    path = plot_training({0: {"train_accuracy": 0.9, "density": 0.5},
                          1: {"train_accuracy": 0.8, "density": 0.4}}, tmp_path / "t.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_training({}, tmp_path / "none.png") is None
