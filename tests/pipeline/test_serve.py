"""Tests for pipeline.serve: `supsup serve` of a registered version on real Ray Serve (loopback).

Run under /work/shared/offline-run. Masks are trained on 3 permuted tasks of the bundled MNIST
digits and registered through the real mask registry and a SQLite MLflow store; the command runs
as its own process (its own local Ray), and the tests talk to it over HTTP as a client would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.datasets import load_dataset
from pipeline.registry import MaskRegistry, export_bank, load_bank
from pipeline.serve.answer import Answerer
from pipeline.serve.contract import InputError, as_batch, normalize, read_params
from pipeline.tracking import Tracker, register_bank
from supsup.masks import pack_bits
from supsup.networks import build_network
from supsup.scores import TaskScores
from supsup.tasks import PermutedTasks
from supsup.train import TrainConfig, train_group
from tests.pipeline.servers import Guarded, _tail, free_port, stop_group

pytestmark = pytest.mark.cluster

MASK_INFO = {"rule": "threshold", "dataset": "mnist-bundled"}
TASKS = [0, 1, 2]
REPO = Path(__file__).resolve().parents[2]
MODEL = "served"
SECRET = 123.456789  # a pixel value no answer may quote


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict[str, Any]:
    """3 permuted MNIST tasks with masks trained for 200 steps (single images then find their
    task well), stored in a registry bank, plus a bank of random masks to be damaged."""
    train, test = load_dataset("mnist-bundled")
    tasks = PermutedTasks(train, test, num_tasks=3, seed=0)
    net = build_network(name="lenet", num_outputs=100, num_classes=10)
    result = train_group(net, tasks, TASKS, TrainConfig(steps=200, batch_size=64, lr=3e-3,
                                                        optimizer="adam"))
    root = tmp_path_factory.mktemp("registry")
    registry = MaskRegistry(root)
    for bank, masks in (("perm", {t: result.masks[t] for t in TASKS}),
                        ("doomed", {t: m for t, (m, _) in TaskScores(net, [0, 1]).export()
                                    .items()})):
        registry.create_bank(bank, net.spec, net.layer_shapes(), net.bn_features(), MASK_INFO)
        for t, layer_masks in masks.items():
            registry.write_task(bank, t, {k: pack_bits(m).numpy()
                                          for k, m in layer_masks.items()})
    return {"net": net, "tasks": tasks, "registry": registry, "root": root}


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory, trained: dict) -> dict[str, Any]:
    """MODEL embeds bank perm with the evaluation's mode one_image recorded (as versions were
    registered before per_example became the served default); "fresh" holds the same bank as
    `supsup train` registers it now (no mode: the model's default); "doomed" pins its bank in
    the registry."""
    db = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    tracker = Tracker(db, "serve")
    registry = trained["registry"]
    embed = tmp_path_factory.mktemp("export") / "perm.parquet"
    with tracker.run("train") as run_id:
        source = export_bank(registry, "perm", embed)
        reg = register_bank(tracker, run_id, MODEL, source, bank_file=embed,
                            inference_defaults={"method": "one_shot", "mode": "one_image"})
        fresh = register_bank(tracker, run_id, "fresh", source, bank_file=embed,
                              inference_defaults={"method": "one_shot", "objective": "entropy"})
        doomed = register_bank(tracker, run_id, "doomed", export_bank(registry, "doomed", None))
    return {"db": db, "uri": f"models:/{MODEL}/{reg.version}", "source": source,
            "fresh": f"models:/fresh/{fresh.version}",
            "doomed": f"models:/doomed/{doomed.version}"}


def _raw_pixels(tasks: PermutedTasks, task_id: int, n: int) -> np.ndarray:
    """The first n test images of a task as the 0-255 pixels a client sends, (n, 784)."""
    x, _ = tasks.get(task_id, "test", torch.arange(n))
    return np.rint((x.reshape(n, -1).numpy() * 0.3081 + 0.1307) * 255)


class Server:
    """A running `supsup serve` process: its URL and its log."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log


def _start_serving(uri: str, db: str, work: Path, env: dict[str, str],
                   *extra: str) -> Server:
    """`supsup serve URI` as its own process (in a group of its own, stopped if this process
    dies), once it prints where it serves."""
    log, port = work / "serve.log", free_port()
    cmd = [str(Path(sys.executable).parent / "supsup"), "serve", uri, "--tracking-uri", db,
           "--set", f"serve.port={port}", *extra]
    proc = Guarded(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=work, env=env)
    deadline = time.monotonic() + 300
    while "serving models:/" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_group(proc)
            raise RuntimeError(f"supsup serve did not start (exit {proc.poll()}):\n{_tail(log)}")
        time.sleep(0.5)
    return Server(proc, f"http://127.0.0.1:{port}", log)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, registered: dict) -> Iterator[Server]:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("RAY_ADDRESS", None)
    served = _start_serving(registered["uri"], registered["db"], tmp_path_factory.mktemp("serve"),
                            env, "--set", "serve.max_batch_size=8",
                            "--set", "serve.batch_wait_timeout_s=0.05",
                            "--set", "serve.max_rows_per_request=64", "--set", "cluster.num_cpus=2")
    try:
        yield served
    finally:
        stop_group(served.proc, seconds=60, first=signal.SIGINT)


