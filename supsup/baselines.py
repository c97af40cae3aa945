"""The baselines SupSup is compared against, trained on the same tasks with the same protocol.

All are GG (task given at train and test) and run on the fc family (fc, fc1024, lenet) with the
base network's layer sizes: bias-free ReLU MLPs whose layer shapes are read from
`build_network(spec)`, so a baseline always has the shape of the SupSup network it stands beside.

- `dense` (the upper bound): a separate network per task, every weight trained. Stores all weights
  per task.
- `batchensemble` (BatchE, Wen et al. 2020): shared weights W per layer, trained on the first task
  together with that task's fast weights and then frozen. Task t owns rank-one fast weights
  r_t (out,) and s_t (in,) per layer, W_t = W * (r_t s_t^T), i.e. y = ((x * s_t) W^T) * r_t.
  Later tasks train only their r_t and s_t; there is no per-task bias or separate head (the last
  layer's r_t, s_t are the task's head). Fast weights start at ones, so each task starts from the
  first task's network. Stores sum(out + in) floats per task.
- `psp` (Cheung et al. 2019, superposition of many models): one shared weight set; task t
  multiplies the input of every layer by a fixed random context c_t in {-1, +1}^(in), drawn from a
  generator keyed by (seed, task, layer): y = W (x * c_t). W is trained on every task in turn, so
  later tasks interfere with earlier ones. Stores no learned bytes per task (contexts come from the
  seed).
- `finetune` (the lower bound): psp without contexts, one network trained on every task in turn.

Every task gets the optimiser, schedule, step count and batches SupSup's `train_group` would give
it (the same `TaskSet.train_batches` stream for the same seed), with a fresh optimiser per task.
Mask options of TrainConfig (rule, density, erdos_renyi_scale) do not apply and are ignored.
The sequential kinds (psp, finetune, batchensemble) are evaluated after all tasks are learned,
which is what exposes forgetting; each task's accuracy right after it was learned is kept too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from supsup.baseline_nets import (
    BASELINES,
    FC_FAMILY,
    FLOAT_BYTES,
    BaselineNet,
    BatchEnsembleNet,
    DenseNet,
    PSPNet,
    build_baseline,
    check_kind,
    layer_shapes,
    psp_context,
    storage_bytes,
)
from supsup.networks import NetworkSpec
from supsup.tasks import TaskSet

# The optimiser and schedule SupSup's masks are trained with: a baseline must not differ in them.
from supsup.train import TrainConfig, TrainProgress, _lr_factor, _optimizer

__all__ = [
    "BASELINES", "FC_FAMILY", "FLOAT_BYTES", "BaselineNet", "BaselineResult", "BatchEnsembleNet",
    "DenseNet", "PSPNet", "build_baseline", "evaluate_baseline", "layer_shapes", "psp_context",
    "storage_bytes", "task_accuracy", "train_baseline",
]


@dataclass
class BaselineResult:
    """A trained baseline and what training measured, per task in training order."""

    kind: str
    spec: NetworkSpec
    net: BaselineNet
    task_ids: list[int]
    shared_bytes: int
    bytes_per_task: int
    loss: dict[int, float]  # training loss over the last log window
    train_accuracy: dict[int, float]  # training accuracy over the last log window
    accuracy_when_learned: dict[int, float]  # test accuracy right after the task was learned
    task_steps: dict[int, int]
    task_seconds: dict[int, float]
    seconds: float
    history: list[TrainProgress] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return self.shared_bytes + self.bytes_per_task * len(self.task_ids)


def task_accuracy(net: BaselineNet, tasks: TaskSet, task_id: int, *, split: str = "test",
                  batch_size: int = 1000) -> tuple[float, int]:
    """(accuracy, examples) of one task on `split`, from the first num_classes outputs."""
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    correct = n = 0
    with torch.no_grad():
        for x, y in tasks.eval_batches(task_id, split, batch_size):
            logits = net(x.to(device), task_id)[:, : tasks.num_classes]
            correct += int((logits.argmax(-1).cpu() == y).sum())
            n += y.numel()
    net.train(was_training)
    if n == 0:
        raise ValueError(f"task {task_id} has no {split} examples to evaluate")
    return correct / n, n


def train_baseline(
    kind: str,
    spec: NetworkSpec,
    tasks: TaskSet,
    task_ids: Sequence[int],
    config: TrainConfig | None = None,
    *,
    device: torch.device | str | None = None,
    callback: Callable[[TrainProgress], None] | None = None,
    fast_lr: float | None = None,
) -> BaselineResult:
    """Train baseline `kind` on `task_ids` one task after another, in the order given.

    `fast_lr` is the learning rate of BatchEnsemble's fast weights (None: config.lr).

    The callback gets a TrainProgress (task_ids=[t]) every `log_every` steps and at each task's
    end. Returns the trained network; evaluate it with `evaluate_baseline`.
    """
    check_kind(kind)
    config = config or TrainConfig()
    task_ids = [tasks.check_task(t) for t in task_ids]
    if not task_ids:
        raise ValueError("task_ids is empty: give at least one task to train")
    if len(set(task_ids)) != len(task_ids):
        raise ValueError(f"task_ids repeat a task: {task_ids}")
    if tuple(spec.input_shape) != tasks.input_shape:
        raise ValueError(f"network {spec.name!r} expects inputs {spec.input_shape}, "
                         f"the tasks have {tasks.input_shape}")
    if tasks.num_classes > spec.num_outputs:
        raise ValueError(f"the tasks have {tasks.num_classes} classes but the network only "
                         f"{spec.num_outputs} outputs")
    device = torch.device(device) if device is not None else torch.device("cpu")
    net = build_baseline(kind, spec).to(device)
    shared_bytes, per_task = storage_bytes(kind, spec)
    result = BaselineResult(kind, spec, net, [], shared_bytes, per_task, {}, {}, {}, {}, {}, 0.0)
    start = time.perf_counter()
    for t in task_ids:
        net.add_task(t)
        net.to(device)
        _train_task(net, tasks, t, config, device, result, callback, fast_lr)
        result.accuracy_when_learned[t] = task_accuracy(net, tasks, t)[0]
        result.task_ids.append(t)
    result.seconds = time.perf_counter() - start
    return result


def _train_task(net: BaselineNet, tasks: TaskSet, task_id: int, config: TrainConfig,
                device: torch.device, result: BaselineResult,
                callback: Callable[[TrainProgress], None] | None,
                fast_lr: float | None = None) -> None:
    """One task's steps with a fresh optimiser; records its metrics in `result`."""
    opt = _optimizer(net.param_groups(task_id, fast_lr), config)
    base_lrs = [g["lr"] for g in opt.param_groups]
    steps = config.num_steps(tasks.size(task_id, "train"))
    window_loss = torch.zeros((), device=device)
    window_correct = torch.zeros((), device=device)
    window_n = 0
    last: TrainProgress | None = None
    start = time.perf_counter()
    net.train()
    for step, (x, y) in enumerate(tasks.train_batches([task_id], config.batch_size, steps,
                                                      seed=config.seed)):
        x, y = x[0].to(device), y[0].to(device)  # the group of one: (B, ...), (B,)
        factor = _lr_factor(step, steps, config)
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = base * factor
        logits = net(x, task_id)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # summed on the device, read at log points: no sync per step
            window_loss += loss.detach()
            window_correct += (logits[:, : tasks.num_classes].argmax(-1) == y).float().mean()
        window_n += 1
        if (step + 1) % config.log_every == 0 or step + 1 == steps:
            last = TrainProgress([task_id], step + 1, steps, [float(window_loss) / window_n],
                                 [float(window_correct) / window_n], time.perf_counter() - start)
            result.history.append(last)
            window_loss = torch.zeros((), device=device)
            window_correct = torch.zeros((), device=device)
            window_n = 0
            if callback is not None:
                callback(last)
    result.loss[task_id] = last.loss[0] if last else float("nan")
    result.train_accuracy[task_id] = last.accuracy[0] if last else float("nan")
    result.task_steps[task_id] = steps
    result.task_seconds[task_id] = time.perf_counter() - start


