"""Masked layers over frozen signed-constant weights, and per-task non-affine BatchNorm.

Section 3.1 of the paper: the base network is random and never trained; each weight is +c or -c
with c = sqrt(2) / sqrt(fan_in). A layer does not own any task's mask: it asks the binding the
network currently holds (see `supsup.binding`) for one, so the same layer serves a single task, a
vectorised group of tasks, or a superposition of many without any state pushed in from outside.

Shapes in group mode (G tasks trained or evaluated at once):
- linear layers take (G, B, in) and return (G, B, out); a 2-D (B, G * in) input, as produced by a
  flatten after folded conv features, is unfolded first;
- conv layers fold the group into channels: (B, G * C, H, W), and take (G, B, C, H, W) at entry.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from supsup.seeding import generator

GAIN_RELU = math.sqrt(2.0)


def signed_constant(
    shape: tuple[int, ...], fan_in: int, seed: int, layer_index: int
) -> torch.Tensor:
    """Weights of value +-gain/sqrt(fan_in), signs from a generator keyed by (seed, layer_index)."""
    g = generator(seed, "weights", layer_index)
    signs = torch.randint(0, 2, shape, generator=g, dtype=torch.int8) * 2 - 1
    return signs.to(torch.float32) * (GAIN_RELU / math.sqrt(fan_in))


def kaiming_uniform_scores(
    shape: tuple[int, ...], fan_in: int, g: torch.Generator
) -> torch.Tensor:
    """Scores U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the threshold rule starts at density 1/2."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=g) * 2 - 1) * bound


class Binding(Protocol):
    """What a bound layer asks for (bindings live in `supsup.binding`, which imports this module:
    the layers define the question, the bindings answer it). `group` is G in group mode, None for
    a single mask."""

    group: int | None

    def mask(self, layer: MaskedLayer) -> torch.Tensor: ...

    def bn_stats(self, layer: TaskBatchNorm2d) -> tuple[torch.Tensor, torch.Tensor] | None: ...


class _Bound(nn.Module):
    """Base for modules that read the network's current binding."""

    _binding: Binding | None = None
    key: str = ""

    def _require_binding(self) -> Binding:
        if self._binding is None:
            raise RuntimeError(
                f"layer {self.key or type(self).__name__} has no task bound; run the network "
                "inside `use_task(...)`, `use_alphas(...)` or `use_scores(...)`"
            )
        return self._binding


class MaskedLayer(_Bound):
    """Common part of masked Linear and Conv2d: frozen weights that never receive a gradient."""

    weight: torch.Tensor

    def __init__(self, shape: tuple[int, ...], fan_in: int) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.fan_in = fan_in
        self.layer_index = -1
        # Not persistent: the seed rebuilds the weights, so they never travel in a state dict.
        # Zeros until `draw_weights`: the network numbers its layers once it knows them all.
        self.register_buffer("weight", torch.zeros(self.shape), persistent=False)

    def draw_weights(self, seed: int, layer_index: int) -> None:
        """Set the frozen weights from (seed, layer_index) alone."""
        self.layer_index = layer_index
        w = signed_constant(self.shape, self.fan_in, seed, layer_index)
        self.weight.copy_(w.to(self.weight.device))

    @property
    def numel(self) -> int:
        return self.weight.numel()

    def effective_weight(self) -> torch.Tensor:
        """W * M for the bound task(s): (*shape) or (G, *shape)."""
        binding = self._require_binding()
        fused = getattr(binding, "effective_weight", None)
        if fused is not None:  # bindings that can build W * M in one pass (training)
            return fused(self)
        return self.weight * binding.mask(self)


