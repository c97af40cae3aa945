"""Batched task inference: many queries per pass over the packed bank, each answered on its own.

The one-shot gradient (Section 3.3) is taken at the uniform mixture alpha_i = 1/k, which does not
depend on the query: the mixture (and the mixed BatchNorm statistics) is made once per bank, one
forward and one backward of a block of queries give every query's own per-layer factors (in eval
mode no example affects another), and one pass over the packed masks turns the factors of all the
block's queries into their (B, k) gradients (`supsup.bilinear` for linear layers; per-example
gradients in blocks of queries and `MaskBank.alpha_gradient_batched` for convolutions). Each
query's answer is the one the one-image path (`infer_task(mode="one_image")`) gives it alone.

The pieces are apart so that a bank split across processes (shards of task ranges) can use them:
`Mixture` sums over shards, `query_factors` runs once where the network is, and
`factor_gradients` runs on each shard over its own rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from supsup.bank import MaskBank
from supsup.bilinear import (
    LinearFactors,
    is_signed_constant,
    linear_alpha_gradients,
    signed_masks,
    signed_row_sums,
)
from supsup.binding import _TaskBinding, bind
from supsup.inference import InferenceResult, _confidence, _MixtureBinding, alpha_gradients
from supsup.layers import MaskedConv2d, MaskedLayer, MaskedLinear
from supsup.networks import SupermaskNet
from supsup.objectives import get_objective
from supsup.sparse_input import UnitMasks, sparse_alpha_gradients, unit_masks

Factor = LinearFactors | torch.Tensor  # a linear layer's factors, or (B, n) dObj/dmixture
# Fewer queries than this take the one-image path each: a pass unpacks every mask to int8, which
# only several queries repay (measured at k = 250-2,500: the pass wins from about 4 queries).
SMALL_BATCH = 4


@dataclass(frozen=True)
class Mixture:
    """The uniform superposition of k masks: per-weight kept counts and summed BN statistics.

    Sums over shards (`combine`), so a bank split by task ranges has one mixture, exactly the
    unsharded one."""

    counts: dict[str, torch.Tensor]  # per layer, the weight's shape, float64 counts of kept bits
    bn_sums: dict[str, torch.Tensor]  # per BN layer, (2, C) sum of the tasks' (mean, var)
    num_tasks: int

    @classmethod
    def of(cls, bank: MaskBank, rows: torch.Tensor) -> Mixture:
        ones = torch.ones(rows.numel(), device=bank.device)
        counts = {k: bank.mixture(k, rows, ones).to(torch.float64) for k in bank.layer_shapes}
        bn = {k: bank.mixed_bn_stats(k, rows, ones).to(torch.float64) * rows.numel()
              for k in bank.bn_features}
        return cls(counts, bn, int(rows.numel()))

    @classmethod
    def combine(cls, parts: Sequence[Mixture]) -> Mixture:
        if not parts:
            raise ValueError("no mixtures to combine")
        return cls({k: sum(p.counts[k].cpu() for p in parts) for k in parts[0].counts},
                   {k: sum(p.bn_sums[k].cpu() for p in parts) for k in parts[0].bn_sums},
                   sum(p.num_tasks for p in parts))

    def binding(self, device: torch.device) -> _MixtureBinding:
        k = self.num_tasks
        return _MixtureBinding({key: (c / k).to(device, torch.float32)
                                for key, c in self.counts.items()},
                               {key: (s / k).to(device, torch.float32)
                                for key, s in self.bn_sums.items()})


def _net_device(net: SupermaskNet) -> torch.device:
    return next(iter(net.masked_layers().values())).weight.device


def query_factors(net: SupermaskNet, mixture: Mixture, x: torch.Tensor,
                  objective: str = "entropy") -> dict[str, Factor]:
    """Per layer, the factors of every query in `x` (B, *input_shape) at the uniform mixture:
    `LinearFactors` for a linear layer over signed constants with 2-D inputs, else the (B, n)
    per-example gradient with respect to the mixture (dObj_b/dW_eff * W)."""
    device = _net_device(net)
    objective_fn = get_objective(objective, net.spec.num_classes)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    layers = net.masked_layers()

    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        seen[module.key] = (args[0].detach(), out)  # type: ignore[attr-defined]

    handles = [layer.register_forward_hook(hook) for layer in layers.values()]
    was_training = net.training
    net.eval()  # stored BN statistics: no example affects another's objective
    try:
        with bind(net, mixture.binding(device)), torch.enable_grad():
            inputs = x.to(device).detach().requires_grad_(True)
            obj = objective_fn(net(inputs))  # (B,)
            keys = [k for k in layers if k in seen]
            grads = torch.autograd.grad(obj.sum(), [seen[k][1] for k in keys])
    finally:
        net.train(was_training)
        for h in handles:
            h.remove()
    out: dict[str, Factor] = {}
    for key, g in zip(keys, grads):
        layer, (inp, _) = layers[key], seen[key]
        out[key] = _factor(layer, inp, g.detach())
    missing = set(layers) - set(out)
    if missing:
        raise ValueError(f"layers {sorted(missing)} took no part in the forward pass")
    return out


def _factor(layer: MaskedLayer, x: torch.Tensor, g: torch.Tensor) -> Factor:
    batch = x.shape[0]
    if isinstance(layer, MaskedLinear) and x.dim() == 2 and is_signed_constant(layer.weight):
        return LinearFactors(x, g)
    if isinstance(layer, MaskedLinear):  # (B, ..., in): sum the outer products over the rest
        per = torch.einsum("b...o,b...i->boi", g, x)
    elif isinstance(layer, MaskedConv2d):
        _, _, kh, kw = layer.shape
        cols = F.unfold(x, (kh, kw), layer.dilation, layer.padding, layer.stride)  # (B, CKK, P)
        per = torch.bmm(g.reshape(batch, layer.shape[0], -1), cols.transpose(1, 2))
    else:
        raise TypeError(f"{layer.key}: no per-example factors for {type(layer).__name__}")
    return (per.reshape(batch, -1) * layer.weight.reshape(1, -1)).to(torch.float32)


def factor_gradients(bank: MaskBank, rows: torch.Tensor, net: SupermaskNet,
                     factors: dict[str, Factor], *, digits: int = 2,
                     budget_bytes: int = 16 << 20, peak: list[int] | None = None,
                     resident: dict[str, torch.Tensor] | None = None,
                     workers: int = 1,
                     row_sums: dict[str, torch.Tensor] | None = None,
                     units: dict[str, UnitMasks] | None = None) -> torch.Tensor:
    """(B, len(rows)) dObj_b/dalpha_i from per-query factors: one pass over the bank's rows.
    `resident` holds layers' `signed_masks` of these rows, read instead of unpacking the bits,
    `row_sums` their `signed_row_sums`, and `units` layers' `unit_masks`, whose products skip
    the inputs each query leaves at rest (`supsup.sparse_input`) when the pass suits them."""
    layers = net.masked_layers()
    indexed = bank._indexed(rows)  # None: every row in bank order, read without indexing
    total: torch.Tensor | None = None

    def note(nbytes: int) -> None:
        if peak is not None:
            peak[0] = max(peak[0], nbytes)

    for key, f in factors.items():
        part = None
        if isinstance(f, LinearFactors) and units and key in units:
            part = sparse_alpha_gradients(units[key], layers[key].weight, f, digits=digits,
                                          workers=workers, on_block=note)
        if part is None and isinstance(f, LinearFactors):
            weight = layers[key].weight.to(bank.device)
            part = linear_alpha_gradients(bank.packed(key), indexed, weight, f.to(bank.device),
                                          digits=digits, budget_bytes=budget_bytes,
                                          on_block=note, resident=(resident or {}).get(key),
                                          workers=workers, row_sums=(row_sums or {}).get(key))
        elif part is None:
            note(f.numel() * f.element_size())
            part = bank.alpha_gradient_batched(key, rows, f.to(bank.device))
        total = part if total is None else total + part
    assert total is not None
    return total


def _resident_masks(net: SupermaskNet, bank: MaskBank, rows: torch.Tensor,
                    budget: int) -> dict[str, torch.Tensor]:
    """Every int8-kernel layer's `signed_masks` of `rows`, if all of them fit in `budget` bytes."""
    if bank.device.type != "cpu":
        return {}  # devices without the int8 kernel multiply float32 blocks
    layers = {key: layer for key, layer in net.masked_layers().items()
              if isinstance(layer, MaskedLinear) and is_signed_constant(layer.weight)}
    need = sum(rows.numel() * layer.weight.numel() for layer in layers.values())
    if not layers or need > budget:
        return {}
    indexed = bank._indexed(rows)
    return {key: signed_masks(bank.packed(key), indexed, layer.weight.to(bank.device))
            for key, layer in layers.items()}


