"""The discovery job: training without task identity (the paper's NNs scenario, Section 3.4).

A stream of unnamed tasks is sequential by nature (each allocation decision depends on every mask
trained before it), so the whole stream runs as one Ray task: the worker rebuilds the tasks and
the base network from the config, streams `discovery.batches_per_task` batches of every task of
`discovery.task_order` with the task ids hidden (`supsup.discovery.stream_from_tasks`), lets
`supsup.discovery.MaskDiscovery` allocate and train masks, and writes every discovered mask to the
mask registry under its mask id. Each mask's metadata records the stretches of the stream it
trained on, its majority true task and its purity; the true task ids serve only this record and
never reach the learner. A second Ray task loads the discovered bank back from the registry and
measures test accuracy with one-shot inference among the discovered masks
(`supsup.discovery.evaluate_discovered`), so what is measured is what was stored.

Only the config, progress fractions and small dicts cross Ray's object store. The driver writes
runs/<name>/discovery/report.json and discovery.png (the mask trained on each batch against the
true task, with the allocation points) and is the only MLflow writer.

A stream's state (scores and optimisers of every mask) is not checkpointed, so a run starts from
an empty bank: a bank that already holds masks is refused instead of being mixed with a new run.
The bank's manifest records how the stream trains (`discovery_recipe`), so a bank made with
another recipe is refused by name too, before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.builders import build_net, build_spec, build_tasks, tracked_run
from pipeline.cluster import ray_session, remote_options, worker_threads
from pipeline.config import ExperimentConfig
from pipeline.jobs.devices import worker_device
from pipeline.jobs.fanout import fan_out
from pipeline.jobs.progress import BoardReader, poster, start_board
from pipeline.registry import MaskRegistry, load_bank
from supsup.discovery import DiscoveryConfig

log = logging.getLogger(__name__)

MAX_CURVE_POINTS = 200  # stream-curve points logged to MLflow (the JSON report keeps them all)


# ----------------------------------------------------------------------------- settings
def discovery_config(config: ExperimentConfig) -> DiscoveryConfig:
    """The allocation rule and mask training of `config` (ValueError naming a bad field)."""
    d = config.discovery
    train = config.train_config()
    if d.lr is not None:
        train = dataclasses.replace(train, lr=d.lr)
    if config.train.schedule != "constant" or config.train.warmup_steps:
        raise ValueError("discovery trains on an open-ended stream: set train.schedule to "
                         "'constant' and train.warmup_steps to 0")
    return DiscoveryConfig(check_every=d.check_every, budget=d.budget,
                           min_candidates=d.min_candidates, eps=d.eps, train=train)


def stream_order(config: ExperimentConfig) -> list[int]:
    """The true tasks in stream order: discovery.task_order, or every task once, in order."""
    order = config.discovery.task_order or list(range(config.tasks.num_tasks))
    bad = sorted({t for t in order if t >= config.tasks.num_tasks})
    if bad:
        raise ValueError(f"discovery.task_order names tasks {bad}, but tasks.num_tasks is "
                         f"{config.tasks.num_tasks}: use ids 0..{config.tasks.num_tasks - 1}")
    return list(order)


def discovery_mask_info(config: ExperimentConfig) -> dict[str, Any]:
    """The manifest's mask description: the gg_gn one plus the scenario and allocation rule."""
    d = config.discovery
    return {**config.mask_info(), "scenario": "nns", "check_every": d.check_every,
            "budget": d.budget, "min_candidates": d.min_candidates, "eps": d.eps}


def discovery_recipe(config: ExperimentConfig) -> dict[str, Any]:
    """How the stream trains its masks, as the bank's manifest records it: the train settings
    `supsup.discovery` reads (optimiser, weight decay, the stream's batch size; not steps,
    epochs, precision or fused, which it never reads), the learning rate it uses
    (discovery.lr, else train.lr) and the stream (batches per task, task order). The allocation
    rule is in the mask description already (`discovery_mask_info`)."""
    t, d = config.train, config.discovery
    recipe: dict[str, Any] = {"optimizer": t.optimizer, "batch_size": t.batch_size}
    if t.optimizer == "sgd":
        recipe["momentum"] = t.momentum
    recipe.update({"weight_decay": t.weight_decay, "discovery.lr": t.lr if d.lr is None else d.lr,
                   "discovery.batches_per_task": d.batches_per_task,
                   "discovery.task_order": stream_order(config)})
    return recipe


