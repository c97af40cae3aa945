"""The sweep in MLflow: a child run per trial (a Tune callback in the driver), the parent's summary.

Only the driver writes to MLflow; trials report to Tune, and this callback mirrors them.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from pipeline.jobs.sweep.outputs import SweepSummary, _describe, _fmt
from pipeline.jobs.sweep.space import _plain
from pipeline.jobs.sweep.trial import REPORTED

if TYPE_CHECKING:
    from pipeline.tracking import Tracker

log = logging.getLogger(__name__)


def _trial_callback(tracker: Tracker, parent_id: str, keys: list[str]) -> Any:
    """A Tune callback, run in the driver, that mirrors each trial into a child MLflow run."""
    from ray import tune

    class MlflowTrials(tune.Callback):
        def __init__(self) -> None:
            self.runs: dict[str, str] = {}  # trial id -> MLflow run id
            self._open: dict[str, Any] = {}  # trial id -> the open Tracker.run context

        def on_trial_start(self, iteration: int, trials: list[Any], trial: Any,
                           **info: Any) -> None:
            if trial.trial_id in self._open:
                return
            run = tracker.run(f"trial-{trial.trial_id}", parent_run_id=parent_id,
                              tags={"job": "sweep-trial", "trial_id": trial.trial_id})
            run_id = run.__enter__()
            self._open[trial.trial_id] = run
            self.runs[trial.trial_id] = run_id
            tracker.log_params({k: _plain(trial.config.get(k)) for k in keys}, run_id=run_id)

        def on_trial_result(self, iteration: int, trials: list[Any], trial: Any,
                            result: dict[str, Any], **info: Any) -> None:
            run_id = self.runs.get(trial.trial_id)
            if run_id is None:
                return
            metrics = {k: result[k] for k in REPORTED if k in result}
            metrics["log_points"] = result.get("training_iteration", 0)
            tracker.log_metrics(metrics, step=int(result.get("train_step", 0)), run_id=run_id)

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any,
                              **info: Any) -> None:
            last = trial.last_result or {}
            done = last.get("train_step", 0) >= last.get("steps", math.inf)
            self._close(trial.trial_id, "completed" if done else "stopped early")
            log.info("trial %s %s: %s = %s", trial.trial_id, _describe(trial.config, keys),
                     "val_accuracy", _fmt(last.get("val_accuracy")))

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any,
                           **info: Any) -> None:
            self._close(trial.trial_id, "error", RuntimeError(f"trial {trial.trial_id} failed"))
            log.warning("trial %s %s failed", trial.trial_id, _describe(trial.config, keys))

        def _close(self, trial_id: str, status: str, error: BaseException | None = None) -> None:
            run = self._open.pop(trial_id, None)
            if run is None:
                return
            tracker.set_tags({"status": status}, run_id=self.runs[trial_id])
            if error is None:
                run.__exit__(None, None, None)
            else:
                run.__exit__(type(error), error, None)  # marks the run FAILED

        def close_all(self, error: BaseException | None) -> None:
            for trial_id in list(self._open):
                self._close(trial_id, "interrupted", error or RuntimeError("sweep ended"))

    return MlflowTrials()


def _log_parent(tracker: Tracker, run_id: str, summary: SweepSummary) -> None:
    """The parent run: the best values and metrics, counts, the best config, results, plots."""
    best = summary.best
    assert best is not None and summary.best_config is not None
    rows = summary.rows
    tracker.log_params({f"best.{k}": _plain(best[k]) for k in summary.keys}, run_id=run_id)
    tracker.log_metrics({f"best_{k}": best[k] for k in REPORTED if best.get(k) is not None},
                        run_id=run_id)
    tracker.log_metrics({
        "trials": len(rows),
        "trials_errored": sum(r["status"] == "error" for r in rows),
        "trials_stopped_early": sum(r["status"] == "stopped early" for r in rows),
        "sweep_seconds": summary.seconds,
    }, run_id=run_id)
    for row in rows:
        if row["error"] and row["run_id"]:
            tracker.set_tags({"error": row["error"]}, run_id=row["run_id"])
    tracker.set_tags({"best_trial_id": best["trial_id"], "best_run_id": best["run_id"] or ""},
                     run_id=run_id)
    tracker.log_artifact(summary.best_config, run_id=run_id)
    for path in summary.files.values():
        tracker.log_artifact(path, "sweep", run_id=run_id)
