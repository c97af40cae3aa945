"""Tests for pipeline.tracking: real MLflow on SQLite under tmp_path, and one real `mlflow server`.

Run under /work/shared/offline-run (the server test binds 127.0.0.1 and nothing may leave the
machine). Masks are trained briefly on 3 permuted tasks of the bundled MNIST digits, so the task a
registered model infers can be checked, not only its type.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from pipeline.datasets import load_dataset
from pipeline.registry import (
    BankMismatchError,
    MaskRegistry,
    RegistryCorruptError,
    export_bank,
    import_file,
    load_bank,
)
from pipeline.tracking import (
    BANK_FILE,
    MODEL_JSON,
    PARAM_VALUE_LIMIT,
    Registration,
    Tracker,
    load_bank_from_model,
    lookup,
    register_bank,
)
from pipeline.tracking.versions import logged_model_id
from supsup.masks import pack_bits
from supsup.networks import SupermaskNet, build_network
from supsup.scores import TaskScores
from supsup.tasks import PermutedTasks
from supsup.train import TrainConfig, train_group
from tests.pipeline.servers import mlflow_server, model_server

MASK_INFO = {"rule": "threshold", "dataset": "mnist-bundled"}  # its mean/std go to model.json
TASKS = [0, 1, 2]
REPO = Path(__file__).resolve().parents[2]


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
              embed_dir: Path | None, aliases: list[str],
              task_ids: list[int] | None = None) -> Registration:
    """Publish `bank` (or `task_ids` of it) in one pass, embedding it when `embed_dir` is given,
    and register it as the pipeline does."""
    bank_file = None
    if embed_dir is not None:
        bank_file = embed_dir / f"{bank}-{len(list(embed_dir.iterdir()))}.parquet"
    source = export_bank(registry, bank, bank_file, task_ids)
    return register_bank(
        tracker, run_id, model, source, bank_file=bank_file,
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


def test_thousands_of_tasks_metrics_in_batches(db: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-task metrics of 1,200 tasks go to MLflow in a few batched calls (one call per task
    costs a store transaction each), every task's value at its own step; a bad value is refused
    naming the metric, and a buffer logs what it holds on flush."""
    from pipeline.tracking.runs import TaskMetricsBuffer

    tracker = Tracker(db, "runs")
    calls: list[int] = []
    log_batch = tracker.client.log_batch

    def counted(run_id: str, metrics: Any = (), **kw: Any) -> None:
        calls.append(len(metrics))
        log_batch(run_id, metrics=metrics, **kw)
    monkeypatch.setattr(tracker.client, "log_batch", counted)
    with tracker.run("evaluate") as run_id:
        tracker.log_tasks_metrics((t, {"gg": t / 1200, "gn": 1 - t / 1200})
                                  for t in range(1200))
        with pytest.raises(ValueError, match="metric 'task/gn' must be a number"):
            tracker.log_tasks_metrics([(0, {"gg": 0.5, "gn": "high"})])
        with pytest.raises(ValueError, match="task_id must be a non-negative integer"):
            tracker.log_tasks_metrics([(-1, {"gg": 0.5})])
        buffer = TaskMetricsBuffer(tracker, every_s=3600, prefix="mask")
        for t in range(3):
            buffer.add(t, {"purity": 0.5 + t / 10})
        assert len(calls) == 3  # 2,400 metrics: batches of 1,000; nothing buffered sent yet
        buffer.flush()
        buffer.flush()  # nothing left: no call
    assert calls == [1000, 1000, 400, 3]
    client = MlflowClient(db)
    gg = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "task/gg"))
    assert gg == [(t, t / 1200) for t in range(1200)]
    assert len(client.get_metric_history(run_id, "task/gn")) == 1200
    purity = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "mask/purity"))
    assert purity == [(0, 0.5), (1, 0.6), (2, 0.7)]


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


def test_experiments_open_as_model_training(tmp_path: Path) -> None:
    """A new experiment is tagged as custom model development, so MLflow's UI opens it on its
    runs rather than on the GenAI traces page."""
    db = f"sqlite:///{tmp_path / 'kind.db'}"
    tracker = Tracker(db, "kind")
    experiment = MlflowClient(db).get_experiment(tracker.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_file_store_and_bare_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="refuses the file store"):
        Tracker(tmp_path.as_uri(), "x")
    with pytest.raises(ValueError, match="refuses the plain file store"):
        Tracker(str(tmp_path / "mlruns"), "x")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------- model registry
