"""What the `supsup` commands that train do (train, run, a baseline or a scenario), and lookup,
with typed arguments; `pipeline.cli` only parses and dispatches to these. `supsup evaluate` is
`pipeline.evaluation_commands`, `supsup promote` `pipeline.promotion_commands`, and what every
command does first (config, tracking URI, Tracker, log file) `pipeline.command_setup`.

A command loads and checks its whole config before anything is written, then opens MLflow runs
around the jobs: `run` is one parent run whose train, register and evaluate runs are its children.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.command_setup import (
    command_run_name,
    load,
    log_file_logged,
    open_tracker,
    resolve_tracking_uri,
)
from pipeline.console import Progress, log_file
from pipeline.evaluation_commands import do_evaluate, print_evaluation
from pipeline.promotion_commands import promote_if_met
from pipeline.summaries import Format

if TYPE_CHECKING:  # annotations only: each command imports the heavy modules it runs
    from pipeline.config import ExperimentConfig
    from pipeline.jobs.evaluate import EvalReport
    from pipeline.jobs.train import TrainSummary
    from pipeline.tracking.runs import Tracker

log = logging.getLogger("supsup")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def do_train(config: ExperimentConfig, address: str | None, tracker: Tracker) -> TrainSummary:
    """Train into the registry and log it to MLflow ("train" run), then publish and register
    the bank ("register" run). Returns the TrainSummary, with `publication` (the bank's
    BankSource and model version)."""
    from pipeline.builders import tracked_run
    from pipeline.jobs.train import run_training
    from pipeline.publish import publish_bank
    from pipeline.report import plot_training
    from pipeline.tracking.runs import TaskMetricsBuffer

    # On its own (no parent run of `supsup run`), the train run keeps the command's supsup.log:
    # logged when training ends, and again, complete, once the bank is registered.
    standalone = not tracker.open_runs
    with tracked_run(tracker, "train", {"job": "train", "bank": config.bank}, config) as run_id, \
            (log_file_logged(tracker, run_id) if standalone else contextlib.nullcontext()):
        bar = Progress(f"train {config.bank}")

        per_task = TaskMetricsBuffer(tracker)

        def on_task(r: dict[str, Any]) -> None:
            per_task.add(r["task_id"], {
                k: float(r[k]) for k in ("train_accuracy", "train_loss", "density", "seconds")})

        try:
            summary = run_training(config, progress=bar, on_task=on_task, address=address,
                                   on_curve=_curve_logger(config, tracker))
        finally:
            bar.close()
            per_task.flush()  # the tasks stored so far, also when training stopped early
        summary.run_id = run_id
        if summary.trained:
            accs = [m["train_accuracy"] for m in summary.trained.values()]
            tracker.log_metrics({
                "tasks_trained": len(summary.trained), "tasks_skipped": len(summary.skipped),
                "train_accuracy_mean": sum(accs) / len(accs),
                "tasks_per_hour": summary.tasks_per_hour, "train_seconds": summary.seconds,
            })
            tracker.log_table([{"task_id": t, **m} for t, m in sorted(summary.trained.items())],
                              "tasks.json")
            path = plot_training(summary.trained, config.run_dir / "training.png")
            if path:
                tracker.log_artifact(path)
    tags = {"job": "register", "bank": config.bank, "train_run_id": run_id or ""}
    with tracked_run(tracker, "register", tags, config) as register_id, \
            (log_file_logged(tracker, run_id) if standalone else contextlib.nullcontext()):
        started = time.perf_counter()
        summary.publication = publish_bank(config, tracker, register_id)
        publish_seconds = time.perf_counter() - started
        tracker.log_metrics({"publish_seconds": publish_seconds,
                             "tasks": len(summary.publication.source.task_ids)})
        tracker.set_tags({"snapshot": summary.publication.source.snapshot_sha256})
    if summary.trained:
        # Only a run that trained writes the summary: a rerun that found everything stored
        # keeps the numbers of the run that did the work.
        _write_json(config.run_dir / "train_summary.json", {
            "bank": config.bank, "tasks_trained": len(summary.trained),
            "tasks_skipped": len(summary.skipped), "seconds": summary.seconds,
            "tasks_per_hour": summary.tasks_per_hour, "publish_seconds": publish_seconds,
            "run_id": run_id, "register_run_id": register_id,
            "tasks": {str(t): m for t, m in sorted(summary.trained.items())},
        })
    reg = summary.publication.registration
    if reg is not None:
        summary.model_version = reg.version
        how = "registered as" if reg.created else "already registered as"
        log.info("%s: %s %s (%s)", summary.publication.source.describe(), how, reg.uri,
                 _latest_uri(config))
    log.info("trained %d new tasks (%d already stored) in %.1f s: %.0f tasks/h",
             len(summary.trained), len(summary.skipped), summary.seconds, summary.tasks_per_hour)
    return summary


CURVE_GROUPS = 8  # groups whose training curves are logged: evenly spaced over the task list


def _curve_logger(config: ExperimentConfig, tracker: Tracker
                  ) -> Callable[[list[int], list[dict[str, float]]], None]:
    """on_curve for run_training: a sample of groups' training curves as MLflow metrics
    `train_curve/loss_tasks_A-B` and `train_curve/accuracy_tasks_A-B`, with step = training
    step, one point per train.log_every steps (the UI charts them in one section)."""
    size = config.train.group_size
    groups = -(-config.tasks.num_tasks // size)
    stride = -(-groups // CURVE_GROUPS)

    def on_curve(group: list[int], curve: list[dict[str, float]]) -> None:
        if (group[0] // size) % stride:
            return
        span = f"tasks_{group[0]}-{group[-1]}"
        for point in curve:
            tracker.log_metrics({f"train_curve/loss_{span}": point["loss"],
                                 f"train_curve/accuracy_{span}": point["accuracy"]},
                                step=int(point["step"]))

    return on_curve


def do_baseline(config: ExperimentConfig, tracker: Tracker) -> dict[str, Any]:
    """Train and evaluate a baseline (config.model) on the config's tasks; log it to MLflow."""
    from pipeline.builders import tracked_run
    from pipeline.jobs.baseline import run_baseline

    tags = {"job": "baseline", "model": config.model}
    with tracked_run(tracker, f"baseline-{config.model}", tags, config):
        bar = Progress(f"{config.model} {config.name}")
        try:
            report = run_baseline(config, progress=bar)
        finally:
            bar.close()
        tracker.log_tasks_metrics((int(t), {"accuracy_gg": float(acc)})
                                  for t, acc in report.get("accuracy", {}).items())
        tracker.log_metrics({"accuracy_gg": report["mean_accuracy"],
                             "bytes_per_task": report["bytes_per_task"],
                             "seconds": report["seconds"]})
        tracker.log_artifact(report["path"], "baseline")
    print(f"{config.model}: accuracy (task given) {100 * report['mean_accuracy']:.2f}% over "
          f"{len(report.get('accuracy', {}))} tasks, {report['bytes_per_task']:,} bytes per task")
    print(f"report: {report['path']}")
    return report


