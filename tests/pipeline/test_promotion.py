"""Promotion and comparable runs, through the `supsup` command on real Ray, a real MLflow SQLite
store and real files: registration moves only the latest alias, champion moves only when a
promotion is asked for (`supsup promote`, `evaluate --promote-if`, `tracking.promote_if`)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.tracking.promotion import PROMOTED_BY_TAG, PROMOTION_TAG

pytestmark = pytest.mark.slow
NAME = "promo"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("promotion")
    (root / "exp.yaml").write_text(yaml.safe_dump({
        "name": NAME,
        "output_dir": str(root / "runs"),
        "network": {"name": "fc", "num_outputs": 10, "hidden": [32]},
        "tasks": {"family": "permuted", "num_tasks": 2},
        "train": {"steps": 40, "group_size": 2, "log_every": 10},
        "evaluate": {"group_size": 2, "curve_points": 0, "max_batches": 2},
        "registry": {"root": str(root / "registry")},
        "tracking": {"latest_alias": "newest", "promote_if": "accuracy_gg>=0"},
    }))
    return root


@pytest.fixture(scope="module")
def two_versions(ray_local: None, project: Path) -> dict:
    """`supsup run` on 2 tasks (version 1, promoted by its evaluation), then `supsup train` on
    4 tasks (version 2, never evaluated)."""
    config_path = str(project / "exp.yaml")
    printed = [io.StringIO(), io.StringIO()]
    with contextlib.redirect_stdout(printed[0]):
        assert main(["run", config_path]) == 0
    with contextlib.redirect_stdout(printed[1]):
        assert main(["train", config_path, "--set", "tasks.num_tasks=4"]) == 0
    config = load_config(config_path)
    return {"path": config_path, "config": config, "uri": config.tracking_uri,
            "client": MlflowClient(config.tracking_uri),
            "printed": [p.getvalue() for p in printed]}


def _alias(client: MlflowClient, alias: str) -> int:
    return int(client.get_model_version_by_alias(NAME, alias).version)


def _runs(client: MlflowClient, uri: str) -> list:
    exp = client.get_experiment_by_name(NAME)
    return client.search_runs([exp.experiment_id])


def test_registration_moves_latest_and_only_promotion_moves_champion(
        two_versions: dict, capsys: pytest.CaptureFixture[str]) -> None:
    client, uri = two_versions["client"], two_versions["uri"]
    assert _alias(client, "newest") == 2  # each new version takes the latest alias
    assert _alias(client, "champion") == 1  # the run promoted v1; registering v2 did not move it
    v1 = client.get_model_version(NAME, "1")
    evaluation = json.loads(v1.tags[PROMOTION_TAG + "champion"])
    assert evaluation["rule"] == "accuracy_gg>=0" and evaluation["previous_version"] is None
    assert v1.tags[PROMOTED_BY_TAG] == evaluation["evaluation_run"]
    assert "Promoted to @champion" in v1.description
    assert evaluation["evaluation_run"] in v1.description
    promoted_by = client.get_run(evaluation["evaluation_run"])
    assert promoted_by.data.tags["promoted"] == f"models:/{NAME}/1@champion"
    assert evaluation["metrics"]["accuracy_gg"] == pytest.approx(
        promoted_by.data.metrics["accuracy_gg"])

    # a condition the evaluation does not meet: evaluated, not promoted, said so, exit 1
    capsys.readouterr()
    assert main(["evaluate", f"models:/{NAME}/2", "--tracking-uri", uri,
                 "--promote-if", "accuracy_gg > 1"]) == 1
    out = capsys.readouterr().out
    assert "not promoted: accuracy_gg" in out and "does not meet accuracy_gg>1" in out
    assert _alias(client, "champion") == 1
    assert PROMOTED_BY_TAG not in client.get_model_version(NAME, "2").tags

    # a condition it meets: champion moves to v2, and v2 says which evaluation moved it
    assert main(["evaluate", f"models:/{NAME}/2", "--tracking-uri", uri,
                 "--promote-if", "task_inference_accuracy >= 0.0"]) == 0
    out = capsys.readouterr().out
    assert "promoted: task_inference_accuracy" in out
    assert _alias(client, "champion") == 2 and _alias(client, "newest") == 2
    v2 = client.get_model_version(NAME, "2")
    record = json.loads(v2.tags[PROMOTION_TAG + "champion"])
    assert record["previous_version"] == 1 and record["rule"] == "task_inference_accuracy>=0"
    run = client.get_run(record["evaluation_run"])
    assert run.data.tags["evaluated_model"] == f"models:/{NAME}/2"
    assert record["metrics"]["task_inference_accuracy"] == pytest.approx(
        run.data.metrics["task_inference_accuracy"])
    assert record["evaluation_run"] in v2.description

    # by hand: back to v1, naming v1's newest evaluation as the evidence
    assert main(["promote", f"models:/{NAME}/1", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert f"models:/{NAME}@champion -> version 1 (was 2;" in out
    assert _alias(client, "champion") == 1
    assert json.loads(client.get_model_version(NAME, "1").tags[PROMOTION_TAG + "champion"])[
        "rule"] is None
    # a later evaluation replaces the evaluation summary; the promotions stay in the description
    assert main(["evaluate", f"models:/{NAME}/1", "--tracking-uri", uri]) == 0
    described = client.get_model_version(NAME, "1").description.split("\n\n")
    latest = client.search_runs([client.get_experiment_by_name(NAME).experiment_id],
                                order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert latest.info.run_id in described[0] and len(described) == 4
    assert described[1].startswith("Inputs: rows of 784 numbers")  # what predict() takes stays
    assert described[2].startswith("Promoted to @champion on") and "meeting accuracy_gg>=0" in \
        described[2]
    assert described[3].startswith("Promoted to @champion on") and "by evaluate run" in \
        described[3]


def test_the_commands_say_where_the_newest_and_the_promoted_version_are(
        two_versions: dict) -> None:
    run, train = two_versions["printed"]
    assert "promoted: accuracy_gg " in run and "meets accuracy_gg>=0" in run
    assert f"model: models:/{NAME}@newest (version 1)" in run
    assert f"promoted: models:/{NAME}@champion (version 1)" in run
    assert f"model: models:/{NAME}@newest (version 2)" in train
    assert f"promote it with `supsup promote models:/{NAME}/2 --tracking-uri " in train


def test_bad_promotion_rules_fail_before_anything_runs(
        two_versions: dict, capsys: pytest.CaptureFixture[str]) -> None:
    client, uri = two_versions["client"], two_versions["uri"]
    before = len(_runs(client, uri))
    capsys.readouterr()
    assert main(["evaluate", f"models:/{NAME}/2", "--tracking-uri", uri,
                 "--promote-if", "accuracy_gg => 0.9"]) == 2
    err = capsys.readouterr().err
    assert "error: promotion rule 'accuracy_gg => 0.9' is not METRIC OP NUMBER" in err
    assert main(["evaluate", f"models:/{NAME}/2", "--tracking-uri", uri,
                 "--promote-if", "acuracy_gn>=0.9"]) == 2
    err = capsys.readouterr().err
    assert "'acuracy_gn'" in err and "available: accuracy_gg, accuracy_gn," in err
    assert main(["evaluate", two_versions["path"], "--promote-if", "accuracy_gn>=0.9"]) == 2
    assert "promotes a model version" in capsys.readouterr().err
    assert main(["promote", f"models:/{NAME}/2", "--alias", "v3", "--tracking-uri", uri]) == 2
    assert "alias 'v3' is not allowed" in capsys.readouterr().err
    assert len(_runs(client, uri)) == before  # no evaluation was started
    assert _alias(client, "champion") == 1


def test_runs_are_named_and_log_the_params_and_curve_they_used(two_versions: dict) -> None:
    client, uri, config = two_versions["client"], two_versions["uri"], two_versions["config"]
    runs = _runs(client, uri)
    parent = next(r for r in runs if r.data.tags.get("job") == "run")
    assert parent.info.run_name.startswith(f"{NAME}-run-2tasks-threshold-")
    assert parent.data.params == config.flat_params()  # the resolved config's used keys
    assert parent.data.params["tasks.family"] == "permuted"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {r.info.run_name for r in children} == {"train", "register", "evaluate"}
    train = next(r for r in children if r.info.run_name == "train")
    for params in (parent.data.params, train.data.params):
        assert "tasks.degrees" not in params and "tasks.classes_per_task" not in params
        assert "train.momentum" not in params and "train.density" not in params
        assert params["train.steps"] == "40"
    # the training curve: step is the training step, one point per log_every
    history = client.get_metric_history(train.info.run_id, "train_curve/loss_tasks_0-1")
    assert [m.step for m in history] == [10, 20, 30, 40]
    accuracy = client.get_metric_history(train.info.run_id, "train_curve/accuracy_tasks_0-1")
    assert [m.step for m in accuracy] == [10, 20, 30, 40]
    assert all(0.0 <= m.value <= 1.0 for m in accuracy)
    # the standalone train run of version 2 trained tasks 2-3 only
    later = [r for r in runs if r.data.tags.get("job") == "train"
             and "mlflow.parentRunId" not in r.data.tags]
    assert len(later) == 1
    steps = client.get_metric_history(later[0].info.run_id, "train_curve/loss_tasks_2-3")
    assert [m.step for m in steps] == [10, 20, 30, 40]


def test_the_version_is_linked_to_its_logged_model_and_described(two_versions: dict) -> None:
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    client = two_versions["client"]
    for version in (1, 2):
        mv = client.get_model_version(NAME, str(version))
        assert mv.source.startswith("models:/m-")  # made from the LoggedModel's URI
        logged = client.get_logged_model(mv.source.removeprefix("models:/"))
        assert logged.source_run_id == mv.run_id
        assert {"name": NAME, "version": version} in json.loads(
            logged.tags[MLFLOW_MODEL_VERSIONS])
        files = {f.path for f in client.list_logged_model_artifacts(logged.model_id)}
        assert {"input_example.json", "serving_input_example.json"} <= files
    assert "rows of 784 floats" in client.get_registered_model(NAME).description


def test_a_version_that_cannot_load_is_not_promoted(
        two_versions: dict, capsys: pytest.CaptureFixture[str]) -> None:
    client, uri = two_versions["client"], two_versions["uri"]
    mv = client.get_model_version(NAME, "2")
    folder = Path(client.get_logged_model(mv.source.removeprefix("models:/")).artifact_location
                  .removeprefix("file://"))
    bank = next(folder.rglob("bank.parquet"))
    saved = bank.read_bytes()
    bank.unlink()
    try:
        capsys.readouterr()
        assert main(["promote", f"models:/{NAME}/2", "--tracking-uri", uri]) == 2
        err = capsys.readouterr().err
        assert f"error: models:/{NAME}/2 cannot load its bank, so @champion is not moved" in err
        assert _alias(client, "champion") == 1
    finally:
        bank.write_bytes(saved)


@pytest.mark.parametrize(("text", "metrics", "holds"), [
    ("accuracy_gn>=0.9", {"accuracy_gn": 0.9}, True),
    (" accuracy_gn > 0.9 ", {"accuracy_gn": 0.9}, False),
    ("accuracy_gg<=1e-1", {"accuracy_gg": 0.05}, True),
    ("tasks==2500", {"tasks": 2500.0}, True),
    ("task_inference_accuracy<.5", {"task_inference_accuracy": 0.5}, False),
])
def test_a_rule_compares_one_metric_with_one_number(text: str, metrics: dict,
                                                    holds: bool) -> None:
    from pipeline.promotion_rule import parse_rule

    assert parse_rule(text).check(metrics) is holds


@pytest.mark.parametrize("text", [
    "accuracy_gn", "accuracy_gn>=", ">=0.9", "accuracy_gn=>0.9", "accuracy_gn>=0.9 and 1",
    "__import__('os').system('x')>=0", "accuracy_gn>=0.9;", "accuracy_gn>=1e999", "",
])
def test_anything_else_is_not_a_rule(text: str) -> None:
    from pipeline.promotion_rule import parse_rule

    with pytest.raises(ValueError, match="promotion rule"):
        parse_rule(text)


def test_a_metric_the_evaluation_does_not_measure_is_named_with_those_it_does() -> None:
    from pipeline.promotion_rule import parse_rule

    with pytest.raises(KeyError, match=r"'accuracy_gn' \(GN metrics need evaluate.gn: true\); "
                                       r"available: accuracy_gg, examples, tasks"):
        parse_rule("accuracy_gn>=0.9").check_measured(gn=False)
    with pytest.raises(KeyError, match="has no metric 'accuracy_gn'; available: accuracy_gg"):
        parse_rule("accuracy_gn>=0.9").check({"accuracy_gg": 1.0})
    parse_rule("inferences>0").check_measured(gn=True)
