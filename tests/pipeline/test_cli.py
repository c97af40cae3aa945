"""The `supsup` command end to end on real Ray, real MLflow and real files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.registry import MaskRegistry, import_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    (root / "exp.yaml").write_text(yaml.safe_dump({
        "name": "clitest",
        "output_dir": str(root / "runs"),
        "network": {"name": "lenet", "num_outputs": 100},
        "tasks": {"family": "permuted", "num_tasks": 6},
        "train": {"steps": 60, "group_size": 3, "log_every": 30},
        "evaluate": {"group_size": 3, "curve_points": 3, "max_batches": 3},
        "registry": {"root": str(root / "registry")},
        # `supsup run` registers version 1, then promotes it: its evaluation meets the rule
        "tracking": {"alias": "champion", "promote_if": "task_inference_accuracy>=0.5"},
    }))
    return root


@pytest.fixture(scope="module")
def trained(ray_local: None, project: Path) -> Path:
    assert main(["run", str(project / "exp.yaml")]) == 0
    return project


def test_run_trains_registers_and_evaluates(trained: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    config = load_config(trained / "exp.yaml")
    registry = MaskRegistry(config.registry.root)
    assert registry.tasks("clitest") == list(range(6))
    report = json.loads((config.run_dir / "evaluation" / "report.json").read_text())
    # 60 RMSprop steps on permuted digits give ~75% accuracy; one-shot inference over 6 masks
    # finds the task of a 128-image batch from one image nearly always (chance: 1/6).
    assert report["summary"]["task_inference_accuracy"] >= 0.9
    assert report["summary"]["accuracy_gg"] >= 0.5
    assert [c["tasks_learned"] for c in report["curve"]] == [2, 4, 6]
    # one inference per test batch (3 batches of each of the 6 tasks), all answered by the
    # batched engine, and the count is in the report a person reads
    assert report["summary"]["inferences"] == 18 and report["schema_version"] == 4
    # the accuracy matrix: rows at the curve's points, each row's newest task a column; GG is
    # the same at every row (a learned mask never changes), so it forgets nothing, exactly
    gg, gn = (report["accuracy_matrix"][k] for k in ("gg", "gn"))
    assert gg["tasks_learned"] == [2, 4, 6] and {1, 3, 5} <= set(gg["task_ids"])
    assert report["continual"]["forgetting_gg"] == 0.0
    assert report["continual"]["backward_transfer_gg"] == 0.0
    assert gn["values"][0][gn["task_ids"].index(3)] is None  # task 3 not learned after 2
    assert -1 <= report["continual"]["backward_transfer_gn"] <= 0.1
    assert "| task inferences made | 18 (one per test batch) |" in (
        config.run_dir / "evaluation" / "report.md").read_text()
    # where the numbers came from: the evaluation's MLflow run, the version it evaluated
    assert report["model_version"] == 1 and report["summary"]["tasks"] == 6
    run = MlflowClient(config.tracking_uri).get_run(report["run_id"])
    assert run.data.tags["snapshot"] == report["snapshot_sha256"]
    assert run.data.metrics["forgetting_gg"] == 0.0  # the continual summaries, as metrics
    assert run.data.metrics["average_accuracy_gn"] == pytest.approx(
        report["continual"]["average_accuracy_gn"])
    for name in ("report.md", "curve.png", "accuracy_matrix.png", "confusion.png"):
        assert (config.run_dir / "evaluation" / name).stat().st_size > 0
    assert (config.run_dir / "training.png").stat().st_size > 0


def test_run_is_one_parent_run_with_train_and_evaluate_children(trained: Path) -> None:
    """Read back with MlflowClient as a user would: the lineage and who/what/where tags."""
    from importlib.metadata import version

    config = load_config(trained / "exp.yaml")
    client = MlflowClient(config.tracking_uri)
    experiment = client.get_experiment_by_name(config.experiment_name)
    runs = {r.data.tags["mlflow.runName"]: r for r in client.search_runs(
        [experiment.experiment_id]) if r.data.tags.get("job") in ("run", "train", "evaluate")}
    runs.update({r.data.tags["mlflow.runName"]: r for r in client.search_runs(
        [experiment.experiment_id]) if r.data.tags.get("job") == "register"})
    (parent,) = [r for r in runs.values() if r.data.tags["job"] == "run"]
    train, evaluate = runs["train"], runs["evaluate"]
    assert parent.info.run_name.startswith("clitest-run-6tasks-threshold-")
    assert parent.data.tags["promoted"] == "true"
    register = runs["register"]
    assert "mlflow.parentRunId" not in parent.data.tags
    for child in (train, register, evaluate):
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert evaluate.data.tags["train_run_id"] == train.info.run_id
    assert register.data.tags["train_run_id"] == train.info.run_id
    # the register run logged the model that became version 1
    assert client.get_model_version("clitest", "1").run_id == register.info.run_id
    for run in (train, evaluate):  # per-task values as an MLflow table, one row per task
        table = json.loads(Path(client.download_artifacts(run.info.run_id, "tasks.json",
                                                          str(trained))).read_text())
        assert "task_id" in table["columns"] and len(table["data"]) == 6
    # both ran on the same data, logged as a dataset input with its content digest
    (trained_on,), (evaluated_on,) = (r.inputs.dataset_inputs for r in (train, evaluate))
    assert trained_on.dataset.name == "mnist-bundled" and len(trained_on.dataset.digest) == 36
    assert evaluated_on.dataset.digest == trained_on.dataset.digest
    assert parent.data.tags["model_version"] == "1"
    assert "models:/clitest/1" in parent.data.tags["mlflow.note.content"]  # its description
    assert parent.data.metrics["task_inference_accuracy"] >= 0.9
    # the evaluation is on the model version: its logged model's metrics and its description
    mv = client.get_model_version("clitest", "1")
    logged = client.get_logged_model(mv.model_id or mv.source.removeprefix("models:/"))
    measured = {m.key: m.value for m in logged.metrics or []}
    assert measured["task_inference_accuracy"] == pytest.approx(
        evaluate.data.metrics["task_inference_accuracy"])
    assert "task inference" in mv.description and evaluate.info.run_id in mv.description
    for run in (parent, train, evaluate):
        tags = run.data.tags
        assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL"
        assert tags["supsup.version"] == version("supsup-pipeline")
        assert len(tags["mlflow.source.git.commit"]) == 40  # the tests run in a git checkout


def test_lookup_by_alias(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = load_config(trained / "exp.yaml")
    capsys.readouterr()
    assert main(["lookup", "models:/clitest@champion", "--tracking-uri",
                 config.tracking_uri, "--format", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bank"] == "clitest" and info["version"] == 1
    assert info["tasks"] == list(range(6)) and len(info["snapshot"]) == 64
    # lineage: trained and registered by the child runs of `supsup run`, measured by its
    # evaluate run
    client = MlflowClient(config.tracking_uri)
    register = client.get_run(info["lineage"]["registered_by_run"])
    assert register.info.run_name == "register"
    assert client.get_run(info["lineage"]["trained_by_run"]).info.run_name == "train"
    assert info["lineage"]["parent_run"] == register.data.tags["mlflow.parentRunId"]
    (evaluation,) = info["lineage"]["evaluations"]
    assert client.get_run(evaluation["run_id"]).info.run_name == "evaluate"
    assert evaluation["task_inference_accuracy"] >= 0.9 and "task inference" in info["description"]
    assert main(["lookup", "models:/clitest@champion", "--task", "4", "--tracking-uri",
                 config.tracking_uri, "--format", "json"]) == 0
    task = json.loads(capsys.readouterr().out)
    assert task["task_id"] == 4 and 0 < task["metadata"]["density"] < 1


def test_evaluate_model_uri(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = load_config(trained / "exp.yaml")
    capsys.readouterr()
    code = main(["evaluate", "models:/clitest@champion", "--tracking-uri", config.tracking_uri,
                 "--set", "evaluate.curve_points=0", "--set", "evaluate.method=binary"])
    assert code == 0
    out = capsys.readouterr().out
    assert "task inference" in out
    report = json.loads((config.run_dir / "evaluation" / "report.json").read_text())
    assert report["settings"]["method"] == "binary" and report["model_version"] == 1
    assert report["summary"]["task_inference_accuracy"] >= 0.9


def test_registry_commands(trained: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    config = load_config(trained / "exp.yaml")
    root = config.registry.root
    capsys.readouterr()
    assert main(["registry", "ls", "--root", root]) == 0
    assert "clitest: 6 tasks (0..5), network lenet seed 0" in capsys.readouterr().out
    assert main(["registry", "verify", "clitest", "--root", root]) == 0
    assert "6 tasks ok, 0 with problems" in capsys.readouterr().out
    dest = tmp_path / "bank.parquet"
    assert main(["registry", "export", "clitest", "--root", root, "--dest", str(dest)]) == 0
    assert dest.stat().st_size > 0


def test_altered_registry_file_is_reported(trained: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    config = load_config(trained / "exp.yaml")
    copy = tmp_path / "registry"
    import shutil

    shutil.copytree(config.registry.root, copy)
    victim = sorted((copy / "clitest" / "tasks").glob("*.parquet"))[2]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # truncated
    capsys.readouterr()
    assert main(["registry", "verify", "clitest", "--root", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "5 tasks ok, 1 with problems" in out and "task 2" in out
    # The original registry is untouched.
    assert MaskRegistry(config.registry.root).verify("clitest").problems == {}


def test_bad_config_exits_with_named_key(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  density: 0\n  rule: topk\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml: train.density" in err
    assert main(["train", str(path), "--set", "network.name=nope"]) == 2
    assert "network.name" in capsys.readouterr().err


def _bits(registry: MaskRegistry, bank: str) -> dict[int, dict[str, bytes]]:
    return {t: {k: np.asarray(v).tobytes() for k, v in registry.read_task(bank, t).packed.items()}
            for t in registry.tasks(bank)}


def test_same_command_again_resumes_without_training(trained: Path) -> None:
    config = load_config(trained / "exp.yaml")
    registry = MaskRegistry(config.registry.root)
    before = _bits(registry, "clitest")
    assert main(["train", str(trained / "exp.yaml")]) == 0
    assert _bits(registry, "clitest") == before
    # on its own, without a parent run, the train run holds the command's log itself
    client = MlflowClient(config.tracking_uri)
    experiment = client.get_experiment_by_name(config.experiment_name)
    (alone,) = [r for r in client.search_runs([experiment.experiment_id])
                if r.data.tags.get("job") == "train" and "mlflow.parentRunId" not in r.data.tags]
    assert "supsup.log" in {a.path for a in client.list_artifacts(alone.info.run_id)}
    local = client.download_artifacts(alone.info.run_id, "supsup.log", str(trained / "alone"))
    assert "6 tasks of bank 'clitest' are already in the registry" in Path(local).read_text()


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"supsup {version('supsup-pipeline')}"


@pytest.mark.parametrize(("argv", "own", "foreign"), [
    (["train"], ["CONFIG", "--set", "--address", "Examples:", "supsup train configs/"],
     ["--dest", "--tracking-uri"]),
    (["run"], ["CONFIG", "--set", "Examples:", "supsup run configs/quickstart.yaml"],
     ["--dest", "--task"]),
    (["evaluate"], ["TARGET", "--tracking-uri", "--config", "models:/"], ["--dest"]),
    (["lookup"], ["MODEL_URI", "--task", "--tracking-uri", "lineage"], ["--address"]),
    (["sweep"], ["CONFIG", "Ray Tune", "best.yaml"], ["--task"]),
    (["results"], ["--run", "--only", "--out", "--doc"], ["--set"]),
    (["registry", "ls"], ["[BANK]", "--root", "supsup registry ls"], ["--dest"]),
    (["registry", "verify"], ["BANK", "Exit status 0"], ["--dest"]),
    (["registry", "export"], ["BANK", "--dest", "FILE"], ["Exit status"]),
])
def test_each_command_has_its_own_help(argv: list[str], own: list[str], foreign: list[str],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"Usage: supsup {' '.join(argv)} ")
    for word in own:
        assert word in text, (argv, word)
    for word in foreign:  # not the shared help of several commands
        assert word not in text, (argv, word)


def test_top_level_help_lists_commands_and_global_flags(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for word in ("--version", "--quiet", "--verbose", "--debug", "train", "run", "evaluate",
                 "lookup", "sweep", "results", "registry", "supsup run configs/quickstart.yaml"):
        assert word in text, word


def test_global_flags_work_after_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["registry", "ls", "--root", str(tmp_path), "-q"]) == 0
    assert f"no banks under {tmp_path}" in capsys.readouterr().out
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["lookup", "models:/m@a"]) == 2  # no tracking URI anywhere: one error line
    assert capsys.readouterr().err.startswith("error: pass --tracking-uri")
    with pytest.raises(ValueError, match="--tracking-uri"):  # --debug after it: the failure
        main(["lookup", "models:/m@a", "--debug"])


def test_usage_mistakes_are_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "CONFIG" in err[0]
    assert "supsup train --help" in err[0]
    assert main(["registry", "export", "bank"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--dest" in line and "supsup registry export --help" in line
    assert main(["nosuch"]) == 2
    assert "nosuch" in capsys.readouterr().err


# ------------------------------------------------------------------ output formats and scale
def _json_out(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 0) -> Any:
    capsys.readouterr()
    assert main(argv) == code
    return json.loads(capsys.readouterr().out)  # stdout is the document alone


def _table_out(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 0) -> list[str]:
    capsys.readouterr()
    assert main(argv) == code
    return capsys.readouterr().out.strip().splitlines()


@pytest.fixture(scope="module")
def forty(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40-task bank, registered as a model version: the 6 trained tasks' masks stored again
    under ids 0..39 (task t holds task t % 6's masks) in a registry of its own, then `supsup
    train` of a 40-task config finds every task stored, trains none and registers the bank."""
    config = load_config(trained / "exp.yaml")
    root = tmp_path_factory.mktemp("forty")
    source = MaskRegistry(config.registry.root)
    bank_file = root / "clitest.parquet"
    assert main(["registry", "export", "clitest", "--root", config.registry.root,
                 "--dest", str(bank_file)]) == 0
    target = MaskRegistry(root / "registry")
    import_file(target, bank_file, "forty")
    for t in range(6, 40):
        record = source.read_task("clitest", t % 6)
        target.write_task("forty", t, record.packed, record.bn_stats or None, record.metadata)
    raw = yaml.safe_load((trained / "exp.yaml").read_text())
    raw.update(name="forty", output_dir=str(root / "runs"),
               registry={"root": str(root / "registry")})
    raw["tasks"]["num_tasks"] = 40
    raw["evaluate"].update(group_size=20, curve_points=2, max_batches=1)
    (root / "forty.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(root / "forty.yaml")]) == 0
    return root


def test_lookup_and_registry_at_40_tasks_summarise_in_bounded_lines(
        forty: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = load_config(forty / "forty.yaml")
    uri, root = config.tracking_uri, config.registry.root
    lines = _table_out(capsys, ["lookup", "models:/forty/1", "--tracking-uri", uri])
    assert len(lines) <= 12, lines
    assert "bank: forty, tasks 0..39 (40 tasks)" in lines
    assert not any("[" in line and "39" in line for line in lines)  # no list of ids
    info = _json_out(capsys, ["lookup", "models:/forty/1", "--tracking-uri", uri,
                              "--format", "json"])
    assert info["tasks"] == list(range(40)) and info["source"]["task_ids"] == list(range(40))
    task = _table_out(capsys, ["lookup", "models:/forty/1", "--task", "39", "--tracking-uri",
                               uri])
    assert task[0] == "task 39 of models:/forty/1 (version 1)" and len(task) <= 30
    assert _table_out(capsys, ["registry", "ls", "--root", root]) == [
        "forty: 40 tasks (0..39), network lenet seed 0, rule threshold"]
    listed = _json_out(capsys, ["registry", "ls", "--root", root, "--format", "json"])
    assert listed["root"] == root and [b["bank"] for b in listed["banks"]] == ["forty"]
    assert listed["banks"][0]["tasks"] == list(range(40))
    verified = _table_out(capsys, ["registry", "verify", "forty", "--root", root])
    assert "forty: 40 tasks ok, 0 with problems, 0 files that are not the bank's" in verified
    assert "  ok: tasks 0..39 (40 tasks)" in verified and len(verified) == 3


def test_verify_names_the_first_problems_and_json_all_of_them(
        forty: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    copy = tmp_path / "registry"
    shutil.copytree(load_config(forty / "forty.yaml").registry.root, copy)
    damaged = [3, 10, 11, 12, 20, 21, 30, 39]
    registry = MaskRegistry(copy)
    for t in damaged:
        victim = Path(registry.task_path("forty", t))
        victim.write_bytes(victim.read_bytes()[:100])  # truncated
    lines = _table_out(capsys, ["registry", "verify", "forty", "--root", str(copy)], code=1)
    assert "forty: 32 tasks ok, 8 with problems, 0 files that are not the bank's" in lines
    named = [line for line in lines if line.startswith("  task ")]
    assert [int(line.split()[1].rstrip(":")) for line in named] == damaged[:5]
    assert "  ... and tasks 21, 30, 39 (3 tasks) with problems (--format json lists all)" in lines
    report = _json_out(capsys, ["registry", "verify", "forty", "--root", str(copy), "--format",
                                "json"], code=1)
    assert report["all_ok"] is False and sorted(map(int, report["problems"])) == damaged
    assert report["tasks_ok"] == [t for t in range(40) if t not in damaged]


def test_evaluate_at_40_tasks_names_the_lowest_tasks_and_json_has_every_task(
        forty: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = load_config(forty / "forty.yaml")
    capsys.readouterr()
    assert main(["evaluate", "models:/forty/1", "--tracking-uri", config.tracking_uri,
                 "--format", "json", "--promote-if", "accuracy_gg>=0"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)  # the promotion's line went to stderr, the document is whole
    assert data["promotion"] == {"rule": "accuracy_gg>=0", "alias": "champion",
                                 "promoted": True}
    assert "promoted: accuracy_gg" in err
    assert [t["task_id"] for t in data["tasks"]] == list(range(40))
    assert data["summary"]["tasks"] == 40 and data["model_version"] == 1
    assert Path(data["files"]["markdown"]).is_absolute() and Path(data["files"]["json"]).exists()
    lines = _table_out(capsys, ["evaluate", "models:/forty/1", "--tracking-uri",
                                config.tracking_uri])
    assert len(lines) == 3 and lines[0].endswith("over 40 tasks")
    # tasks t and t + 6 hold the same masks, so task inference cannot tell them apart
    assert lines[1].startswith("lowest task inference accuracy: tasks ")
    assert lines[2].startswith("report: /")


def test_registry_import_round_trips_an_export_into_another_root(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = load_config(trained / "exp.yaml")
    bank_file, root = tmp_path / "clitest.parquet", tmp_path / "elsewhere"
    assert main(["registry", "export", "clitest", "--root", config.registry.root,
                 "--dest", str(bank_file)]) == 0
    lines = _table_out(capsys, ["registry", "import", str(bank_file), "--root", str(root)])
    assert lines[0] == (f"imported {bank_file} into bank clitest under {root}: 6 tasks "
                        "written, 0 already stored with identical masks")
    assert _table_out(capsys, ["registry", "verify", "clitest", "--root", str(root)])[1] == (
        "clitest: 6 tasks ok, 0 with problems, 0 files that are not the bank's")
    assert _bits(MaskRegistry(root), "clitest") == _bits(MaskRegistry(config.registry.root),
                                                         "clitest")
    again = _json_out(capsys, ["registry", "import", str(bank_file), "--root", str(root),
                               "--format", "json"])
    assert again["written"] == [] and again["unchanged"] == list(range(6))
    renamed = _json_out(capsys, ["registry", "import", str(bank_file), "--root", str(root),
                                 "--bank", "copy", "--format", "json"])
    assert renamed["bank"] == "copy" and renamed["written"] == list(range(6))
    capsys.readouterr()
    assert main(["registry", "import", str(tmp_path / "missing.parquet"), "--root",
                 str(root)]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert "missing.parquet does not exist" in err and "supsup registry export" in err


def test_run_logs_its_log_file_and_reports_to_the_parent_run(trained: Path) -> None:
    config = load_config(trained / "exp.yaml")
    client = MlflowClient(config.tracking_uri)
    experiment = client.get_experiment_by_name(config.experiment_name)
    (parent,) = [r for r in client.search_runs([experiment.experiment_id])
                 if r.data.tags.get("job") == "run"]
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "supsup.log" in names
    names |= {a.path for a in client.list_artifacts(parent.info.run_id, "evaluation")}
    assert {"evaluation/report.md", "evaluation/report.json"} <= names
    local = client.download_artifacts(parent.info.run_id, "supsup.log", str(trained / "dl"))
    assert "created bank 'clitest'" in Path(local).read_text()


def test_an_evaluation_keeps_the_reports_of_the_one_before(
        trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = load_config(trained / "exp.yaml")
    out = config.run_dir / "evaluation"
    before = json.loads((out / "report.json").read_text())["run_id"]
    assert main(["evaluate", str(trained / "exp.yaml"), "--set", "evaluate.curve_points=0"]) == 0
    now = json.loads((out / "report.json").read_text())["run_id"]
    assert now != before
    kept = {json.loads(p.read_text())["run_id"]: p.parent
            for p in out.glob("earlier/*/report.json")}
    assert before in kept and now not in kept
    assert (kept[before] / "report.md").stat().st_size > 0
    assert kept[before].name.endswith(before[:8])
    # an evaluation on its own is a run without a parent: it holds the command's log itself
    artifacts = {a.path for a in MlflowClient(config.tracking_uri).list_artifacts(now)}
    assert "supsup.log" in artifacts


def test_short_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    assert main(["-V"]) == 0
    assert capsys.readouterr().out.strip() == f"supsup {version('supsup-pipeline')}"


def test_shell_completion_prints_a_script_and_completes_commands() -> None:
    import os
    import subprocess
    import sys

    supsup = Path(sys.executable).parent / "supsup"
    script = subprocess.run([str(supsup)], env={**os.environ, "_SUPSUP_COMPLETE": "bash_source"},
                            capture_output=True, text=True, timeout=120)
    assert script.returncode == 0
    assert "complete -o nosort -F _supsup_completion supsup" in script.stdout
    assert "Usage:" not in script.stdout
    words = subprocess.run([str(supsup)], env={
        **os.environ, "_SUPSUP_COMPLETE": "bash_complete", "COMP_WORDS": "supsup registry i",
        "COMP_CWORD": "2"}, capture_output=True, text=True, timeout=120)
    assert words.returncode == 0 and "plain,import" in words.stdout.splitlines()


def test_set_typo_suggests_the_key_and_blames_the_override(
        project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(project / "exp.yaml"), "--set", "train.lrr=0.1"]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err == (f"error: {project / 'exp.yaml'}: --set 'train.lrr=0.1': unknown key "
                   "'train.lrr'; did you mean 'train.lr'?")
    assert main(["train", str(project / "exp.yaml"), "--set", "trian.steps=5"]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert "--set 'trian.steps=5': unknown key 'trian'; did you mean 'train'?" in err
    bad = project / "typo.yaml"
    bad.write_text("train:\n  stpes: 5\n")
    assert main(["train", str(bad)]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert f"{bad}: unknown key 'train.stpes'; did you mean 'train.steps'?" in err


def test_evaluation_by_shards_counts_what_the_whole_bank_counts(trained: Path) -> None:
    """evaluate.shards=2: two Ray actors hold three tasks each and the driver answers through
    them; every task's GG, GN and task-inference counts equal the whole bank's evaluation."""
    config = load_config(trained / "exp.yaml")
    report = config.run_dir / "evaluation" / "report.json"
    rows = {}
    for shards in (1, 2):
        assert main(["evaluate", str(trained / "exp.yaml"), "--set", "evaluate.curve_points=0",
                     "--set", f"evaluate.shards={shards}"]) == 0
        data = json.loads(report.read_text())
        rows[shards] = [{k: r[k] for k in ("task_id", "examples", "accuracy_gg", "accuracy_gn",
                                           "task_inference_accuracy", "inferences")}
                        for r in data["tasks"]]
    assert rows[2] == rows[1] and len(rows[1]) == 6
