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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from supsup.gates import GatedNet, pattern_to_gates
from supsup.objectives import entropy
from supsup.seeding import generator

# Fields are sums of d terms of size ~1/d; within this of zero, rounding decides the sign.
_ZERO_FIELD = 1e-6


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
