"""Data-parallel training of one task's supermask with Ray Train, for tasks too big for one worker.

Most SupSup tasks are small and train many-per-worker (`pipeline.jobs.train`). A SplitImageNet task
in the GG scenario (ResNet-50 at 224x224, 100 epochs over ~13,000 images, the paper's Table 1) is
not: one worker would need days for it. Here one task's scores are trained by N Ray Train workers
(`TorchTrainer`), one task after another:

- every rank rebuilds the data and the base network from the config (`pipeline.builders`), and
  draws the task's initial scores from (network seed, task id, layer), so all ranks start equal;
- each rank draws its own batches, with a seed derived from (config seed, rank): rank 0 keeps the
  config seed, so one worker reproduces `supsup.train.train_group` bit for bit;
- after each backward pass the score gradients are all-reduced and divided by the world size
  (gloo on CPUs, NCCL on GPUs), then the configured optimiser steps: an effective batch of
  N x `train.batch_size`. The optimisers act elementwise on identical gradients, so every rank
  holds identical scores; the ranks compare a checksum at the end and fail loudly if they differ;
- per-task BN running statistics (Section 3.1: non-affine BN with per-task statistics) are
  averaged across ranks before they are stored;
- rank 0 writes the packed masks and BN statistics to the mask registry and reports the metrics
  with a small JSON checkpoint (Ray Train V2 fills `Result.metrics` only from checkpointed
  reports).

Only the config, a task id and a metrics dict cross Ray; the base weights never travel.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pipeline.builders import build_net, build_spec, build_tasks
from pipeline.cluster import check_shared, ray_session, worker_threads
from pipeline.config import ExperimentConfig, TrainSection
from pipeline.registry import MaskRegistry
from pipeline.registry.store import probe, probe_seen
from supsup.scores import TaskScores
from supsup.seeding import derive_seed
from supsup.train import TrainConfig

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- pure helpers
def rank_seed(seed: int, rank: int) -> int:
    """Batch-order seed of one rank: the config seed on rank 0, a derived seed elsewhere."""
    return seed if rank == 0 else derive_seed(seed, "data-parallel-rank", rank)


def data_parallel_steps(train: TrainConfig, train_size: int, world_size: int) -> int:
    """Optimiser steps for one task: `steps`, or `epochs` over the effective batch N x B."""
    if train.epochs is None:
        return train.steps
    return max(1, math.ceil(train.epochs * train_size / (train.batch_size * world_size)))


def collective_backend(train: TrainSection, gpus_per_worker: float) -> str:
    """torch.distributed backend: "auto" picks NCCL for workers with a whole GPU each, gloo
    otherwise.

    NCCL refuses two ranks on one device ("Duplicate GPU detected"), and fractional
    gpus_per_worker lets Ray pack ranks onto one GPU, so NCCL with a fraction is refused here,
    before any worker starts.
    """
    whole = gpus_per_worker >= 1
    if train.backend == "auto":
        return "nccl" if whole else "gloo"
    if train.backend == "nccl" and gpus_per_worker <= 0:
        raise ValueError("train.backend is 'nccl' but cluster.gpus_per_worker is 0: NCCL needs "
                         "GPU workers; set train.backend to 'gloo' or 'auto', or give each worker "
                         "a GPU")
    if train.backend == "nccl" and not whole:
        raise ValueError(
            f"train.backend is 'nccl' with cluster.gpus_per_worker={gpus_per_worker}: Ray may "
            "place several ranks on one GPU, and NCCL refuses two ranks on one device "
            "('Duplicate GPU detected'); give each data-parallel worker a whole GPU "
            "(gpus_per_worker: 1) or use train.backend: gloo (or auto)")
    return train.backend


def scaling_options(config: ExperimentConfig) -> dict[str, Any]:
    """Keyword arguments of Ray Train's ScalingConfig for `config`'s data-parallel workers."""
    cluster = config.cluster
    use_gpu = cluster.gpus_per_worker > 0
    resources: dict[str, float] = {"CPU": float(cluster.cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = float(cluster.gpus_per_worker)
    return {"num_workers": config.train.data_parallel_workers, "use_gpu": use_gpu,
            "resources_per_worker": resources}


def check_fits(config: ExperimentConfig, resources: dict[str, Any]) -> None:
    """ValueError when the worker group cannot fit the cluster (Ray Train would wait forever)."""
    n = config.train.data_parallel_workers
    cluster = config.cluster
    for name, per_worker, key in (("cpus_per_worker", cluster.cpus_per_worker, "CPU"),
                                  ("gpus_per_worker", cluster.gpus_per_worker, "GPU")):
        have = float(resources.get(key, 0))
        if per_worker > 0 and n * per_worker > have + 1e-9:
            raise ValueError(
                f"train.data_parallel_workers={n} x cluster.{name}={per_worker} needs "
                f"{n * per_worker:g} {key}s but the Ray cluster has {have:g}; lower "
                f"train.data_parallel_workers or cluster.{name}, or join a larger cluster")


def scores_checksum(scores: TaskScores) -> str:
    """sha256 of every score tensor and BN statistic, in a fixed order (CPU bytes)."""
    h = hashlib.sha256()
    for name, tensor in [*scores.named_parameters(), *scores.named_buffers()]:
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _absolute(path: str | None) -> str | None:
    """Local paths made absolute (workers may run elsewhere); URIs are left alone."""
    if path is None or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def worker_config(config: ExperimentConfig) -> dict[str, Any]:
    """The config as plain data for the workers, with local paths resolved on the driver."""
    data = config.model_dump()
    data["output_dir"] = _absolute(data["output_dir"])
    data["registry"]["root"] = _absolute(data["registry"]["root"])
    data["data"]["root"] = _absolute(data["data"]["root"])
    return data


# ---------------------------------------------------------------------------- worker side
def _average_gradients(params: list[torch.Tensor], world_size: int) -> list[Any]:
    """Hooks that replace each score gradient by its mean over the ranks, right after backward.

    Every rank runs the same graph, so the hooks fire in the same order everywhere and the
    collectives match up; the optimiser then steps on identical gradients on every rank.
    """
    import torch.distributed as dist

    def average(param: torch.Tensor) -> None:
        dist.all_reduce(param.grad)
        param.grad.div_(world_size)

    return [p.register_post_accumulate_grad_hook(average) for p in params]


def _pool_bn_stats(scores: TaskScores, world_size: int) -> float:
    """Average the BN running statistics over the ranks in place; returns their spread before.

    Every rank samples the same task's whole training set, so each rank's running mean and
    variance estimate the same quantities; their average is the lower-noise estimate. The spread
    (largest |rank value - average|) shows the ranks really saw different batches.
    """
    import torch.distributed as dist

    buffers = [b for _, b in scores.named_buffers()]
    if not buffers:
        return 0.0
    flat = torch.cat([b.reshape(-1) for b in buffers])
    gathered = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(gathered, flat)
    stacked = torch.stack(gathered)  # (world_size, total BN values)
    mean = stacked.mean(0)
    spread = float((stacked - mean).abs().max())
    offset = 0
    for b in buffers:
        b.copy_(mean[offset:offset + b.numel()].view_as(b))
        offset += b.numel()
    return spread


def _report(metrics: dict[str, Any], rank: int) -> None:
    """Report on every rank (a barrier); rank 0 attaches a JSON checkpoint of the metrics."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "metrics.json").write_text(json.dumps(metrics, indent=1))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: train one task's scores data-parallel.

    `loop_config` holds "config" (ExperimentConfig as plain data) and "task_id".
    """
    import ray.train
    import ray.train.torch
    import ray.util
    import torch.distributed as dist

    from supsup.masks import pack_bits
    from supsup.train import train_group

    config = ExperimentConfig.model_validate(loop_config["config"])
    task_id = int(loop_config["task_id"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(worker_threads(config.cluster))

    tasks = build_tasks(config)
    spec = build_spec(config, tasks)
    net = build_net(spec).to(device)
    base = config.train_config()
    steps = data_parallel_steps(base, tasks.size(task_id, "train"), world_size)
    train_config = replace(base, steps=steps, epochs=None, seed=rank_seed(config.seed, rank))
    scores = TaskScores(net, [task_id], rule=base.rule, density=base.density,
                        erdos_renyi_scale=base.erdos_renyi_scale).to(device)
    hooks = _average_gradients(list(scores.parameters()), world_size)
    start = time.perf_counter()
    try:
        result = train_group(net, tasks, [task_id], train_config, device=device, scores=scores)
    finally:
        for h in hooks:
            h.remove()
    seconds = time.perf_counter() - start
    spread = _pool_bn_stats(scores, world_size)

    checksums: list[str] = [""] * world_size
    dist.all_gather_object(checksums, scores_checksum(scores))
    node_ips: list[str] = [""] * world_size  # where each rank ran, rank order: kept with the task
    dist.all_gather_object(node_ips, ray.util.get_node_ip_address())
    if len(set(checksums)) != 1:
        raise RuntimeError(f"task {task_id}: the {world_size} data-parallel ranks ended with "
                           f"different scores (checksums {checksums}); the gradient averaging "
                           "is broken, nothing was written")
    window = torch.tensor([result.loss[task_id], result.accuracy[task_id]], device=device,
                          dtype=torch.float64)
    dist.all_reduce(window)
    loss, accuracy = (window / world_size).tolist()

    metrics: dict[str, Any] = {
        "task_id": task_id, "train_accuracy": accuracy, "train_loss": loss,
        "density": result.density[task_id], "seconds": seconds, "steps": steps,
        "workers": world_size, "effective_batch_size": world_size * base.batch_size,
        "bn_rank_spread": spread, "score_checksums": checksums, "node_ips": node_ips,
    }
    if rank == 0:
        masks, stats = scores.export()[task_id]
        packed = {k: pack_bits(m).numpy() for k, m in masks.items()}
        bn = {k: s.numpy() for k, s in stats.items()} or None

        registry = MaskRegistry(config.registry.root)
        registry.create_bank(config.bank, spec.to_dict(), net.layer_shapes(), net.bn_features(),
                             config.mask_info(), config.train_recipe())
        meta = {k: metrics[k] for k in ("train_accuracy", "train_loss", "density", "seconds",
                                        "steps", "workers", "effective_batch_size",
                                        "node_ips")}
        metrics["status"] = registry.write_task(config.bank, task_id, packed, bn, metadata=meta)
    _report(metrics, rank)


# ---------------------------------------------------------------------------- driver side
def under(root: str, name: str) -> str:
    """`name` under a folder or URI; a URI's query (an S3 root's `?endpoint_override=...&scheme=`
    settings, read by pyarrow as the registry reads them) stays at the end, where it belongs."""
    base, mark, query = root.partition("?") if "://" in root else (root, "", "")
    return f"{base.rstrip('/')}/{name}{mark}{query}"


def train_storage(config: ExperimentConfig) -> str:
    """Where Ray Train keeps its runs: `cluster.storage`, else `.ray_train` under the mask
    registry's root (shared by every node whenever training can run; never a bank's name). Not
    the run folder, which is the driver's disk alone.

    Ray Train resolves the URI with pyarrow (`FileSystem.from_uri`) on the driver, as the registry
    does, and sends the resolved file system to its workers: an S3 endpoint given in the URI's
    query or in AWS_ENDPOINT_URL, and credentials from the standard AWS variables, reach them
    the way they reach the registry."""
    return config.cluster.storage or under(config.registry.root, ".ray_train")


def check_shared_storage(config: ExperimentConfig, storage: str) -> None:
    """ValueError unless every node sees the registry and Ray Train's storage (`check_shared`):
    rank 0 writes the masks, any node may write Ray Train's checkpoints. A local storage folder
    is made first; an object store is only probed once, with the registry."""
    where = [(config.registry.root, "registry.root")]
    if "://" not in storage:
        Path(storage).mkdir(parents=True, exist_ok=True)
        where.append((storage, "cluster.storage" if config.cluster.storage else
                      "cluster.storage (unset: .ray_train under registry.root)"))
    for root, key in where:
        with probe(root) as name:
            check_shared(root, name, probe_seen, key=key)


def train_task_distributed(config: ExperimentConfig, task_id: int, *,
                           address: str | None = None) -> dict[str, Any]:
    """Train task `task_id` with `train.data_parallel_workers` Ray Train workers.

    Returns rank 0's metrics: task_id, status ("written" or "unchanged"), train_accuracy,
    train_loss, density, seconds, steps, workers, effective_batch_size, bn_rank_spread,
    score_checksums (one per rank, all equal) and node_ips (the node of each rank, also in the
    task's registry metadata and the log). Ray Train's record of the run (the metrics
    checkpoint) goes to shared storage, `train_storage(config)`: on a multi-node cluster Ray
    Train needs a folder every node sees (or a URI) to checkpoint.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.jobs.gloo import NodeInterfaceTorchConfig, node_interfaces

    if isinstance(task_id, bool) or not 0 <= int(task_id) < config.tasks.num_tasks:
        raise ValueError(f"task {task_id} is outside tasks.num_tasks={config.tasks.num_tasks} "
                         f"(0..{config.tasks.num_tasks - 1})")
    task_id = int(task_id)
    options = scaling_options(config)
    backend = collective_backend(config.train, config.cluster.gpus_per_worker)
    storage = train_storage(config)
    name = f"{config.bank}-task-{task_id:07d}-{uuid.uuid4().hex[:8]}"
    with ray_session(config.cluster, address) as resources:
        check_fits(config, resources)
        check_shared_storage(config, storage)
        interfaces = node_interfaces() if backend == "gloo" else {}
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": worker_config(config), "task_id": task_id},
            torch_config=NodeInterfaceTorchConfig(backend=backend, interfaces=interfaces),
            scaling_config=ray.train.ScalingConfig(**options),
            run_config=ray.train.RunConfig(
                name=name, storage_path=storage,
                failure_config=ray.train.FailureConfig(max_failures=config.train.max_retries)),
        )
        log.info("training task %d with %d data-parallel workers (%s)", task_id,
                 options["num_workers"], backend)
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as err:
            raise RuntimeError(
                f"data-parallel training of task {task_id} failed after "
                f"{config.train.max_retries} retries: {err}. Tasks already in the registry are "
                "kept; rerun the same command to resume.") from err
    if result.metrics is None:
        raise RuntimeError(f"data-parallel training of task {task_id} reported no metrics; see "
                           f"Ray Train's run folder {under(storage, name)}")
    log.info("task %d: ranks ran on %s; Ray Train's run folder is %s", task_id,
             ", ".join(result.metrics.get("node_ips", [])), under(storage, name))
    return dict(result.metrics)