def _unit_masks(resident: dict[str, torch.Tensor], layers: dict[str, MaskedLayer],
                budget: int) -> dict[str, UnitMasks]:
    """Resident layers' `unit_masks` too, in network order while they fit in `budget` bytes
    beside the resident masks (a second copy of each)."""
    left = budget - sum(t.numel() for t in resident.values())
    out = {}
    for key, a in resident.items():
        need = a.numel() + 4 * a.shape[0] * layers[key].weight.shape[0]
        if need > left:
            break
        out[key] = unit_masks(a, layers[key].weight)
        left -= need
    return out


class _ResidentTask(_TaskBinding):
    """One task's masks read from an engine's resident int8 A_i (|A_i| = M_i, in the kernel's
    layout), other layers' masks and BN statistics from the bank."""

    def __init__(self, bank: MaskBank, task_id: int, resident: dict[str, torch.Tensor],
                 index: int) -> None:
        super().__init__(bank, task_id)
        self.resident, self.index = resident, index

    def mask(self, layer: MaskedLayer) -> torch.Tensor:
        if layer.key not in self.resident:
            return super().mask(layer)
        out_f, in_f = layer.weight.shape
        a = self.resident[layer.key][self.index]
        a = a.view(in_f, out_f).T if out_f > in_f else a.view(out_f, in_f)  # see _Unpacker
        return a.abs().to(layer.weight.dtype)


