"""`supsup results` runs listed commands for real and tabulates what their reports say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.results import ENTRIES

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_every_entry_names_a_shipped_config() -> None:
    for entry in ENTRIES:
        assert (ROOT / entry.config).is_file(), entry.config


def test_results_runs_an_entry_and_writes_its_row(
    ray_local: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)  # configs/ paths are relative to the repository root
    out = tmp_path / "runs"
    doc = tmp_path / "docs" / "RESULTS.md"
    assert main(["results", "--run", "--only", "nns_permuted", "--out", str(out),
                 "--doc", str(doc)]) == 0
    text = doc.read_text()
    report = json.loads(
        (out / "nns-permuted-reduced" / "discovery" / "report.json").read_text())["summary"]
    row = next(line for line in text.splitlines()
               if line.startswith("| Training without task identity"))
    assert f"{100 * report['test_accuracy']:.2f}%" in row
    assert "| not run |" in text  # the entries that were not run are listed as such
    # where the rows came from, and no number from another data set beside a row
    assert "from commit `" in text and "torch " in text and "cores." in text
    assert "SplitImageNet 8" not in text and "92.55%" not in text
    assert "supsup train configs/nns_permuted.yaml --set scale=reduced" in text
    assert (doc.parent / "results" / "nns-permuted-reduced-discovery.png").is_file()
