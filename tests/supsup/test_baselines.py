"""supsup.baselines: exact storage formulas and forward math, dense learns every task, BatchE's
shared weights stay fixed after the first task while later tasks still learn, PSP's contexts are
+-1 and reproducible and PSP forgets less than plain fine-tuning, and bad input is named."""

from __future__ import annotations

import math

import pytest
import torch

from supsup.baselines import (
    BaselineResult,
    BatchEnsembleNet,
    PSPNet,
    build_baseline,
    evaluate_baseline,
    layer_shapes,
    psp_context,
    storage_bytes,
    train_baseline,
)
from supsup.networks import NetworkSpec
from supsup.seeding import generator
from supsup.tasks import PermutedTasks, TensorData
from supsup.train import TrainConfig, TrainProgress

SIDE, CLASSES, NUM_TASKS = 14, 4, 3
CHANCE = 1 / CLASSES
# Small, noisy blobs: one task is easy, but the shared kinds must hold three permutations at once,
# which is what makes plain fine-tuning forget.
CONFIG = TrainConfig(steps=200, batch_size=32, optimizer="adam", lr=1e-2, log_every=50)


def _blobs(n: int, seed: int) -> TensorData:
    means = 0.3 * torch.randn(CLASSES, SIDE * SIDE, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = means[y] + torch.randn(n, SIDE * SIDE, generator=g)
    return TensorData(x.view(n, 1, SIDE, SIDE), y)


def _tasks() -> PermutedTasks:
    return PermutedTasks(_blobs(512, 0), _blobs(256, 1), NUM_TASKS, seed=0)


def _spec(name: str = "fc", **kwargs: object) -> NetworkSpec:
    options: dict[str, object] = {"num_outputs": 2 * CLASSES, "input_shape": (1, SIDE, SIDE)}
    if name == "fc":
        options["hidden"] = (64,)
    options.update(kwargs)
    return NetworkSpec(name=name, num_classes=CLASSES, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tasks() -> PermutedTasks:
    return _tasks()


@pytest.fixture(scope="module")
def trained(tasks: PermutedTasks) -> dict[str, tuple[BaselineResult, dict]]:
    """Every kind trained on tasks 0, 1, 2 in order, and its report after all were learned."""
    torch.manual_seed(0)  # nothing should read the global stream; this makes a leak visible
    out = {}
    for kind in ("dense", "batchensemble", "psp", "finetune"):
        result = train_baseline(kind, _spec(), tasks, range(NUM_TASKS), CONFIG)
        out[kind] = (result, evaluate_baseline(result, tasks))
    return out


# ------------------------------------------------------------------ sizes and storage
def test_layer_shapes_follow_the_network_catalog() -> None:
    mnist = {"input_shape": (1, 28, 28)}
    assert layer_shapes(_spec("lenet", num_outputs=100, **mnist)) == [
        (300, 784), (100, 300), (100, 100)]
    assert layer_shapes(_spec("fc1024", num_outputs=500, **mnist)) == [
        (1024, 784), (1024, 1024), (500, 1024)]
    assert layer_shapes(_spec("fc", hidden=(64, 32))) == [(64, 196), (32, 64), (8, 32)]


def test_storage_bytes_formulas_are_exact() -> None:
    spec = _spec("lenet", num_outputs=100, input_shape=(1, 28, 28))
    weights = 4 * (300 * 784 + 100 * 300 + 100 * 100)
    assert weights == 1_100_800
    assert storage_bytes("dense", spec) == (0, weights)
    assert storage_bytes("batchensemble", spec) == (
        weights, 4 * ((300 + 784) + (100 + 300) + (100 + 100)))
    assert storage_bytes("batchensemble", spec)[1] == 6736
    assert storage_bytes("psp", spec) == (weights, 0)
    assert storage_bytes("finetune", spec) == (weights, 0)


def test_stored_bytes_match_the_parameters_a_task_owns(
        trained: dict[str, tuple[BaselineResult, dict]]) -> None:
    dense, _ = trained["dense"]
    owned = sum(p.numel() for p in dense.net.task_parameters(1)) * 4
    assert dense.bytes_per_task == owned and dense.shared_bytes == 0
    batche, report = trained["batchensemble"]
    assert batche.bytes_per_task == sum(p.numel() for p in batche.net.task_parameters(1)) * 4
    assert batche.shared_bytes == sum(p.numel() for p in batche.net.shared.parameters()) * 4
    assert report["total_bytes"] == batche.shared_bytes + NUM_TASKS * batche.bytes_per_task
    psp, _ = trained["psp"]
    assert psp.bytes_per_task == 0
    assert psp.net.state_dict().keys() == {f"shared.{i}.weight" for i in range(2)}


# ------------------------------------------------------------------ forward math
def test_batchensemble_forward_is_the_rank_one_scaled_network() -> None:
    net = build_baseline("batchensemble", _spec())
    assert isinstance(net, BatchEnsembleNet)
    net.add_task(0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in [*net.fast_r["0"], *net.fast_s["0"]]:
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(6, 1, SIDE, SIDE, generator=g)
    h = x.flatten(1)
    for i, (layer, r, s) in enumerate(zip(net.shared, net.fast_r["0"], net.fast_s["0"])):
        h = h @ (layer.weight * torch.outer(r, s)).T  # W_t = W * (r s^T)
        h = torch.relu(h) if i == 0 else h
    torch.testing.assert_close(net(x, 0), h)


def test_psp_forward_multiplies_each_layer_input_by_its_context() -> None:
    net = build_baseline("psp", _spec())
    assert isinstance(net, PSPNet)
    net.add_task(2)
    x = torch.randn(6, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(5))
    h = x.flatten(1)
    for i, layer in enumerate(net.shared):
        h = (h * psp_context(0, 2, i, layer.in_features)) @ layer.weight.T  # y = W (x * c_t)
        h = torch.relu(h) if i == 0 else h
    torch.testing.assert_close(net(x, 2), h)


def test_psp_contexts_are_signs_reproducible_from_the_seed() -> None:
    c = psp_context(7, 3, 0, 784)
    assert set(c.unique().tolist()) == {-1.0, 1.0}
    assert c.dtype == torch.float32 and c.shape == (784,)
    assert torch.equal(c, psp_context(7, 3, 0, 784))
    # Binomial(784, 1/2): mean 392, std 14; 5 std either way never fails by chance in practice.
    assert abs(int((c > 0).sum()) - 392) < 70
    for other in (psp_context(8, 3, 0, 784), psp_context(7, 4, 0, 784),
                  psp_context(7, 3, 1, 784)):
        assert not torch.equal(c, other)
    net = PSPNet(_spec(seed=7))
    net.add_task(3)
    assert torch.equal(net.context(3, 0), psp_context(7, 3, 0, SIDE * SIDE))
    assert torch.equal(net.context(3, 1), psp_context(7, 3, 1, 64))


# ------------------------------------------------------------------ training
def test_dense_learns_every_task_and_forgets_nothing(
        trained: dict[str, tuple[BaselineResult, dict]]) -> None:
    _, report = trained["dense"]
    for row in report["tasks"]:
        assert row["accuracy"] > 0.9  # measured 0.97-0.99; chance is 0.25
        assert row["accuracy"] == row["accuracy_when_learned"]  # its weights are its own


def test_dense_is_the_protocol_supsup_trains_with(tasks: PermutedTasks) -> None:
    """Same init keys, optimiser and batch stream: a hand-written loop gives the same weights."""
    config = TrainConfig(steps=15, batch_size=32, optimizer="rmsprop", lr=1e-3, seed=4)
    result = train_baseline("dense", _spec(), tasks, [1], config)
    weights = [torch.randn(o, i, generator=generator(0, "dense", 1, k)) * math.sqrt(2 / i)
               for k, (o, i) in enumerate(layer_shapes(_spec()))]
    for w in weights:
        w.requires_grad_(True)
    opt = torch.optim.RMSprop(weights, lr=1e-3)
    for x, y in tasks.train_batches([1], 32, 15, seed=4):
        h = torch.relu(x[0].flatten(1) @ weights[0].T) @ weights[1].T
        loss = torch.nn.functional.cross_entropy(h, y[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for got, want in zip(result.net.task_parameters(1), weights):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_dense_task_does_not_depend_on_the_others(
        tasks: PermutedTasks, trained: dict[str, tuple[BaselineResult, dict]]) -> None:
    alone = train_baseline("dense", _spec(), tasks, [2, 0], CONFIG)
    together, _ = trained["dense"]
    for a, b in zip(alone.net.task_parameters(0), together.net.task_parameters(0)):
        assert torch.equal(a, b)


def test_batchensemble_freezes_shared_weights_after_the_first_task(
        tasks: PermutedTasks, trained: dict[str, tuple[BaselineResult, dict]]) -> None:
    first_only = train_baseline("batchensemble", _spec(), tasks, [0], CONFIG)
    after_all, report = trained["batchensemble"]
    for a, b in zip(first_only.net.shared.parameters(), after_all.net.shared.parameters()):
        assert torch.equal(a, b)
        assert not b.requires_grad
    for a, b in zip(first_only.net.task_parameters(0), after_all.net.task_parameters(0)):
        assert torch.equal(a, b)
    rows = {r["task_id"]: r for r in report["tasks"]}
    assert rows[0]["accuracy"] > 0.9  # the first task trains W as well
    for t in (1, 2):
        # Only rank-one fast weights learn: measured 0.60-0.74 over five seeds; chance 0.25.
        assert rows[t]["accuracy"] > CHANCE + 0.2
    for row in rows.values():
        assert row["accuracy"] == row["accuracy_when_learned"]


def test_batchensemble_fast_weights_learn_at_their_own_rate(tasks: PermutedTasks) -> None:
    """At SupSup's small RMSprop rate the rank-one fast weights of later tasks barely move;
    with a rate of their own they learn, while the shared weights keep the shared rate."""
    slow = TrainConfig(steps=200, batch_size=32, optimizer="rmsprop", lr=1e-4, log_every=50)

    def later_tasks(fast_lr: float | None) -> float:
        result = train_baseline("batchensemble", _spec(), tasks, range(NUM_TASKS), slow,
                                fast_lr=fast_lr)
        rows = evaluate_baseline(result, tasks)["tasks"]
        return sum(r["accuracy"] for r in rows if r["task_id"] > 0) / (NUM_TASKS - 1)

    shared_rate, own_rate = later_tasks(None), later_tasks(1e-2)
    assert own_rate > shared_rate + 0.15, (shared_rate, own_rate)
    net = BatchEnsembleNet(_spec())
    net.add_task(0)
    shared, fast = net.param_groups(0, 1e-2)
    assert "lr" not in shared and fast["lr"] == 1e-2  # the shared weights: the optimiser's rate
    assert len(fast["params"]) == 2 * len(net.shapes)


def test_psp_forgets_less_than_plain_fine_tuning(
        trained: dict[str, tuple[BaselineResult, dict]]) -> None:
    _, psp = trained["psp"]
    _, finetune = trained["finetune"]
    for report in (psp, finetune):
        assert [r["task_id"] for r in report["tasks"]] == [0, 1, 2]
        assert set(report["accuracy"]) == {"0", "1", "2"}
        assert report["tasks"][0]["accuracy_when_learned"] > 0.9
    # Measured over five seeds: fine-tuning loses 0.24-0.34 per task on average, PSP 0.00-0.02.
    assert finetune["forgetting"] > 0.15
    assert psp["forgetting"] < finetune["forgetting"] - 0.1
    assert psp["accuracy"]["0"] > finetune["accuracy"]["0"] + 0.2
    assert psp["mean_accuracy"] > 0.85


def test_report_fields(tasks: PermutedTasks,
                       trained: dict[str, tuple[BaselineResult, dict]]) -> None:
    result, report = trained["psp"]
    weighted = sum(r["accuracy"] * r["examples"] for r in report["tasks"]) / (3 * 256)
    assert report["mean_accuracy"] == pytest.approx(weighted)
    assert report["kind"] == "psp" and report["num_tasks"] == 3
    assert report["network"] == _spec().to_dict()
    assert report["train_seconds"] > 0 and all(r["steps"] == 200 for r in report["tasks"])
    subset = evaluate_baseline(result, tasks, [2])
    assert subset["accuracy"] == {"2": report["accuracy"]["2"]}


def test_callback_sees_each_task_to_its_end(tasks: PermutedTasks) -> None:
    seen: list[TrainProgress] = []
    config = TrainConfig(steps=10, batch_size=32, log_every=4)
    train_baseline("psp", _spec(), tasks, [1, 0], config, callback=seen.append)
    assert [(p.task_ids, p.step) for p in seen] == [
        ([1], 4), ([1], 8), ([1], 10), ([0], 4), ([0], 8), ([0], 10)]


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("name", ["conv", "resnet18"])
def test_non_fc_network_is_refused(name: str, tasks: PermutedTasks) -> None:
    spec = NetworkSpec(name=name, num_outputs=8, num_classes=CLASSES, input_shape=(1, SIDE, SIDE))
    with pytest.raises(ValueError, match=f"fc-family network .* got network '{name}'"):
        train_baseline("dense", spec, tasks, [0], CONFIG)
    with pytest.raises(ValueError, match="fc-family"):
        storage_bytes("psp", spec)


def test_bad_input_is_named(tasks: PermutedTasks,
                            trained: dict[str, tuple[BaselineResult, dict]]) -> None:
    with pytest.raises(ValueError, match="unknown baseline 'ewc'"):
        train_baseline("ewc", _spec(), tasks, [0], CONFIG)
    with pytest.raises(ValueError, match="expects inputs"):
        train_baseline("dense", _spec(input_shape=(1, 28, 28)), tasks, [0], CONFIG)
    with pytest.raises(ValueError, match="task 5 is outside"):
        train_baseline("dense", _spec(), tasks, [5], CONFIG)
    with pytest.raises(ValueError, match="task_ids is empty"):
        train_baseline("dense", _spec(), tasks, [], CONFIG)
    with pytest.raises(ValueError, match="repeat a task"):
        train_baseline("psp", _spec(), tasks, [0, 0], CONFIG)
    result, _ = trained["batchensemble"]
    small = PermutedTasks(_blobs(512, 0), _blobs(256, 1), 5, seed=0)
    with pytest.raises(KeyError, match="tasks \\[4\\] were not trained"):
        evaluate_baseline(result, small, [4])
    with pytest.raises(KeyError, match="task 3 was not trained"):
        result.net(torch.zeros(1, 1, SIDE, SIDE), 3)
