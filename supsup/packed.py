"""Products of packed bit rows: the superposition kernels behind `supsup.bank.MaskBank`.

Section 3.3 of the paper superimposes all learned masks, W * sum_i alpha_i M_i, and needs
dObjective/dalpha_i = sum_j g_j M_ij with g = dObjective/dmixture for every task i. A float32 stack
of 2,500 LeNet masks is 3.2 GB; here each task's mask is a row of packed bytes and both products
are computed from the bytes:
- the mixture from a per-weight count of set bits (kept up to date as tasks are added) when the
  alphas are uniform over every task, else like the gradient;
- the alpha gradient a cache-sized block of rows x byte columns at a time (`_plane_blocks`): one
  AND per block unpacks its 8 bit planes, and a matrix product multiplies them by g. The bank is
  read once, at the speed of a matmul; nothing but the packed bytes stays between calls.

Why integers on a CPU: a product of 0/1 planes with bfloat16 or float16 values rounds its result
to 8 or 11 bits (CPU kernels have no float32 output for them), and converting planes to float32
costs as much as the product itself. Instead the float operand (g, or the alphas) is written in
fixed point, 2**-30 of its largest magnitude per step, as four int8 digits, and `torch._int_mm`
multiplies the int8 planes by each digit with exact int32 sums (VNNI on x86). Each operand value is
then within 2**-24 of the largest one (float32's rounding of the largest), so results match a
float32 product of unpacked masks within float32 rounding; tests hold both paths to a float64
reference. Making digits costs ~20 passes over the weights, so few rows (and devices without the
integer kernel: CUDA's wants 16+ rows and 8+ digit columns) convert planes to float32 and use a
float32 product instead. `kernel_plan` picks the path and block sizes per device.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

# Plane i of a byte keeps its bit (7 - i), the bit of weight 8b + i in pack_bits' MSB-first order.
_SELECT = (128, 64, 32, 16, 8, 4, 2, 1)
# A kept bit read as int8 is worth this much in plane i; operands are divided by it (exactly: a
# power of two), so a set bit contributes its weight's operand value.
_PLANE_VALUE = (-128.0, 64.0, 32.0, 16.0, 8.0, 4.0, 2.0, 1.0)
_DIGITS = 4  # int8 digits of a fixed-point operand, base 256
_FIXED_BITS = 30  # |operand| <= 2**30 in fixed point: the top digit never overflows with carries
# Byte columns per block: <= 8192 keeps int32 sums of (int8 plane x int8 digit) products under
# 2**31 (65,536 terms of at most 2**14).
_MAX_COLUMNS = 8192
# Rows per block: `weighted_rows` sums (int8 digit x int8 plane) products over a block's rows,
# each at most 128 * 128 = 2**14 in magnitude, so at most this many rows keep int32 exact.
_MAX_ROWS = (2**31 - 1) // (128 * 128)


@dataclass(frozen=True)
class KernelPlan:
    """How one device computes products over packed rows.

    integer: int8 planes times int8 fixed-point digits (`torch._int_mm`); else float32 planes.
    block_bytes: packed bytes (rows x byte columns) unpacked at once on the integer path; the
        planes take 8x this, so on a CPU the block stays in the cache that the product reads.
    float_block_bytes: the same on the float32 path, whose planes take 32x.
    min_columns: byte columns per block when there are many rows: long rows keep the AND and the
        product vectorised; with few rows a block widens instead (up to `_MAX_COLUMNS`).
    integer_min_rows: fewer rows use float32 planes even where `integer`: turning the operand into
        digits costs ~20 passes over the weights, which only many rows repay.
    integer_max_batch: larger batches (per-example gradients) use float32 planes: a batch is a
        compute-bound matrix product, where 4 int8 digits per example cost more than one float.
    """

    integer: bool
    block_bytes: int
    float_block_bytes: int
    min_columns: int
    integer_min_rows: int
    integer_max_batch: int


def _cpu_cache_bytes(level: int, default: int) -> int:
    """Size of cpu0's cache `level` (2: per core, 3: shared) from sysfs; `default` where unknown."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in sorted(base.glob("index*")):
            kind = (index / "type").read_text().strip()
            if int((index / "level").read_text()) == level and kind in ("Unified", "Data"):
                text = (index / "size").read_text().strip()
                units = {"K": 1 << 10, "M": 1 << 20}
                return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except (OSError, ValueError):
        pass
    return default


