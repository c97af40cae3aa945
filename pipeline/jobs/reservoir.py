"""The reservoir job: tasks learned as neuron gates, stored in a constant-size Hopfield reservoir
and recalled from test batches alone (the paper's Section 3.5, `supsup.hopfield`).

Flow: Ray workers learn each task's gates on the fixed gated network input-d-d-outputs (one Ray
task per task; they are independent given the seed) and return them bit-packed; a capacity-curve
worker runs beside them. The driver writes every task's pattern into the reservoir in task order
(Storkey rule, one d x d matrix per gated layer) and stores it in the mask registry as the bank's
`reservoir.parquet`, whose size does not depend on the number of tasks: no per-task mask file is
written. Recall workers then read the reservoir back from the registry and recall each task's
gates from its unlabelled test batches. The driver compares the recalled gates with the stored
ones (Hamming distance, nearest stored task, accuracy with either) and writes
runs/<name>/hopfield/report.json, capacity.json and capacity.png; it is the only MLflow writer.

The per-task gates exist only in this job's memory, to measure recall against them: after it, the
reservoir is the whole stored state, as the paper intends.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.builders import build_tasks, tracked_run
from pipeline.cluster import ray_session, remote_options, worker_threads
from pipeline.config import ExperimentConfig
from pipeline.jobs.devices import worker_device
from pipeline.jobs.fanout import fan_out
from pipeline.registry import MaskRegistry, ReservoirRegistry
from supsup.networks import NetworkSpec
from supsup.tasks import TaskSet

log = logging.getLogger(__name__)

STORAGE_RULE = "storkey"  # how supsup.hopfield.HopfieldReservoir.store writes a pattern


# ----------------------------------------------------------------------------- settings
def gated_widths(config: ExperimentConfig) -> tuple[int, ...]:
    """Widths of the gated layers: network.hidden, or [d, d]; ValueError unless all equal d."""
    d = config.hopfield.d
    widths = tuple(config.network.hidden) or (d, d)
    if any(w != d for w in widths):
        raise ValueError(
            f"hopfield.d = {d} does not match the gated network: network.hidden = "
            f"{list(widths)}. Each gated layer is stored as a d x d Hopfield matrix, so every "
            f"hidden width must equal hopfield.d: set hopfield.d to {widths[0]} and network.hidden "
            f"to {[widths[0]] * len(widths)}, or network.hidden to {[d] * len(widths)}")
    return widths


def gated_spec(config: ExperimentConfig, tasks: TaskSet) -> NetworkSpec:
    """The base network recorded in the bank's manifest: the fc network of the same seed and
    widths has exactly the gated network's fixed weights (gates replace its weight masks)."""
    widths = gated_widths(config)
    outputs = config.network.num_outputs
    classes = config.network.num_classes or tasks.num_classes
    if outputs < tasks.num_classes or classes < tasks.num_classes:
        raise ValueError(f"network.num_outputs ({outputs}) and network.num_classes ({classes}) "
                         f"must cover the {tasks.num_classes} labels of each task")
    return NetworkSpec(name="fc", num_outputs=outputs, num_classes=classes, seed=config.seed,
                       input_shape=tuple(tasks.input_shape), hidden=widths)


def gate_layers(config: ExperimentConfig) -> dict[str, list[int]]:
    """The manifest's masked layers of a reservoir bank: one (d,) gate vector per hidden layer."""
    return {f"gates.{i}": [w] for i, w in enumerate(gated_widths(config))}


def reservoir_mask_info(config: ExperimentConfig) -> dict[str, Any]:
    return {"scenario": "hopfield", "rule": "threshold", "masks": "neuron gates",
            "storage": "hopfield reservoir", "batch_norm": "batch statistics",
            "family": config.tasks.family, "dataset": config.data.dataset}


