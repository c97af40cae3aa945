"""supsup.networks: the seed alone rebuilds a bit-identical network, every catalog entry runs in
single and group mode, and bad specs or inputs fail with messages that say what to do."""

from __future__ import annotations

import json
import math

import pytest
import torch

from supsup.bank import MaskBank
from supsup.binding import use_task, use_tasks
from supsup.masks import packed_size
from supsup.networks import NETWORKS, NetworkSpec, SupermaskNet, build_network
from supsup.scores import TaskScores

# One small spec per catalog entry (resnet50 at 64x64 so that the test stays quick).
CATALOG: dict[str, NetworkSpec] = {
    "fc": NetworkSpec(name="fc", num_outputs=13, num_classes=10),
    "fc1024": NetworkSpec(name="fc1024", num_outputs=13, num_classes=10),
    "lenet": NetworkSpec(name="lenet", num_outputs=13, num_classes=10),
    "conv": NetworkSpec(name="conv", num_outputs=13, num_classes=10, width=8),
    "resnet18": NetworkSpec(
        name="resnet18", num_outputs=13, num_classes=10, input_shape=(3, 32, 32), width=8
    ),
    "resnet50": NetworkSpec(
        name="resnet50", num_outputs=10, num_classes=10, input_shape=(3, 64, 64)
    ),
}
BATCH = 2


def _weights(net: SupermaskNet) -> dict[str, torch.Tensor]:
    return {k: m.weight.clone() for k, m in net.masked_layers().items()}


def _random_bank(net: SupermaskNet, task_ids: list[int], seed: int = 0) -> MaskBank:
    """Random half-density masks and unit BN statistics: enough to run any forward."""
    g = torch.Generator().manual_seed(seed)
    t = len(task_ids)
    bank = MaskBank(net.layer_shapes(), net.bn_features())
    bank.extend_packed(
        task_ids,
        {
            k: torch.randint(0, 256, (t, packed_size(math.prod(s))), dtype=torch.uint8, generator=g)
            for k, s in net.layer_shapes().items()
        },
        {
            k: torch.stack([torch.zeros(t, c), torch.ones(t, c)], 1)
            for k, c in net.bn_features().items()
        },
    )
    return bank


def test_catalog_covers_every_network() -> None:
    assert set(CATALOG) == set(NETWORKS)


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_every_catalog_entry_runs_single_and_group(name: str) -> None:
    spec = CATALOG[name]
    net = build_network(spec).eval()
    assert net.spec == spec
    assert list(net.parameters()) == []
    bank = _random_bank(net, [0, 1])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, *spec.input_shape, generator=g)
    xg = torch.randn(2, BATCH, *spec.input_shape, generator=g)
    net.check_input(x)
    net.check_input(xg, group=2)
    with torch.no_grad():
        with use_task(net, bank, 1):
            single = net(x)
        with use_tasks(net, bank, [0, 1]):
            grouped = net(xg)
    assert single.shape == (BATCH, spec.num_outputs)
    assert grouped.shape == (2, BATCH, spec.num_outputs)
    assert bool(torch.isfinite(single).all()) and bool(torch.isfinite(grouped).all())


def test_same_seed_rebuilds_bit_identical_network() -> None:
    names = ["lenet", "conv", "resnet18", "fc"]
    specs = [NetworkSpec(**{**CATALOG[name].to_dict(), "seed": 3}) for name in names]
    first = [_weights(build_network(spec)) for spec in specs]
    # Everything that could move a shared random stream, in between the two builds: the global
    # generator, other networks, and score tensors for many tasks.
    torch.manual_seed(1234)
    torch.rand(1000)
    build_network(NetworkSpec(name="lenet", seed=4))
    other = build_network(NetworkSpec(name="conv", seed=3, width=4))
    TaskScores(other, list(range(50)))
    TaskScores(build_network(NetworkSpec(name="lenet", seed=3)), list(range(20)))
    for spec, weights in zip(reversed(specs), reversed(first)):  # rebuilt in another order
        again = _weights(build_network(spec))
        assert list(weights) == list(again)
        for key in weights:
            assert torch.equal(weights[key], again[key]), (spec.name, key)


