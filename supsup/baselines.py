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

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from supsup.networks import NetworkSpec, build_network
from supsup.seeding import generator
from supsup.tasks import TaskSet

# The optimiser and schedule SupSup's masks are trained with: a baseline must not differ in them.
from supsup.train import TrainConfig, TrainProgress, _lr_factor, _optimizer

BASELINES = ("dense", "batchensemble", "psp", "finetune")
FC_FAMILY = ("fc", "fc1024", "lenet")
FLOAT_BYTES = 4  # float32


def layer_shapes(spec: NetworkSpec) -> list[tuple[int, int]]:
    """(out, in) of each linear layer of an fc-family network, input to output.

    Read from the SupSup network itself, so the catalog's default sizes (lenet 300-100, fc and
    fc1024 1024-1024) and `spec.hidden` live in one place.
    """
    if spec.name not in FC_FAMILY:
        raise ValueError(f"baselines need an fc-family network {FC_FAMILY}, got network "
                         f"{spec.name!r}; set network.name to one of them")
    shapes = list(build_network(spec).layer_shapes().values())
    return [(int(s[0]), int(s[1])) for s in shapes]


def storage_bytes(kind: str, spec: NetworkSpec) -> tuple[int, int]:
    """(shared bytes, bytes per task) of float32 parameters that must be stored for `kind`."""
    _check_kind(kind)
    shapes = layer_shapes(spec)
    weights = sum(o * i for o, i in shapes) * FLOAT_BYTES
    if kind == "dense":
        return 0, weights
    if kind == "batchensemble":
        return weights, sum(o + i for o, i in shapes) * FLOAT_BYTES
    return weights, 0  # psp and finetune: contexts are re-drawn from the seed


def psp_context(seed: int, task_id: int, layer_index: int, size: int) -> torch.Tensor:
    """The fixed context of one task and layer: (size,) float32 values in {-1, +1}."""
    g = generator(seed, "psp-context", task_id, layer_index)
    return torch.randint(0, 2, (size,), generator=g).to(torch.float32) * 2 - 1


def _check_kind(kind: str) -> None:
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; choose one of {BASELINES}")


def _kaiming(out_features: int, in_features: int, g: torch.Generator) -> nn.Linear:
    """A bias-free Linear with He-normal weights (std sqrt(2 / fan_in)) drawn from `g`."""
    layer = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        w = torch.randn(out_features, in_features, generator=g) * math.sqrt(2.0 / in_features)
        layer.weight.copy_(w)
    return layer


class BaselineNet(nn.Module, ABC):
    """A bias-free ReLU MLP; subclasses say which weights and scalings each task uses.

    `forward(x, task_id)`: x (B, *input_shape) -> logits (B, num_outputs). Layer i computes
    relu(((h * pre_i) W_i^T) * post_i), with no ReLU after the last layer.
    """

    kind = ""

    def __init__(self, spec: NetworkSpec) -> None:
        super().__init__()
        self.spec = spec
        self.shapes = layer_shapes(spec)
        self.task_ids: list[int] = []

    @abstractmethod
    def add_task(self, task_id: int) -> None:
        """Create what a new task owns (and freeze what it must not change)."""

    @abstractmethod
    def task_parameters(self, task_id: int) -> list[nn.Parameter]:
        """What training `task_id` updates."""

    def param_groups(self, task_id: int, fast_lr: float | None) -> list[dict[str, Any]]:
        """torch.optim parameter groups for training `task_id`; a group without "lr" learns at
        the optimiser's rate. Only BatchEnsemble has weights with a rate of their own."""
        return [{"params": self.task_parameters(task_id)}]

    @abstractmethod
    def terms(self, task_id: int) -> tuple[list[torch.Tensor], list[torch.Tensor | None],
                                           list[torch.Tensor | None]]:
        """Per layer: weight (out, in), input scale (in,) or None, output scale (out,) or None."""

    def check_task(self, task_id: int) -> int:
        if int(task_id) not in self.task_ids:
            raise KeyError(f"task {task_id} was not trained by this {self.kind} baseline "
                           f"(trained: {self.task_ids})")
        return int(task_id)

    def forward(self, x: torch.Tensor, task_id: int) -> torch.Tensor:
        weights, pre, post = self.terms(self.check_task(task_id))
        h = x.reshape(x.shape[0], -1)
        last = len(weights) - 1
        for i, (w, a, b) in enumerate(zip(weights, pre, post)):
            if a is not None:
                h = h * a
            h = F.linear(h, w)
            if b is not None:
                h = h * b
            if i < last:
                h = torch.relu(h)
        return h


