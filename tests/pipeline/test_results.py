"""`supsup results` runs listed commands for real and tabulates what their reports say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.results import ENTRIES

ROOT = Path(__file__).resolve().parents[2]


def test_every_entry_names_a_shipped_config() -> None:
    for entry in ENTRIES:
        assert (ROOT / entry.config).is_file(), entry.config


@pytest.mark.slow
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


def test_results_refuse_to_overwrite_a_results_file_with_missing_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(ROOT)
    doc = tmp_path / "docs" / "RESULTS.md"
    figure = doc.parent / "results" / "pmnist250-lenet-reduced-curve.png"
    figure.parent.mkdir(parents=True)
    doc.write_bytes((ROOT / "docs" / "RESULTS.md").read_bytes())
    figure.write_bytes(b"\x89PNG earlier plot")
    before = doc.read_bytes()
    code = main(["results", "--out", str(tmp_path / "runs" / "results"), "--doc", str(doc)])
    assert code != 0
    assert doc.read_bytes() == before  # notes, plot links and numbers all kept
    assert figure.read_bytes() == b"\x89PNG earlier plot"
    assert sorted(p.name for p in doc.parent.iterdir()) == ["RESULTS.md", "results"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert f"{doc} left as it is" in err[0]
    assert f"no reports under {tmp_path / 'runs' / 'results'} for {len(ENTRIES)} of " in err[0]
    assert ENTRIES[0].label in err[0] and "supsup results --run" in err[0]
    assert "--doc" in err[0]


def test_an_incomplete_table_goes_only_to_a_new_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    doc = tmp_path / "partial.md"
    assert main(["results", "--out", str(tmp_path / "runs"), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.count("| not run |") == len(ENTRIES)
    assert "## Plots" not in text  # nothing measured, nothing drawn
    # the same command again would overwrite a file with missing rows: refused, file kept
    assert main(["results", "--out", str(tmp_path / "runs"), "--doc", str(doc)]) != 0
    assert doc.read_text() == text
