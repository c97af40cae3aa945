"""MLflow runs of one experiment: the Tracker that jobs log params, metrics and artifacts with.

SQLite takes one writer at a time, so only the driver process writes to MLflow; Ray workers return
their results and the driver logs them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException

from pipeline.paths import resolve_tracking_uri, sqlite_path
from pipeline.tracking.client import as_text, chunks, client_for, is_missing

logger = logging.getLogger(__name__)

PROCESS_TAG = "supsup.process"  # host:pid:start time of the process that opened a run
PARAM_VALUE_LIMIT = 500  # the oldest MLflow servers' limit; longer values go to an artifact
_BATCH = 100  # MLflow's limit on params/tags per log_batch call
# The UI opens an experiment of this kind on its runs (model training), not on GenAI traces.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
_METRIC_BATCH = 1000


class Tracker:
    """Runs of one MLflow experiment: params, metrics, per-task metrics, artifacts, model versions.

    Only the driver process uses a Tracker: SQLite takes no concurrent writers ("database is
    locked"), so Ray workers return their results and the driver logs them. Not thread-safe.
    The experiment is created if missing; its artifacts go to `artifact_location`, by default a
    folder `mlartifacts` beside the SQLite file (for http URIs the server decides), so nothing
    lands in ./mlruns.
    """

    def __init__(self, tracking_uri: str, experiment: str,
                 artifact_location: str | os.PathLike[str] | None = None) -> None:
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        if not experiment or not isinstance(experiment, str):
            raise ValueError(f"experiment must be a non-empty name, got {experiment!r}")
        self.experiment = experiment
        self.client = client_for(self.tracking_uri)
        self.experiment_id = self._ensure_experiment(artifact_location)
        self._runs: list[str] = []

    @property
    def open_runs(self) -> list[str]:
        """Ids of the runs opened with `run()` that are still open, outermost first."""
        return list(self._runs)

    def __repr__(self) -> str:
        return f"Tracker({self.tracking_uri!r}, {self.experiment!r})"

    def _default_artifact_location(self) -> str | None:
        db = sqlite_path(self.tracking_uri)
        if db is not None:
            return (db.parent / "mlartifacts").resolve().as_uri()
        if self.tracking_uri.startswith(("http://", "https://")):
            return None  # the server's --artifacts-destination
        raise ValueError(
            f"tracking URI {self.tracking_uri!r}: pass artifact_location (a folder or object-store "
            "URI) so artifacts do not land in ./mlruns")

    def _ensure_experiment(self, artifact_location: str | os.PathLike[str] | None) -> str:
        wanted = None
        if artifact_location is not None:
            loc = os.fspath(artifact_location)
            wanted = loc if "://" in loc else Path(loc).resolve().as_uri()
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            location = wanted or self._default_artifact_location()
            try:
                return self.client.create_experiment(self.experiment, location,
                                                     tags=EXPERIMENT_TAGS)
            except MlflowException as exc:  # another driver created it meanwhile
                exp = self.client.get_experiment_by_name(self.experiment)
                if exp is None:
                    raise ValueError(f"could not create experiment {self.experiment!r} at "
                                     f"{self.tracking_uri}: {exc.message}") from None
        if exp.lifecycle_stage == "deleted":
            raise ValueError(
                f"experiment {self.experiment!r} at {self.tracking_uri} is deleted: restore it "
                f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or choose "
                "another experiment name")
        if wanted is not None and exp.artifact_location.rstrip("/") != wanted.rstrip("/"):
            raise ValueError(
                f"experiment {self.experiment!r} already stores its artifacts at "
                f"{exp.artifact_location}, not {wanted}: leave artifact_location unset or choose "
                "another experiment name")
        return exp.experiment_id

    # ------------------------------------------------------------------------------ runs
    @property
    def run_id(self) -> str:
        """The innermost run opened with `run()`; ValueError outside one."""
        if not self._runs:
            raise ValueError("no active run: log inside `with tracker.run(...)` or pass run_id")
        return self._runs[-1]

    @contextlib.contextmanager
    def run(self, run_name: str, tags: Mapping[str, Any] | None = None,
            parent_run_id: str | None = None) -> Iterator[str]:
        """Open a run and yield its id; it ends FINISHED, or FAILED/KILLED on an exception.

        A run opened inside another one (or given `parent_run_id`) is its nested child, as MLflow
        shows sweeps: the child carries the parent's id in the mlflow.parentRunId tag.
        """
        parent = parent_run_id or (self._runs[-1] if self._runs else None)
        all_tags = {**standard_tags(), **{k: as_text(v) for k, v in (tags or {}).items()}}
        all_tags["mlflow.runName"] = run_name
        all_tags[PROCESS_TAG] = this_process()
        if parent is not None:
            try:
                self.client.get_run(parent)
            except MlflowException as exc:
                if is_missing(exc):
                    raise KeyError(f"parent run {parent!r} does not exist at "
                                   f"{self.tracking_uri}") from None
                raise
            all_tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        run_id = run.info.run_id
        self._runs.append(run_id)
        status = RunStatus.to_string(RunStatus.FAILED)
        try:
            yield run_id
            status = RunStatus.to_string(RunStatus.FINISHED)
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM
            status = RunStatus.to_string(RunStatus.KILLED)
            raise
        finally:
            self._runs.remove(run_id)
            try:
                self.client.set_terminated(run_id, status)
            except Exception as exc:  # noqa: BLE001  (a dead server: the next run closes it)
                logger.warning("could not mark run %s %s: %s", run_id, status, exc)

    def close_abandoned_runs(self) -> list[str]:
        """Mark KILLED the runs of this experiment left RUNNING by a process of this host that no
        longer exists (a SIGKILLed driver, a machine that lost power); returns their ids.

        Runs of live processes, or of other hosts (whose processes cannot be seen from here),
        are left alone, so two drivers on one experiment never close each other's runs.
        """
        closed = []
        host = socket.gethostname()
        for run in self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'",
                                           max_results=1000):
            owner = run.data.tags.get(PROCESS_TAG, "")
            if owner.split(":", 1)[0] == host and not process_alive(owner):
                self.client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
                closed.append(run.info.run_id)
                logger.info("closed run %s (%s) left RUNNING by %s, which is gone",
                            run.info.run_id, run.data.tags.get("mlflow.runName", "?"), owner)
        return closed

    def log_params(self, params: Mapping[str, Any], run_id: str | None = None) -> None:
        """Log params as strings. Values longer than PARAM_VALUE_LIMIT are cut, and the whole
        value goes to the artifact params/<key>.txt. Params are immutable in MLflow: logging a
        key again with another value is a ValueError naming the key."""
        run_id = run_id or self.run_id
        entries = []
        for key, value in params.items():
            text = as_text(value)
            if len(text) > PARAM_VALUE_LIMIT:
                marker = f"... [{len(text)} chars: see artifact params/{key}.txt]"
                self.client.log_text(run_id, text, f"params/{key}.txt")
                text = text[:PARAM_VALUE_LIMIT - len(marker)] + marker
            entries.append(Param(str(key), text))
        for chunk in chunks(entries, _BATCH):
            try:
                self.client.log_batch(run_id, params=list(chunk))
            except MlflowException as exc:
                stored = self.client.get_run(run_id).data.params
                clash = [p.key for p in chunk if p.key in stored and stored[p.key] != p.value]
                if clash:
                    raise ValueError(
                        f"run {run_id} already has params {clash} with other values (stored "
                        f"{[stored[k] for k in clash]}); params never change: start a new run or "
                        "log the new values as metrics or tags") from None
                raise ValueError(f"MLflow rejected params {[p.key for p in chunk][:10]} of run "
                                 f"{run_id}: {exc.message}") from None

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None,
                    run_id: str | None = None) -> None:
        """Log numeric metrics at `step` (0 when None); ValueError naming a non-numeric one."""
        self._log_entries(_metric_entries(metrics, int(step or 0), int(time.time() * 1000)),
                          run_id or self.run_id)

    def log_task_metrics(self, task_id: int, metrics: Mapping[str, Any],
                         run_id: str | None = None, prefix: str = "task") -> None:
        """Per-task metrics as `task/<name>` at step = task_id, so MLflow plots them per task."""
        self.log_tasks_metrics([(task_id, metrics)], run_id=run_id, prefix=prefix)

    def log_tasks_metrics(self, rows: Iterable[tuple[int, Mapping[str, Any]]],
                          run_id: str | None = None, prefix: str = "task") -> None:
        """`log_task_metrics` for many tasks in batches of MLflow's largest size: one call per
        task costs a store transaction each (seconds at thousands of tasks)."""
        now = int(time.time() * 1000)
        entries: list[Metric] = []
        for task_id, metrics in rows:
            if (isinstance(task_id, bool) or not isinstance(task_id, (int, np.integer))
                    or task_id < 0):
                raise ValueError(f"task_id must be a non-negative integer, got {task_id!r}")
            entries += _metric_entries({f"{prefix}/{k}": v for k, v in metrics.items()},
                                       int(task_id), now)
        self._log_entries(entries, run_id or self.run_id)

    def _log_entries(self, entries: list[Metric], run_id: str | None) -> None:
        for chunk in chunks(entries, _METRIC_BATCH):
            try:
                self.client.log_batch(run_id, metrics=list(chunk))
            except MlflowException as exc:
                raise ValueError(f"MLflow rejected metrics {[m.key for m in chunk][:10]} of run "
                                 f"{run_id}: {exc.message}") from None

    def set_tags(self, tags: Mapping[str, Any], run_id: str | None = None) -> None:
        """Set run tags (values as strings; tags, unlike params, may be overwritten)."""
        run_id = run_id or self.run_id
        entries = [RunTag(str(k), as_text(v)) for k, v in tags.items()]
        for chunk in chunks(entries, _BATCH):
            self.client.log_batch(run_id, tags=list(chunk))

    def log_dataset(self, name: str, digest: str, source: Mapping[str, Any],
                    profile: Mapping[str, Any], context: str, run_id: str | None = None) -> None:
        """The data a run used, as an MLflow dataset input (name, content digest, where it came
        from, its sizes), so runs on the same data are recognisable in the UI and by search."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest[:36], source_type="local",
                          source=json.dumps(dict(source)), profile=json.dumps(dict(profile)))
        self.client.log_inputs(run_id or self.run_id, datasets=[DatasetInput(
            dataset, tags=[InputTag("mlflow.data.context", context)])])

    def log_table(self, rows: list[Mapping[str, Any]], artifact_file: str,
                  run_id: str | None = None) -> None:
        """Rows (one per task, say) as an MLflow table artifact, which the UI shows as a table:
        per-task values belong there, with summaries as the run's metrics."""
        import pandas as pd

        self.client.log_table(run_id or self.run_id, pd.DataFrame(list(rows)), artifact_file)

    def log_text(self, text: str, artifact_file: str, run_id: str | None = None) -> None:
        """Store `text` as the run artifact `artifact_file` (e.g. "config.yaml")."""
        self.client.log_text(run_id or self.run_id, text, artifact_file)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str,
                 run_id: str | None = None) -> None:
        """Store `data` as a JSON (or YAML, by extension) run artifact."""
        self.client.log_dict(run_id or self.run_id, dict(data), artifact_file)

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None,
                     run_id: str | None = None) -> None:
        """Copy a local file or folder into the run's artifacts (under `artifact_path`)."""
        local = Path(path)
        if not local.exists():
            raise FileNotFoundError(f"artifact {local} does not exist")
        run_id = run_id or self.run_id
        if local.is_dir():
            self.client.log_artifacts(run_id, str(local), artifact_path)
        else:
            self.client.log_artifact(run_id, str(local), artifact_path)

    def get_run(self, run_id: str | None = None) -> Any:
        """The MLflow Run entity (info, data.params, data.metrics, data.tags)."""
        return self.client.get_run(run_id or self.run_id)


