"""Turn an existing torch model into a supermask model.

Every nn.Linear and nn.Conv2d becomes a masked layer of the same shape over frozen signed-constant
weights (its own weights and bias are dropped: the base network is random by design), and every
nn.BatchNorm2d becomes a per-task non-affine BatchNorm. Functional calls in the model's forward
(torch.flatten, F.relu, residual additions) keep working, including in group mode.
"""

from __future__ import annotations

from torch import nn

from supsup.layers import MaskedConv2d, MaskedLinear, TaskBatchNorm2d
from supsup.networks import NetworkSpec, SupermaskNet


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


def convert(model: nn.Module, spec: NetworkSpec) -> SupermaskNet:
    """A SupermaskNet over `model`'s architecture with weights drawn from `spec.seed`.

    `spec.name` should name a catalog entry that rebuilds the same architecture when the masks
    are loaded elsewhere (e.g. "resnet50" for torchvision's resnet50).
    """
    body = convert_modules(model)
    return SupermaskNet(body, spec)
