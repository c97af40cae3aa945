"""supsup.engine: many queries per pass give each query the one-image path's answer.

Tolerance. The engine's only rounding before float32 is the fixed point of one factor per linear
layer: 2**-14 (2 digits) or 2**-22 (3 digits) of the query's largest |value| per step, half a step
per kept weight (`supsup.bilinear.rounding_bound`, held exactly in tests/supsup/test_bilinear.py).
Against a float64 reference each gradient must be within REL[digits] of the query's largest
|gradient|: the bound's worst case over these networks with a margin of 4 for float32 sums.
"""

from __future__ import annotations

import pytest
import torch

from supsup.bank import MaskBank
from supsup.binding import bind, use_task
from supsup.engine import (
    InferenceEngine,
    Mixture,
    _ResidentTask,
    factor_gradients,
    query_factors,
)
from supsup.inference import _MixtureBinding, alpha_gradients, infer_task
from supsup.networks import SupermaskNet, build_network
from supsup.objectives import get_objective
from supsup.tasks import PermutedTasks
from supsup.train import TrainConfig, add_to_bank, train_group
from tests.supsup.test_inference import (
    CLASSES,
    NUM_TASKS,
    SIDE,
    _blobs,
    _fc,
    _random_bank,
    _random_masks,
)

REL = {2: 4e-4, 3: 4e-6}
NETS = {
    "fc": lambda: _fc(hidden=(64, 32)),
    "conv": lambda: build_network(name="conv", width=2, num_outputs=2 * CLASSES,
                                  num_classes=CLASSES, input_shape=(1, SIDE, SIDE)),
}


@pytest.fixture(scope="module")
def trained() -> tuple[SupermaskNet, MaskBank, PermutedTasks]:
    """Four permuted tasks learned well enough that every test example's task is inferred."""
    tasks = PermutedTasks(_blobs(2048, seed=0), _blobs(256, seed=1), NUM_TASKS, seed=0)
    net = _fc()
    result = train_group(net, tasks, list(range(NUM_TASKS)),
                         TrainConfig(steps=100, lr=1e-2, optimizer="adam", batch_size=64))
    bank = MaskBank(net.layer_shapes())
    add_to_bank(bank, result)
    return net, bank, tasks


