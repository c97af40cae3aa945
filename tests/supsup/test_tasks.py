"""supsup.tasks: permuted, rotated and split task families as pure functions of (seed, task id),
batches that do not depend on the group, and errors that name the bad task, label or shape."""

from __future__ import annotations

import pytest
import torch

from supsup.tasks import (
    TASK_FAMILIES,
    PermutedTasks,
    RotatedTasks,
    SplitTasks,
    TaskSet,
    TensorData,
    make_tasks,
    split_data,
)

N_TRAIN, N_TEST = 60, 20


def _data(n: int, seed: int, shape: tuple[int, ...] = (1, 28, 28)) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    return TensorData(torch.randn(n, *shape, generator=g), torch.arange(n) % 10)


TRAIN, TEST = _data(N_TRAIN, 0), _data(N_TEST, 1)


def _family(kind: str, num_tasks: int = 5, seed: int = 3) -> TaskSet:
    options = {"split": {"classes_per_task": 2}, "rotated": {"degrees": 30.0}}.get(kind, {})
    return make_tasks(kind, TRAIN, TEST, num_tasks, seed, **options)


@pytest.mark.parametrize("seed", [0, 3, 1000])
def test_permutation_of_task_i_uses_seed_plus_i(seed: int) -> None:
    tasks = PermutedTasks(TRAIN, TEST, 6, seed=seed)
    for i in (0, 1, 5):
        expected = torch.randperm(784, generator=torch.Generator().manual_seed(seed + i))
        assert torch.equal(tasks.permutation(i), expected)


def test_task_zero_is_permuted_too() -> None:
    tasks = PermutedTasks(TRAIN, TEST, 3, seed=0)
    positions = torch.tensor([4, 0, 17])
    x, y = tasks.get(0, "train", positions)
    raw = TRAIN.x[positions]
    assert not torch.equal(x, raw)
    expected = raw.reshape(3, -1)[:, tasks.permutation(0)].reshape(raw.shape)
    assert torch.equal(x, expected)
    assert torch.equal(y, TRAIN.y[positions])  # labels are shared across permuted tasks
    assert tasks.num_classes == 10


@pytest.mark.parametrize("kind", sorted(TASK_FAMILIES))
def test_batches_do_not_depend_on_the_group(kind: str) -> None:
    tasks = _family(kind)
    steps = 9  # past one epoch for the split tasks (12 examples, batches of 4)
    alone = list(tasks.train_batches([3], batch_size=4, steps=steps, seed=1))
    group = list(tasks.train_batches([1, 3, 4], batch_size=4, steps=steps, seed=1))
    assert len(alone) == len(group) == steps
    for (xa, ya), (xg, yg) in zip(alone, group):
        assert xg.shape == (3, 4, *tasks.input_shape) and yg.shape == (3, 4)
        assert torch.equal(xa[0], xg[1]) and torch.equal(ya[0], yg[1])
    other_seed = next(tasks.train_batches([3], batch_size=4, steps=1, seed=2))
    assert not torch.equal(other_seed[0], alone[0][0])


@pytest.mark.parametrize("kind", sorted(TASK_FAMILIES))
def test_group_gather_equals_per_task_get(kind: str) -> None:
    tasks = _family(kind)
    positions = torch.tensor([[0, 5, 2], [11, 1, 3]])
    x, y = tasks.get_group([4, 0], "test" if kind != "split" else "train", positions)
    for g, task_id in enumerate([4, 0]):
        xs, ys = tasks.get(task_id, "test" if kind != "split" else "train", positions[g])
        assert torch.equal(x[g], xs) and torch.equal(y[g], ys)


def test_one_epoch_covers_each_example_once() -> None:
    tasks = PermutedTasks(TRAIN, TEST, 2)
    batches = list(tasks.train_batches([1], batch_size=10, steps=6))  # exactly one epoch
    labels = torch.cat([y[0] for _, y in batches])
    raw = torch.cat([x[0] for x, _ in batches]).reshape(60, -1)
    inverse = torch.argsort(tasks.permutation(1))
    unpermuted = raw[:, inverse].reshape(60, 1, 28, 28)
    # Every training example appears exactly once.
    matches = (unpermuted.reshape(60, 1, -1) == TRAIN.x.reshape(1, 60, -1)).all(-1)
    assert torch.equal(matches.sum(0), torch.ones(60, dtype=torch.long))
    assert torch.equal(labels, TRAIN.y[matches.float().argmax(1)])


def test_rotation_by_zero_is_identity() -> None:
    tasks = RotatedTasks(TRAIN, TEST, 5, degrees=90.0)
    positions = torch.arange(8)
    for task_id in (0, 4):  # 0 and 360 degrees
        x, y = tasks.get(task_id, "train", positions)
        assert torch.equal(x, TRAIN.x[:8]) and torch.equal(y, TRAIN.y[:8])


