"""What each `supsup` command does, with typed arguments; `pipeline.cli` only parses and
dispatches to these.

A command loads and checks its whole config before anything is written, then opens MLflow runs
around the jobs: `run` is one parent run whose train, register and evaluate runs are its children.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.console import Progress, attach_log_file, log_file
from pipeline.summaries import Format

if TYPE_CHECKING:  # annotations only: each command imports the heavy modules it runs
    from pipeline.bank_source import BankSource
    from pipeline.config import ExperimentConfig
    from pipeline.jobs.evaluate import EvalReport
    from pipeline.jobs.train import TrainSummary
    from pipeline.tracking.promotion import Promotion
    from pipeline.tracking.runs import Tracker

log = logging.getLogger("supsup")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def load(config_path: str, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    from pipeline.config import load_config

    return load_config(config_path, list(overrides))


def open_tracker(config: ExperimentConfig, address: str | None = None) -> Tracker:
    """The experiment's Tracker, made only once the whole config and its targets (the Ray
    cluster to join included) check out (nothing is written before); runs that a killed earlier
    command left RUNNING are closed. From here on the command's log goes to the run folder's
    supsup.log."""
    from pipeline.cluster import check_address
    from pipeline.paths import check_job_outputs
    from pipeline.preflight import check_before_side_effects
    from pipeline.tracking import Tracker

    check_job_outputs(config, config.registry.root)  # `ray job submit` keeps every output
    check_before_side_effects(config)
    check_address(config.cluster, address)
    tracker = Tracker(config.tracking_uri, config.experiment_name)  # checks the server answers
    config.run_dir.mkdir(parents=True, exist_ok=True)
    attach_log_file(config.run_dir)
    tracker.close_abandoned_runs()
    return tracker


@contextlib.contextmanager
def log_file_logged(tracker: Tracker, run_id: str) -> Iterator[None]:
    """On the way out, success or failure, the command's supsup.log becomes an artifact of
    `run_id`: its lines (MLflow's and Ray's included) are kept with the run, wherever the
    command ran (a `ray job submit` entrypoint's folder may be gone later)."""
    try:
        yield
    finally:
        path = log_file()
        if path is not None and path.exists():
            try:
                tracker.log_artifact(path, run_id=run_id)
            except Exception:  # noqa: BLE001  (never hides the command's own outcome)
                log.warning("could not log %s to run %s", path, run_id, exc_info=True)


def do_train(config: ExperimentConfig, address: str | None, tracker: Tracker) -> TrainSummary:
    """Train into the registry and log it to MLflow ("train" run), then publish and register
    the bank ("register" run). Returns the TrainSummary, with `publication` (the bank's
    BankSource and model version)."""
    from pipeline.builders import tracked_run
    from pipeline.jobs.train import run_training
    from pipeline.publish import publish_bank
    from pipeline.report import plot_training

    with tracked_run(tracker, "train", {"job": "train", "bank": config.bank}, config) as run_id:
        bar = Progress(f"train {config.bank}")

        def on_task(r: dict[str, Any]) -> None:
            tracker.log_task_metrics(r["task_id"], {
                k: float(r[k]) for k in ("train_accuracy", "train_loss", "density", "seconds")})

        try:
            summary = run_training(config, progress=bar, on_task=on_task, address=address,
                                   on_curve=_curve_logger(config, tracker))
        finally:
            bar.close()
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
    with tracked_run(tracker, "register", tags, config) as register_id:
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


def do_evaluate(config: ExperimentConfig, source: BankSource, address: str | None,
                tracker: Tracker, tags: dict[str, str] | None = None,
                model: tuple[str, int] | None = None) -> tuple[EvalReport, dict[str, Path]]:
    """Evaluate exactly `source` (a BankSource) on the config's tasks; log it to MLflow, and
    onto `model` (name, version) when the source is a registered version."""
    from pipeline.builders import data_identity
    from pipeline.jobs.evaluate import run_evaluation
    from pipeline.report import write_report

    # Inside `supsup run` the child is "evaluate"; on its own the run says what it evaluated.
    nested = bool(tracker.open_runs)
    name = "evaluate" if nested else _run_name(config, "evaluate")
    with tracker.run(name, tags={"job": "evaluate", "bank": source.bank,
                                       "snapshot": source.snapshot_sha256,
                                       **(tags or {})}) as run_id, \
            (contextlib.nullcontext() if nested else log_file_logged(tracker, run_id)):
        tracker.log_params({f"evaluate.{k}": str(v)
                            for k, v in config.evaluate.model_dump().items()})
        dataset, digest, data_source, profile = data_identity(config)
        tracker.log_dataset(dataset, digest, data_source, profile, context="evaluation")
        bar = Progress(f"evaluate {source.bank}")
        try:
            report = run_evaluation(config, source, progress=bar, address=address)
        finally:
            bar.close()
        for r in report.tasks:
            tracker.log_task_metrics(r["task_id"], {
                k: r[k] for k in ("accuracy_gg", "accuracy_gn", "task_inference_accuracy")
                if r.get(k) is not None})
        tracker.log_metrics({k: float(v) for k, v in report.summary.items()})
        tracker.log_metrics(report.continual_metrics())  # average accuracy, forgetting, BWT
        for name, matrix in report.matrices.items():
            tracker.log_table(matrix.table(), f"accuracy_matrix_{name}.json")
        tracker.log_table([{k: v for k, v in r.items() if k != "inferred"} for r in report.tasks],
                          "tasks.json")
        for c in report.curve:
            tracker.log_metrics({"curve_accuracy_gn": c["accuracy_gn"],
                                 "curve_task_inference_accuracy": c["task_inference_accuracy"]},
                                step=int(c["tasks_learned"]))
        if model is not None:
            from pipeline.tracking import record_evaluation

            record_evaluation(tracker, *model, run_id, report.summary)
        report.run_id, report.model_version = run_id, (model[1] if model else None)
        out_dir = config.run_dir / "evaluation"
        keep_earlier_reports(out_dir)
        files = write_report(report, out_dir, f"{config.name}: evaluation")
        for path in files.values():
            tracker.log_artifact(path, "evaluation")
    return report, files


def keep_earlier_reports(out_dir: Path) -> Path | None:
    """Move the reports of an earlier evaluation in `out_dir` to `out_dir/earlier/TIME-RUN`, so
    that the next evaluation never overwrites them; returns where they went (None: none)."""
    previous = out_dir / "report.json"
    if not previous.is_file():
        return None
    try:
        old = json.loads(previous.read_text())
    except (OSError, ValueError):
        old = {}
    created = "".join(c for c in str(old.get("created") or "")[:19] if c.isalnum())
    name = "-".join(p for p in (created, str(old.get("run_id") or "")[:8]) if p) or "unknown"
    dest = out_dir / "earlier" / name
    for n in range(1, 1000):
        if not dest.exists():
            break
        dest = out_dir / "earlier" / f"{name}-{n}"
    dest.mkdir(parents=True)
    for path in out_dir.iterdir():
        if path.is_file():
            path.rename(dest / path.name)
    log.info("the reports of the earlier evaluation (run %s) are kept in %s",
             old.get("run_id"), dest)
    return dest


def print_evaluation(report: EvalReport, files: dict[str, Path], fmt: Format = "table",
                     extra: dict[str, Any] | None = None) -> None:
    """The summary and the lowest tasks (table), or every task's results and `extra` (json)."""
    from pipeline.summaries import emit, evaluation_data, evaluation_lines

    emit(evaluation_lines(report, files) if fmt == "table" else None,
         {**evaluation_data(report, files), **(extra or {})} if fmt == "json" else None, fmt)


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
        for t, acc in report.get("accuracy", {}).items():
            tracker.log_task_metrics(int(t), {"accuracy_gg": float(acc)})
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

    with tracker.run(_run_name(config, "run"), tags={"job": "run", "bank": config.bank}
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


def _run_name(config: ExperimentConfig, job: str) -> str:
    from pipeline.tracking.runs import run_name

    t = config.train
    density = t.density if t.rule == "topk" and t.density is not None else t.rule
    return run_name(config.name, job, config.tasks.num_tasks, density)


def promote_if_met(rule_text: str, model_uri: str, tracking_uri: str, alias: str,
                   report: EvalReport) -> Promotion | None:
    """Promote `model_uri` to `alias` when the evaluation `report` meets the rule; says on the
    terminal which way it went. Returns the Promotion, or None when the rule is not met."""
    from pipeline.promotion_rule import parse_rule
    from pipeline.tracking.promotion import promote as promote_version

    rule = parse_rule(rule_text)
    value = report.summary.get(rule.metric)
    if not rule.check(report.summary):
        print(f"not promoted: {rule.metric} {value:.4g} does not meet {rule}; @{alias} is "
              "unchanged")
        return None
    done = promote_version(model_uri, tracking_uri, alias, evaluation_run=report.run_id,
                           metrics=report.summary, rule=str(rule))
    print(f"promoted: {rule.metric} {value:.4g} meets {rule}; models:/{done.name}@{alias} -> "
          f"version {done.version} (was {done.previous or 'unset'})")
    return done


def promote(model_uri: str, alias: str | None, tracking_uri: str | None,
            config_path: str | None) -> int:
    """`supsup promote MODEL_URI`: move the promotion alias to the version, named by number."""
    from pipeline.tracking.promotion import promote as promote_version

    alias = alias or (load(config_path).tracking.alias if config_path else "champion")
    done = promote_version(model_uri, resolve_tracking_uri(tracking_uri, config_path), alias)
    evidence = (f"evaluation run {done.evaluation_run}" if done.evaluation_run
                else "no recorded evaluation")
    print(f"models:/{done.name}@{alias} -> version {done.version} (was "
          f"{done.previous or 'unset'}; {evidence})")
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


def evaluate(target: str, config_path: str | None, overrides: tuple[str, ...],
             tracking_uri: str | None, address: str | None, promote_if: str | None = None,
             alias: str | None = None, fmt: Format = "table") -> int:
    """0 when evaluated (and, with `promote_if`, promoted); 1 when the rule was not met."""
    from pipeline.config import parse_config

    rule = None
    if promote_if is not None:
        from pipeline.promotion_rule import parse_rule

        rule = parse_rule(promote_if)  # a typo fails before anything runs
        if not target.startswith("models:/"):
            raise ValueError(f"--promote-if {promote_if!r} promotes a model version: evaluate "
                             "models:/NAME/VERSION (or models:/NAME@ALIAS) instead of a config")
    if alias is not None:
        from pipeline.tracking.model_registry import check_alias

        check_alias(alias)
    if target.startswith("models:/"):
        from pipeline.tracking import model_source, run_config_text

        uri = resolve_tracking_uri(tracking_uri, config_path, overrides)
        with tempfile.TemporaryDirectory(prefix="supsup-evaluate-") as tmp:
            info, source = model_source(target, uri, tmp)
            if config_path:
                config = load(config_path, overrides)
            else:
                import yaml

                config = parse_config(yaml.safe_load(run_config_text(info["run_id"], uri)),
                                      f"{target} (config.yaml of run {info['run_id']})",
                                      list(overrides))
            if rule is not None:
                rule.check_measured(config.evaluate.gn)
            tags = {"model_uri": target, "model_version": str(info["version"])}
            report, files = do_evaluate(config, source, address, open_tracker(config, address),
                                        tags,
                                        model=(info["name"], int(info["version"])))
        if rule is None or fmt == "table":
            print_evaluation(report, files, fmt)
        if rule is None:
            return 0
        pinned = f"models:/{info['name']}/{info['version']}"
        moved = alias or config.tracking.alias
        # With --format json the verdict's line goes to stderr: stdout stays one JSON document.
        with (contextlib.redirect_stdout(sys.stderr) if fmt == "json"
              else contextlib.nullcontext()):
            promoted = promote_if_met(promote_if, pinned, uri, moved, report)
        if fmt == "json":
            print_evaluation(report, files, fmt, {"promotion": {
                "rule": promote_if, "alias": moved, "promoted": promoted is not None}})
        return 0 if promoted is not None else 1
    from pipeline.registry import MaskRegistry

    config = load(target, overrides)
    source = MaskRegistry(config.registry.root).source(config.bank)
    report, files = do_evaluate(config, source, address, open_tracker(config, address))
    print_evaluation(report, files, fmt)
    return 0


def resolve_tracking_uri(tracking_uri: str | None, config_path: str | None = None,
                         overrides: tuple[str, ...] = ()) -> str:
    """--tracking-uri, else the config's, else MLFLOW_TRACKING_URI; an error line otherwise."""
    import os

    from pipeline.preflight import check_store_exists

    uri = (tracking_uri or (str(load(config_path, overrides).tracking_uri) if config_path
                            else None) or os.environ.get("MLFLOW_TRACKING_URI"))
    if uri:
        check_store_exists(uri, "this command")  # reads only: never creates an empty store
        return uri
    raise ValueError("pass --tracking-uri URI (or --config CONFIG, or set MLFLOW_TRACKING_URI) "
                     "so the model registry can be found")


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
