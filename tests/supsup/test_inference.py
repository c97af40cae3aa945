"""supsup.inference: the right task is found, alpha gradients from packed bits equal autograd
through a float stack of masks, binary search makes ceil(log2 k) passes, bad input is named."""

from __future__ import annotations

import math

import pytest
import torch

from supsup.bank import MaskBank
from supsup.binding import bind
from supsup.inference import InferenceResult, alpha_gradients, infer_task
from supsup.layers import MaskedLayer, TaskBatchNorm2d
from supsup.networks import SupermaskNet, build_network
from supsup.objectives import get_objective
from supsup.tasks import PermutedTasks, TensorData
from supsup.train import TrainConfig, add_to_bank, train_group

SIDE, CLASSES, NUM_TASKS = 14, 4, 4
METHODS = ["one_shot", "binary"]
MODES = ["one_image", "batch", "per_example"]


def _blobs(n: int, seed: int) -> TensorData:
    """Class-conditional Gaussian blobs. A permutation moves the class means, so unlike i.i.d.
    noise the inputs of each permuted task are recognisably its own."""
    means = 1.5 * torch.randn(CLASSES, SIDE * SIDE, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = means[y] + torch.randn(n, SIDE * SIDE, generator=g)
    return TensorData(x.view(n, 1, SIDE, SIDE), y)


def _fc(hidden: tuple[int, ...] = (128,)) -> SupermaskNet:
    return build_network(name="fc", hidden=hidden, num_outputs=2 * CLASSES, num_classes=CLASSES,
                         input_shape=(1, SIDE, SIDE))


def _random_masks(net: SupermaskNet, task_ids: list[int],
                  seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    """Masks of density 1/2 drawn at random: {task: {layer: 0/1 mask}}."""
    g = torch.Generator().manual_seed(seed)
    return {t: {k: torch.randint(0, 2, s, generator=g).float()
                for k, s in net.layer_shapes().items()} for t in task_ids}


def _random_bank(net: SupermaskNet, task_ids: list[int], seed: int = 0) -> MaskBank:
    """A bank of `_random_masks`, with neutral BN statistics where the network has BN."""
    bank = MaskBank(net.layer_shapes(), net.bn_features())
    for t, masks in _random_masks(net, task_ids, seed).items():
        bank.add(t, masks, _bn_stats(net, t) or None)
    return bank


def _bn_stats(net: SupermaskNet, task_id: int) -> dict[str, torch.Tensor]:
    """Per-task BN statistics (mean, var) that differ between tasks."""
    g = torch.Generator().manual_seed(100 + task_id)
    return {k: torch.stack([torch.randn(c, generator=g) * 0.1,
                            1 + torch.rand(c, generator=g)])
            for k, c in net.bn_features().items()}


@pytest.fixture(scope="module")
def trained() -> tuple[SupermaskNet, MaskBank, PermutedTasks]:
    """Four permuted tasks learned to 100% test accuracy in about a second of training.

    Measured on all 1,024 test examples: one-shot and binary, entropy and G, infer every single
    example's task right, so the few examples the tests use are not a lucky draw.
    """
    tasks = PermutedTasks(_blobs(2048, seed=0), _blobs(256, seed=1), NUM_TASKS, seed=0)
    net = _fc()
    config = TrainConfig(steps=100, lr=1e-2, optimizer="adam", batch_size=64)
    result = train_group(net, tasks, list(range(NUM_TASKS)), config)
    bank = MaskBank(net.layer_shapes())
    add_to_bank(bank, result)
    return net, bank, tasks


def _test_batch(tasks: PermutedTasks, task_id: int, size: int = 8) -> torch.Tensor:
    return tasks.get(task_id, "test", torch.arange(size))[0]


# --------------------------------------------------------------------------- the right task
@pytest.mark.parametrize("objective", ["entropy", "g"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_infers_the_right_task(trained: tuple, method: str, mode: str, objective: str) -> None:
    net, bank, tasks = trained
    for t in range(NUM_TASKS):
        x = _test_batch(tasks, t)
        result = infer_task(net, bank, x, method=method, mode=mode, objective=objective)
        assert result.task_ids.tolist() == [t] * x.shape[0], (t, result.task_ids)
        assert result.task_id == t
        assert result.method == method and result.mode == mode
        assert result.candidates.tolist() == list(range(NUM_TASKS))


@pytest.mark.parametrize("mode", MODES)
def test_result_shapes_and_confidence(trained: tuple, mode: str) -> None:
    net, bank, tasks = trained
    x = _test_batch(tasks, 1, size=5)
    result = infer_task(net, bank, x, mode=mode)
    assert isinstance(result, InferenceResult)
    assert result.task_ids.shape == (5,) and result.task_ids.dtype == torch.long
    want = (5, NUM_TASKS) if mode == "per_example" else (NUM_TASKS,)
    assert result.gradients.shape == want
    assert result.confidence.shape == (5,)
    assert bool((result.confidence >= 1 / NUM_TASKS).all())
    assert bool((result.confidence <= 1).all())
    # The task is the most negative gradient.
    assert bool((result.gradients.argmin(-1) == 1).all())


def test_binary_first_pass_is_the_one_shot_pass(trained: tuple) -> None:
    net, bank, tasks = trained
    x = _test_batch(tasks, 2)
    one_shot = infer_task(net, bank, x, method="one_shot", mode="batch")
    binary = infer_task(net, bank, x, method="binary", mode="batch")
    torch.testing.assert_close(binary.gradients, one_shot.gradients)
    assert one_shot.passes == 1 and binary.passes == 2


# -------------------------------------------------------------------- gradient reference
class _FloatStackBinding:
    """The reference: mixture = sum_i alpha_i M_i from a float stack, differentiable in alphas."""

    group = None

    def __init__(self, stacks: dict[str, torch.Tensor], alphas: torch.Tensor,
                 bn: dict[str, torch.Tensor]) -> None:
        self.stacks, self.alphas, self.bn = stacks, alphas, bn

    def mask(self, layer: MaskedLayer) -> torch.Tensor:
        return torch.tensordot(self.alphas, self.stacks[layer.key], dims=1)

    def bn_stats(self, layer: TaskBatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        # The superposition's BN statistics mix the tasks' own like the masks do, as constants:
        # the alpha gradient flows through the masks only.
        s = torch.tensordot(self.alphas.detach(), self.bn[layer.key], dims=1)
        return s[0], s[1]


def _reference(net: SupermaskNet, masks: dict[int, dict[str, torch.Tensor]], x: torch.Tensor,
               task_ids: list[int], objective: str, per_example: bool) -> torch.Tensor:
    stacks = {k: torch.stack([masks[t][k] for t in task_ids]) for k in net.layer_shapes()}
    bn = {k: torch.stack([_bn_stats(net, t)[k] for t in task_ids]) for k in net.bn_features()}
    alphas = torch.full((len(task_ids),), 1.0 / len(task_ids), requires_grad=True)
    net.eval()
    with bind(net, _FloatStackBinding(stacks, alphas, bn)):
        obj = get_objective(objective, net.spec.num_classes)(net(x))  # (B,)
    if not per_example:
        return torch.autograd.grad(obj.mean(), alphas)[0]
    return torch.stack([torch.autograd.grad(o, alphas, retain_graph=True)[0] for o in obj])


REFERENCE_NETS = {
    "fc": lambda: _fc(),
    # A hidden layer of one unit: its weight is (1, in), which must not be read as a batch of one.
    "fc-one-unit": lambda: _fc(hidden=(1,)),
    "conv": lambda: build_network(name="conv", width=2, num_outputs=2 * CLASSES,
                                  num_classes=CLASSES, input_shape=(1, SIDE, SIDE)),
}


@pytest.mark.parametrize("per_example", [False, True])
@pytest.mark.parametrize("objective", ["entropy", "g"])
@pytest.mark.parametrize("name", list(REFERENCE_NETS))
def test_alpha_gradients_equal_float_stack_autograd(name: str, objective: str,
                                                    per_example: bool) -> None:
    net = REFERENCE_NETS[name]()
    bank = _random_bank(net, [10, 11, 12, 13, 14])
    masks = _random_masks(net, [10, 11, 12, 13, 14])  # the same draws, as float tensors
    x = torch.randn(6, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(3))
    for task_ids in ([10, 11, 12, 13, 14], [13, 10, 14]):  # every task; a reordered subset
        rows = bank.rows(task_ids)
        got = alpha_gradients(net, bank, x, rows, objective, per_example=per_example)
        want = _reference(net, masks, x, task_ids, objective, per_example)
        assert got.shape == want.shape
        scale = float(want.abs().max())
        assert scale > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)


def test_per_example_gradients_average_to_the_batch_gradient(trained: tuple) -> None:
    net, bank, tasks = trained
    x = _test_batch(tasks, 3)
    rows = bank.rows(None)
    per_example = alpha_gradients(net, bank, x, rows, per_example=True)
    torch.testing.assert_close(per_example.mean(0), alpha_gradients(net, bank, x, rows),
                               rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- binary passes
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17])
def test_binary_makes_ceil_log2_k_passes(k: int) -> None:
    net = _fc(hidden=(16,))
    bank = _random_bank(net, list(range(100, 100 + k)), seed=k)
    x = torch.randn(3, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(k))
    result = infer_task(net, bank, x, method="binary", mode="batch")
    # Each pass keeps ceil(half) of the survivors; one pass is needed even to rank one task.
    assert result.passes == max(1, math.ceil(math.log2(k)))
    assert int(result.task_ids[0]) in bank.task_ids
    per_example = infer_task(net, bank, x, method="binary", mode="per_example")
    assert per_example.passes == result.passes
    assert per_example.gradients.shape == (3, k)


def test_binary_follows_the_halving_rule() -> None:
    """Replayed with alpha_gradients: keep the ceil(half) smallest gradients, re-spread alpha."""
    net = _fc(hidden=(16,))
    bank = _random_bank(net, list(range(20, 27)), seed=5)  # k = 7: 7 -> 4 -> 2 -> 1
    for seed in range(4):
        x = torch.randn(2, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))
        rows = bank.rows(None)
        while rows.numel() > 1:
            grads = alpha_gradients(net, bank, x, rows)
            keep = grads.topk(math.ceil(rows.numel() / 2), largest=False).indices.sort().values
            rows = rows[keep]
        result = infer_task(net, bank, x, method="binary", mode="batch")
        assert int(result.task_ids[0]) == bank.task_ids[int(rows[0])]
        assert result.passes == 3


# ------------------------------------------------------------------------------ candidates
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_restricted_candidates_are_the_only_answers(trained: tuple, method: str,
                                                    mode: str) -> None:
    net, bank, tasks = trained
    for t in range(NUM_TASKS):
        x = _test_batch(tasks, t, size=4)
        allowed = [u for u in range(NUM_TASKS) if u != t][:2]  # the right task is excluded
        result = infer_task(net, bank, x, method=method, mode=mode, task_ids=allowed)
        assert set(result.task_ids.tolist()) <= set(allowed)
        assert result.candidates.tolist() == allowed
        # With the right task among the candidates it is still found.
        result = infer_task(net, bank, x, method=method, mode=mode, task_ids=[allowed[0], t])
        assert result.task_ids.tolist() == [t] * 4


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_a_bank_of_one_task_returns_it(method: str, mode: str) -> None:
    net = _fc(hidden=(16,))
    bank = _random_bank(net, [42])
    x = torch.randn(3, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    result = infer_task(net, bank, x, method=method, mode=mode)
    assert result.task_ids.tolist() == [42, 42, 42]
    assert result.candidates.tolist() == [42]
    assert bool((result.confidence == 1).all())


# ------------------------------------------------------------------------------- bad input
def test_wrong_input_shape_names_the_expected_shape(trained: tuple) -> None:
    net, bank, _ = trained
    with pytest.raises(ValueError, match=r"expects input \(B, 1, 14, 14\), got \(2, 1, 28, 28\)"):
        infer_task(net, bank, torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"expects input \(B, 1, 14, 14\)"):
        infer_task(net, bank, torch.zeros(1, 14, 14))


def test_unknown_method_and_mode_are_named(trained: tuple) -> None:
    net, bank, tasks = trained
    x = _test_batch(tasks, 0)
    with pytest.raises(ValueError, match="unknown inference method 'ternary'"):
        infer_task(net, bank, x, method="ternary")
    with pytest.raises(ValueError, match="unknown inference mode 'half_batch'"):
        infer_task(net, bank, x, mode="half_batch")
    with pytest.raises(ValueError, match="unknown objective 'kl'"):
        infer_task(net, bank, x, objective="kl")


def test_empty_bank_and_empty_batch_are_refused(trained: tuple) -> None:
    net, bank, tasks = trained
    with pytest.raises(ValueError, match="mask bank is empty"):
        infer_task(net, MaskBank(net.layer_shapes()), _test_batch(tasks, 0))
    with pytest.raises(ValueError, match="empty batch"):
        infer_task(net, bank, torch.zeros(0, 1, SIDE, SIDE))


def test_unlearned_candidate_is_a_key_error(trained: tuple) -> None:
    net, bank, tasks = trained
    with pytest.raises(KeyError, match="task 9 was never learned"):
        infer_task(net, bank, _test_batch(tasks, 0), task_ids=[0, 9])


def test_g_needs_superfluous_outputs() -> None:
    net = build_network(name="fc", hidden=(8,), num_outputs=CLASSES, num_classes=CLASSES,
                        input_shape=(1, SIDE, SIDE))
    bank = _random_bank(net, [0, 1])
    with pytest.raises(ValueError, match="use objective 'entropy'"):
        infer_task(net, bank, torch.zeros(2, 1, SIDE, SIDE), objective="g")


def test_a_bank_on_another_device_than_the_network_is_named() -> None:
    """Inference never splits itself silently between the host and a device: `meta` stands in
    for an accelerator on a CPU-only machine."""
    net = _fc()
    bank = _random_bank(net, [0, 1, 2])
    x = torch.randn(2, *net.spec.input_shape)
    net.to("meta")
    with pytest.raises(ValueError, match=r"the bank is on cpu and the network on meta: keep both "
                                         r"on one device \(bank.to\('meta'\)"):
        alpha_gradients(net, bank, x, bank.rows(None))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["one_image", "per_example"])
def test_inference_on_cuda_equals_the_cpu(trained: tuple, mode: str) -> None:
    net, bank, tasks = trained
    x = _test_batch(tasks, 2)
    cpu = infer_task(net, bank, x, mode=mode)
    gpu_net = build_network(net.spec).cuda()
    gpu = infer_task(gpu_net, bank.to("cuda"), x.cuda(), mode=mode)
    assert torch.equal(cpu.task_ids, gpu.task_ids.cpu())
    assert torch.allclose(cpu.gradients, gpu.gradients.cpu(), rtol=1e-3, atol=1e-6)