@pytest.mark.parametrize(("task_id", "quarter_turns"), [(1, 1), (2, 2), (3, 3)])
def test_rotation_by_multiples_of_90_matches_rot90(task_id: int, quarter_turns: int) -> None:
    tasks = RotatedTasks(TRAIN, TEST, 4, degrees=90.0)
    x, _ = tasks.get(task_id, "test", torch.arange(N_TEST))
    expected = torch.rot90(TEST.x, quarter_turns, dims=(2, 3))
    # Quarter turns map pixel centres onto pixel centres, so bilinear sampling only adds float
    # rounding; the 1-pixel border is left out because zero padding can bleed in there.
    torch.testing.assert_close(x[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], rtol=0, atol=1e-5)


def test_default_ten_degree_steps() -> None:
    tasks = RotatedTasks(TRAIN, TEST, 36)
    assert tasks.degrees == 10.0 and tasks.num_classes == 10
    x1, y1 = tasks.get(1, "train", torch.arange(4))
    assert torch.equal(y1, TRAIN.y[:4])
    assert not torch.allclose(x1, TRAIN.x[:4], atol=1e-3)
    x9, _ = tasks.get(9, "train", torch.arange(4))  # 9 * 10 degrees: a quarter turn
    expected = torch.rot90(TRAIN.x[:4], 1, dims=(2, 3))
    torch.testing.assert_close(x9[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], rtol=0, atol=1e-5)


def test_rotation_fills_with_the_image_background() -> None:
    # A normalised digit: background -0.4242 (not 0) with a bright square in the middle.
    x = torch.full((1, 1, 28, 28), -0.4242)
    x[..., 10:18, 10:18] = 2.8
    data = TensorData(x, torch.zeros(1, dtype=torch.long))
    tasks = RotatedTasks(data, data, 2, degrees=45.0)
    out, _ = tasks.get(1, "train", torch.arange(1))
    # The corners rotate in from outside the image: they must be background, not zero.
    for corner in (out[0, 0, 0, 0], out[0, 0, 0, -1], out[0, 0, -1, 0], out[0, 0, -1, -1]):
        assert float(corner) == pytest.approx(-0.4242, abs=1e-6)
    assert float(out[0, 0, 14, 14]) == pytest.approx(2.8, abs=1e-5)  # the centre stays put


@pytest.mark.parametrize("task_id", range(5))
def test_split_tasks_relabel_and_keep_only_their_classes(task_id: int) -> None:
    tasks = SplitTasks(TRAIN, TEST, 5, classes_per_task=2)
    assert tasks.num_classes == 2
    assert tasks.classes(task_id) == [2 * task_id, 2 * task_id + 1]
    for split, data in (("train", TRAIN), ("test", TEST)):
        keep = (data.y // 2) == task_id
        assert tasks.size(task_id, split) == int(keep.sum())
        batches = list(tasks.eval_batches(task_id, split, batch_size=5))
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        assert torch.equal(x, data.x[keep])
        assert torch.equal(y, data.y[keep] - 2 * task_id)
        assert set(y.tolist()) == {0, 1}


def test_eval_batches_cover_the_split_in_order() -> None:
    tasks = PermutedTasks(TRAIN, TEST, 2)
    batches = list(tasks.eval_batches(1, "test", batch_size=7))
    assert [len(b[1]) for b in batches] == [7, 7, 6]
    assert torch.equal(torch.cat([b[1] for b in batches]), TEST.y)


def test_task_id_out_of_range_raises() -> None:
    tasks = PermutedTasks(TRAIN, TEST, 6)
    outside = r"task 6 is outside this permuted set of 6 tasks \(0..5\)"
    with pytest.raises(ValueError, match=outside):
        tasks.get(6, "train", torch.arange(2))
    with pytest.raises(ValueError, match="task -1 is outside"):
        next(tasks.train_batches([0, -1], 4, 1))
    with pytest.raises(ValueError, match="task 9 is outside this split set"):
        SplitTasks(TRAIN, TEST, 5).size(9, "test")


def test_split_with_too_few_labels_raises() -> None:
    too_few = "6 split tasks of 2 classes need 12 labels; the data has 10"
    with pytest.raises(ValueError, match=too_few):
        SplitTasks(TRAIN, TEST, 6, classes_per_task=2)
    with pytest.raises(ValueError, match="classes_per_task must be >= 1"):
        SplitTasks(TRAIN, TEST, 2, classes_per_task=0)


def test_unknown_family_raises() -> None:
    with pytest.raises(ValueError, match=r"unknown task family 'shuffled'; choose one of \["):
        make_tasks("shuffled", TRAIN, TEST, 2)


def test_make_tasks_builds_each_family() -> None:
    assert isinstance(make_tasks("permuted", TRAIN, TEST, 2), PermutedTasks)
    rotated = make_tasks("rotated", TRAIN, TEST, 2, degrees=45.0)
    assert isinstance(rotated, RotatedTasks) and rotated.degrees == 45.0
    split = make_tasks("split", TRAIN, TEST, 2, seed=1, classes_per_task=5)
    assert isinstance(split, SplitTasks) and split.num_classes == 5


def test_bad_tensor_data_shapes_raise() -> None:
    with pytest.raises(ValueError, match=r"x must be \(N, C, H, W\), got shape \(5, 28, 28\)"):
        TensorData(torch.zeros(5, 28, 28), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"y must be \(N,\) with N = 5, got shape \(4,\)"):
        TensorData(torch.zeros(5, 1, 28, 28), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"y must be \(N,\) with N = 5, got shape \(5, 1\)"):
        TensorData(torch.zeros(5, 1, 28, 28), torch.zeros(5, 1, dtype=torch.long))


def test_other_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="num_tasks must be >= 1"):
        PermutedTasks(TRAIN, TEST, 0)
    with pytest.raises(ValueError, match="train and test inputs differ in shape"):
        PermutedTasks(TRAIN, _data(4, 2, (1, 14, 14)), 1)
    tasks = PermutedTasks(TRAIN, TEST, 2)
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        tasks.get(0, "valid", torch.arange(2))
    with pytest.raises(ValueError, match="fewer than the batch size 100"):
        next(tasks.train_batches([0], 100, 1))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        next(tasks.train_batches([0], 0, 1))


