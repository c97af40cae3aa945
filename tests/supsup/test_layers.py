"""supsup.layers: frozen signed-constant weights, gradients only to scores, group mode equal to
the single-task layer, and a clear error when no task is bound."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from supsup.bank import MaskBank
from supsup.binding import use_scores, use_task
from supsup.layers import GAIN_RELU, MaskedConv2d, MaskedLayer, MaskedLinear, TaskBatchNorm2d
from supsup.networks import NetworkSpec, SupermaskNet
from supsup.scores import TaskScores

# name -> (layer factory, input shape of one example)
LAYERS: dict[str, tuple[Callable[[], MaskedLayer], tuple[int, ...]]] = {
    "linear": (lambda: MaskedLinear(20, 7), (20,)),
    "conv": (lambda: MaskedConv2d(3, 5, 3, padding=1), (3, 8, 8)),
    "conv_strided": (lambda: MaskedConv2d(3, 4, (3, 2), stride=2, padding=(1, 0)), (3, 9, 7)),
}
RULES = ["threshold", "topk"]
GROUP = 3
BATCH = 4


def _net(layer: nn.Module, seed: int = 0) -> SupermaskNet:
    """A one-layer network: numbers the layer and draws its weights from `seed`."""
    return SupermaskNet(nn.Sequential(layer), NetworkSpec(seed=seed))


def _scores(net: SupermaskNet, rule: str, task_ids: list[int]) -> TaskScores:
    return TaskScores(net, task_ids, rule=rule, density=0.3 if rule == "topk" else None)


def _bank_from(net: SupermaskNet, scores: TaskScores) -> MaskBank:
    bank = MaskBank(net.layer_shapes(), net.bn_features())
    for task_id, (masks, stats) in scores.export().items():
        bank.add(task_id, masks, stats)
    return bank


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_weights_never_get_a_gradient_scores_do(kind: str, rule: str) -> None:
    make, in_shape = LAYERS[kind]
    net = _net(make())
    layer = net.body[0]
    assert not layer.weight.requires_grad
    assert list(net.parameters()) == []
    assert "body.fc1.weight" not in net.state_dict()  # rebuilt from the seed, never stored
    scores = _scores(net, rule, [0, 1])
    x = torch.randn(2, BATCH, *in_shape, generator=torch.Generator().manual_seed(1))
    with use_scores(net, scores):
        net(x).square().sum().backward()
    assert layer.weight.grad is None
    assert not layer.weight.requires_grad
    (param,) = scores.parameters()
    assert param.grad is not None
    assert param.grad.shape == (2, *layer.shape)
    assert bool(param.grad.abs().sum() > 0)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_weights_are_signed_kaiming_constant(kind: str) -> None:
    make, _ = LAYERS[kind]
    layer = _net(make(), seed=5).body[0]
    c = torch.tensor(math.sqrt(2.0) / math.sqrt(layer.fan_in), dtype=torch.float32)
    assert GAIN_RELU == math.sqrt(2.0)
    assert bool((layer.weight.abs() == c).all())
    assert bool((layer.weight > 0).any()) and bool((layer.weight < 0).any())


def test_fan_in_of_each_layer_type() -> None:
    assert MaskedLinear(20, 7).fan_in == 20
    assert MaskedConv2d(3, 5, 3).fan_in == 27
    assert MaskedConv2d(3, 4, (3, 2)).fan_in == 18


@pytest.mark.parametrize(
    ("layer", "n"), [(MaskedLinear(784, 300), 235200), (MaskedConv2d(32, 64, 3), 18432)]
)
def test_signs_are_balanced(layer: MaskedLayer, n: int) -> None:
    weight = _net(layer, seed=11).body[0].weight
    assert weight.numel() == n
    positive = float((weight > 0).float().mean())
    # Fair coin: the fraction has standard deviation 0.5 / sqrt(n); allow 5 of them
    # (two-sided probability of a false failure ~6e-7).
    tolerance = 5 * 0.5 / math.sqrt(n)
    assert abs(positive - 0.5) < tolerance


def test_layer_index_keys_the_weights() -> None:
    net = SupermaskNet(
        nn.Sequential(MaskedLinear(30, 30), MaskedLinear(30, 30)), NetworkSpec(seed=2)
    )
    a, b = net.body[0], net.body[1]
    assert (a.layer_index, b.layer_index) == (0, 1)
    assert not torch.equal(a.weight, b.weight)
    assert torch.equal(a.weight, _net(MaskedLinear(30, 30), seed=2).body[0].weight)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_group_mode_equals_single_task_outputs(kind: str, rule: str) -> None:
    make, in_shape = LAYERS[kind]
    net = _net(make(), seed=3)
    task_ids = [4, 0, 9]
    scores = _scores(net, rule, task_ids)
    bank = _bank_from(net, scores)
    x = torch.randn(GROUP, BATCH, *in_shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), use_scores(net, scores):
        grouped = net(x)
    for g, task_id in enumerate(task_ids):
        with torch.no_grad(), use_task(net, bank, task_id):
            single = net(x[g])
        if kind == "linear":
            assert grouped.shape == (GROUP, BATCH, *single.shape[1:])
            part = grouped[g]
        else:  # conv folds the group into channels: (B, G * C_out, H, W)
            c_out = single.shape[1]
            assert grouped.shape == (BATCH, GROUP * c_out, *single.shape[2:])
            part = grouped[:, g * c_out : (g + 1) * c_out]
        torch.testing.assert_close(part, single, rtol=1e-5, atol=1e-6)


def test_group_linear_accepts_flattened_folded_features() -> None:
    net = _net(MaskedLinear(6, 2))
    scores = _scores(net, "threshold", [0, 1])
    x = torch.randn(2, BATCH, 6)
    with torch.no_grad(), use_scores(net, scores):
        direct = net(x)
        folded = net(x.transpose(0, 1).reshape(BATCH, 12))  # (B, G * in) after a flatten
    assert torch.equal(direct, folded)


def test_group_mismatch_raises() -> None:
    net = _net(MaskedLinear(6, 2))
    scores = _scores(net, "threshold", [0, 1])
    with use_scores(net, scores), pytest.raises(ValueError, match=r"expected input \(G=2, B, 6\)"):
        net(torch.randn(3, BATCH, 6))
    conv = _net(MaskedConv2d(3, 2, 3))
    conv_scores = _scores(conv, "threshold", [0, 1])
    with use_scores(conv, conv_scores), pytest.raises(ValueError, match="input group 3"):
        conv(torch.randn(3, BATCH, 3, 5, 5))


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_layer_without_binding_raises(kind: str) -> None:
    make, in_shape = LAYERS[kind]
    net = _net(make())
    with pytest.raises(RuntimeError, match="use_task"):
        net(torch.randn(BATCH, *in_shape))
    with pytest.raises(RuntimeError, match="layer 0 has no task bound"):  # names the layer
        net(torch.randn(BATCH, *in_shape))


def test_batchnorm_without_binding_raises() -> None:
    bn = TaskBatchNorm2d(3)
    with pytest.raises(RuntimeError, match="use_task"):
        bn(torch.randn(2, 3, 4, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cpu_bank_serves_a_network_on_the_gpu() -> None:
    """Masks and per-task BN statistics of a CPU bank follow the input to the GPU, and give the
    CPU result (to float tolerance: the kernels differ)."""
    from supsup.networks import build_network

    net = build_network(name="conv", input_shape=(1, 28, 28), width=4, num_outputs=10).eval()
    scores = TaskScores(net, [0, 1])
    bank = _bank_from(net, scores)
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with use_task(net, bank, 1), torch.no_grad():
        expected = net(x)
    net.cuda()
    with use_task(net, bank, 1), torch.no_grad():
        got = net(x.cuda()).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
