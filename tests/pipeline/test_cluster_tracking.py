"""MLflow at cluster scale: a real `mlflow server` on PostgreSQL, a server that is not there, and
drivers that create one new SQLite store at the same instant.

Run under /work/shared/offline-run: the database, the server and the client share its loopback.
Every test starts and stops the servers it needs (tests/pipeline/servers.py).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.registry import MaskRegistry
from pipeline.tracking import MODEL_JSON, Tracker
from tests.pipeline.servers import free_port, mlflow_on_postgres, postgres_bin

pytestmark = pytest.mark.cluster

NAME = "clusterbank"
TASKS = [0, 1, 2, 3]


def _write_config(root: Path, tracking_uri: str | None) -> Path:
    """A tiny experiment: lenet on 4 permuted tasks, 20 steps each, 2 test batches per task."""
    path = root / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "name": NAME,
        "output_dir": str(root / "runs"),
        "network": {"name": "lenet", "num_outputs": 100},
        "tasks": {"family": "permuted", "num_tasks": len(TASKS)},
        "train": {"steps": 20, "group_size": 2, "log_every": 10},
        "evaluate": {"group_size": 2, "curve_points": 0, "max_batches": 2},
        "registry": {"root": str(root / "registry")},
        "tracking": {"alias": "champion", "promote_if": "accuracy_gg>=0",
                     **({"uri": tracking_uri} if tracking_uri else {})},
    }))
    return path


@pytest.mark.slow
@pytest.mark.skipif(postgres_bin() is None, reason="PostgreSQL (initdb, pg_ctl) not installed")
def test_run_lookup_and_evaluate_through_mlflow_server_on_postgres(
        ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with mlflow_on_postgres(tmp_path / "server") as (server, db):
        config_path = _write_config(tmp_path, server.url)
        config = load_config(config_path)
        assert main(["run", str(config_path)]) == 0

        client = MlflowClient(server.url)
        champion = client.get_model_version_by_alias(NAME, "champion")
        assert champion.version == "1"

        capsys.readouterr()
        assert main(["lookup", f"models:/{NAME}@champion", "--tracking-uri", server.url,
                     "--format", "json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["bank"] == NAME and info["version"] == 1 and info["tasks"] == TASKS
        assert info["aliases"] == ["champion"] and len(info["snapshot"]) == 64

        assert main(["evaluate", f"models:/{NAME}/1", "--tracking-uri", server.url]) == 0
        report = json.loads((config.run_dir / "evaluation" / "report.json").read_text())
        assert [r["task_id"] for r in report["tasks"]] == TASKS
        assert report["summary"]["tasks"] == len(TASKS)
        # 20 steps leave weak masks (train accuracy well under 75%), yet one image's entropy
        # still picks the right one of 4 masks nearly always; chance is 1/4.
        assert report["summary"]["task_inference_accuracy"] >= 0.9

        experiment = client.get_experiment_by_name(NAME)
        runs = client.search_runs([experiment.experiment_id])
        jobs = sorted(r.data.tags["job"] for r in runs)
        assert jobs == ["evaluate", "evaluate", "register", "run", "train"], jobs  # run: parent
        assert {r.info.status for r in runs} == {"FINISHED"}
        by_model = [r for r in runs if r.data.tags.get("model_uri") == f"models:/{NAME}/1"]
        assert len(by_model) == 1 and by_model[0].data.tags["model_version"] == "1"
        assert by_model[0].data.metrics["task_inference_accuracy"] == pytest.approx(
            report["summary"]["task_inference_accuracy"])
        assert champion.run_id in {r.info.run_id for r in runs if r.info.run_name == "register"}

        # The server, not the client, stored every artifact, under its --artifacts-destination.
        assert all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in runs)
        stored = {p.name for p in server.artifacts.rglob("*") if p.is_file()}
        assert {"config.yaml", "report.json", MODEL_JSON} <= stored, sorted(stored)

        # ... and PostgreSQL holds the runs and the model version.
        with psycopg.connect(host=db.host, port=db.port, user=db.user, dbname=db.database,
                             connect_timeout=10) as conn:
            assert conn.execute("SELECT count(*) FROM runs WHERE experiment_id = %s",
                                (int(experiment.experiment_id),)).fetchone() == (5,)
            assert conn.execute("SELECT version FROM model_versions WHERE name = %s",
                                (NAME,)).fetchall() == [(1,)]


def test_unreachable_server_fails_fast_and_trains_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config_path = _write_config(tmp_path, None)
    code = main(["train", str(config_path), "--set", f"tracking.uri={uri}"])
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert uri in errors[0] and "connection refused" in errors[0]
    # the one GET of the health check answered it, not MLflow's client with its retries
    assert f"GET {uri}/health failed" in errors[0] and "retries" not in errors[0]
    assert "tracking.uri" in errors[0] and "MLFLOW_TRACKING_URI" in errors[0]
    root = tmp_path / "registry"
    assert not root.exists() or MaskRegistry(root).banks() == []


def _open_tracker(uri: str, barrier: Any, results: Any) -> None:
    """Child process: open a Tracker on `uri` the moment the other child is ready too."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    try:
        barrier.wait(timeout=120)
        results.put(("ok", Tracker(uri, "race").experiment_id))
    except BaseException as exc:  # the parent reports what went wrong in the child
        results.put(("error", repr(exc)))
        raise


def test_two_drivers_create_one_new_sqlite_store_at_once(tmp_path: Path) -> None:
    db = tmp_path / "fresh" / "mlflow.db"  # neither the file nor its folder exists yet
    uri = f"sqlite:///{db}"
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_open_tracker, args=(uri, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=180) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
                p.join()
    assert [status for status, _ in outcomes] == ["ok", "ok"], outcomes
    assert [p.exitcode for p in procs] == [0, 0]
    experiments = MlflowClient(uri).search_experiments(filter_string="name = 'race'")
    assert len(experiments) == 1
    assert {experiment_id for _, experiment_id in outcomes} == {experiments[0].experiment_id}
