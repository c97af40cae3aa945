"""The baselines' networks (see supsup.baselines): bias-free ReLU MLPs with the layer sizes of
the SupSup network they stand beside, and what each kind stores and trains per task."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from supsup.networks import NetworkSpec, build_network
from supsup.seeding import generator

BASELINES = ("dense", "batchensemble", "psp", "finetune")
FC_FAMILY = ("fc", "fc1024", "lenet")
FLOAT_BYTES = 4  # float32


def layer_shapes(spec: NetworkSpec) -> list[tuple[int, int]]:
    """(out, in) of each linear layer of an fc-family network, input to output.

    Read from the SupSup network itself, so the catalog's default sizes (lenet 300-100, fc and
    fc1024 1024-1024) and `spec.hidden` live in one place.
    """
    if spec.name not in FC_FAMILY:
        raise ValueError(f"baselines need an fc-family network {FC_FAMILY}, got network "
                         f"{spec.name!r}; set network.name to one of them")
    shapes = list(build_network(spec).layer_shapes().values())
    return [(int(s[0]), int(s[1])) for s in shapes]


def storage_bytes(kind: str, spec: NetworkSpec) -> tuple[int, int]:
    """(shared bytes, bytes per task) of float32 parameters that must be stored for `kind`."""
    check_kind(kind)
    shapes = layer_shapes(spec)
    weights = sum(o * i for o, i in shapes) * FLOAT_BYTES
    if kind == "dense":
        return 0, weights
    if kind == "batchensemble":
        return weights, sum(o + i for o, i in shapes) * FLOAT_BYTES
    return weights, 0  # psp and finetune: contexts are re-drawn from the seed


def psp_context(seed: int, task_id: int, layer_index: int, size: int) -> torch.Tensor:
    """The fixed context of one task and layer: (size,) float32 values in {-1, +1}."""
    g = generator(seed, "psp-context", task_id, layer_index)
    return torch.randint(0, 2, (size,), generator=g).to(torch.float32) * 2 - 1


def check_kind(kind: str) -> None:
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; choose one of {BASELINES}")


def _kaiming(out_features: int, in_features: int, g: torch.Generator) -> nn.Linear:
    """A bias-free Linear with He-normal weights (std sqrt(2 / fan_in)) drawn from `g`."""
    layer = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        w = torch.randn(out_features, in_features, generator=g) * math.sqrt(2.0 / in_features)
        layer.weight.copy_(w)
    return layer


class BaselineNet(nn.Module, ABC):
    """A bias-free ReLU MLP; subclasses say which weights and scalings each task uses.

    `forward(x, task_id)`: x (B, *input_shape) -> logits (B, num_outputs). Layer i computes
    relu(((h * pre_i) W_i^T) * post_i), with no ReLU after the last layer.
    """

    kind = ""

    def __init__(self, spec: NetworkSpec) -> None:
        super().__init__()
        self.spec = spec
        self.shapes = layer_shapes(spec)
        self.task_ids: list[int] = []

    @abstractmethod
    def add_task(self, task_id: int) -> None:
        """Create what a new task owns (and freeze what it must not change)."""

    @abstractmethod
    def task_parameters(self, task_id: int) -> list[nn.Parameter]:
        """What training `task_id` updates."""

    def param_groups(self, task_id: int, fast_lr: float | None) -> list[dict[str, Any]]:
        """torch.optim parameter groups for training `task_id`; a group without "lr" learns at
        the optimiser's rate. Only BatchEnsemble has weights with a rate of their own."""
        return [{"params": self.task_parameters(task_id)}]

    @abstractmethod
    def terms(self, task_id: int) -> tuple[list[torch.Tensor], list[torch.Tensor | None],
                                           list[torch.Tensor | None]]:
        """Per layer: weight (out, in), input scale (in,) or None, output scale (out,) or None."""

    def check_task(self, task_id: int) -> int:
        if int(task_id) not in self.task_ids:
            raise KeyError(f"task {task_id} was not trained by this {self.kind} baseline "
                           f"(trained: {self.task_ids})")
        return int(task_id)

    def forward(self, x: torch.Tensor, task_id: int) -> torch.Tensor:
        weights, pre, post = self.terms(self.check_task(task_id))
        h = x.reshape(x.shape[0], -1)
        last = len(weights) - 1
        for i, (w, a, b) in enumerate(zip(weights, pre, post)):
            if a is not None:
                h = h * a
            h = F.linear(h, w)
            if b is not None:
                h = h * b
            if i < last:
                h = torch.relu(h)
        return h


