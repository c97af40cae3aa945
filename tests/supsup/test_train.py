"""supsup.train: only scores learn, a task's mask does not depend on its group, training learns,
every optimiser and schedule runs, top-k densities are exact, and bad input is named."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from supsup.bank import MaskBank
from supsup.binding import use_task
from supsup.networks import SupermaskNet, build_network
from supsup.scores import TaskScores
from supsup.tasks import PermutedTasks, SplitTasks, TensorData
from supsup.train import (
    NonFiniteError,
    TrainConfig,
    TrainProgress,
    add_to_bank,
    config_from_mapping,
    train_group,
    train_task,
)

SIDE, CLASSES = 14, 4


def _blobs(n: int, side: int = SIDE, classes: int = CLASSES, seed: int = 0) -> TensorData:
    """Class-conditional Gaussian blobs: learnable, and each permutation is a distinct task."""
    means = 1.5 * torch.randn(classes, side * side, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = means[y] + torch.randn(n, side * side, generator=g)
    return TensorData(x.view(n, 1, side, side), y)


def _tasks(num_tasks: int = 4, side: int = SIDE, n: int = 512) -> PermutedTasks:
    return PermutedTasks(_blobs(n, side), _blobs(256, side, seed=1), num_tasks, seed=0)


def _net(name: str = "fc", side: int = SIDE) -> SupermaskNet:
    options = {"fc": {"hidden": (32,)}, "conv": {"width": 4}, "lenet": {}}[name]
    return build_network(name=name, num_outputs=2 * CLASSES, num_classes=CLASSES,
                         input_shape=(1, side, side), **options)


def _test_loss(net: SupermaskNet, tasks: PermutedTasks, bank: MaskBank,
               task_id: int) -> tuple[float, float]:
    """Cross-entropy and accuracy of one learned task on its test split."""
    net.eval()
    (x, y), = tasks.eval_batches(task_id, "test", 10_000)
    with use_task(net, bank, task_id), torch.no_grad():
        logits = net(x)
    accuracy = (logits[:, :CLASSES].argmax(1) == y).float().mean()
    return float(F.cross_entropy(logits, y)), float(accuracy)


def _bank(net: SupermaskNet, *results: object) -> MaskBank:
    bank = MaskBank(net.layer_shapes(), net.bn_features())
    for r in results:
        add_to_bank(bank, r)  # type: ignore[arg-type]
    return bank


# ---------------------------------------------------------------------------------- frozen W
@pytest.mark.parametrize("name", ["fc", "conv"])
def test_weights_never_get_a_gradient(name: str) -> None:
    net = _net(name)
    before = {k: m.weight.clone() for k, m in net.masked_layers().items()}
    assert list(net.parameters()) == []  # W is a buffer: no optimiser can ever see it
    train_task(net, _tasks(), 1, TrainConfig(steps=5, lr=1e-2, batch_size=32,
                                                optimizer="sgd", weight_decay=1e-2))
    for key, layer in net.masked_layers().items():
        assert not layer.weight.requires_grad
        assert layer.weight.grad is None
        assert torch.equal(layer.weight, before[key])  # bit for bit


# ------------------------------------------------------------------------- group contract
GROUP_CASES = [
    ("fc", TrainConfig(steps=25, lr=1e-2, batch_size=32, optimizer="rmsprop")),
    ("fc", TrainConfig(steps=25, lr=1e-2, batch_size=32, optimizer="adam", rule="topk",
                       density=0.3, weight_decay=1e-4)),
    ("conv", TrainConfig(steps=15, lr=0.1, batch_size=16, optimizer="sgd", schedule="cosine",
                         warmup_steps=3)),
    ("lenet", TrainConfig(steps=15, lr=1e-2, batch_size=32, optimizer="rmsprop")),
]


@pytest.mark.parametrize(("name", "config"), GROUP_CASES,
                         ids=[f"{n}-{c.optimizer}-{c.rule}" for n, c in GROUP_CASES])
def test_mask_does_not_depend_on_the_group(name: str, config: TrainConfig) -> None:
    """The train.py contract: a task learns bit-identical masks alone or in any group.

    Each task's scores start from its own generator, it sees its own batches, the group loss is a
    sum of per-task losses and the optimisers act elementwise, so nothing couples the tasks.
    """
    side = 28 if name == "lenet" else SIDE
    tasks, net = _tasks(side=side), _net(name, side)
    alone = train_task(net, tasks, 2, config)
    groups = [train_group(net, tasks, ids, config) for ids in ([0, 1, 2, 3], [3, 2])]
    for group in groups:
        assert group.masks[2].keys() == alone.masks[2].keys()
        for key, mask in alone.masks[2].items():
            assert torch.equal(group.masks[2][key], mask), key
        for key, stats in alone.bn_stats[2].items():
            assert torch.equal(group.bn_stats[2][key], stats), key
        assert group.loss[2] == alone.loss[2]
    # Not a vacuous equality: training moved the mask, and the tasks of a group differ.
    initial = train_task(net, tasks, 2, dataclasses.replace(config, steps=0))
    assert any(not torch.equal(initial.masks[2][k], m) for k, m in alone.masks[2].items())
    key = next(iter(alone.masks[2]))
    assert not torch.equal(groups[0].masks[0][key], groups[0].masks[2][key])


def _uneven_split() -> SplitTasks:
    """Three split tasks of 2 classes with 100, 300 and 200 training examples."""
    counts = [50, 50, 150, 150, 100, 100]
    y = torch.cat([torch.full((c,), label) for label, c in enumerate(counts)])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(y), 1, 6, 6, generator=g) + 0.5 * y.view(-1, 1, 1, 1)
    data = TensorData(x, y)
    return SplitTasks(data, data, 3, classes_per_task=2)


def test_epochs_over_tasks_of_unequal_size_keep_the_group_contract() -> None:
    """Under `epochs` each task trains for its own number of steps, in any group."""
    tasks = _uneven_split()
    net = build_network(name="fc", hidden=(16,), num_outputs=4, num_classes=2,
                        input_shape=(1, 6, 6))
    config = TrainConfig(epochs=1, batch_size=32, lr=1e-2, log_every=3)
    seen: list[TrainProgress] = []
    group = train_group(net, tasks, [2, 0, 1], config, callback=seen.append)
    assert group.task_ids == [2, 0, 1] and list(group.masks) == [2, 0, 1]
    assert group.task_steps == {2: 7, 0: 4, 1: 10}  # ceil(size / 32)
    assert group.steps == 10
    assert {(tuple(p.task_ids), p.steps) for p in seen} == {((0,), 4), ((2,), 7), ((1,), 10)}
    assert group.history == seen
    for t in (0, 1, 2):
        alone = train_task(net, tasks, t, config)
        assert alone.steps == group.task_steps[t]
        for key, mask in alone.masks[t].items():
            assert torch.equal(group.masks[t][key], mask), (t, key)
    with pytest.raises(ValueError, match="different step counts"):
        train_group(net, tasks, [0, 1], config, scores=TaskScores(net, [0, 1]))


# ----------------------------------------------------------------------------- learning
def test_training_reduces_the_test_loss() -> None:
    tasks, net = _tasks(), _net()
    untrained = train_task(net, tasks, 0, TrainConfig(steps=0))
    trained = train_task(net, tasks, 0, TrainConfig(steps=60, lr=1e-2, batch_size=32))
    loss_0, acc_0 = _test_loss(net, tasks, _bank(net, untrained), 0)
    loss_1, acc_1 = _test_loss(net, tasks, _bank(net, trained), 0)
    # The blobs are separable; chance is 1/4. Measured: loss 1.6 -> 6e-5, accuracy 0.34 -> 1.0.
    assert loss_1 < 0.25 * loss_0
    assert acc_1 >= 0.9
    assert trained.accuracy[0] >= 0.8  # the last logging window of training accuracy
    assert trained.steps == 60 and untrained.steps == 0


def test_a_non_finite_loss_stops_the_group_naming_task_and_step() -> None:
    tasks, net = _tasks(), _net()
    train = _blobs(512)
    train.x[0, 0, 0, 0] = float("nan")  # one broken example: the tasks' batches will meet it
    broken = PermutedTasks(train, _blobs(256, seed=1), 4, seed=0)
    with pytest.raises(NonFiniteError, match=r"task \d: the training loss became non-finite at "
                                             r"step \d+; nothing of this group is stored"):
        train_group(net, broken, [1, 2], TrainConfig(steps=200, batch_size=256, log_every=50))
    with pytest.raises(NonFiniteError, match=r"task 0: .* Lower train.lr"):
        train_group(net, tasks, [0], TrainConfig(steps=30, lr=1e38, optimizer="sgd",
                                                 log_every=10))


@pytest.mark.parametrize("optimizer", ["rmsprop", "adam", "sgd"])
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_every_optimizer_and_schedule_learns(optimizer: str, schedule: str) -> None:
    tasks, net = _tasks(num_tasks=2), _net()
    lr = 0.5 if optimizer == "sgd" else 1e-2
    initial = train_group(net, tasks, [0, 1], TrainConfig(steps=0))
    config = TrainConfig(steps=40, lr=lr, optimizer=optimizer, schedule=schedule,
                         warmup_steps=4, batch_size=32, log_every=10)
    result = train_group(net, tasks, [0, 1], config)
    bank_0, bank_1 = _bank(net, initial), _bank(net, result)
    for t in (0, 1):
        assert _test_loss(net, tasks, bank_1, t)[0] < 0.5 * _test_loss(net, tasks, bank_0, t)[0]
        for mask in result.masks[t].values():
            assert bool(((mask == 0) | (mask == 1)).all())


def test_epochs_set_the_number_of_steps() -> None:
    tasks, net = _tasks(num_tasks=1, n=512), _net()
    result = train_task(net, tasks, 0, TrainConfig(epochs=0.5, batch_size=64, lr=1e-2))
    assert result.steps == 4 and result.task_steps == {0: 4}  # ceil(0.5 * 512 / 64)
    assert TrainConfig(epochs=0.01, batch_size=64).num_steps(512) == 1


@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
def test_topk_exports_exact_densities(density: float) -> None:
    tasks, net = _tasks(num_tasks=3), _net()
    config = TrainConfig(steps=10, lr=1e-2, rule="topk", density=density, batch_size=32)
    result = train_group(net, tasks, [0, 1, 2], config)
    total = sum(m.numel for m in net.masked_layers().values())
    for t in (0, 1, 2):
        kept = 0
        for key, mask in result.masks[t].items():
            expected = max(1, round(density * mask.numel()))
            assert int(mask.sum()) == expected, key
            kept += expected
        assert result.density[t] == pytest.approx(kept / total, abs=1e-7)


def test_topk_with_erdos_renyi_densities_is_exact_per_layer() -> None:
    from supsup.masks import erdos_renyi_densities

    tasks, net = _tasks(num_tasks=1), _net()
    config = TrainConfig(steps=5, lr=1e-2, rule="topk", erdos_renyi_scale=2.0, batch_size=32)
    result = train_task(net, tasks, 0, config)
    shapes = net.layer_shapes()
    densities = erdos_renyi_densities(list(shapes.values()), 2.0)
    for (key, shape), density in zip(shapes.items(), densities):
        n = torch.Size(shape).numel()
        assert int(result.masks[0][key].sum()) == max(1, round(density * n))


def test_callback_receives_progress_with_step_counts() -> None:
    tasks, net = _tasks(num_tasks=2), _net()
    seen: list[TrainProgress] = []
    result = train_group(net, tasks, [1, 0], TrainConfig(steps=25, log_every=10, lr=1e-2,
                                                          batch_size=32), callback=seen.append)
    assert [p.step for p in seen] == [10, 20, 25]
    assert all(p.steps == 25 and p.task_ids == [1, 0] for p in seen)
    assert all(len(p.loss) == 2 and len(p.accuracy) == 2 for p in seen)
    assert all(0.0 <= a <= 1.0 for p in seen for a in p.accuracy)
    assert [p.seconds for p in seen] == sorted(p.seconds for p in seen)
    assert result.history == seen
    assert result.loss == {1: seen[-1].loss[0], 0: seen[-1].loss[1]}


def test_validate_runs_at_every_log_point_in_eval_mode() -> None:
    tasks, net = _tasks(num_tasks=2), _net()
    modes: list[bool] = []

    def validate(scores: TaskScores) -> list[float]:
        modes.append(net.training)
        assert not torch.is_grad_enabled()
        return [float(t) for t in scores.task_ids]

    seen: list[TrainProgress] = []
    train_group(net, tasks, [1, 0], TrainConfig(steps=12, log_every=5, lr=1e-2, batch_size=32),
                callback=seen.append, validate=validate)
    assert [p.val_accuracy for p in seen] == [[1.0, 0.0]] * 3  # steps 5, 10 and 12
    assert modes == [False] * 3 and net.training
    plain = train_group(net, tasks, [1, 0], TrainConfig(steps=3, lr=1e-2, batch_size=32))
    assert plain.history[-1].val_accuracy is None


def test_add_to_bank_stores_the_exported_masks_and_bn_stats() -> None:
    tasks, net = _tasks(num_tasks=2), _net("conv")
    result = train_group(net, tasks, [0, 1], TrainConfig(steps=3, lr=1e-2, batch_size=16))
    bank = _bank(net, result)
    assert bank.task_ids == [0, 1]
    for t in (0, 1):
        for key, mask in result.masks[t].items():
            assert torch.equal(bank.mask(t, key), mask)
        for key, stats in result.bn_stats[t].items():
            assert stats.shape == (2, net.bn_features()[key])
            assert torch.equal(bank.bn_stats(t, key), stats)
            assert not torch.equal(stats[0], torch.zeros_like(stats[0]))  # running mean moved


def test_scores_carry_on_across_calls() -> None:
    tasks, net = _tasks(num_tasks=2), _net()
    config = TrainConfig(steps=10, lr=1e-2, batch_size=32)
    scores = TaskScores(net, [0, 1])
    first = train_group(net, tasks, [0, 1], config, scores=scores)
    second = train_group(net, tasks, [0, 1], config, scores=scores)
    key = next(iter(first.masks[0]))
    assert not torch.equal(first.masks[0][key], second.masks[0][key])
    with pytest.raises(ValueError, match=r"scores hold tasks \[0, 1\]"):
        train_group(net, tasks, [1, 0], config, scores=scores)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"schedule": "linear"}, "schedule"),
        ({"rule": "random"}, "rule"),
        ({"density": 0.0}, "density"),
        ({"density": 1.5}, "density"),
        ({"rule": "topk"}, "density"),
        ({"rule": "topk", "density": 0}, "density"),
        ({"rule": "topk", "density": 1.5}, "density"),
        ({"steps": -1}, "steps"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"log_every": 0}, "log_every"),
        ({"warmup_steps": -1}, "warmup_steps"),
    ],
)
def test_bad_config_names_the_field(options: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        TrainConfig(**options)  # type: ignore[arg-type]


def test_config_from_mapping() -> None:
    assert config_from_mapping({"steps": 7, "optimizer": "adam"}) == TrainConfig(
        steps=7, optimizer="adam")
    with pytest.raises(ValueError, match=r"unknown training options \['stpes'\]"):
        config_from_mapping({"stpes": 7})
    with pytest.raises(ValueError, match="optimizer"):
        config_from_mapping({"optimizer": "adagrad"})


def test_network_and_task_input_shapes_must_match() -> None:
    tasks = _tasks(side=SIDE)
    with pytest.raises(ValueError, match=r"expects inputs \(1, 28, 28\).*\(1, 14, 14\)"):
        train_task(_net("lenet", 28), tasks, 0, TrainConfig(steps=1))


def test_network_needs_an_output_per_class() -> None:
    net = build_network(name="fc", hidden=(8,), num_outputs=2, num_classes=2,
                        input_shape=(1, SIDE, SIDE))
    with pytest.raises(ValueError, match="4 classes but the network only 2 outputs"):
        train_task(net, _tasks(), 0, TrainConfig(steps=1))


def test_unknown_task_and_duplicates_are_refused() -> None:
    tasks, net = _tasks(num_tasks=2), _net()
    with pytest.raises(ValueError, match="task 5 is outside"):
        train_task(net, tasks, 5, TrainConfig(steps=1))
    with pytest.raises(ValueError, match="duplicate task ids"):
        train_group(net, tasks, [1, 1], TrainConfig(steps=1))


def test_train_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().steps = 3  # type: ignore[misc]