class DenseNet(BaselineNet):
    """A separate, fully trained network per task, initialised from (seed, task, layer)."""

    kind = "dense"

    def __init__(self, spec: NetworkSpec) -> None:
        super().__init__(spec)
        self.per_task = nn.ModuleDict()

    def add_task(self, task_id: int) -> None:
        self.per_task[str(task_id)] = nn.ModuleList(
            _kaiming(o, i, generator(self.spec.seed, "dense", task_id, layer))
            for layer, (o, i) in enumerate(self.shapes)
        )
        self.task_ids.append(task_id)

    def task_parameters(self, task_id: int) -> list[nn.Parameter]:
        return list(self.per_task[str(task_id)].parameters())

    def terms(self, task_id: int) -> tuple[list[torch.Tensor], list[torch.Tensor | None],
                                           list[torch.Tensor | None]]:
        weights = [m.weight for m in self.per_task[str(task_id)]]
        none: list[torch.Tensor | None] = [None] * len(weights)
        return weights, none, list(none)


class _SharedNet(BaselineNet):
    """Base for kinds with one shared weight set, initialised from (seed, layer)."""

    def __init__(self, spec: NetworkSpec) -> None:
        super().__init__(spec)
        self.shared = nn.ModuleList(
            _kaiming(o, i, generator(spec.seed, "shared", layer))
            for layer, (o, i) in enumerate(self.shapes)
        )


class BatchEnsembleNet(_SharedNet):
    """Shared W trained on the first task only; rank-one fast weights r_t, s_t per task."""

    kind = "batchensemble"

    def __init__(self, spec: NetworkSpec) -> None:
        super().__init__(spec)
        self.fast_r = nn.ModuleDict()  # task -> per layer (out,)
        self.fast_s = nn.ModuleDict()  # task -> per layer (in,)

    def add_task(self, task_id: int) -> None:
        if self.task_ids:  # the first task is done: W is fixed from now on
            self.shared.requires_grad_(False)
        self.fast_r[str(task_id)] = nn.ParameterList(
            nn.Parameter(torch.ones(o)) for o, _ in self.shapes)
        self.fast_s[str(task_id)] = nn.ParameterList(
            nn.Parameter(torch.ones(i)) for _, i in self.shapes)
        self.task_ids.append(task_id)

    def task_parameters(self, task_id: int) -> list[nn.Parameter]:
        own = [*self.fast_r[str(task_id)], *self.fast_s[str(task_id)]]
        if task_id == self.task_ids[0]:
            return [*self.shared.parameters(), *own]
        return own

    def param_groups(self, task_id: int, fast_lr: float | None) -> list[dict[str, Any]]:
        # The rank-one fast weights scale whole rows and columns of a frozen W: at the shared
        # weights' small rate they barely move and later tasks stay near chance. BatchEnsemble
        # gives them a learning rate of their own.
        own = [*self.fast_r[str(task_id)], *self.fast_s[str(task_id)]]
        fast: dict[str, Any] = {"params": own} if fast_lr is None else {"params": own,
                                                                         "lr": fast_lr}
        if task_id == self.task_ids[0]:
            return [{"params": list(self.shared.parameters())}, fast]
        return [fast]

    def terms(self, task_id: int) -> tuple[list[torch.Tensor], list[torch.Tensor | None],
                                           list[torch.Tensor | None]]:
        return ([m.weight for m in self.shared], list(self.fast_s[str(task_id)]),
                list(self.fast_r[str(task_id)]))


class PSPNet(_SharedNet):
    """One shared W trained on every task in turn; per-task random +-1 input contexts.

    With `contexts=False` every context is all ones: plain sequential fine-tuning.
    """

    kind = "psp"

    def __init__(self, spec: NetworkSpec, contexts: bool = True) -> None:
        super().__init__(spec)
        self.contexts = contexts
        if not contexts:
            self.kind = "finetune"

    def add_task(self, task_id: int) -> None:
        for layer, (_, i) in enumerate(self.shapes):
            c = (psp_context(self.spec.seed, task_id, layer, i) if self.contexts
                 else torch.ones(i))
            # Not persistent: the seed re-draws contexts, so they are never stored.
            self.register_buffer(f"context_{task_id}_{layer}", c, persistent=False)
        self.task_ids.append(task_id)

    def context(self, task_id: int, layer: int) -> torch.Tensor:
        """The (in,) context of `task_id` at `layer`."""
        return getattr(self, f"context_{self.check_task(task_id)}_{layer}")

    def task_parameters(self, task_id: int) -> list[nn.Parameter]:
        return list(self.shared.parameters())

    def terms(self, task_id: int) -> tuple[list[torch.Tensor], list[torch.Tensor | None],
                                           list[torch.Tensor | None]]:
        weights = [m.weight for m in self.shared]
        pre: list[torch.Tensor | None] = [self.context(task_id, k) for k in range(len(weights))]
        return weights, pre, [None] * len(weights)


def build_baseline(kind: str, spec: NetworkSpec) -> BaselineNet:
    """An untrained baseline network of `kind` with the layer sizes of `spec`."""
    _check_kind(kind)
    if kind == "dense":
        return DenseNet(spec)
    if kind == "batchensemble":
        return BatchEnsembleNet(spec)
    return PSPNet(spec, contexts=kind == "psp")


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
    _check_kind(kind)
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
