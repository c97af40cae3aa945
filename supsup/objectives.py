"""Task-inference objectives over the network's outputs (Sections 3.3 and 3.6).

- entropy: H of the softmax over all outputs. The mask of the right task gives confident, low
  entropy outputs, so its alpha has the most negative dH/dalpha.
- G: logsumexp of the logits with the gradient blocked through the labelled outputs, so it flows
  only through the superfluous neurons, which training pushes down for the task's own data.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

OBJECTIVES = ("entropy", "g")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-example entropy of softmax(logits): (B, outputs) -> (B,)."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def superfluous_g(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-example G = logsumexp(logits) with the labelled logits detached: (B, outputs) -> (B,)."""
    if logits.shape[-1] <= num_classes:
        raise ValueError(
            f"the G objective needs superfluous outputs: the network has {logits.shape[-1]} "
            f"outputs for {num_classes} classes; use objective 'entropy' or more num_outputs"
        )
    blocked = torch.cat([logits[..., :num_classes].detach(), logits[..., num_classes:]], -1)
    return blocked.logsumexp(-1)


def get_objective(name: str, num_classes: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The per-example objective called `name`."""
    if name == "entropy":
        return entropy
    if name == "g":
        return lambda logits: superfluous_g(logits, num_classes)
    raise ValueError(f"unknown objective {name!r}; choose one of {OBJECTIVES}")
