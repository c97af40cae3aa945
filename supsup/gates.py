"""Neuron-gated networks for the Hopfield reservoir (see supsup.hopfield): a fixed random
network whose hidden neurons a task switches on or off with a gate in {0, 1}^d, the gates'
training with task identity, and the gates <-> {-1, +1} pattern mapping the reservoir stores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from supsup.layers import kaiming_uniform_scores, signed_constant
from supsup.masks import threshold_mask
from supsup.seeding import generator
from supsup.tasks import TaskSet


class GatedNet(nn.Module):
    """input -> hidden[0] -> ... -> num_outputs over fixed signed-constant weights, no bias.

    Each hidden layer computes relu(gate * bn(W h)); the head is linear and ungated. Weights of
    layer i come from (seed, i) alone, as in `supsup.layers`, and are not trained.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 28, 28),
        hidden: Sequence[int] = (2048, 2048),
        num_outputs: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.input_shape = tuple(int(v) for v in input_shape)
        self.hidden = tuple(int(v) for v in hidden)
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"hidden must name at least one positive width, got {hidden}")
        if num_outputs < 1:
            raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
        self.num_outputs = num_outputs
        self.seed = seed
        sizes = [math.prod(self.input_shape), *self.hidden, num_outputs]
        self.fan_ins = sizes[:-1]
        for i, (fan_in, width) in enumerate(zip(sizes[:-1], sizes[1:])):
            weight = signed_constant((width, fan_in), fan_in, seed, i)
            self.register_buffer(f"weight{i}", weight, persistent=False)

    @property
    def num_gated(self) -> int:
        return len(self.hidden)

    def weight(self, i: int) -> torch.Tensor:
        return getattr(self, f"weight{i}")

    def check_input(self, x: torch.Tensor) -> None:
        """ValueError naming the expected shape when `x` is not (B, *input_shape), B >= 2."""
        if x.dim() != 1 + len(self.input_shape) or tuple(x.shape[1:]) != self.input_shape:
            shape = ", ".join(map(str, self.input_shape))
            raise ValueError(f"the gated network expects input (B, {shape}), got "
                             f"{tuple(x.shape)}")
        if x.shape[0] < 2:
            raise ValueError("the gated network normalises with batch statistics: a batch needs "
                             f"at least 2 examples, got {x.shape[0]}")

    def check_gates(self, gates: Sequence[torch.Tensor]) -> None:
        widths = tuple(int(g.shape[-1]) if g.dim() == 1 else -1 for g in gates)
        if widths != self.hidden:
            raise ValueError(f"gates must be one vector per hidden layer of widths {self.hidden}, "
                             f"got widths {widths}")

    def forward(self, x: torch.Tensor, gates: Sequence[torch.Tensor]) -> torch.Tensor:
        """x (B, *input_shape), gates[l] (hidden[l],) in [0, 1] -> logits (B, num_outputs)."""
        h = x.flatten(1)
        for i, g in enumerate(gates):
            pre = F.batch_norm(F.linear(h, self.weight(i)), None, None, training=True)
            h = torch.relu(g * pre)
        return F.linear(h, self.weight(self.num_gated))


def gates_to_pattern(gates: Sequence[torch.Tensor]) -> torch.Tensor:
    """0/1 gates per layer (all of width d) -> the stored pattern (L, d) in {-1, +1}."""
    widths = {int(g.numel()) for g in gates}
    if len(widths) != 1:
        raise ValueError(f"a reservoir pattern needs every gated layer of one width d, got "
                         f"widths {sorted(widths)}")
    return torch.stack([g.reshape(-1).float() for g in gates]) * 2 - 1


def pattern_to_gates(pattern: torch.Tensor) -> list[torch.Tensor]:
    """(L, d) in {-1, +1} -> 0/1 gates per layer."""
    return [(row > 0).float() for row in pattern]


# --------------------------------------------------------------------------- learning gates


