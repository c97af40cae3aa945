"""supsup.bank: products over bit-packed masks equal the float32 reference, contents round trip,
bad input leaves the bank unchanged, and 2,500 LeNet tasks take 1/32 of a float stack."""

from __future__ import annotations

import math

import pytest
import torch

import supsup.bank
from supsup.bank import KernelPlan, MaskBank
from supsup.masks import pack_bits, packed_size

# Sizes that are not multiples of 8 (91, 135, 2745), one that is (64), and a conv shape.
SHAPES: dict[str, tuple[int, ...]] = {
    "fc1": (7, 13),
    "conv": (5, 3, 3, 3),
    "fc2": (45, 61),
    "head": (8, 8),
}
BN = {"bn": 5}


def _random_masks(
    num_tasks: int, seed: int = 0, shapes: dict[str, tuple[int, ...]] = SHAPES
) -> dict[str, torch.Tensor]:
    """(num_tasks, *shape) float 0/1 masks per layer with a different density per task."""
    g = torch.Generator().manual_seed(seed)
    density = torch.rand(num_tasks, generator=g) * 0.8 + 0.1
    return {
        k: (torch.rand(num_tasks, *s, generator=g) < density.reshape(-1, *[1] * len(s))).to(
            torch.float32
        )
        for k, s in shapes.items()
    }


