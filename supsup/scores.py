"""TaskScores: the trainable real-valued scores of a group of tasks over one base network.

One (G, *weight shape) parameter per masked layer, so G tasks train in one process with batched
matmuls while sharing the frozen weights. Each task's initial scores come from a generator keyed by
(network seed, task id, layer index): a task learns the same mask whichever group it is trained in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from supsup.layers import kaiming_uniform_scores
from supsup.masks import (
    RULES,
    apply_rule,
    check_density,
    erdos_renyi_densities,
    threshold_weight,
    topk_hard,
)
from supsup.networks import SupermaskNet
from supsup.seeding import generator


def _param_name(key: str) -> str:
    return key.replace(".", "__")


def layer_densities(
    net: SupermaskNet,
    density: float | Mapping[str, float] | None = None,
    erdos_renyi_scale: float | None = None,
) -> dict[str, float]:
    """Per-layer top-k densities: one value for all, a mapping per layer, or the ER budget."""
    shapes = net.layer_shapes()
    if erdos_renyi_scale is not None:
        return dict(zip(shapes, erdos_renyi_densities(list(shapes.values()), erdos_renyi_scale)))
    if density is None:
        raise ValueError("the topk rule needs `density` (or `erdos_renyi_scale`)")
    if isinstance(density, Mapping):
        missing = set(shapes) - set(density)
        if missing:
            raise ValueError(f"density mapping lacks layers {sorted(missing)}")
        return {k: check_density(density[k], f"density[{k}]") for k in shapes}
    d = check_density(density)
    return dict.fromkeys(shapes, d)


class TaskScores(nn.Module):
    """Scores and per-task BN statistics for `task_ids`, trained together."""

    def __init__(
        self,
        net: SupermaskNet,
        task_ids: Sequence[int],
        *,
        rule: str = "threshold",
        density: float | Mapping[str, float] | None = None,
        erdos_renyi_scale: float | None = None,
    ) -> None:
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"unknown mask rule {rule!r}; choose one of {RULES}")
        if not task_ids:
            raise ValueError("TaskScores needs at least one task id")
        if len(set(task_ids)) != len(task_ids):
            raise ValueError(f"duplicate task ids in {list(task_ids)}")
        self.task_ids = [int(t) for t in task_ids]
        self.rule = rule
        self.densities = (
            layer_densities(net, density, erdos_renyi_scale) if rule == "topk" else {}
        )
        self.keys = list(net.masked_layers())
        self.scores = nn.ParameterDict()
        device = next(iter(net.masked_layers().values())).weight.device
        for key, layer in net.masked_layers().items():
            per_task = [
                kaiming_uniform_scores(layer.shape, layer.fan_in,
                                       generator(net.spec.seed, "scores", t, layer.layer_index))
                for t in self.task_ids
            ]
            self.scores[_param_name(key)] = nn.Parameter(torch.stack(per_task).to(device))
        self.bn_keys = list(net.bn_layers())
        for key, bn in net.bn_layers().items():
            g = len(self.task_ids)
            self.register_buffer(f"bn_mean__{_param_name(key)}",
                                 torch.zeros(g, bn.num_features, device=device))
            self.register_buffer(f"bn_var__{_param_name(key)}",
                                 torch.ones(g, bn.num_features, device=device))

    @property
    def group(self) -> int:
        return len(self.task_ids)

    def mask(self, key: str) -> torch.Tensor:
        """(G, *shape) binary masks of one layer with straight-through gradients."""
        s = self.scores[_param_name(key)]
        return apply_rule(s, self.rule, self.densities.get(key), group_dims=1)

    def effective_weight(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        """(G, *shape) W * M with straight-through gradients to the scores."""
        if self.rule == "threshold":
            return threshold_weight(self.scores[_param_name(key)], weight)
        return weight * self.mask(key)

    def hard_mask(self, key: str) -> torch.Tensor:
        """(G, *shape) binary masks of one layer, detached."""
        s = self.scores[_param_name(key)].detach()
        if self.rule == "threshold":
            return (s >= 0).to(s.dtype)
        return topk_hard(s, self.densities[key], group_dims=1)

    def bn_stats(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        name = _param_name(key)
        return getattr(self, f"bn_mean__{name}"), getattr(self, f"bn_var__{name}")

    def export(self) -> dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        """{task_id: (masks per layer, BN stats (2, C) per layer)}, on the CPU, detached."""
        masks = {k: self.hard_mask(k).cpu() for k in self.keys}
        stats = {k: torch.stack(self.bn_stats(k), 1).cpu() for k in self.bn_keys}  # (G, 2, C)
        return {
            t: ({k: m[i] for k, m in masks.items()}, {k: s[i] for k, s in stats.items()})
            for i, t in enumerate(self.task_ids)
        }

    def densities_per_task(self) -> list[float]:
        """Fraction of weights kept by each task's current mask."""
        kept = sum(self.hard_mask(k).flatten(1).sum(1) for k in self.keys)
        total = sum(self.scores[_param_name(k)][0].numel() for k in self.keys)
        return (kept / total).tolist()
