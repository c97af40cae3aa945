"""`supsup sweep CONFIG`: hyper-parameter search with Ray Tune, tracked in MLflow.

The search space is data (the config's `sweep` section), keyed by dotted config paths:
`train.density: {grid: [0.05, 0.1]}`, `train.lr: {loguniform: [1e-4, 1e-2]}`, `choice: [..]`,
`uniform: [low, high]`. Before any trial starts every key is checked to name a config field and
every grid/choice value and both bounds of every range are applied to the config and validated,
so `train.density: {grid: [0, 0.1]}` fails at once, naming `train.density`.

Each trial is a thin function around `supsup.train.train_group`: it rebuilds the config with its
values, carves a validation split off the *train* data (the test split never takes part in
selection), trains a few sample tasks vectorised and reports, at every log point, the mean
validation accuracy with the mask density and the bytes a task's masks take (bit-packed, and
zlib-compressed: a sparse mask compresses, which is what lower densities buy; the paper's
Section 3.5 trades accuracy for bytes the same way). Reporting at every log point lets ASHA stop
poor trials early.

Only the driver writes to MLflow (a Tune callback): one parent run per sweep and a child run per
trial with its values as params and its metrics by training step. At the end the best setting is
written as a full config (`runs/<name>/sweep/best.yaml`, name suffixed `-best`) that `supsup train`
accepts, beside a CSV/JSON of all trials and two plots: validation accuracy against density and
against compressed bytes per task.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import ExperimentConfig, SweepDomain, SweepSection
    from pipeline.tracking import Tracker
    from supsup.scores import TaskScores
    from supsup.tasks import TaskSet

log = logging.getLogger(__name__)

REPORTED = ("val_accuracy", "train_accuracy", "train_loss", "density", "stored_bytes_per_task",
            "compressed_bytes_per_task")
_COLUMNS = ("trial_id", "run_id", "status", *REPORTED, "train_step", "steps", "log_points",
            "error")


# ------------------------------------------------------------------------- space and checks
def with_values(config: ExperimentConfig, values: dict[str, Any],
                source: str = "sweep") -> ExperimentConfig:
    """`config` with dotted keys set to `values`, validated like a config file."""
    from pipeline.config import parse_config, set_dotted

    raw = config.model_dump()
    for key, value in values.items():
        raw = set_dotted(raw, key.split("."), _plain(value), source)
    return parse_config(raw, source)


def _sweep(config: ExperimentConfig) -> SweepSection:
    if config.sweep is None:
        raise ValueError(f"config {config.name!r} has no sweep section: add `sweep: {{space: "
                         "{train.density: {grid: [0.05, 0.1]}}}}` (see configs/sweep_density.yaml)")
    return config.sweep


def _probe_values(domain: SweepDomain) -> list[Any]:
    """The values that decide whether a domain is valid: every listed value, both bounds."""
    return list(domain.grid or domain.choice or domain.uniform or domain.loguniform or [])


def validate_space(config: ExperimentConfig) -> list[ExperimentConfig]:
    """Check every value of the search space against the config; returns the probed configs.

    Each key's values are applied on top of a reference setting (every other key at its first
    value, so a rule and its density are checked together). ConfigError names the key.
    """
    from pipeline.config import ConfigError, get_dotted

    sweep = _sweep(config)

    def probe(values: dict[str, Any], key: str, value: Any) -> ExperimentConfig:
        try:
            return with_values(config, values, "the config with it")
        except ConfigError as err:
            raise ConfigError(f"sweep.space: {key} = {value!r} is not a valid value for {key} "
                              f"({err}); fix the search space") from None

    reference = {k: _probe_values(d)[0] for k, d in sweep.space.items()}
    try:
        probes = [with_values(config, reference, "the first swept values")]
    except ConfigError as err:
        for key, value in reference.items():  # name the key whose value fails on its own
            probe({key: value}, key, value)
        raise ConfigError(f"sweep.space: the first value of every key together is not a valid "
                          f"config: {err}") from None
    for key, domain in sweep.space.items():
        for value in _probe_values(domain):
            probes.append(probe({**reference, key: value}, key, value))
            ranged = domain.uniform is not None or domain.loguniform is not None
            if ranged and isinstance(get_dotted(probes[-1], key), int):
                raise ConfigError(f"sweep.space: {key} is an integer field; a uniform or "
                                  "loguniform range draws fractions: use grid or choice")
    for checked in probes:
        trial_task_ids(checked)
        if checked.train.epochs is None and checked.train.steps < 1:
            raise ConfigError("a sweep trial needs train.steps >= 1 (or train.epochs): it is "
                              "scored at its log points")
    return probes


def trial_task_ids(config: ExperimentConfig) -> list[int]:
    """The tasks each trial trains: `sweep.tasks`, else the first `sweep.sample_tasks` ids."""
    sweep = _sweep(config)
    n = config.tasks.num_tasks
    if sweep.tasks is not None:
        outside = [t for t in sweep.tasks if t >= n]
        if outside:
            raise ValueError(f"sweep.tasks: tasks {outside} are outside the {n} tasks of "
                             f"tasks.num_tasks (ids 0..{n - 1})")
        return list(sweep.tasks)
    if sweep.sample_tasks > n:
        raise ValueError(f"sweep.sample_tasks ({sweep.sample_tasks}) exceeds tasks.num_tasks "
                         f"({n}); lower it or list sweep.tasks")
    return list(range(sweep.sample_tasks))


def param_space(sweep: SweepSection) -> dict[str, Any]:
    """The Tune search space of a sweep section."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, d in sweep.space.items():
        if d.grid is not None:
            space[key] = tune.grid_search(list(d.grid))
        elif d.choice is not None:
            space[key] = tune.choice(list(d.choice))
        elif d.uniform is not None:
            space[key] = tune.uniform(*d.uniform)
        else:
            assert d.loguniform is not None
            space[key] = tune.loguniform(*d.loguniform)
    return space


