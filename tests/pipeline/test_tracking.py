"""Tests for pipeline.tracking: real MLflow on SQLite under tmp_path, and one real `mlflow server`.

Run under /work/shared/offline-run (the server test binds 127.0.0.1 and nothing may leave the
machine). Masks are trained briefly on 3 permuted tasks of the bundled MNIST digits, so the task a
registered model infers can be checked, not only its type.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.datasets import load_dataset
from pipeline.registry import MaskRegistry
from pipeline.tracking import PARAM_VALUE_LIMIT, Tracker, load_bank_from_model, lookup
from supsup.masks import pack_bits
from supsup.networks import SupermaskNet, build_network
from supsup.scores import TaskScores
from supsup.tasks import PermutedTasks
from supsup.train import TrainConfig, train_group

MASK_INFO = {"rule": "threshold"}
TASKS = [0, 1, 2]


@pytest.fixture(scope="module", autouse=True)
def _quiet_and_single_threaded() -> Iterator[None]:
    """The test module talks to MLflow too (reading runs back), so telemetry goes off here as
    well. One torch thread: these networks are tiny, and on a busy 2-core machine a second
    thread mostly spins."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """3 permuted MNIST tasks with masks trained for 60 steps, stored in a registry bank."""
    train, test = load_dataset("mnist-bundled")
    tasks = PermutedTasks(train, test, num_tasks=3, seed=0)
    net = build_network(name="lenet", num_outputs=100, num_classes=10)
    result = train_group(net, tasks, TASKS, TrainConfig(steps=60, batch_size=64, lr=3e-3,
                                                               optimizer="adam"))
    root = tmp_path_factory.mktemp("registry")
    registry = MaskRegistry(root)
    _write_bank(registry, "perm", net, {t: result.masks[t] for t in TASKS})
    return {"net": net, "tasks": tasks, "registry": registry, "root": root, "bank": "perm"}


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite tracking store for the module (creating its tables takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def global_uri(db: str) -> Iterator[str]:
    """mlflow.pyfunc.load_model resolves models:/ URIs through the process-wide tracking URI."""
    mlflow.set_tracking_uri(db)
    try:
        yield db
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]


def _write_bank(registry: MaskRegistry, bank: str, net: SupermaskNet,
                masks: dict[int, dict[str, torch.Tensor]]) -> None:
    registry.create_bank(bank, net.spec, net.layer_shapes(), net.bn_features(), MASK_INFO)
    for t, layer_masks in masks.items():
        registry.write_task(bank, t, {k: pack_bits(m).numpy() for k, m in layer_masks.items()})


def _random_masks(net: SupermaskNet, task_ids: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """Untrained threshold masks (about half the weights kept), distinct per task."""
    return {t: masks for t, (masks, _) in TaskScores(net, task_ids).export().items()}


def _register(tracker: Tracker, run_id: str, model: str, registry: MaskRegistry, bank: str,
              embed: Path | None, aliases: list[str]) -> int:
    manifest = registry.manifest(bank)
    return tracker.register_bank(
        run_id, model, network_spec=manifest["network"], registry_root=registry.root, bank=bank,
        snapshot=registry.snapshot(bank), embed_file=embed,
        inference_defaults={"method": "one_shot", "objective": "entropy", "mode": "batch"},
        aliases=aliases, tags={"experiment": "test"},
    )


def _task_batch(tasks: PermutedTasks, task_id: int, n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The first n test images of a task, flattened to float32 rows, and their labels."""
    x, y = tasks.get(task_id, "test", torch.arange(n))
    return x.reshape(n, -1).numpy().astype(np.float32), y.numpy()


