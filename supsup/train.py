"""Learning supermasks: one task, or a group of tasks vectorised in one process.

Only scores are optimised; the base weights never receive a gradient (Section 3.1). A group of G
tasks shares the frozen weights and trains G score tensors with batched matmuls. The group loss is
the *sum* of each task's mean cross-entropy and every optimiser here acts elementwise, so each task
follows exactly the updates it would get alone: group composition never changes a task's mask.
With `epochs`, tasks of unequal train size need unequal step counts, so such a group is trained as
one sub-group per step count.
Progress goes to a callback; the library never prints.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from supsup.bank import MaskBank
from supsup.binding import use_scores
from supsup.fused import PRECISIONS, FusedStep, autocast, compute_dtype
from supsup.masks import RULES, check_density
from supsup.networks import SupermaskNet
from supsup.scores import TaskScores
from supsup.tasks import TaskSet

OPTIMIZERS = ("rmsprop", "adam", "sgd")
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """How one task's mask is learned. The defaults are the paper's PermutedMNIST protocol."""

    steps: int = 1000
    epochs: float | None = None  # when set, overrides steps: epochs * train size / batch_size
    batch_size: int = 128
    optimizer: str = "rmsprop"
    lr: float = 1e-4
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    rule: str = "threshold"
    density: float | None = None  # topk rule
    erdos_renyi_scale: float | None = None  # topk rule with per-layer ER densities
    seed: int = 0  # batch order
    log_every: int = 100
    precision: str = "fp32"  # "bf16": matmuls in bfloat16 (scores and optimiser stay float32)
    fused: bool = False  # one compiled kernel per layer for the elementwise tail of a step

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if self.rule not in RULES:
            raise ValueError(f"unknown mask rule {self.rule!r}; choose one of {RULES}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {PRECISIONS}")
        if self.fused and self.rule != "threshold":
            raise ValueError("the fused step builds masks by the threshold rule; train topk "
                             "masks with fused off")
        if self.rule == "topk" and self.erdos_renyi_scale is None:
            if self.density is None:
                raise ValueError("the topk rule needs density in (0, 1] or erdos_renyi_scale")
            check_density(self.density)
        if self.density is not None:
            check_density(self.density)
        if self.steps < 0 or (self.epochs is not None and self.epochs <= 0):
            raise ValueError(f"steps must be >= 0 and epochs > 0, got {self.steps}, {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.log_every < 1 or self.warmup_steps < 0:
            raise ValueError(f"log_every must be >= 1 and warmup_steps >= 0, got "
                             f"{self.log_every}, {self.warmup_steps}")

    def num_steps(self, train_size: int) -> int:
        if self.epochs is None:
            return self.steps
        return max(1, int(math.ceil(self.epochs * train_size / self.batch_size)))


@dataclass(frozen=True)
class TrainProgress:
    """Reported to the callback every `log_every` steps and at the end."""

    task_ids: list[int]
    step: int
    steps: int
    loss: list[float]  # per task, mean over the window
    accuracy: list[float]  # per task, training accuracy over the window
    seconds: float
    val_accuracy: list[float] | None = None  # per task, when train_group got `validate`


@dataclass
class TrainResult:
    """Learned masks (0/1 per layer) and BN statistics ((2, C) per layer) for each task."""

    task_ids: list[int]
    masks: dict[int, dict[str, torch.Tensor]]
    bn_stats: dict[int, dict[str, torch.Tensor]]
    loss: dict[int, float]
    accuracy: dict[int, float]
    density: dict[int, float]
    steps: int  # the most any task took; `task_steps` has each task's own count
    seconds: float
    history: list[TrainProgress] = field(default_factory=list)
    task_steps: dict[int, int] = field(default_factory=dict)
    kernel: str = "eager"  # how the step's elementwise tail ran: "eager", "compiled", or why not


def _optimizer(params: list[torch.Tensor] | list[dict[str, Any]],
               config: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimiser over tensors or parameter groups (a group's own "lr" wins)."""
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


