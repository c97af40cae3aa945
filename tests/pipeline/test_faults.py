"""Fault injection through the `supsup` command (the installed one where a fault needs a process
of its own): every probe ends in one named `error:` line, exit code 2 (130 for an interrupt), no
traceback, and the registry and MLflow hold exactly what they held before (or exactly the tasks
finished before the fault); no run is left RUNNING."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.registry import MaskRegistry

pytestmark = [pytest.mark.faults, pytest.mark.slow]
SUPSUP = str(Path(sys.executable).parent / "supsup")


def _config(folder: Path, name: str = "probe", **sections: Any) -> Path:
    data: dict[str, Any] = {
        "name": name, "output_dir": str(folder / "runs"),
        "network": {"name": "lenet", "num_outputs": 100},
        "tasks": {"family": "permuted", "num_tasks": 4},
        "train": {"steps": 20, "group_size": 2},
        "evaluate": {"group_size": 2, "curve_points": 0, "max_batches": 2},
        "registry": {"root": str(folder / "registry")},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _supsup(*args: str, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}
    full.pop("RAY_ADDRESS", None)
    return subprocess.run([SUPSUP, *args], env=full, capture_output=True, text=True,
                          timeout=timeout)


def _state(folder: Path) -> dict[str, Any]:
    """Every file under the folder with its hash, and every MLflow run's status and every model
    version of each SQLite store in it."""
    files = {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix != ".log"
             and not p.name.endswith((".db", ".db-journal", ".lock"))}
    runs: dict[str, Any] = {}
    for db in sorted(folder.rglob("mlflow.db")):
        with sqlite3.connect(db) as conn:
            runs[str(db.relative_to(folder))] = {
                "runs": sorted(conn.execute("select run_uuid, status from runs")),
                "versions": sorted(conn.execute("select name, version from model_versions")),
            }
    return {"files": files, "mlflow": runs}


def _one_error(done: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return lines[0]


def _running(folder: Path) -> list[tuple[str, str]]:
    out = []
    for db in folder.rglob("mlflow.db"):
        with sqlite3.connect(db) as conn:
            out += conn.execute("select run_uuid, name from runs where status = 'RUNNING'")
    return out


def _in_process(capsys: pytest.CaptureFixture[str], *args: str
                ) -> subprocess.CompletedProcess[str]:
    """The command's `main` in this process, on the session's Ray: the same code as the
    installed command without a process start-up per probe. Faults that need a process of their
    own (signals, a mount namespace) run the installed command instead."""
    from pipeline.cli import main

    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)


@pytest.fixture(scope="module")
def trained(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bank of 4 tasks with model version 1, trained once by the command."""
    from pipeline.cli import main

    folder = tmp_path_factory.mktemp("faults")
    assert main(["run", str(_config(folder))]) == 0
    return folder


@pytest.mark.parametrize("options, named", [
    (["train.lr=.inf"], "train.lr"),
    (["train.momentum=.inf"], "train.momentum"),
    (["train.epochs=.inf"], "train.epochs"),
    (["tasks.degrees=.nan"], "tasks.degrees"),
    (["tracking.model_name=a/b"], "tracking.model_name"),
    (["train.steps=true"], "train.steps"),
    (["tracking.alias=v2"], "tracking.alias"),
    (["registry.bank=../up"], "registry.bank"),
    (["name=.."], "name"),
    (["train.lr=[1,"], "train.lr=[1,"),
    (["train.lr=!!python/object/apply:os.system [\"touch /tmp/supsup-pwned\"]"], "train.lr"),
    (["tasks.num_tasks=1000000000"], "memory"),
    (["tracking.uri=http://127.0.0.1:9"], "http://127.0.0.1:9"),
])
def test_bad_values_are_refused_before_anything_is_written(
        trained: Path, options: list[str], named: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    before = _state(trained)
    args = [a for o in options for a in ("--set", o)]
    done = _in_process(capsys, "train", str(trained / "probe.yaml"), *args)
    assert done.returncode == 2, done.stderr[-3000:]
    assert named in _one_error(done)
    assert _state(trained) == before
    assert not (trained.parent / "mlflow.db").exists() and not Path("/tmp/supsup-pwned").exists()


def test_targets_that_cannot_be_written_are_refused_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for option in (f"registry.root={blocker}", f"registry.root={blocker}/sub",
                   f"output_dir={blocker}"):
        done = _in_process(capsys, "train", str(_config(tmp_path)), "--set", option)
        assert done.returncode == 2, (option, done.stderr[-2000:])
        assert str(blocker) in _one_error(done)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "probe.yaml"]