def _log_points(config: ExperimentConfig, train_size: int) -> int:
    steps = config.train_config().num_steps(train_size)
    return max(1, math.ceil(steps / config.train.log_every))


# ------------------------------------------------------------------------------- the trial
def validation_tasks(config: ExperimentConfig) -> TaskSet:
    """The config's tasks with `sweep.val_fraction` of the train data held out as their "test"
    split: trials select on it, and the real test data is never seen."""
    from pipeline.experiment import build_tasks
    from supsup.tasks import split_data

    sweep = _sweep(config)
    tasks = build_tasks(config)
    return build_tasks(config, split_data(tasks.data["train"], sweep.val_fraction, config.seed))


def mask_bytes(scores: TaskScores) -> dict[str, float]:
    """Bytes per task of the current masks: bit-packed (num_weights / 8, rounded up per layer)
    and zlib-compressed (mean over the group's tasks)."""
    from supsup.masks import pack_bits

    packed = [pack_bits(scores.hard_mask(k).cpu(), group_dims=1) for k in scores.keys]  # (G, B)
    stored = sum(p.shape[1] for p in packed)
    compressed = [
        len(zlib.compress(b"".join(p[i].numpy().tobytes() for p in packed), 9))
        for i in range(scores.group)
    ]
    return {"stored_bytes_per_task": float(stored),
            "compressed_bytes_per_task": sum(compressed) / len(compressed)}


def sweep_trial(params: dict[str, Any], config_data: dict[str, Any]) -> None:
    """One Tune trial: train the sample tasks with `params` and report at every log point."""
    import torch
    from ray import tune

    from pipeline.cluster import worker_threads
    from pipeline.config import ExperimentConfig
    from pipeline.experiment import build_net, build_spec
    from pipeline.jobs.devices import worker_device
    from supsup.evaluate import scores_accuracy
    from supsup.train import TrainProgress, train_group

    config = with_values(ExperimentConfig.model_validate(config_data), params, "sweep trial")
    torch.set_num_threads(worker_threads(config.cluster))
    device = worker_device(config.cluster)
    tasks = validation_tasks(config)
    net = build_net(build_spec(config, tasks))
    latest: dict[str, float] = {}

    def validate(scores: TaskScores) -> list[float]:
        densities = scores.densities_per_task()
        latest.update(density=sum(densities) / len(densities), **mask_bytes(scores))
        return scores_accuracy(net, scores, tasks, split="test")  # the held-out train rows

    def report(p: TrainProgress) -> None:
        assert p.val_accuracy is not None
        tune.report({
            "val_accuracy": sum(p.val_accuracy) / len(p.val_accuracy),
            "train_accuracy": sum(p.accuracy) / len(p.accuracy),
            "train_loss": sum(p.loss) / len(p.loss),
            "train_step": p.step, "steps": p.steps, **latest,
        })

    train_group(net, tasks, trial_task_ids(config), config.train_config(), device=device,
                callback=report, validate=validate)


