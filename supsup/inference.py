"""Task inference by the gradient of an objective with respect to the superposition alphas.

Section 3.3 of the paper. With every learned mask superimposed at alpha_i = 1/k, one forward and one
backward pass give dObjective/dalpha_i for all k tasks at once; the task is the most negative.
- one_shot: that single pass (the paper's choice for PermutedMNIST, even among 2500 tasks).
- binary: keep the half of the surviving tasks with the smallest gradient and re-spread alpha over
  them, ceil(log2 k) passes; always returns a task.
Modes decide what the objective sees: the first image of a batch (the paper's protocol), the whole
batch, or each example on its own. Candidates are only tasks the bank holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from supsup.bank import MaskBank
from supsup.binding import bind
from supsup.layers import MaskedLayer, TaskBatchNorm2d
from supsup.networks import SupermaskNet
from supsup.objectives import get_objective

METHODS = ("one_shot", "binary")
MODES = ("one_image", "batch", "per_example")


@dataclass(frozen=True)
class InferenceResult:
    """Inferred task(s) and the evidence behind them.

    task_ids: (B,) inferred task per example (the same value everywhere unless per_example).
    candidates: (k,) the task ids that competed, in bank order.
    gradients: (k,) dObjective/dalpha_i of the first pass, or (B, k) in per_example mode.
    confidence: (B,) max of softmax(-standardised gradients): near 1 when one task stands out.
    passes: forward/backward passes made (per example in per_example mode).
    """

    task_ids: torch.Tensor
    candidates: torch.Tensor
    gradients: torch.Tensor
    confidence: torch.Tensor
    passes: int
    method: str
    mode: str

    @property
    def task_id(self) -> int:
        """The single inferred task (the most frequent one in per_example mode)."""
        return int(self.task_ids.mode().values)


class _MixtureBinding:
    """Masks are leaf tensors holding sum_i alpha_i M_i, so autograd gives dObj/dmixture.

    BatchNorm layers use the alpha-weighted mean of the candidates' own statistics: batch
    statistics would be undefined for the single image of the paper's protocol.
    """

    group = None

    def __init__(self, mixtures: dict[str, torch.Tensor],
                 bn: dict[str, torch.Tensor] | None = None) -> None:
        self.mixtures = mixtures
        self.bn = bn or {}

    def mask(self, layer: MaskedLayer) -> torch.Tensor:
        return self.mixtures[layer.key]

    def bn_stats(self, layer: TaskBatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.bn[layer.key]
        return s[0], s[1]


def alpha_gradients(
    net: SupermaskNet,
    bank: MaskBank,
    x: torch.Tensor,
    rows: torch.Tensor,
    objective: str = "entropy",
    per_example: bool = False,
) -> torch.Tensor:
    """dObjective/dalpha at alpha = 1/k over bank `rows`: (k,), or (B, k) when per_example.

    The objective is averaged over the batch (or kept per example). Costs one forward, one
    backward and, per layer, one product of the packed bank rows with dObj/dmixture.
    """
    k = rows.numel()
    device = next(iter(net.masked_layers().values())).weight.device
    if bank.device.type != device.type:
        # The products over every stored mask run where the bank is: a CPU bank would silently
        # do the heavy half of GPU inference on the host, with a copy per layer each way.
        raise ValueError(
            f"the bank is on {bank.device} and the network on {device}: keep both on one "
            f"device (bank.to({str(device)!r}) or net.to({str(bank.device)!r}))")
    alphas = torch.full((k,), 1.0 / k, device=bank.device)
    mixtures = {
        key: bank.mixture(key, rows, alphas).to(device).requires_grad_(True)
        for key in net.layer_shapes()
    }
    bn = {key: bank.mixed_bn_stats(key, rows, alphas).to(device) for key in net.bn_features()}
    objective_fn = get_objective(objective, net.spec.num_classes)
    was_training = net.training
    net.eval()  # stored BN statistics, never an update of them
    try:
        with bind(net, _MixtureBinding(mixtures, bn)):
            obj = objective_fn(net(x.to(device)))  # (B,)
    finally:
        net.train(was_training)
    leaves = list(mixtures.values())
    if per_example:
        eye = torch.eye(obj.shape[0], device=device)
        grads = torch.autograd.grad(obj, leaves, grad_outputs=eye, is_grads_batched=True)
        out = torch.zeros(obj.shape[0], k, device=bank.device)
        for key, g in zip(mixtures, grads):
            out += bank.alpha_gradient_batched(key, rows, g.reshape(g.shape[0], -1))
        return out
    grads = torch.autograd.grad(obj.mean(), leaves)
    return sum(bank.alpha_gradient(key, rows, g) for key, g in zip(mixtures, grads))


def _confidence(grads: torch.Tensor) -> torch.Tensor:
    if grads.shape[-1] == 1:  # one candidate: certain, and std() of one value is undefined
        return torch.ones(grads.shape[:-1])
    z = -(grads - grads.mean(-1, keepdim=True)) / (grads.std(-1, keepdim=True) + 1e-12)
    return z.softmax(-1).amax(-1)


def infer_task(
    net: SupermaskNet,
    bank: MaskBank,
    x: torch.Tensor,
    *,
    method: str = "one_shot",
    objective: str = "entropy",
    mode: str = "one_image",
    task_ids: Sequence[int] | None = None,
) -> InferenceResult:
    """Infer which learned task produced the batch `x` (B, *input_shape).

    `task_ids` restricts the candidates to some learned tasks (all of the bank when None).
    """
    if method not in METHODS:
        raise ValueError(f"unknown inference method {method!r}; choose one of {METHODS}")
    if mode not in MODES:
        raise ValueError(f"unknown inference mode {mode!r}; choose one of {MODES}")
    if bank.num_tasks == 0:
        raise ValueError("the mask bank is empty: learn or load at least one task first")
    net.check_input(x)
    if x.shape[0] == 0:
        raise ValueError("cannot infer a task from an empty batch")
    rows = bank.rows(task_ids)
    candidates = torch.tensor([bank.task_ids[r] for r in rows.tolist()], dtype=torch.long)
    batch = x.shape[0]
    if mode == "per_example" and method == "binary":
        parts = [infer_task(net, bank, x[i:i + 1], method="binary", objective=objective,
                            mode="batch", task_ids=task_ids) for i in range(batch)]
        return InferenceResult(
            task_ids=torch.cat([p.task_ids for p in parts]), candidates=candidates,
            gradients=torch.stack([p.gradients for p in parts]),
            confidence=torch.cat([p.confidence for p in parts]), passes=parts[0].passes,
            method=method, mode=mode,
        )
    seen = x[:1] if mode == "one_image" else x
    grads = alpha_gradients(net, bank, seen, rows, objective, per_example=mode == "per_example")
    grads = grads.cpu()
    if mode == "per_example":
        chosen = candidates[grads.argmin(-1)]
        return InferenceResult(chosen, candidates, grads, _confidence(grads), 1, method, mode)
    first = grads
    passes = 1
    if method == "binary":
        alive = torch.arange(rows.numel())
        g = grads
        while alive.numel() > 1:
            keep = math.ceil(alive.numel() / 2)
            alive = alive[g.topk(keep, largest=False).indices.sort().values]
            if alive.numel() > 1:
                g = alpha_gradients(net, bank, seen, rows[alive.to(rows.device)], objective).cpu()
                passes += 1
        best = int(alive[0])
    else:
        best = int(grads.argmin())
    chosen = candidates[best].repeat(batch)
    conf = _confidence(first).reshape(1).repeat(batch)
    return InferenceResult(chosen, candidates, first, conf, passes, method, mode)
