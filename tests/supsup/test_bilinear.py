"""supsup.bilinear: the int8 product of packed masks and fixed-point factors, against float64.

A result may differ from the exact product by the factor's fixed-point rounding, which
`rounding_bound` states (half a step per kept weight, times the other factor), plus float32's
rounding of the weighted sums: 2**-20 of the sum of |terms| covers that with a margin.
"""

from __future__ import annotations

import pytest
import torch

from supsup.bilinear import (
    LinearFactors,
    is_signed_constant,
    linear_alpha_gradients,
    linear_exact,
    rounding_bound,
    signed_masks,
)
from supsup.fixed_point import fixed_point_digits, integer_grid, integer_operand
from supsup.masks import pack_bits

# (out, in): in >= out and out > in (the transposed product); layers ending mid-byte
SHAPES = [(3, 7), (5, 16), (16, 5), (30, 29), (13, 100)]


def _case(k: int, out_f: int, in_f: int, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    density = torch.rand(k, 1, 1, generator=g) * 0.9 + 0.05
    masks = (torch.rand(k, out_f, in_f, generator=g) < density).to(torch.uint8)
    weight = (torch.randint(0, 2, (out_f, in_f), generator=g) * 2 - 1) * 0.37
    factors = LinearFactors(torch.randn(batch, in_f, generator=g).relu(),
                            torch.randn(batch, out_f, generator=g) * 1e-3)
    return masks, pack_bits(masks.reshape(k, -1), group_dims=1), weight.float(), factors


@pytest.mark.parametrize("digits", [2, 3])
@pytest.mark.parametrize(("out_f", "in_f"), SHAPES)
def test_products_are_within_the_stated_rounding_of_float64(out_f: int, in_f: int,
                                                            digits: int) -> None:
    masks, packed, weight, factors = _case(11, out_f, in_f, 6, seed=out_f * in_f)
    blocks: list[int] = []
    got = linear_alpha_gradients(packed, None, weight, factors, digits=digits,
                                 budget_bytes=1, on_block=blocks.append)  # one task a block
    exact = linear_exact(masks, weight, factors)
    terms = torch.einsum("koi,bo,bi->bk", masks.double() * weight.double().abs(),
                         factors.g.double().abs(), factors.x.double().abs())
    allowed = rounding_bound(weight, factors, masks, digits) + 2.0**-20 * terms
    assert bool(((got.double() - exact).abs() <= allowed).all())
    assert len(blocks) == 1 and blocks[0] > 0


@pytest.mark.parametrize(("out_f", "in_f"), SHAPES)
def test_the_float_product_of_devices_without_the_integer_kernel_matches(out_f: int,
                                                                         in_f: int) -> None:
    """GPUs take float32 masks times float32 factors: float32 rounding of the sums alone."""
    masks, packed, weight, factors = _case(7, out_f, in_f, 5, seed=3 + out_f)
    got = linear_alpha_gradients(packed, None, weight, factors, integer=False, budget_bytes=1)
    exact = linear_exact(masks, weight, factors)
    terms = torch.einsum("koi,bo,bi->bk", masks.double() * weight.double().abs(),
                         factors.g.double().abs(), factors.x.double().abs())
    assert bool(((got.double() - exact).abs() <= 2.0**-18 * terms + 1e-30).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_product_on_cuda_equals_the_cpu() -> None:
    masks, packed, weight, factors = _case(40, 30, 29, 6, seed=9)
    cpu = linear_alpha_gradients(packed, None, weight, factors, digits=3)
    gpu = linear_alpha_gradients(packed.cuda(), None, weight.cuda(), factors.to("cuda"),
                                 budget_bytes=1 << 16)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-9)


def test_a_subset_of_rows_in_any_order_reads_those_rows() -> None:
    masks, packed, weight, factors = _case(9, 6, 10, 3, seed=1)
    rows = torch.tensor([7, 2, 2, 0])
    got = linear_alpha_gradients(packed, rows, weight, factors, digits=3)
    whole = linear_alpha_gradients(packed, None, weight, factors, digits=3)
    assert torch.equal(got, whole[:, rows])


def test_digits_write_every_value_back_exactly_at_its_step() -> None:
    values = torch.tensor([[0.0, 1.0, -1.0, 0.123456, -0.5], [3.0, 0.0, 0.0, 0.0, 0.0]])
    for digits in (2, 3):
        ops, unit = fixed_point_digits(values, digits)
        back = sum(ops[:, d * 2:(d + 1) * 2].double() * 256.0**d for d in range(digits))
        assert bool(((back * unit - values.T.double()).abs() <= unit / 2).all())
        assert bool((back.abs().amax(0) == 2.0 ** (8 * digits - 2)).all())  # the largest at the top


def test_signed_constants_are_recognised() -> None:
    assert is_signed_constant(torch.tensor([[0.5, -0.5], [-0.5, 0.5]]))
    assert not is_signed_constant(torch.tensor([[0.5, -0.25]]))
    assert not is_signed_constant(torch.zeros(2, 2))


def _pixels(batch: int, m: int, seed: int) -> torch.Tensor:
    """Normalised 8-bit data as a loader gives it: (p / 255 - mean) / std in float32; one row
    blank, one using every 3rd level (its smallest gap is not its step: levels 0, 3, 7, ...),
    one whose brightest level is 254 (the others' step, not its range over 255)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(0, 256, (batch, m), generator=g)
    p[:, -1] = 255
    p[0] = 0
    p[1] = torch.tensor([0, 3, 7] * m)[:m] * 30 % 256
    p[2] = p[2].clamp(max=254)
    return (p.float() / 255.0 - 0.1307) / 0.3081


def test_pixels_take_one_exact_digit_and_other_values_keep_their_digits() -> None:
    values = _pixels(6, 50, seed=2)
    # all rows together (each on its range's step or the others'), and alone (rows 1 and 2
    # span fewer than 256 levels: with no other row to share a step, they search for theirs)
    for rows in (values, values[1:2], values[2:3], values[:1]):
        grid = integer_grid(rows, 2)
        assert grid is not None
        q, unit, offset = grid
        back = offset[None, :] + unit[None, :] * q.double()
        assert float((back - rows.T.double()).abs().max()) <= 1e-6
    assert integer_operand(values, 2).digits == 1
    continuous = torch.randn(4, 50, generator=torch.Generator().manual_seed(1)).relu()
    assert integer_grid(continuous, 2) is None and integer_operand(continuous, 3).digits == 3
    levels = torch.arange(300.0).reshape(1, 300) / 299  # more levels than one int8 digit holds
    assert integer_grid(levels, 2) is None


@pytest.mark.parametrize(("out_f", "in_f"), SHAPES)
def test_products_over_pixels_are_within_the_stated_rounding_of_float64(out_f: int,
                                                                        in_f: int) -> None:
    masks, packed, weight, factors = _case(9, out_f, in_f, 5, seed=out_f + in_f)
    factors = LinearFactors(_pixels(5, in_f, seed=out_f), factors.g)
    got = linear_alpha_gradients(packed, None, weight, factors, budget_bytes=1)
    exact = linear_exact(masks, weight, factors)
    terms = torch.einsum("koi,bo,bi->bk", masks.double() * weight.double().abs(),
                         factors.g.double().abs(), factors.x.double().abs())
    allowed = rounding_bound(weight, factors, masks, 2) + 2.0**-20 * terms
    assert bool(((got.double() - exact).abs() <= allowed).all())


@pytest.mark.parametrize(("out_f", "in_f"), SHAPES)
def test_resident_masks_give_the_packed_products_bit_for_bit(out_f: int, in_f: int) -> None:
    masks, packed, weight, factors = _case(13, out_f, in_f, 4, seed=7 * out_f)
    rows = torch.tensor([12, 0, 5, 5, 3])
    resident = signed_masks(packed, rows, weight, block=2)
    a = masks[rows].to(torch.int8) * torch.sign(weight).to(torch.int8)
    want = a.transpose(1, 2) if out_f > in_f else a
    assert torch.equal(resident, want.reshape(rows.numel(), -1))
    got = linear_alpha_gradients(packed, None, weight, factors, resident=resident,
                                 budget_bytes=1)
    assert torch.equal(got, linear_alpha_gradients(packed, rows, weight, factors,
                                                   budget_bytes=1))