def evaluate_baseline(
    result: BaselineResult,
    tasks: TaskSet,
    task_ids: Sequence[int] | None = None,
    *,
    split: str = "test",
    batch_size: int = 1000,
) -> dict[str, Any]:
    """GG accuracy of every task (default: all trained) with the network as training left it.

    `mean_accuracy` is weighted by examples, like `supsup.evaluate.summarize`'s accuracy_gg, so
    the two sit side by side in one table. `forgetting` is the mean drop from each task's accuracy
    right after it was learned to its accuracy now.
    """
    ids = list(result.task_ids if task_ids is None else task_ids)
    if not ids:
        raise ValueError("no tasks to evaluate: task_ids is empty")
    missing = [t for t in ids if t not in result.task_ids]
    if missing:
        raise KeyError(f"tasks {missing} were not trained by this {result.kind} baseline "
                       f"(trained: {result.task_ids})")
    start = time.perf_counter()
    rows = []
    for t in ids:
        accuracy, n = task_accuracy(result.net, tasks, t, split=split, batch_size=batch_size)
        rows.append({
            "task_id": t, "accuracy": accuracy, "examples": n,
            "accuracy_when_learned": result.accuracy_when_learned[t],
            "train_accuracy": result.train_accuracy[t], "train_loss": result.loss[t],
            "steps": result.task_steps[t], "seconds": result.task_seconds[t],
        })
    total = sum(r["examples"] for r in rows)
    return {
        "kind": result.kind,
        "network": result.spec.to_dict(),
        "num_tasks": len(rows),
        "mean_accuracy": sum(r["accuracy"] * r["examples"] for r in rows) / total,
        "forgetting": sum(r["accuracy_when_learned"] - r["accuracy"] for r in rows) / len(rows),
        "accuracy": {str(r["task_id"]): r["accuracy"] for r in rows},
        "bytes_per_task": result.bytes_per_task,
        "shared_bytes": result.shared_bytes,
        "total_bytes": result.total_bytes,
        "train_seconds": result.seconds,
        "eval_seconds": time.perf_counter() - start,
        "tasks": rows,
    }