def _mixed(tasks: PermutedTasks, per_task: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples of every task, interleaved: (B, 1, SIDE, SIDE) and the task of each."""
    xs, ts = [], []
    for i in range(per_task):
        for t in range(NUM_TASKS):
            xs.append(tasks.get(t, "test", torch.tensor([i]))[0])
            ts.append(t)
    return torch.cat(xs), torch.tensor(ts)


def _reference(net: SupermaskNet, bank: MaskBank, masks: dict, task_ids: list[int],
               x: torch.Tensor, objective: str) -> torch.Tensor:
    """(B, k) float64: autograd of each query alone through a float64 network and mixture,
    times float64 masks."""
    net64 = build_network(net.spec).double()
    k = len(task_ids)
    mix = {key: torch.stack([masks[t][key] for t in task_ids]).double().mean(0)
           for key in net.layer_shapes()}
    bn = {key: bank.mixed_bn_stats(key, bank.rows(task_ids), torch.ones(k)).double()
          for key in net.bn_features()}
    fn = get_objective(objective, net.spec.num_classes)
    net64.eval()
    out = torch.zeros(x.shape[0], k, dtype=torch.float64)
    for b in range(x.shape[0]):
        leaves = {key: m.clone().requires_grad_(True) for key, m in mix.items()}
        with bind(net64, _MixtureBinding(leaves, bn)):
            obj = fn(net64(x[b:b + 1].double())).sum()
        grads = torch.autograd.grad(obj, list(leaves.values()))
        for key, g in zip(leaves, grads):
            stack = torch.stack([masks[t][key] for t in task_ids]).double()
            out[b] += (stack.reshape(k, -1) @ g.reshape(-1))
    return out


@pytest.mark.parametrize("objective", ["entropy", "g"])
@pytest.mark.parametrize("method", ["one_shot", "binary"])
def test_a_mixed_batch_gets_each_queries_one_image_answer(trained: tuple, method: str,
                                                          objective: str) -> None:
    net, bank, tasks = trained
    x, truth = _mixed(tasks)
    engine = InferenceEngine(net, bank, objective=objective)
    result = engine.infer(x, method=method)
    one_image = [int(infer_task(net, bank, x[b:b + 1], method=method, objective=objective,
                                mode="one_image").task_id) for b in range(x.shape[0])]
    assert result.task_ids.tolist() == one_image
    assert result.task_ids.tolist() == truth.tolist()
    assert result.mode == "per_example" and result.gradients.shape == (x.shape[0], NUM_TASKS)
    classes = engine.classify(x, result.task_ids)
    for t in range(NUM_TASKS):  # the trained tasks classify their own examples well
        sel = truth == t
        y = torch.cat([tasks.get(t, "test", torch.tensor([i]))[1] for i in range(int(sel.sum()))])
        assert float((classes[sel] == y).float().mean()) >= 0.8


def _inputs(kind: str, batch: int, seed: int) -> torch.Tensor:
    """Queries of normal values, or of normalised 8-bit pixels (one exact int8 digit)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(batch, 1, SIDE, SIDE, generator=g)
    pixels = torch.randint(0, 256, (batch, 1, SIDE, SIDE), generator=g) * (
        torch.rand(batch, 1, SIDE, SIDE, generator=g) < 0.3)  # mostly blank, like digits
    return (pixels.float() / 255.0 - 0.1307) / 0.3081


@pytest.mark.parametrize(("name", "digits", "inputs"), [
    *[(name, digits, "normal") for name in NETS for digits in (2, 3)],
    ("fc", 2, "pixels"),  # the first linear layer's inputs take one exact digit
])
@pytest.mark.parametrize("objective", ["entropy", "g"])
def test_gradients_are_within_the_stated_tolerance_of_float64(name: str, objective: str,
                                                              digits: int, inputs: str) -> None:
    net = NETS[name]()
    ids = [10, 11, 12, 13, 14, 15, 16]
    bank = _random_bank(net, ids)
    masks = _random_masks(net, ids)
    x = _inputs(inputs, 9, seed=3)
    for task_ids in (ids, [13, 10, 16]):  # every task; a reordered subset
        engine = InferenceEngine(net, bank, objective=objective, task_ids=task_ids,
                                 digits=digits, block_queries=4)
        got = engine.gradients(x).double()
        ref = _reference(net, bank, masks, task_ids, x, objective)
        scale = ref.abs().amax(1, keepdim=True)
        assert bool(((got - ref).abs() <= REL[digits] * scale).all()), (
            float(((got - ref).abs() / scale).max()))
        one_image = torch.stack([alpha_gradients(net, bank, x[b:b + 1], bank.rows(task_ids),
                                                 objective) for b in range(x.shape[0])])
        assert torch.equal(got.argmin(1), one_image.argmin(1))


def test_memory_is_bounded_by_the_blocks_not_the_batch() -> None:
    """4,096 queries hold no more at once than 64 do: blocks of queries, blocks of tasks."""
    net = _fc(hidden=(64, 32))
    bank = _random_bank(net, list(range(40)))
    small = InferenceEngine(net, bank, block_queries=64, budget_bytes=1 << 18)
    large = InferenceEngine(net, bank, block_queries=64, budget_bytes=1 << 18)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4096, 1, SIDE, SIDE, generator=g)
    got = large.gradients(x)
    small.gradients(x[:64])
    assert got.shape == (4096, 40)
    assert 0 < large.peak_block_bytes == small.peak_block_bytes
    # the buffers: a task block within the budget, and one block of queries' factors
    widths = sum(s[0] + s[1] for s in net.layer_shapes().values())
    assert large.peak_block_bytes <= (1 << 18) + 64 * widths * 4
    # every block of queries answers like one query alone
    sample = torch.arange(0, 4096, 511)
    rows = bank.rows(None)
    alone = torch.stack([alpha_gradients(net, bank, x[b:b + 1], rows) for b in sample.tolist()])
    assert torch.equal(got[sample].argmin(1), alone.argmin(1))