def prepare_discovery_bank(config: ExperimentConfig) -> MaskRegistry:
    """Create the bank's manifest, recipe included; BankMismatchError when the bank was made
    with another configuration or recipe (naming each differing setting and a new bank name),
    ValueError when it already holds masks. Both before anything is written."""
    tasks = build_tasks(config)
    spec = build_spec(config, tasks)
    net = build_net(spec)
    registry = MaskRegistry(config.registry.root)
    registry.create_bank(config.bank, spec.to_dict(), net.layer_shapes(), net.bn_features(),
                         discovery_mask_info(config), discovery_recipe(config))
    held = registry.tasks(config.bank)
    if held:
        raise ValueError(
            f"bank {config.bank!r} in {config.registry.root} already holds {len(held)} "
            "discovered masks; a discovery run starts from an empty bank (the stream's state is "
            "not checkpointed): set registry.bank to a new name, or move the bank folder away")
    return registry


# ------------------------------------------------------------------------------ workers
def _device(config: ExperimentConfig) -> str:
    return worker_device(config.cluster)


def discover_worker(config_data: dict[str, Any], board: Any = None) -> dict[str, Any]:
    """Runs inside a Ray worker: the whole stream, then every discovered mask into the registry.

    `board` (a ProgressBoard actor handle, optional) receives the fraction of the stream fed at
    every check. Returns the record of the stream: segments, allocation points, one entry per
    check, the allocation report against the true tasks and one small dict per mask.
    """
    import torch

    from supsup.discovery import (
        MaskDiscovery,
        allocation_report,
        stream_from_tasks,
        stream_task_labels,
    )

    config = ExperimentConfig.model_validate(config_data)
    torch.set_num_threads(worker_threads(config.cluster))
    device = _device(config)
    tasks = build_tasks(config)
    net = build_net(build_spec(config, tasks)).to(device)
    order = stream_order(config)
    bpt = config.discovery.batches_per_task
    learner = MaskDiscovery(net, discovery_config(config))
    stream = stream_from_tasks(tasks, order, bpt, config.train.batch_size, seed=config.seed)
    post = poster(board, "stream") if board is not None else None
    total = len(order) * bpt
    for i, (x, y) in enumerate(stream):
        if learner.feed(x, y) is not None and post is not None:
            post((i + 1) / total)
    result = learner.result()
    if post is not None:
        post(1.0)
    truth = stream_task_labels(order, bpt)
    report = allocation_report(result, truth)

    registry = MaskRegistry(config.registry.root)
    bank = result.bank
    masks = []
    for mask_id in bank.task_ids:
        row = bank.row(mask_id)
        packed = {k: bank.packed(k)[row].cpu().numpy() for k in bank.layer_shapes}
        stats = {k: bank.bn_stats(mask_id, k).cpu().numpy() for k in bank.bn_features} or None
        own = [[a, b] for a, b, m in result.segments if m == mask_id]
        meta = {
            "scenario": "nns", "segments": own,
            "batches": sum(b - a + 1 for a, b in own),
            "majority_task": int(report["mask_to_task"][mask_id]),
            "purity": float(report["mask_purity"][mask_id]),
            "density": bank.density(mask_id),
        }
        status = registry.write_task(config.bank, mask_id, packed, stats, metadata=meta)
        masks.append({"mask_id": int(mask_id), "status": status,
                      **{k: v for k, v in meta.items() if k not in ("scenario", "segments")}})
    checks = {
        "batch": [d.batch for d in result.decisions],
        "mask_id": [d.mask_id for d in result.decisions],
        "num_masks": [d.num_masks + int(d.allocated) for d in result.decisions],
        "reason": [d.reason for d in result.decisions],
        "nu_max": [d.nu_max for d in result.decisions],
        "threshold": [d.threshold for d in result.decisions],
        "window_accuracy": [d.window_accuracy for d in result.decisions],
        "window_loss": [d.window_loss for d in result.decisions],
    }
    return {
        "num_masks": result.num_masks,
        "num_batches": result.num_batches,
        "budget_reached": result.budget_reached,
        "seconds": result.seconds,
        "stream_accuracy": sum(result.accuracy) / result.num_batches,
        "stream_loss": sum(result.loss) / result.num_batches,
        "segments": [list(s) for s in result.segments],
        "allocations": [[d.batch, d.mask_id] for d in result.decisions if d.allocated],
        "checks": checks,
        "allocation": report,
        "masks": masks,
    }


