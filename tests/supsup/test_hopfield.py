"""supsup.hopfield: the storage rule against a hand-computed matrix, store/settle round trips of
random patterns (d = 2048), constant size, bad input, and SplitMNIST gates recalled from test
batches alone."""

from __future__ import annotations

import pytest
import torch

from pipeline.datasets import load_dataset
from supsup.gates import (
    GatedNet,
    GateTrainConfig,
    gated_accuracy,
    gates_to_pattern,
    pattern_to_gates,
    train_gates,
)
from supsup.hopfield import HopfieldReservoir, capacity_curve, random_patterns, recall_rate
from supsup.layers import signed_constant
from supsup.tasks import SplitTasks

NUM_TASKS = 5
WIDTH = 1024  # d; the paper's 2048 recalls exactly too but trains 3x slower on a CPU
# 15 epochs of the ~800 bundled training digits per pair is ~95 steps of 128: the number of
# steps one epoch of full MNIST (~12,000 digits per pair) gives in the paper.
GATE_TRAIN = GateTrainConfig(epochs=15)



pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

# ------------------------------------------------------------------------------- storage
def test_storkey_rule_matches_hand_computed_matrices() -> None:
    """d = 3: x1 = (1, 1, -1), then x2 = (1, -1, 1), worked by hand from
    Psi += (x x^T - I - x h^T - h x^T) / d with h = Psi x."""
    res = HopfieldReservoir(3, 1)
    res.store(torch.tensor([[1.0, 1.0, -1.0]]))
    first = torch.tensor([[0.0, 1, -1], [1, 0, -1], [-1, -1, 0]]) / 3
    torch.testing.assert_close(res.psi[0], first)
    res.store(torch.tensor([[1.0, -1.0, 1.0]]))  # h = Psi x2 = (-2/3, 0, 0)
    second = torch.tensor([[4.0, -2, 2], [-2, 0, -6], [2, -6, 0]]) / 9
    torch.testing.assert_close(res.psi[0], second)
    torch.testing.assert_close(res.mean_pattern(), torch.tensor([[1.0, 0.0, 0.0]]))
    assert res.num_stored == 2
    # Psi x2 = (8, -8, 8) / 9, so E(x2) = -1/2 * 24 / 9; Psi x1 = (0, 4, -4) / 9: a zero field
    # keeps its bit, so both stored patterns are fixed points of the sign dynamics.
    both = torch.tensor([[[1.0, 1.0, -1.0]], [[1.0, -1.0, 1.0]]])
    torch.testing.assert_close(res.energy(both[1]), torch.tensor(-4.0 / 3.0))
    assert torch.equal(res.settle(both), both)


def test_random_patterns_round_trip_at_d_2048() -> None:
    """20 random patterns in 2 layers of d = 2048, far below capacity (a few hundred): every one
    is a fixed point and comes back exactly from 20% of its bits flipped."""
    d, num = 2048, 20
    res = HopfieldReservoir(d, num_layers=2)
    patterns = torch.stack([random_patterns(num, d, seed=1), random_patterns(num, d, seed=2)], 1)
    for p in patterns:
        res.store(p)
    assert torch.equal(res.settle(patterns), patterns)
    assert recall_rate(res, patterns, flip=0.2) == 1.0
    torch.testing.assert_close(res.mean_pattern(), patterns.mean(0))


def test_size_is_constant_in_the_number_of_stored_tasks() -> None:
    d = 64
    res = HopfieldReservoir(d, num_layers=2)
    empty = res.nbytes()
    assert empty == 2 * d * d * 4 + 2 * d * 4
    for p in random_patterns(40, d).reshape(20, 2, d):
        res.store(p)
    assert res.nbytes() == empty


def test_capacity_curve_falls_past_capacity() -> None:
    """d = 64 holds about 64 / sqrt(2 ln 64) ~ 22 random patterns: 2 come back, 60 do not."""
    curve = capacity_curve(64, [2, 60], flip=0.05)
    assert curve[0] == (2, 1.0)
    assert curve[1][0] == 60 and curve[1][1] < 0.5


def test_gates_and_patterns_convert_both_ways() -> None:
    gates = [torch.tensor([1.0, 0, 1]), torch.tensor([0.0, 0, 1])]
    pattern = gates_to_pattern(gates)
    assert torch.equal(pattern, torch.tensor([[1.0, -1, 1], [-1, -1, 1]]))
    assert all(torch.equal(a, b) for a, b in zip(pattern_to_gates(pattern), gates))