@pytest.mark.parametrize("name", list(NETS))
def test_shards_of_task_ranges_give_exactly_the_unsharded_gradients(name: str) -> None:
    """The uniform mixture sums over shards, and each shard's slice of dObj/dalpha comes from the
    same per-query factors: concatenated, they are the whole bank's gradients (bit for bit over
    linear layers, whose per-row sums are exact integers; within float32 rounding over conv
    layers, whose float products sum in blocks shaped by the number of rows)."""
    net = NETS[name]()
    ids = list(range(9))
    whole = _random_bank(net, ids)
    shards = [whole.subset(ids[:4]), whole.subset(ids[4:])]
    x = torch.randn(5, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(8))
    mixture = Mixture.combine([Mixture.of(s, s.rows(None)) for s in shards])
    for key, c in Mixture.of(whole, whole.rows(None)).counts.items():
        assert torch.equal(mixture.counts[key], c)
    factors = query_factors(net, mixture, x)
    parts = [factor_gradients(s, s.rows(None), net, factors) for s in shards]
    got, want = torch.cat(parts, 1), InferenceEngine(net, whole).gradients(x)
    if name == "fc":
        assert torch.equal(got, want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert torch.equal(got.argmin(1), want.argmin(1))


@pytest.mark.parametrize("inputs", ["normal", "pixels"])
def test_resident_masks_answer_bit_for_bit_like_the_packed_bank(inputs: str) -> None:
    """Masks unpacked once (within `resident_bytes`) give the gradients of unpacking per pass."""
    net = _fc(hidden=(64, 32))
    ids = list(range(30))
    bank = _random_bank(net, ids)
    x = _inputs(inputs, 40, seed=4)
    weights = sum(s[0] * s[1] for s in net.layer_shapes().values())
    subset = [29, 3, 17, 4]
    packed = InferenceEngine(net, bank, task_ids=subset, block_queries=16)
    resident = InferenceEngine(net, bank, task_ids=subset, block_queries=16,
                               resident_bytes=len(subset) * weights)
    assert packed.resident_nbytes == 0 and resident.resident_nbytes == len(subset) * weights
    assert torch.equal(resident.gradients(x), packed.gradients(x))
    too_small = InferenceEngine(net, bank, resident_bytes=len(ids) * weights - 1)
    assert too_small.resident_nbytes == 0  # all layers or none: the bank stays packed


def test_resident_masks_classify_exactly_like_the_bank() -> None:
    """Classes under each query's task read from the resident int8 masks (both of the kernel's
    layouts: a layer with more outputs than inputs is stored transposed) equal the bank's
    forward bit for bit; a task outside the engine's candidates is read from the bank."""
    net = build_network(name="fc", hidden=(16, 8), num_outputs=40, num_classes=CLASSES,
                        input_shape=(1, SIDE, SIDE))
    ids = list(range(9))
    bank = _random_bank(net, ids)
    x = _inputs("normal", 30, seed=6)
    task_ids = torch.tensor([i % 9 for i in range(30)])
    subset = [8, 2, 5, 0, 1, 3, 4, 6]  # 7 is not a candidate
    resident = InferenceEngine(net, bank, task_ids=subset, resident_bytes=1 << 20)
    assert resident.resident_nbytes > 0
    want = torch.empty(30, dtype=torch.long)
    for b in range(30):
        with use_task(net, bank, int(task_ids[b])), torch.no_grad():
            want[b] = net(x[b:b + 1])[0, :CLASSES].argmax()
    assert torch.equal(resident.classify(x, task_ids), want)
    assert torch.equal(InferenceEngine(net, bank).classify(x, task_ids), want)
    with bind(net, _ResidentTask(bank, 8, resident.resident, 0)), torch.no_grad():
        from_resident = net(x)  # candidate 0 is task 8
    with use_task(net, bank, 8), torch.no_grad():
        assert torch.equal(from_resident, net(x))  # the logits too, not only their argmax


def test_task_blocks_shared_among_threads_answer_like_one_thread() -> None:
    """workers=3 splits each layer's task blocks among threads (single-threaded kernels). Blocks
    of the same height (here one task each: a budget too small for two) give the one-thread
    gradients bit for bit, packed or resident; blocks of other heights round their float sums
    differently, within float32 rounding, and every answer is the same."""
    net = _fc(hidden=(64, 32))
    ids = list(range(11))
    bank = _random_bank(net, ids)
    x = _inputs("pixels", 24, seed=5)
    weights = sum(s[0] * s[1] for s in net.layer_shapes().values())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # float sums of several threads may round otherwise
        for resident in (0, len(ids) * weights):
            for budget in (1, 16 << 20):
                one = InferenceEngine(net, bank, block_queries=16, resident_bytes=resident,
                                      budget_bytes=budget).gradients(x)
                shared = InferenceEngine(net, bank, block_queries=16, workers=3,
                                         resident_bytes=resident, budget_bytes=budget)
                got = shared.gradients(x)
                if budget == 1:
                    assert torch.equal(got, one)
                torch.testing.assert_close(got, one, rtol=1e-6, atol=1e-7)
                assert torch.equal(got.argmin(1), one.argmin(1))
    finally:
        torch.set_num_threads(threads)


def test_bad_settings_are_named() -> None:
    net = _fc()
    bank = _random_bank(net, [0, 1])
    with pytest.raises(ValueError, match="digits must be 2 or 3"):
        InferenceEngine(net, bank, digits=5)
    with pytest.raises(ValueError, match="workers must be at least 1, got 0"):
        InferenceEngine(net, bank, workers=0)
    with pytest.raises(ValueError, match="the mask bank is empty"):
        InferenceEngine(net, MaskBank(net.layer_shapes()))
    with pytest.raises(ValueError, match="unknown inference method 'nope'"):
        InferenceEngine(net, bank).infer(torch.zeros(1, 1, SIDE, SIDE), method="nope")
    with pytest.raises(KeyError, match="task 7 was never learned"):
        InferenceEngine(net, bank, task_ids=[7])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(NETS))