def evaluate_worker(config_data: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs inside a Ray worker: test accuracy of every streamed task, the mask inferred among
    the discovered ones as the registry holds them (evaluate.method / objective / mode)."""
    import torch

    from supsup.discovery import evaluate_discovered

    config = ExperimentConfig.model_validate(config_data)
    torch.set_num_threads(worker_threads(config.cluster))
    device = _device(config)
    bank, spec = load_bank(MaskRegistry(config.registry.root).source(config.bank), device)
    net = build_net(spec).to(device)
    tasks = build_tasks(config)
    e = config.evaluate
    found = evaluate_discovered(net, bank, tasks, sorted(set(stream_order(config))),
                                batch_size=e.batch_size, method=e.method,
                                objective=e.objective, mode=e.mode)
    return [{"task_id": r.task_id, "examples": r.examples, "accuracy": r.accuracy,
             "inferred": {int(k): int(v) for k, v in r.inferred.items()}} for r in found]


# ------------------------------------------------------------------------------- driver
def run_discovery(
    config: ExperimentConfig,
    *,
    progress: Callable[[float, int], None] | None = None,
    tracker: Any = None,
    address: str | None = None,
) -> dict[str, Any]:
    """Discover masks on the stream of `config`, evaluate them, write the report (and MLflow).

    `progress(done, total)` counts streamed tasks (batches_per_task batches each); `tracker` is
    a pipeline.tracking.Tracker: a run "discover" gets the config, metrics and report files.
    Returns the summary: bank, masks, purity, stream and test accuracy, files, run_id.
    """
    discovery_config(config)  # bad settings fail here, before Ray starts
    order = stream_order(config)
    prepare_discovery_bank(config)
    tags = {"job": "discover", "scenario": "nns", "bank": config.bank}
    with tracked_run(tracker, "discover", tags, config) as run_id:
        start = time.perf_counter()
        stream, evaluation = _run_workers(config, len(order), progress, address)
        seconds = time.perf_counter() - start
        summary = _summarise(config, order, stream, evaluation, seconds)
        out_dir = config.run_dir / "discovery"
        files = write_discovery_report(summary, stream, evaluation, order, config, out_dir)
        summary["files"] = {k: str(v) for k, v in files.items()}
        summary["run_id"] = run_id
        if tracker is not None:
            _log(tracker, summary, stream, evaluation, files)
    log.info("discovered %d masks for %d tasks (purity %.3f), test accuracy %.4f in %.1f s",
             summary["num_masks"], summary["num_true_tasks"], summary["purity"],
             summary["test_accuracy"], seconds)
    return summary


def _run_workers(
    config: ExperimentConfig,
    num_streamed: int,
    progress: Callable[[float, int], None] | None,
    address: str | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The stream, then the evaluation of what it discovered, each one call on the shared
    fan-out (retries on a lost worker, failures named by bank and step)."""
    import ray

    config_data = config.model_dump()
    options = remote_options(config.cluster, config.train.max_retries)
    results: dict[str, Any] = {}

    def keep(step: str, result: Any) -> None:
        results[step] = result

    def describe(step: str) -> str:
        return f"the discovery job of bank {config.bank!r} ({step})"

    with ray_session(config.cluster, address):
        board = start_board() if progress else None
        reader = BoardReader(board, lambda _: num_streamed)
        reader.start(["stream"])

        def poll() -> None:
            if progress:
                progress(min(float(num_streamed), reader.poll()), num_streamed)

        try:
            if progress:
                progress(0, num_streamed)
            fan_out(discover_worker, ["stream"], lambda _: (config_data, board), options=options,
                    on_result=keep, describe=describe, next_step=_AFTER_FAILURE,
                    poll=poll if board is not None else None)
            if progress:  # the last post may still be on its way
                progress(num_streamed, num_streamed)
            fan_out(evaluate_worker, ["evaluation"], lambda _: (config_data,), options=options,
                    on_result=keep, describe=describe, next_step=_AFTER_FAILURE)
        finally:
            if board is not None:
                ray.kill(board)
    return results["stream"], results["evaluation"]


# A stream cannot resume: the masks it allocated depend on everything fed before.
_AFTER_FAILURE = ("Masks written before the failure stay in the registry; move the bank away (or "
                  "set registry.bank to a new name) before running again.")


def _summarise(config: ExperimentConfig, order: list[int], stream: dict[str, Any],
               evaluation: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    alloc = stream["allocation"]
    mask_to_task = {int(k): int(v) for k, v in alloc["mask_to_task"].items()}
    examples = sum(r["examples"] for r in evaluation)
    agree = total = 0
    for r in evaluation:  # inferences that went to a mask trained mostly on the batch's task
        for mask_id, count in r["inferred"].items():
            total += count
            agree += count if mask_to_task.get(int(mask_id)) == r["task_id"] else 0
    return {
        "bank": config.bank,
        "registry_root": config.registry.root,
        "num_masks": stream["num_masks"],
        "num_true_tasks": alloc["num_true_tasks"],
        "tasks_streamed": len(order),
        "purity": alloc["purity"],
        "budget_reached": stream["budget_reached"],
        "stream_batches": stream["num_batches"],
        "stream_accuracy": stream["stream_accuracy"],
        "stream_loss": stream["stream_loss"],
        "stream_seconds": stream["seconds"],
        "test_accuracy": sum(r["accuracy"] * r["examples"] for r in evaluation) / examples,
        "inference_agreement": agree / total if total else 0.0,
        "mask_to_task": mask_to_task,
        "task_to_masks": {int(k): [int(m) for m in v]
                          for k, v in alloc["task_to_masks"].items()},
        "seconds": seconds,
    }


# ------------------------------------------------------------------------------ reports
def _finite(value: Any) -> Any:
    """JSON has no NaN: NaN and infinities become null, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_discovery_report(
    summary: dict[str, Any],
    stream: dict[str, Any],
    evaluation: list[dict[str, Any]],
    order: list[int],
    config: ExperimentConfig,
    out_dir: Path,
) -> dict[str, Path]:
    """report.json (everything) and discovery.png under `out_dir`; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "summary": {k: v for k, v in summary.items() if k not in ("files", "run_id")},
        "settings": {"discovery": config.discovery.model_dump(),
                     "train": config.train.model_dump(), "evaluate": config.evaluate.model_dump(),
                     "task_order": order},
        "masks": stream["masks"],
        "tasks": evaluation,
        "allocation": stream["allocation"],
        "segments": stream["segments"],
        "allocations": stream["allocations"],
        "checks": stream["checks"],
    }
    files = {"json": out_dir / "report.json"}
    files["json"].write_text(json.dumps(_finite(report), indent=1))
    from pipeline.report import plot_discovery

    files["plot"] = plot_discovery(stream, order, config.discovery.batches_per_task,
                                   out_dir / "discovery.png")
    return files


def _log(tracker: Any, summary: dict[str, Any], stream: dict[str, Any],
         evaluation: list[dict[str, Any]], files: dict[str, Path]) -> None:
    """Metrics, per-mask and per-task metrics, a thinned stream curve and the report files."""
    tracker.log_metrics({
        k: float(summary[k]) for k in (
            "num_masks", "num_true_tasks", "tasks_streamed", "purity", "budget_reached",
            "stream_batches", "stream_accuracy", "stream_loss", "stream_seconds",
            "test_accuracy", "inference_agreement", "seconds")
    })
    tracker.log_tasks_metrics(((m["mask_id"], {k: float(m[k]) for k in (
        "majority_task", "purity", "batches", "density")}) for m in stream["masks"]),
        prefix="mask")
    task_to_masks = summary["task_to_masks"]
    tracker.log_tasks_metrics((r["task_id"], {
        "test_accuracy": r["accuracy"],
        "masks_trained": len(task_to_masks.get(r["task_id"], [])),
    }) for r in evaluation)
    checks = stream["checks"]
    stride = max(1, math.ceil(len(checks["batch"]) / MAX_CURVE_POINTS))
    for i in range(0, len(checks["batch"]), stride):
        point = {"stream/num_masks": checks["num_masks"][i]}
        if math.isfinite(checks["window_accuracy"][i]):
            point["stream/window_accuracy"] = checks["window_accuracy"][i]
        tracker.log_metrics(point, step=checks["batch"][i])
    for path in files.values():
        tracker.log_artifact(path, "discovery")
