"""The training job: Ray workers learn groups of tasks' masks into the mask registry.

Masks are independent given the base network's seed, so the task list is cut into fixed groups
and each group is one Ray task: the worker rebuilds the data and the base network from the config,
trains the group vectorised (`supsup.train.train_group`) and writes each task's packed masks to
the registry. Only task ids, the config and small metric dicts cross Ray's object store. The
driver bounds the groups in flight, shows progress, and is the only writer to MLflow.

Rerunning the same command resumes: tasks already in the registry are skipped, and an unfinished
group is retrained whole, which reproduces its finished tasks bit for bit (the registry confirms
each as "unchanged" instead of rewriting it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.builders import (
    build_net,
    build_spec,
    build_tasks,
    task_groups,
    worker_net,
    worker_tasks,
)
from pipeline.cluster import (
    check_shared,
    ray_session,
    remote_options,
    worker_slots,
    worker_threads,
)
from pipeline.config import ExperimentConfig
from pipeline.jobs.devices import worker_device
from pipeline.jobs.fanout import fan_out
from pipeline.jobs.progress import BoardReader, item_key, poster, start_board
from pipeline.registry import MaskRegistry, RegistryConflictError
from pipeline.registry.manifest import check_recipe
from pipeline.registry.store import probe, probe_seen

log = logging.getLogger(__name__)


@dataclass
class TrainSummary:
    """What a training job did; `tasks` maps task id -> its metrics (new tasks only)."""

    bank: str
    registry_root: str
    num_tasks: int
    trained: dict[int, dict[str, float]] = field(default_factory=dict)
    skipped: list[int] = field(default_factory=list)
    seconds: float = 0.0
    run_id: str | None = None
    model_version: int | None = None
    publication: Any = None  # pipeline.publish.Publication, set once the bank is published
    nodes: dict[int, str] = field(default_factory=dict)  # task id -> Ray node id that trained it

    @property
    def tasks_per_hour(self) -> float:
        return 3600.0 * len(self.trained) / self.seconds if self.seconds > 0 else 0.0


def train_group_worker(config_data: dict[str, Any], task_ids: list[int],
                       board: Any = None) -> list[dict[str, Any]]:
    """Runs inside a Ray worker: train `task_ids` and write them to the registry.

    Returns one small metrics dict per task; posts the fraction of steps done to `board` (a
    ProgressBoard actor) at each log point. Importable without Ray, so the same function serves
    a single-process run and the tests' reference.
    """
    import torch

    from pipeline.config import ExperimentConfig
    from supsup.train import train_group

    config = ExperimentConfig.model_validate(config_data)
    torch.set_num_threads(worker_threads(config.cluster))
    device = worker_device(config.cluster)
    tasks = worker_tasks(config, device)
    net = worker_net(build_spec(config, tasks), device)
    registry = MaskRegistry(config.registry.root)
    node_id = _node_id()
    start = time.perf_counter()
    callback = None
    if board is not None:
        post = poster(board, item_key(task_ids))

        def callback(p: Any) -> None:
            post(p.step / p.steps)

    result = train_group(net, tasks, task_ids, config.train_config(), device=device,
                         callback=callback)
    seconds = (time.perf_counter() - start) / len(task_ids)
    stored = set(registry.tasks(config.bank))
    out = []
    for t in task_ids:
        metrics = {
            "train_accuracy": result.accuracy[t], "train_loss": result.loss[t],
            "density": result.density[t], "seconds": seconds, "steps": result.task_steps[t],
        }
        status = "kept" if t in stored else _store(registry, config.bank, t, result,
                                                   {**metrics, "node_id": node_id})
        out.append({"task_id": t, "status": status, "node_id": node_id, **metrics})
    out[0]["curve"] = group_curve(result.history)
    return out


def group_curve(history: list[Any]) -> list[dict[str, float]]:
    """The group's training curve: at each log point (supsup.train's TrainProgress, every
    train.log_every steps), the mean loss and accuracy over the group's tasks, by step."""
    points: dict[int, list[float]] = {}
    for p in history:
        acc = points.setdefault(p.step, [0.0, 0.0, 0.0])
        acc[0] += sum(p.loss)
        acc[1] += sum(p.accuracy)
        acc[2] += len(p.loss)
    return [{"step": step, "loss": a[0] / a[2], "accuracy": a[1] / a[2]}
            for step, a in sorted(points.items()) if a[2]]


def _store(registry: MaskRegistry, bank: str, task_id: int, result: Any,
           metadata: dict[str, Any]) -> str:
    """Write one task unless it is stored already: "written", or "kept" for a stored one.

    A retried or resumed group is trained whole again (a task's mask must not depend on how its
    group ran), but only its missing tasks are written: where training is not bit-identical
    (GPU kernels), the first stored mask stays and no conflict is raised.
    """
    from supsup.masks import pack_bits

    packed = {k: pack_bits(m).numpy() for k, m in result.masks[task_id].items()}
    stats = {k: s.numpy() for k, s in result.bn_stats[task_id].items()} or None
    try:
        return registry.write_task(bank, task_id, packed, stats, metadata=metadata)
    except RegistryConflictError:  # another attempt stored it since the listing: it wins
        return "kept"


