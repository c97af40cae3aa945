"""Continual-learning benchmark streams (Avalanche's protocol) read into this project's task sets.

An Avalanche benchmark has a train and a test stream; each is an iterable of experiences, and an
experience has a `.dataset` whose items are (x, y, task_label) and a `.task_label`. Here experience
i of both streams becomes task i of one `StreamTasks` (a `supsup.tasks.TaskSet`), so the masks,
evaluation and accuracy matrix of this project apply to it as to the built-in families:

    from avalanche.benchmarks.classic import SplitMNIST
    tasks = tasks_from_benchmark(SplitMNIST(n_experiences=5, return_task_id=True))

Each task's labels are renumbered 0..k-1 in sorted order (as `SplitTasks` does), so a
class-incremental stream's classes {2, 3} become outputs 0 and 1 of its own mask. Inputs are taken
as the benchmark's transforms leave them: give it tensor transforms (ToTensor, Normalize); images
must all have one shape. The data is read once into memory, as every task family here holds it.

Only `avalanche_benchmark` imports Avalanche (`pip install avalanche-lib`, not a dependency of this
project); everything else works on any object that follows the protocol.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from supsup.tasks import TaskSet, TensorData

_READ_BATCH = 512


class AvalancheMissing(ImportError):
    """Avalanche is not installed: the one adapter that builds its benchmarks needs it."""


class StreamTasks(TaskSet):
    """Task i is experience i of a benchmark stream: its own rows of one in-memory data set, with
    its labels renumbered 0..k-1."""

    kind = "stream"

    def __init__(self, train: TensorData, test: TensorData, rows: dict[str, list[torch.Tensor]],
                 classes: list[list[int]], task_labels: list[int], seed: int = 0) -> None:
        super().__init__(train, test, len(classes), seed)
        for split, per_task in rows.items():
            if len(per_task) != len(classes):
                raise ValueError(f"{split}: {len(per_task)} experiences for {len(classes)} tasks")
        self._idx = rows
        self.task_labels = task_labels  # the stream's own task label of each experience
        self.task_classes = classes  # the original labels behind outputs 0..k-1 of each task
        top = max((max(c) for c in classes if c), default=0) + 1
        self._remap = torch.full((len(classes), top), -1, dtype=torch.long)
        for t, c in enumerate(classes):
            self._remap[t, c] = torch.arange(len(c))

    @property
    def num_classes(self) -> int:
        return max(len(c) for c in self.task_classes)

    def indices(self, task_id: int, split: str) -> torch.Tensor:
        self._split(split)
        return self._idx[split][task_id]

    def _moved(self, device: torch.device) -> None:
        self._idx = {k: [i.to(device) for i in v] for k, v in self._idx.items()}
        self._remap = self._remap.to(device)

    def transform(self, task_id: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor,
                                                                                 torch.Tensor]:
        return x, self._remap[task_id, y]


def _experience_label(exp: Any, i: int, stream: str) -> int:
    try:
        return int(exp.task_label)
    except AttributeError as err:
        raise ValueError(f"experience {i} of the {stream} stream has no single .task_label "
                         f"({err}); one task per experience is needed") from None


def _read(exp: Any, i: int, stream: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, C, H, W) float32, y (N,) of one experience, checking its examples' task labels."""
    from torch.utils.data import DataLoader

    dataset = getattr(exp, "dataset", None)
    if dataset is None:
        raise ValueError(f"experience {i} of the {stream} stream has no .dataset")
    label = _experience_label(exp, i, stream)
    xs, ys, n = [], [], 0
    for items in DataLoader(dataset, batch_size=_READ_BATCH, shuffle=False, collate_fn=list):
        if any(not isinstance(item, (list, tuple)) or len(item) < 2 for item in items):
            raise ValueError(f"experience {i} of the {stream} stream: items must be (x, y, "
                             "task_label)")
        bad = next((item[0] for item in items if not isinstance(item[0], torch.Tensor)), None)
        if bad is not None:
            raise ValueError(f"experience {i} of the {stream} stream yields "
                             f"{type(bad).__name__} inputs, not tensors: give the benchmark a "
                             "ToTensor transform")
        if any(len(item) > 2 and int(item[2]) != label for item in items):
            raise ValueError(f"experience {i} of the {stream} stream has examples of task "
                             f"labels other than its task_label {label}; one task per experience "
                             "is needed")
        xs.append(torch.stack([item[0] for item in items]))
        ys.append(torch.as_tensor([int(item[1]) for item in items]))
        n += len(items)
        if limit is not None and n >= limit:
            break
    if not xs:
        raise ValueError(f"experience {i} of the {stream} stream has no examples")
    x, y = torch.cat(xs)[:limit], torch.cat(ys)[:limit].long()
    if x.dim() == 3:  # (N, H, W): one channel
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise ValueError(f"experience {i} of the {stream} stream has inputs of shape "
                         f"{tuple(x.shape[1:])}; images (C, H, W) or (H, W) are needed")
    return x.float(), y


