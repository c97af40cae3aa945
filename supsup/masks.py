"""Binary supermasks from real-valued scores, and the bit packing that stores them.

Implements the paper's Section 3.1 (supermasks via edge-popup and a threshold) with the
straight-through estimator: the forward value is exactly the binary mask and dL/dscores = dL/dmask.
The Erdos-Renyi budget gives per-layer densities for the GG experiments (Section 3.2).
Bit packing keeps one bit per weight, so a bank of thousands of masks fits in memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

RULES = ("threshold", "topk")


class _StraightThrough(torch.autograd.Function):
    """Return a precomputed binary mask forward; pass the gradient through unchanged backward."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _ThresholdWeight(torch.autograd.Function):
    """W * [scores >= 0] in one pass; dL/dscores = dL/dW_eff * W (straight-through)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return weight * (scores >= 0)  # a multiply by a bool vectorises far better than where

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        return grad * weight, None


def threshold_weight(scores: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Effective weight W * [scores >= 0] fused for speed; same values and gradient as
    `weight * threshold_mask(scores)` (scores (*lead, *shape), weight (*shape))."""
    return _ThresholdWeight.apply(scores, weight)


def check_density(density: float, field: str = "density") -> float:
    """Validate a density (fraction of weights kept) and return it as a float."""
    if not isinstance(density, (int, float)) or isinstance(density, bool):
        raise ValueError(f"{field} must be a number in (0, 1], got {density!r}")
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"{field} must be in (0, 1], got {density}")
    return float(density)


def threshold_mask(scores: torch.Tensor) -> torch.Tensor:
    """M = [scores >= 0] with a straight-through gradient; shape of `scores`, values exactly 0/1."""
    hard = (scores >= 0).to(scores.dtype)
    return _StraightThrough.apply(scores, hard)


def topk_hard(scores: torch.Tensor, density: float, group_dims: int = 0) -> torch.Tensor:
    """Exactly round(density * n) ones at the largest |scores|, per trailing block.

    The first `group_dims` dimensions index independent masks (e.g. tasks of a vectorised group);
    the rest form one layer whose weights compete for the kept slots.
    """
    density = check_density(density)
    lead = scores.shape[:group_dims]
    flat = scores.detach().abs().reshape(*lead, -1)
    n = flat.shape[-1]
    k = max(1, int(round(density * n)))
    hard = torch.zeros_like(flat)
    if k >= n:
        hard.fill_(1.0)
    else:
        idx = flat.topk(k, dim=-1, sorted=False).indices
        hard.scatter_(-1, idx, 1.0)
    return hard.reshape(scores.shape)


def topk_mask(scores: torch.Tensor, density: float, group_dims: int = 0) -> torch.Tensor:
    """Edge-popup mask: keep the `density` fraction of largest |scores|, straight-through grad.

    The ranking is by |scores|, so the straight-through gradient goes to |scores|:
    dL/dscores = dL/dmask * sign(scores). Without the sign a negative score moves the wrong way
    (a helpful weight's score shrinks towards being dropped) and top-k masks never learn.
    """
    return _StraightThrough.apply(scores.abs(), topk_hard(scores, density, group_dims))


def apply_rule(
    scores: torch.Tensor, rule: str, density: float | None = None, group_dims: int = 0
) -> torch.Tensor:
    """Dispatch to the threshold or top-k rule; `density` is required for top-k."""
    if rule == "threshold":
        return threshold_mask(scores)
    if rule == "topk":
        if density is None:
            raise ValueError("the topk rule needs a density in (0, 1]")
        return topk_mask(scores, density, group_dims)
    raise ValueError(f"unknown mask rule {rule!r}; choose one of {RULES}")


def erdos_renyi_densities(
    shapes: Sequence[Sequence[int]], scale: float, cap: float = 0.5
) -> list[float]:
    """Per-layer densities min(cap, scale * (c_out + c_in) / (c_out * c_in * k_h * k_w)).

    `shapes` are weight shapes: (out, in) for linear and (out, in, k_h, k_w) for conv layers.
    """
    if scale <= 0:
        raise ValueError(f"erdos_renyi scale must be positive, got {scale}")
    out = []
    for shape in shapes:
        c_out, c_in = shape[0], shape[1]
        numel = math.prod(shape)
        out.append(min(cap, scale * (c_out + c_in) / numel))
    return out


_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)  # most significant bit first, like numpy


def packed_size(numel: int) -> int:
    """Bytes needed to hold `numel` bits."""
    return (numel + 7) // 8


def pack_bits(mask: torch.Tensor, group_dims: int = 0) -> torch.Tensor:
    """Pack a 0/1 tensor into uint8, 8 weights per byte, MSB first (numpy.packbits order).

    (*lead, *shape) -> (*lead, ceil(prod(shape) / 8)); the first `group_dims` dims are kept.
    """
    lead = mask.shape[:group_dims]
    flat = mask.reshape(*lead, -1)
    # Any dtype but bool can hold other values; a 2 would otherwise corrupt its neighbours' bits.
    if flat.dtype != torch.bool and not bool(((flat == 0) | (flat == 1)).all()):
        raise ValueError("pack_bits expects a mask of exact zeros and ones")
    bits = flat.to(torch.uint8)
    n = bits.shape[-1]
    pad = packed_size(n) * 8 - n
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    bits = bits.reshape(*lead, -1, 8)
    shifts = _SHIFTS.to(bits.device)
    return (bits << shifts).sum(-1, dtype=torch.uint8)


def unpack_bits(
    packed: torch.Tensor, numel: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of `pack_bits` on the last dim: (*lead, nbytes) -> (*lead, numel) in `dtype`."""
    shifts = _SHIFTS.to(packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :numel].to(dtype)
