"""A constant-size reservoir for masks: neuron gates stored in Hopfield matrices, recalled by
descending the output entropy and the Hopfield energy together (Section 3.5 of the paper).

Masks here gate neurons, not weights: a fixed random network input-d-d-outputs (784-2048-2048-10
in the paper) computes h = relu(gate * bn(W x)) in each hidden layer, where bn is a BatchNorm
without affine parameters and gate in {0, 1}^d is the task's mask (it sits where the BN's gamma
would be). A task is the pattern x = 2 * gate - 1 in {-1, +1}^d per layer, and every task is
written into one d x d matrix per layer,

    Psi += (x x^T - I - x h^T - h x^T) / d,  h = Psi x,

so memory is O(d^2) per layer however many tasks are stored (plus an O(d) running sum of the
patterns, where recall starts). Choices this module makes and why:

- BatchNorm always uses the statistics of the batch at hand, in training and at recall. Per-task
  running statistics would grow with the number of tasks, which a constant-size store must not.
  A batch therefore needs more than one example.
- Labels are shared: a SplitTasks task relabels its two digits to 0..1 and the head has 10
  outputs, so the other 8 are superfluous neurons that training pushes down and the entropy
  over all outputs sees. (With unshared labels, outputs 2t and 2t+1 for task t, the entropy
  gradient at the mean pattern pointed to the right task for 2 of 5 tasks at d = 2048; with
  shared labels for all 5.)
- Recall relaxes the pattern to s in [-1, 1]^(L x d) (gate = (1 + s) / 2) and runs SGD with
  momentum on (1 - t/T) H + gamma (t/T) E, E = -1/2 sum_l s_l^T Psi_l s_l, projecting s back into
  the box after each step (a clamp keeps the gradient alive at the faces, where tanh would not).
  By default the entropy gradient is multiplied by Psi_l (`precondition`): plain descent on H in
  d dimensions leaves the span of the stored patterns for confident gate settings that are no
  task at all (measured at d = 2048: H 0.1 at Hamming distances of 950 to 1300 of 4096 bits
  from every stored pattern, after which E drew the state towards the last-stored pattern).
  Psi is close to sum_i x_i x_i^T / d, so Psi dH/ds is about sum_i x_i <x_i, dH/ds> / d: at the
  start, SupSup's one-shot inference step (dH/dalpha_i = <x_i, dH/ds> at s = mean of the
  patterns), written in gate space with the constant-size matrix alone. With it, the five
  SplitMNIST tasks at d = 2048 were each recalled exactly, within 3 to 6 steps;
  `precondition=False` is the plain SGD of the paper's description (measured: one task
  exact, two within 5% of the bits, two lost).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from supsup.layers import kaiming_uniform_scores, signed_constant
from supsup.masks import threshold_mask
from supsup.objectives import entropy
from supsup.seeding import generator
from supsup.tasks import TaskSet

# Fields are sums of d terms of size ~1/d; within this of zero, rounding decides the sign.
_ZERO_FIELD = 1e-6

# ------------------------------------------------------------------------------ gated network


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


@dataclass(frozen=True)
class RecallStep:
    """One SGD step of recall: the two terms before the step, and how the binarised state moved."""

    step: int
    entropy: float
    energy: float
    flipped: int  # bits of sign(s) that changed in this step
    saturated: float  # fraction of coordinates of s at -1 or +1


@dataclass
class RecallResult:
    """The recalled pattern (L, d) in {-1, +1}, its gates, and the trace of the descent."""

    pattern: torch.Tensor
    trace: list[RecallStep] = field(default_factory=list)

    @property
    def gates(self) -> list[torch.Tensor]:
        return pattern_to_gates(self.pattern)

    @property
    def settled_at(self) -> int:
        """First step after which the binarised state never changed (steps if it never settled)."""
        last = 0
        for rec in self.trace:
            if rec.flipped:
                last = rec.step + 1
        return last


class HopfieldReservoir:
    """One d x d Hopfield matrix per gated layer and the running sum of the stored patterns."""

    def __init__(self, d: int, num_layers: int = 1, device: torch.device | str = "cpu") -> None:
        if d < 1 or num_layers < 1:
            raise ValueError(f"d and num_layers must be >= 1, got d={d}, num_layers={num_layers}")
        self.d = d
        self.num_layers = num_layers
        self.psi = torch.zeros(num_layers, d, d, device=device)  # (L, d, d), symmetric
        self.pattern_sum = torch.zeros(num_layers, d, device=device)  # (L, d)
        self.num_stored = 0

    def nbytes(self) -> int:
        """Bytes held: the same for 1 stored task as for 10,000."""
        return sum(t.numel() * t.element_size() for t in (self.psi, self.pattern_sum))

    def _check_pattern(self, x: torch.Tensor, what: str) -> torch.Tensor:
        if tuple(x.shape) != (self.num_layers, self.d):
            raise ValueError(f"{what} must have shape (num_layers, d) = ({self.num_layers}, "
                             f"{self.d}), got {tuple(x.shape)}")
        x = x.to(self.psi.device, torch.float32)
        if not bool((x.abs() == 1).all()):
            raise ValueError(f"{what} must hold only -1 and +1 (use gates_to_pattern for 0/1 "
                             "gates)")
        return x

    def store(self, x: torch.Tensor) -> None:
        """Write one pattern (num_layers, d) in {-1, +1} with the Storkey-style rule."""
        x = self._check_pattern(x, "a stored pattern")
        eye = torch.eye(self.d, device=self.psi.device)
        for layer in range(self.num_layers):
            xl = x[layer]
            h = self.psi[layer] @ xl
            self.psi[layer] += (torch.outer(xl, xl) - eye - torch.outer(xl, h)
                                - torch.outer(h, xl)) / self.d
        self.pattern_sum += x
        self.num_stored += 1

    def mean_pattern(self) -> torch.Tensor:
        """(num_layers, d) mean of the stored patterns: where recall starts."""
        if self.num_stored == 0:
            raise ValueError("the reservoir is empty: store at least one pattern first")
        return self.pattern_sum / self.num_stored

    def energy(self, s: torch.Tensor) -> torch.Tensor:
        """E = -1/2 sum_l s_l^T Psi_l s_l for s (num_layers, d); differentiable."""
        return -0.5 * torch.einsum("li,lij,lj->", s, self.psi, s)

    def settle(self, s: torch.Tensor, max_iters: int = 20) -> torch.Tensor:
        """Discrete synchronous dynamics s <- sign(Psi s), for (..., num_layers, d) states.

        A zero field (within float rounding, _ZERO_FIELD) keeps the bit as it was. Stops when
        nothing changes or after max_iters.
        """
        s = torch.where(s >= 0, 1.0, -1.0).to(self.psi.device)
        for _ in range(max_iters):
            field_ = torch.einsum("lij,...lj->...li", self.psi, s)
            new = torch.where(field_ > _ZERO_FIELD, 1.0,
                              torch.where(field_ < -_ZERO_FIELD, -1.0, s))
            if torch.equal(new, s):
                break
            s = new
        return s

    def recall(
        self,
        net: GatedNet,
        batches: Iterable[torch.Tensor],
        *,
        steps: int = 30,
        lr: float = 500.0,
        momentum: float = 0.9,
        gamma: float = 1.5e-3,
        precondition: bool = True,
    ) -> RecallResult:
        """Recall the pattern of the task that produced `batches` (x tensors (B, *input)).

        SGD from the mean stored pattern on (1 - t/T) H + gamma (t/T) E, t = 0..T-1, one batch
        per step (cycling); s is clamped to [-1, 1] after every step and binarised at the end.
        """
        self.mean_pattern()  # ValueError when nothing is stored yet
        if tuple(net.hidden) != (self.d,) * self.num_layers:
            raise ValueError(f"reservoir d={self.d} with {self.num_layers} layers does not match "
                             f"the network's gated widths {net.hidden}: build the reservoir with "
                             "d equal to the hidden width")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        xs = list(batches)
        if not xs:
            raise ValueError("recall needs at least one batch of the task's inputs")
        for x in xs:
            net.check_input(x)
        device = self.psi.device
        s = self.mean_pattern().clone().requires_grad_(True)
        opt = torch.optim.SGD([s], lr=lr, momentum=momentum)
        trace: list[RecallStep] = []
        signs = torch.where(s.detach() >= 0, 1.0, -1.0)
        for t in range(steps):
            h = entropy(net(xs[t % len(xs)].to(device), list((1 + s) / 2))).mean()
            (grad_h,) = torch.autograd.grad(h, s)
            with torch.no_grad():
                if precondition:
                    grad_h = torch.einsum("lij,lj->li", self.psi, grad_h)
                grad_e = -torch.einsum("lij,lj->li", self.psi, s)  # dE/ds (Psi is symmetric)
                e = float(self.energy(s))
                s.grad = (1 - t / steps) * grad_h + gamma * (t / steps) * grad_e
            opt.step()
            with torch.no_grad():
                s.clamp_(-1.0, 1.0)
                new = torch.where(s >= 0, 1.0, -1.0)
                flipped = int((new != signs).sum())
                signs = new
                saturated = float((s.abs() >= 1.0).float().mean())
            trace.append(RecallStep(t, float(h.detach()), e, flipped, saturated))
        return RecallResult(signs.cpu(), trace)


# ------------------------------------------------------------------------------- capacity


def random_patterns(num: int, d: int, seed: int = 0) -> torch.Tensor:
    """(num, d) patterns of independent fair +-1 bits from a generator keyed by (seed, d)."""
    g = generator(seed, "hopfield-patterns", d)
    return torch.randint(0, 2, (num, d), generator=g).float() * 2 - 1


def recall_rate(
    reservoir: HopfieldReservoir,
    patterns: torch.Tensor,
    *,
    flip: float = 0.1,
    max_iters: int = 20,
    seed: int = 0,
) -> float:
    """Share of `patterns` (P, num_layers, d) or (P, d) for one layer that `settle` restores
    exactly from a copy with round(flip * d) random bits of every layer flipped."""
    if not 0.0 <= flip < 0.5:
        raise ValueError(f"flip must be in [0, 0.5), got {flip}")
    if patterns.dim() == 2:
        patterns = patterns.unsqueeze(1)
    if patterns.shape[1:] != (reservoir.num_layers, reservoir.d):
        raise ValueError(f"patterns must be (P, {reservoir.num_layers}, {reservoir.d}) for this "
                         f"reservoir (d={reservoir.d}), got {tuple(patterns.shape)}")
    if patterns.shape[0] == 0:
        raise ValueError("recall_rate needs at least one pattern")
    g = generator(seed, "hopfield-probes", reservoir.d)
    k = int(round(flip * reservoir.d))
    noise = torch.rand(patterns.shape, generator=g)
    # Flip exactly k bits per (pattern, layer): the k smallest noise values of each row.
    probes = patterns.clone()
    if k:
        idx = noise.topk(k, dim=-1, largest=False).indices
        probes.scatter_(-1, idx, -probes.gather(-1, idx))
    settled = reservoir.settle(probes.to(reservoir.psi.device), max_iters).cpu()
    return float((settled == patterns).flatten(1).all(1).float().mean())


def capacity_curve(
    d: int,
    counts: Sequence[int],
    *,
    flip: float = 0.1,
    max_iters: int = 20,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[tuple[int, float]]:
    """Recall rate against the number of stored random patterns, for one layer of width d.

    Patterns are stored one by one and each count in `counts` (ascending) is measured on all
    patterns stored so far, so the whole curve costs one pass of stores.
    """
    counts = [int(c) for c in counts]
    if not counts or counts != sorted(counts) or counts[0] < 1:
        raise ValueError(f"counts must be ascending positive numbers of patterns, got {counts}")
    patterns = random_patterns(counts[-1], d, seed)
    reservoir = HopfieldReservoir(d, 1, device)
    out = []
    stored = 0
    for c in counts:
        while stored < c:
            reservoir.store(patterns[stored].unsqueeze(0))
            stored += 1
        out.append((c, recall_rate(reservoir, patterns[:c], flip=flip, max_iters=max_iters,
                                   seed=seed)))
    return out