def _call(url: str, body: bytes | None = None, timeout: float = 120) -> tuple[int, Any, bytes]:
    """(status, parsed JSON or None, raw body) of GET (no body) or POST `body`."""
    request = urllib.request.Request(url, data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw), raw
    except ValueError:
        return status, None, raw


def _post(server: Server, payload: Any) -> tuple[int, Any, bytes]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return _call(f"{server.url}/invocations", body)


def _reference(trained: dict, registered: dict, raw: np.ndarray) -> Any:
    """What the shared Answerer gives in-process for these 0-255 pixels."""
    bank, spec = load_bank(registered["source"])
    x = normalize(as_batch(raw, spec.input_shape), "0-255",
                  {"mean": [0.1307], "std": [0.3081]})
    return Answerer(build_network(spec), bank).answer(x)


# --------------------------------------------------------------------------- the contract
def test_the_input_contract_names_what_is_wrong() -> None:
    shape = (1, 28, 28)
    norm = {"dataset": "mnist-bundled", "mean": [0.1307], "std": [0.3081]}
    x = as_batch(np.full((2, 784), 0.5, dtype=np.float64), shape)  # float64 is cast
    assert x.dtype == torch.float32 and x.shape == (2, 1, 28, 28)
    with pytest.raises(InputError, match=r"shape \(2, 783\); expected \(B, 784\)"):
        as_batch(np.zeros((2, 783)), shape)
    with pytest.raises(InputError, match="inputs have shape of 40 dimensions; expected"):
        as_batch(np.zeros((1,) * 40), shape)
    with pytest.raises(InputError, match="ragged rows or non-numbers"):
        as_batch([[1.0] * 784, [1.0] * 3], shape)
    with pytest.raises(InputError, match="NaN or infinite"):
        as_batch(np.full((1, 784), np.nan), shape)
    raw = torch.full((1, 1, 28, 28), 255.0)
    with pytest.raises(InputError, match=r"input_scale='normalized'; send input_scale='0-255'"):
        normalize(raw, "normalized", norm)
    with pytest.raises(InputError, match=r"input_scale='0-1'; send input_scale='0-255'"):
        normalize(raw, "0-1", norm)
    white = torch.full_like(raw, (1 - 0.1307) / 0.3081)
    assert torch.allclose(normalize(raw, "0-255", norm), white)
    normalize(raw / 255 * 2.8 - 0.4, "normalized", None)  # no statistics recorded: not checked
    with pytest.raises(InputError, match="does not record the normalisation"):
        normalize(raw, "0-255", None)
    assert read_params(None, {"mode": "batch"}).mode == "batch"
    assert read_params({"mode": None}, {}).mode == "per_example"  # the served default
    with pytest.raises(InputError, match=r"unknown param 'x{30,40}\.\.\.'; known"):
        read_params({"x" * 500: "1"}, {})


def test_the_mlflow_model_answers_per_example_and_takes_float64(trained: dict,
                                                                 registered: dict) -> None:
    """The MLflow model behind `mlflow models serve`: per_example by default (a batch of two
    tasks gets both), float64 passes its schema, raw digits sent as normalised are refused."""
    raw = np.concatenate([_raw_pixels(trained["tasks"], 0, 8), _raw_pixels(trained["tasks"], 2, 8)])
    mlflow.set_tracking_uri(registered["db"])
    try:
        model = mlflow.pyfunc.load_model(registered["fresh"])
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    out = model.predict(raw.astype(np.float64), params={"input_scale": "0-255"})
    expected = _reference(trained, registered, raw)
    assert out["task_id"].tolist() == expected.task_ids.tolist()
    assert out["class"].tolist() == expected.classes.tolist()
    assert set(out["task_id"][:8]) != set(out["task_id"][8:])  # not one task for the batch
    with pytest.raises(ValueError, match="input_scale='normalized'"):
        model.predict(raw)


# --------------------------------------------------------------------------- supsup serve
def test_health_names_the_version_and_snapshot(server: Server, registered: dict) -> None:
    status, body, _ = _call(f"{server.url}/health")
    assert status == 200, body
    assert body["model_uri"] == registered["uri"]
    assert body["snapshot"] == registered["source"].snapshot_sha256
    assert body["tasks"] == len(TASKS) and isinstance(body["replica_pid"], int)


