"""Where a command's outputs land: `ray job submit` against a real `ray start --head` keeps every
output where the command says, and a relative output inside Ray's copy of a job's working
directory is refused before anything is written; Ray Train's runs go to shared storage; Ray's
native warnings and a failure's traceback go to supsup.log, not the terminal."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.paths import job_output_problems, ray_job_copy
from pipeline.registry import MaskRegistry
from tests.pipeline.servers import stop_group
from tests.pipeline.test_ray_join import VENV_BIN, _start_head, _wait_for_head, ray_env  # noqa: F401

TINY = {
    "network": {"name": "lenet", "num_outputs": 100},
    "tasks": {"family": "permuted", "num_tasks": 2},
    "train": {"steps": 20, "group_size": 1},
    "evaluate": {"group_size": 2, "curve_points": 0, "max_batches": 2},
}


def _submit(env: dict[str, str], dash: int, work: Path, *argv: str) -> tuple[int, str]:
    for _ in range(10):  # the job agent starts a little after the head answers
        done = subprocess.run(
            [str(VENV_BIN / "ray"), "job", "submit", f"--address=http://127.0.0.1:{dash}",
             f"--working-dir={work}", "--", *argv],
            env=env, capture_output=True, text=True, timeout=400)
        out = done.stdout + done.stderr
        if "No available agent to submit job" not in out:
            return done.returncode, out
        time.sleep(2)
    raise AssertionError(out[-4000:])


def _said(out: str, label: str) -> str:
    """The value of the `label: VALUE` line the command printed (the first word of it)."""
    (line,) = [line for line in out.splitlines() if line.startswith(f"{label}: ")]
    return line[len(label) + 2:].split(" ")[0]


@pytest.mark.cluster
@pytest.mark.slow
def test_ray_job_submit_writes_every_output_where_the_command_says(
        ray_env: dict[str, Any], tmp_path: Path) -> None:  # noqa: F811
    env = ray_env["env"]
    head, address, dash = _start_head(env, tmp_path / "head.log", dashboard=True)
    try:
        _wait_for_head(env, address)
        work = tmp_path / "job"
        work.mkdir()
        out_root = tmp_path / "shared"
        (work / "exp.yaml").write_text(yaml.safe_dump({
            "name": "submitted", "output_dir": str(out_root / "runs"),
            "registry": {"root": str(out_root / "registry")}, **TINY}))
        code, out = _submit(env, dash, work, "supsup", "run", "exp.yaml")
        assert code == 0, out[-4000:]
        run_dir, log = Path(_said(out, "run folder")), Path(_said(out, "log"))
        registry, tracking = _said(out, "mask registry"), _said(out, "MLflow")
        # absolute, where the config said, outside Ray's temp folder and its job copy
        assert run_dir == out_root / "runs" / "submitted" and log == run_dir / "supsup.log"
        assert registry == str(out_root / "registry")
        assert tracking == f"sqlite:///{run_dir / 'mlflow.db'}"
        assert ray_env["root"] not in run_dir.parents
        assert (run_dir / "evaluation" / "report.md").stat().st_size > 0
        assert "joining Ray cluster" in log.read_text()
        assert MaskRegistry(registry).verify("submitted").ok == [0, 1]
        report = json.loads((run_dir / "evaluation" / "report.json").read_text())
        client = MlflowClient(tracking)
        parent = client.get_run(client.get_run(report["run_id"]).data.tags["mlflow.parentRunId"])
        assert "supsup.log" in {a.path for a in client.list_artifacts(parent.info.run_id)}
        # The same config with the default, relative outputs: refused by name inside the job's
        # copy of its working directory, and nothing is trained
        (work / "rel.yaml").write_text(yaml.safe_dump({"name": "relative", **TINY}))
        code, out = _submit(env, dash, work, "supsup", "train", "rel.yaml")
        assert code != 0
        # Ray may echo the job's log more than once: the command's own line, each time
        refused = {line for line in out.splitlines() if line.startswith("error: ")}
        assert len(refused) == 1, out[-4000:]
        (line,) = refused
        assert "inside a Ray job" in line and "output_dir 'runs'" in line
        assert "registry.root" in line and "--set output_dir=" in line
        assert "trained" not in out
    finally:
        stop_group(head)


def _job_copy(tmp_path: Path) -> Path:
    """A folder laid out as Ray lays out its copy of a job's --working-dir."""
    copy = (tmp_path / "ray" / "session_2026-12-07_09-00-00_000000_1" / "runtime_resources"
            / "working_dir_files" / "_ray_pkg_0123456789abcdef")
    copy.mkdir(parents=True)
    return copy