def reservoir_recipe(config: ExperimentConfig) -> dict[str, Any]:
    """How the stored reservoir is made, as the manifest records it: how gates are learned
    (SGD) and the rule that stores them. Recall and capacity settings never change it; d and
    the widths are the manifest's layer shapes."""
    h = config.hopfield
    return {"hopfield.epochs": h.epochs, "hopfield.batch_size": h.batch_size,
            "hopfield.train_lr": h.train_lr, "hopfield.train_momentum": h.train_momentum,
            "hopfield.weight_decay": h.weight_decay, "optimizer": "sgd", "storage": STORAGE_RULE}


def capacity_counts(config: ExperimentConfig) -> tuple[int, list[int]]:
    """(d, counts) of the capacity curve: hopfield.capacity_*, by default d/64 .. d/2."""
    h = config.hopfield
    d = h.capacity_d or h.d
    counts = h.capacity_counts or sorted({max(1, round(d * f)) for f in (
        1 / 64, 1 / 32, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2)})
    return d, list(counts)


def _net(config: ExperimentConfig, tasks: TaskSet) -> Any:
    from supsup.gates import GatedNet

    return GatedNet(input_shape=tasks.input_shape, hidden=gated_widths(config),
                    num_outputs=config.network.num_outputs, seed=config.seed)


def _device(config: ExperimentConfig) -> str:
    return worker_device(config.cluster)


def _pack(gates: list[Any]) -> list[bytes]:
    """0/1 gate vectors -> numpy.packbits bytes per layer (d / 8 bytes each)."""
    import numpy as np

    return [np.packbits(g.cpu().numpy().astype(np.uint8)).tobytes() for g in gates]


def _unpack(packed: list[bytes], widths: tuple[int, ...]) -> Any:
    """Bytes per layer -> the pattern (L, d) in {-1, +1}."""
    import numpy as np
    import torch

    rows = [np.unpackbits(np.frombuffer(b, np.uint8))[:w] for b, w in zip(packed, widths)]
    return torch.from_numpy(np.stack(rows).astype(np.float32)) * 2 - 1


# ------------------------------------------------------------------------------ workers
def train_gates_worker(config_data: dict[str, Any], task_id: int) -> dict[str, Any]:
    """Runs inside a Ray worker: learn one task's gates; returns them packed with metrics."""
    import torch

    from supsup.gates import GateTrainConfig, gated_accuracy, train_gates

    config = ExperimentConfig.model_validate(config_data)
    torch.set_num_threads(worker_threads(config.cluster))
    h = config.hopfield
    tasks = build_tasks(config)
    net = _net(config, tasks).to(_device(config))
    start = time.perf_counter()
    result = train_gates(net, tasks, task_id, GateTrainConfig(
        epochs=h.epochs, batch_size=h.batch_size, lr=h.train_lr, momentum=h.train_momentum,
        weight_decay=h.weight_decay, seed=config.seed))
    accuracy = gated_accuracy(net, result.gates, tasks, task_id)
    bits = sum(g.numel() for g in result.gates)
    return {
        "task_id": task_id, "gates": _pack(result.gates), "steps": result.steps,
        "train_loss": result.loss, "train_accuracy": result.accuracy,
        "test_accuracy": accuracy, "density": sum(float(g.sum()) for g in result.gates) / bits,
        "seconds": time.perf_counter() - start,
    }


def load_reservoir(registry: MaskRegistry, bank: str, device: str = "cpu") -> Any:
    """The bank's HopfieldReservoir as stored in the registry."""
    import torch

    from supsup.hopfield import HopfieldReservoir

    arrays, meta = ReservoirRegistry(registry).read(bank)
    num_layers, d, _ = arrays["psi"].shape
    reservoir = HopfieldReservoir(d, num_layers, device)
    reservoir.psi.copy_(torch.from_numpy(arrays["psi"]))
    reservoir.pattern_sum.copy_(torch.from_numpy(arrays["pattern_sum"]))
    reservoir.num_stored = int(meta["num_stored"])
    return reservoir