def test_a_mixed_batch_gets_each_examples_task(server: Server, trained: dict,
                                               registered: dict) -> None:
    """8 images of task 0 then 8 of task 2 in one request, and the same 16 as concurrent
    single-image requests (batched together by the server): each row gets the task and class
    the in-process answer gives, and those are mostly the true tasks. The version recorded
    mode one_image; `supsup serve` still answers each row on its own unless asked."""
    raw = np.concatenate([_raw_pixels(trained["tasks"], 0, 8), _raw_pixels(trained["tasks"], 2, 8)])
    truth = [0] * 8 + [2] * 8
    expected = _reference(trained, registered, raw)
    status, body, _ = _post(server, {"inputs": raw.tolist(), "params": {"input_scale": "0-255"}})
    assert status == 200, body
    rows = body["predictions"]
    assert [r["task_id"] for r in rows] == expected.task_ids.tolist()
    assert [r["class"] for r in rows] == expected.classes.tolist()
    assert np.allclose([r["confidence"] for r in rows], expected.confidence.numpy(), atol=1e-4)
    # 200 training steps: one image finds its task well among 3 (chance: 1/3)
    assert sum(r["task_id"] == t for r, t in zip(rows, truth)) >= 13, rows
    status, body, _ = _post(server, {"inputs": raw.tolist(),  # the paper's protocol, if asked
                                     "params": {"input_scale": "0-255", "mode": "one_image"}})
    assert status == 200, body
    assert {r["task_id"] for r in body["predictions"]} == {int(expected.task_ids[0])}

    answers: dict[int, Any] = {}

    def one(i: int) -> None:
        answers[i] = _post(server, {"inputs": raw[i:i + 1].tolist(),
                                    "params": {"input_scale": "0-255"}})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(raw))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(answers) == list(range(len(raw)))
    status, health, _ = _call(f"{server.url}/health")
    # 16 requests at once, batches of at most 8 gathered over 50 ms: some pass held several
    assert status == 200 and 2 <= health["largest_batch"] <= 8, health
    for i, (status, body, _) in sorted(answers.items()):
        assert status == 200, body
        assert body["predictions"][0]["task_id"] == int(expected.task_ids[i]), i
        assert body["predictions"][0]["class"] == int(expected.classes[i]), i


@pytest.mark.parametrize("payload, named", [
    ({"inputs": [[SECRET] * 783]}, r"inputs have shape \(1, 783\); expected \(B, 784\)"),
    ({"inputs": [["x"] * 784]}, "inputs must be numbers"),
    ({"inputs": [[SECRET] * 784]}, r"input_scale='normalized'; send input_scale='0-255'"),
    ({"inputs": [[0.5] * 784], "params": {"mode": "z" * 5000}}, r"param mode='z{30}"),
    ({"inputs": [[0.5] * 784], "params": {"colour": "red"}}, "unknown param 'colour'"),
    ({"inputs": [[0.5] * 784] * 65}, "above serve.max_rows_per_request=64"),
    ({"pixels": [[SECRET] * 784]}, r"unknown field\(s\) \['pixels'\]"),
    ([[SECRET] * 784], "must be a JSON object"),
    (b"{'inputs': [123.456789]}", "not JSON"),
])
def test_bad_input_is_a_named_400_that_does_not_echo_it(server: Server, payload: Any,
                                                        named: str) -> None:
    import re

    status, body, raw = _post(server, payload)
    assert status == 400, raw[:300]
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert re.search(named, body["message"]), body["message"]
    assert b"123.456" not in raw and b"z" * 50 not in raw and len(raw) < 1000


def test_a_killed_replica_is_restarted_and_answers_again(server: Server, trained: dict) -> None:
    """SIGKILL the replica process that holds the bank: Ray Serve starts another, and requests
    sent meanwhile are answered (sent again by the front) or get a 503 naming the restart."""
    status, body, _ = _call(f"{server.url}/health")
    assert status == 200, body
    victim = body["replica_pid"]
    os.kill(victim, signal.SIGKILL)
    raw = _raw_pixels(trained["tasks"], 1, 1)
    payload = {"inputs": raw.tolist(), "params": {"input_scale": "0-255"}}
    seen: list[int] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status, body, raw_body = _post(server, payload)
        seen.append(status)
        if status == 200:
            break
        assert status == 503 and body["error_code"] == "REPLICA_UNAVAILABLE", raw_body[:300]
        time.sleep(1)
    assert seen[-1] == 200, f"no answer after the kill: {seen}\n{_tail(server.log)}"
    print(f"statuses after the kill: {seen}")
    status, body, _ = _call(f"{server.url}/health")
    assert status == 200 and body["replica_pid"] != victim, body