def test_split_data_is_a_fixed_disjoint_shuffle() -> None:
    data = TensorData(
        torch.arange(50, dtype=torch.float32).reshape(50, 1, 1, 1), torch.arange(50) % 10
    )
    train, test = split_data(data, 0.2, seed=4)
    assert (len(train), len(test)) == (40, 10)
    ids = torch.cat([train.x.flatten(), test.x.flatten()])
    assert torch.equal(ids.sort().values, torch.arange(50, dtype=torch.float32))
    assert not torch.equal(test.x.flatten(), torch.arange(40, 50, dtype=torch.float32))
    again = split_data(data, 0.2, seed=4)[1]
    assert torch.equal(again.x, test.x)
    with pytest.raises(ValueError, match="test_fraction must be in"):
        split_data(data, 1.0, seed=0)


# ------------------------------------------------------------------------------- devices
def _on_8x8(kind: str) -> TaskSet:
    x, y = torch.randn(64, 1, 8, 8), torch.arange(64) % 4
    options = {"split": {"classes_per_task": 2}}.get(kind, {})
    return make_tasks(kind, TensorData(x, y), TensorData(x, y), 2, 0, **options)


@pytest.mark.parametrize("kind", ["permuted", "rotated", "split"])
def test_tasks_moved_to_a_device_build_every_batch_and_constant_there(kind: str) -> None:
    """`meta` stands in for an accelerator on a CPU-only machine: every tensor a family derives
    (permutations, their group stack, class indices) and every batch it yields must live on the
    data's device, or a GPU worker would copy per step or fail on mixed devices."""
    tasks = _on_8x8(kind)
    assert tasks.to("cpu") is tasks and tasks.device.type == "cpu"
    tasks.to("meta")
    x, y = next(tasks.train_batches([0, 1], 8, 1))
    assert (x.device.type, y.device.type, tuple(x.shape)) == ("meta", "meta", (2, 8, 1, 8, 8))
    x, _ = next(tasks.eval_batches(1, "test", 8))
    assert x.device.type == "meta"
    if isinstance(tasks, PermutedTasks):
        assert tasks.permutation(1).device.type == "meta"
        assert tasks._group_permutations([0, 1]).device.type == "meta"
        x16, _ = next(tasks.train_batches([0], 8, 1, dtype=torch.bfloat16))
        assert x16.dtype == torch.bfloat16 and x16.device.type == "meta"
    if isinstance(tasks, SplitTasks):
        assert {i.device.type for v in tasks._idx.values() for i in v} == {"meta"}


def test_bf16_batches_are_the_float32_batches_rounded() -> None:
    tasks = _on_8x8("permuted")
    for (x32, y32), (x16, y16) in zip(tasks.train_batches([0, 1], 8, 3, seed=4),
                                      tasks.train_batches([0, 1], 8, 3, seed=4,
                                                          dtype=torch.bfloat16)):
        assert torch.equal(x32.to(torch.bfloat16), x16) and torch.equal(y32, y16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["permuted", "rotated", "split"])
def test_tasks_on_cuda_give_the_cpu_batches(kind: str) -> None:
    cpu, gpu = _on_8x8(kind), _on_8x8(kind).to("cuda")
    for (xc, yc), (xg, yg) in zip(cpu.train_batches([0, 1], 8, 3), gpu.train_batches([0, 1], 8, 3)):
        assert xg.is_cuda and yg.is_cuda
        assert torch.allclose(xc, xg.cpu(), atol=1e-5) and torch.equal(yc, yg.cpu())
