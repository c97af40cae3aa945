"""supsup.binding: superposition equal to the single task for one-hot alphas, alpha gradients
equal to autograd through a float stack, per-task BN statistics in eval mode, and context
managers that always restore what was bound before."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from supsup.bank import MaskBank
from supsup.binding import bind, use_alphas, use_scores, use_task, use_tasks
from supsup.layers import MaskedLayer, TaskBatchNorm2d
from supsup.networks import NetworkSpec, SupermaskNet, build_network
from supsup.scores import TaskScores

SPECS = {
    "fc": NetworkSpec(name="fc", hidden=(32, 16), input_shape=(1, 8, 8), num_outputs=12),
    "conv": NetworkSpec(name="conv", width=4, input_shape=(1, 12, 12), num_outputs=12),
}
TASKS = [5, 0, 3, 8]
BATCH = 6


class _FloatStackBinding:
    """Reference superposition: W * sum_i alphas_i M_i with a float32 stack and plain autograd."""

    group = None

    def __init__(self, stacks: dict[str, torch.Tensor], alphas: torch.Tensor) -> None:
        self.stacks, self.alphas = stacks, alphas

    def mask(self, layer: MaskedLayer) -> torch.Tensor:
        return torch.tensordot(self.alphas, self.stacks[layer.key], dims=1)

    def bn_stats(self, layer: TaskBatchNorm2d) -> None:
        return None


@functools.cache
def _trained_bank(name: str) -> tuple[SupermaskNet, MaskBank]:
    """A network and a bank of TASKS exported from TaskScores whose BN statistics have moved.

    Cached: tests only read the bank and set the network's mode themselves.
    """
    net = build_network(SPECS[name])
    scores = TaskScores(net, TASKS)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad(), use_scores(net, scores):
        for _ in range(3):  # train-mode passes move each task's running statistics
            net(torch.randn(len(TASKS), BATCH, *net.spec.input_shape, generator=g) * 2 + 1)
    bank = MaskBank(net.layer_shapes(), net.bn_features())
    for task_id, (masks, stats) in scores.export().items():
        bank.add(task_id, masks, stats)
    return net, bank


def _x(net: SupermaskNet, *lead: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, *net.spec.input_shape, generator=g)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_one_hot_alphas_equal_single_task(name: str) -> None:
    net, bank = _trained_bank(name)
    net.train()  # superposition uses batch statistics: compare with the task in train mode
    x = _x(net, BATCH)
    for i, task_id in enumerate(TASKS):
        alphas = F.one_hot(torch.tensor(i), len(TASKS)).float()
        with torch.no_grad():
            with use_alphas(net, bank, alphas):
                mixed = net(x)
            with use_task(net, bank, task_id):
                single = net(x)
        torch.testing.assert_close(mixed, single, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("order", ["bank", "reversed", "subset"])
@pytest.mark.parametrize("alpha_kind", ["uniform", "random"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_alpha_gradient_equals_float_stack_autograd(name: str, alpha_kind: str, order: str) -> None:
    net, bank = _trained_bank(name)
    task_ids = {"bank": TASKS, "reversed": TASKS[::-1], "subset": [3, 5]}[order]
    k = len(task_ids)
    if alpha_kind == "uniform":
        alphas = torch.full((k,), 1 / k)
    else:
        alphas = torch.rand(k, generator=torch.Generator().manual_seed(3)) + 0.2
    x = _x(net, BATCH)

    def objective(logits: torch.Tensor) -> torch.Tensor:
        p = logits.softmax(-1)
        return -(p * logits.log_softmax(-1)).sum(-1).mean()  # entropy, as in task inference

    packed_alphas = alphas.clone().requires_grad_()
    with use_alphas(net, bank, packed_alphas, task_ids=task_ids):
        objective(net(x)).backward()
    stacks = {key: bank.masks(task_ids, key) for key in net.layer_shapes()}
    reference_alphas = alphas.clone().requires_grad_()
    with bind(net, _FloatStackBinding(stacks, reference_alphas)):
        objective(net(x)).backward()
    assert packed_alphas.grad is not None and reference_alphas.grad is not None
    torch.testing.assert_close(packed_alphas.grad, reference_alphas.grad, rtol=1e-4, atol=1e-6)


def test_use_alphas_rejects_wrong_length() -> None:
    net, bank = _trained_bank("fc")
    with pytest.raises(ValueError, match=r"one entry per task \(4\), got shape \(3,\)"):
        use_alphas(net, bank, torch.ones(3))
    with pytest.raises(ValueError, match="one entry per task"):
        use_alphas(net, bank, torch.ones(2, 2))


def test_contexts_restore_previous_binding() -> None:
    net, bank = _trained_bank("fc")
    x = _x(net, BATCH)
    with torch.no_grad():
        with use_task(net, bank, 5):
            out5 = net(x)
            with use_task(net, bank, 0):
                out0 = net(x)
                with use_alphas(net, bank, torch.full((4,), 0.25)):
                    assert not torch.equal(net(x), out0)
                assert torch.equal(net(x), out0)
            assert not torch.equal(out0, out5)
            assert torch.equal(net(x), out5)

            class Boom(Exception):
                pass

            with pytest.raises(Boom), use_task(net, bank, 3):
                raise Boom
            assert torch.equal(net(x), out5)
        with pytest.raises(RuntimeError, match="use_task"):
            net(x)
        with pytest.raises(KeyError), use_task(net, bank, 8):
            bank.row(99)  # an error inside the outermost binding still unbinds
        with pytest.raises(RuntimeError, match="use_task"):
            net(x)


def test_never_learned_task_raises_naming_it() -> None:
    net, bank = _trained_bank("fc")
    with pytest.raises(KeyError, match=r"task 7 was never learned; the bank holds tasks \[5, 0"):
        use_task(net, bank, 7)
    with pytest.raises(KeyError, match="task 7 was never learned"):
        use_tasks(net, bank, [5, 7])
    with pytest.raises(KeyError, match="task 7 was never learned"):
        use_alphas(net, bank, torch.ones(2), task_ids=[0, 7])
    with pytest.raises(RuntimeError, match="use_task"):  # nothing was left bound
        net(_x(net, BATCH))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_use_tasks_equals_per_task_outputs(name: str) -> None:
    net, bank = _trained_bank(name)
    net.eval()
    group = [3, 5, 8]
    x = _x(net, len(group), BATCH)
    with torch.no_grad():
        with use_tasks(net, bank, group):
            grouped = net(x)
        assert grouped.shape == (len(group), BATCH, net.spec.num_outputs)
        for g, task_id in enumerate(group):
            with use_task(net, bank, task_id):
                torch.testing.assert_close(grouped[g], net(x[g]), rtol=1e-5, atol=1e-5)


def test_batchnorm_uses_bank_statistics_in_eval_mode() -> None:
    net, bank = _trained_bank("conv")
    net.eval()
    bns = net.bn_layers()
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        bn.register_forward_hook(lambda m, args, out: seen.__setitem__(m.key, (args[0], out)))
        for bn in bns.values()
    ]
    try:
        before = {key: bank.bn_stats(TASKS, key) for key in bns}
        x = _x(net, BATCH)
        with torch.no_grad():
            for task_id in (5, 3):
                with use_task(net, bank, task_id):
                    out = net(x)
                    # Eval mode: each example is normalised alone, whatever else is in the batch.
                    torch.testing.assert_close(net(x[:1]), out[:1], rtol=1e-5, atol=1e-5)
                    net(x)  # refill `seen` with the full batch
                for key, bn in bns.items():
                    mean, var = bank.bn_stats(task_id, key)
                    assert not torch.equal(mean, torch.zeros_like(mean))  # the stats really moved
                    inp, got = seen[key]
                    expected = (inp - mean[:, None, None]) / (var[:, None, None] + bn.eps).sqrt()
                    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            with use_tasks(net, bank, [5, 3]):  # group mode: the folded channels of each task
                net(_x(net, 2, BATCH))
            for key, bn in bns.items():
                stats = bank.bn_stats([5, 3], key)  # (2, 2, C)
                mean, var = stats[:, 0].reshape(-1), stats[:, 1].reshape(-1)
                inp, got = seen[key]
                expected = (inp - mean[:, None, None]) / torch.sqrt(var[:, None, None] + bn.eps)
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    finally:  # the network is shared by the module's tests
        for h in hooks:
            h.remove()
    for key in bns:  # evaluation never writes back into the bank
        assert torch.equal(bank.bn_stats(TASKS, key), before[key])


def test_task_in_batch_statistics_mode_never_writes_into_bank() -> None:
    net, bank = _trained_bank("conv")
    before = {key: bank.bn_stats(TASKS, key) for key in net.bn_layers()}
    with torch.no_grad(), use_task(net, bank, 0):
        net.train()(_x(net, BATCH) + 5)
    for key in before:
        assert torch.equal(bank.bn_stats(TASKS, key), before[key])