class InferenceEngine:
    """One-shot (and binary) task inference for batches of queries, each query on its own.

    `block_queries` queries share one forward/backward and one pass over the bank; within a pass
    task blocks keep every buffer within `budget_bytes` (linear layers), and convolutions hold
    per-example gradients of at most `block_queries` queries at once, so memory is bounded for
    any batch size. `peak_block_bytes` records the largest set of buffers a pass held.

    `resident_bytes`: when the candidates' masks of every linear layer, unpacked to int8 (8x
    their packed bytes), fit in it, they are unpacked once here and each pass reads them instead
    of unpacking the bits again (for processes answering many passes: served models, evaluation
    workers); `resident_nbytes` says what they hold. 0 keeps only the packed bank. With room
    left for a second copy (`supsup.sparse_input.unit_masks`, layer by layer in network order),
    passes of many queries multiply only the inputs each query lights (`units`).

    `workers` > 1: the int8 product's task blocks are taken by that many threads, each running
    its kernels alone (for `torch.set_num_threads(1)` callers). Kernels of several threads wait
    for their slowest thread at every operation; where other processes share the cores (a
    served model's HTTP front) a thread held off a core then delays only its own blocks. The
    budget is shared among them; blocks of the same height give the same gradients.
    """

    def __init__(self, net: SupermaskNet, bank: MaskBank, *, objective: str = "entropy",
                 task_ids: Sequence[int] | None = None, digits: int = 2,
                 block_queries: int = 256, budget_bytes: int = 16 << 20,
                 resident_bytes: int = 0, workers: int = 1) -> None:
        if bank.num_tasks == 0:
            raise ValueError("the mask bank is empty: learn or load at least one task first")
        device = _net_device(net)
        if bank.device.type != device.type:
            raise ValueError(
                f"the bank is on {bank.device} and the network on {device}: keep both on one "
                f"device (bank.to({str(device)!r}) or net.to({str(bank.device)!r}))")
        if digits not in (2, 3):
            raise ValueError(f"digits must be 2 or 3 (fixed-point precision), got {digits}")
        if block_queries < 1:
            raise ValueError(f"block_queries must be at least 1, got {block_queries}")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        get_objective(objective, net.spec.num_classes)  # names a bad objective now
        self.net, self.bank, self.objective = net, bank, objective
        self.digits, self.block_queries, self.budget_bytes = digits, block_queries, budget_bytes
        self.workers = workers
        self.rows = bank.rows(task_ids)
        self.candidates = torch.tensor([bank.task_ids[r] for r in self.rows.tolist()])
        self.mixture = Mixture.of(bank, self.rows)
        self.peak_block_bytes = 0
        self.resident = _resident_masks(net, bank, self.rows, resident_bytes)
        layers = net.masked_layers()
        self.row_sums = {key: signed_row_sums(r, layers[key].weight)
                         for key, r in self.resident.items()}
        self.units = _unit_masks(self.resident, layers, resident_bytes)
        self._position = {int(t): j for j, t in enumerate(self.candidates.tolist())}

    @property
    def resident_nbytes(self) -> int:
        return (sum(t.numel() for t in self.resident.values())
                + sum(u.nbytes for u in self.units.values()))

    @property
    def num_tasks(self) -> int:
        return int(self.rows.numel())

    def gradients(self, x: torch.Tensor) -> torch.Tensor:
        """(B, k) dObjective_b/dalpha at the uniform mixture, for each query of `x` alone."""
        self.net.check_input(x)
        out = []
        for start in range(0, x.shape[0], self.block_queries):
            block = x[start:start + self.block_queries]
            if block.shape[0] < SMALL_BATCH:  # a pass unpacks the bank: few queries read bits
                out.extend(alpha_gradients(self.net, self.bank, block[b:b + 1], self.rows,
                                           self.objective).cpu().reshape(1, -1)
                           for b in range(block.shape[0]))
                continue
            factors = query_factors(self.net, self.mixture, block, self.objective)
            peak = [0]
            out.append(factor_gradients(self.bank, self.rows, self.net, factors,
                                        digits=self.digits, budget_bytes=self.budget_bytes,
                                        peak=peak, resident=self.resident,
                                        workers=self.workers, row_sums=self.row_sums,
                                        units=self.units).cpu())
            factor_bytes = sum(f.x.numel() * 4 + f.g.numel() * 4 if isinstance(f, LinearFactors)
                               else f.numel() * f.element_size() for f in factors.values())
            self.peak_block_bytes = max(self.peak_block_bytes, peak[0] + factor_bytes)
        return torch.cat(out) if out else torch.zeros(0, self.num_tasks)

    def infer(self, x: torch.Tensor, method: str = "one_shot") -> InferenceResult:
        """Each query's task: the argmin of its own gradient (one_shot), or halving rounds over
        its own survivors (binary, whose first round is the batched pass)."""
        if method not in ("one_shot", "binary"):
            raise ValueError(f"unknown inference method {method!r}; choose one_shot or binary")
        if x.shape[0] == 0:
            raise ValueError("cannot infer a task from an empty batch")
        grads = self.gradients(x)
        if method == "one_shot":
            best = grads.argmin(-1)
            passes = 1
        else:
            best, passes = self._binary(x, grads)
        return InferenceResult(self.candidates[best], self.candidates, grads,
                               _confidence(grads), passes, method, "per_example")

    def _binary(self, x: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Later rounds re-mix over each query's own survivors, so they run per query."""
        best = torch.empty(x.shape[0], dtype=torch.long)
        passes = 1 + max(0, math.ceil(math.log2(max(1, self.num_tasks))) - 1)
        for b in range(x.shape[0]):
            alive, g = torch.arange(self.num_tasks), grads[b]
            while alive.numel() > 1:
                alive = alive[g.topk(math.ceil(alive.numel() / 2), largest=False
                                     ).indices.sort().values]
                if alive.numel() > 1:
                    g = alpha_gradients(self.net, self.bank, x[b:b + 1],
                                        self.rows[alive.to(self.rows.device)],
                                        self.objective).cpu()
            best[b] = int(alive[0])
        return best, passes

    def classify(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """(B,) class of each query under its own task's mask (the first num_classes outputs).
        Resident masks give the bank's 0/1 masks without unpacking bits (the same forward)."""
        def binding(t: int) -> _TaskBinding:
            j = self._position.get(t)
            return (_TaskBinding(self.bank, t) if j is None
                    else _ResidentTask(self.bank, t, self.resident, j))
        return classify(self.net, self.bank, x, task_ids, binding if self.resident else None)


def classify(net: SupermaskNet, bank: MaskBank, x: torch.Tensor, task_ids: torch.Tensor,
             binding: Callable[[int], _TaskBinding] | None = None) -> torch.Tensor:
    """(B,) class of each query of `x` under its own task's mask in `bank`: one forward per
    distinct task, over that task's queries; `binding(task)` supplies its masks (default:
    unpacked from the bank's bits)."""
    device = _net_device(net)
    out = torch.empty(x.shape[0], dtype=torch.long)
    net.eval()
    for t in task_ids.unique().tolist():
        sel = task_ids == t
        with bind(net, (binding or (lambda t: _TaskBinding(bank, t)))(int(t))), \
                torch.no_grad():
            logits = net(x[sel].to(device))[:, : net.spec.num_classes]
        out[sel] = logits.argmax(-1).cpu()
    return out