@pytest.fixture(scope="module")
def perm_models(tmp_path_factory: pytest.TempPathFactory, db: str, trained: dict) -> dict:
    """Version 1 embeds the trained bank; registering the same content again adds nothing;
    version 2 pins tasks 0-1 of it in the registry and takes the alias 'champion'."""
    registry, bank = trained["registry"], trained["bank"]
    tracker = Tracker(db, "perm")
    embed = tmp_path_factory.mktemp("export")
    with tracker.run("train") as run_1:
        first_reg = _register(tracker, run_1, "perm-model", registry, bank, embed, ["champion"])
        status_inside = MlflowClient(db).get_run(run_1).info.status
    first = lookup("models:/perm-model@champion", db)
    with tracker.run("rerun") as run_rerun:
        again = _register(tracker, run_rerun, "perm-model", registry, bank, None, ["champion"])
    with tracker.run("subset") as run_2:
        second = _register(tracker, run_2, "perm-model", registry, bank, None,
                           ["champion", "latest"], task_ids=[0, 1])
    return {"v1": first_reg.version, "v2": second.version, "first_reg": first_reg,
            "again": again, "second": second, "run_1": run_1, "run_2": run_2, "first": first,
            "status_inside": status_inside}


def test_register_lookup_and_move_alias(db: str, trained: dict, perm_models: dict) -> None:
    registry, bank = trained["registry"], trained["bank"]
    v1, v2 = perm_models["v1"], perm_models["v2"]
    info = perm_models["first"]
    source = registry.source(bank)
    assert perm_models["first_reg"].created and perm_models["second"].created
    assert info["version"] == v1 and info["aliases"] == ["champion"]
    assert info["run_id"] == perm_models["run_1"]
    assert info["model_uri"] == f"models:/perm-model/{v1}"
    assert info["tasks"] == TASKS and info["bank"] == bank and info["embedded"] is True
    assert info["registry_root"] == str(trained["root"])
    assert info["snapshot"] == source.snapshot_sha256
    assert info["network"] == trained["net"].spec.to_dict()
    assert info["inference_defaults"] == {"method": "one_shot", "objective": "entropy",
                                          "mode": "batch"}
    assert info["tags"]["supsup.snapshot"] == source.snapshot_sha256
    assert info["tags"]["supsup.tasks"] == "tasks [0, 1, 2]"
    assert info["tags"]["experiment"] == "test"

    again = perm_models["again"]  # the same content again: no new version, alias kept
    assert (again.version, again.created) == (v1, False)
    assert perm_models["status_inside"] == "RUNNING"  # registering does not end the run
    assert MlflowClient(db).get_run(perm_models["run_1"]).info.status == "FINISHED"
    assert v2 == v1 + 1
    moved = lookup("models:/perm-model@champion", db)
    assert moved["version"] == v2 and moved["embedded"] is False and moved["tasks"] == [0, 1]
    assert moved["run_id"] == perm_models["run_2"]
    assert lookup(f"models:/perm-model/{v1}", db)["aliases"] == []
    assert lookup("models:/perm-model/latest", db)["version"] == v2
    assert lookup("models:/perm-model@latest", db)["version"] == v2  # MLflow's reserved alias
    versions = MlflowClient(db).search_model_versions("name = 'perm-model'")
    assert sorted(int(mv.version) for mv in versions) == [v1, v2]

    bank_back, spec = load_bank_from_model(f"models:/perm-model/{v1}", db)
    stored, _ = load_bank(source)
    assert spec == trained["net"].spec and bank_back.task_ids == TASKS
    for key in stored.layer_shapes:
        assert torch.equal(bank_back.packed(key), stored.packed(key))
    pinned, _ = load_bank_from_model("models:/perm-model@champion", db)
    assert pinned.task_ids == [0, 1]