def tasks_from_streams(train_stream: Iterable[Any], test_stream: Iterable[Any], *,
                       max_examples: int | None = None, seed: int = 0) -> StreamTasks:
    """Experience i of `train_stream` and of `test_stream` as task i (at most `max_examples`
    examples of each experience, in stream order). ValueError naming the experience for a stream
    that does not follow the protocol or whose streams do not match."""
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples}")
    splits: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    labels: dict[str, list[int]] = {}
    for split, stream in (("train", train_stream), ("test", test_stream)):
        experiences = list(stream)
        if not experiences:
            raise ValueError(f"the {split} stream has no experiences")
        splits[split] = [_read(e, i, split, max_examples) for i, e in enumerate(experiences)]
        labels[split] = [_experience_label(e, i, split) for i, e in enumerate(experiences)]
    if len(splits["train"]) != len(splits["test"]):
        raise ValueError(f"the train stream has {len(splits['train'])} experiences and the test "
                         f"stream {len(splits['test'])}; each task needs both")
    if labels["train"] != labels["test"]:
        i = next(i for i, (a, b) in enumerate(zip(labels["train"], labels["test"])) if a != b)
        raise ValueError(f"experience {i} has task label {labels['train'][i]} in the train stream "
                         f"and {labels['test'][i]} in the test stream")
    shapes = {tuple(x.shape[1:]) for parts in splits.values() for x, _ in parts}
    if len(shapes) > 1:
        raise ValueError(f"the experiences' inputs differ in shape: {sorted(shapes)}; resize them "
                         "to one shape in the benchmark's transforms")
    classes = [sorted(set(torch.cat([tr[1], te[1]]).tolist()))
               for tr, te in zip(splits["train"], splits["test"])]
    data, rows = {}, {}
    for split, parts in splits.items():
        data[split] = TensorData(torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]))
        starts = [0]
        for x, _ in parts:
            starts.append(starts[-1] + len(x))
        rows[split] = [torch.arange(a, b) for a, b in zip(starts, starts[1:])]
    return StreamTasks(data["train"], data["test"], rows, classes, labels["train"], seed)


def tasks_from_benchmark(benchmark: Any, **options: Any) -> StreamTasks:
    """`tasks_from_streams` of a benchmark's `train_stream` and `test_stream`."""
    for name in ("train_stream", "test_stream"):
        if not hasattr(benchmark, name):
            raise ValueError(f"the benchmark has no .{name}; pass an Avalanche benchmark, or "
                             "call tasks_from_streams with the two streams")
    return tasks_from_streams(benchmark.train_stream, benchmark.test_stream, **options)


def avalanche_benchmark(name: str, *args: Any, max_examples: int | None = None,
                        **kwargs: Any) -> StreamTasks:
    """Tasks of `avalanche.benchmarks.classic.<name>(*args, **kwargs)` (e.g. "SplitMNIST"); the
    benchmark may download its data set, as Avalanche does."""
    try:
        from avalanche.benchmarks import classic
    except ModuleNotFoundError as err:
        raise AvalancheMissing(f"reading Avalanche benchmarks needs the avalanche-lib package "
                               f"({err}): pip install avalanche-lib") from None
    if not hasattr(classic, name):
        known = sorted(n for n in dir(classic) if n[:1].isupper())
        raise ValueError(f"unknown Avalanche benchmark {name!r}; avalanche.benchmarks.classic "
                         f"has {', '.join(known[:20])}")
    return tasks_from_benchmark(getattr(classic, name)(*args, **kwargs),
                                max_examples=max_examples)