def do_scenario(config: ExperimentConfig, address: str | None, tracker: Tracker) -> dict[str, Any]:
    """Training without task identity ("nns") or the Hopfield reservoir ("hopfield")."""
    if config.scenario == "nns":
        from pipeline.jobs.discovery import run_discovery as job
    else:
        from pipeline.jobs.reservoir import run_reservoir as job
    bar = Progress(f"{config.scenario} {config.name}")
    try:
        summary = job(config, progress=bar, tracker=tracker, address=address)
    finally:
        bar.close()
    shown = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
    print(json.dumps(shown, indent=1))
    for name, path in (summary.get("files") or {}).items():
        print(f"{name}: {path}")
    return summary


def _special(config: ExperimentConfig, address: str | None, tracker: Tracker) -> bool:
    """Run a baseline or a scenario job when the config asks for one; True if it did."""
    if config.model != "supsup":
        do_baseline(config, tracker)
        return True
    if config.scenario != "gg_gn":
        do_scenario(config, address, tracker)
        return True
    return False


def train(config_path: str, overrides: tuple[str, ...], address: str | None) -> int:
    from pipeline.jobs.train import check_before_training

    config = load(config_path, overrides)
    check_before_training(config)  # another recipe than the bank's: refused before any write
    tracker = open_tracker(config, address)
    if _special(config, address, tracker):
        return 0
    summary = do_train(config, address, tracker)
    where(config, summary.model_version)
    return 0