def _node_id() -> str:
    """The Ray node this runs on ("" outside Ray): recorded with each task, for lineage."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def check_before_training(config: ExperimentConfig) -> None:
    """Read-only, before the command writes anything: BankMismatchError when the config's
    training recipe is not the one the existing bank's masks were trained with (or the bank
    predates recorded recipes), or when its task files were written under another manifest
    (e.g. copied in from a bank trained with another recipe). The rest of the identity (seed,
    network, task family) is checked by `prepare_bank`, which needs the data."""
    if config.model != "supsup" or config.scenario != "gg_gn":
        return
    registry = MaskRegistry(config.registry.root)
    try:
        stored = registry.manifest(config.bank)
    except KeyError:  # a new bank: prepare_bank creates it
        return
    check_recipe(stored, config.train_recipe(), registry.where(config.bank))
    registry.source(config.bank)


def prepare_bank(config: ExperimentConfig) -> tuple[MaskRegistry, list[int]]:
    """Create the bank's manifest, or check the config against it; returns the registry and the
    tasks already stored.

    BankMismatchError naming both values when the config differs from the bank (seed, network,
    task family, data set, mask rule), and when stored task files were written under another
    manifest: they are never adopted, and never retrained over; the training recipe is part
    of the manifest (`ExperimentConfig.train_recipe`).
    """
    tasks = build_tasks(config)
    spec = build_spec(config, tasks)
    net = build_net(spec)
    registry = MaskRegistry(config.registry.root)
    registry.create_bank(config.bank, spec.to_dict(), net.layer_shapes(), net.bn_features(),
                         config.mask_info(), config.train_recipe())
    return registry, list(registry.source(config.bank).task_ids)


def run_training(
    config: ExperimentConfig,
    *,
    progress: Callable[[float, int], None] | None = None,
    on_task: Callable[[dict[str, Any]], None] | None = None,
    address: str | None = None,
    on_curve: Callable[[list[int], list[dict[str, float]]], None] | None = None,
) -> TrainSummary:
    """Train every task of `config` not yet in the registry, with Ray workers.

    `progress(done, total)` is called as groups finish and, while they run, about every second
    with `done` counting their fraction of steps (a float); `on_task(metrics)` once per new task
    (the CLI hangs the progress bar and MLflow logging there); `on_curve(group, curve)` once per
    trained group, with its `group_curve`.
    """

    registry, stored = prepare_bank(config)
    all_ids = list(range(config.tasks.num_tasks))
    done = set(stored)
    groups = [g for g in task_groups(all_ids, config.train.group_size)
              if not set(g) <= done]
    summary = TrainSummary(config.bank, registry.root, len(all_ids),
                           skipped=sorted(done & set(all_ids)))
    total = len(all_ids)
    finished = len(summary.skipped)
    if progress:
        progress(finished, total)
    if not groups:
        log.info("all %d tasks of bank %r are already in the registry", total, config.bank)
        return summary
    start = time.perf_counter()
    if config.train.data_parallel_workers > 1:  # each task too big for one worker: Ray Train
        from pipeline.jobs.distributed import train_task_distributed

        with ray_session(config.cluster, address):
            for t in [t for t in all_ids if t not in done]:
                r = train_task_distributed(config, t, address=address)
                done.add(t)
                summary.trained[t] = {k: float(v) for k, v in r.items() if k != "task_id"
                                      and isinstance(v, (int, float)) and not isinstance(v, bool)}
                if on_task:
                    on_task(r)
                if progress:
                    progress(len(done & set(all_ids)), total)
        summary.seconds = time.perf_counter() - start
        return summary
    config_data = config.model_dump()
    all_set = set(all_ids)

    def on_result(group: list[int], results: list[dict[str, Any]]) -> None:
        curve = results[0].pop("curve", None) if results else None
        if on_curve and curve:
            on_curve(group, curve)
        for r in results:
            summary.nodes[r["task_id"]] = r.pop("node_id", "")
            if r["task_id"] in done:
                continue  # retrained with its group; the registry confirmed it unchanged
            done.add(r["task_id"])
            summary.trained[r["task_id"]] = {
                k: float(v) for k, v in r.items() if k not in ("task_id", "status")}
            if on_task:
                on_task(r)
        if progress:
            progress(len(done & all_set), total)

    with ray_session(config.cluster, address) as resources:
        with probe(registry.root) as name:
            check_shared(registry.root, name, probe_seen)
        board = start_board() if progress else None
        reader = BoardReader(board, lambda g: len(set(g) - done))

        def poll() -> None:  # only with a board, i.e. with `progress`
            progress(len(done & all_set) + reader.poll(), total)  # type: ignore[misc]

        def finished(group: list[int], results: list[dict[str, Any]]) -> None:
            reader.finish(group)
            on_result(group, results)

        fan_out(train_group_worker, groups, lambda g: (config_data, g, board),
                options=remote_options(config.cluster, config.train.max_retries),
                on_result=finished, describe=lambda g: f"training tasks {g[0]}..{g[-1]}",
                max_in_flight=config.train.max_in_flight or worker_slots(config.cluster,
                                                                         resources),
                on_start=reader.start, poll=poll if board is not None else None)
    summary.seconds = time.perf_counter() - start
    return summary

