"""Running a sweep: Ray Tune with ASHA over the validated space, then results, plots and MLflow."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.jobs.sweep.mlflow_trials import _log_parent, _trial_callback
from pipeline.jobs.sweep.outputs import (
    SweepSummary,
    _best,
    _describe,
    _fmt,
    _rows,
    best_config,
    format_table,
    write_results,
)
from pipeline.jobs.sweep.space import _sweep, param_space, trial_task_ids, validate_space
from pipeline.jobs.sweep.trial import _log_points, sweep_trial, validation_tasks

if TYPE_CHECKING:
    from pipeline.config import ExperimentConfig

log = logging.getLogger(__name__)


def _storage_name(storage: Path) -> str:
    name = time.strftime("sweep-%Y%m%d-%H%M%S")
    stem, i = name, 1
    while (storage / name).exists():
        name, i = f"{stem}-{i}", i + 1
    return name


def _max_log_points(config: ExperimentConfig, probes: list[ExperimentConfig]) -> int:
    """The most log points any probed trial reports: ASHA's horizon (max_t)."""
    train_size = 0
    if any(p.train.epochs is not None for p in probes):
        tasks = validation_tasks(config)
        train_size = min(tasks.size(t, "train") for t in trial_task_ids(config))
    return max(_log_points(p, train_size) for p in probes)


def _tuner(config: ExperimentConfig, max_t: int, storage: Path, callback: Any) -> Any:
    """The Tune experiment: function trainable, search space, scheduler, storage."""
    from ray import tune

    sweep = _sweep(config)
    scheduler = None
    if sweep.scheduler.type == "asha":
        # Time is counted in log points. Trials that survive every rung run to their end
        # (stop_last_trials=False), so a horizon below a trial's length never truncates it.
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="training_iteration", max_t=max(max_t, sweep.scheduler.grace_period),
            grace_period=sweep.scheduler.grace_period,
            reduction_factor=sweep.scheduler.reduction_factor, stop_last_trials=False)
    trial_data = config.model_dump()
    root = config.data.root
    if root and "://" not in root:  # trials run in their own folders
        trial_data["data"]["root"] = str(Path(root).resolve())
    trainable = tune.with_resources(
        tune.with_parameters(sweep_trial, config_data=trial_data),
        {"cpu": config.cluster.cpus_per_worker, "gpu": config.cluster.gpus_per_worker})
    return tune.Tuner(
        trainable,
        param_space=param_space(sweep),
        tune_config=tune.TuneConfig(
            metric=sweep.metric, mode=sweep.mode, scheduler=scheduler,
            num_samples=sweep.num_samples, max_concurrent_trials=sweep.max_concurrent,
            reuse_actors=True),  # later trials skip the worker start-up and data load
        run_config=tune.RunConfig(
            name=_storage_name(storage), storage_path=str(storage), callbacks=[callback],
            verbose=0),
    )


def run_sweep(config: ExperimentConfig, *, address: str | None = None) -> SweepSummary:
    """Run the config's sweep on Ray Tune; log to MLflow; write best.yaml, results and plots.

    Everything about the space is validated before Ray, MLflow or any folder is touched.
    """
    from pipeline.cluster import check_address, ray_session, worker_slots
    from pipeline.config import dump_config
    from pipeline.console import attach_log_file
    from pipeline.report import plot_sweep
    from pipeline.tracking import Tracker
    from pipeline.tracking.runs import run_name

    sweep = _sweep(config)
    probes = validate_space(config)
    keys = list(sweep.space)
    max_t = _max_log_points(config, probes)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the newer console output ignores verbose
    out_dir = config.run_dir / "sweep"
    storage = (out_dir / "tune").resolve()
    start = time.perf_counter()
    check_address(config.cluster, address)  # before the run folder is made
    config.run_dir.mkdir(parents=True, exist_ok=True)
    attach_log_file(config.run_dir)  # Ray's native start-up warnings go to supsup.log
    with ray_session(config.cluster, address) as resources:
        worker_slots(config.cluster, resources)  # a GPU request the cluster cannot meet fails here
        config.run_dir.mkdir(parents=True, exist_ok=True)
        tracker = Tracker(config.tracking_uri, config.experiment_name)
        name = run_name(config.name, "sweep", config.tasks.num_tasks, "+".join(keys))
        with tracker.run(name, tags={"job": "sweep", "metric": sweep.metric}) as parent_id:
            # The swept keys are the trials' params: the base config's value was never used.
            tracker.log_params({k: v for k, v in config.flat_params().items()
                                if k not in sweep.space}, run_id=parent_id)
            tracker.log_text(dump_config(config), "config.yaml", run_id=parent_id)
            callback = _trial_callback(tracker, parent_id, keys)
            error: BaseException | None = None
            try:
                results = _tuner(config, max_t, storage, callback).fit()
            except BaseException as err:
                error = err
                raise
            finally:
                callback.close_all(error)
            rows = _rows(results, keys, callback.runs)
            summary = SweepSummary(keys, sweep.metric, sweep.mode, rows,
                                   _best(rows, sweep.metric, sweep.mode), None,
                                   run_id=parent_id, storage=Path(results.experiment_path))
            if summary.best is None:
                first = next((r["error"] for r in rows if r["error"]), "no trial reported")
                raise RuntimeError(f"no trial of the sweep produced {sweep.metric}: {first}. "
                                   f"Trial logs are under {summary.storage}")
            summary.best_config = out_dir / "best.yaml"
            summary.best_config.write_text(dump_config(best_config(config, summary.best, keys)))
            summary.files = {**write_results(summary, out_dir), **plot_sweep(summary, out_dir)}
            summary.seconds = time.perf_counter() - start
            _log_parent(tracker, parent_id, summary)
    errored = [r for r in rows if r["status"] == "error"]
    if errored:
        log.warning("%d of %d trials failed, e.g. %s", len(errored), len(rows), errored[0]["error"])
    return summary


def cmd_sweep(config_path: str, overrides: tuple[str, ...] | list[str] = (),
              address: str | None = None) -> int:
    """`supsup sweep CONFIG [--set K=V] [--address A]`: run the sweep, print the trials."""
    from pipeline.config import load_config

    config = load_config(config_path, list(overrides))
    summary = run_sweep(config, address=address)
    print(format_table(summary))
    assert summary.best is not None and summary.best_config is not None
    print(f"best {summary.metric} {_fmt(summary.best[summary.metric])} with "
          f"{_describe(summary.best, summary.keys)} ({len(summary.rows)} trials, "
          f"{summary.seconds:.0f} s)")
    best = summary.best_config.resolve()  # absolute: valid from any folder, or a job's
    print(f"best config: {best} (train it with `supsup train {best}`)")
    print(f"results: {summary.files['csv'].resolve()}; MLflow: {config.tracking_uri} "
          f"(experiment {config.experiment_name}, run {summary.run_id})")
    return 0