def run(config_path: str, overrides: tuple[str, ...], address: str | None) -> int:
    from pipeline.jobs.train import check_before_training

    config = load(config_path, overrides)
    check_before_training(config)
    tracker = open_tracker(config, address)
    if _special(config, address, tracker):  # these jobs train and evaluate in one go
        return 0
    from pipeline.cluster import ray_session

    # One parent run; the train, register and evaluate runs open inside it: its children. One
    # Ray session for both jobs: evaluation reuses the workers training warmed up.
    from pipeline.config import dump_config

    with tracker.run(command_run_name(config, "run"), tags={"job": "run", "bank": config.bank}
                     ) as parent_id, ray_session(config.cluster, address), \
            log_file_logged(tracker, parent_id):
        tracker.log_params(config.flat_params())
        tracker.log_text(dump_config(config), "config.yaml")
        summary = do_train(config, address, tracker)
        report, files = do_evaluate(config, summary.publication.source, address, tracker,
                                    {"train_run_id": summary.run_id or ""},
                                    model=(config.model_name, summary.model_version)
                                    if summary.model_version else None)
        for path in files.values():  # the parent run shows what the command produced
            tracker.log_artifact(path, "evaluation", run_id=parent_id)
        tracker.log_metrics({k: float(v) for k, v in report.summary.items()}, run_id=parent_id)
        tracker.set_tags({"model_version": summary.model_version or "",
                          "snapshot": summary.publication.source.snapshot_sha256,
                          "mlflow.note.content": _run_description(config, summary, report)},
                         run_id=parent_id)
        promotion = None
        if config.tracking.promote_if and summary.model_version:
            promotion = promote_if_met(
                config.tracking.promote_if, f"models:/{config.model_name}/"
                f"{summary.model_version}", config.tracking_uri, config.tracking.alias, report)
            tracker.set_tags({"promoted": str(promotion is not None).lower()}, run_id=parent_id)
    print_evaluation(report, files)
    where(config, summary.model_version, promoted=promotion is not None)
    return 0


def _run_description(config: ExperimentConfig, summary: TrainSummary,
                     report: EvalReport) -> str:
    """The parent run's description in the MLflow UI: what was run and what it measured."""
    s = report.summary
    measured = f"GG {100 * s['accuracy_gg']:.2f}%"
    if "accuracy_gn" in s:
        measured += (f", GN {100 * s['accuracy_gn']:.2f}%, task inference "
                     f"{100 * s['task_inference_accuracy']:.2f}%")
    model = (f"models:/{config.model_name}/{summary.model_version}" if summary.model_version
             else "not registered")
    return (f"`supsup run` of {config.name}: {int(s['tasks'])} tasks of bank {config.bank} "
            f"({len(summary.trained)} trained now, {len(summary.skipped)} already stored); "
            f"{measured}; model {model}. The child runs train, register and evaluate hold the "
            "details.")


def lookup(model_uri: str, task: int | None, tracking_uri: str | None,
           config_path: str | None, fmt: Format = "table") -> int:
    """What a version holds, in about ten lines (table) or whole (json: every task id)."""
    from pipeline.summaries import emit, lookup_lines, task_record_lines
    from pipeline.tracking import lookup as lookup_model

    info = lookup_model(model_uri, resolve_tracking_uri(tracking_uri, config_path))
    if task is not None:
        from pipeline.registry import MaskRegistry

        record = MaskRegistry(info["registry_root"]).read_task(info["bank"], task)
        info = {"model": model_uri, "version": info["version"], "task_id": task,
                "densities": record.densities, "metadata": record.metadata}
        emit(task_record_lines(info) if fmt == "table" else None, info, fmt)
        return 0
    emit(lookup_lines(info) if fmt == "table" else None, info, fmt)
    return 0


def _latest_uri(config: ExperimentConfig) -> str:
    """The URI of the newest version: MLflow's own models:/NAME/latest, or the latest alias."""
    latest = config.tracking.latest_alias
    return (f"models:/{config.model_name}/latest" if latest.lower() == "latest"
            else f"models:/{config.model_name}@{latest}")


def where(config: ExperimentConfig, version: int | None, promoted: bool = False) -> None:
    """Where the command left its outputs, and how to look at them."""
    print(f"run folder: {config.run_dir.resolve()}")
    if log_file() is not None:
        print(f"log: {log_file()}")
    print(f"mask registry: {config.registry.root} (bank {config.bank})")
    print(f"MLflow: {config.tracking_uri} (experiment {config.experiment_name}); "
          f"browse with `mlflow ui --backend-store-uri {config.tracking_uri}`")
    if version is not None:
        print(f"model: {_latest_uri(config)} (version {version}); `supsup lookup "
              f"{_latest_uri(config)} --tracking-uri {config.tracking_uri}`")
        alias = f"models:/{config.model_name}@{config.tracking.alias}"
        if promoted:
            print(f"promoted: {alias} (version {version})")
        else:
            print(f"promote it with `supsup promote models:/{config.model_name}/{version} "
                  f"--tracking-uri {config.tracking_uri}` to move {alias}")
