"""MaskBank: the binary masks of many tasks at one bit per weight, with superposition products.

Section 3.3 of the paper superimposes all learned masks, W * sum_i alpha_i M_i, and needs
dObjective/dalpha_i = sum_j g_j M_ij with g = dObjective/dmixture for every task i. A float32 stack
of 2,500 LeNet masks is 3.2 GB; here each task's mask is a row of packed bytes and both products
are computed from the bytes, a block of rows x byte columns at a time (`_plane_blocks`):
- the mixture from a per-weight count of set bits (kept up to date as tasks are added) when the
  alphas are uniform over every task, else from the blocks;
- the alpha gradient from the blocks: each is unpacked by one AND into 8 bit planes and multiplied
  by g as a matrix product, so the bank is read once at the speed of a matmul, not of a gather.

Why integers on a CPU: a matmul of 0/1 planes by bfloat16 or float16 rounds its result to 8 or 11
bits (CPU kernels have no float32 output for them), and converting planes to float32 costs as much
as the product. Instead the float operand (g, or the alphas) is written in fixed point, 30 bits
below its largest magnitude, as four int8 digits, and `torch._int_mm` multiplies the int8 planes
by the digits with exact int32 sums (VNNI on x86). Each operand value is off by at most 2**-24 of
the largest (the float32 rounding of the largest), so results match float32 products within
float32's own rounding; tests compare them with a float64 reference. Devices without the integer
kernel (CUDA here: it wants 16+ rows and 8+ digit columns) convert planes to float32 and use a
float32 matrix product.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from supsup.masks import pack_bits, packed_size, unpack_bits

# Plane i of a byte keeps its bit (7 - i), the bit of weight 8b + i in pack_bits' MSB-first order.
_SELECT = (128, 64, 32, 16, 8, 4, 2, 1)
# A kept bit read as int8 is worth this much in plane i; operands are divided by it (exactly: a
# power of two), so a set bit contributes its weight's operand value.
_PLANE_VALUE = (-128.0, 64.0, 32.0, 16.0, 8.0, 4.0, 2.0, 1.0)
_DIGITS = 4  # int8 digits of a fixed-point operand, base 256
_FIXED_BITS = 30  # |operand| <= 2**30 in fixed point: the top digit never overflows with carries
# Byte columns per block: <= 8192 keeps int32 sums of (int8 plane x int8 digit) products under
# 2**31 (65,536 terms of at most 2**14).
_MAX_COLUMNS = 8192


@dataclass(frozen=True)
class KernelPlan:
    """How one device computes products over packed rows.

    integer: int8 planes times int8 fixed-point digits (`torch._int_mm`); else float32 planes.
    block_bytes: packed bytes (rows x byte columns) unpacked at once; the planes take 8x this, so
        on a CPU the unpacked block stays in the cache that the product then reads.
    min_columns: byte columns per block when there are many rows: long rows keep the AND and the
        product vectorised; with few rows a block widens instead (up to `_MAX_COLUMNS`).
    """

    integer: bool
    block_bytes: int
    min_columns: int


def _cpu_cache_bytes() -> int:
    """Per-core L2 size from sysfs, 1 MiB where unreadable."""
    try:
        text = open("/sys/devices/system/cpu/cpu0/cache/index2/size").read().strip()
        units = {"K": 1 << 10, "M": 1 << 20}
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except (OSError, ValueError):
        return 1 << 20


@functools.cache
def _integer_kernel_works(device: torch.device) -> bool:
    """Whether `torch._int_mm` runs here with the shapes used (one digit column, few rows)."""
    if not hasattr(torch, "_int_mm"):
        return False
    try:
        a = torch.tensor([[1, -128, 3, 0, 0, 0, 0, 0]], dtype=torch.int8, device=device)
        b = torch.tensor([[2], [1], [-1], [0], [0], [0], [0], [5]], dtype=torch.int8,
                         device=device)
        return int(torch._int_mm(a, b)[0, 0]) == 2 - 128 - 3
    except (RuntimeError, NotImplementedError):
        return False


@functools.cache
def kernel_plan(device: torch.device) -> KernelPlan:
    """The plan for `device`: cache-sized integer blocks on a CPU, large float32 blocks on a GPU.

    SUPSUP_BANK_KERNEL=float forces float32 planes (to compare the two on one machine).
    """
    forced_float = os.environ.get("SUPSUP_BANK_KERNEL", "").lower() == "float"
    if device.type == "cpu":
        # Planes (8x the block's bytes) about twice a core's L2: measured best on a 1 MiB-L2 EPYC
        # between 0.5 and 4 MiB of planes; smaller blocks pay Python's per-op overhead.
        block = max(1 << 16, min(1 << 20, _cpu_cache_bytes() // 4))
        return KernelPlan(not forced_float and _integer_kernel_works(device), block, 1024)
    # GPUs: a block is one launch of each kernel; 32 MiB of bytes keeps 256 MiB of float planes.
    return KernelPlan(False, 1 << 25, _MAX_COLUMNS)


def _device(device: torch.device) -> torch.device:
    """`cuda` and `cuda:0` as one cache key."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@functools.cache
