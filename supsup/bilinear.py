"""Alpha gradients of many queries at once over a linear layer: one read of the packed bank.

One-shot task inference (Section 3.3) needs, per query b and task i, dH_b/dalpha_i = sum over a
layer's weights of M_i * W * dH_b/dW_eff. For a linear layer the per-example gradient is the outer
product g_b x_b^T (g_b = dH_b/dy at the layer's output, x_b its input), so the sum is a bilinear
form, g_b^T (M_i * W) x_b: nothing weight-sized per query needs to exist, and the bank is read once
for all the queries of a pass (METHOD.md, "Task inference for many queries").

Kernel. The base weights are +-c (signed constants), so M_i * W = c A_i with A_i = M_i * sign(W) in
{-1, 0, 1}, exact in int8 and unpacked from the packed bytes by one table gather per byte (the
table is indexed by the mask byte and the sign byte of the same 8 weights). The layer's larger side
(inputs x when in >= out, else output gradients g) is written in fixed point, `digits` balanced
int8 digits per value at 2**-(8 digits - 2) of the query's largest |value|, and one `torch._int_mm`
per block of tasks multiplies the stacked A_i by those digits with exact int32 sums (VNNI on x86).
Float arithmetic enters only after that: the (tasks, smaller side, digits, B) integers are weighted
by 256**d * step_b * c * (the other factor) and summed. The fixed point of one factor is the only
rounding before that, so a result is within `rounding_bound` of the exact product.

Why this kernel (measured on a 2-core AVX-512 EPYC, `bench/bank_inference.py`): the int8 product
ran at ~560 G multiply-adds/s against ~410 for bf16 (whose CPU products round their result to 8
bits) and ~190 for float32; lookup tables over bits (embedding_bag over per-byte subset sums) were
cache-bound at these sizes; a (B, weights) operand of per-example gradients in fixed point cost more
to make than the product itself.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from supsup.fixed_point import fixed_point_step, integer_operand

_SELECT = (128, 64, 32, 16, 8, 4, 2, 1)  # weight 8b + i is bit (7 - i) of byte b (pack_bits)


@dataclass(frozen=True)
class LinearFactors:
    """A linear layer's per-query factors: its inputs x (B, in) and output gradients g (B, out).
    Small (no weight-sized part), so they travel to shards of a bank as they are."""

    x: torch.Tensor
    g: torch.Tensor

    def to(self, device: torch.device | str) -> LinearFactors:
        return LinearFactors(self.x.to(device), self.g.to(device))


@functools.cache
def _signed_bit_table(device: torch.device) -> torch.Tensor:
    """(65536,) int64: index negative_byte * 256 + mask_byte -> the 8 weights' A values as int8
    (0 where the mask bit is clear, -1 where it is set and the weight negative, else 1)."""
    sel = torch.tensor(_SELECT, dtype=torch.int64)
    v = torch.arange(65536)
    kept = ((v[:, None] & 255) & sel) != 0
    negative = ((v[:, None] >> 8) & sel) != 0
    a = kept.to(torch.int8) * (1 - 2 * negative.to(torch.int8))
    return a.contiguous().view(torch.int64).reshape(65536).to(device)


def sign_bytes(weight: torch.Tensor) -> torch.Tensor:
    """(nbytes,) int64 of a weight tensor's signs packed like its masks (1 = negative), times 256:
    the table index of each byte position, to which the mask byte is added."""
    neg = (weight.reshape(-1) < 0).to(torch.uint8)
    pad = (-neg.numel()) % 8
    if pad:
        neg = torch.cat([neg, neg.new_zeros(pad)])
    place = torch.tensor(_SELECT, dtype=torch.uint8, device=weight.device)
    return (neg.view(-1, 8) * place).sum(1).to(torch.int64) * 256


def is_signed_constant(weight: torch.Tensor) -> bool:
    """Whether every weight is +-c for one c > 0 (the paper's base network; the kernel needs it)."""
    a = weight.abs().reshape(-1)
    c = float(a[0]) if a.numel() else 0.0
    return c > 0 and math.isfinite(c) and bool((a == c).all())


def task_block(small: int, large: int, columns: int, budget_bytes: int) -> int:
    """Tasks per block so the block's int8 masks, gather indices and its int32 sums and their
    float copy, (tasks, small, columns), fit in `budget_bytes`."""
    per_task = 3 * small * large + small * large // 8 * 8 + small * columns * 8
    return max(1, budget_bytes // per_task)


class _Unpacker:
    """Packed mask rows of one layer -> A_i = M_i * sign(W) in int8, in the kernel's layout:
    (tasks, out, in), or (tasks, in, out) when the product contracts over out (out > in)."""

    def __init__(self, weight: torch.Tensor, height: int, device: torch.device,
                 transpose: bool | None = None) -> None:
        self.out_f, self.in_f = weight.shape
        self.transpose = self.out_f > self.in_f if transpose is None else transpose
        self.table = _signed_bit_table(device)
        self.signs = sign_bytes(weight).to(device)
        nbytes = self.signs.numel()
        self.index = torch.empty(height, nbytes, dtype=torch.int64, device=device)
        self.masks = torch.empty(height, nbytes, dtype=torch.int64, device=device)  # 8 int8 each
        self.turned = (torch.empty(height, self.in_f, self.out_f, dtype=torch.int8,
                                   device=device) if self.transpose else None)

    @property
    def nbytes(self) -> int:
        return 16 * self.index.numel() + (0 if self.turned is None else self.turned.numel())

    def __call__(self, src: torch.Tensor) -> torch.Tensor:
        """(h, small * large) int8 view of the block's A, valid until the next call."""
        h = src.shape[0]
        idx = self.index[:h]
        torch.add(self.signs, src, out=idx)  # one pass: the uint8 bytes promote into int64
        torch.take(self.table, idx, out=self.masks[:h])
        n = self.out_f * self.in_f
        a = self.masks[:h].view(torch.int8).view(h, -1)[:, :n]
        a = a.reshape(h, self.out_f, self.in_f)  # a copy only when the bits end mid-byte
        if self.turned is not None:
            a = self.turned[:h].copy_(a.transpose(1, 2))
        return a.reshape(h, n)


def signed_masks(packed: torch.Tensor, rows: torch.Tensor | None, weight: torch.Tensor,
                 *, block: int = 64) -> torch.Tensor:
    """(k, out * in) int8 A_i of the bank's `rows` (every row when None) in the kernel's layout,
    unpacked once: `linear_alpha_gradients(resident=...)` then reads them instead of the bits
    (8x the packed bytes, for a process that answers many passes, e.g. a served model)."""
    k = packed.shape[0] if rows is None else rows.numel()
    out_f, in_f = weight.shape
    unpack = _Unpacker(weight, min(k, block), packed.device)
    out = torch.empty(k, out_f * in_f, dtype=torch.int8, device=packed.device)
    for r0 in range(0, k, block):
        r1 = min(k, r0 + block)
        out[r0:r1] = unpack(packed[r0:r1] if rows is None else packed[rows[r0:r1]])
    return out


def signed_row_sums(resident: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(k, smaller side) float32 sums of each row of `signed_masks` over the larger side: what
    a column of ones gives the product (exact: integers of at most the larger side)."""
    small, large = sorted(weight.shape)
    a = resident.view(-1, small, large)
    out = torch.empty(a.shape[0], small, dtype=torch.float32, device=a.device)
    for r0 in range(0, a.shape[0], 64):  # a block at a time: the sum widens its input to int32
        out[r0:r0 + 64] = a[r0:r0 + 64].sum(-1, dtype=torch.int32)
    return out


def linear_alpha_gradients(
    packed: torch.Tensor,
    rows: torch.Tensor | None,
    weight: torch.Tensor,
    factors: LinearFactors,
    *,
    digits: int = 2,
    budget_bytes: int = 16 << 20,
    on_block: Callable[[int], None] | None = None,
    integer: bool | None = None,
    resident: torch.Tensor | None = None,
    workers: int = 1,
    row_sums: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, k) float32 dH_b/dalpha_i = g_b^T (M_i * W) x_b for the bank's `rows` (every row when
    None) of one linear layer: `packed` (K, nbytes) rows of (out, in) masks, `weight` (out, in)
    signed constants (`is_signed_constant`).

    Tasks go in blocks whose buffers stay within `budget_bytes` whatever the batch (callers bound
    the batch too); `on_block(nbytes)`, when given, is told the bytes the buffers hold.
    `integer` (default: on a CPU) picks the int8 product; else the same blocks multiply float32
    masks by the float32 factors (GPUs, whose int8 product wants other shapes). `resident`, the
    rows' `signed_masks`, replaces the unpacking of each pass (`packed` and `rows` unused).
    `workers` threads take the blocks one at a time, each with its own buffers within
    `budget_bytes / workers` (see `InferenceEngine`). `row_sums`, the `resident` masks'
    `signed_row_sums`, replace the column of ones that an 8-bit grid otherwise adds to the
    product (one column of 65 costs 10% of a product's time at 64 queries).
    """
    if integer is None:
        integer = packed.device.type == "cpu"
    if not integer:
        return _linear_float(packed, rows, weight, factors, budget_bytes, on_block)
    out_f, in_f = weight.shape
    device = packed.device
    k = (packed.shape[0] if rows is None else rows.numel()) if resident is None \
        else resident.shape[0]
    batch = factors.x.shape[0]
    x = factors.x.reshape(batch, in_f)
    g = factors.g.reshape(batch, out_f)
    transpose = out_f > in_f  # contract over out: A_i^T (in, out) times the digits of g
    fixed, other = (g, x) if transpose else (x, g)
    small, large = other.shape[1], fixed.shape[1]
    op = integer_operand(fixed, digits, ones=row_sums is None)
    digits = op.digits
    place = torch.tensor([256.0**d for d in range(digits)], dtype=torch.float64, device=device)
    scale = float(weight.abs().reshape(-1)[0])
    other64 = other.to(torch.float64).T  # (small, B)
    # weight of digit d of query b at position s of the smaller side: 256**d unit_b c other_b[s]
    wt = (place[None, :, None] * (op.unit * scale)[None, None, :]
          * other64[:, None, :]).to(torch.float32)  # (small, D, B)
    # on a grid, each task's row sums (the ones column) weigh offset_b c other_b[s]
    shift = (None if op.offset is None
             else (other64 * (op.offset * scale)[None, :]).to(torch.float32))  # (small, B)
    workers = max(1, min(workers, k))
    height = min(math.ceil(k / workers), task_block(small, large, op.columns,
                                                    budget_bytes // workers))
    result = torch.empty(k, batch, dtype=torch.float32, device=device)
    blocks = iter(range(0, k, height))
    lock = threading.Lock()

    def work() -> int:
        """Blocks taken one at a time until none is left; its buffers' bytes."""
        unpack = None if resident is not None else _Unpacker(weight, height, device)
        sums = torch.empty(height * small, op.columns, dtype=torch.int32, device=device)
        floats = torch.empty(height, small, digits, batch, dtype=torch.float32, device=device)
        while True:
            with lock:
                r0 = next(blocks, None)
            if r0 is None:
                break
            r1 = min(k, r0 + height)
            h = r1 - r0
            if unpack is None:
                a = resident[r0:r1]  # type: ignore[index]
            else:
                a = unpack(packed[r0:r1] if rows is None else packed[rows[r0:r1]])
            y = sums[: h * small]
            torch._int_mm(a.reshape(h * small, large), op.ints, out=y)
            # integers of at most `large` * 128 in magnitude: exact in float32 up to 2**17
            y = y.view(h, small, op.columns)
            yf = floats[:h]
            yf.copy_(y[:, :, : digits * batch].view(h, small, digits, batch)).mul_(wt)
            torch.sum(yf.view(h, small * digits, batch), 1, out=result[r0:r1])
            if shift is not None:
                sums_ = y[:, :, -1].to(torch.float32) if row_sums is None else row_sums[r0:r1]
                result[r0:r1].addmm_(sums_, shift)
        return ((0 if unpack is None else unpack.nbytes) + 4 * sums.numel()
                + 4 * floats.numel())

    if workers == 1:
        held = work()
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="blocks") as pool:
            held = sum(pool.map(lambda _: work(), range(workers)))
    if on_block is not None:
        on_block(held + op.ints.numel())
    return result.T.contiguous()


def _linear_float(packed: torch.Tensor, rows: torch.Tensor | None, weight: torch.Tensor,
                  factors: LinearFactors, budget_bytes: int,
                  on_block: Callable[[int], None] | None) -> torch.Tensor:
    """`linear_alpha_gradients` in float32: (tasks * out, in) masks times x^T, weighted by g."""
    out_f, in_f = weight.shape
    n = out_f * in_f
    device = packed.device
    k = packed.shape[0] if rows is None else rows.numel()
    x = factors.x.reshape(-1, in_f).to(device, torch.float32)
    g = factors.g.reshape(-1, out_f).to(device, torch.float32)
    batch = x.shape[0]
    nbytes = packed.shape[1]
    height = max(1, min(k, budget_bytes // (4 * n + 16 * nbytes + 8 * out_f * batch)))
    unpack = _Unpacker(weight, height, device, transpose=False)
    if on_block is not None:
        on_block(height * (4 * n + 16 * nbytes + 8 * out_f * batch))
    scale = float(weight.abs().reshape(-1)[0])
    result = torch.empty(k, batch, dtype=torch.float32, device=device)
    for r0 in range(0, k, height):
        r1 = min(k, r0 + height)
        h = r1 - r0
        a = unpack(packed[r0:r1] if rows is None else packed[rows[r0:r1]])
        y = a.to(torch.float32).reshape(h * out_f, in_f) @ x.T  # (h * out, B)
        result[r0:r1] = (y.view(h, out_f, batch) * g.T).sum(1) * scale
    return result.T.contiguous()


def rounding_bound(weight: torch.Tensor, factors: LinearFactors, counts: torch.Tensor,
                   digits: int) -> torch.Tensor:
    """(B, k) bound on |kernel - exact|: half a fixed-point step of the larger side per kept
    weight, times c |other factor|. `counts` (k, out, in) 0/1 masks (or their float64 view)."""
    out_f, in_f = weight.shape
    x = factors.x.reshape(-1, in_f).to(torch.float64)
    g = factors.g.reshape(-1, out_f).to(torch.float64)
    scale = float(weight.abs().reshape(-1)[0])
    m = counts.to(torch.float64)
    if out_f > in_f:
        step = fixed_point_step(g, digits)[:, None]
        return 0.5 * scale * step * torch.einsum("koi,bi->bk", m, x.abs())
    step = fixed_point_step(x, digits)[:, None]
    return 0.5 * scale * step * torch.einsum("koi,bo->bk", m, g.abs())


def linear_exact(masks: torch.Tensor, weight: torch.Tensor, factors: LinearFactors
                 ) -> torch.Tensor:
    """(B, k) float64 reference over unpacked (k, out, in) masks: sum_oj M W g_o x_j."""
    m = masks.to(torch.float64) * weight.to(torch.float64)
    return torch.einsum("koi,bo,bi->bk", m, factors.g.to(torch.float64),
                        factors.x.to(torch.float64))
