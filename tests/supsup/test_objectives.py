"""supsup.objectives: the entropy against a hand computation, and G whose gradient reaches only the
superfluous outputs (the paper's Section 3.6)."""

from __future__ import annotations

import math

import pytest
import torch

from supsup.objectives import OBJECTIVES, entropy, get_objective, superfluous_g


def _logits(batch: int = 5, outputs: int = 12, seed: int = 0) -> torch.Tensor:
    return 3 * torch.randn(batch, outputs, generator=torch.Generator().manual_seed(seed))


def test_entropy_equals_hand_computation() -> None:
    logits = torch.tensor([[0.0, math.log(2.0), math.log(5.0)], [1.0, 1.0, 1.0]])
    # Row 0: softmax = (1, 2, 5) / 8. Row 1: uniform over 3 outputs, so H = log 3.
    p = [1 / 8, 2 / 8, 5 / 8]
    expected = torch.tensor([-sum(q * math.log(q) for q in p), math.log(3.0)])
    torch.testing.assert_close(entropy(logits), expected, rtol=0, atol=1e-6)


def test_entropy_is_per_example_and_bounded() -> None:
    logits = _logits()
    h = entropy(logits)
    assert h.shape == (5,)
    assert bool((h >= 0).all()) and bool((h <= math.log(12) + 1e-6).all())
    # One confident row (a large margin) has near-zero entropy.
    confident = torch.zeros(1, 12)
    confident[0, 3] = 50.0
    assert float(entropy(confident)) < 1e-6


def test_entropy_gradient_matches_float64_reference() -> None:
    logits = _logits().requires_grad_(True)
    (grad,) = torch.autograd.grad(entropy(logits).sum(), logits)
    ref = logits.detach().double().requires_grad_(True)
    p = ref.softmax(-1)
    (ref_grad,) = torch.autograd.grad(-(p * p.log()).sum(), ref)
    torch.testing.assert_close(grad, ref_grad.float(), rtol=1e-4, atol=1e-6)


def test_g_value_is_logsumexp_of_all_outputs() -> None:
    logits = _logits()
    torch.testing.assert_close(superfluous_g(logits, 4), logits.logsumexp(-1))


def test_g_gradient_flows_only_through_superfluous_logits() -> None:
    num_classes = 4
    logits = _logits().requires_grad_(True)
    (grad,) = torch.autograd.grad(superfluous_g(logits, num_classes).sum(), logits)
    assert bool((grad[:, :num_classes] == 0).all())  # exactly zero, not merely small
    # The rest is the softmax over all outputs, restricted to the superfluous ones.
    expected = logits.detach().softmax(-1)[:, num_classes:]
    torch.testing.assert_close(grad[:, num_classes:], expected)
    assert bool((grad[:, num_classes:] > 0).all())


@pytest.mark.parametrize("outputs", [10, 7])
def test_g_without_superfluous_outputs_names_entropy(outputs: int) -> None:
    with pytest.raises(ValueError, match="entropy"):
        superfluous_g(_logits(outputs=outputs), 10)


def test_get_objective_catalog() -> None:
    logits = _logits()
    assert get_objective("entropy", 4) is entropy
    torch.testing.assert_close(get_objective("g", 4)(logits), superfluous_g(logits, 4))
    assert set(OBJECTIVES) == {"entropy", "g"}
    with pytest.raises(ValueError, match="unknown objective 'kl'"):
        get_objective("kl", 4)