def run_name(experiment: str, job: str, num_tasks: int | None = None,
             density: float | str | None = None, when: float | None = None) -> str:
    """A run name people can tell apart in a list of runs: experiment, job, tasks, density
    (a number for top-k masks, the rule's name when training learns it) and a UTC time stamp,
    e.g. "quickstart-run-20tasks-threshold-1207T0931"."""
    parts = [experiment, job]
    if num_tasks is not None:
        parts.append(f"{num_tasks}tasks")
    if isinstance(density, (int, float)):
        parts.append(f"d{density:g}")
    elif density:
        parts.append(str(density))
    parts.append(time.strftime("%m%dT%H%M", time.gmtime(time.time() if when is None else when)))
    return "-".join(parts)[:250]


@functools.cache
def standard_tags() -> dict[str, str]:
    """The tags MLflow's own fluent API sets, so the UI shows who ran what from where: user,
    source (the command line), source type, the git commit of the working folder when it is a
    git checkout, and this project's version."""
    import getpass
    import shlex
    import subprocess
    import sys
    from importlib.metadata import PackageNotFoundError, version

    tags = {"mlflow.user": getpass.getuser(), "mlflow.source.type": "LOCAL",
            "mlflow.source.name": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500]}
    try:
        tags["supsup.version"] = version("supsup-pipeline")
    except PackageNotFoundError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    if len(commit) == 40:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _start_time(pid: int) -> str:
    """A process's start time in clock ticks since boot ("" when it does not exist), which
    tells a process from a later one that reused its PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def this_process() -> str:
    """host:pid:start time of this process (PROCESS_TAG's value)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def process_alive(owner: str) -> bool:
    """Whether the process named by a PROCESS_TAG value (of this host) still runs."""
    try:
        _, pid, started = owner.split(":")
        return not started or _start_time(int(pid)) == started  # no /proc: cannot judge
    except ValueError:
        return True  # not ours to judge


def _metric_entries(metrics: Mapping[str, Any], step: int, now: int) -> list[Metric]:
    """MLflow metrics of numeric values; ValueError naming the first that is not a number."""
    entries = []
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise ValueError(f"metric {key!r} must be a number, got {value!r} "
                             f"({type(value).__name__})")
        entries.append(Metric(str(key), float(value), now, step))
    return entries


class TaskMetricsBuffer:
    """Per-task metrics of a long job, logged in batches at most every `every_s` seconds and
    on `flush()`: as tasks finish they show up in MLflow within that delay, and thousands of
    tasks cost tens of store transactions rather than one each."""

    def __init__(self, tracker: Tracker, every_s: float = 10.0, prefix: str = "task") -> None:
        self.tracker, self.every_s, self.prefix = tracker, every_s, prefix
        self._rows: list[tuple[int, dict[str, Any]]] = []
        self._last = time.monotonic()

    def add(self, task_id: int, metrics: Mapping[str, Any]) -> None:
        self._rows.append((task_id, dict(metrics)))
        if time.monotonic() - self._last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        rows, self._rows = self._rows, []
        self._last = time.monotonic()
        if rows:
            self.tracker.log_tasks_metrics(rows, prefix=self.prefix)