class DenseNet(BaselineNet):
    """A separate, fully trained network per task, initialised from (seed, task, layer)."""

    kind = "dense"

    def __init__(self, spec: NetworkSpec) -> None:
        super().__init__(spec)
        self.per_task = nn.ModuleDict()

    def add_task(self, task_id: int) -> None:
        self.per_task[str(task_id)] = nn.ModuleList(
            _kaiming(o, i, generator(self.spec.seed, "dense", task_id, layer))
            for layer, (o, i) in enumerate(self.shapes)
        )
        self.task_ids.append(task_id)

    def task_parameters(self, task_id: int) -> list[nn.Parameter]:
        return list(self.per_task[str(task_id)].parameters())

    def terms(self, task_id: int) -> tuple[list[torch.Tensor], list[torch.Tensor | None],
                                           list[torch.Tensor | None]]:
        weights = [m.weight for m in self.per_task[str(task_id)]]
        none: list[torch.Tensor | None] = [None] * len(weights)
        return weights, none, list(none)


class _SharedNet(BaselineNet):
    """Base for kinds with one shared weight set, initialised from (seed, layer)."""

    def __init__(self, spec: NetworkSpec) -> None:
        super().__init__(spec)
        self.shared = nn.ModuleList(
            _kaiming(o, i, generator(spec.seed, "shared", layer))
            for layer, (o, i) in enumerate(self.shapes)
        )


class BatchEnsembleNet(_SharedNet):
    """Shared W trained on the first task only; rank-one fast weights r_t, s_t per task."""

    kind = "batchensemble"

    def __init__(self, spec: NetworkSpec) -> None:
        super().__init__(spec)
        self.fast_r = nn.ModuleDict()  # task -> per layer (out,)
        self.fast_s = nn.ModuleDict()  # task -> per layer (in,)

    def add_task(self, task_id: int) -> None:
        if self.task_ids:  # the first task is done: W is fixed from now on
            self.shared.requires_grad_(False)
        self.fast_r[str(task_id)] = nn.ParameterList(
            nn.Parameter(torch.ones(o)) for o, _ in self.shapes)
        self.fast_s[str(task_id)] = nn.ParameterList(
            nn.Parameter(torch.ones(i)) for _, i in self.shapes)
        self.task_ids.append(task_id)

    def _fast(self, task_id: int) -> list[nn.Parameter]:
        return [*self.fast_r[str(task_id)], *self.fast_s[str(task_id)]]

    def _trains_shared(self, task_id: int) -> bool:
        return task_id == self.task_ids[0]

    def task_parameters(self, task_id: int) -> list[nn.Parameter]:
        shared = list(self.shared.parameters()) if self._trains_shared(task_id) else []
        return [*shared, *self._fast(task_id)]

    def param_groups(self, task_id: int, fast_lr: float | None) -> list[dict[str, Any]]:
        # The rank-one fast weights scale whole rows and columns of a frozen W: at the shared
        # weights' small rate they barely move and later tasks stay near chance. BatchEnsemble
        # gives them a learning rate of their own.
        fast: dict[str, Any] = {"params": self._fast(task_id)}
        if fast_lr is not None:
            fast["lr"] = fast_lr
        if self._trains_shared(task_id):
            return [{"params": list(self.shared.parameters())}, fast]
        return [fast]

    def terms(self, task_id: int) -> tuple[list[torch.Tensor], list[torch.Tensor | None],
                                           list[torch.Tensor | None]]:
        return ([m.weight for m in self.shared], list(self.fast_s[str(task_id)]),
                list(self.fast_r[str(task_id)]))


class PSPNet(_SharedNet):
    """One shared W trained on every task in turn; per-task random +-1 input contexts.

    With `contexts=False` every context is all ones: plain sequential fine-tuning.
    """

    kind = "psp"

    def __init__(self, spec: NetworkSpec, contexts: bool = True) -> None:
        super().__init__(spec)
        self.contexts = contexts
        if not contexts:
            self.kind = "finetune"

    def add_task(self, task_id: int) -> None:
        for layer, (_, i) in enumerate(self.shapes):
            c = (psp_context(self.spec.seed, task_id, layer, i) if self.contexts
                 else torch.ones(i))
            # Not persistent: the seed re-draws contexts, so they are never stored.
            self.register_buffer(f"context_{task_id}_{layer}", c, persistent=False)
        self.task_ids.append(task_id)

    def context(self, task_id: int, layer: int) -> torch.Tensor:
        """The (in,) context of `task_id` at `layer`."""
        return getattr(self, f"context_{self.check_task(task_id)}_{layer}")

    def task_parameters(self, task_id: int) -> list[nn.Parameter]:
        return list(self.shared.parameters())

    def terms(self, task_id: int) -> tuple[list[torch.Tensor], list[torch.Tensor | None],
                                           list[torch.Tensor | None]]:
        weights = [m.weight for m in self.shared]
        pre: list[torch.Tensor | None] = [self.context(task_id, k) for k in range(len(weights))]
        return weights, pre, [None] * len(weights)


def build_baseline(kind: str, spec: NetworkSpec) -> BaselineNet:
    """An untrained baseline network of `kind` with the layer sizes of `spec`."""
    check_kind(kind)
    if kind == "dense":
        return DenseNet(spec)
    if kind == "batchensemble":
        return BatchEnsembleNet(spec)
    return PSPNet(spec, contexts=kind == "psp")