# --------------------------------------------------------------------------- the driver
@dataclass
class SweepSummary:
    """What a sweep did: one row per trial, the best one, and where everything was written."""

    keys: list[str]
    metric: str
    mode: str
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_config: Path | None
    files: dict[str, Path] = field(default_factory=dict)
    run_id: str | None = None
    storage: Path | None = None
    seconds: float = 0.0


def _plain(value: Any) -> Any:
    """Numpy scalars and tuples as plain Python, for YAML, JSON and MLflow."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


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


def _describe(params: dict[str, Any], keys: list[str]) -> str:
    return " ".join(f"{k}={_fmt(params.get(k))}" for k in keys)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(_plain(value))


def _rows(results: Any, keys: list[str], runs: dict[str, str]) -> list[dict[str, Any]]:
    """One plain row per trial from Tune's ResultGrid."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or next(
            (t for t in runs if result.path and t in Path(result.path).name), "")
        row: dict[str, Any] = {"trial_id": trial_id, "run_id": runs.get(trial_id)}
        row.update({k: _plain((result.config or {}).get(k)) for k in keys})
        row.update({k: _plain(metrics.get(k)) for k in REPORTED})
        row["train_step"] = metrics.get("train_step")
        row["steps"] = metrics.get("steps")
        row["log_points"] = metrics.get("training_iteration")
        if result.error is not None:
            row["status"] = "error"
            row["error"] = str(result.error).strip().splitlines()[-1][:300]
        else:
            done = (row["train_step"] or 0) >= (row["steps"] or math.inf)
            row["status"] = "completed" if done else "stopped early"
            row["error"] = None
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial_id"])


def _best(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    scored = [r for r in rows if r["status"] != "error" and r.get(metric) is not None
              and not math.isnan(r[metric])]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda r: r[metric])


def best_config(config: ExperimentConfig, best: dict[str, Any], keys: list[str]
                ) -> ExperimentConfig:
    """The base config with the best values, named `<name>-best`, ready for `supsup train`."""
    values: dict[str, Any] = {k: best[k] for k in keys}
    values["name"] = f"{config.name}-best"
    values["sweep"] = None
    if config.registry.bank:
        values["registry.bank"] = f"{config.registry.bank}-best"
    return with_values(config, values, "best sweep config")