def test_relative_outputs_in_a_job_copy_are_refused_before_anything_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    copy = _job_copy(tmp_path)
    (copy / "exp.yaml").write_text(yaml.safe_dump({"name": "rel", **TINY}))
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert ray_job_copy() == copy
    assert main(["train", "exp.yaml"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: this command runs inside a Ray job, in Ray's copy of its "
                           f"--working-dir ({copy})")
    assert "output_dir 'runs'" in line and f"registry.root {copy / 'runs' / 'registry'}" in line
    assert f"sqlite:///{copy / 'runs' / 'rel' / 'mlflow.db'}" in line
    assert sorted(p.name for p in copy.iterdir()) == ["exp.yaml"]  # nothing written
    # absolute outputs (and a registry URI) are what the message asks for: nothing to refuse
    from pipeline.config import load_config

    fine = load_config("exp.yaml", [f"output_dir={tmp_path / 'out'}",
                                    "registry.root=s3://bucket/registry"])
    assert job_output_problems(fine, fine.registry.root) == []


def test_outside_a_job_relative_outputs_are_fine(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.config import parse_config

    monkeypatch.chdir(tmp_path)
    for key in ("RAY_JOB_ID", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = parse_config({"name": "rel", **TINY})
    assert ray_job_copy() is None and job_output_problems(config, config.registry.root) == []
    # a job without a copied working directory (RAY_JOB_ID set): the same outputs are named
    monkeypatch.setenv("RAY_JOB_ID", "01000000")
    named = job_output_problems(config, config.registry.root)
    assert [p.split(" ")[0] for p in named] == ["registry.root", "the", "output_dir"]


def test_ray_train_keeps_its_runs_on_shared_storage(tmp_path: Path) -> None:
    from pipeline.config import ConfigError, parse_config
    from pipeline.jobs.distributed import train_storage

    raw = {"name": "dp", "output_dir": str(tmp_path / "runs"),
           "registry": {"root": str(tmp_path / "registry")}}
    # the registry's root: every node sees it whenever training runs at all (checked there)
    assert train_storage(parse_config(raw)) == f"{tmp_path / 'registry'}/.ray_train"
    assert train_storage(parse_config(raw, overrides=["cluster.storage=s3://b/ray"])) == (
        "s3://b/ray")
    # an S3 root with its endpoint in the query (as pyarrow reads it): the folder goes before it
    raw["registry"]["root"] = "s3://b/reg/?endpoint_override=10.0.0.5:9000&scheme=http"
    assert train_storage(parse_config(raw)) == (
        "s3://b/reg/.ray_train?endpoint_override=10.0.0.5:9000&scheme=http")
    with pytest.raises(ConfigError, match="cluster.storage is empty"):
        parse_config(raw, overrides=["cluster.storage=' '"])


@pytest.mark.slow
def test_sweep_sends_rays_native_warnings_to_the_log_file(tmp_path: Path) -> None:
    """Ray's core writes start-up warnings (such as "Failed to determine local IP" on a host
    without a route out) straight to file descriptor 2: `supsup sweep` keeps them in supsup.log
    like the other commands, and the terminal shows only the command's own lines."""
    import os
    import re
    import sys

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "swquiet", "output_dir": str(tmp_path / "runs"),
        "registry": {"root": str(tmp_path / "registry")},
        "network": {"name": "lenet", "num_outputs": 100},
        "tasks": {"family": "permuted", "num_tasks": 2},
        "train": {"steps": 5, "log_every": 5, "group_size": 1},
        "sweep": {"space": {"train.density": {"grid": [0.5]}}, "sample_tasks": 1,
                  "scheduler": "none"}}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([str(Path(sys.executable).parent / "supsup"), "sweep", str(path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    native = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\]", re.M)
    assert not native.search(done.stderr), done.stderr[-4000:]
    assert (tmp_path / "runs" / "swquiet" / "supsup.log").stat().st_size > 0


def test_a_failure_keeps_its_traceback_in_the_log_file_only(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.console import Console, attach_log_file, to_log_file_only

    with Console():
        path = attach_log_file(tmp_path / "relative-or-not")
        try:
            raise ValueError("the cause, in full")
        except ValueError:
            to_log_file_only("the command failed")
    assert path is not None and path.is_absolute()
    text = path.read_text()
    assert "the command failed" in text and "Traceback" in text
    assert "ValueError: the cause, in full" in text
    assert "Traceback" not in capsys.readouterr().err
