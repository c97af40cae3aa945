"""The fused training step: one kernel per layer for everything elementwise in a step.

Profiled on a CPU, about half of a supermask step was not the matmuls but elementwise passes over
the (G, *shape) scores and the optimiser state: the threshold, W * M, the straight-through
gradient dL/dW_eff * W, and the optimiser's several in-place updates, each one a full trip
through memory. Here the whole tail of a step is one function per layer,

    grad = dL/dW_eff * W  ->  optimiser update of the scores  ->  next W_eff = W * [scores >= 0],

compiled by torch.compile (inductor fuses it into one loop) or, where compilation fails, run as
the same function eagerly. The matmuls read W_eff as a leaf tensor in the compute dtype
(bfloat16 under `precision="bf16"`: 0/1 masks times +-c are exact up to the rounding of c), so a
step never casts weights. Scores and optimiser state stay float32: updates of lr ~ 1e-4 would
vanish in bfloat16.

The updates follow torch.optim's RMSprop, Adam and SGD (with their weight decay, momentum and
bias corrections) elementwise, so each task still gets exactly its own updates and its mask does
not depend on its group; compiled float arithmetic may round differently from the eager
optimisers in the last bit. Compilation happens once per process and shape family
(`dynamic=True`): a worker pays it on its first group, never again for later groups or sizes.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from supsup.binding import bind
from supsup.layers import MaskedLayer, TaskBatchNorm2d

if TYPE_CHECKING:
    from supsup.networks import SupermaskNet
    from supsup.scores import TaskScores

PRECISIONS = ("fp32", "bf16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_STATE = {"rmsprop": ("square_avg",), "adam": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum",)}


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the matmuls run in for a `precision` name."""
    if precision not in _DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    return _DTYPES[precision]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to bfloat16 for the matmuls under `bf16`; nothing under `fp32`."""
    if compute_dtype(precision) == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


# ----------------------------------------------------------------- the per-layer step functions
# Arguments: scores s (G, N) and state (G, N) float32, updated in place; gw = dL/dW_eff (G, N)
# in the compute dtype; w (N,) float32 frozen weights; lr and bias corrections as 0-dim tensors
# (so a schedule never triggers a recompilation); the rest are constants of the run.

def _rmsprop(s: torch.Tensor, square_avg: torch.Tensor, gw: torch.Tensor, w: torch.Tensor,
             lr: torch.Tensor, alpha: float, eps: float, weight_decay: float,
             out_dtype: torch.dtype) -> torch.Tensor:
    g = gw.float() * w
    if weight_decay:
        g = g + weight_decay * s
    v = square_avg * alpha + (g * g) * (1 - alpha)
    new = s - lr * (g / (v.sqrt() + eps))
    square_avg.copy_(v)
    s.copy_(new)
    return (w * (new >= 0)).to(out_dtype)


def _adam(s: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, gw: torch.Tensor,
          w: torch.Tensor, lr: torch.Tensor, correction1: torch.Tensor,
          correction2_sqrt: torch.Tensor, beta1: float, beta2: float, eps: float,
          weight_decay: float, out_dtype: torch.dtype) -> torch.Tensor:
    g = gw.float() * w
    if weight_decay:
        g = g + weight_decay * s
    m = exp_avg + (g - exp_avg) * (1 - beta1)
    v = exp_avg_sq * beta2 + (g * g) * (1 - beta2)
    new = s - (lr / correction1) * (m / (v.sqrt() / correction2_sqrt + eps))
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    s.copy_(new)
    return (w * (new >= 0)).to(out_dtype)


def _sgd(s: torch.Tensor, buf: torch.Tensor, gw: torch.Tensor, w: torch.Tensor,
         lr: torch.Tensor, momentum: float, weight_decay: float,
         out_dtype: torch.dtype) -> torch.Tensor:
    g = gw.float() * w
    if weight_decay:
        g = g + weight_decay * s
    b = buf * momentum + g  # torch.optim.SGD's first step sets buf = g: the same from zeros
    new = s - lr * b
    buf.copy_(b)
    s.copy_(new)
    return (w * (new >= 0)).to(out_dtype)


_EAGER: dict[str, Callable[..., torch.Tensor]] = {"rmsprop": _rmsprop, "adam": _adam, "sgd": _sgd}


@functools.cache
def _compiled(optimizer: str) -> Callable[..., torch.Tensor]:
    """torch.compile of one step function, made once per process."""
    return torch.compile(_EAGER[optimizer], dynamic=True)


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What torch.compile raises when it cannot compile (no C++ compiler, no Triton, an operator
    it cannot lower), as opposed to what the compiled step raises while it runs."""
    from torch._dynamo.exc import TorchDynamoException  # BackendCompilerFailed, InductorError
    from torch._inductor import exc as inductor

    return (TorchDynamoException, inductor.CppCompileError, inductor.InvalidCxxCompiler)


