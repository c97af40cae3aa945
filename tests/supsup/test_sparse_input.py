"""supsup.sparse_input: products over the lit inputs only, within their stated rounding."""

from __future__ import annotations

import pytest
import torch

from supsup.bilinear import LinearFactors, linear_alpha_gradients, linear_exact, signed_masks
from supsup.sparse_input import (
    MIN_LIT_PER_UNIT,
    sparse_alpha_gradients,
    sparse_rounding_bound,
    unit_masks,
)
from tests.supsup.test_bilinear import _case

SHAPES = [(30, 40), (40, 30), (16, 100)]  # in >= out, and the transposed layout


def _at_rest(kind: str, batch: int, in_f: int, lit: float, seed: int) -> torch.Tensor:
    """Inputs resting at their row's smallest value except a `lit` fraction: normalised pixels
    on a dark background, ReLU outputs (rest 0), or a ReLU shifted per row (rest != 0, no grid)."""
    g = torch.Generator().manual_seed(seed)
    on = torch.rand(batch, in_f, generator=g) < lit
    if kind == "pixels":
        p = torch.randint(1, 256, (batch, in_f), generator=g) * on
        p[:, 0] = 255  # every row spans the 256 levels
        return (p.float() / 255.0 - 0.1307) / 0.3081
    x = torch.rand(batch, in_f, generator=g) * on
    if kind == "shifted":
        x = x + torch.randn(batch, 1, generator=g)
    return x


def _units(out_f: int, in_f: int, batch: int, seed: int):
    masks, packed, weight, factors = _case(11, out_f, in_f, batch, seed=seed)
    return masks, packed, weight, factors, unit_masks(signed_masks(packed, None, weight, block=4),
                                                      weight, block=3)


@pytest.mark.parametrize(("out_f", "in_f"), SHAPES)
@pytest.mark.parametrize("kind", ["pixels", "relu", "shifted"])
def test_lit_products_are_within_the_stated_rounding_of_float64(out_f: int, in_f: int,
                                                                kind: str) -> None:
    batch = 4 * MIN_LIT_PER_UNIT
    masks, packed, weight, factors, units = _units(out_f, in_f, batch, seed=out_f + in_f)
    factors = LinearFactors(_at_rest(kind, batch, in_f, 0.3, seed=in_f), factors.g)
    got = sparse_alpha_gradients(units, weight, factors)
    assert got is not None  # 30% lit, about 38 lit queries per unit: the sparse products
    exact = linear_exact(masks, weight, factors)
    shifted = factors.x.double() - factors.x.double().amin(1, keepdim=True)
    terms = torch.einsum("koi,bo,bi->bk", masks.double() * weight.double().abs(),
                         factors.g.double().abs(), shifted)
    lo_terms = torch.einsum("koi,bo->bk", masks.double() * weight.double().abs(),
                            factors.g.double().abs()) * factors.x.double().amin(1)[:, None].abs()
    allowed = (sparse_rounding_bound(weight, factors, masks, 2)
               + 2.0**-20 * (terms + lo_terms))  # float32 sums
    assert bool(((got.double() - exact).abs() <= allowed).all())
    dense = linear_alpha_gradients(packed, None, weight, factors)
    assert torch.equal(got.argmin(1), dense.argmin(1))
    # units shared among threads: the same sums added in another order
    torch.testing.assert_close(sparse_alpha_gradients(units, weight, factors, workers=3), got,
                               rtol=1e-5, atol=1e-6 * float(got.abs().max()))


def test_unit_masks_hold_each_input_units_masks_and_their_sums() -> None:
    for out_f, in_f in SHAPES:
        masks, packed, weight, _, units = _units(out_f, in_f, 2, seed=3)
        a = masks.to(torch.int8) * torch.sign(weight).to(torch.int8)  # (k, out, in)
        assert torch.equal(units.masks, a.permute(2, 1, 0))
        assert torch.equal(units.sums, a.sum(2).float())


def test_passes_that_suit_the_dense_kernel_are_declined() -> None:
    out_f, in_f = 30, 40
    batch = 4 * MIN_LIT_PER_UNIT
    _, _, weight, factors, units = _units(out_f, in_f, batch, seed=9)

    def run(x: torch.Tensor) -> torch.Tensor | None:
        return sparse_alpha_gradients(units, weight, LinearFactors(x, factors.g[: x.shape[0]]))

    assert run(_at_rest("relu", batch, in_f, 0.3, seed=1)) is not None
    assert run(_at_rest("relu", batch // 8, in_f, 0.3, seed=1)) is None  # few lit per unit
    assert run(torch.randn(batch, in_f)) is None  # nothing at rest
    # pixels half lit: the dense kernel takes them in one exact digit, cheaper than two
    assert run(_at_rest("pixels", batch, in_f, 0.5, seed=2)) is None
    assert run(_at_rest("relu", batch, in_f, 0.5, seed=2)) is not None  # two digits either way
    # with more outputs than inputs the dense kernel writes g in two digits, pixels or not
    _, _, wide, wide_factors, wide_units = _units(in_f, out_f, batch, seed=9)
    half_lit = LinearFactors(_at_rest("pixels", batch, out_f, 0.5, seed=2), wide_factors.g)
    assert sparse_alpha_gradients(wide_units, wide, half_lit) is not None
