"""What every `supsup` command that runs a job or reads MLflow does first: load and check its
config, find its tracking URI, open its Tracker, keep its supsup.log with its run, name its runs.

The command modules (`pipeline.commands`, `pipeline.evaluation_commands`,
`pipeline.promotion_commands`, `pipeline.serve.command`) build on these; this module imports
none of them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from pipeline.console import attach_log_file, log_file

if TYPE_CHECKING:  # annotations only: each function imports the heavy modules it uses
    from pipeline.config import ExperimentConfig
    from pipeline.tracking.runs import Tracker

log = logging.getLogger("supsup")


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


def command_run_name(config: ExperimentConfig, job: str) -> str:
    """The name of a command's own MLflow run: experiment, job, tasks, density and time."""
    from pipeline.tracking.runs import run_name

    t = config.train
    density = t.density if t.rule == "topk" and t.density is not None else t.rule
    return run_name(config.name, job, config.tasks.num_tasks, density)