class FusedStep:
    """Optimiser state and effective weights of one training group, stepped by fused kernels.

    `compile=False`, or a failed compilation (no C++ compiler, no Triton), runs the same step
    functions eagerly; `kernel` says which ran, and why not compiled when it fell back. Only a
    compilation failure falls back: an error while a step runs is raised as it is.
    """

    def __init__(self, net: SupermaskNet, scores: TaskScores, *, optimizer: str, lr: float,
                 precision: str = "fp32", momentum: float = 0.9, weight_decay: float = 0.0,
                 compile: bool = True) -> None:
        if scores.rule != "threshold":
            raise ValueError(f"the fused step builds masks by the threshold rule, not "
                             f"{scores.rule!r}; train topk masks without `fused`")
        if optimizer not in _EAGER:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {sorted(_EAGER)}")
        self.scores = scores
        self.optimizer = optimizer
        self.base_lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.dtype = compute_dtype(precision)
        self.kernel = "compiled" if compile else "eager"
        self._steps = 0
        device = scores.scores[scores.keys[0].replace(".", "__")].device
        # 0-dim tensors refilled each step: no recompilation per value, no host-to-device copy
        self._lr = torch.zeros((), device=device)
        self._corrections = (torch.zeros((), device=device), torch.zeros((), device=device))
        layers = net.masked_layers()
        self._weights = {k: layers[k].weight.reshape(-1) for k in scores.keys}
        self._state = {
            k: [torch.zeros_like(self._flat(k)) for _ in _STATE[optimizer]] for k in scores.keys
        }
        self.weights = {k: self._leaf(self._weights[k] * (self._flat(k) >= 0), k)
                        for k in scores.keys}

    def _flat(self, key: str) -> torch.Tensor:
        s = self.scores.scores[key.replace(".", "__")]
        return s.data.view(s.shape[0], -1)

    def _leaf(self, flat: torch.Tensor, key: str) -> torch.Tensor:
        shape = self.scores.scores[key.replace(".", "__")].shape
        return flat.to(self.dtype).view(shape).requires_grad_(True)

    def zero_grad(self) -> None:
        for w in self.weights.values():
            w.grad = None

    def step(self, lr_factor: float = 1.0) -> None:
        """Apply one optimiser update from the gradients on `weights`, then rebuild them."""
        self._steps += 1
        lr = self._lr.fill_(self.base_lr * lr_factor)
        extra: tuple = ()
        if self.optimizer == "adam":  # torch.optim.Adam's bias corrections
            c1, c2 = self._corrections
            extra = (c1.fill_(1 - 0.9 ** self._steps), c2.fill_((1 - 0.999 ** self._steps) ** 0.5))
        for key, leaf in self.weights.items():
            if leaf.grad is None:
                raise RuntimeError(f"{key}: no gradient reached the effective weight; run the "
                                   "forward and backward pass inside `FusedStep.bind`")
            args = (self._flat(key), *self._state[key], leaf.grad.view(leaf.shape[0], -1),
                    self._weights[key], lr, *extra, *self._constants(), self.dtype)
            new = self._run(args)
            self.weights[key] = new.view(leaf.shape).requires_grad_(True)

    def _constants(self) -> tuple[float, ...]:
        if self.optimizer == "rmsprop":  # torch.optim.RMSprop's defaults
            return (0.99, 1e-8, self.weight_decay)
        if self.optimizer == "adam":
            return (0.9, 0.999, 1e-8, self.weight_decay)
        return (self.momentum, self.weight_decay)

    def _run(self, args: tuple) -> torch.Tensor:
        if self.kernel == "compiled":
            try:
                return _compiled(self.optimizer)(*args)
            except _compile_errors() as exc:
                # Raised while tracing or compiling, before the step touched a value: the same
                # math runs eagerly. Anything else (an error of the step itself, out of memory)
                # may come after the in-place update and is raised: rerunning would apply the
                # update twice.
                self.kernel = f"eager (compilation failed: {type(exc).__name__})"
        return _EAGER[self.optimizer](*args)

    @contextlib.contextmanager
    def bind(self, net: SupermaskNet) -> Iterator[SupermaskNet]:
        """Run `net` on the current effective weights (group mode: input (G, B, ...))."""
        with bind(net, _WeightsBinding(self)):
            yield net


class _WeightsBinding:
    """Layers read the fused step's effective weights; BN its tasks' running statistics."""

    def __init__(self, fused: FusedStep) -> None:
        self.fused = fused
        self.group = fused.scores.group

    def effective_weight(self, layer: MaskedLayer) -> torch.Tensor:
        return self.fused.weights[layer.key]

    def mask(self, layer: MaskedLayer) -> torch.Tensor:
        return self.fused.scores.hard_mask(layer.key)

    def bn_stats(self, layer: TaskBatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fused.scores.bn_stats(layer.key)