# ------------------------------------------------------------------------------ runs
def test_run_round_trip_through_mlflow(tmp_path: Path, db: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory (./mlruns)
    tracker = Tracker(db, "runs")
    report = tmp_path / "report.md"
    report.write_text("# report\n")
    long_value = "v" * (PARAM_VALUE_LIMIT + 300)
    with tracker.run("train", tags={"job": "train"}) as run_id:
        tracker.log_params({"train.lr": 0.001, "network.hidden": [300, 100], "notes": long_value})
        tracker.log_metrics({"train_seconds": 12.5, "tasks_trained": 3})
        tracker.log_metrics({"curve_accuracy": 0.9}, step=2)
        for t, acc in zip(TASKS, (0.91, 0.92, 0.93)):
            tracker.log_task_metrics(t, {"accuracy": acc})
        tracker.log_text("train:\n  lr: 0.001\n", "config.yaml")
        tracker.log_dict({"tasks": TASKS}, "summary.json")
        tracker.log_artifact(report, "evaluation")
        tracker.set_tags({"bank": "perm"})
        with pytest.raises(ValueError, match=r"already has params \['train.lr'\]"):
            tracker.log_params({"train.lr": 0.5})
        with pytest.raises(ValueError, match="metric 'bad' must be a number"):
            tracker.log_metrics({"bad": "high"})
    with pytest.raises(ValueError, match="no active run"):
        tracker.log_metrics({"late": 1.0})

    client = MlflowClient(db)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "train"
    params = run.data.params
    assert params["train.lr"] == "0.001" and params["network.hidden"] == "[300, 100]"
    assert len(params["notes"]) == PARAM_VALUE_LIMIT and "params/notes.txt" in params["notes"]
    assert run.data.metrics["train_seconds"] == 12.5 and run.data.metrics["tasks_trained"] == 3
    assert run.data.tags["job"] == "train" and run.data.tags["bank"] == "perm"
    history = client.get_metric_history(run_id, "task/accuracy")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.91), (1, 0.92), (2, 0.93)]
    assert [m.step for m in client.get_metric_history(run_id, "curve_accuracy")] == [2]

    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(Path(db.removeprefix("sqlite:///")).parent / "mlartifacts")
    assert (artifacts / "config.yaml").read_text() == "train:\n  lr: 0.001\n"
    assert (artifacts / "params" / "notes.txt").read_text() == long_value
    assert (artifacts / "evaluation" / "report.md").read_text() == "# report\n"
    assert '"tasks": [' in (artifacts / "summary.json").read_text()
    assert sorted(os.listdir(tmp_path)) == ["report.md"]


def test_failed_and_nested_runs(db: str) -> None:
    tracker = Tracker(db, "runs")
    with pytest.raises(RuntimeError, match="worker died"):
        with tracker.run("broken") as broken:
            raise RuntimeError("worker died")
    client = MlflowClient(db)
    assert client.get_run(broken).info.status == "FAILED"
    with tracker.run("sweep") as parent:
        with tracker.run("trial-0") as child:
            pass
    with tracker.run("trial-1", parent_run_id=parent) as late_child:
        pass
    assert client.get_run(child).data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(late_child).data.tags["mlflow.parentRunId"] == parent
    assert "mlflow.parentRunId" not in client.get_run(parent).data.tags
    with pytest.raises(KeyError, match="parent run 'nope' does not exist"):
        with tracker.run("orphan", parent_run_id="nope"):
            pass


def test_file_store_and_bare_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="refuses the file store"):
        Tracker(tmp_path.as_uri(), "x")
    with pytest.raises(ValueError, match="refuses the plain file store"):
        Tracker(str(tmp_path / "mlruns"), "x")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------- model registry
@pytest.fixture(scope="module")
def perm_models(tmp_path_factory: pytest.TempPathFactory, db: str, trained: dict) -> dict:
    """Version 1 embeds the trained bank, version 2 reads it from the registry; the alias
    'champion' is looked up after each registration."""
    registry, bank = trained["registry"], trained["bank"]
    tracker = Tracker(db, "perm")
    export = registry.export(bank, tmp_path_factory.mktemp("export") / "perm.parquet")
    with tracker.run("train") as run_1:
        v1 = _register(tracker, run_1, "perm-model", registry, bank, export, ["champion"])
        status_inside = MlflowClient(db).get_run(run_1).info.status
    first = lookup("models:/perm-model@champion", db)
    with tracker.run("retrain") as run_2:
        v2 = _register(tracker, run_2, "perm-model", registry, bank, None, ["champion", "latest"])
    return {"v1": v1, "v2": v2, "run_1": run_1, "run_2": run_2, "first": first,
            "status_inside": status_inside}