def recall_worker(config_data: dict[str, Any], task_id: int) -> dict[str, Any]:
    """Runs inside a Ray worker: recall one task's gates from its test batches (no labels) with
    the reservoir read from the registry; returns them packed with the descent's record."""
    import torch

    from supsup.gates import gated_accuracy

    config = ExperimentConfig.model_validate(config_data)
    torch.set_num_threads(worker_threads(config.cluster))
    h = config.hopfield
    device = _device(config)
    tasks = build_tasks(config)
    net = _net(config, tasks).to(device)
    reservoir = load_reservoir(MaskRegistry(config.registry.root), config.bank, device)
    batches = []
    for x, _ in tasks.eval_batches(task_id, "test", h.recall_batch_size):
        if x.shape[0] >= 2:  # batch statistics need two examples
            batches.append(x)
        if len(batches) == h.recall_steps:
            break
    start = time.perf_counter()
    recalled = reservoir.recall(net, batches, steps=h.recall_steps, lr=h.lr,
                                momentum=h.momentum, gamma=h.gamma, precondition=h.precondition)
    seconds = time.perf_counter() - start
    return {
        "task_id": task_id, "gates": _pack(recalled.gates), "steps": len(recalled.trace),
        "settled_at": recalled.settled_at, "entropy_start": recalled.trace[0].entropy,
        "entropy_end": recalled.trace[-1].entropy, "energy_end": recalled.trace[-1].energy,
        "accuracy": gated_accuracy(net, recalled.gates, tasks, task_id), "seconds": seconds,
    }


def capacity_worker(config_data: dict[str, Any]) -> list[list[float]]:
    """Runs inside a Ray worker: [[stored patterns, recall rate], ...] of random patterns."""
    import torch

    from supsup.hopfield import capacity_curve

    config = ExperimentConfig.model_validate(config_data)
    torch.set_num_threads(worker_threads(config.cluster))
    d, counts = capacity_counts(config)
    curve = capacity_curve(d, counts, flip=config.hopfield.capacity_flip, seed=config.seed,
                           device=_device(config))
    return [[int(c), float(r)] for c, r in curve]


# ------------------------------------------------------------------------------- driver
def prepare_reservoir_bank(config: ExperimentConfig) -> MaskRegistry:
    """Create the bank's manifest, recipe included, or check the config against it: bad
    settings (ValueError) and a bank made with another configuration or recipe
    (BankMismatchError naming each differing setting and a new bank name) are refused before
    anything is written."""
    gated_widths(config)
    capacity_counts(config)
    spec = gated_spec(config, build_tasks(config))
    registry = MaskRegistry(config.registry.root)
    registry.create_bank(config.bank, spec.to_dict(), gate_layers(config), None,
                         reservoir_mask_info(config), reservoir_recipe(config))
    return registry


def run_reservoir(
    config: ExperimentConfig,
    *,
    progress: Callable[[int, int], None] | None = None,
    tracker: Any = None,
    address: str | None = None,
) -> dict[str, Any]:
    """Learn, store, recall and measure every task of `config` through the Hopfield reservoir.

    `progress(done, total)` counts 2 x num_tasks units: each task's gates learned, then each
    task recalled. `tracker` is a pipeline.tracking.Tracker: a run "hopfield" gets the config,
    metrics, the report files and the reservoir file. Returns the summary (recall accuracy,
    Hamming distances, reservoir size, files, run_id).
    """
    from supsup.hopfield import HopfieldReservoir

    widths = gated_widths(config)  # bad settings fail here, before Ray starts
    registry = prepare_reservoir_bank(config)
    task_ids = list(range(config.tasks.num_tasks))
    tags = {"job": "hopfield", "scenario": "hopfield", "bank": config.bank}
    with tracked_run(tracker, "hopfield", tags, config) as run_id:
        start = time.perf_counter()
        config_data = config.model_dump()
        total = 2 * len(task_ids)
        with ray_session(config.cluster, address):
            trained, capacity = _train_all(config, config_data, task_ids, progress, total)
            reservoir = HopfieldReservoir(widths[0], len(widths))
            for t in task_ids:
                reservoir.store(_unpack(trained[t]["gates"], widths))
            status = ReservoirRegistry(registry).write(
                config.bank,
                {"psi": reservoir.psi.numpy(), "pattern_sum": reservoir.pattern_sum.numpy()},
                {"num_stored": reservoir.num_stored, "task_ids": task_ids, "d": reservoir.d,
                 "num_layers": reservoir.num_layers, "rule": STORAGE_RULE, "seed": config.seed})
            recalled = _recall_all(config, config_data, task_ids, progress, total)
        seconds = time.perf_counter() - start
        summary = _summarise(config, widths, trained, recalled, reservoir, status, seconds)
        out_dir = config.run_dir / "hopfield"
        files = write_reservoir_report(summary, trained, recalled, capacity, config, out_dir)
        summary["files"] = {k: str(v) for k, v in files.items()}
        summary["run_id"] = run_id
        if tracker is not None:
            _log(tracker, registry, config, summary, capacity, files)
    log.info("hopfield reservoir of bank %r: %d tasks, recall %.2f, Hamming mean %.1f bits",
             config.bank, len(task_ids), summary["recall_accuracy"], summary["hamming_mean"])
    return summary


