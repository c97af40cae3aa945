"""supsup.convert: a torchvision model becomes a supermask model with no trainable layer left,
runs in single and group mode, and rejects layers it cannot mask faithfully."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from supsup.bank import MaskBank
from supsup.binding import use_task, use_tasks
from supsup.convert import convert, convert_modules
from supsup.layers import MaskedConv2d, MaskedLinear, TaskBatchNorm2d
from supsup.masks import packed_size
from supsup.networks import NetworkSpec, SupermaskNet

SPEC = NetworkSpec(name="resnet18", num_outputs=10, input_shape=(3, 32, 32), seed=2)
BATCH = 2


def _converted() -> SupermaskNet:
    return convert(resnet18(weights=None, num_classes=10), SPEC)


def _random_bank(net: SupermaskNet, task_ids: list[int]) -> MaskBank:
    g = torch.Generator().manual_seed(0)
    t = len(task_ids)
    bank = MaskBank(net.layer_shapes(), net.bn_features())
    bank.extend_packed(
        task_ids,
        {
            k: torch.randint(0, 256, (t, packed_size(math.prod(s))), dtype=torch.uint8, generator=g)
            for k, s in net.layer_shapes().items()
        },
        {
            k: torch.stack(
                [torch.rand(t, c, generator=g) - 0.5, torch.rand(t, c, generator=g) + 0.5], 1
            )
            for k, c in net.bn_features().items()
        },
    )
    return bank


def test_every_linear_conv_and_batchnorm_is_swapped() -> None:
    reference = resnet18(weights=None, num_classes=10)  # convert() swaps modules in place
    net = convert(resnet18(weights=None, num_classes=10), SPEC)
    kinds = (nn.Linear, nn.Conv2d, nn.BatchNorm2d)
    assert not [name for name, m in net.named_modules() if isinstance(m, kinds)]
    assert list(net.parameters()) == []
    originals = {name: m for name, m in reference.named_modules() if isinstance(m, kinds)}
    swapped = dict(net.body.named_modules())
    assert len(originals) == 21 + 20  # 20 convs + fc, 20 BNs
    for name, old in originals.items():
        new = swapped[name]
        if isinstance(old, nn.BatchNorm2d):
            assert isinstance(new, TaskBatchNorm2d) and new.num_features == old.num_features
            continue
        assert isinstance(new, MaskedLinear if isinstance(old, nn.Linear) else MaskedConv2d)
        assert new.shape == tuple(old.weight.shape)
        if isinstance(old, nn.Conv2d):
            assert (new.stride, new.padding) == (old.stride, old.padding)
    assert set(net.bn_features()) == {
        n for n, m in originals.items() if isinstance(m, nn.BatchNorm2d)
    }


def test_converted_weights_come_from_the_spec_seed() -> None:
    torch.manual_seed(0)
    a = _converted()
    torch.manual_seed(1)  # torchvision's own initialisation differs and must not matter
    b = _converted()
    for key, layer in a.masked_layers().items():
        assert torch.equal(layer.weight, b.masked_layers()[key].weight)
        c = math.sqrt(2) / math.sqrt(layer.fan_in)
        assert bool((layer.weight.abs() == torch.tensor(c, dtype=torch.float32)).all())


def test_converted_resnet18_runs_single_and_group() -> None:
    net = _converted()
    g = torch.Generator().manual_seed(3)
    xg = torch.randn(2, BATCH, 3, 32, 32, generator=g)
    bank = _random_bank(net, [0, 1])
    net.eval()
    with torch.no_grad():
        with use_tasks(net, bank, [0, 1]):
            grouped = net(xg)
        assert grouped.shape == (2, BATCH, 10)
        for t in range(2):
            with use_task(net, bank, t):
                single = net(xg[t])
            assert single.shape == (BATCH, 10)
            torch.testing.assert_close(grouped[t], single, rtol=1e-4, atol=1e-4)


def test_grouped_conv_raises() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Sequential(nn.Conv2d(8, 8, 3, groups=2)))
    with pytest.raises(ValueError, match=r"grouped convolutions \(groups=2\) are not supported"):
        convert_modules(model)


def test_padding_mode_raises() -> None:
    with pytest.raises(ValueError, match="padding_mode 'reflect' is not supported"):
        convert_modules(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")))


def test_convert_keeps_other_modules() -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Dropout(0.0), nn.Linear(5, 3))
    net = convert(model, NetworkSpec(name="fc", num_outputs=3, num_classes=3))
    assert isinstance(net.body[1], nn.ReLU) and isinstance(net.body[2], nn.Dropout)
    assert [m.layer_index for m in net.masked_layers().values()] == [0, 1]
