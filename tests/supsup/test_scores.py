"""supsup.scores: a task's initial scores do not depend on its group, the rules give the densities
they promise, and export() hands the bank binary masks and (2, C) BN statistics."""

from __future__ import annotations

import math

import pytest
import torch

from supsup.binding import use_scores
from supsup.masks import erdos_renyi_densities
from supsup.networks import NetworkSpec, SupermaskNet, build_network
from supsup.scores import TaskScores, layer_densities

FC = NetworkSpec(
    name="fc", hidden=(40, 30), input_shape=(1, 6, 6), num_outputs=7, num_classes=5, seed=4
)
CONV = NetworkSpec(
    name="conv", width=4, input_shape=(2, 8, 8), num_outputs=7, num_classes=5, seed=4
)


def _net(spec: NetworkSpec) -> SupermaskNet:
    return build_network(spec)


@pytest.mark.parametrize("rule", ["threshold", "topk"])
@pytest.mark.parametrize("spec", [FC, CONV], ids=["fc", "conv"])
def test_initial_scores_do_not_depend_on_the_group(spec: NetworkSpec, rule: str) -> None:
    net = _net(spec)
    density = 0.2 if rule == "topk" else None
    alone = TaskScores(net, [3], rule=rule, density=density)
    group = TaskScores(net, [1, 3, 5], rule=rule, density=density)
    other_order = TaskScores(net, [5, 3], rule=rule, density=density)
    for name, param in alone.scores.items():
        assert param.shape[0] == 1
        assert torch.equal(param[0], group.scores[name][1])
        assert torch.equal(param[0], other_order.scores[name][1])
        assert not torch.equal(group.scores[name][0], group.scores[name][1])
    for key in alone.keys:
        assert torch.equal(alone.hard_mask(key)[0], group.hard_mask(key)[1])


def test_initial_scores_are_kaiming_uniform() -> None:
    net = _net(FC)
    scores = TaskScores(net, [0, 1])
    for key, layer in net.masked_layers().items():
        s = scores.scores[key.replace(".", "__")].detach()
        bound = 1 / math.sqrt(layer.fan_in)
        assert bool((s.abs() <= bound).all())
        assert float(s.abs().max()) > 0.9 * bound  # spans the interval, not a narrow part of it


def test_threshold_rule_starts_at_density_one_half() -> None:
    net = build_network(name="lenet")  # 266,200 weights
    scores = TaskScores(net, [0, 1, 2])
    # Each weight is kept with probability 1/2 independently: standard deviation
    # 0.5 / sqrt(266200) ~ 0.001; allow 0.01 (10 standard deviations).
    for d in scores.densities_per_task():
        assert abs(d - 0.5) < 0.01
    assert scores.densities == {}


def test_export_gives_binary_masks_and_bn_stats() -> None:
    net = _net(CONV)
    task_ids = [2, 9]
    scores = TaskScores(net, task_ids)
    exported = scores.export()
    assert list(exported) == task_ids
    for masks, stats in exported.values():
        assert {k: tuple(m.shape) for k, m in masks.items()} == net.layer_shapes()
        for m in masks.values():
            assert bool(((m == 0) | (m == 1)).all()) and not m.requires_grad
        assert {k: tuple(s.shape) for k, s in stats.items()} == {
            k: (2, c) for k, c in net.bn_features().items()
        }
        for s in stats.values():  # fresh statistics: mean 0, variance 1
            assert torch.equal(s[0], torch.zeros_like(s[0]))
            assert torch.equal(s[1], torch.ones_like(s[1]))
    for key in scores.keys:
        for i, task_id in enumerate(task_ids):
            assert torch.equal(exported[task_id][0][key], scores.hard_mask(key)[i])