@dataclass(frozen=True)
class GateTrainConfig:
    """How one task's gates are learned (the paper: SGD lr 0.1, momentum 0.9, wd 1e-4, 1 epoch)."""

    epochs: float = 1.0
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0  # batch order

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (batch statistics), got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass
class GateResult:
    """A task's learned gates (0/1, one (d,) vector per hidden layer) and its last training loss."""

    task_id: int
    gates: list[torch.Tensor]
    steps: int
    loss: float
    accuracy: float  # training accuracy over the last epoch's worth of batches (at most)

    @property
    def pattern(self) -> torch.Tensor:
        return gates_to_pattern(self.gates)


def initial_gate_scores(net: GatedNet, task_id: int) -> list[torch.Tensor]:
    """Kaiming-uniform scores per hidden unit, keyed by (seed, "gates", task, layer): half on."""
    return [
        kaiming_uniform_scores((width,), fan_in, generator(net.seed, "gates", task_id, i))
        for i, (width, fan_in) in enumerate(zip(net.hidden, net.fan_ins))
    ]


def train_gates(
    net: GatedNet, tasks: TaskSet, task_id: int, config: GateTrainConfig | None = None
) -> GateResult:
    """Learn one task's gates: scores per unit, gate = [score >= 0] with straight-through."""
    config = config or GateTrainConfig()
    task_id = tasks.check_task(task_id)
    if tasks.input_shape != net.input_shape:
        raise ValueError(f"the gated network expects inputs {net.input_shape}, the tasks have "
                         f"{tasks.input_shape}")
    if tasks.num_classes > net.num_outputs:
        raise ValueError(f"the tasks have {tasks.num_classes} classes but the network only "
                         f"{net.num_outputs} outputs")
    device = net.weight(0).device
    scores = [s.to(device).requires_grad_(True) for s in initial_gate_scores(net, task_id)]
    opt = torch.optim.SGD(scores, lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    size = tasks.size(task_id, "train")
    steps = max(1, math.ceil(config.epochs * size / config.batch_size))
    window = max(1, size // config.batch_size)
    # Per-step values stay on the device and are read once at the end: no sync per step.
    losses = torch.zeros(steps, device=device)
    hits = torch.zeros(steps, device=device)
    for i, (x, y) in enumerate(tasks.train_batches([task_id], config.batch_size, steps,
                                                   seed=config.seed)):
        x, y = x[0].to(device), y[0].to(device)
        logits = net(x, [threshold_mask(s) for s in scores])
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            losses[i] = loss.detach()
            hits[i] = (logits[:, : tasks.num_classes].argmax(-1) == y).float().mean()
    gates = [(s.detach() >= 0).float().cpu() for s in scores]
    return GateResult(task_id, gates, steps, float(losses[-window:].mean()),
                      float(hits[-window:].mean()))


def gated_accuracy(
    net: GatedNet,
    gates: Sequence[torch.Tensor],
    tasks: TaskSet,
    task_id: int,
    split: str = "test",
    batch_size: int = 1000,
) -> float:
    """Accuracy of `gates` on one task's split (argmax over the task's labelled outputs).

    BatchNorm uses each batch's statistics, so a last batch of a single example is merged into
    the one before it.
    """
    net.check_gates(gates)
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (batch statistics), got {batch_size}")
    n = tasks.size(task_id, split)
    if n < 2:
        raise ValueError(f"task {task_id} has {n} {split} examples; batch statistics need 2")
    device = net.weight(0).device
    gates = [g.to(device) for g in gates]
    bounds = list(range(0, n, batch_size)) + [n]
    if bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    correct = 0
    with torch.no_grad():
        for a, b in zip(bounds[:-1], bounds[1:]):
            x, y = tasks.get(task_id, split, torch.arange(a, b))
            pred = net(x.to(device), gates)[:, : tasks.num_classes].argmax(-1).cpu()
            correct += int((pred == y).sum())
    return correct / n


# ------------------------------------------------------------------------------- reservoir