class _Stepper:
    """One training step's optimiser half: torch.optim over the scores, or the fused step."""

    def __init__(self, net: SupermaskNet, scores: TaskScores, config: TrainConfig) -> None:
        self.scores = scores
        self.fused = FusedStep(
            net, scores, optimizer=config.optimizer, lr=config.lr, precision=config.precision,
            momentum=config.momentum, weight_decay=config.weight_decay,
        ) if config.fused else None
        if self.fused is None:
            self.opt = _optimizer(list(scores.parameters()), config)
            self.base_lrs = [g["lr"] for g in self.opt.param_groups]

    @property
    def kernel(self) -> str:
        return self.fused.kernel if self.fused is not None else "eager"

    def bind(self, net: SupermaskNet) -> contextlib.AbstractContextManager:
        return use_scores(net, self.scores) if self.fused is None else self.fused.bind(net)

    def zero_grad(self) -> None:
        if self.fused is not None:
            self.fused.zero_grad()
        else:
            self.opt.zero_grad(set_to_none=True)

    def step(self, lr_factor: float) -> None:
        if self.fused is not None:
            self.fused.step(lr_factor)
            return
        for group, base in zip(self.opt.param_groups, self.base_lrs):
            group["lr"] = base * lr_factor
        self.opt.step()


def _lr_factor(step: int, steps: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "cosine":
        span = max(1, steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * (step - config.warmup_steps) / span))
    return 1.0


def train_group(
    net: SupermaskNet,
    tasks: TaskSet,
    task_ids: Sequence[int],
    config: TrainConfig | None = None,
    *,
    device: torch.device | str | None = None,
    callback: Callable[[TrainProgress], None] | None = None,
    scores: TaskScores | None = None,
    validate: Callable[[TaskScores], list[float]] | None = None,
) -> TrainResult:
    """Learn the masks of `task_ids` together; returns binary masks on the CPU.

    `scores` may carry on from earlier training; by default fresh scores are drawn per task.
    `validate(scores)` is called at every log point (network in eval mode, no grad, the scores
    bound) and its per-task values travel in TrainProgress.val_accuracy, e.g. for early stopping.
    """
    config = config or TrainConfig()
    task_ids = [tasks.check_task(t) for t in task_ids]
    if tuple(net.spec.input_shape) != tasks.input_shape:
        raise ValueError(f"network {net.spec.name!r} expects inputs {net.spec.input_shape}, "
                         f"the tasks have {tasks.input_shape}")
    if tasks.num_classes > net.spec.num_outputs:
        raise ValueError(f"the tasks have {tasks.num_classes} classes but the network only "
                         f"{net.spec.num_outputs} outputs")
    own_steps = {t: config.num_steps(tasks.size(t, "train")) for t in task_ids}
    if len(set(own_steps.values())) > 1:
        # `epochs` gives tasks of unequal size unequal step counts; one shared loop would give
        # every task the group's smallest count and make its mask depend on its group.
        if scores is not None:
            raise ValueError(f"epochs gives these tasks different step counts {own_steps}; "
                             "carry scores on only for tasks of one train size, or use steps")
        parts = [
            train_group(net, tasks, [t for t in task_ids if own_steps[t] == n], config,
                        device=device, callback=callback, validate=validate)
            for n in sorted(set(own_steps.values()))
        ]
        return _merge(task_ids, parts)
    device = torch.device(device) if device is not None else _net_device(net)
    net.to(device)
    if scores is None:
        scores = TaskScores(net, task_ids, rule=config.rule, density=config.density,
                            erdos_renyi_scale=config.erdos_renyi_scale)
    elif scores.task_ids != task_ids:
        raise ValueError(f"scores hold tasks {scores.task_ids}, asked to train {task_ids}")
    scores.to(device)
    step_fn = _Stepper(net, scores, config)
    steps = own_steps[task_ids[0]]
    window_loss = torch.zeros(len(task_ids), device=device)
    window_correct = torch.zeros(len(task_ids), device=device)
    window_n = 0
    first_bad = torch.full((len(task_ids),), -1, dtype=torch.long, device=device)
    history: list[TrainProgress] = []
    start = time.perf_counter()
    net.train()
    last: TrainProgress | None = None
    # bf16 matmuls cast their inputs to bfloat16 anyway: drawn in bfloat16, a batch is gathered
    # at half the bytes and never cast again (the same values either way).
    batches = tasks.train_batches(task_ids, config.batch_size, steps, seed=config.seed,
                                  dtype=compute_dtype(config.precision))
    precision = autocast(device, config.precision)
    with step_fn.bind(net):
        for step, (x, y) in enumerate(batches):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with precision:
                logits = net(x)  # (G, B, outputs)
            per_task = F.cross_entropy(
                logits.float().flatten(0, 1), y.flatten(), reduction="none"
            ).view(y.shape).mean(1)  # (G,)
            step_fn.zero_grad()
            per_task.sum().backward()
            step_fn.step(_lr_factor(step, steps, config))
            with torch.no_grad():
                # The first step at which each task's loss went non-finite (-1: never), kept on
                # the device and read only at log points, so no step waits for the host.
                bad = ~torch.isfinite(per_task.detach()) & (first_bad < 0)
                first_bad = torch.where(bad, step, first_bad)
                window_loss += per_task.detach()
                window_correct += (logits[..., : tasks.num_classes].argmax(-1) == y).float().mean(1)
                window_n += 1
            if (step + 1) % config.log_every == 0 or step + 1 == steps:
                _check_finite(task_ids, first_bad, scores, step + 1)
                val = None
                if validate is not None:
                    net.eval()
                    with torch.no_grad():
                        val = [float(v) for v in validate(scores)]
                    net.train()
                last = TrainProgress(
                    task_ids, step + 1, steps, (window_loss / window_n).tolist(),
                    (window_correct / window_n).tolist(), time.perf_counter() - start, val,
                )
                history.append(last)
                window_loss.zero_()
                window_correct.zero_()
                window_n = 0
                if callback is not None:
                    callback(last)
    exported = scores.export()
    densities = scores.densities_per_task()
    return TrainResult(
        task_ids=task_ids,
        masks={t: m for t, (m, _) in exported.items()},
        bn_stats={t: s for t, (_, s) in exported.items()},
        loss={t: (last.loss[i] if last else float("nan")) for i, t in enumerate(task_ids)},
        accuracy={t: (last.accuracy[i] if last else float("nan")) for i, t in enumerate(task_ids)},
        density=dict(zip(task_ids, densities)),
        steps=steps,
        seconds=time.perf_counter() - start,
        history=history,
        task_steps=dict(own_steps),
        kernel=step_fn.kernel,
    )