def test_running_stats_move_per_task_and_export_sees_them() -> None:
    net = _net(CONV)
    scores = TaskScores(net, [0, 1])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, *CONV.input_shape, generator=g)
    x[1] = x[1] * 3 + 2  # task 1 sees differently scaled data from task 0
    with torch.no_grad(), use_scores(net, scores):
        net.eval()(x)
        assert all(
            torch.equal(scores.bn_stats(k)[0], torch.zeros(2, c))
            for k, c in net.bn_features().items()
        )  # eval mode leaves them alone
        net.train()(x)
    first = next(iter(net.bn_features()))
    mean, var = scores.bn_stats(first)
    assert not torch.equal(mean[0], mean[1])
    assert not torch.equal(var[0], torch.ones_like(var[0]))
    # The first BN sees the first conv's output of x[t] only: 0.1 * its per-channel batch mean.
    conv_layer = net.masked_layers()["conv1"]
    w = conv_layer.weight * scores.hard_mask("conv1")  # (2, C_out, C_in, 3, 3)
    for t in range(2):
        y = torch.nn.functional.conv2d(x[t], w[t], padding=1)
        torch.testing.assert_close(mean[t], 0.1 * y.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    exported = scores.export()
    for t in range(2):
        assert torch.equal(exported[t][1][first][0], mean[t])
        assert torch.equal(exported[t][1][first][1], var[t])


@pytest.mark.parametrize("scale", [1.0, 4.0, 32.0])
def test_topk_densities_follow_erdos_renyi(scale: float) -> None:
    net = _net(CONV)
    scores = TaskScores(net, [0, 1], rule="topk", erdos_renyi_scale=scale)
    shapes = net.layer_shapes()
    expected = dict(zip(shapes, erdos_renyi_densities(list(shapes.values()), scale)))
    assert scores.densities == expected
    for key, shape in shapes.items():
        n = math.prod(shape)
        kept = scores.hard_mask(key).flatten(1).sum(1)
        assert kept.tolist() == [max(1, round(expected[key] * n))] * 2


def test_topk_density_forms() -> None:
    net = _net(FC)
    keys = list(net.layer_shapes())
    assert layer_densities(net, 0.25) == dict.fromkeys(keys, 0.25)
    per_layer = {k: 0.1 * (i + 1) for i, k in enumerate(keys)}
    assert layer_densities(net, per_layer) == per_layer
    with pytest.raises(ValueError, match="density mapping lacks layers"):
        layer_densities(net, {keys[0]: 0.5})
    with pytest.raises(ValueError, match=rf"density\[{keys[0]}\] must be in"):
        layer_densities(net, {k: 1.5 for k in keys})
    with pytest.raises(ValueError, match="density"):
        TaskScores(net, [0], rule="topk")
    with pytest.raises(ValueError, match="density"):
        TaskScores(net, [0], rule="topk", density=0.0)


@pytest.mark.parametrize("rule", ["threshold", "topk"])
def test_mask_and_effective_weight_agree_with_hard_mask(rule: str) -> None:
    net = _net(FC)
    scores = TaskScores(net, [0, 1], rule=rule, density=0.3 if rule == "topk" else None)
    for key, layer in net.masked_layers().items():
        mask = scores.mask(key)
        assert torch.equal(mask.detach(), scores.hard_mask(key))
        upstream = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1))
        param = scores.scores[key.replace(".", "__")]
        weight = scores.effective_weight(key, layer.weight)
        assert torch.equal(weight.detach(), layer.weight * scores.hard_mask(key))
        (grad_fused,) = torch.autograd.grad((weight * upstream).sum(), param)
        (grad_plain,) = torch.autograd.grad((layer.weight * mask * upstream).sum(), param)
        # Straight-through: dL/dscores = dL/dW_eff * W, whichever way W * M was built (top-k
        # ranks |scores|, so its gradient also carries sign(scores)).
        expected = upstream * layer.weight
        if rule == "topk":
            expected = expected * param.detach().sign()
        torch.testing.assert_close(grad_fused, expected, rtol=0, atol=0)
        torch.testing.assert_close(grad_plain, expected, rtol=0, atol=0)


def test_bad_task_lists_and_rules_raise() -> None:
    net = _net(FC)
    with pytest.raises(ValueError, match="unknown mask rule 'random'"):
        TaskScores(net, [0], rule="random")
    with pytest.raises(ValueError, match="at least one task id"):
        TaskScores(net, [])
    with pytest.raises(ValueError, match=r"duplicate task ids in \[1, 2, 1\]"):
        TaskScores(net, [1, 2, 1])


def test_scores_depend_on_network_seed() -> None:
    a = TaskScores(_net(FC), [0])
    b = TaskScores(build_network(FC, seed=5), [0])
    for name in a.scores:
        assert not torch.equal(a.scores[name], b.scores[name])
