"""Fixed-point operands of the int8 products: a factor's values as int8 columns with exact
int32 sums, and the one rounding that puts them there (`supsup.bilinear`'s kernel reads them).

Two forms. Values on an 8-bit grid (a network's input pixels, however normalised) take one
int8 digit exactly: value = offset + unit * q. Other values take `digits` balanced int8 digits
of a fixed point at 2**-(8 digits - 2) of their row's largest |value|: the only rounding before
the float sums, which `supsup.bilinear.rounding_bound` states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def fixed_point_bits(digits: int) -> int:
    """Magnitude bits a value may use in `digits` balanced int8 digits with room for carries."""
    return 8 * digits - 2


def fixed_point_step(values: torch.Tensor, digits: int) -> torch.Tensor:
    """(B,) float64 fixed-point step of each row: 2**-bits of its largest |value| (1 for zeros)."""
    top = values.abs().amax(1).to(torch.float64)
    return torch.where(top > 0, top, torch.ones_like(top)) / 2.0 ** fixed_point_bits(digits)


def fixed_point_digits(values: torch.Tensor, digits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, m) float -> int8 operand (m, digits * B), column d * B + b holding digit d of row b
    (least significant first, each in [-128, 127] but the last), and the (B,) float64 steps."""
    unit = fixed_point_step(values, digits)
    q = torch.round(values.to(torch.float64) / unit[:, None]).to(torch.int32)  # |q| <= 2**bits
    out = torch.empty(digits, *q.shape, dtype=torch.int8, device=values.device)
    low = torch.empty_like(q)
    for d in range(digits - 1):
        torch.add(q, 128, out=low).bitwise_and_(255).sub_(128)
        out[d].copy_(low)
        q.sub_(low).bitwise_right_shift_(8)  # exact: q - low is a multiple of 256
    out[-1].copy_(q)
    return out.permute(2, 0, 1).reshape(values.shape[1], digits * values.shape[0]), unit


@dataclass(frozen=True)
class Operand:
    """The larger side of a block of queries in int8 columns, and how each query reads them.

    Digits: column d * B + b holds digit d of query b, worth 256**d * unit_b. An 8-bit grid
    (`integer_grid`): column b holds q_b, worth unit_b, and one last column of ones gives each
    task's row sums, worth offset_b to every query."""

    ints: torch.Tensor  # (large, columns) int8
    unit: torch.Tensor  # (B,) float64
    digits: int
    offset: torch.Tensor | None  # (B,) float64 on a grid, else None

    @property
    def columns(self) -> int:
        return int(self.ints.shape[1])


def integer_grid(values: torch.Tensor, digits: int) -> tuple[torch.Tensor, torch.Tensor,
                                                             torch.Tensor] | None:
    """Rows of 8-bit data, however normalised (pixels: (p / 255 - mean) / std), in one int8
    digit exactly: values[b] = offset_b + unit_b * q_b with integer q in [-128, 127].

    Returns (q (m, B) int8, unit (B,), offset (B,)) when every row is within a quarter of its
    `digits` fixed-point step of such a grid (so `rounding_bound` holds either way), else None.
    Most rows of 8-bit data span all 256 levels (images from black to white), so their step is
    their range over 255; the rows left try the step most of the others share (an image whose
    brightest pixel is 254), and only those left then search: the step divides the smallest gap
    between a row's distinct values, the gap over m for the smallest m = 1, 2, ... that puts
    every value of the row on the grid (within 255 steps), refined to the row's range over its
    number of steps. A search sorts every row (34 ms for 1,000 images here); the first two
    cost a pass each."""
    # the checks run in float32, whose rounding is far below the tolerance; steps in float64
    v = values.to(torch.float32)
    lo32 = v.amin(1)
    lo = lo32.to(torch.float64)
    span = v.amax(1).to(torch.float64) - lo
    tolerance = fixed_point_step(values, digits) / 4

    def levels(rows: torch.Tensor | None, step: torch.Tensor) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
        """Each row's levels p on the grid lo + step * p (float32), and whether it lies on it."""
        x, low = (v, lo32) if rows is None else (v[rows], lo32[rows])
        s32 = step.to(torch.float32)[:, None]
        p = (x - low[:, None]).mul_(1 / s32).round_()
        error = torch.addcmul(low[:, None], p, s32).sub_(x).abs_().amax(1)
        t, r = (tolerance, span) if rows is None else (tolerance[rows], span[rows])
        return p, (error <= t) & (r / step <= 255.5)

    unit = torch.where(span > 0, span / 255, torch.ones_like(span))  # constant rows: any step
    _, ok = levels(None, unit)
    if not bool(ok.all()):
        unit[~ok] = torch.nan
        rest = (~ok).nonzero().squeeze(1)
        if bool(ok.any()):
            common = unit[ok & (span > 0)]
            if common.numel():
                step = common.median().expand(rest.numel()).clone()
                unit[rest[levels(rest, step)[1]]] = step[0]
        todo = unit.isnan().nonzero().squeeze(1)
        if todo.numel():
            found = _grid_search(values[todo].to(torch.float64), span[todo], tolerance[todo])
            if found is None:
                return None
            unit[todo] = found
    count = torch.round(span / unit)
    unit = torch.where(count > 0, span / count.clamp(min=1), unit)  # the step over the range
    p, _ = levels(None, unit)
    return p.sub_(128).to(torch.int8).T.contiguous(), unit, lo + 128 * unit


def _grid_search(v: torch.Tensor, span: torch.Tensor, tolerance: torch.Tensor
                 ) -> torch.Tensor | None:
    """`integer_grid`'s search over the divisors of each row's smallest gap: (rows,) steps, or
    None when a row is on no grid of 256 levels."""
    lo = v.amin(1)
    gaps = v.sort(1).values.diff(1)
    gap = torch.where(gaps > span[:, None] * 1e-9, gaps, torch.inf).amin(1)
    unit = torch.full_like(span, torch.nan)
    for m in range(1, 256):
        todo = unit.isnan()
        if not bool(todo.any()):
            break
        step = gap / m
        if bool((span[todo] / step[todo] > 255.5).any()):
            return None  # a row the grid cannot hold in 256 levels
        p = torch.round((v - lo[:, None]) / step[:, None])
        error = (v - (lo[:, None] + step[:, None] * p)).abs().amax(1)
        unit = torch.where(todo & (error <= tolerance), step, unit)
    return None if bool(unit.isnan().any()) else unit


def integer_operand(values: torch.Tensor, digits: int, ones: bool = True) -> Operand:
    """(B, m) factor -> its `Operand`: one exact digit on an 8-bit grid (a network's input
    pixels), else `digits` fixed-point digits. `ones=False`: no column of ones on a grid (the
    caller has each task's row sums)."""
    grid = integer_grid(values, digits)
    if grid is not None:
        q, unit, offset = grid
        if not ones:
            return Operand(q, unit, 1, offset)
        ones_column = torch.ones(q.shape[0], 1, dtype=torch.int8, device=q.device)
        return Operand(torch.cat([q, ones_column], 1), unit, 1, offset)
    ints, unit = fixed_point_digits(values, digits)
    return Operand(ints.contiguous(), unit, digits, None)
