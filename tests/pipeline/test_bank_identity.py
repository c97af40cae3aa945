"""A bank keeps one identity from training to evaluation: model versions pin content, damaged or
foreign files and mismatched configs are refused by every command. Real Ray, MLflow and files."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.registry import MaskRegistry, export_bank, import_file
from supsup.masks import pack_bits
from supsup.networks import build_network
from supsup.scores import TaskScores

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("identity")
    (root / "exp.yaml").write_text(yaml.safe_dump({
        "name": "ident",
        "output_dir": str(root / "runs"),
        "network": {"name": "lenet", "num_outputs": 100},
        "tasks": {"family": "permuted", "num_tasks": 2},
        "train": {"steps": 20, "group_size": 2},
        "evaluate": {"group_size": 2, "curve_points": 0, "max_batches": 2},
        "registry": {"root": str(root / "registry")},
    }))
    return root


def _versions(config: Any) -> list[int]:
    client = MlflowClient(config.tracking_uri)
    return sorted(int(mv.version) for mv in client.search_model_versions(
        f"name = '{config.model_name}'"))


def _report(config: Any) -> dict[str, Any]:
    return json.loads((config.run_dir / "evaluation" / "report.json").read_text())


@pytest.fixture(scope="module")
def grown(ray_local: None, project: Path) -> dict[str, Any]:
    """Version 1 of 'ident' embeds tasks 0-1; version 1 of 'pinned' (same bank, masks left in the
    registry) pins them; then the bank grows to 4 tasks and 'ident' gets version 2."""
    exp = str(project / "exp.yaml")
    assert main(["run", exp]) == 0
    pinned = ["--set", "tracking.model_name=pinned", "--set", "tracking.embed_masks_max_bytes=0"]
    assert main(["train", exp, *pinned]) == 0
    assert main(["run", exp, "--set", "tasks.num_tasks=4"]) == 0
    config = load_config(exp, ["--set", "tasks.num_tasks=4"][1:])
    return {"exp": exp, "config": config, "pinned": pinned}


def test_a_version_evaluates_exactly_its_content_after_the_bank_grew(
        grown: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    config = grown["config"]
    assert _versions(config) == [1, 2]
    for uri in ("models:/ident/1", "models:/pinned/1"):  # embedded masks, then the registry pin
        capsys.readouterr()
        assert main(["evaluate", uri, "--tracking-uri", config.tracking_uri]) == 0, uri
        assert "over 2 tasks" in capsys.readouterr().out
        report = _report(config)
        assert [r["task_id"] for r in report["tasks"]] == [0, 1]
        assert report["source"]["task_ids"] == [0, 1]
    assert main(["evaluate", "models:/ident/latest", "--tracking-uri",
                 config.tracking_uri]) == 0
    assert [r["task_id"] for r in _report(config)["tasks"]] == [0, 1, 2, 3]


def test_a_rerun_adds_no_version_and_keeps_the_training_summary(
        grown: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    config = grown["config"]
    summary = (config.run_dir / "train_summary.json").read_text()
    assert json.loads(summary)["tasks_trained"] == 2
    assert main(["run", grown["exp"], "--set", "tasks.num_tasks=4"]) == 0
    assert _versions(config) == [1, 2]
    client = MlflowClient(config.tracking_uri)
    assert "champion" not in client.get_registered_model("ident").aliases  # never promoted
    assert (config.run_dir / "train_summary.json").read_text() == summary


def _export(registry: MaskRegistry, tmp_path: Path) -> str:
    path = tmp_path / "ident.parquet"
    export_bank(registry, "ident", path)
    return str(path)


def _damaged_copy(grown: dict[str, Any], tmp_path: Path, damage: str) -> list[str]:
    """A copy of the bank with one kind of damage; returns --set options pointing at it."""
    src = Path(grown["config"].registry.root)
    root = tmp_path / "registry"
    shutil.copytree(src, root)
    bank = root / "ident"
    if damage == "edited seed":
        manifest = json.loads((bank / "_manifest.json").read_text())
        manifest["network"]["seed"] = 1
        (bank / "_manifest.json").write_text(json.dumps(manifest))
    elif damage == "deleted manifest":
        (bank / "_manifest.json").unlink()
    elif damage == "foreign file":  # a task file of a bank of another seed
        net = build_network(name="lenet", num_outputs=100, seed=1)
        other = MaskRegistry(tmp_path / "other")
        other.create_bank("ident", net.spec, net.layer_shapes(), {}, {"rule": "threshold"})
        masks = TaskScores(net, [7]).export()[7][0]
        other.write_task("ident", 7, {k: pack_bits(m).numpy() for k, m in masks.items()})
        (tmp_path / "other" / "ident" / "tasks" / "task-0000007.parquet").rename(
            bank / "tasks" / "task-0000007.parquet")
    elif damage == "renamed file":
        shutil.copy(bank / "tasks" / "task-0000001.parquet",
                    bank / "tasks" / "task-0000007.parquet")
    elif damage == "file of another bank":  # same configuration, another bank's file
        registry = MaskRegistry(root)
        import_file(registry, _export(registry, tmp_path), "twin")
        (bank / "tasks" / "task-0000003.parquet").unlink()
        (root / "twin" / "tasks" / "task-0000003.parquet").rename(
            bank / "tasks" / "task-0000003.parquet")
    return ["--set", f"registry.root={root}", "--set", f"output_dir={tmp_path / 'runs'}"]


@pytest.mark.parametrize("damage, verify_says, error", [
    ("edited seed", "written under manifest",
     r"network.seed: bank has 1, given 0|tasks \[0, 1, 2, 3\] were written for another bank or "
     r"task, or under another manifest"),
    ("deleted manifest", "no _manifest.json", "holds 4 task files but no _manifest.json"),
    ("foreign file", "task 7:", r"the task files of tasks \[7\] were written for another"),
    ("renamed file", "written for bank 'ident' task 1, not bank 'ident' task 7",
     r"the task files of tasks \[7\] were written for another"),
    ("file of another bank", "written for bank 'twin' task 3",
     r"the task files of tasks \[3\] were written for another"),
])
def test_damaged_banks_are_refused_by_every_command(
        grown: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        damage: str, verify_says: str, error: str) -> None:
    where = _damaged_copy(grown, tmp_path, damage)
    root = where[1].split("=", 1)[1]
    capsys.readouterr()
    assert main(["registry", "verify", "ident", "--root", root]) == 1
    assert verify_says in capsys.readouterr().out
    for command in ("evaluate", "train"):
        assert main([command, grown["exp"], "--set", "tasks.num_tasks=4", *where]) == 2, command
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert re.search(error, err), err
    config = load_config(grown["exp"], [s for s in where if s != "--set"])
    assert not Path(config.tracking_uri.removeprefix("sqlite:///")).exists() or \
        _versions(config) == []  # no model version was created


def test_a_config_that_is_not_the_banks_is_refused(
        grown: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    for options, named in ((["seed=1"], "network.seed: bank has 0, given 1"),
                           (["tasks.family=rotated"], "mask.family: bank has permuted, given "
                                                      "rotated"),
                           (["train.rule=topk", "train.density=0.5"],
                            "mask.rule: bank has threshold, given topk")):
        for command in ("evaluate", "train"):
            args = [a for o in options for a in ("--set", o)]
            assert main([command, grown["exp"], *args]) == 2, (command, options)
            assert named in capsys.readouterr().err
    assert _versions(grown["config"]) == [1, 2]


RECIPE_LINE = ("steps=20 optimizer=rmsprop lr=0.0001 schedule=constant warmup=0 batch=128 wd=0.0 "
               "precision=fp32 fused=false workers=1")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _run_count(config: Any) -> int:
    client = MlflowClient(config.tracking_uri)
    return len(client.search_runs([client.get_experiment_by_name(config.experiment_name)
                                   .experiment_id]))


def test_verify_and_lookup_show_the_recipe(
        grown: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    config = grown["config"]
    capsys.readouterr()
    assert main(["registry", "verify", "ident", "--root", config.registry.root]) == 0
    assert f"ident: recipe: {RECIPE_LINE}\n" in capsys.readouterr().out
    assert main(["lookup", "models:/ident/latest", "--tracking-uri", config.tracking_uri]) == 0
    assert RECIPE_LINE in capsys.readouterr().out  # the summary's line, or the JSON field


@pytest.mark.parametrize("command", ["train", "run"])
def test_training_with_another_recipe_is_refused_before_anything_is_written(
        grown: dict[str, Any], capsys: pytest.CaptureFixture[str], command: str) -> None:
    config = grown["config"]
    root = Path(config.registry.root)
    before, runs = _files(root), _run_count(config)
    for options, named, bank in (
            (["train.steps=10"], "train.steps: bank has 20, given 10", "ident-steps10"),
            (["train.precision=bf16", "train.lr=0.001"],
             "train.lr: bank has 0.0001, given 0.001; train.precision: bank has fp32, given bf16",
             "ident-lr0.001"),
            (["train.epochs=1"], "train.epochs: bank has <absent>, given 1.0; train.steps: bank "
                                 "has 20, given <absent>", "ident-epochs1.0")):
        capsys.readouterr()
        args = [a for o in ["tasks.num_tasks=4", *options] for a in ("--set", o)]
        assert main([command, grown["exp"], *args]) == 2, options
        err = capsys.readouterr().err
        assert err.startswith(f"error: bank 'ident' in {root} was trained with another recipe: "
                              f"{named}. Use the bank's recipe ({RECIPE_LINE}), or train into "
                              f"a new bank instead: --set registry.bank={bank} "), err
        assert len(err.strip().splitlines()) == 1, err
    assert _files(root) == before  # the same task files, byte for byte
    assert _run_count(config) == runs and _versions(config) == [1, 2]


def test_a_bank_from_before_recipes_loads_verifies_and_is_not_grown(
        grown: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bank whose manifest is in the format written before recipes were recorded (its task
    files written under that manifest's hash) keeps working, and is never trained into."""
    src = MaskRegistry(grown["config"].registry.root)
    manifest = src.manifest("ident")
    root = tmp_path / "registry"
    (root / "ident").mkdir(parents=True)
    old = {k: manifest[k] for k in ("format", "bank", "network", "layer_shapes", "bn_features",
                                     "mask", "created")}
    (root / "ident" / "_manifest.json").write_text(json.dumps(old, indent=1))
    legacy = MaskRegistry(root)
    for t in (0, 1):
        rec = src.read_task("ident", t)
        legacy.write_task("ident", t, rec.packed, rec.bn_stats or None, rec.metadata)
    where = ["--set", f"registry.root={root}", "--set", f"output_dir={tmp_path / 'runs'}"]
    capsys.readouterr()
    assert main(["registry", "verify", "ident", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "ident: recipe: not recorded" in out and "2 tasks ok, 0 with problems" in out
    assert main(["evaluate", grown["exp"], *where]) == 0
    assert "over 2 tasks" in capsys.readouterr().out
    before = _files(root)
    for extra in ([], ["--set", "tasks.num_tasks=4"]):
        assert main(["train", grown["exp"], *where, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: bank 'ident' in {root} was written before training "
                              "recipes were recorded, so how its masks were trained is "
                              "unknown"), err
        assert "--set registry.bank=ident-v2" in err
    assert _files(root) == before