def _selectors(device: torch.device) -> torch.Tensor:
    """(1, 8, 1) uint8 masks of the 8 planes, resident on `device`."""
    return torch.tensor(_SELECT, dtype=torch.uint8, device=device).reshape(1, 8, 1)


@functools.cache
def _plane_values(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(8, 1) value of a kept bit in each plane, resident on `device`."""
    return torch.tensor(_PLANE_VALUE, dtype=dtype, device=device).reshape(8, 1)


@functools.cache
def _digit_weights(device: torch.device) -> torch.Tensor:
    """(4,) float64 weights 256**d of the int8 digits."""
    return torch.tensor([256.0**d for d in range(_DIGITS)], dtype=torch.float64, device=device)


def _block_shape(rows: int, nbytes: int, plan: KernelPlan) -> tuple[int, int]:
    """(row block, byte columns per block) for `rows` x `nbytes` packed bytes."""
    columns = min(nbytes, _MAX_COLUMNS, max(plan.min_columns, plan.block_bytes // max(1, rows)))
    return max(1, min(rows, plan.block_bytes // max(1, columns))), max(1, columns)


def _plane_blocks(
    packed: torch.Tensor, rows: torch.Tensor | None, plan: KernelPlan
) -> Iterator[tuple[int, int, int, int, torch.Tensor]]:
    """Unpack `packed` (or its `rows`, in that order) block by block, column blocks outermost.

    Yields (r0, r1, c0, c1, planes): planes is (r1 - r0, 8 * (c1 - c0)) int8, plane-major (the
    bits of byte column c0 + b in plane i sit at i * (c1 - c0) + b), worth `_PLANE_VALUE[i]` when
    set. One buffer serves every block, so a consumer must use a block before asking for the next.
    """
    k = packed.shape[0] if rows is None else rows.numel()
    nbytes = packed.shape[1]
    height, width = _block_shape(k, nbytes, plan)
    select = _selectors(_device(packed.device))
    buf = torch.empty(height * 8 * width, dtype=torch.uint8, device=packed.device)
    for c0 in range(0, nbytes, width):
        c1 = min(nbytes, c0 + width)
        for r0 in range(0, k, height):
            r1 = min(k, r0 + height)
            src = packed[r0:r1, c0:c1] if rows is None else packed[rows[r0:r1], c0:c1]
            planes = buf[: (r1 - r0) * 8 * (c1 - c0)].view(r1 - r0, 8, c1 - c0)
            torch.bitwise_and(src.unsqueeze(1), select, out=planes)
            yield r0, r1, c0, c1, planes.view(torch.int8).view(r1 - r0, -1)


def _to_planes(x: torch.Tensor, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, n) per-weight values -> (B, 8, nbytes): plane i, column b holds x[:, 8b + i] divided by
    plane i's bit value, so planes times this sum the values of the set bits."""
    x = torch.nn.functional.pad(x.to(dtype), (0, nbytes * 8 - x.shape[1]))
    planes = x.reshape(x.shape[0], nbytes, 8).transpose(1, 2)
    return planes / _plane_values(_device(x.device), dtype)


def _fixed_point_unit(x: torch.Tensor) -> torch.Tensor:
    """(B, m) float64 -> (B, 1): one fixed-point step per row, 2**-30 of its largest |value|."""
    top = x.abs().amax(1, keepdim=True)
    return torch.where(top > 0, top, torch.ones_like(top)) / 2.0**_FIXED_BITS


def _digits(x: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """x / unit rounded to an integer of at most 2**30 in magnitude, as (4, ...) balanced int8
    digits, least significant first: x ~= unit * sum_d digits[d] * 256**d."""
    q = torch.round(x / unit).to(torch.int32)
    digits = []
    for _ in range(_DIGITS):
        low = ((q + 128) & 255) - 128  # in [-128, 127]; the carry stays in q
        digits.append(low)
        q = (q - low) >> 8  # exact: q - low is a multiple of 256
    return torch.stack(digits).to(torch.int8)


def rows_dot(
    packed: torch.Tensor, rows: torch.Tensor | None, x: torch.Tensor, plan: KernelPlan
) -> torch.Tensor:
    """(B, k) float32: sum_j x[b, j] M[rows_i, j] over packed rows M, for x (B, n).

    The alpha gradient (B = 1) and its per-example form. Column blocks are outermost: each block of
    x is converted once for every row block, and the integer sums of a column block are combined
    into floats once.
    """
    k = packed.shape[0] if rows is None else rows.numel()
    batch, nbytes = x.shape[0], packed.shape[1]
    if not plan.integer:
        return _rows_dot_float(packed, rows, x, plan)
    device = _device(packed.device)
    xp = _to_planes(x, nbytes, torch.float64)  # (B, 8, nbytes)
    unit = _fixed_point_unit(xp.reshape(batch, -1))  # (B, 1)
    scales = (unit * _digit_weights(device)).reshape(-1)  # (B * 4,), batch-major
    out = torch.zeros(batch * _DIGITS, k, dtype=torch.float64, device=packed.device)
    # int32 sums of one column block: (4, k) for one example (each digit column its own GEMV,
    # ~2x faster than a 4-column product), (k, B * 4) for a batch (one product per row block).
    sums = torch.empty(_DIGITS, k, dtype=torch.int32, device=packed.device) if batch == 1 else \
        torch.empty(k, batch * _DIGITS, dtype=torch.int32, device=packed.device)
    column, operand = -1, []
    for r0, r1, c0, c1, planes in _plane_blocks(packed, rows, plan):
        if c0 != column:
            if column >= 0:
                out += sums.to(torch.float64) if batch == 1 else sums.T.to(torch.float64)
            column = c0
            digits = _digits(xp[:, :, c0:c1].reshape(batch, -1), unit)  # (4, B, K)
            if batch == 1:
                operand = [digits[d, 0].unsqueeze(1).contiguous() for d in range(_DIGITS)]
            else:
                operand = [digits.permute(2, 1, 0).reshape(digits.shape[2], -1).contiguous()]
        if batch == 1:
            for d, col in enumerate(operand):
                torch._int_mm(planes, col, out=sums[d, r0:r1].unsqueeze(1))
        else:
            torch._int_mm(planes, operand[0], out=sums[r0:r1])
    if column >= 0:
        out += sums.to(torch.float64) if batch == 1 else sums.T.to(torch.float64)
    out *= scales.unsqueeze(1)
    return out.view(batch, _DIGITS, k).sum(1).float()


def _rows_dot_float(
    packed: torch.Tensor, rows: torch.Tensor | None, x: torch.Tensor, plan: KernelPlan
) -> torch.Tensor:
    """`rows_dot` with float32 planes: for devices without the integer kernel."""
    k = packed.shape[0] if rows is None else rows.numel()
    batch, nbytes = x.shape[0], packed.shape[1]
    xp = _to_planes(x, nbytes, torch.float32)
    out = torch.zeros(k, batch, device=packed.device)
    column, operand, floats = -1, None, None
    for r0, r1, c0, c1, planes in _plane_blocks(packed, rows, plan):
        if c0 != column:
            column = c0
            operand = xp[:, :, c0:c1].reshape(batch, -1).T.contiguous()  # (K, B)
        if floats is None:
            floats = torch.empty(planes.numel(), device=packed.device)
        f = floats[: planes.numel()].view(planes.shape)
        f.copy_(planes)
        out[r0:r1] += f @ operand
    return out.T.contiguous()


def weighted_rows(
    packed: torch.Tensor, rows: torch.Tensor | None, weights: torch.Tensor, numel: int,
    plan: KernelPlan,
) -> torch.Tensor:
    """(numel,) float64: sum_i weights_i M[rows_i] over packed rows M (the mixture, the counts).

    Equal weights are one digit of ones: exact integer counts times the weight.
    """
    k = packed.shape[0] if rows is None else rows.numel()
    device = _device(packed.device)
    w = weights.to(packed.device, torch.float64).reshape(1, k)
    out = torch.zeros(8, packed.shape[1], dtype=torch.float64, device=packed.device)
    if k > 0 and plan.integer:
        if bool((w == w[0, 0]).all()):
            digits = torch.ones(1, k, dtype=torch.int8, device=packed.device)
            scales = w[0, :1]
        else:
            unit = _fixed_point_unit(w)
            digits = _digits(w, unit)[:, 0]  # (4, k)
            scales = unit[0] * _digit_weights(device)
    floats = None
    for r0, r1, c0, c1, planes in _plane_blocks(packed, rows, plan):
        if plan.integer:
            sums = torch._int_mm(digits[:, r0:r1].contiguous(), planes)  # (digits, K)
            part = scales @ sums.to(torch.float64)
        else:
            if floats is None:
                floats = torch.empty(planes.numel(), device=packed.device)
            f = floats[: planes.numel()].view(planes.shape)
            f.copy_(planes)
            part = (w[0, r0:r1].float() @ f).to(torch.float64)
        out[:, c0:c1] += part.view(8, c1 - c0)
    out /= _plane_values(device, torch.float64)
    return out.T.reshape(-1)[:numel]


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

    def _reserve(self, rows: int) -> None:
        """Grow storage geometrically so adding tasks one at a time stays linear overall."""
        cap = next(iter(self._store.values())).shape[0]
        if rows <= cap:
            return
        new_cap = max(rows, 2 * cap, 8)
        for key, old in self._store.items():
            grown = torch.zeros(new_cap, old.shape[1], dtype=torch.uint8, device=self.device)
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
            return (self._counts[key].to(torch.float32) * alphas[0]).reshape(self.layer_shapes[key])
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
        """Move every tensor to `device` in place; returns self."""
        self.device = torch.device(device)
        self._store = {k: v.to(self.device) for k, v in self._store.items()}
        self._bn_store = {k: v.to(self.device) for k, v in self._bn_store.items()}
        self._counts = {k: v.to(self.device) for k, v in self._counts.items()}
        return self

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