def _random_stats(num_tasks: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    return {k: torch.rand(num_tasks, 2, c, generator=g) + 0.5 for k, c in BN.items()}


def _bank(
    task_ids: list[int],
    masks: dict[str, torch.Tensor],
    stats: dict[str, torch.Tensor] | None = None,
) -> MaskBank:
    bank = MaskBank(SHAPES, BN if stats is not None else None)
    bank.extend_packed(task_ids, {k: pack_bits(m, group_dims=1) for k, m in masks.items()}, stats)
    return bank


def _stack(masks: torch.Tensor) -> torch.Tensor:
    """The float32 reference: (T, numel)."""
    return masks.reshape(masks.shape[0], -1)


@pytest.mark.parametrize("key", sorted(SHAPES))
def test_mixture_uniform_over_all_tasks_uses_counts(key: str) -> None:
    masks = _random_masks(23)
    bank = _bank(list(range(100, 123)), masks)
    alphas = torch.full((23,), 1 / 23)
    got = bank.mixture(key, bank.rows(None), alphas)
    expected = (alphas.double() @ _stack(masks[key]).double()).float().reshape(SHAPES[key])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    # A reordering of every task is the same sum.
    shuffled = bank.rows(list(range(122, 99, -1)))
    torch.testing.assert_close(bank.mixture(key, shuffled, alphas), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("key", sorted(SHAPES))
def test_mixture_random_alphas_and_subsets(key: str) -> None:
    masks = _random_masks(23)
    task_ids = list(range(100, 123))
    bank = _bank(task_ids, masks)
    g = torch.Generator().manual_seed(5)
    alphas = torch.randn(23, generator=g)
    expected = (alphas @ _stack(masks[key])).reshape(SHAPES[key])
    torch.testing.assert_close(
        bank.mixture(key, bank.rows(None), alphas), expected, rtol=1e-5, atol=1e-5
    )
    picks = [117, 101, 120, 105]
    sub_alphas = torch.full((4,), 0.25)  # uniform, but not over every task: no count shortcut
    rows = [t - 100 for t in picks]
    expected = (sub_alphas @ _stack(masks[key])[rows]).reshape(SHAPES[key])
    torch.testing.assert_close(bank.mixture(key, bank.rows(picks), sub_alphas), expected)
    # Repeating a task counts it twice even when the row count equals the number of tasks.
    repeated = [100] * 23
    expected = (torch.full((23,), 0.5) @ _stack(masks[key])[[0] * 23]).reshape(SHAPES[key])
    torch.testing.assert_close(
        bank.mixture(key, bank.rows(repeated), torch.full((23,), 0.5)), expected
    )


# The default plan, and integer / float32 plans with blocks small enough that fc2 (344 bytes) and
# 300 rows span several row and column blocks.
PLANS = {
    "default": None,
    "integer-small-blocks": KernelPlan(True, 1024, 1024, 64, 0, 64),
    "float-small-blocks": KernelPlan(False, 1024, 1024, 64, 0, 0),
}


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("key", sorted(SHAPES))
def test_alpha_gradient_equals_float_stack_product(
    key: str, plan: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if PLANS[plan] is not None:
        monkeypatch.setattr(supsup.bank, "kernel_plan", lambda device: PLANS[plan])
    num_tasks = 300
    masks = _random_masks(num_tasks, seed=2)
    task_ids = [3 * i + 1 for i in range(num_tasks)]
    bank = _bank(task_ids, masks)
    g = torch.Generator().manual_seed(7)
    grad = torch.randn(SHAPES[key], generator=g)
    stack = _stack(masks[key]).double()
    expected = (stack @ grad.double().reshape(-1)).float()
    got = bank.alpha_gradient(key, bank.rows(None), grad)
    assert got.shape == (num_tasks,)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    # A subset in any order gives each task's gradient at its own position.
    picks = [task_ids[i] for i in (299, 0, 150, 7)]
    torch.testing.assert_close(
        bank.alpha_gradient(key, bank.rows(picks), grad),
        expected[[299, 0, 150, 7]],
        rtol=1e-5,
        atol=1e-4,
    )
    # So does every task in reverse order (the same row count as the bank).
    reverse = task_ids[::-1]
    torch.testing.assert_close(
        bank.alpha_gradient(key, bank.rows(reverse), grad), expected.flip(0), rtol=1e-5, atol=1e-4
    )
    alphas = torch.randn(num_tasks, generator=g)
    torch.testing.assert_close(
        bank.mixture(key, bank.rows(None), alphas),
        (alphas.double() @ stack).float().reshape(SHAPES[key]),
        rtol=1e-5,
        atol=1e-4,
    )


def test_alpha_gradient_rejects_wrong_size() -> None:
    bank = _bank([0], _random_masks(1))
    with pytest.raises(ValueError, match="gradient for layer 'fc1' has 90 values, expected 91"):
        bank.alpha_gradient("fc1", bank.rows(None), torch.zeros(90))


def test_mask_and_masks_round_trip() -> None:
    masks = _random_masks(4)
    stats = _random_stats(4)
    bank = MaskBank(SHAPES, BN)
    for i, task_id in enumerate([8, 2, 5, 1]):
        bank.add(task_id, {k: m[i] for k, m in masks.items()}, {k: s[i] for k, s in stats.items()})
    assert bank.task_ids == [8, 2, 5, 1] and len(bank) == 4 and 5 in bank and 3 not in bank
    for key in SHAPES:
        for i, task_id in enumerate([8, 2, 5, 1]):
            assert torch.equal(bank.mask(task_id, key), masks[key][i])
        assert torch.equal(bank.masks([1, 8], key), masks[key][[3, 0]])
    assert torch.equal(bank.bn_stats(5, "bn"), stats["bn"][2])
    assert torch.equal(bank.bn_stats([1, 2], "bn"), stats["bn"][[3, 1]])
    numel = sum(math.prod(s) for s in SHAPES.values())
    kept = sum(float(m[1].sum()) for m in masks.values())
    assert bank.density(2) == pytest.approx(kept / numel, rel=1e-12)


def test_add_packed_accepts_numpy_packbits() -> None:
    masks = _random_masks(1)
    bank = MaskBank(SHAPES)
    bank.add_packed(0, {k: pack_bits(m[0]).numpy() for k, m in masks.items()})
    assert all(torch.equal(bank.mask(0, k), m[0]) for k, m in masks.items())


def test_add_rejects_wrong_mask_shape() -> None:
    masks = {k: m[0] for k, m in _random_masks(1).items()}
    masks["conv"] = torch.ones(5, 3, 3, 2)
    bank = MaskBank(SHAPES)
    with pytest.raises(ValueError, match=r"task 4: mask for layer 'conv' has shape"):
        bank.add(4, masks)
    del masks["conv"]
    with pytest.raises(KeyError, match="no mask for layer 'conv'"):
        bank.add(4, masks)
    assert len(bank) == 0


def _snapshot(bank: MaskBank) -> tuple[list[int], int, dict[str, torch.Tensor], torch.Tensor]:
    counts = bank.mixture("fc2", bank.rows(None), torch.ones(len(bank)))
    return (list(bank.task_ids), bank.nbytes(), {k: bank.packed(k).clone() for k in SHAPES}, counts)


def _assert_unchanged(bank: MaskBank, before: tuple) -> None:
    ids, nbytes, packed, counts = _snapshot(bank)
    assert ids == before[0] and nbytes == before[1]
    assert all(torch.equal(packed[k], before[2][k]) for k in SHAPES)
    assert torch.equal(counts, before[3])


def test_extend_packed_with_wrong_shape_leaves_bank_unchanged() -> None:
    masks = _random_masks(5)
    stats = _random_stats(5)
    bank = _bank(
        [0, 1, 2], {k: m[:3] for k, m in masks.items()}, {k: s[:3] for k, s in stats.items()}
    )
    before = _snapshot(bank)
    packed = {k: pack_bits(m[3:], group_dims=1) for k, m in masks.items()}
    new_stats = {k: s[3:] for k, s in stats.items()}
    bad = dict(packed, fc2=packed["fc2"][:, :-1])  # the last layer checked is short of a byte
    with pytest.raises(ValueError, match=r"layer 'fc2' has packed shape \(2, 343\), expected"):
        bank.extend_packed([3, 4], bad, new_stats)
    _assert_unchanged(bank, before)
    with pytest.raises(ValueError, match="BN stats of 'bn' have shape"):
        bank.extend_packed([3, 4], packed, {"bn": new_stats["bn"][:, :, :4]})
    _assert_unchanged(bank, before)
    with pytest.raises(KeyError, match="no BatchNorm statistics for layer 'bn'"):
        bank.extend_packed([3, 4], packed, None)
    _assert_unchanged(bank, before)
    with pytest.raises(ValueError, match="task 1 is already in the bank"):
        bank.extend_packed([3, 1], packed, new_stats)
    _assert_unchanged(bank, before)
    bank.extend_packed([3, 4], packed, new_stats)  # the valid input still goes in afterwards
    assert bank.task_ids == [0, 1, 2, 3, 4]
    assert torch.equal(bank.mask(4, "fc2"), masks["fc2"][4])


def test_duplicate_task_raises() -> None:
    masks = _random_masks(2)
    bank = _bank([7], {k: m[:1] for k, m in masks.items()})
    with pytest.raises(ValueError, match="task 7 is already in the bank"):
        bank.add(7, {k: m[1] for k, m in masks.items()})
    with pytest.raises(ValueError, match="task 9 is already in the bank"):
        MaskBank(SHAPES).extend_packed([9, 9], {k: pack_bits(m, 1) for k, m in masks.items()})


def test_unknown_task_raises_key_error_naming_it() -> None:
    bank = _bank([0, 1, 2], {k: m[:3] for k, m in _random_masks(3).items()})
    held = r"task 42 was never learned; the bank holds tasks \[0, 1, 2\]"
    with pytest.raises(KeyError, match=held):
        bank.mask(42, "fc1")
    with pytest.raises(KeyError, match="task 42"):
        bank.rows([0, 42])
    with pytest.raises(KeyError, match="task 42"):
        bank.subset([42])
    with pytest.raises(KeyError, match="task 0 was never learned; the bank holds no tasks"):
        MaskBank(SHAPES).row(0)


def test_empty_layer_shapes_raise() -> None:
    with pytest.raises(ValueError, match="at least one masked layer"):
        MaskBank({})


def test_subset_keeps_the_chosen_tasks() -> None:
    masks = _random_masks(6)
    stats = _random_stats(6)
    bank = _bank(list(range(6)), masks, stats)
    sub = bank.subset([4, 1])
    assert sub.task_ids == [4, 1] and sub.bn_features == BN
    for key in SHAPES:
        assert torch.equal(sub.masks([4, 1], key), masks[key][[4, 1]])
        torch.testing.assert_close(
            sub.mixture(key, sub.rows(None), torch.full((2,), 0.5)),
            (0.5 * (masks[key][4] + masks[key][1])),
        )
    assert torch.equal(sub.bn_stats(4, "bn"), stats["bn"][4])
    assert len(bank) == 6  # the original is untouched


def test_many_single_adds_keep_every_row() -> None:
    masks = _random_masks(40, seed=4)
    bank = MaskBank(SHAPES)
    for i in range(40):  # crosses several storage growths
        bank.add(i, {k: m[i] for k, m in masks.items()})
    for key in SHAPES:
        assert torch.equal(bank.masks(list(range(40)), key), masks[key])
        torch.testing.assert_close(
            bank.mixture(key, bank.rows(None), torch.ones(40)), masks[key].sum(0)
        )


def test_nbytes_of_2500_lenet_tasks_is_at_most_a_thirtieth_of_float32() -> None:
    shapes = {"0": (300, 784), "1": (100, 300), "2": (500, 100)}
    numel = 784 * 300 + 300 * 100 + 100 * 500
    row_bytes = sum(packed_size(math.prod(s)) for s in shapes.values())
    assert row_bytes == 39400  # 315,200 bits

    def nbytes(num_tasks: int) -> int:
        g = torch.Generator().manual_seed(num_tasks)
        bank = MaskBank(shapes)
        bank.extend_packed(
            list(range(num_tasks)),
            {
                k: torch.randint(
                    0, 256, (num_tasks, packed_size(math.prod(s))), dtype=torch.uint8, generator=g
                )
                for k, s in shapes.items()
            },
        )
        return bank.nbytes()

    # Storage is affine in the number of tasks: one packed row per task plus fixed counts.
    small, large = nbytes(4), nbytes(12)
    assert large - small == 8 * row_bytes
    fixed = small - 4 * row_bytes
    assert fixed == numel * 4  # the int32 per-weight counts
    at_2500 = fixed + 2500 * row_bytes
    float_stack = 2500 * numel * 4  # 2.66 GB
    assert at_2500 * 30 <= float_stack