def test_register_lookup_and_move_alias(db: str, trained: dict, perm_models: dict) -> None:
    registry, bank = trained["registry"], trained["bank"]
    v1, v2 = perm_models["v1"], perm_models["v2"]
    info = perm_models["first"]
    snapshot = registry.snapshot(bank)
    assert info["version"] == v1 and info["aliases"] == ["champion"]
    assert info["run_id"] == perm_models["run_1"]
    assert info["model_uri"] == f"models:/perm-model/{v1}"
    assert info["tasks"] == TASKS and info["bank"] == bank and info["embedded"] is True
    assert info["registry_root"] == str(trained["root"])
    assert info["snapshot"] == snapshot and info["network"] == trained["net"].spec.to_dict()
    assert info["inference_defaults"] == {"method": "one_shot", "objective": "entropy",
                                          "mode": "batch"}
    assert info["tags"]["supsup.snapshot"] == snapshot["content_sha256"]
    assert info["tags"]["supsup.tasks"] == "0-2" and info["tags"]["experiment"] == "test"

    assert perm_models["status_inside"] == "RUNNING"  # registering does not end the run
    assert MlflowClient(db).get_run(perm_models["run_1"]).info.status == "FINISHED"
    assert v2 == v1 + 1
    moved = lookup("models:/perm-model@champion", db)
    assert moved["version"] == v2 and moved["embedded"] is False
    assert moved["run_id"] == perm_models["run_2"]
    assert lookup(f"models:/perm-model/{v1}", db)["aliases"] == []
    assert lookup("models:/perm-model/latest", db)["version"] == v2
    assert lookup("models:/perm-model@latest", db)["version"] == v2  # MLflow's reserved alias

    bank_back, spec = load_bank_from_model(f"models:/perm-model/{v1}", db)
    stored, _ = registry.load_bank(bank)
    assert spec == trained["net"].spec and bank_back.task_ids == TASKS
    for key in stored.layer_shapes:
        assert torch.equal(bank_back.packed(key), stored.packed(key))


def test_registered_model_infers_the_right_task(trained: dict, perm_models: dict,
                                                global_uri: str) -> None:
    """Batches of each task get that task's id and mostly right classes, from both versions."""
    tasks: PermutedTasks = trained["tasks"]
    for uri in (f"models:/perm-model/{perm_models['v1']}", "models:/perm-model@champion"):
        model = mlflow.pyfunc.load_model(uri)
        for t in TASKS:
            x, y = _task_batch(tasks, t)
            out = model.predict(x)
            assert list(out.columns) == ["task_id", "class", "confidence"] and len(out) == 64
            assert (out["task_id"] == t).all(), f"{uri}: batch of task {t} -> {out['task_id']}"
            assert out["class"].between(0, 9).all()
            # 60 training steps reach ~77% training accuracy; chance is 10%
            assert (out["class"].to_numpy() == y).mean() > 0.6
            rows = model.predict(x, params={"mode": "per_example"})
            assert set(rows["task_id"]) <= set(TASKS)
            assert (rows["task_id"] == t).mean() > 0.7  # per image; the batch vote above is exact
    same = model.predict(pd.DataFrame(x))  # a DataFrame of flattened pixels works too
    assert (same["task_id"] == TASKS[-1]).all()
    with pytest.raises(ValueError, match=r"param mode='sometimes'; choose one of"):
        model.predict(x, params={"mode": "sometimes"})
    images = x.reshape(-1, 1, 28, 28)  # the python model itself also takes (B, C, H, W)
    direct = model.unwrap_python_model().predict(None, images)
    assert (direct["task_id"] == TASKS[-1]).all()


def test_changed_registry_refuses_the_registry_backed_model(
        tmp_path: Path, db: str, global_uri: str) -> None:
    net = build_network(name="lenet", num_outputs=100, num_classes=10)
    registry = MaskRegistry(tmp_path / "registry")
    _write_bank(registry, "growing", net, _random_masks(net, TASKS))
    tracker = Tracker(db, "growing")
    with tracker.run("train") as run_id:
        plain = _register(tracker, run_id, "growing-model", registry, "growing", None, ["live"])
        packed = _register(tracker, run_id, "growing-model", registry, "growing",
                           registry.export("growing", tmp_path / "g.parquet"), ["packed"])
    mlflow.pyfunc.load_model("models:/growing-model@live")  # unchanged: loads

    _write_bank(registry, "growing", net, _random_masks(net, [3]))  # the bank gains a task
    with pytest.raises(ValueError, match=r"bank 'growing' .* changed since the model was "
                                         r"registered \(then 3 tasks.*now 4 tasks"):
        mlflow.pyfunc.load_model("models:/growing-model@live")
    with pytest.raises(ValueError, match=f"models:/growing-model@live \\(models:/growing-model/"
                                         f"{plain}\\): bank 'growing'"):
        load_bank_from_model("models:/growing-model@live", db)
    model = mlflow.pyfunc.load_model("models:/growing-model@packed")  # carries its own masks
    assert model.unwrap_python_model().bank.task_ids == TASKS
    assert lookup("models:/growing-model@packed", db)["version"] == packed