def test_a_version_whose_snapshot_is_gone_is_refused(trained: dict, registered: dict,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Task 1 of the registry-backed version's bank is deleted: `supsup serve` says which bank
    and exits 2 before serving anything."""
    (Path(trained["root"]) / "doomed" / "tasks" / "task-0000001.parquet").unlink()
    code = main(["serve", registered["doomed"], "--tracking-uri", registered["db"],
                 "--set", f"serve.port={free_port()}"])
    err = capsys.readouterr()
    assert code == 2, err
    assert "serving" not in err.out
    line = err.err.strip().splitlines()[-1]
    assert line.startswith("error: ") and "bank 'doomed'" in line
    assert "no longer holds" in line, line


def test_serve_has_its_own_help_and_checks_its_settings(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--help"]) == 0
    text = capsys.readouterr().out
    for word in ("MODEL_URI", "--tracking-uri", "--set", "--address", "/invocations", "/health"):
        assert word in text, word
    db = f"sqlite:///{tmp_path / 'none.db'}"
    assert main(["serve", "models:/m/1", "--tracking-uri", db,
                 "--set", "serve.max_batch_size=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --set") and "serve.max_batch_size" in err
    assert "greater than" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "none.db").exists()  # refused before anything was opened
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "models:/m/1", "--tracking-uri", db,
                     "--set", f"serve.port={port}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: serve.port {port} on 127.0.0.1 is not free"), err
    assert not (tmp_path / "none.db").exists()


def test_serve_joins_a_cluster_and_leaves_it_running(tmp_path: Path, registered: dict) -> None:
    """With --address, the application runs on a `ray start --head` cluster; Ctrl-C deletes the
    application and leaves the cluster (and its Serve) running."""
    bin_dir = Path(sys.executable).parent
    root = tempfile.mkdtemp(prefix="sv", dir="/tmp")  # short: socket paths have a length limit
    env = {**os.environ, "RAY_TMPDIR": root, "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    address = f"127.0.0.1:{free_port()}"
    head = Guarded([str(bin_dir / "ray"), "start", "--head", f"--port={address.split(':')[1]}",
                    "--node-ip-address=127.0.0.1", "--num-cpus=2",
                    "--object-store-memory=200000000", "--include-dashboard=false",
                    f"--dashboard-agent-listen-port={free_port()}",
                    f"--dashboard-agent-grpc-port={free_port()}",
                    f"--runtime-env-agent-port={free_port()}",
                    f"--metrics-export-port={free_port()}", "--disable-usage-stats", "--block"],
                   env=env, stdout=(tmp_path / "head.log").open("wb"), stderr=subprocess.STDOUT)
    try:
        served = _start_serving(registered["uri"], registered["db"], tmp_path, env,
                                "--address", address)
        try:
            status, body, _ = _call(f"{served.url}/health")
            assert status == 200 and body["model_uri"] == registered["uri"], body
        finally:
            stop_group(served.proc, seconds=60, first=signal.SIGINT)
        assert served.proc.returncode == 0, _tail(served.log)
        assert "stopped serving" in served.log.read_text()
        probe = ("import ray\nfrom ray import serve\nray.init()\n"
                 "print('apps', sorted(serve.status().applications))\n")
        done = subprocess.run([sys.executable, "-c", probe], env={**env, "RAY_ADDRESS": address},
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "apps []" in done.stdout, done.stdout  # the cluster is up, the app is gone
    finally:
        stop_group(head, seconds=30)
        shutil.rmtree(root, ignore_errors=True)


def test_a_bank_served_by_shards_answers_like_the_whole_bank(tmp_path: Path, trained: dict,
                                                              registered: dict) -> None:
    """serve.shards=2: the replica holds no masks itself; two actors hold a task range each and
    the answers equal the whole bank's. Options only a whole bank answers are named 400s."""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("RAY_ADDRESS", None)
    served = _start_serving(registered["uri"], registered["db"], tmp_path, env,
                            "--set", "serve.shards=2", "--set", "cluster.num_cpus=2")
    try:
        raw = np.concatenate([_raw_pixels(trained["tasks"], 0, 6),
                              _raw_pixels(trained["tasks"], 2, 6)])
        expected = _reference(trained, registered, raw)
        status, body, _ = _post(served, {"inputs": raw.tolist(),
                                         "params": {"input_scale": "0-255"}})
        assert status == 200, body
        rows = body["predictions"]
        assert [r["task_id"] for r in rows] == expected.task_ids.tolist()
        assert [r["class"] for r in rows] == expected.classes.tolist()
        status, health, _ = _call(f"{served.url}/health")
        assert status == 200 and health["shards"] == 2, health
        status, body, _ = _post(served, {"inputs": raw[:2].tolist(), "params": {
            "input_scale": "0-255", "mode": "one_image"}})
        assert status == 400 and "served by shards" in body["message"], body
    finally:
        stop_group(served.proc, seconds=60, first=signal.SIGINT)