CAPACITY = "capacity"  # the fan-out item of the capacity curve, beside the task ids


def learn_worker(config_data: dict[str, Any], item: int | str) -> Any:
    """Runs inside a Ray worker: a task's gates (`item` a task id), or the capacity curve
    (`item` is CAPACITY), so both go through one fan-out and run side by side."""
    if item == CAPACITY:
        return capacity_worker(config_data)
    return train_gates_worker(config_data, int(item))


def _train_all(config: ExperimentConfig, config_data: dict[str, Any], task_ids: list[int],
               progress: Callable[[int, int], None] | None, total: int
               ) -> tuple[dict[int, dict[str, Any]], list[list[float]]]:
    trained = _each_task(learn_worker, "learning the gates", config, config_data,
                         [CAPACITY, *task_ids], progress, total, 0)
    return trained, trained.pop(CAPACITY)


def _recall_all(config: ExperimentConfig, config_data: dict[str, Any], task_ids: list[int],
                progress: Callable[[int, int], None] | None, total: int) -> dict[int, Any]:
    return _each_task(recall_worker, "recall", config, config_data, task_ids, progress, total,
                      len(task_ids))


def _each_task(worker: Callable[..., Any], what: str, config: ExperimentConfig,
               config_data: dict[str, Any], items: list[Any],
               progress: Callable[[int, int], None] | None, total: int,
               done_before: int) -> dict[Any, Any]:
    """`worker(config_data, item)` for every item (a task id, or CAPACITY) on the shared
    fan-out; progress counts the tasks."""
    out: dict[Any, Any] = {}

    def on_result(item: int | str, result: Any) -> None:
        out[item] = result
        if progress and item != CAPACITY:
            progress(done_before + len(out) - (CAPACITY in out), total)

    def describe(item: int | str) -> str:
        return "the capacity curve" if item == CAPACITY else f"{what} of task {item}"

    if progress:
        progress(done_before, total)
    fan_out(worker, items, lambda item: (config_data, item),
            options=remote_options(config.cluster, config.train.max_retries),
            on_result=on_result, describe=describe)
    return out


