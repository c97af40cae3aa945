"""Exact properties of supsup.masks: binary forward values, straight-through gradients, top-k
counts, the Erdos-Renyi budget and bit packing in numpy.packbits order."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from supsup.masks import (
    apply_rule,
    check_density,
    erdos_renyi_densities,
    pack_bits,
    packed_size,
    threshold_mask,
    topk_hard,
    topk_mask,
    unpack_bits,
)

# (shape, group_dims): a linear layer, a conv layer, and both with a leading group of 3 tasks.
SHAPES = [((37, 53), 0), ((6, 5, 3, 3), 0), ((3, 37, 53), 1), ((3, 6, 5, 3, 3), 1)]
RULES = ["threshold", "topk"]


def _scores(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(("shape", "group_dims"), SHAPES)
def test_forward_mask_is_exactly_binary(rule: str, shape: tuple[int, ...], group_dims: int) -> None:
    mask = apply_rule(_scores(shape), rule, density=0.3, group_dims=group_dims)
    assert mask.shape == shape
    assert mask.dtype == torch.float32
    assert bool(((mask == 0) | (mask == 1)).all())
    # Neither rule may be degenerate on random scores.
    assert 0 < int(mask.sum()) < mask.numel()


def test_threshold_mask_is_scores_at_least_zero() -> None:
    scores = torch.tensor([-1.0, -0.0, 0.0, 1e-30, -1e-30, 2.0])
    assert threshold_mask(scores).tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(("shape", "group_dims"), SHAPES)
def test_straight_through_gradient_equals_upstream(
    rule: str, shape: tuple[int, ...], group_dims: int
) -> None:
    scores = _scores(shape).requires_grad_()
    upstream = _scores(shape, seed=1)
    mask = apply_rule(scores, rule, density=0.3, group_dims=group_dims)
    (mask * upstream).sum().backward()
    # top-k ranks |scores|, so its gradient reaches the scores through |.|: times sign(scores).
    expected = upstream if rule == "threshold" else upstream * scores.detach().sign()
    assert torch.equal(scores.grad, expected)


@pytest.mark.parametrize("density", [1.0, 0.5, 0.3, 0.05, 0.001])
@pytest.mark.parametrize(("shape", "group_dims"), [((61, 53), 0), ((4, 61, 53), 1)])
def test_topk_keeps_exactly_round_density_n(
    density: float, shape: tuple[int, ...], group_dims: int
) -> None:
    scores = _scores(shape)
    hard = topk_hard(scores, density, group_dims)
    per_member = hard.reshape(*shape[:group_dims], -1)
    n = per_member.shape[-1]
    expected = round(density * n)
    assert expected >= 1  # 0.001 * 3233 rounds to 3: the tiny case still keeps a few weights
    assert per_member.sum(-1).flatten().tolist() == [expected] * per_member[..., 0].numel()
    assert torch.equal(topk_mask(scores, density, group_dims), hard)


def test_topk_keeps_the_largest_magnitudes() -> None:
    scores = torch.tensor([[0.1, -5.0, 0.3], [2.0, -0.2, 0.05]])
    # round(0.5 * 6) = 3 largest |scores| of the whole layer: -5, 2, 0.3
    assert topk_hard(scores, 0.5).tolist() == [[0, 1, 1], [1, 0, 0]]
    # per group member: round(0.34 * 3) = 1 each
    assert topk_hard(scores, 0.34, group_dims=1).tolist() == [[0, 1, 0], [1, 0, 0]]


def test_topk_keeps_at_least_one_weight() -> None:
    hard = topk_hard(_scores((10, 10)), 1e-6)  # round(1e-4) = 0: an empty mask would be useless
    assert int(hard.sum()) == 1


@pytest.mark.parametrize("density", [0.0, -0.1, 1.0001, 2, float("nan"), True, "0.5"])
def test_density_outside_unit_interval_raises(density: object) -> None:
    with pytest.raises(ValueError, match="density"):
        topk_mask(_scores((4, 4)), density)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="density"):
        check_density(density)  # type: ignore[arg-type]


def test_unknown_rule_raises() -> None:
    with pytest.raises(ValueError, match="unknown mask rule 'bottomk'"):
        apply_rule(_scores((4, 4)), "bottomk")


def test_topk_rule_without_density_raises() -> None:
    with pytest.raises(ValueError, match="density"):
        apply_rule(_scores((4, 4)), "topk")


def test_erdos_renyi_densities_golden_values() -> None:
    shapes = [(10, 20), (4, 2, 3, 3), (300, 784), (6, 4)]
    got = erdos_renyi_densities(shapes, scale=2.0)
    # 2 * (10 + 20) / 200 = 0.3;  2 * (4 + 2) / 72 = 1/6;  2 * 1084 / 235200;  2 * 10 / 24 -> capped
    expected = [0.3, 1 / 6, 2168 / 235200, 0.5]
    assert got == pytest.approx(expected, rel=1e-12)


def test_erdos_renyi_cap() -> None:
    assert erdos_renyi_densities([(8, 8)], scale=1.0) == [0.25]  # 16 / 64, under the 0.5 cap
    assert erdos_renyi_densities([(8, 8)], scale=3.0) == [0.5]  # 48 / 64 capped at 0.5
    assert erdos_renyi_densities([(8, 8)], scale=1.0, cap=0.1) == [0.1]


@pytest.mark.parametrize("scale", [0.0, -1.0])
def test_erdos_renyi_scale_must_be_positive(scale: float) -> None:
    with pytest.raises(ValueError, match="scale"):
        erdos_renyi_densities([(8, 8)], scale=scale)


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 13, 64, 100, 1001])
def test_pack_bits_matches_numpy_and_round_trips(numel: int) -> None:
    g = torch.Generator().manual_seed(numel)
    mask = (torch.rand(numel, generator=g) < 0.5).to(torch.float32)
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8
    assert packed.shape == (packed_size(numel),) == (math.ceil(numel / 8),)
    reference = np.packbits(mask.numpy().astype(np.uint8))
    assert packed.numpy().tobytes() == reference.tobytes()
    assert torch.equal(unpack_bits(packed, numel), mask)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bool, torch.uint8, torch.int64]
)
def test_pack_bits_accepts_any_binary_dtype(dtype: torch.dtype) -> None:
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1]).to(dtype)
    assert pack_bits(mask).tolist() == [0b10110001, 0b10000000]


def test_pack_bits_group_dims_packs_each_member() -> None:
    g = torch.Generator().manual_seed(3)
    masks = (torch.rand(4, 5, 7, 3, generator=g) < 0.3).to(torch.float32)  # 105 bits each
    packed = pack_bits(masks, group_dims=1)
    assert packed.shape == (4, 14)
    for i in range(4):
        assert torch.equal(packed[i], pack_bits(masks[i]))
    assert torch.equal(unpack_bits(packed, 105).reshape(masks.shape), masks)


@pytest.mark.parametrize(
    "bad", [torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0, 2, 1]), torch.tensor([-1.0, 0.0])]
)
def test_pack_bits_rejects_non_binary(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="zeros and ones"):
        pack_bits(bad)


def test_unpack_bits_dtype() -> None:
    packed = pack_bits(torch.tensor([1.0, 0.0, 1.0]))
    assert unpack_bits(packed, 3, torch.int32).tolist() == [1, 0, 1]
    assert unpack_bits(packed, 3, torch.int32).dtype == torch.int32