def test_the_engine_on_cuda_answers_like_the_cpu(name: str) -> None:
    net = NETS[name]()
    bank = _random_bank(net, list(range(20)))
    x = torch.randn(12, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(2))
    cpu = InferenceEngine(net, bank, digits=3).gradients(x)
    gpu_net = build_network(net.spec).cuda()
    gpu = InferenceEngine(gpu_net, bank.to("cuda"), block_queries=5).gradients(x.cuda())
    assert bank.device.type == "cpu"  # the moved bank is a new one
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-7)
    assert torch.equal(gpu.argmin(1), cpu.argmin(1))


def _spy_sparse(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the layers `supsup.sparse_input` answered (it may decline a pass)."""
    import supsup.engine as engine_module

    answered: list[str] = []
    real = engine_module.sparse_alpha_gradients

    def spy(units, weight, factors, **kwargs):  # type: ignore[no-untyped-def]
        out = real(units, weight, factors, **kwargs)
        if out is not None:
            answered.append(tuple(weight.shape))
        return out

    monkeypatch.setattr(engine_module, "sparse_alpha_gradients", spy)
    return answered


@pytest.mark.parametrize("workers", [1, 2])
def test_unit_masks_skip_inputs_at_rest_within_the_tolerance(monkeypatch: pytest.MonkeyPatch,
                                                             workers: int) -> None:
    """With room for `unit_masks` beside the resident masks, passes of many mostly-dark images
    multiply only their lit pixels (and the hidden layers only their ReLUs' non-zeros): every
    gradient within the stated tolerance of float64, every answer the one-image path's."""
    answered = _spy_sparse(monkeypatch)
    net = _fc(hidden=(64, 32))
    ids = [10, 11, 12, 13, 14, 15, 16]
    bank = _random_bank(net, ids)
    masks = _random_masks(net, ids)
    x = _inputs("pixels", 160, seed=11)
    engine = InferenceEngine(net, bank, block_queries=160, resident_bytes=1 << 24,
                             workers=workers)
    assert set(engine.units) == set(net.layer_shapes())
    assert engine.resident_nbytes > 2 * len(ids) * net.num_weights  # both layouts
    got = engine.gradients(x).double()
    assert (64, 196) in answered  # the input layer took its lit pixels
    ref = _reference(net, bank, masks, ids, x, "entropy")
    scale = ref.abs().amax(1, keepdim=True)
    assert bool(((got - ref).abs() <= REL[2] * scale).all()), float(((got - ref).abs()
                                                                      / scale).max())
    one_image = torch.stack([alpha_gradients(net, bank, x[b:b + 1], bank.rows(None))
                             for b in range(x.shape[0])])
    assert torch.equal(got.argmin(1), one_image.argmin(1))
    no_room = InferenceEngine(net, bank, resident_bytes=len(ids) * net.num_weights)
    assert no_room.resident and not no_room.units  # resident masks come first


@pytest.mark.parametrize("objective", ["entropy", "g"])
@pytest.mark.parametrize("method", ["one_shot", "binary"])
def test_a_trained_bank_answers_alike_with_unit_masks(trained: tuple, method: str,
                                                      objective: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Every query's task is found with unit masks as without them (binary: its first round),
    and the buffers of two blocks of queries are bounded by one block's."""
    answered = _spy_sparse(monkeypatch)
    net, bank, tasks = trained
    x, truth = _mixed(tasks, per_task=48)
    block = 96
    engine = InferenceEngine(net, bank, objective=objective, block_queries=block,
                             budget_bytes=1 << 14, resident_bytes=1 << 24)
    result = engine.infer(x, method=method)
    assert answered  # the hidden ReLUs' inputs rest at zero often enough
    assert result.task_ids.tolist() == truth.tolist()
    plain = InferenceEngine(net, bank, objective=objective, block_queries=block)
    assert torch.equal(result.task_ids, plain.infer(x, method=method).task_ids)
    k, widths = NUM_TASKS, sum(s[0] + s[1] for s in net.layer_shapes().values())
    widest = max(max(s) for s in net.layer_shapes().values())
    per_block = (block * k * 4 + block * 2 * (k * 4 + widest) + 12 * block * widest
                 + block * widths * 4)  # accumulator, sums, gathered digits, lit pairs, factors
    assert engine.peak_block_bytes <= max(per_block, (1 << 14) + block * widths * 4)