def write_results(summary: SweepSummary, out_dir: Path) -> dict[str, Path]:
    """trials.csv and trials.json (every trial, the best one marked)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = [*_COLUMNS[:3], *summary.keys, *_COLUMNS[3:]]
    csv_path = out_dir / "trials.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in summary.rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v
                             for k, v in row.items() if k in columns})
    json_path = out_dir / "trials.json"
    json_path.write_text(json.dumps({
        "metric": summary.metric, "mode": summary.mode, "keys": summary.keys,
        "best": summary.best, "trials": summary.rows,
    }, indent=1, default=str))
    return {"csv": csv_path, "json": json_path}


def plot_sweep(summary: SweepSummary, out_dir: Path) -> dict[str, Path]:
    """Validation accuracy against mask density and against compressed bytes per task."""
    rows = [r for r in summary.rows if r["status"] != "error" and r.get("val_accuracy") is not None]
    if not rows:
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, x_key, label in (
        ("accuracy_vs_density", "density", "mask density (fraction of weights kept)"),
        ("accuracy_vs_bytes", "compressed_bytes_per_task", "bytes per task (zlib-compressed)"),
    ):
        fig, ax = plt.subplots(figsize=(5, 3.4), dpi=110)
        for status, marker in (("completed", "o"), ("stopped early", "x")):
            sel = [r for r in rows if r["status"] == status]
            if sel:
                ax.plot([r[x_key] for r in sel], [100 * r["val_accuracy"] for r in sel],
                        marker, linestyle="none", label=status)
        if summary.best is not None:
            ax.plot(summary.best[x_key], 100 * summary.best["val_accuracy"], "*", markersize=14,
                    color="crimson", label="best")
        if x_key == "compressed_bytes_per_task":
            stored = {r["stored_bytes_per_task"] for r in rows}
            if len(stored) == 1:
                ax.axvline(stored.pop(), linestyle="--", color="grey", label="bit-packed")
            xs = [r[x_key] for r in rows]
            if min(xs) > 0 and max(xs) / min(xs) > 10:
                ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        files[name] = path
    return files


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


def run_sweep(config: ExperimentConfig, *, address: str | None = None) -> SweepSummary:
    """Run the config's sweep on Ray Tune; log to MLflow; write best.yaml, results and plots.

    Everything about the space is validated before Ray, MLflow or any folder is touched.
    """
    from pipeline.cluster import ray_session, worker_slots
    from pipeline.config import dump_config
    from pipeline.tracking import Tracker

    sweep = _sweep(config)
    probes = validate_space(config)
    keys = list(sweep.space)
    max_t = _max_log_points(config, probes)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the newer console output ignores verbose
    out_dir = config.run_dir / "sweep"
    storage = (out_dir / "tune").resolve()
    start = time.perf_counter()
    with ray_session(config.cluster, address) as resources:
        worker_slots(config.cluster, resources)  # a GPU request the cluster cannot meet fails here
        config.run_dir.mkdir(parents=True, exist_ok=True)
        tracker = Tracker(config.tracking_uri, config.experiment_name)
        with tracker.run("sweep", tags={"job": "sweep", "metric": sweep.metric}) as parent_id:
            tracker.log_params(config.flat_params(), run_id=parent_id)
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


# ------------------------------------------------------------------------------------- CLI
def format_table(summary: SweepSummary) -> str:
    """The trials as a small text table, best first."""
    headers = ["trial", *summary.keys, "val_acc", "density", "packed B", "zlib B", "status"]
    order = sorted(summary.rows, key=lambda r: (r is not summary.best, r["trial_id"]))
    lines = []
    for r in order:
        mark = "*" if r is summary.best else " "
        lines.append([
            f"{mark}{r['trial_id']}", *(_fmt(r.get(k)) for k in summary.keys),
            _pct(r.get("val_accuracy")), _fmt(r.get("density")),
            _bytes(r.get("stored_bytes_per_task")), _bytes(r.get("compressed_bytes_per_task")),
            r["status"],
        ])
    widths = [max(len(h), *(len(str(row[i])) for row in lines)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*headers), *(fmt.format(*row) for row in lines)])


def _bytes(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def cmd_sweep(args: argparse.Namespace) -> int:
    """`supsup sweep CONFIG [--set K=V] [--address A]`: run the sweep, print the trials."""
    from pipeline.config import load_config

    config = load_config(args.config, args.set or [])
    summary = run_sweep(config, address=args.address)
    print(format_table(summary))
    assert summary.best is not None and summary.best_config is not None
    print(f"best {summary.metric} {_fmt(summary.best[summary.metric])} with "
          f"{_describe(summary.best, summary.keys)} ({len(summary.rows)} trials, "
          f"{summary.seconds:.0f} s)")
    print(f"best config: {summary.best_config} (train it with `supsup train "
          f"{summary.best_config}`)")
    print(f"results: {summary.files['csv']}; MLflow: {config.tracking_uri} "
          f"(experiment {config.experiment_name}, run {summary.run_id})")
    return 0


def add_sweep_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `sweep` to the `supsup` sub-commands (an argparse subparsers object)."""
    p = subparsers.add_parser("sweep", help="hyper-parameter search over the config's `sweep` "
                              "space with Ray Tune; writes the best config")
    p.add_argument("config")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--address", help="join the Ray cluster at ADDRESS instead of a local one")
    p.set_defaults(fn=cmd_sweep)
    return p


__all__ = [
    "SweepSummary", "add_sweep_parser", "best_config", "cmd_sweep", "mask_bytes",
    "param_space", "run_sweep", "sweep_trial", "trial_task_ids", "validate_space",
    "validation_tasks", "with_values",
]
