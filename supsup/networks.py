"""The catalog of base networks and `build_network(spec)`.

Every network is a fixed random body of masked layers (Section 3.1) with `num_outputs` outputs, of
which the first `num_classes` carry labels and the rest are superfluous neurons (Section 3.6).
Only the spec and its seed are ever stored: `build_network(spec)` rebuilds the same weights bit for
bit in any process, whatever else was built before.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from supsup.layers import (
    InputFlatten,
    MaskedConv2d,
    MaskedLayer,
    MaskedLinear,
    TaskBatchNorm2d,
    convert_modules,
)


@dataclass(frozen=True)
class NetworkSpec:
    """Everything that determines a base network. `hidden` is used by the fc family."""

    name: str = "lenet"
    num_outputs: int = 10
    num_classes: int = 10
    seed: int = 0
    input_shape: tuple[int, ...] = (1, 28, 28)
    hidden: tuple[int, ...] = ()
    width: int = 0  # base channels of conv nets; 0 = the catalog's default

    def __post_init__(self) -> None:
        if self.name not in NETWORKS:
            raise ValueError(f"unknown network {self.name!r}; choose one of {sorted(NETWORKS)}")
        if self.num_classes < 1 or self.num_outputs < self.num_classes:
            raise ValueError(
                f"num_outputs ({self.num_outputs}) must be >= num_classes ({self.num_classes}) >= 1"
            )
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        object.__setattr__(self, "hidden", tuple(int(d) for d in self.hidden))

    @property
    def superfluous(self) -> int:
        """Extra outputs beyond the labelled classes."""
        return self.num_outputs - self.num_classes

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetworkSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown network spec fields {sorted(unknown)}")
        return cls(**data)


class SupermaskNet(nn.Module):
    """A base network with masked layers numbered in module order and named by their path.

    The masks, BN statistics and alphas it runs with come from the binding installed by
    `supsup.binding` context managers; the module itself holds only frozen weights.
    """

    def __init__(self, body: nn.Module, spec: NetworkSpec) -> None:
        super().__init__()
        self.body = body
        self.spec = spec
        index = 0
        for name, module in body.named_modules():
            if isinstance(module, (MaskedLayer, TaskBatchNorm2d)):
                module.key = name
            if isinstance(module, MaskedLayer):
                module.draw_weights(spec.seed, index)
                index += 1
        if index == 0:
            raise ValueError(f"network {spec.name!r} has no masked layer")

    def masked_layers(self) -> dict[str, MaskedLayer]:
        return {m.key: m for m in self.body.modules() if isinstance(m, MaskedLayer)}

    def bn_layers(self) -> dict[str, TaskBatchNorm2d]:
        return {m.key: m for m in self.body.modules() if isinstance(m, TaskBatchNorm2d)}

    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: m.shape for k, m in self.masked_layers().items()}

    def bn_features(self) -> dict[str, int]:
        return {k: m.num_features for k, m in self.bn_layers().items()}

    @property
    def num_weights(self) -> int:
        return sum(m.numel for m in self.masked_layers().values())

    def check_input(self, x: torch.Tensor, group: int | None = None) -> None:
        """ValueError naming the expected shape when `x` does not fit the network."""
        lead = 1 if group is None else 2
        want = tuple(self.spec.input_shape)
        if x.dim() != lead + len(want) or tuple(x.shape[lead:]) != want:
            prefix = "(B, " if group is None else f"(G={group}, B, "
            raise ValueError(
                f"network {self.spec.name!r} expects input {prefix}{', '.join(map(str, want))}), "
                f"got {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def extra_repr(self) -> str:
        return f"spec={self.spec}"


def _fc(spec: NetworkSpec, default_hidden: tuple[int, ...]) -> nn.Module:
    sizes = [int(torch.tensor(spec.input_shape).prod()), *(spec.hidden or default_hidden)]
    layers: dict[str, nn.Module] = {"flatten": InputFlatten(len(spec.input_shape))}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        layers[f"fc{i}"] = MaskedLinear(a, b)
        layers[f"relu{i}"] = nn.ReLU()
    layers[f"fc{len(sizes)}"] = MaskedLinear(sizes[-1], spec.num_outputs)
    return nn.Sequential(OrderedDict(layers))


def _conv_bn(n: int, c_in: int, c_out: int, k: int, stride: int = 1) -> dict[str, nn.Module]:
    """conv{n} and bn{n}: layers are named, so stored masks say which parameter they mask."""
    return {f"conv{n}": MaskedConv2d(c_in, c_out, k, stride=stride, padding=k // 2),
            f"bn{n}": TaskBatchNorm2d(c_out)}


def _small_conv(spec: NetworkSpec) -> nn.Module:
    """Two conv blocks and two linear layers: a quick conv net for MNIST/CIFAR-sized inputs."""
    c, h, w = spec.input_shape
    width = spec.width or 32
    feat = 2 * width * (h // 4) * (w // 4)
    return nn.Sequential(OrderedDict({
        **_conv_bn(1, c, width, 3), "relu1": nn.ReLU(), "pool1": nn.MaxPool2d(2),
        **_conv_bn(2, width, 2 * width, 3), "relu2": nn.ReLU(), "pool2": nn.MaxPool2d(2),
        "flatten": nn.Flatten(), "fc1": MaskedLinear(feat, 256), "relu3": nn.ReLU(),
        "fc2": MaskedLinear(256, spec.num_outputs),
    }))


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.main = nn.Sequential(OrderedDict({**_conv_bn(1, c_in, c_out, 3, stride),
                                               "relu": nn.ReLU(), **_conv_bn(2, c_out, c_out, 3)}))
        self.shortcut = (
            nn.Sequential(OrderedDict({"conv": MaskedConv2d(c_in, c_out, 1, stride=stride),
                                       "bn": TaskBatchNorm2d(c_out)}))
            if stride != 1 or c_in != c_out else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.main(x) + self.shortcut(x))


class GlobalAvgPool(nn.Module):
    """(B, C, H, W) -> (B, C, 1, 1) by a mean: the values of AdaptiveAvgPool2d(1), with a
    backward pass that is a broadcast. CUDA's adaptive pooling backward adds with atomics, so its
    gradients (and the masks trained through it) could differ from run to run."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1), keepdim=True)


