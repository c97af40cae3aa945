"""Turn an existing torch model into a supermask model.

Every nn.Linear and nn.Conv2d becomes a masked layer of the same shape over frozen signed-constant
weights (its own weights and bias are dropped: the base network is random by design), and every
nn.BatchNorm2d becomes a per-task non-affine BatchNorm. Functional calls in the model's forward
(torch.flatten, F.relu, residual additions) keep working, including in group mode.
"""

from __future__ import annotations

from torch import nn

from supsup.layers import convert_modules
from supsup.networks import NetworkSpec, SupermaskNet

__all__ = ["convert", "convert_modules"]


def convert(model: nn.Module, spec: NetworkSpec) -> SupermaskNet:
    """A SupermaskNet over `model`'s architecture with weights drawn from `spec.seed`.

    `spec.name` should name a catalog entry that rebuilds the same architecture when the masks
    are loaded elsewhere (e.g. "resnet50" for torchvision's resnet50).
    """
    body = convert_modules(model)
    return SupermaskNet(body, spec)