def test_weights_do_not_depend_on_global_seed() -> None:
    torch.manual_seed(0)
    a = _weights(build_network(name="lenet", seed=9))
    torch.manual_seed(1)
    b = _weights(build_network(name="lenet", seed=9))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_different_seeds_differ() -> None:
    a = _weights(build_network(name="lenet", seed=0))
    b = _weights(build_network(name="lenet", seed=1))
    for key in a:
        assert not torch.equal(a[key], b[key]), key


def test_lenet_layout() -> None:
    net = build_network(name="lenet", num_outputs=500, num_classes=10)
    assert list(net.layer_shapes().values()) == [(300, 784), (100, 300), (500, 100)]
    assert net.num_weights == 784 * 300 + 300 * 100 + 100 * 500
    assert net.spec.superfluous == 490
    assert net.bn_features() == {}


def test_fc_hidden_override() -> None:
    net = build_network(
        name="fc", hidden=(64, 32), input_shape=(1, 8, 8), num_outputs=5, num_classes=5
    )
    assert list(net.layer_shapes().values()) == [(64, 64), (32, 64), (5, 32)]


def test_build_network_replaces_fields_of_a_spec() -> None:
    spec = NetworkSpec(name="lenet", seed=0)
    net = build_network(spec, seed=5)
    assert net.spec.seed == 5 and spec.seed == 0
    expected = _weights(build_network(name="lenet", seed=5))
    assert all(torch.equal(w, expected[k]) for k, w in _weights(net).items())


def test_unknown_network_raises_naming_it_and_the_catalog() -> None:
    with pytest.raises(ValueError, match="unknown network 'vgg16'") as info:
        build_network(name="vgg16")
    for name in NETWORKS:
        assert repr(name) in str(info.value)


@pytest.mark.parametrize(("outputs", "classes"), [(5, 10), (0, 0), (10, 0)])
def test_bad_output_counts_raise(outputs: int, classes: int) -> None:
    with pytest.raises(ValueError, match="num_outputs"):
        NetworkSpec(name="lenet", num_outputs=outputs, num_classes=classes)


def test_check_input_names_the_expected_shape() -> None:
    net = build_network(name="lenet")
    with pytest.raises(ValueError, match=r"expects input \(B, 1, 28, 28\), got \(2, 3, 28, 28\)"):
        net.check_input(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"expects input \(B, 1, 28, 28\)"):
        net.check_input(torch.zeros(2, 784))
    with pytest.raises(ValueError, match=r"expects input \(G=4, B, 1, 28, 28\)"):
        net.check_input(torch.zeros(2, 1, 28, 28), group=4)


def test_spec_dict_round_trip() -> None:
    spec = NetworkSpec(
        name="fc",
        num_outputs=500,
        num_classes=10,
        seed=7,
        input_shape=(1, 28, 28),
        hidden=(64, 32),
        width=0,
    )
    data = spec.to_dict()
    assert data["hidden"] == [64, 32] and data["input_shape"] == [1, 28, 28]
    restored = NetworkSpec.from_dict(json.loads(json.dumps(data)))
    assert restored == spec
    assert restored.input_shape == (1, 28, 28) and restored.hidden == (64, 32)


def test_spec_from_dict_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError, match=r"unknown network spec fields \['depth'\]"):
        NetworkSpec.from_dict({"name": "lenet", "depth": 3})


def test_global_pooling_is_adaptive_pooling_without_atomics() -> None:
    """Same values as AdaptiveAvgPool2d(1); resnets use it so GPU backward passes are exact."""
    from supsup.networks import GlobalAvgPool

    x = torch.randn(3, 5, 7, 6)
    assert torch.allclose(GlobalAvgPool()(x), torch.nn.AdaptiveAvgPool2d(1)(x), atol=1e-6)
    net = build_network(name="resnet18", num_outputs=10, input_shape=(3, 32, 32), width=4)
    kinds = {type(m).__name__ for m in net.modules()}
    assert "GlobalAvgPool" in kinds and "AdaptiveAvgPool2d" not in kinds