@functools.cache
def _integer_kernel_works(device: torch.device) -> bool:
    """Whether `torch._int_mm` runs here with the shapes used (one digit column, few rows)."""
    if not hasattr(torch, "_int_mm"):
        return False
    try:
        a = torch.tensor([[1, -128, 3, 0, 0, 0, 0, 0]], dtype=torch.int8, device=device)
        b = torch.tensor([[2], [1], [-1], [0], [0], [0], [0], [5]], dtype=torch.int8,
                         device=device)
        return int(torch._int_mm(a, b)[0, 0]) == 2 - 128 - 3
    except (RuntimeError, NotImplementedError):
        return False


@functools.cache
def kernel_plan(device: torch.device) -> KernelPlan:
    """The plan for `device`: cache-sized integer blocks on a CPU, large float32 blocks on a GPU.

    SUPSUP_BANK_KERNEL=float forces float32 planes (to compare the two on one machine).
    """
    forced_float = os.environ.get("SUPSUP_BANK_KERNEL", "").lower() == "float"
    if device.type == "cpu":
        # Measured on an EPYC with 1 MiB L2 per core and 32 MiB L3 (AVX-512, 2 cores), one-shot
        # over 25-2,500 LeNet masks: full 8,192-byte rows stream the packed bytes best; int8
        # planes of about L3 / 4 per block (8 MiB) beat 2-4 MiB (more calls, each a few us of
        # overhead and, with 2 threads, a synchronisation) and 32 MiB (out of cache); float32
        # planes do best at about 4 MiB (L2 x 4); digits pay off from about 40-60 rows and up to
        # 16 examples (at 128, float32 planes take 0.3 s at 250 tasks, digits 1 s).
        l2, l3 = _cpu_cache_bytes(2, 1 << 20), _cpu_cache_bytes(3, 8 << 20)
        block = max(1 << 17, min(1 << 21, l3 // 32))
        float_block = max(1 << 14, min(1 << 18, l2 // 8))
        integer = not forced_float and _integer_kernel_works(device)
        return KernelPlan(integer, block, float_block, _MAX_COLUMNS, 48, 16)
    # GPUs: one launch of each kernel per block; 1 MiB of bytes make 32 MiB of float planes.
    return KernelPlan(False, 1 << 22, 1 << 20, _MAX_COLUMNS, 0, 0)


def _device(device: torch.device) -> torch.device:
    """`cuda` and `cuda:0` as one cache key."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@functools.cache
def _selectors(device: torch.device) -> torch.Tensor:
    """(1, 8, 1) uint8 masks of the 8 planes, resident on `device`."""
    return torch.tensor(_SELECT, dtype=torch.uint8, device=device).reshape(1, 8, 1)


@functools.cache
def _plane_values(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(8, 1) value of a kept bit in each plane, resident on `device`."""
    return torch.tensor(_PLANE_VALUE, dtype=dtype, device=device).reshape(8, 1)


@functools.cache
def _digit_weights(device: torch.device) -> torch.Tensor:
    """(4, 1) float64 weights 256**d of the int8 digits."""
    return torch.tensor([[256.0**d] for d in range(_DIGITS)], dtype=torch.float64, device=device)


def _block_shape(rows: int, nbytes: int, block_bytes: int, min_columns: int) -> tuple[int, int]:
    """(row block, byte columns per block) for `rows` x `nbytes` packed bytes."""
    columns = min(nbytes, _MAX_COLUMNS, max(min_columns, block_bytes // max(1, rows)))
    return max(1, min(rows, _MAX_ROWS, block_bytes // max(1, columns))), max(1, columns)


def _plane_blocks(
    packed: torch.Tensor, rows: torch.Tensor | None, plan: KernelPlan, floats: bool = False,
    batch: int = 1,
) -> Iterator[tuple[int, int, int, int, torch.Tensor]]:
    """Unpack `packed` (or its `rows`, in that order) block by block, column blocks outermost.

    Yields (r0, r1, c0, c1, planes): planes is (r1 - r0, 8 * (c1 - c0)) int8, plane-major (the
    bits of byte column c0 + b in plane i sit at i * (c1 - c0) + b), worth `_PLANE_VALUE[i]` when
    set. One buffer serves every block, so a consumer must use a block before asking for the next.
    `floats`: blocks sized for a consumer that converts them to float32 and multiplies them by
    `batch` columns; a batch reuses each block, so its blocks are taller and narrower.
    """
    k = packed.shape[0] if rows is None else rows.numel()
    nbytes = packed.shape[1]
    if not floats:
        block_bytes, min_columns = plan.block_bytes, plan.min_columns
    elif batch == 1:
        block_bytes, min_columns = plan.float_block_bytes, plan.min_columns
    else:
        block_bytes, min_columns = 4 * plan.float_block_bytes, max(1, plan.min_columns // 4)
    height, width = _block_shape(k, nbytes, block_bytes, min_columns)
    select = _selectors(_device(packed.device))
    buf = torch.empty(height * 8 * width, dtype=torch.uint8, device=packed.device)
    for c0 in range(0, nbytes, width):
        c1 = min(nbytes, c0 + width)
        for r0 in range(0, k, height):
            r1 = min(k, r0 + height)
            src = packed[r0:r1, c0:c1] if rows is None else packed[rows[r0:r1], c0:c1]
            planes = buf[: (r1 - r0) * 8 * (c1 - c0)].view(r1 - r0, 8, c1 - c0)
            torch.bitwise_and(src.unsqueeze(1), select, out=planes)
            yield r0, r1, c0, c1, planes.view(torch.int8).view(r1 - r0, -1)


def _to_planes(x: torch.Tensor, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, n) per-weight values -> (B, 8, nbytes): plane i, column b holds x[:, 8b + i] divided by
    plane i's bit value (zero past n), so planes times this sum the values of the set bits."""
    batch, n = x.shape
    full = n // 8
    planes = torch.empty(batch, 8, nbytes, dtype=dtype, device=x.device)
    planes[:, :, :full] = x[:, : full * 8].reshape(batch, full, 8).transpose(1, 2)
    if full < nbytes:  # the last byte's weights, then zeros for its padding bits
        planes[:, :, full] = 0
        planes[:, : n - full * 8, full] = x[:, full * 8:]
    return planes.div_(_plane_values(_device(x.device), dtype))


def _fixed_point_unit(x: torch.Tensor) -> torch.Tensor:
    """(B, m) float64 -> (B, 1): one fixed-point step per row, 2**-30 of its largest |value|."""
    top = x.abs().amax(1, keepdim=True)  # nan/inf stay, for callers to fall back to floats
    return torch.where(top == 0, torch.ones_like(top), top) / 2.0**_FIXED_BITS


def _digits(scaled: torch.Tensor) -> torch.Tensor:
    """round(scaled), integers of at most 2**30 in magnitude, as (4, *shape) balanced int8 digits,
    least significant first: round(scaled) = sum_d digits[d] * 256**d. In place on int32."""
    q = torch.round(scaled).to(torch.int32)
    out = torch.empty(_DIGITS, *q.shape, dtype=torch.int8, device=q.device)
    low = torch.empty_like(q)
    for d in range(_DIGITS - 1):
        torch.add(q, 128, out=low).bitwise_and_(255).sub_(128)  # in [-128, 127]
        out[d].copy_(low)
        q.sub_(low).bitwise_right_shift_(8)  # exact: q - low is a multiple of 256
    out[-1].copy_(q)  # |q| <= 2**30 / 2**24 + 1 after three digits
    return out


def rows_dot(
    packed: torch.Tensor, rows: torch.Tensor | None, x: torch.Tensor, plan: KernelPlan
) -> torch.Tensor:
    """(B, k) float32: sum_j x[b, j] M[rows_i, j] over packed rows M, for x (B, n).

    The alpha gradient (B = 1) and its per-example form. Column blocks are outermost, so each
    block's digits serve every row block and a block's int32 sums turn into float64 once. One
    example's digits are made for the whole layer at once (4 bytes per weight); a batch's, per
    column block.
    """
    k = packed.shape[0] if rows is None else rows.numel()
    batch, nbytes = x.shape[0], packed.shape[1]
    if not plan.integer or k < plan.integer_min_rows or batch > plan.integer_max_batch:
        return _rows_dot_float(packed, rows, x, plan)
    xp = _to_planes(x, nbytes, torch.float64)  # (B, 8, nbytes)
    unit = _fixed_point_unit(xp.reshape(batch, -1)).unsqueeze(-1)  # (B, 1, 1)
    if not bool(torch.isfinite(unit).all()):  # inf/nan have no digits: let floats propagate them
        return _rows_dot_float(packed, rows, x, plan)
    whole = _digits(xp / unit) if batch == 1 else None  # (4, 1, 8, nbytes)
    acc = torch.zeros(_DIGITS, batch, k, dtype=torch.float64, device=packed.device)
    # One example: each digit column its own int8 GEMV (~2x faster than one 4-column product),
    # into (4, k). A batch: one (rows, K) x (K, 4B) product per row block, into (k, 4B).
    sums = torch.empty((_DIGITS, k) if batch == 1 else (k, _DIGITS * batch), dtype=torch.int32,
                       device=packed.device)
    column, operand = -1, torch.empty(0)
    for r0, r1, c0, c1, planes in _plane_blocks(packed, rows, plan):
        if c0 != column:
            if column >= 0:
                acc += sums.unsqueeze(1) if batch == 1 else sums.T.view(_DIGITS, batch, k)
            column = c0
            if whole is not None:
                operand = whole[..., c0:c1].reshape(_DIGITS, -1)  # (4, K), rows contiguous
            else:
                digits = _digits(xp[:, :, c0:c1] / unit)  # (4, B, 8, w)
                operand = digits.reshape(_DIGITS * batch, -1).T.contiguous()  # (K, 4B)
        if batch == 1:
            for d in range(_DIGITS):
                torch._int_mm(planes, operand[d].unsqueeze(1), out=sums[d, r0:r1].unsqueeze(1))
        else:
            torch._int_mm(planes, operand, out=sums[r0:r1])
    if column >= 0:
        acc += sums.unsqueeze(1) if batch == 1 else sums.T.view(_DIGITS, batch, k)
    acc *= (unit.view(1, batch) * _digit_weights(_device(packed.device))).unsqueeze(-1)
    return acc.sum(0).float()


def _rows_dot_float(
    packed: torch.Tensor, rows: torch.Tensor | None, x: torch.Tensor, plan: KernelPlan
) -> torch.Tensor:
    """`rows_dot` with float32 planes: few rows, large batches, devices without `_int_mm`."""
    k = packed.shape[0] if rows is None else rows.numel()
    batch, nbytes = x.shape[0], packed.shape[1]
    xp = _to_planes(x, nbytes, torch.float32)
    out = torch.zeros(k, batch, device=packed.device)
    column, operand, floats = -1, None, None
    for r0, r1, c0, c1, planes in _plane_blocks(packed, rows, plan, floats=True, batch=batch):
        if c0 != column:
            column = c0
            operand = xp[:, :, c0:c1].reshape(batch, -1).T.contiguous()  # (K, B)
        if floats is None:
            floats = torch.empty(planes.numel(), device=packed.device)
        f = floats[: planes.numel()].view(planes.shape)
        f.copy_(planes)
        out[r0:r1] += f @ operand
    return out.T.contiguous()


def _weight_digits(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(1, k) float64 weights -> int8 digit rows (d, k) and float64 scales (d,) with
    w ~= scales @ digits; equal weights are one exact row of ones. None for inf/nan weights,
    which only floats propagate."""
    if bool((w == w[0, 0]).all()):
        return torch.ones_like(w, dtype=torch.int8), w[0, :1]
    unit = _fixed_point_unit(w)
    if not bool(torch.isfinite(unit).all()):
        return None
    return _digits(w / unit)[:, 0], unit[0] * _digit_weights(_device(w.device))[:, 0]


def weighted_rows(
    packed: torch.Tensor, rows: torch.Tensor | None, weights: torch.Tensor, numel: int,
    plan: KernelPlan,
) -> torch.Tensor:
    """(numel,) float64: sum_i weights_i M[rows_i] over packed rows M (the mixture, the counts).

    Equal weights are one digit of ones: exact integer counts times the weight.
    """
    k = packed.shape[0] if rows is None else rows.numel()
    w = weights.to(packed.device, torch.float64).reshape(1, k)
    out = torch.zeros(8, packed.shape[1], dtype=torch.float64, device=packed.device)
    fixed = None
    if plan.integer and k >= max(1, plan.integer_min_rows):
        fixed = _weight_digits(w)
    floats = None
    for r0, r1, c0, c1, planes in _plane_blocks(packed, rows, plan, floats=fixed is None):
        if fixed is not None:
            digits, scales = fixed
            sums = torch._int_mm(digits[:, r0:r1].contiguous(), planes)  # (d, K)
            part = scales @ sums.to(torch.float64)
        else:
            if floats is None:
                floats = torch.empty(planes.numel(), device=packed.device)
            f = floats[: planes.numel()].view(planes.shape)
            f.copy_(planes)
            part = (w[0, r0:r1].float() @ f).to(torch.float64)
        out[:, c0:c1] += part.view(8, c1 - c0)
    out /= _plane_values(_device(packed.device), torch.float64)
    return out.T.reshape(-1)[:numel]