# ----------------------------------------------------------------------------- bad input
def test_bad_input_is_named() -> None:
    res = HopfieldReservoir(4, num_layers=2)
    with pytest.raises(ValueError, match=r"only -1 and \+1"):
        res.store(torch.tensor([[1.0, 0.0, 1.0, -1.0], [1.0, 1.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"shape \(num_layers, d\) = \(2, 4\), got \(4,\)"):
        res.store(torch.ones(4))
    assert res.num_stored == 0 and not res.psi.any()  # nothing half-written
    net = GatedNet(hidden=(8, 8), seed=0)
    x = torch.zeros(4, 1, 28, 28)
    matching = HopfieldReservoir(8, num_layers=2)
    with pytest.raises(ValueError, match="the reservoir is empty"):
        matching.recall(net, [x])
    matching.store(torch.ones(2, 8))
    res.store(torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"reservoir d=4 .* gated widths \(8, 8\)"):
        res.recall(net, [x])
    with pytest.raises(ValueError, match=r"expects input \(B, 1, 28, 28\), got \(4, 784\)"):
        matching.recall(net, [torch.zeros(4, 784)])
    with pytest.raises(ValueError, match="at least one batch"):
        matching.recall(net, [])
    with pytest.raises(ValueError, match="one width d"):
        gates_to_pattern([torch.ones(3), torch.ones(4)])
    with pytest.raises(ValueError, match="flip"):
        recall_rate(matching, torch.ones(1, 2, 8), flip=0.5)


def test_gated_net_weights_come_from_the_seed() -> None:
    net = GatedNet(hidden=(16, 8), num_outputs=10, seed=3)
    assert torch.equal(net.weight(0), signed_constant((16, 784), 784, 3, 0))
    assert torch.equal(net.weight(2), signed_constant((10, 8), 8, 3, 2))
    out = net(torch.randn(5, 1, 28, 28), [torch.ones(16), torch.zeros(8)])
    assert torch.equal(out, torch.zeros(5, 10))  # every unit of the last layer gated off


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def split_tasks() -> SplitTasks:
    train, test = load_dataset("mnist-bundled")
    return SplitTasks(train, test, NUM_TASKS, seed=0, classes_per_task=2)


@pytest.mark.slow
def test_split_mnist_gates_are_recalled_from_test_batches(split_tasks: SplitTasks) -> None:
    """Five digit pairs (labels 0..1, 10 outputs), gates 784-1024-1024-10, all stored in one
    reservoir; each task recalled with 30 steps (lr 500, momentum 0.9, gamma 1.5e-3) from its
    test batches only.

    Tolerances: the recalled gates are closer to their own task's stored gates than to any
    other's and differ in at most 10% of the 2048 bits (measured: 0 to 160 bits; a recall that
    lands on another task or on a mixture is 500+ bits away). Accuracy with the recalled gates
    is within 5 points of the stored gates' (measured: within 3; about 200 test digits per
    pair, so one digit is 0.5 points).
    """
    net = GatedNet(hidden=(WIDTH, WIDTH), num_outputs=10, seed=0)
    learned = [train_gates(net, split_tasks, t, GATE_TRAIN) for t in range(NUM_TASKS)]
    stored_acc = [gated_accuracy(net, r.gates, split_tasks, r.task_id) for r in learned]
    assert min(stored_acc) >= 0.85, stored_acc
    reservoir = HopfieldReservoir(WIDTH, num_layers=2)
    size = reservoir.nbytes()
    for r in learned:
        reservoir.store(r.pattern)
    assert reservoir.nbytes() == size
    patterns = torch.stack([r.pattern for r in learned])  # (tasks, 2, d)
    for t in range(NUM_TASKS):
        batches = [x for x, _ in split_tasks.eval_batches(t, "test", 128)]
        recalled = reservoir.recall(net, batches, steps=30)
        assert len(recalled.trace) == 30
        distance = (recalled.pattern != patterns).flatten(1).sum(1)  # (tasks,)
        assert int(distance.argmin()) == t, (t, distance.tolist())
        assert int(distance[t]) <= 0.1 * 2 * WIDTH, (t, distance.tolist())
        accuracy = gated_accuracy(net, recalled.gates, split_tasks, t)
        assert accuracy >= stored_acc[t] - 0.05, (t, accuracy, stored_acc[t])