def test_registered_model_infers_the_right_task(trained: dict, perm_models: dict,
                                                global_uri: str) -> None:
    """Batches of each task get that task's id and mostly right classes, from both versions."""
    tasks: PermutedTasks = trained["tasks"]
    for uri, held in ((f"models:/perm-model/{perm_models['v1']}", TASKS),
                      ("models:/perm-model@champion", [0, 1])):
        model = mlflow.pyfunc.load_model(uri)
        for t in held:
            x, y = _task_batch(tasks, t)
            out = model.predict(x)
            assert list(out.columns) == ["task_id", "class", "confidence"] and len(out) == 64
            assert (out["task_id"] == t).all(), f"{uri}: batch of task {t} -> {out['task_id']}"
            assert out["class"].between(0, 9).all()
            # 60 training steps reach ~77% training accuracy; chance is 10%
            assert (out["class"].to_numpy() == y).mean() > 0.6
            rows = model.predict(x, params={"mode": "per_example"})
            assert set(rows["task_id"]) <= set(held)
            assert (rows["task_id"] == t).mean() > 0.7  # per image; the batch vote above is exact
    same = model.predict(pd.DataFrame(x))  # a DataFrame of flattened pixels works too
    assert (same["task_id"] == 1).all()
    with pytest.raises(ValueError, match=r"param mode='sometimes'; choose one of"):
        model.predict(x, params={"mode": "sometimes"})
    images = x.reshape(-1, 1, 28, 28)  # the python model itself also takes (B, C, H, W)
    direct = model.unwrap_python_model().predict(None, images)
    assert (direct["task_id"] == 1).all()


