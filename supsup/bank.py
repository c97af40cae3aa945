"""MaskBank: the binary masks of many tasks at one bit per weight, with superposition products.

Section 3.3 of the paper superimposes all learned masks, W * sum_i alpha_i M_i, and needs
dObjective/dalpha_i = sum_j g_j M_ij for every task i. A float32 stack of 2,500 LeNet masks is
3.2 GB; here each task's mask is a row of packed bytes, and both products are computed from the
bytes by `supsup.packed` (the mixture, when the alphas are uniform over every task, from a
per-weight count of set bits kept up to date as tasks are added).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from supsup.masks import pack_bits, packed_size, unpack_bits
from supsup.packed import KernelPlan, _device, kernel_plan, rows_dot, weighted_rows

__all__ = ["KernelPlan", "MaskBank", "describe_ids", "kernel_plan", "rows_dot", "weighted_rows"]


class MaskBank:
    """Packed masks of many tasks over one network's masked layers.

    Rows are in insertion order; `task_ids[row]` names the task of each row. BatchNorm statistics
    (a few floats per channel) are kept per task beside the masks when the network has BN layers.
    """

    def __init__(
        self,
        layer_shapes: Mapping[str, Sequence[int]],
        bn_features: Mapping[str, int] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if not layer_shapes:
            raise ValueError("a MaskBank needs at least one masked layer shape")
        self.layer_shapes: dict[str, tuple[int, ...]] = {
            k: tuple(int(d) for d in v) for k, v in layer_shapes.items()
        }
        self.bn_features = dict(bn_features or {})
        self.device = torch.device(device)
        self.task_ids: list[int] = []
        self._row_of: dict[int, int] = {}
        # Storage rows beyond num_tasks are spare capacity; `_packed` / `_bn` are the live views.
        self._store: dict[str, torch.Tensor] = {
            k: torch.empty(0, packed_size(self._numel(k)), dtype=torch.uint8, device=self.device)
            for k in self.layer_shapes
        }
        self._bn_store: dict[str, torch.Tensor] = {
            k: torch.empty(0, 2, c, device=self.device) for k, c in self.bn_features.items()
        }
        self._counts: dict[str, torch.Tensor] = {
            k: torch.zeros(self._numel(k), dtype=torch.int32, device=self.device)
            for k in self.layer_shapes
        }

    # ----------------------------------------------------------------------------- contents
    def _numel(self, key: str) -> int:
        n = 1
        for d in self.layer_shapes[key]:
            n *= d
        return n

    @property
    def num_tasks(self) -> int:
        return len(self.task_ids)

    def __len__(self) -> int:
        return len(self.task_ids)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._row_of

    def row(self, task_id: int) -> int:
        """Bank row of `task_id`; KeyError naming the task and what the bank holds otherwise."""
        try:
            return self._row_of[int(task_id)]
        except KeyError:
            held = describe_ids(self.task_ids)
            raise KeyError(f"task {task_id} was never learned; the bank holds {held}") from None

    def rows(self, task_ids: Iterable[int] | None) -> torch.Tensor:
        """Rows for `task_ids` (all rows when None) as a long tensor."""
        if task_ids is None:
            return torch.arange(self.num_tasks, device=self.device)
        return torch.tensor([self.row(t) for t in task_ids], dtype=torch.long, device=self.device)

    def nbytes(self) -> int:
        """Bytes held by packed masks, BN statistics and the per-weight counts."""
        tensors = [*self._packed.values(), *self._bn.values(), *self._counts.values()]
        # live rows only: spare capacity is an implementation detail of appending
        return sum(t.numel() * t.element_size() for t in tensors)

    def add(
        self,
        task_id: int,
        masks: Mapping[str, torch.Tensor],
        bn_stats: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Add one task from 0/1 masks of each layer's shape (and (2, C) BN stats if any)."""
        self.add_packed(task_id, self._pack_masks(task_id, masks), bn_stats)

    def replace(
        self,
        task_id: int,
        masks: Mapping[str, torch.Tensor],
        bn_stats: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Overwrite a task's masks (and (2, C) BN stats if any) in its row, in place.

        For masks that keep training after they enter the bank (training without task identity,
        `supsup.discovery`). The per-weight counts change by the difference of the two masks, so
        uniform mixtures stay exact. Everything is checked before anything changes.
        """
        row = self.row(task_id)
        packed = self._pack_masks(task_id, masks)
        stats = {}
        for key, c in self.bn_features.items():
            s = None if bn_stats is None else bn_stats.get(key)
            if s is None:
                raise KeyError(f"task {task_id}: no BatchNorm statistics for layer {key!r}")
            s = torch.as_tensor(s, dtype=torch.float32).to(self.device)
            if tuple(s.shape) != (2, c):
                raise ValueError(
                    f"task {task_id}: BN stats of {key!r} have shape {tuple(s.shape)}, "
                    f"expected (2, {c})"
                )
            stats[key] = s
        for key, p in packed.items():
            n = self._numel(key)
            old = self._store[key][row]
            self._counts[key] += unpack_bits(p, n, torch.int32) - unpack_bits(old, n, torch.int32)
            self._store[key][row] = p
        for key, s in stats.items():
            self._bn_store[key][row] = s

    def _pack_masks(
        self, task_id: int, masks: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Check one task's 0/1 masks against the layer shapes and pack them."""
        packed = {}
        for key, shape in self.layer_shapes.items():
            if key not in masks:
                raise KeyError(f"task {task_id}: no mask for layer {key!r}")
            m = masks[key]
            if tuple(m.shape) != shape:
                raise ValueError(
                    f"task {task_id}: mask for layer {key!r} has shape {tuple(m.shape)}, "
                    f"expected {shape}"
                )
            packed[key] = pack_bits(m.to(self.device))
        return packed

    def add_packed(
        self,
        task_id: int,
        packed: Mapping[str, torch.Tensor],
        bn_stats: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Add one task from packed bytes per layer (as `pack_bits` or numpy.packbits make them)."""
        self.extend_packed(
            [task_id],
            {k: torch.as_tensor(v).reshape(1, -1) for k, v in packed.items()},
            None if bn_stats is None
            else {k: torch.as_tensor(v).unsqueeze(0) for k, v in bn_stats.items()},
        )

    def extend_packed(
        self,
        task_ids: Sequence[int],
        packed: Mapping[str, torch.Tensor],
        bn_stats: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Add many tasks at once: packed (T, nbytes) per layer and BN stats (T, 2, C) per layer.

        Everything is checked before anything is stored, so a bad input leaves the bank unchanged.
        """
        task_ids = [int(t) for t in task_ids]
        t = len(task_ids)
        seen = set()
        for tid in task_ids:
            if tid in self._row_of or tid in seen:
                raise ValueError(f"task {tid} is already in the bank")
            seen.add(tid)
        rows = {}
        for key in self.layer_shapes:
            if key not in packed:
                raise KeyError(f"tasks {task_ids[:4]}: no packed mask for layer {key!r}")
            p = torch.as_tensor(packed[key]).to(self.device, torch.uint8)
            nb = self._store[key].shape[1]
            if p.shape != (t, nb):
                raise ValueError(
                    f"tasks {task_ids[:4]}: layer {key!r} has packed shape {tuple(p.shape)}, "
                    f"expected ({t}, {nb})"
                )
            rows[key] = p
        stats = {}
        for key, c in self.bn_features.items():
            s = None if bn_stats is None else bn_stats.get(key)
            if s is None:
                raise KeyError(f"tasks {task_ids[:4]}: no BatchNorm statistics for layer {key!r}")
            s = torch.as_tensor(s, dtype=torch.float32).to(self.device)
            if tuple(s.shape) != (t, 2, c):
                raise ValueError(
                    f"tasks {task_ids[:4]}: BN stats of {key!r} have shape {tuple(s.shape)}, "
                    f"expected ({t}, 2, {c})"
                )
            stats[key] = s
        start = self.num_tasks
        self._reserve(start + t)
        for key, p in rows.items():
            self._store[key][start:start + t] = p
            # Blockwise column sums: the counts never need a (T, n) unpacked buffer.
            counts = weighted_rows(p, None, torch.ones(t), self._numel(key),
                                   kernel_plan(_device(self.device)))
            self._counts[key] += counts.round().to(torch.int32)
        for key, s in stats.items():
            self._bn_store[key][start:start + t] = s
        for i, tid in enumerate(task_ids):
            self._row_of[tid] = start + i
            self.task_ids.append(tid)

    def reserve(self, num_tasks: int) -> None:
        """Make room for `num_tasks` rows in all, so a bank built in chunks never copies itself to
        grow (a growth briefly holds the old and the new storage); the room costs no resident
        memory on a CPU until tasks fill it."""
        self._reserve(int(num_tasks))

    def _reserve(self, rows: int) -> None:
        """Grow storage geometrically so adding tasks one at a time stays linear overall.

        Spare rows are left uninitialised (never read: every view stops at num_tasks), so on a
        CPU their pages are not touched and cost no resident memory until tasks fill them.
        """
        cap = next(iter(self._store.values())).shape[0]
        if rows <= cap:
            return
        new_cap = max(rows, 2 * cap, 8)
        for key, old in self._store.items():
            grown = torch.empty(new_cap, old.shape[1], dtype=torch.uint8, device=self.device)
            grown[:cap] = old
            self._store[key] = grown
        for key, old in self._bn_store.items():
            grown = torch.zeros(new_cap, *old.shape[1:], device=self.device)
            grown[:cap] = old
            self._bn_store[key] = grown

    @property
    def _packed(self) -> dict[str, torch.Tensor]:
        return {k: v[: self.num_tasks] for k, v in self._store.items()}

    @property
    def _bn(self) -> dict[str, torch.Tensor]:
        return {k: v[: self.num_tasks] for k, v in self._bn_store.items()}

    def packed(self, key: str) -> torch.Tensor:
        """(num_tasks, nbytes) uint8 rows of one layer (a view of the storage)."""
        return self._store[key][: self.num_tasks]

    def mask(self, task_id: int, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One task's mask of one layer, unpacked to its weight shape."""
        row = self.packed(key)[self.row(task_id)]
        return unpack_bits(row, self._numel(key), dtype).reshape(self.layer_shapes[key])

    def masks(self, task_ids: Sequence[int], key: str) -> torch.Tensor:
        """(len(task_ids), *shape) float masks of one layer: for vectorised evaluation."""
        rows = self.packed(key)[self.rows(task_ids)]
        return unpack_bits(rows, self._numel(key)).reshape(len(task_ids), *self.layer_shapes[key])

    def bn_stats(self, task_ids: int | Sequence[int], key: str) -> torch.Tensor:
        """BN (mean, var) of one task, (2, C), or of several, (G, 2, C). A copy."""
        if isinstance(task_ids, int):
            return self._bn[key][self.row(task_ids)].clone()
        return self._bn[key][self.rows(task_ids)].clone()

    def density(self, task_id: int) -> float:
        """Fraction of weights kept by one task's mask over all masked layers."""
        row = self.row(task_id)
        kept = sum(
            int(unpack_bits(p[row], self._numel(k), torch.int32).sum())
            for k, p in self._packed.items()
        )
        return kept / sum(self._numel(k) for k in self.layer_shapes)

    # ----------------------------------------------------------------------- superposition
    def _is_every_row(self, rows: torch.Tensor, any_order: bool) -> bool:
        """Whether `rows` lists every row once (in bank order unless `any_order`).

        The count and unindexed paths are only valid then: a repeated row must count twice and a
        reordered one must put its gradient at its own position.
        """
        if rows.numel() != self.num_tasks:
            return False
        if any_order:
            return int(torch.unique(rows).numel()) == self.num_tasks
        return torch.equal(rows.to(self.device), torch.arange(self.num_tasks, device=self.device))

    def mixture(self, key: str, rows: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
        """sum_i alphas_i M_{rows_i} for one layer, shape of the weight; no autograd.

        Uniform alphas over every task reuse the per-weight counts, so one-shot inference costs no
        unpacking at all; other cases read only the rows involved, in blocks (`weighted_rows`).
        """
        alphas = alphas.detach().to(self.device, torch.float32)
        if self._is_every_row(rows, any_order=True) and bool((alphas == alphas[0]).all()):
            return torch.mul(self._counts[key], alphas[0]).reshape(self.layer_shapes[key])
        mix = weighted_rows(self.packed(key), self._indexed(rows), alphas, self._numel(key),
                            kernel_plan(_device(self.device)))
        return mix.to(torch.float32).reshape(self.layer_shapes[key])

    def mixed_bn_stats(self, key: str, rows: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
        """(2, C) BN statistics mixed like the masks, sum_i alphas_i stats_i / sum alphas.

        Constants for the alpha gradient, which flows through the masks only.
        """
        stats = self._bn_store[key][: self.num_tasks][rows]  # (k, 2, C)
        w = alphas.detach().to(self.device, torch.float32)
        return torch.einsum("k,kdc->dc", w, stats) / w.sum()

    def alpha_gradient(self, key: str, rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """sum_j grad_j M_{rows_i, j} for each row i: (len(rows),). `grad` has the weight's size.

        The hot product of one-shot inference: the packed rows times `grad`, a cache-sized block
        of bit planes at a time (`rows_dot`).
        """
        n = self._numel(key)
        g = grad.detach().reshape(1, -1).to(self.device, torch.float32)
        if g.shape[1] != n:
            raise ValueError(f"gradient for layer {key!r} has {g.shape[1]} values, expected {n}")
        plan = kernel_plan(_device(self.device))
        return rows_dot(self.packed(key), self._indexed(rows), g, plan)[0]

    def alpha_gradient_batched(
        self, key: str, rows: torch.Tensor, grad: torch.Tensor
    ) -> torch.Tensor:
        """Per-example gradients (B, n) -> (B, len(rows)): one matrix product per block."""
        n = self._numel(key)
        g = grad.detach().to(self.device, torch.float32)
        if g.dim() != 2 or g.shape[1] != n:
            raise ValueError(
                f"per-example gradients for layer {key!r} have shape {tuple(g.shape)}, "
                f"expected (B, {n})"
            )
        return rows_dot(self.packed(key), self._indexed(rows), g, kernel_plan(_device(self.device)))

    def _indexed(self, rows: torch.Tensor) -> torch.Tensor | None:
        """`rows` on the bank's device, or None when they are every row in bank order (read
        without indexing)."""
        if self._is_every_row(rows, any_order=False):
            return None
        return rows.to(self.device, torch.long)

    # -------------------------------------------------------------------------- utilities
    def to(self, device: torch.device | str) -> MaskBank:
        """This bank on `device`: itself when it is already there, else a new bank (the original
        stays where it was, so a bank shared by several users is never moved under them)."""
        device = torch.device(device)
        if _device(device) == _device(self.device):
            return self
        out = MaskBank.__new__(MaskBank)
        out.layer_shapes = dict(self.layer_shapes)
        out.bn_features = dict(self.bn_features)
        out.device = device
        out.task_ids = list(self.task_ids)
        out._row_of = dict(self._row_of)
        # live rows only: spare capacity is not worth a copy across devices
        out._store = {k: v.to(device) for k, v in self._packed.items()}
        out._bn_store = {k: v.to(device) for k, v in self._bn.items()}
        out._counts = {k: v.to(device) for k, v in self._counts.items()}
        return out

    def subset(self, task_ids: Sequence[int]) -> MaskBank:
        """A new bank of only `task_ids` (e.g. the first t tasks, to replay the paper's curve)."""
        out = MaskBank(self.layer_shapes, self.bn_features, self.device)
        for t in task_ids:
            r = self.row(t)
            out.add_packed(
                t,
                {k: p[r] for k, p in self._packed.items()},
                {k: s[r] for k, s in self._bn.items()} if self._bn else None,
            )
        return out

    def __repr__(self) -> str:
        return (f"MaskBank(num_tasks={self.num_tasks}, layers={len(self.layer_shapes)}, "
                f"nbytes={self.nbytes():,})")


def describe_ids(ids: Sequence[int]) -> str:
    """Task ids for an error message: all of a few, or the count and range of many."""
    if not ids:
        return "no tasks"
    if len(ids) <= 8:
        return f"tasks {list(ids)}"
    return f"{len(ids)} tasks ({min(ids)}..{max(ids)})"
