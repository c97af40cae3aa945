"""pipeline.benchmark_stream: a stream written here in Avalanche's protocol (experiences with a
.dataset of (x, y, task_label) and a .task_label) becomes task sets that masks learn and evaluate
on; a stream off the protocol is refused naming the experience."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

from pipeline.benchmark_stream import (
    AvalancheMissing,
    StreamTasks,
    avalanche_benchmark,
    tasks_from_benchmark,
    tasks_from_streams,
)
from pipeline.datasets import load_mnist_bundled
from supsup.bank import MaskBank
from supsup.evaluate import evaluate_group
from supsup.networks import build_network
from supsup.train import TrainConfig, add_to_bank, train_group


class Examples(Dataset):
    """Items (x, y, task_label), as an Avalanche dataset yields them."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, task_label: int | list[int]) -> None:
        self.x, self.y = x, y
        self.t = [task_label] * len(y) if isinstance(task_label, int) else task_label

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Any, int, int]:
        return self.x[i], int(self.y[i]), self.t[i]


@dataclass
class Experience:
    dataset: Any
    task_label: int


@dataclass
class Benchmark:
    train_stream: list[Experience]
    test_stream: list[Experience]


def _split_mnist(pairs: int = 3) -> Benchmark:
    """Real digits as a class-incremental stream: experience i holds classes 2i and 2i+1, with
    their original labels and task label i."""
    train, test = load_mnist_bundled()

    def stream(data: Any) -> list[Experience]:
        out = []
        for i in range(pairs):
            keep = (data.y // 2) == i
            out.append(Experience(Examples(data.x[keep], data.y[keep], i), i))
        return out

    return Benchmark(stream(train), stream(test))


@pytest.fixture(scope="module")
def split() -> tuple[Benchmark, StreamTasks]:
    benchmark = _split_mnist()
    return benchmark, tasks_from_benchmark(benchmark)


def test_each_experience_is_a_task_with_its_labels_renumbered(
        split: tuple[Benchmark, StreamTasks]) -> None:
    benchmark, tasks = split
    assert tasks.num_tasks == 3 and tasks.num_classes == 2 and tasks.input_shape == (1, 28, 28)
    assert tasks.task_classes == [[0, 1], [2, 3], [4, 5]] and tasks.task_labels == [0, 1, 2]
    for t, (tr, te) in enumerate(zip(benchmark.train_stream, benchmark.test_stream)):
        assert tasks.size(t, "train") == len(tr.dataset) and tasks.size(t, "test") == len(
            te.dataset)
        (x, y), = tasks.eval_batches(t, "test", 10_000)
        assert torch.equal(x, te.dataset.x)  # the same pixels, in stream order
        assert torch.equal(y, te.dataset.y - 2 * t)  # classes 2t, 2t+1 -> outputs 0, 1
    x, y = next(tasks.train_batches([0, 2], batch_size=16, steps=1))
    assert x.shape == (2, 16, 1, 28, 28) and set(y.unique().tolist()) <= {0, 1}


def test_masks_learn_the_streams_tasks_and_infer_which_is_which(
        split: tuple[Benchmark, StreamTasks]) -> None:
    _, tasks = split
    net = build_network(name="fc", hidden=(64,), num_outputs=10, num_classes=2,
                        input_shape=tasks.input_shape)
    bank = MaskBank(net.layer_shapes(), net.bn_features())
    add_to_bank(bank, train_group(net, tasks, [0, 1, 2], TrainConfig(steps=60, lr=1e-2,
                                                                       batch_size=64)))
    results = evaluate_group(net, bank, tasks, [0, 1, 2], batch_size=64, mode="per_example")
    # Two-digit tasks of real MNIST: a learned mask is far above the 50% of chance (a margin
    # of 30 points). One-shot inference from a single image among three two-digit tasks is
    # hard (about 60% here); 45% is above the 1/3 of chance by 12 points, which over
    # the ~600 test images (standard error about 2 points) is no accident.
    assert all(r.accuracy_gg >= 0.8 for r in results), [r.accuracy_gg for r in results]
    right = sum(r.task_inference_accuracy * r.inferences for r in results)
    assert right / sum(r.inferences for r in results) >= 0.45


def test_max_examples_caps_each_experience() -> None:
    tasks = tasks_from_streams(*_split_mnist(2).__dict__.values(), max_examples=10)
    assert [tasks.size(t, s) for t in (0, 1) for s in ("train", "test")] == [10] * 4


def _tiny(n: int = 4, label: int = 0) -> Experience:
    return Experience(Examples(torch.zeros(n, 1, 2, 2), torch.arange(n) % 2, label), label)


def test_streams_off_the_protocol_are_refused_by_experience() -> None:
    with pytest.raises(ValueError, match="experience 1 of the train stream has no .dataset"):
        tasks_from_streams([_tiny(), Experience(None, 1)], [_tiny(), _tiny(label=1)])
    pil_like = Experience(Examples([object()] * 2, torch.zeros(2), 0), 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="yields object inputs, not tensors.*ToTensor"):
        tasks_from_streams([pil_like], [_tiny()])
    mixed = Experience(Examples(torch.zeros(2, 1, 2, 2), torch.zeros(2), [0, 1]), 0)
    with pytest.raises(ValueError, match="experience 0 of the test stream has examples of task "
                                         "labels other than its task_label 0"):
        tasks_from_streams([_tiny()], [mixed])
    with pytest.raises(ValueError, match="train stream has 2 experiences and the test stream 1"):
        tasks_from_streams([_tiny(), _tiny(label=1)], [_tiny()])
    with pytest.raises(ValueError, match="experience 0 has task label 0 in the train stream "
                                         "and 3 in the test stream"):
        tasks_from_streams([_tiny()], [_tiny(label=3)])
    with pytest.raises(ValueError, match="inputs differ in shape"):
        wide = Experience(Examples(torch.zeros(2, 1, 2, 3), torch.zeros(2), 0), 0)
        tasks_from_streams([_tiny()], [wide])
    with pytest.raises(ValueError, match="no .train_stream"):
        tasks_from_benchmark(object())


@pytest.mark.skipif(importlib.util.find_spec("avalanche") is not None,
                    reason="avalanche-lib is installed here")
def test_without_avalanche_the_error_says_what_to_install() -> None:
    with pytest.raises(AvalancheMissing, match="pip install avalanche-lib"):
        avalanche_benchmark("SplitMNIST", n_experiences=5)
