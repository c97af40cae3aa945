"""Which task(s) a network runs as: bindings and the context managers that install them.

A binding answers two questions for each layer: which mask (or masks) to multiply the frozen
weights by, and which BatchNorm statistics to use. Bindings are installed only through context
managers that restore the previous state on exit, so no caller ever sets task state on modules:

    with use_task(net, bank, task_id=3):          # GG: the task is given
        logits = net(x)
    with use_alphas(net, bank, alphas):           # GN: W * sum_i alpha_i M_i, differentiable
        logits = net(x)
    with use_scores(net, scores):                 # training: masks from real-valued scores
        logits = net(x_group)                     # (G, B, ...) -> (G, B, outputs)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from supsup.layers import Binding, MaskedLayer, TaskBatchNorm2d, _Bound

if TYPE_CHECKING:
    from supsup.bank import MaskBank
    from supsup.networks import SupermaskNet
    from supsup.scores import TaskScores


@contextlib.contextmanager
def bind(net: SupermaskNet, binding: Binding) -> Iterator[SupermaskNet]:
    """Install `binding` on every bound module of `net`; restore what was there on exit."""
    modules = [m for m in net.modules() if isinstance(m, _Bound)]
    previous = [m._binding for m in modules]
    for m in modules:
        m._binding = binding
    try:
        yield net
    finally:
        for m, b in zip(modules, previous):
            m._binding = b


class _TaskBinding:
    """One task from the bank; masks are unpacked once per binding and cached."""

    group = None

    def __init__(self, bank: MaskBank, task_id: int) -> None:
        bank.row(task_id)  # KeyError naming the task if it was never learned
        self.bank = bank
        self.task_id = task_id
        self._cache: dict[str, torch.Tensor] = {}

    def mask(self, layer: MaskedLayer) -> torch.Tensor:
        if layer.key not in self._cache:
            self._cache[layer.key] = self.bank.mask(self.task_id, layer.key).to(layer.weight.device)
        return self._cache[layer.key]

    def bn_stats(self, layer: TaskBatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        if layer.key not in self._cache:
            self._cache[layer.key] = self.bank.bn_stats(self.task_id, layer.key)
        s = self._cache[layer.key]
        return s[0], s[1]


class _GroupBinding:
    """Several tasks from the bank evaluated at once in group mode."""

    def __init__(self, bank: MaskBank, task_ids: Sequence[int]) -> None:
        self.bank = bank
        self.task_ids = list(task_ids)
        bank.rows(self.task_ids)
        self.group = len(self.task_ids)
        self._cache: dict[str, torch.Tensor] = {}

    def mask(self, layer: MaskedLayer) -> torch.Tensor:
        if layer.key not in self._cache:
            masks = self.bank.masks(self.task_ids, layer.key)
            self._cache[layer.key] = masks.to(layer.weight.device)
        return self._cache[layer.key]

    def bn_stats(self, layer: TaskBatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        if layer.key not in self._cache:
            self._cache[layer.key] = self.bank.bn_stats(self.task_ids, layer.key)
        s = self._cache[layer.key]
        return s[:, 0], s[:, 1]


class _Superposition(torch.autograd.Function):
    """mixture = sum_i alphas_i M_i from packed bits; backward gives dL/dalphas from packed bits."""

    @staticmethod
    def forward(ctx, alphas: torch.Tensor, bank: MaskBank, key: str,
                rows: torch.Tensor) -> torch.Tensor:
        ctx.bank, ctx.key = bank, key
        ctx.save_for_backward(rows)
        return bank.mixture(key, rows, alphas)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (rows,) = ctx.saved_tensors
        return ctx.bank.alpha_gradient(ctx.key, rows, grad), None, None, None


class _AlphaBinding:
    """W * sum_i alpha_i M_i over `rows` of the bank; BN uses the alpha-mixed task statistics."""

    group = None

    def __init__(self, bank: MaskBank, alphas: torch.Tensor, rows: torch.Tensor) -> None:
        if alphas.dim() != 1 or alphas.numel() != rows.numel():
            raise ValueError(
                f"alphas must be a vector with one entry per task ({rows.numel()}), "
                f"got shape {tuple(alphas.shape)}"
            )
        self.bank, self.alphas, self.rows = bank, alphas, rows

    def mask(self, layer: MaskedLayer) -> torch.Tensor:
        mix = _Superposition.apply(self.alphas, self.bank, layer.key, self.rows)
        return mix.to(layer.weight.device)

    def bn_stats(self, layer: TaskBatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.bank.mixed_bn_stats(layer.key, self.rows, self.alphas)
        return s[0], s[1]


class _ScoresBinding:
    """Masks from trainable scores (straight-through), as during training."""

    def __init__(self, scores: TaskScores) -> None:
        self.scores = scores
        self.group = scores.group

    def mask(self, layer: MaskedLayer) -> torch.Tensor:
        return self.scores.mask(layer.key)

    def effective_weight(self, layer: MaskedLayer) -> torch.Tensor:
        return self.scores.effective_weight(layer.key, layer.weight)

    def bn_stats(self, layer: TaskBatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scores.bn_stats(layer.key)


def use_task(net: SupermaskNet, bank: MaskBank, task_id: int) -> contextlib.AbstractContextManager:
    """Run `net` with one learned task's masks (and its BN statistics)."""
    return bind(net, _TaskBinding(bank, task_id))


def use_tasks(
    net: SupermaskNet, bank: MaskBank, task_ids: Sequence[int]
) -> contextlib.AbstractContextManager:
    """Run `net` for several learned tasks at once: input (G, B, ...) -> (G, B, outputs)."""
    return bind(net, _GroupBinding(bank, task_ids))


def use_alphas(
    net: SupermaskNet,
    bank: MaskBank,
    alphas: torch.Tensor,
    task_ids: Sequence[int] | None = None,
) -> contextlib.AbstractContextManager:
    """Run `net` with the superposition sum_i alphas_i M_i over `task_ids` (all when None).

    Differentiable in `alphas`: the backward pass computes dL/dalphas from the packed bits.
    """
    return bind(net, _AlphaBinding(bank, alphas, bank.rows(task_ids)))


def use_scores(net: SupermaskNet, scores: TaskScores) -> contextlib.AbstractContextManager:
    """Run `net` with masks derived from `scores` (group mode: input (G, B, ...))."""
    return bind(net, _ScoresBinding(scores))
