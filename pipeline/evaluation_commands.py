"""`supsup evaluate`, and the evaluation `supsup run` ends with: evaluate exactly one bank (a
config's, as stored now, or a model version's), log it to MLflow, write its report beside the
earlier ones (never over them) and print it as a table or one JSON document."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.command_setup import (
    command_run_name,
    load,
    log_file_logged,
    open_tracker,
    resolve_tracking_uri,
)
from pipeline.console import Progress
from pipeline.promotion_commands import check_promote_if, promote_if_met
from pipeline.summaries import Format

if TYPE_CHECKING:  # annotations only: each function imports the heavy modules it runs
    from pipeline.bank_source import BankSource
    from pipeline.config import ExperimentConfig
    from pipeline.jobs.evaluate import EvalReport
    from pipeline.tracking.runs import Tracker

log = logging.getLogger("supsup")


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
    name = "evaluate" if nested else command_run_name(config, "evaluate")
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
        tracker.log_tasks_metrics((r["task_id"], {
            k: r[k] for k in ("accuracy_gg", "accuracy_gn", "task_inference_accuracy")
            if r.get(k) is not None}) for r in report.tasks)
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


def evaluate(target: str, config_path: str | None, overrides: tuple[str, ...],
             tracking_uri: str | None, address: str | None, promote_if: str | None = None,
             alias: str | None = None, fmt: Format = "table") -> int:
    """0 when evaluated (and, with `promote_if`, promoted); 1 when the rule was not met."""
    from pipeline.config import parse_config

    rule = check_promote_if(promote_if, target)
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
