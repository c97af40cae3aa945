"""Task families as pure functions of (seed, task id): permuted, rotated and split.

The paper's benchmarks (Section 3.3-3.5): PermutedMNIST (task i permutes the pixels with a
permutation drawn from seed base_seed + i; task 0 is permuted too), RotatedMNIST (task i rotates by
i * 10 degrees) and SplitMNIST / SplitCIFAR100 (task i keeps a block of classes, relabelled 0..k-1).
A task never copies its data set: each batch is gathered from one shared tensor and transformed on
the fly, so thousands of tasks cost nothing until they are sampled.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from supsup.seeding import generator

SPLITS = ("train", "test")


@dataclass(frozen=True)
class TensorData:
    """A whole data set in memory: x (N, C, H, W) float, normalised; y (N,) long labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.dim() != 4:
            raise ValueError(f"x must be (N, C, H, W), got shape {tuple(self.x.shape)}")
        if self.y.dim() != 1 or self.y.shape[0] != self.x.shape[0]:
            raise ValueError(
                f"y must be (N,) with N = {self.x.shape[0]}, got shape {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def num_labels(self) -> int:
        return int(self.y.max()) + 1 if len(self) else 0


def split_data(data: TensorData, test_fraction: float, seed: int) -> tuple[TensorData, TensorData]:
    """Split with a fixed shuffle (never by position: some sources are sorted by class)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = torch.randperm(len(data), generator=generator(seed, "split"))
    n_test = int(round(len(data) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return TensorData(data.x[train], data.y[train]), TensorData(data.x[test], data.y[test])


class TaskSet(ABC):
    """A family of tasks over one base train/test pair."""

    kind: str = ""

    def __init__(self, train: TensorData, test: TensorData, num_tasks: int, seed: int) -> None:
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        if train.x.shape[1:] != test.x.shape[1:]:
            raise ValueError(
                f"train and test inputs differ in shape: {tuple(train.x.shape[1:])} vs "
                f"{tuple(test.x.shape[1:])}"
            )
        self.data = {"train": train, "test": test}
        self.num_tasks = num_tasks
        self.seed = seed

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.data["train"].x.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.data["train"].x.device

    def to(self, device: torch.device | str) -> TaskSet:
        """Keep the base data (and every per-task constant derived from it) on `device`, so
        batches are gathered and transformed there; returns self, like `nn.Module.to`."""
        device = torch.device(device)
        if device != self.device:
            self.data = {k: TensorData(d.x.to(device), d.y.to(device))
                         for k, d in self.data.items()}
            self._moved(device)
        return self

    def _moved(self, device: torch.device) -> None:  # noqa: B027 - most families derive none
        """Subclasses move what they derived from the data."""

    @property
    @abstractmethod
    def num_classes(self) -> int:
        """Labels per task (the first outputs of the network)."""

    def check_task(self, task_id: int) -> int:
        if not 0 <= int(task_id) < self.num_tasks:
            raise ValueError(f"task {task_id} is outside this {self.kind} set of "
                             f"{self.num_tasks} tasks (0..{self.num_tasks - 1})")
        return int(task_id)

    def _split(self, split: str) -> TensorData:
        if split not in self.data:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        return self.data[split]

    def indices(self, task_id: int, split: str) -> torch.Tensor | None:
        """Rows of the base data a task uses; None means all of them."""
        return None

    def size(self, task_id: int, split: str) -> int:
        idx = self.indices(self.check_task(task_id), split)
        return len(self._split(split)) if idx is None else idx.numel()

    def get(self, task_id: int, split: str, positions: torch.Tensor) -> tuple[torch.Tensor,
                                                                            torch.Tensor]:
        """The task's examples at `positions` (0..size-1): x (B, C, H, W), y (B,)."""
        task_id = self.check_task(task_id)
        data = self._split(split)
        idx = self.indices(task_id, split)
        positions = positions.to(data.x.device)
        rows = positions if idx is None else idx[positions]
        return self.transform(task_id, data.x[rows], data.y[rows])

    @abstractmethod
    def transform(self, task_id: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor,
                                                                                 torch.Tensor]:
        """Turn base examples into the task's examples."""

    def train_batches(
        self, task_ids: Sequence[int], batch_size: int, steps: int, seed: int = 0,
        dtype: torch.dtype | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`steps` batches for a group: x (G, B, C, H, W), y (G, B).

        Each task reshuffles its own data every epoch with a generator keyed by (seed, task id),
        so a task sees the same batches whichever group it is trained in. `dtype` (e.g. the
        bfloat16 that bf16 matmuls would cast the inputs to anyway) gives x in that dtype.
        """
        if batch_size < 1 or steps < 0:
            raise ValueError(f"batch_size must be >= 1 and steps >= 0, got {batch_size}, {steps}")
        task_ids = [self.check_task(t) for t in task_ids]
        positions = self._group_positions(task_ids, batch_size, seed)
        for _ in range(steps):
            yield self.get_group(task_ids, "train", next(positions), dtype)

    def _group_positions(self, task_ids: list[int], batch_size: int,
                         seed: int) -> Iterator[torch.Tensor]:
        """(G, B) positions per step. Orders come from CPU generators (the same on every
        device); tasks of one size get theirs as one (G, n) tensor per epoch, moved to the data's
        device once and sliced per step, so no step runs Python per task or copies to a device."""
        sizes = {self.size(t, "train") for t in task_ids}
        if len(sizes) > 1:
            streams = [self._positions(t, batch_size, seed) for t in task_ids]
            while True:
                yield torch.stack([next(s) for s in streams]).to(self.device)
        n = sizes.pop()
        self._check_batch(task_ids[0], n, batch_size)
        gens = [generator(seed, "batches", self.kind, t) for t in task_ids]
        while True:
            orders = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(self.device)
            for start in range(0, n - batch_size + 1, batch_size):
                yield orders[:, start:start + batch_size]

    def get_group(self, task_ids: Sequence[int], split: str, positions: torch.Tensor,
                  dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Examples of several tasks at once: positions (G, B) -> x (G, B, C, H, W), y (G, B)."""
        xs, ys = zip(*(self.get(t, split, p) for t, p in zip(task_ids, positions)))
        x = torch.stack(xs)
        return (x if dtype is None else x.to(dtype)), torch.stack(ys)

    @staticmethod
    def _check_batch(task_id: int, n: int, batch_size: int) -> None:
        if n < batch_size:
            raise ValueError(f"task {task_id} has {n} training examples, fewer than the batch "
                             f"size {batch_size}")

    def _positions(self, task_id: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
        n = self.size(task_id, "train")
        self._check_batch(task_id, n, batch_size)
        g = generator(seed, "batches", self.kind, task_id)
        while True:
            order = torch.randperm(n, generator=g)
            for start in range(0, n - batch_size + 1, batch_size):
                yield order[start:start + batch_size]

    def eval_batches(
        self, task_id: int, split: str = "test", batch_size: int = 1000
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The whole split of one task, in order: x (B, C, H, W), y (B,)."""
        n = self.size(task_id, split)
        for start in range(0, n, batch_size):
            yield self.get(task_id, split, torch.arange(start, min(n, start + batch_size),
                                                        device=self.device))


class PermutedTasks(TaskSet):
    """Task i permutes all input values with the permutation drawn from seed base_seed + i."""

    kind = "permuted"

    def __init__(self, train: TensorData, test: TensorData, num_tasks: int, seed: int = 0) -> None:
        super().__init__(train, test, num_tasks, seed)
        self._perms: dict[int, torch.Tensor] = {}
        self._converted: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._stacked: tuple[tuple[int, ...], torch.Tensor] = ((), torch.empty(0))

    @property
    def num_classes(self) -> int:
        return self.data["train"].num_labels

    def _flat(self, split: str, dtype: torch.dtype | None) -> torch.Tensor:
        x = self._split(split).x
        if dtype is None or dtype == x.dtype:
            return x.reshape(len(x), -1)
        key = (split, dtype)
        if key not in self._converted:
            self._converted[key] = x.reshape(len(x), -1).to(dtype)
        return self._converted[key]

    def permutation(self, task_id: int) -> torch.Tensor:
        """The task's permutation, drawn on the CPU (the same on every device), kept on the
        data's device."""
        if task_id not in self._perms:
            g = torch.Generator().manual_seed(self.seed + task_id)
            perm = torch.randperm(math.prod(self.input_shape), generator=g)
            self._perms[task_id] = perm.to(self.device)
        return self._perms[task_id]

    def _group_permutations(self, task_ids: Sequence[int]) -> torch.Tensor:
        """(G, D) permutations of a group, stacked once and reused by every step."""
        key = tuple(task_ids)
        if self._stacked[0] != key:
            self._stacked = (key, torch.stack([self.permutation(self.check_task(t))
                                               for t in task_ids]))
        return self._stacked[1]

    def _moved(self, device: torch.device) -> None:
        self._perms = {t: p.to(device) for t, p in self._perms.items()}
        self._converted = {}
        self._stacked = ((), torch.empty(0))

    def transform(self, task_id: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor,
                                                                                 torch.Tensor]:
        flat = x.reshape(x.shape[0], -1).index_select(1, self.permutation(task_id))
        return flat.reshape(x.shape), y

    def get_group(self, task_ids: Sequence[int], split: str, positions: torch.Tensor,
                  dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One gather for the whole group: every task indexes the same base tensor (kept
        converted to `dtype` once, so a narrower dtype also halves the bytes gathered)."""
        data = self._split(split)
        g, b = positions.shape
        flat = self._flat(split, dtype)[positions.reshape(-1)].view(g, b, -1)
        perms = self._group_permutations(task_ids)  # (G, D)
        x = torch.gather(flat, 2, perms.unsqueeze(1).expand(g, b, -1))
        return x.view(g, b, *self.input_shape), data.y[positions]


class RotatedTasks(TaskSet):
    """Task i rotates every image by i * `degrees` (bilinear, zero fill)."""

    kind = "rotated"

    def __init__(self, train: TensorData, test: TensorData, num_tasks: int, seed: int = 0,
                 degrees: float = 10.0) -> None:
        super().__init__(train, test, num_tasks, seed)
        self.degrees = degrees

    @property
    def num_classes(self) -> int:
        return self.data["train"].num_labels

    def transform(self, task_id: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor,
                                                                                 torch.Tensor]:
        if task_id == 0 or (task_id * self.degrees) % 360 == 0:
            return x, y
        theta = math.radians(task_id * self.degrees)
        c, s = math.cos(theta), math.sin(theta)
        affine = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=x.dtype,
                              device=x.device).expand(x.shape[0], 2, 3)
        grid = F.affine_grid(affine, list(x.shape), align_corners=False)
        # Rotate the raw image (background 0 in normalised units is not 0): shift, rotate, shift.
        background = x.amin(dim=(1, 2, 3), keepdim=True)
        out = F.grid_sample(x - background, grid, align_corners=False) + background
        return out, y


class SplitTasks(TaskSet):
    """Task i keeps classes [i * k, (i + 1) * k) of the base labels, relabelled 0..k-1."""

    kind = "split"

    def __init__(self, train: TensorData, test: TensorData, num_tasks: int, seed: int = 0,
                 classes_per_task: int = 2) -> None:
        super().__init__(train, test, num_tasks, seed)
        if classes_per_task < 1:
            raise ValueError(f"classes_per_task must be >= 1, got {classes_per_task}")
        needed = num_tasks * classes_per_task
        have = train.num_labels
        if needed > have:
            raise ValueError(f"{num_tasks} split tasks of {classes_per_task} classes need "
                             f"{needed} labels; the data has {have}")
        self.classes_per_task = classes_per_task
        self._idx = {
            split: [
                torch.nonzero((d.y >= t * classes_per_task) & (d.y < (t + 1) * classes_per_task))
                .flatten()
                for t in range(num_tasks)
            ]
            for split, d in self.data.items()
        }

    @property
    def num_classes(self) -> int:
        return self.classes_per_task

    def indices(self, task_id: int, split: str) -> torch.Tensor:
        self._split(split)
        return self._idx[split][task_id]

    def _moved(self, device: torch.device) -> None:
        self._idx = {k: [i.to(device) for i in v] for k, v in self._idx.items()}

    def classes(self, task_id: int) -> list[int]:
        k = self.classes_per_task
        return list(range(task_id * k, (task_id + 1) * k))

    def transform(self, task_id: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor,
                                                                                 torch.Tensor]:
        return x, y - task_id * self.classes_per_task


TASK_FAMILIES: dict[str, type[TaskSet]] = {
    "permuted": PermutedTasks,
    "rotated": RotatedTasks,
    "split": SplitTasks,
}


def make_tasks(kind: str, train: TensorData, test: TensorData, num_tasks: int, seed: int = 0,
               **options: float | int) -> TaskSet:
    """Build a task family by name ("permuted", "rotated", "split")."""
    if kind not in TASK_FAMILIES:
        raise ValueError(f"unknown task family {kind!r}; choose one of {sorted(TASK_FAMILIES)}")
    return TASK_FAMILIES[kind](train, test, num_tasks, seed, **options)