class NonFiniteError(FloatingPointError):
    """A task's loss or scores stopped being finite: its masks would be meaningless."""


def _check_finite(task_ids: list[int], first_bad: torch.Tensor, scores: TaskScores,
                  step: int) -> None:
    """NonFiniteError naming the first task (and step) whose loss or scores are not finite.

    A non-finite loss (a learning rate far too large, a broken input) drives scores to inf/NaN,
    and thresholding NaN scores still yields a 0/1 "mask": without this check such masks would
    be stored and served as if they were learned.
    """
    bad = first_bad.tolist()
    for i, t in enumerate(task_ids):
        if bad[i] >= 0:
            raise NonFiniteError(
                f"task {t}: the training loss became non-finite at step {bad[i] + 1}; nothing of "
                f"this group is stored. Lower train.lr (or check the data) and rerun")
    for name, tensor in scores.named_parameters():
        finite = torch.isfinite(tensor.detach().flatten(1)).all(1)  # (G,) per task
        if not bool(finite.all()):
            t = task_ids[int((~finite).nonzero()[0])]
            raise NonFiniteError(
                f"task {t}: scores of layer {name} are not finite by step {step}; nothing of "
                "this group is stored. Lower train.lr and rerun")


def _merge(task_ids: list[int], parts: list[TrainResult]) -> TrainResult:
    """One result, in `task_ids` order, from groups trained one after the other."""
    def gather(name: str) -> dict:
        merged = {t: v for p in parts for t, v in getattr(p, name).items()}
        return {t: merged[t] for t in task_ids}

    return TrainResult(
        task_ids=task_ids, masks=gather("masks"), bn_stats=gather("bn_stats"),
        loss=gather("loss"), accuracy=gather("accuracy"), density=gather("density"),
        steps=max(p.steps for p in parts), seconds=sum(p.seconds for p in parts),
        history=[h for p in parts for h in p.history], task_steps=gather("task_steps"),
        kernel=parts[-1].kernel,
    )


def train_task(
    net: SupermaskNet,
    tasks: TaskSet,
    task_id: int,
    config: TrainConfig | None = None,
    **kwargs: object,
) -> TrainResult:
    """Learn one task's mask (a group of one)."""
    return train_group(net, tasks, [task_id], config, **kwargs)  # type: ignore[arg-type]


def add_to_bank(bank: MaskBank, result: TrainResult) -> None:
    """Put every task of `result` into a MaskBank."""
    for t in result.task_ids:
        bank.add(t, result.masks[t], result.bn_stats[t] or None)


def _net_device(net: SupermaskNet) -> torch.device:
    return next(iter(net.masked_layers().values())).weight.device


def config_from_mapping(values: Mapping[str, object]) -> TrainConfig:
    """TrainConfig from a plain mapping; unknown keys are an error naming them."""
    known = set(TrainConfig.__dataclass_fields__)
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown training options {sorted(unknown)}; known: {sorted(known)}")
    return TrainConfig(**values)  # type: ignore[arg-type]
