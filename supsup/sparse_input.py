"""Alpha gradients of a linear layer input unit by input unit, skipping the units a query leaves
at its resting value: an image's background, a ReLU's zeros.

Inputs are mostly at rest: a bundled MNIST digit lights 19% of its pixels, and at the uniform
mixture LeNet-500's hidden ReLUs pass 52% (fc2's input) and 59% (fc3's). With x_bj = lo_b +
d_bj, d_bj = 0 where unit j rests (lo_b the row's smallest value: the background, or 0 after a
ReLU), the one-shot gradient of query b for task i splits into the lit units and a constant:

    dH_b/dalpha_i = c sum_{j: d_bj != 0} d_bj (A_i[:, j] . g_b) + c lo_b (rowsum(A_i) . g_b)

(A_i = M_i * sign(W) in {-1, 0, 1}, c = |W|, g_b the output gradients; `supsup.bilinear`). The
masks are held unit by unit, (in, out, k) int8, and for each unit one `torch._int_mm` multiplies
the fixed-point digits of the g of the queries that light it by its (out, k) masks; the (lit
queries, k) sums are weighted by d and added to those queries' rows.

Cost: `digits` x density of a dense product over (out, in), against the dense kernel's one
digit on a pixel grid or `digits` otherwise. Measured on a 2-core AVX-512 EPYC (k = 2,500,
LeNet-500, MNIST digits in random permutations, 256 queries per pass): the whole engine 2.0-2.1
ms/query with every layer this way, 2.7 with the input layer alone, 3.4 with none; at 64
queries per pass the input layer declines (12 lit queries per pixel) and the hidden layers gain
5%. `sparse_alpha_gradients` declines passes with fewer than `MIN_LIT_PER_UNIT` lit queries per
unit on average (small products run slowly) or whose multiply-adds would exceed `DENSE_SHARE`
of the dense kernel's, and the caller takes the dense kernel.

Rounding: g in `digits` fixed-point digits is the only rounding before float32 sums; the
result is within `sparse_rounding_bound` (|x - lo| where the dense kernel's bound has |x|).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from supsup.bilinear import LinearFactors
from supsup.fixed_point import fixed_point_digits, fixed_point_step, integer_grid

MIN_LIT_PER_UNIT = 32  # lit queries per unit, on average, below which the products run slowly
DENSE_SHARE = 0.8  # the largest share of the dense kernel's multiply-adds worth taking
_UNITS_PER_TAKE = 16  # units a worker thread takes at a time


@dataclass(frozen=True)
class UnitMasks:
    """A layer's masks unit by unit: `masks` (in, out, k) int8 A, `sums` (k, out) float32 sums
    over the inputs (what the resting value lo multiplies)."""

    masks: torch.Tensor
    sums: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.masks.numel() + 4 * self.sums.numel()


def unit_masks(resident: torch.Tensor, weight: torch.Tensor, *, block: int = 256) -> UnitMasks:
    """`UnitMasks` from a layer's `signed_masks` (k, out * in) in the kernel's layout ((out, in),
    or (in, out) for layers with more outputs than inputs), a block of tasks at a time."""
    out_f, in_f = weight.shape
    k = resident.shape[0]
    masks = torch.empty(in_f, out_f, k, dtype=torch.int8, device=resident.device)
    sums = torch.empty(k, out_f, dtype=torch.float32, device=resident.device)
    for r0 in range(0, k, block):
        a = resident[r0:r0 + block]
        a = a.view(-1, in_f, out_f) if out_f > in_f else a.view(-1, out_f, in_f).transpose(1, 2)
        masks[:, :, r0:r0 + block] = a.permute(1, 2, 0)
        sums[r0:r0 + block] = a.sum(1, dtype=torch.int32)
    return UnitMasks(masks, sums)


def sparse_alpha_gradients(units: UnitMasks, weight: torch.Tensor, factors: LinearFactors, *,
                           digits: int = 2, workers: int = 1,
                           on_block: Callable[[int], None] | None = None
                           ) -> torch.Tensor | None:
    """(B, k) float32 dH_b/dalpha_i of a linear layer from its `UnitMasks`; None when the pass
    suits the dense kernel better (see the module's cost).

    `workers` threads take units `_UNITS_PER_TAKE` at a time, each adding into its own rows
    (summed at the end), for callers running single-threaded kernels (`InferenceEngine`).
    `on_block`, when given, is told the bytes the buffers hold (B x k per worker, at most)."""
    out_f, in_f = weight.shape
    x = factors.x.reshape(-1, in_f).to(torch.float32)
    batch = x.shape[0]
    lo = x.amin(1)
    shifted = x - lo[:, None]
    on = (shifted != 0).T  # (in, B)
    counts = on.sum(1)
    pairs = int(counts.sum())
    share = DENSE_SHARE * in_f * batch  # of one digit of the dense kernel's multiply-adds
    if pairs < MIN_LIT_PER_UNIT * in_f or pairs > share:
        return None
    # the dense kernel writes x, its larger side when in >= out, in one digit if x is on a grid
    if in_f >= out_f and digits * pairs > share and integer_grid(x, digits) is not None:
        return None
    g = factors.g.reshape(batch, out_f)
    ints, step = fixed_point_digits(g, digits)  # (out, digits * B): column d * B + b
    # (B, digits * out): each query's digits, gathered for the queries that light a unit
    per_query = ints.view(out_f, digits, batch).permute(2, 1, 0).reshape(batch, -1)
    unit, query = on.nonzero(as_tuple=True)  # sorted by unit, then query
    lit = shifted[query, unit]
    starts = [0, *torch.cumsum(counts, 0).tolist()]
    k = units.masks.shape[2]
    widest = int(counts.max())
    takes = iter(range(0, in_f, _UNITS_PER_TAKE))
    lock = threading.Lock()
    device = units.masks.device

    def work() -> torch.Tensor:
        acc = torch.zeros(batch, k, dtype=torch.float32, device=device)
        sums = torch.empty(widest * digits, k, dtype=torch.int32, device=device)
        lit_digits = torch.empty(widest, digits * out_f, dtype=torch.int8, device=device)
        while True:
            with lock:
                j0 = next(takes, None)
            if j0 is None:
                return acc
            for j in range(j0, min(in_f, j0 + _UNITS_PER_TAKE)):
                a, b = starts[j], starts[j + 1]
                if a == b:
                    continue
                n = b - a
                y = sums[: n * digits]
                v = torch.index_select(per_query, 0, query[a:b], out=lit_digits[:n])
                torch._int_mm(v.view(n * digits, out_f), units.masks[j], out=y)
                y3 = y.view(n, digits, k)
                # |digit sums| <= 128 out: exact in float32, and their 256**d sum for 2 digits
                f = y3[:, 0].to(torch.float32)
                for d in range(1, digits):
                    f.add_(y3[:, d], alpha=256.0**d)
                acc.index_add_(0, query[a:b], f.mul_(lit[a:b, None]))

    workers = max(1, min(workers, in_f // _UNITS_PER_TAKE))
    if on_block is not None:
        on_block(workers * (batch * k * 4 + widest * digits * (k * 4 + out_f)) + 12 * pairs)
    if workers == 1:
        acc = work()
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="units") as pool:
            acc = sum(pool.map(lambda _: work(), range(workers)))  # type: ignore[assignment]
    scale = float(weight.abs().reshape(-1)[0])
    acc.mul_((step * scale).to(torch.float32)[:, None])
    if bool((lo == 0).all()):
        return acc  # a ReLU's input: nothing rests away from zero
    constant = g.to(torch.float32) * (lo * scale)[:, None]  # (B, out)
    return acc.addmm_(constant, units.sums.T)


def sparse_rounding_bound(weight: torch.Tensor, factors: LinearFactors, counts: torch.Tensor,
                          digits: int) -> torch.Tensor:
    """(B, k) bound on |`sparse_alpha_gradients` - exact| before float32 sums: half a
    fixed-point step of g per kept weight, times c |x - lo| (x's distance from its row's
    smallest value). `counts` (k, out, in) 0/1 masks."""
    out_f, in_f = weight.shape
    x = factors.x.reshape(-1, in_f).to(torch.float64)
    g = factors.g.reshape(-1, out_f)
    scale = float(weight.abs().reshape(-1)[0])
    shifted = x - x.amin(1, keepdim=True)
    step = fixed_point_step(g, digits)[:, None]
    return 0.5 * scale * step * torch.einsum("koi,bi->bk", counts.to(torch.float64), shifted)