def test_a_non_finite_loss_stores_nothing_of_its_group(
        ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    done = _in_process(capsys, "train", str(_config(tmp_path, train={
        "lr": 1e38, "optimizer": "sgd", "log_every": 5})))
    assert done.returncode == 2
    error = _one_error(done)
    assert "became non-finite at step" in error or "are not finite" in error
    assert "retries" not in error and "Lower train.lr" in error
    assert MaskRegistry(tmp_path / "registry").tasks("probe") == []
    assert _running(tmp_path) == []


def test_export_to_an_existing_file_and_foreign_files_are_named(trained: Path) -> None:
    dest = trained / "exists.parquet"
    dest.write_text("keep me")
    done = _supsup("registry", "export", "probe", "--root", str(trained / "registry"),
                   "--dest", str(dest))
    assert done.returncode == 2 and str(dest) in _one_error(done)
    assert dest.read_text() == "keep me"
    stray = trained / "registry" / "probe" / "tasks" / "notes.txt"
    stray.write_text("x")
    try:
        done = _supsup("registry", "verify", "probe", "--root", str(trained / "registry"))
        assert done.returncode == 1
        assert "not a file of this bank: tasks/notes.txt" in done.stdout
        assert "temporary" not in done.stdout
    finally:
        stray.unlink()
        dest.unlink()


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_full_disk_is_named_and_keeps_what_was_stored(
        ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bank of 4 tasks on a 1 MiB tmpfs (its own mount namespace) grown to 40 tasks: their
    masks do not fit, so writing fails partway with ENOSPC. The 4 stored tasks keep every byte,
    and the bank as left (a copy taken inside the namespace) verifies and loads."""
    from pipeline.registry import load_bank

    seed = tmp_path / "seed"
    seed.mkdir()
    train = {"group_size": 4}
    done = _in_process(capsys, "train", str(_config(seed, tasks={"num_tasks": 4}, train=train)))
    assert done.returncode == 0, done.stderr[-3000:]
    stored = _hashes(seed / "registry")
    assert MaskRegistry(seed / "registry").tasks("probe") == [0, 1, 2, 3]
    small, kept = tmp_path / "small", tmp_path / "kept"
    small.mkdir()
    config = _config(tmp_path, registry={"root": str(small / "registry")},
                     tasks={"num_tasks": 40}, train=train)
    script = (f"mount -t tmpfs -o size=1m tmpfs {small} && cp -a {seed / 'registry'} {small} && "
              f"{{ {SUPSUP} train {config}; code=$?; cp -a {small / 'registry'} {kept}; "
              "exit $code; }")
    full = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    full.pop("RAY_ADDRESS", None)
    done = subprocess.run(["unshare", "--mount", "sh", "-c", script], env=full,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    error = _one_error(done)
    assert "No space left on device" in error or "no space left" in error, error
    assert "retries were used up" not in error
    assert _running(tmp_path) == []
    after = _hashes(kept)
    assert {k: after.get(k) for k in stored} == stored  # every stored byte, checksums included
    registry = MaskRegistry(kept)
    tasks = registry.tasks("probe")
    assert tasks[:4] == [0, 1, 2, 3] and len(tasks) < 40, tasks
    assert registry.verify("probe").all_ok, registry.verify("probe").problems
    bank, _ = load_bank(registry.source("probe"))
    assert bank.task_ids == tasks


def _wait_for_tasks(root: Path, bank: str, proc: subprocess.Popen[bytes]) -> list[int]:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            stored = MaskRegistry(root).tasks(bank)
        except KeyError:
            stored = []
        if stored:
            return stored
        time.sleep(0.2)
    raise AssertionError("no task was stored before the deadline")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 130)])
def test_an_interrupted_run_is_marked_killed_and_ray_is_shut_down(
        tmp_path: Path, sig: int, code: int) -> None:
    config = _config(tmp_path, tasks={"num_tasks": 12}, train={"steps": 200})
    log = (tmp_path / "driver.log").open("wb")
    proc = subprocess.Popen([SUPSUP, "train", str(config)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    stored = _wait_for_tasks(tmp_path / "registry", "probe", proc)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == code
    text = (tmp_path / "driver.log").read_text()
    assert "error: interrupted" in text and "Traceback" not in text, text[-3000:]
    with sqlite3.connect(tmp_path / "runs" / "probe" / "mlflow.db") as conn:
        assert conn.execute("select status from runs").fetchall() == [("KILLED",)]
    registry = MaskRegistry(tmp_path / "registry")
    assert set(stored) <= set(registry.tasks("probe")) and registry.verify("probe").all_ok
    time.sleep(2)
    leftovers = subprocess.run(["pgrep", "-f", f"session.*{proc.pid}"], capture_output=True,
                               text=True).stdout.split()
    assert leftovers == []  # the local Ray the command started is gone with it


def test_an_output_dir_inside_the_registry_is_refused_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "registry"
    config = _config(tmp_path)
    for option, named in ((f"output_dir={root}", f"output_dir {root} is inside registry.root"),
                          (f"output_dir={root / 'runs'}", "is inside registry.root"),
                          (f"registry.root={tmp_path / 'runs' / 'probe'}",
                           "is the run folder (output_dir/name)")):
        done = _in_process(capsys, "train", str(config), "--set", option)
        assert done.returncode == 2, (option, done.stderr[-2000:])
        assert named in _one_error(done), option
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.yaml"]


def test_a_task_file_of_a_bank_trained_with_other_steps_is_refused(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same bank name, seed and network, trained with other steps in another registry: its
    task file copied into the bank is named by verify and refused by train."""
    import shutil

    other = ["--set", f"registry.root={tmp_path / 'other'}", "--set", "train.steps=10",
             "--set", "tasks.num_tasks=2", "--set", f"output_dir={tmp_path / 'other-runs'}"]
    assert _in_process(capsys, "train", str(trained / "probe.yaml"), *other).returncode == 0
    root = tmp_path / "registry"
    shutil.copytree(trained / "registry", root)
    copied = root / "probe" / "tasks" / "task-0000001.parquet"
    copied.write_bytes((tmp_path / "other" / "probe" / "tasks" / copied.name).read_bytes())
    before = _state(root)
    done = _in_process(capsys, "registry", "verify", "probe", "--root", str(root))
    assert done.returncode == 1
    assert f"task 1: {copied}: written under manifest" in done.stdout, done.stdout
    assert "recipe: steps=20 optimizer=rmsprop" in done.stdout
    runs = tmp_path / "runs"
    done = _in_process(capsys, "train", str(trained / "probe.yaml"), "--set",
                       f"registry.root={root}", "--set", f"output_dir={runs}")
    assert done.returncode == 2
    assert "the task files of tasks [1] were written for another bank or task, or under " \
           "another manifest" in _one_error(done)
    assert _state(root) == before and not runs.exists()


def _artifact(folder: Path, name: str) -> Path:
    [path] = list((folder / "runs" / "probe" / "mlartifacts").rglob(name))
    return path


def test_a_version_whose_bank_file_was_deleted_is_registered_again(
        ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_config
    from pipeline.tracking import load_bank_from_model

    config_path = _config(tmp_path, tasks={"num_tasks": 2}, train={"steps": 5})
    uri = load_config(str(config_path)).tracking_uri
    assert _in_process(capsys, "train", str(config_path)).returncode == 0
    _artifact(tmp_path, "bank.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="has no artifact 'bank.parquet'"):
        load_bank_from_model("models:/probe/latest", uri)
    before = _state(tmp_path / "registry")
    done = _in_process(capsys, "train", str(config_path))
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(uri)
    versions = {int(mv.version): mv for mv in client.search_model_versions("name = 'probe'")}
    assert sorted(versions) == [1, 2]
    assert "bank.parquet is gone" in versions[1].tags["supsup.unloadable"]
    assert "champion" not in client.get_registered_model("probe").aliases  # never promoted
    bank, _ = load_bank_from_model("models:/probe/latest", uri)
    assert bank.task_ids == [0, 1]
    assert _state(tmp_path / "registry") == before  # the masks were never touched
    assert _in_process(capsys, "train", str(config_path)).returncode == 0  # now a no-op
    assert len(client.search_model_versions("name = 'probe'")) == 2


def test_an_edited_model_description_is_refused_at_load(
        ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import mlflow

    from pipeline.config import load_config

    config_path = _config(tmp_path, tasks={"num_tasks": 2}, train={"steps": 5})
    uri = load_config(str(config_path)).tracking_uri
    assert _in_process(capsys, "train", str(config_path)).returncode == 0
    model_json = _artifact(tmp_path, "model.json")
    info = json.loads(model_json.read_text())
    info["input"]["mean"] = [0.9]
    model_json.write_text(json.dumps(info, indent=1))
    mlflow.set_tracking_uri(uri)
    try:
        with pytest.raises(ValueError, match=r"model\.json hashes to .* edited after "
                                             r"registration, so the model is refused"):
            mlflow.pyfunc.load_model("models:/probe/1")
    finally:
        # None, not the default it resolved to: that would be left in MLFLOW_TRACKING_URI
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    done = _in_process(capsys, "evaluate", "models:/probe/1", "--tracking-uri", uri)
    assert done.returncode == 2
    assert "models:/probe/1: its model.json hashes to" in _one_error(done)


# ------------------------------------------- probes of silent combinations and unbounded output
def _free_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("scheme, named", [("", "Ray cluster (GCS)"),
                                           ("ray://", "Ray Client server")])
def test_a_ray_address_where_nothing_listens_is_refused_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], scheme: str, named: str) -> None:
    address = f"{scheme}127.0.0.1:{_free_port()}"
    for command in ("train", "run"):
        done = _in_process(capsys, command, str(_config(tmp_path)), "--address", address)
        assert done.returncode == 2, done.stderr[-2000:]
        assert _one_error(done) == (
            f"error: cannot reach the {named} at '{address}' (--address): Connection refused. "
            "Start the cluster (`ray start --head` on '127.0.0.1'), or pass the address of a "
            "running one with --address, or leave --address, cluster.address and RAY_ADDRESS "
            "unset to start a local Ray")
    done = _in_process(capsys, "train", str(_config(tmp_path, cluster={"address": address})))
    assert f"at '{address}' (cluster.address)" in _one_error(done)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.yaml"]


def test_read_only_commands_refuse_a_missing_sqlite_store_and_create_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "a" / "missing" / "dir" / "x.db"
    for args in (["lookup", "models:/probe@champion"], ["evaluate", "models:/probe/1"]):
        done = _in_process(capsys, *args, "--tracking-uri", f"sqlite:///{db}")
        assert done.returncode == 2, done.stderr[-2000:]
        assert _one_error(done) == (
            f"error: tracking database {db} does not exist; this command reads the MLflow store "
            "that registered the model: pass its --tracking-uri, e.g. "
            "sqlite:///runs/NAME/mlflow.db as `supsup train` printed it")
    assert list(tmp_path.iterdir()) == []


def test_registry_ls_of_a_missing_root_is_an_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    done = _in_process(capsys, "registry", "ls", "--root", str(missing))
    assert done.returncode == 2
    assert _one_error(done) == (f"error: registry root {missing} does not exist; pass the folder "
                                "the banks were trained into with --root (registry.root of the "
                                "config)")
    assert not missing.exists()
    missing.mkdir()  # an existing, empty registry is no error: it holds no banks yet
    done = _in_process(capsys, "registry", "ls", "--root", str(missing))
    assert done.returncode == 0 and f"no banks under {missing}" in done.stdout


@pytest.mark.parametrize("text, named", [
    ("", "the config file is empty (or only comments)"),
    ("# nothing here\n", "the config file is empty (or only comments)"),
    ("name: probe\ntasks: {num_tasks: 2}\nname: other\n", "duplicate key 'name' (lines 1 and 3)"),
    ("name: probe\ntrain:\n  steps: 5\n  lr: 0.1\n  steps: 50\n",
     "duplicate key 'train.steps' (lines 3 and 5)"),
])
def test_an_empty_file_or_a_duplicate_key_is_refused_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, named: str) -> None:
    path = tmp_path / "probe.yaml"
    path.write_text(text)
    done = _in_process(capsys, "train", str(path))
    assert done.returncode == 2
    assert _one_error(done).startswith(f"error: {path}: {named}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.yaml"]


def test_a_file_of_nested_aliases_gives_one_short_error_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A few hundred bytes of nested aliases once printed a 34.7 MB error line."""
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join([*lines, "train: *i"]) + "\n")
    assert path.stat().st_size < 500
    done = _in_process(capsys, "train", str(path))
    assert done.returncode == 2
    error = _one_error(done)
    assert "expand to more than 100,000 values" in error
    assert len(done.stderr.encode()) < 1024 and done.stderr.count("\n") == 1


@pytest.mark.parametrize("options, name", [
    (["model=dense", "train.precision=bf16"], "train.precision"),
    (["model=psp", "train.fused=true"], "train.fused"),
    (["model=dense", "train.rule=topk", "train.density=0.5"], "train.rule"),
    (["scenario=nns"], "train.steps"),  # the probe config's steps: 20
    (["scenario=nns", "train.steps=1000", "train.fused=true"], "train.fused"),
])
def test_training_fields_a_job_would_ignore_are_refused_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], name: str) -> None:
    config = _config(tmp_path, network={"name": "fc", "hidden": [16]})
    done = _in_process(capsys, "train", str(config), *[a for o in options for a in ("--set", o)])
    assert done.returncode == 2
    assert f"{name}: " in _one_error(done) and f"ignores {name}" in _one_error(done)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.yaml"]


def test_an_error_about_a_huge_value_is_one_bounded_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    done = _in_process(capsys, "registry", "verify", "b" * 20_000, "--root", str(tmp_path))
    assert done.returncode == 2
    error = _one_error(done)
    assert error.startswith("error: bank name 'bbb") and len(error) < 1100
    assert error.endswith(" more characters with --debug)")