def _resnet18(spec: NetworkSpec) -> nn.Module:
    """ResNet-18 for 32x32 inputs with `width` base channels (the paper's 20 for SplitCIFAR100)."""
    width = spec.width or 20
    layers: dict[str, nn.Module] = {**_conv_bn(1, spec.input_shape[0], width, 3),
                                    "relu": nn.ReLU()}
    c_in = width
    for stage, mult in enumerate((1, 2, 4, 8)):
        c_out = width * mult
        for block in range(2):
            layers[f"layer{stage + 1}_{block}"] = _BasicBlock(
                c_in, c_out, 2 if stage > 0 and block == 0 else 1)
            c_in = c_out
    layers.update(pool=GlobalAvgPool(), flatten=nn.Flatten(),
                  fc=MaskedLinear(c_in, spec.num_outputs))
    return nn.Sequential(OrderedDict(layers))


def _resnet50(spec: NetworkSpec) -> nn.Module:
    """torchvision's ResNet-50 (ImageNet layout) turned into a supermask body."""
    from torchvision.models import resnet50  # torch's own vision package, loaded only here

    body = resnet50(weights=None, num_classes=spec.num_outputs)
    body.avgpool = GlobalAvgPool()  # deterministic backward on GPUs (see GlobalAvgPool)
    return convert_modules(body)


NETWORKS: dict[str, Callable[[NetworkSpec], nn.Module]] = {
    "fc": lambda spec: _fc(spec, (1024, 1024)),
    "fc1024": lambda spec: _fc(spec, (1024, 1024)),
    "lenet": lambda spec: _fc(spec, (300, 100)),
    "conv": _small_conv,
    "resnet18": _resnet18,
    "resnet50": _resnet50,
}


def build_network(spec: NetworkSpec | None = None, **kwargs: Any) -> SupermaskNet:
    """Build the base network of `spec` (or `NetworkSpec(**kwargs)`)."""
    if spec is None:
        spec = NetworkSpec(**kwargs)
    elif kwargs:
        spec = dataclasses.replace(spec, **kwargs)
    return SupermaskNet(NETWORKS[spec.name](spec), spec)


def iter_masked(net: nn.Module) -> Iterator[tuple[str, MaskedLayer]]:
    """(key, layer) for every masked layer in module order."""
    for m in net.modules():
        if isinstance(m, MaskedLayer):
            yield m.key, m