def _post(url: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_mlflow_models_serve_answers_raw_pixels(trained: dict, perm_models: dict,
                                                global_uri: str, tmp_path: Path) -> None:
    """The registered version behind `mlflow models serve`: raw 0-255 pixels (normalised by the
    model with its training data's mean/std) give the answers normalised inputs give, and a
    bad parameter is a 400 naming it, not a traceback."""
    tasks: PermutedTasks = trained["tasks"]
    x, _ = _task_batch(tasks, 2, n=16)
    raw = np.rint((x * 0.3081 + 0.1307) * 255)  # the bundled digits' uint8 pixels back
    uri = f"models:/perm-model/{perm_models['v1']}"
    expected = mlflow.pyfunc.load_model(uri).predict(x)
    with model_server(uri, global_uri, tmp_path) as url:
        status, body = _post(url, {"inputs": raw.tolist(), "params": {"input_scale": "0-255"}})
        assert status == 200, body
        served = pd.DataFrame(body["predictions"])
        assert (served["task_id"] == 2).all()
        assert served["class"].tolist() == expected["class"].tolist()
        status, body = _post(url, {"inputs": x.tolist()})  # normalised: the default scale
        assert status == 200 and pd.DataFrame(body["predictions"])["task_id"].eq(2).all()
        status, body = _post(url, {"inputs": raw.tolist(), "params": {"input_scale": "kelvin"}})
        assert status == 400 and "input_scale='kelvin'" in body["message"], body
        assert "Traceback" not in json.dumps(body)


def test_a_version_means_the_same_masks_forever(
        tmp_path: Path, db: str, global_uri: str) -> None:
    net = build_network(name="lenet", num_outputs=100, num_classes=10)
    registry = MaskRegistry(tmp_path / "registry")
    _write_bank(registry, "growing", net, _random_masks(net, TASKS))
    tracker = Tracker(db, "growing")
    (tmp_path / "embed").mkdir()
    with tracker.run("train") as run_id:
        plain = _register(tracker, run_id, "growing-model", registry, "growing", None, ["live"])
        _register(tracker, run_id, "growing-model", registry, "growing", None, ["packed"])
    assert lookup("models:/growing-model@packed", db)["version"] == plain.version  # same content
    _write_bank(registry, "growing", net, _random_masks(net, [3]))  # the bank gains a task
    loaded = mlflow.pyfunc.load_model("models:/growing-model@live")  # its pin is still there
    assert loaded.unwrap_python_model().bank.task_ids == TASKS
    with tracker.run("train") as run_id:
        packed = _register(tracker, run_id, "growing-model", registry, "growing",
                           tmp_path / "embed", ["packed"], task_ids=TASKS)
    assert packed.version == plain.version  # embedding does not make other content

    with tracker.run("grown") as run_id:
        grown = _register(tracker, run_id, "growing-model", registry, "growing",
                          tmp_path / "embed", ["grown"])
    assert grown.created and lookup("models:/growing-model@grown", db)["tasks"] == [0, 1, 2, 3]

    task_file = tmp_path / "registry" / "growing" / "tasks" / "task-0000001.parquet"
    task_file.unlink()  # task 1 is replaced by other masks behind the registry's back
    _write_bank(registry, "growing", net, {1: _random_masks(net, [7])[7]})
    with pytest.raises(BankMismatchError, match=r"bank 'growing' \(tasks \[0, 1, 2\], snapshot "
                                                r"\w+\) in the mask registry at .*refused"):
        mlflow.pyfunc.load_model("models:/growing-model@live")
    with pytest.raises(BankMismatchError, match="refused"):
        load_bank_from_model("models:/growing-model@live", db)
    model = mlflow.pyfunc.load_model("models:/growing-model@grown")  # carries its own masks
    assert model.unwrap_python_model().bank.task_ids == [0, 1, 2, 3]


# ------------------------------------------------- what a version stores; tampering with it
def _model_dir(client: MlflowClient, name: str, version: int) -> Path:
    """The folder of a version's logged model in the local artifact store (mlartifacts)."""
    location = client.get_model_version_download_uri(name, str(version))
    assert location.startswith("file://"), location
    return Path(location.removeprefix("file://"))


# Run with -S: site-packages is added by hand without its .pth files, so the project's editable
# install is not importable and `pipeline` can only come from the code the model carries.
_FRESH_LOAD = """
import importlib.util, json, sys
sys.path.append(sys.argv[1])
assert importlib.util.find_spec("pipeline") is None, "pipeline is importable before loading"
import mlflow, numpy as np
model = mlflow.pyfunc.load_model(sys.argv[2])
import pipeline
batches = np.load(sys.argv[3])
print(json.dumps({"pipeline": pipeline.__file__, "predictions": {
    name: model.predict(batches[name]).to_dict(orient="list") for name in batches.files}}))
"""


def test_a_registered_model_is_code_not_a_pickle(tmp_path: Path, db: str, trained: dict,
                                                 perm_models: dict) -> None:
    """The version stores its model file and source, no pickle, and a fresh process with nothing
    of the project installed loads it from that source and infers the right tasks."""
    client = MlflowClient(db)
    v1 = perm_models["v1"]
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri("perm-model", str(v1)),
        dst_path=str(tmp_path / "download"), tracking_uri=db))
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".pkl", ".pickle")) or "pickle" in f], files
    assert {"MLmodel", "model_code.py", f"artifacts/{MODEL_JSON}", f"artifacts/{BANK_FILE}",
            "code/supsup/bank.py", "code/pipeline/tracking/pyfunc.py"} <= set(files)
    assert ((local / "model_code.py").read_text()
            == (REPO / "pipeline" / "tracking" / "model_code.py").read_text())
    flavour = Model.load(str(local / "MLmodel")).flavors["python_function"]
    assert flavour["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert Path(flavour["model_code_path"]).name == "model_code.py"
    assert "python_model" not in flavour and flavour["code"] == "code"

    tasks: PermutedTasks = trained["tasks"]
    batches = {str(t): _task_batch(tasks, t) for t in TASKS}
    np.savez(tmp_path / "batches.npz", **{t: x for t, (x, _) in batches.items()})
    env = {**os.environ, "MLFLOW_TRACKING_URI": db, "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "OMP_NUM_THREADS": "1",
           "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}  # MLflow would refuse any pickle
    env.pop("PYTHONPATH", None)
    (tmp_path / "elsewhere").mkdir()
    proc = subprocess.run(
        [sys.executable, "-S", "-c", _FRESH_LOAD, sysconfig.get_paths()["purelib"],
         f"models:/perm-model/{v1}", str(tmp_path / "batches.npz")],
        cwd=tmp_path / "elsewhere", env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    loaded_from = Path(out["pipeline"])
    assert loaded_from.parts[-3:] == ("code", "pipeline", "__init__.py")
    assert not loaded_from.is_relative_to(REPO)
    for t, (_, y) in batches.items():
        predicted = out["predictions"][t]
        assert predicted["task_id"] == [int(t)] * len(y), f"batch of task {t}"
        # as in test_registered_model_infers_the_right_task: ~77% after training, chance 10%
        assert (np.array(predicted["class"]) == y).mean() > 0.6


def _flip_data_byte(model_dir: Path, work: Path) -> None:
    """Flip the last byte of the `data` column chunk: inside the compressed masks, past every
    page header, so the file still opens and only its contents are wrong."""
    bank_file = model_dir / "artifacts" / BANK_FILE
    meta = pq.read_metadata(bank_file)
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    chunk = meta.row_group(0).column(names.index("data"))
    raw = bytearray(bank_file.read_bytes())
    raw[chunk.data_page_offset + chunk.total_compressed_size - 1] ^= 0xFF
    bank_file.write_bytes(bytes(raw))


def _rewrite_a_mask(model_dir: Path, work: Path) -> None:
    """Invert one byte of the first mask and write the file back, footer (checksums, snapshot)
    unchanged: a clean Parquet file whose masks are not the ones it records."""
    bank_file = model_dir / "artifacts" / BANK_FILE
    footer = {k: v for k, v in (pq.read_metadata(bank_file).metadata or {}).items()
              if k.startswith(b"supsup.")}
    table = pq.read_table(bank_file).replace_schema_metadata(footer)
    data = table.column("data").to_pylist()
    row = table.column("kind").to_pylist().index("mask")
    data[row] = bytes([data[row][0] ^ 0xFF]) + data[row][1:]
    index = table.schema.get_field_index("data")
    table = table.set_column(index, table.schema.field(index), pa.array(data, pa.binary()))
    pq.write_table(table, bank_file)


def _swap_the_bank(model_dir: Path, work: Path) -> None:
    """Replace the bank file by a valid export of the same bank whose task 1 holds task 2's
    masks: every checksum inside agrees with the masks, only the snapshot is not the model's."""
    bank_file = model_dir / "artifacts" / BANK_FILE
    registry = MaskRegistry(work / "registry")
    bank = import_file(registry, bank_file).bank
    (work / "registry" / bank / "tasks" / "task-0000001.parquet").unlink()
    other = registry.read_task(bank, 2)
    registry.write_task(bank, 1, other.packed, other.bn_stats or None)
    export_bank(registry, bank, bank_file, overwrite=True)


def _edit_model_json(field: str, rehash: bool = True) -> Callable[[Path, Path], None]:
    """Edit a hash in model.json; with `rehash`, also the description's hash in MLmodel (an
    editor who knows both), so only the loader's content checks can tell."""
    def edit(model_dir: Path, work: Path) -> None:
        import hashlib

        path = model_dir / "artifacts" / MODEL_JSON
        info = json.loads(path.read_text())
        info["source"][field] = "f" * 64
        path.write_text(json.dumps(info))
        if rehash:
            model = Model.load(str(model_dir / "MLmodel"))
            model.metadata["model_json_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            model.save(str(model_dir / "MLmodel"))

    return edit


@pytest.mark.parametrize("tamper, error, match", [
    pytest.param(_flip_data_byte, RegistryCorruptError, r"bank\.parquet: .*damaged",
                 id="flipped-byte"),
    pytest.param(_rewrite_a_mask, RegistryCorruptError,
                 r"bank\.parquet: checksum mismatch in the mask of layer", id="rewritten-mask"),
    pytest.param(_swap_the_bank, BankMismatchError,
                 r"bank 'perm' .*bank\.parquet: the masks there hash to \w+; .*refused",
                 id="swapped-bank"),
    pytest.param(_edit_model_json("snapshot_sha256"), BankMismatchError,
                 r"snapshot ffffffffffff\) in the bank file .*refused", id="model-json-snapshot"),
    pytest.param(_edit_model_json("manifest_sha256"), BankMismatchError,
                 r"manifest there hashes to \w+, not ffffffffffff", id="model-json-manifest"),
    pytest.param(_edit_model_json("snapshot_sha256", rehash=False), ValueError,
                 r"model\.json: model\.json hashes to \w+, but the model was registered with "
                 r"\w+; its description was edited after registration", id="model-json-edited"),
])
def test_a_tampered_model_folder_refuses_to_load(
        tmp_path: Path, db: str, perm_models: dict,
        tamper: Callable[[Path, Path], None], error: type[Exception], match: str) -> None:
    """A copy of the embedded version's folder, damaged or swapped, raises load_bank's error."""
    model_dir = tmp_path / "model"
    shutil.copytree(_model_dir(MlflowClient(db), "perm-model", perm_models["v1"]), model_dir)
    tamper(model_dir, tmp_path)
    with pytest.raises(error, match=match):
        mlflow.pyfunc.load_model(str(model_dir))


class _Planted:
    """Unpickling it opens (so creates) a file: a stand-in for any code a pickle can run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (self.path, "w")


def test_a_planted_pickle_is_never_run(tmp_path: Path, db: str, trained: dict,
                                       perm_models: dict) -> None:
    armed = pickle.dumps(_Planted(tmp_path / "control"))
    pickle.loads(armed).close()  # the payload does run when unpickled
    assert (tmp_path / "control").exists()
    model_dir = tmp_path / "model"
    shutil.copytree(_model_dir(MlflowClient(db), "perm-model", perm_models["v1"]), model_dir)
    marker = tmp_path / "MARKER"
    for name in ("python_model.pkl", f"artifacts/{BANK_FILE}.pkl"):
        (model_dir / name).write_bytes(pickle.dumps(_Planted(marker)))
    model = mlflow.pyfunc.load_model(str(model_dir))
    assert not marker.exists()
    x, _ = _task_batch(trained["tasks"], 2)
    assert (model.predict(x)["task_id"] == 2).all()


def test_swapped_model_artifacts_are_refused_by_the_pipeline_loader(
        tmp_path: Path, db: str, trained: dict, global_uri: str) -> None:
    """model.json and bank file of version 2 copied over version 1's: each agrees with the other,
    so only the version's snapshot tag, kept in the tracking store, tells."""
    registry, bank = trained["registry"], trained["bank"]
    tracker = Tracker(db, "swap")
    (tmp_path / "embed").mkdir()
    with tracker.run("train") as run_id:
        full = _register(tracker, run_id, "swap-model", registry, bank, tmp_path / "embed", [])
        part = _register(tracker, run_id, "swap-model", registry, bank, tmp_path / "embed", [],
                         task_ids=[0, 1])
    client = MlflowClient(db)
    target = _model_dir(client, "swap-model", full.version) / "artifacts"
    for name in (MODEL_JSON, BANK_FILE):
        shutil.copyfile(_model_dir(client, "swap-model", part.version) / "artifacts" / name,
                        target / name)
    with pytest.raises(BankMismatchError, match=rf"models:/swap-model/{full.version}: its "
                                                r"model.json names snapshot \w+, but the version "
                                                r"was registered with snapshot \w+"):
        load_bank_from_model(full.uri, db)
    # mlflow.pyfunc.load_model sees the artifacts only: the swapped model.json is not the one
    # whose hash the version's MLmodel records.
    with pytest.raises(ValueError, match=r"model\.json hashes to \w+, but the model was "
                                         r"registered with"):
        mlflow.pyfunc.load_model(full.uri)


def _register_in_process(db: str, root: str, barrier: Any, results: Any) -> None:
    """Child process: register bank 'same' of `root` as 'race-model' once the other is ready."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    tracker = Tracker(db, "race")
    with tracker.run("train") as run_id:
        source = export_bank(MaskRegistry(root), "same", None)
        barrier.wait(timeout=120)
        reg = register_bank(tracker, run_id, "race-model", source, aliases=["champion"])
    results.put((reg.version, reg.created))


def test_concurrent_registrations_of_one_content_leave_one_version(
        tmp_path: Path, server: str) -> None:
    import multiprocessing

    net = build_network(name="lenet", num_outputs=100, num_classes=10)
    registry = MaskRegistry(tmp_path / "registry")
    _write_bank(registry, "same", net, _random_masks(net, TASKS))
    Tracker(server, "race")  # the experiment exists before the racers start
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_register_in_process,
                         args=(server, str(tmp_path / "registry"), barrier, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    versions = MlflowClient(server).search_model_versions("name = 'race-model'")
    assert len(versions) == 1, [mv.version for mv in versions]
    kept = int(versions[0].version)
    assert [v for v, _ in outcomes] == [kept, kept]
    assert lookup("models:/race-model@champion", server)["version"] == kept


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


def test_register_checks_its_inputs(tmp_path: Path, db: str, trained: dict) -> None:
    registry, bank = trained["registry"], trained["bank"]
    tracker = Tracker(db, "perm")
    source = registry.source(bank)
    other = export_bank(registry, bank, tmp_path / "other.parquet", task_ids=[0])
    with tracker.run("bad") as run_id:
        with pytest.raises(ValueError, match=r"inference_defaults\['mode'\] = 'often'"):
            register_bank(tracker, run_id, "m", source, inference_defaults={"mode": "often"})
        with pytest.raises(ValueError, match="alias 'v2' is not allowed"):
            register_bank(tracker, run_id, "m", source, aliases=["ok", "v2"])
        with pytest.raises(ValueError, match="model name 'a/b' must be non-empty without"):
            register_bank(tracker, run_id, "a/b", source)
        with pytest.raises(FileNotFoundError, match="bank file .*missing.parquet"):
            register_bank(tracker, run_id, "m", source, bank_file=tmp_path / "missing.parquet")
        with pytest.raises(ValueError, match=r"bank file .*other.parquet does not hold"):
            register_bank(tracker, run_id, "m", source, bank_file=tmp_path / "other.parquet")
        with pytest.raises(ValueError, match="register a bank from its mask registry"):
            register_bank(tracker, run_id, "m",
                          other.with_location(export=str(tmp_path / "other.parquet")))
    assert MlflowClient(db).search_registered_models(filter_string="name = 'm'") == []


# ---------------------------------------------------------------------- mlflow server
@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 with a SQLite store (tests/pipeline/servers.py)."""
    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path) as running:
        yield running.url


def test_through_a_real_mlflow_server(tmp_path: Path, server: str) -> None:
    net = build_network(name="lenet", num_outputs=100, num_classes=10)
    registry = MaskRegistry(tmp_path / "registry")
    _write_bank(registry, "served", net, _random_masks(net, TASKS))
    tracker = Tracker(server, "served")
    with tracker.run("train") as run_id:
        tracker.log_params({"train.steps": 10})
        tracker.log_task_metrics(1, {"accuracy": 0.5})
        tracker.log_text("train:\n  steps: 10\n", "config.yaml")
        version = _register(tracker, run_id, "served-model", registry, "served", tmp_path,
                            ["prod"]).version
    client = MlflowClient(server)
    run = client.get_run(run_id)
    assert run.data.params == {"train.steps": "10"} and run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # the server stores them
    assert (tmp_path / "artifacts").is_dir()
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


# ------------------------------------------------- runs people can compare, the LoggedModel link
def test_run_names_say_experiment_job_tasks_density_and_time() -> None:
    from pipeline.tracking.runs import run_name

    when = 1_796_000_000.0  # 2026-11-30 ... UTC
    stamp = time.strftime("%m%dT%H%M", time.gmtime(when))
    assert run_name("quickstart", "run", 20, "threshold", when) == (
        f"quickstart-run-20tasks-threshold-{stamp}")
    assert run_name("p", "evaluate", 2500, 0.05, when) == f"p-evaluate-2500tasks-d0.05-{stamp}"
    assert run_name("p", "sweep", None, None, when) == f"p-sweep-{stamp}"
    assert len(run_name("x" * 400, "run", 1, None, when)) == 250  # MLflow's run-name limit


def test_a_version_links_its_logged_model_which_has_an_input_example(
        db: str, trained: dict, perm_models: dict, tmp_path: Path) -> None:
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    client = MlflowClient(db)
    v1 = perm_models["v1"]
    mv = client.get_model_version("perm-model", str(v1))
    # The version was made from the LoggedModel's own URI; SQL stores keep that as its source
    # (they do not store ModelVersion.model_id), and the LoggedModel names the version back.
    model_id = logged_model_id(mv)
    assert model_id is not None and mv.source == f"models:/{model_id}"
    logged = client.get_logged_model(model_id)
    assert logged.source_run_id == perm_models["run_1"]
    assert {"name": "perm-model", "version": v1} in json.loads(
        logged.tags[MLFLOW_MODEL_VERSIONS])
    # the input example is one row in the served form, and the model answers it
    model = Model.load(str(_model_dir(client, "perm-model", v1) / "MLmodel"))
    assert model.saved_input_example_info is not None
    example = model.load_input_example(str(_model_dir(client, "perm-model", v1)))
    width = int(np.prod(trained["net"].spec.input_shape))
    assert np.asarray(example).shape == (1, width)
    description = client.get_registered_model("perm-model").description
    assert f"rows of {width} floats" in description and "promotion" in description
    # the version says what its predict() takes: rows, the scales and their statistics, modes
    inputs = client.get_model_version("perm-model", str(v1)).description
    assert f"Inputs: rows of {width} numbers" in inputs and "'0-255'" in inputs
    assert "per_example" in inputs