def _summarise(config: ExperimentConfig, widths: tuple[int, ...], trained: dict[int, Any],
               recalled: dict[int, Any], reservoir: Any, status: str,
               seconds: float) -> dict[str, Any]:
    """The summary over tasks, with one row per task under "tasks"."""
    import torch

    ids = sorted(trained)
    stored = torch.stack([_unpack(trained[t]["gates"], widths) for t in ids])  # (T, L, d)
    bits = stored[0].numel()
    rows = []
    for i, t in enumerate(ids):
        back = _unpack(recalled[t]["gates"], widths)  # (L, d)
        distance = (stored != back).flatten(1).sum(1)  # (T,) bits from each stored task
        own = int(distance[i])
        others = [int(v) for j, v in enumerate(distance.tolist()) if j != i]
        nearest = ids[int(distance.argmin())]
        rows.append({
            "task_id": t, "hamming": own, "hamming_fraction": own / bits,
            "nearest_task": nearest, "nearest_other": min(others) if others else None,
            "recalled_right": own < min(others) if others else True,
            "exact": own == 0, "steps": recalled[t]["steps"],
            "settled_at": recalled[t]["settled_at"],
            "entropy_start": recalled[t]["entropy_start"],
            "entropy_end": recalled[t]["entropy_end"],
            "train_accuracy": trained[t]["train_accuracy"],
            "accuracy_stored": trained[t]["test_accuracy"],
            "accuracy_recalled": recalled[t]["accuracy"],
            "density": trained[t]["density"], "train_seconds": trained[t]["seconds"],
            "recall_seconds": recalled[t]["seconds"],
        })
    n = len(rows)
    return {
        "bank": config.bank,
        "registry_root": config.registry.root,
        "reservoir_status": status,
        "num_stored": reservoir.num_stored,
        "d": reservoir.d,
        "num_layers": reservoir.num_layers,
        "reservoir_bytes": reservoir.nbytes(),
        "recall_accuracy": sum(r["recalled_right"] for r in rows) / n,
        "recall_exact": sum(r["exact"] for r in rows) / n,
        "hamming_mean": sum(r["hamming"] for r in rows) / n,
        "hamming_max": max(r["hamming"] for r in rows),
        "hamming_fraction_mean": sum(r["hamming_fraction"] for r in rows) / n,
        "settled_at_mean": sum(r["settled_at"] for r in rows) / n,
        "recall_steps": config.hopfield.recall_steps,
        "accuracy_stored_mean": sum(r["accuracy_stored"] for r in rows) / n,
        "accuracy_recalled_mean": sum(r["accuracy_recalled"] for r in rows) / n,
        "accuracy_drop_max": max(r["accuracy_stored"] - r["accuracy_recalled"] for r in rows),
        "seconds": seconds,
        "tasks": rows,
    }


# ------------------------------------------------------------------------------ reports
def write_reservoir_report(summary: dict[str, Any], trained: dict[int, Any],
                           recalled: dict[int, Any], capacity: list[list[float]],
                           config: ExperimentConfig, out_dir: Path) -> dict[str, Path]:
    """report.json (everything), capacity.json and capacity.png under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    d, _ = capacity_counts(config)
    curve = {"d": d, "flip": config.hopfield.capacity_flip,
             "curve": [{"stored": int(c), "recall_rate": r} for c, r in capacity]}
    report = {
        "summary": {k: v for k, v in summary.items() if k not in ("tasks", "files", "run_id")},
        "settings": config.hopfield.model_dump(),
        "tasks": summary["tasks"],
        "capacity": curve,
    }
    files = {"json": out_dir / "report.json", "capacity_json": out_dir / "capacity.json"}
    files["json"].write_text(json.dumps(report, indent=1))
    files["capacity_json"].write_text(json.dumps(curve, indent=1))
    from pipeline.report import plot_capacity

    files["capacity"] = plot_capacity(capacity, d, config.hopfield.capacity_flip,
                                      out_dir / "capacity.png")
    return files


def _log(tracker: Any, registry: MaskRegistry, config: ExperimentConfig, summary: dict[str, Any],
         capacity: list[list[float]], files: dict[str, Path]) -> None:
    tracker.log_metrics({k: float(v) for k, v in summary.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
    tracker.log_tasks_metrics((r["task_id"], {
        k: float(r[k]) for k in ("hamming", "settled_at", "train_accuracy",
                                 "accuracy_stored", "accuracy_recalled", "recalled_right")})
        for r in summary["tasks"])
    for count, rate in capacity:
        tracker.log_metrics({"capacity/recall_rate": rate}, step=int(count))
    for path in files.values():
        tracker.log_artifact(path, "hopfield")
    with tempfile.TemporaryDirectory(prefix="supsup-reservoir-") as tmp:
        path = ReservoirRegistry(registry).copy(config.bank, Path(tmp) / "reservoir.parquet")
        tracker.log_artifact(path, "hopfield")