class MaskedLinear(MaskedLayer):
    """y = x (W * M)^T with W fixed; no bias (the paper's networks have none)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__((out_features, in_features), in_features)
        self.in_features = in_features
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.effective_weight()
        if w.dim() == 2:
            return F.linear(x, w)
        groups = w.shape[0]
        if x.dim() == 2:  # (B, G * in) from a flatten of folded conv features
            x = x.reshape(x.shape[0], groups, -1).transpose(0, 1)
        if x.shape[0] != groups or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self.key}: expected input (G={groups}, B, {self.in_features}), "
                f"got {tuple(x.shape)}"
            )
        # (W x^T)^T rather than x W^T: the weight gradient then comes out in W's own layout,
        # so the straight-through multiply by W needs no copy in the backward pass.
        return torch.bmm(w, x.transpose(1, 2)).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, layer_index={self.layer_index}"


class MaskedConv2d(MaskedLayer):
    """Conv2d with W * M; in group mode one grouped convolution serves all G tasks."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
    ) -> None:
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        super().__init__((out_channels, in_channels, kh, kw), in_channels * kh * kw)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.padding = padding
        self.dilation = dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.effective_weight()
        if w.dim() == 4:
            return F.conv2d(x, w, None, self.stride, self.padding, self.dilation)
        groups = w.shape[0]
        if x.dim() == 5:  # (G, B, C, H, W) at the network's entry: fold the group into channels
            if x.shape[0] != groups:
                raise ValueError(f"{self.key}: input group {x.shape[0]} != bound group {groups}")
            x = x.transpose(0, 1).reshape(x.shape[1], groups * x.shape[2], *x.shape[3:])
        w = w.reshape(groups * self.out_channels, *self.shape[1:])
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel={self.shape[2:]}, "
                f"stride={self.stride}, layer_index={self.layer_index}")


class TaskBatchNorm2d(_Bound):
    """BatchNorm without affine parameters whose running statistics belong to each task.

    A shared BN would drag every old task to chance; here the binding supplies the statistics of
    the bound task(s), or none (batch statistics, as in superposition).
    """

    def __init__(self, num_features: int, *, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.momentum = momentum
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = self._require_binding().bn_stats(self)
        if stats is None:
            return F.batch_norm(x, None, None, training=True, eps=self.eps)
        mean, var = stats  # (C,) or (G, C): a view, so train-mode updates land in place
        if mean.device != x.device:
            if self.training:  # a copy would silently drop the running-statistics update
                raise ValueError(f"{self.key}: BN statistics are on {mean.device}, the input on "
                                 f"{x.device}; move the scores to the network's device")
            # A bank kept on another device than the network (e.g. on the CPU while the network
            # runs on a GPU) lends its per-task statistics for this call only.
            mean, var = mean.to(x.device, non_blocking=True), var.to(x.device, non_blocking=True)
        return F.batch_norm(
            x, mean.reshape(-1), var.reshape(-1), training=self.training,
            momentum=self.momentum, eps=self.eps,
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}"


class InputFlatten(nn.Module):
    """Flatten the trailing `data_dims` dims, so (B, C, H, W) -> (B, CHW) and
    (G, B, C, H, W) -> (G, B, CHW) share one module."""

    def __init__(self, data_dims: int = 3) -> None:
        super().__init__()
        self.data_dims = data_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(-self.data_dims)


# ------------------------------------------------------------------ converting torch models
def _swap(module: nn.Module) -> nn.Module | None:
    if isinstance(module, nn.Linear):
        return MaskedLinear(module.in_features, module.out_features)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"grouped convolutions (groups={module.groups}) are not supported")
        if module.padding_mode != "zeros":
            raise ValueError(f"padding_mode {module.padding_mode!r} is not supported")
        return MaskedConv2d(
            module.in_channels, module.out_channels, module.kernel_size,
            stride=module.stride, padding=module.padding, dilation=module.dilation,
        )
    if isinstance(module, nn.BatchNorm2d):
        return TaskBatchNorm2d(module.num_features, momentum=module.momentum or 0.1,
                               eps=module.eps)
    return None


def convert_modules(model: nn.Module) -> nn.Module:
    """Replace Linear / Conv2d / BatchNorm2d in place, recursively; returns `model`."""
    for name, child in list(model.named_children()):
        new = _swap(child)
        if new is None:
            convert_modules(child)
        else:
            setattr(model, name, new)
    return model