def test_unknown_models_and_aliases_list_what_exists(db: str, perm_models: dict) -> None:
    with pytest.raises(KeyError, match=r"models:/perm-model@nope .*alias nope.*registered "
                                       r"models: .*perm-model \(\d+ versions; aliases "
                                       r"@champion -> \d+"):
        lookup("models:/perm-model@nope", db)
    with pytest.raises(KeyError, match=r"models:/other/1 .*registered models: .*perm-model"):
        lookup("models:/other/1", db)
    with pytest.raises(ValueError, match="expected models:/NAME@ALIAS or models:/NAME/VERSION"):
        lookup("runs:/abc/model", db)
    with pytest.raises(ValueError, match="stages are not used"):
        lookup("models:/perm-model/Production", db)


def test_register_checks_its_inputs(db: str, trained: dict) -> None:
    registry, bank = trained["registry"], trained["bank"]
    tracker = Tracker(db, "perm")
    spec = registry.manifest(bank)["network"]
    with tracker.run("bad") as run_id:
        common = {"network_spec": spec, "registry_root": registry.root, "bank": bank}
        with pytest.raises(ValueError, match=r"snapshot .* does not describe bank 'perm'"):
            tracker.register_bank(run_id, "m", **common,
                                  snapshot={**registry.snapshot(bank), "task_ids_hash": "0"})
        with pytest.raises(ValueError, match=r"inference_defaults\['mode'\] = 'often'"):
            tracker.register_bank(run_id, "m", **common, inference_defaults={"mode": "often"})
        with pytest.raises(ValueError, match="is not the network of bank 'perm'"):
            tracker.register_bank(run_id, "m", **{**common, "network_spec": {
                **spec, "seed": 1}})
        with pytest.raises(ValueError, match="alias 'v2' is not allowed"):
            tracker.register_bank(run_id, "m", **common, aliases=["ok", "v2"])
        with pytest.raises(FileNotFoundError, match="embed_file .*missing.parquet"):
            tracker.register_bank(run_id, "m", **common, embed_file="missing.parquet")
    assert MlflowClient(db).search_registered_models(filter_string="name = 'm'") == []


# ---------------------------------------------------------------------- mlflow server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 (one worker, no job runner), stopped by its PID."""
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not come up: "
                                   f"{(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_through_a_real_mlflow_server(tmp_path: Path, server: str) -> None:
    net = build_network(name="lenet", num_outputs=100, num_classes=10)
    registry = MaskRegistry(tmp_path / "registry")
    _write_bank(registry, "served", net, _random_masks(net, TASKS))
    tracker = Tracker(server, "served")
    with tracker.run("train") as run_id:
        tracker.log_params({"train.steps": 10})
        tracker.log_task_metrics(1, {"accuracy": 0.5})
        tracker.log_text("train:\n  steps: 10\n", "config.yaml")
        version = _register(tracker, run_id, "served-model", registry, "served",
                            registry.export("served", tmp_path / "served.parquet"), ["prod"])
    client = MlflowClient(server)
    run = client.get_run(run_id)
    assert run.data.params == {"train.steps": "10"} and run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # the server stores them
    assert (tmp_path / "server-artifacts").is_dir()
    info = lookup("models:/served-model@prod", server)
    assert info["version"] == version and info["tasks"] == TASKS and info["embedded"]
    bank, spec = load_bank_from_model("models:/served-model@prod", server)
    assert spec == net.spec and bank.task_ids == TASKS
    with pytest.raises(KeyError, match="served-model .*@prod"):
        lookup("models:/served-model@staging", server)
    mlflow.set_tracking_uri(server)
    try:
        model = mlflow.pyfunc.load_model("models:/served-model@prod")
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    out = model.predict(np.zeros((2, 784), np.float32), params={"mode": "per_example"})
    assert set(out["task_id"]) <= set(TASKS) and len(out) == 2
