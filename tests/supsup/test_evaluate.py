"""supsup.evaluate: GG and GN accuracy per task, the paper's GN count against the per-example one,
example-weighted summaries, and unknown tasks named."""

from __future__ import annotations

import pytest
import torch

from supsup.bank import MaskBank
from supsup.binding import use_task
from supsup.evaluate import (
    TaskEvaluation,
    evaluate_group,
    evaluate_task,
    evaluate_tasks,
    scores_accuracy,
    summarize,
)
from supsup.networks import SupermaskNet, build_network
from supsup.scores import TaskScores
from supsup.tasks import PermutedTasks, TensorData
from supsup.train import TrainConfig, TrainResult, train_group

SIDE, CLASSES, NUM_TASKS, TEST_SIZE = 14, 4, 3, 200


def _blobs(n: int, seed: int) -> TensorData:
    """Class-conditional Gaussian blobs; a permutation moves the means, so tasks are tellable."""
    means = 1.5 * torch.randn(CLASSES, SIDE * SIDE, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = means[y] + torch.randn(n, SIDE * SIDE, generator=g)
    return TensorData(x.view(n, 1, SIDE, SIDE), y)


@pytest.fixture(scope="module")
def trained() -> tuple[SupermaskNet, TrainResult, PermutedTasks]:
    """Three permuted tasks learned to ~100% accuracy, inferred right from a single image."""
    tasks = PermutedTasks(_blobs(2048, seed=0), _blobs(TEST_SIZE, seed=1), NUM_TASKS, seed=0)
    net = build_network(name="fc", hidden=(128,), num_outputs=2 * CLASSES, num_classes=CLASSES,
                        input_shape=(1, SIDE, SIDE))
    config = TrainConfig(steps=100, lr=1e-2, optimizer="adam", batch_size=64)
    return net, train_group(net, tasks, list(range(NUM_TASKS)), config), tasks


def _bank(net: SupermaskNet, result: TrainResult, masks_of: dict[int, int]) -> MaskBank:
    """A bank whose task t holds the learned mask of task masks_of[t]."""
    bank = MaskBank(net.layer_shapes())
    for t, source in masks_of.items():
        bank.add(t, result.masks[source])
    return bank


def _accuracy(net: SupermaskNet, bank: MaskBank, mask_task: int, tasks: PermutedTasks,
              data_task: int) -> float:
    """Test accuracy of bank task `mask_task`'s mask on task `data_task`'s test split."""
    (x, y), = tasks.eval_batches(data_task, "test", 10_000)
    with use_task(net, bank, mask_task), torch.no_grad():
        return float((net(x)[:, :CLASSES].argmax(1) == y).float().mean())


# -------------------------------------------------------------------------------- GG and GN
@pytest.mark.parametrize("mode", ["one_image", "batch", "per_example"])
def test_gg_and_gn_when_every_task_is_inferred_right(trained: tuple, mode: str) -> None:
    net, result, tasks = trained
    bank = _bank(net, result, {t: t for t in range(NUM_TASKS)})
    for t in range(NUM_TASKS):
        ev = evaluate_task(net, bank, tasks, t, batch_size=64, mode=mode)
        assert ev.task_id == t and ev.examples == TEST_SIZE
        assert ev.accuracy_gg == pytest.approx(_accuracy(net, bank, t, tasks, t), abs=1e-9)
        assert ev.accuracy_gg >= 0.95  # separable blobs; chance is 1/4; measured 1.0
        # Every inference is right, so both GN counts equal GG.
        assert ev.task_inference_accuracy == 1.0
        assert ev.accuracy_gn == ev.accuracy_gg == ev.accuracy_gn_per_example
        batches = 4  # ceil(200 / 64)
        assert ev.inferences == (TEST_SIZE if mode == "per_example" else batches)
        assert ev.inferred == {t: ev.inferences}


def test_gn_is_not_evaluated_when_not_asked(trained: tuple) -> None:
    net, result, tasks = trained
    bank = _bank(net, result, {0: 0, 1: 1})
    ev = evaluate_task(net, bank, tasks, 1, gn=False)
    assert ev.accuracy_gn is None and ev.accuracy_gn_per_example is None
    assert ev.task_inference_accuracy is None and ev.inferences == 0 and ev.inferred is None
    assert ev.accuracy_gg >= 0.95


def test_paper_count_is_zero_when_the_task_is_always_wrong(trained: tuple) -> None:
    """Task 1 of this bank holds task 0's own mask; inferring task 0's batches as task 1 is wrong
    by id but predicts exactly as well: the paper counts 0, per example counts every hit."""
    net, result, tasks = trained
    bank = _bank(net, result, {0: 0, 1: 0, 2: 2})
    ev = evaluate_task(net, bank, tasks, 0, batch_size=50, candidates=[1, 2])
    assert ev.task_inference_accuracy == 0.0
    assert ev.inferred == {1: 4}
    assert ev.accuracy_gn == 0.0
    assert ev.accuracy_gn_per_example == ev.accuracy_gg >= 0.95


@pytest.mark.parametrize("mode", ["one_image", "per_example"])
def test_paper_count_never_exceeds_the_per_example_count(trained: tuple, mode: str) -> None:
    """Task 0 among candidates that exclude it: every inference names a wrong task, whose mask
    still gets some examples right by chance (four classes)."""
    net, result, tasks = trained
    bank = _bank(net, result, {t: t for t in range(NUM_TASKS)})
    ev = evaluate_task(net, bank, tasks, 0, batch_size=TEST_SIZE, candidates=[1, 2], mode=mode)
    assert ev.task_inference_accuracy == 0.0
    assert ev.accuracy_gn == 0.0
    assert ev.accuracy_gn_per_example is not None and ev.accuracy_gn_per_example > 0.0
    # Per example, each prediction is scored with the mask it was inferred to need.
    assert set(ev.inferred) <= {1, 2}  # type: ignore[arg-type]
    assert sum(ev.inferred.values()) == ev.inferences  # type: ignore[union-attr]
    if mode == "one_image":
        (t,) = ev.inferred  # type: ignore[misc]
        assert ev.accuracy_gn_per_example == pytest.approx(_accuracy(net, bank, t, tasks, 0))


def test_per_example_mode_mixes_right_and_wrong_inferences(trained: tuple) -> None:
    """Half of the batch comes from task 0, half from task 1; evaluated as task 0, per example.

    The paper's count takes only examples inferred as task 0 and right; per example also keeps
    task 1's examples that task 1's mask classifies right.
    """
    net, result, _ = trained
    bank = _bank(net, result, {t: t for t in range(NUM_TASKS)})

    class Mixed(PermutedTasks):
        """Task 0's test split of TEST_SIZE examples, its second half permuted as task 1."""

        def transform(self, task_id: int, x: torch.Tensor,
                      y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out, y = super().transform(task_id, x, y)
            if task_id == 0 and x.shape[0] == TEST_SIZE:
                out[TEST_SIZE // 2:] = super().transform(1, x[TEST_SIZE // 2:], y)[0]
            return out, y

    mixed = Mixed(_blobs(64, seed=0), _blobs(TEST_SIZE, seed=1), NUM_TASKS, seed=0)
    ev = evaluate_task(net, bank, mixed, 0, batch_size=TEST_SIZE, mode="per_example")
    assert ev.inferred == {0: TEST_SIZE // 2, 1: TEST_SIZE // 2}
    assert ev.task_inference_accuracy == 0.5
    (x, y), = mixed.eval_batches(0, "test", TEST_SIZE)
    half = TEST_SIZE // 2
    hits = {}
    for t, part in ((0, slice(0, half)), (1, slice(half, None))):
        with use_task(net, bank, t), torch.no_grad():
            hits[t] = int((net(x[part])[:, :CLASSES].argmax(1) == y[part]).sum())
    assert ev.accuracy_gn == hits[0] / TEST_SIZE
    assert ev.accuracy_gn_per_example == (hits[0] + hits[1]) / TEST_SIZE
    assert ev.accuracy_gn < ev.accuracy_gn_per_example
    # Measured: hits 100 + 100, so GN 0.5 and per example 1.0; GG, which runs task 0's mask on
    # task 1's half too, gets about chance there.
    assert ev.accuracy_gn_per_example >= 0.95
    assert ev.accuracy_gg < ev.accuracy_gn_per_example


# --------------------------------------------------------------------------------- several
def test_evaluate_tasks_covers_the_bank_in_order_with_a_callback(trained: tuple) -> None:
    net, result, tasks = trained
    bank = _bank(net, result, {2: 2, 0: 0})
    seen: list[TaskEvaluation] = []
    out = evaluate_tasks(net, bank, tasks, callback=seen.append, batch_size=100)
    assert [e.task_id for e in out] == [2, 0] and seen == out
    only = evaluate_tasks(net, bank, tasks, [0], gn=False)
    assert [e.task_id for e in only] == [0] and only[0].accuracy_gn is None


@pytest.mark.parametrize(("mode", "method"), [("one_image", "one_shot"),
                                              ("per_example", "one_shot"),
                                              ("one_image", "binary")])
@pytest.mark.parametrize("candidates", [None, [1, 2]])
def test_a_group_answered_together_counts_what_each_task_alone_counts(
        trained: tuple, mode: str, method: str, candidates: list[int] | None) -> None:
    """The engine answers every test batch's queries of the group in shared passes (3 queries a
    pass here, so passes mix tasks and batches); the counts equal the one-query-at-a-time path,
    also when every inference is wrong (task 0 among candidates 1 and 2)."""
    net, result, tasks = trained
    bank = _bank(net, result, {t: t for t in range(NUM_TASKS)})
    options = dict(batch_size=30, mode=mode, method=method, candidates=candidates,
                   max_batches=5 if mode == "one_image" else 2)
    alone = [evaluate_task(net, bank, tasks, t, **options) for t in range(NUM_TASKS)]
    together = evaluate_group(net, bank, tasks, list(range(NUM_TASKS)), queries_per_pass=3,
                              **options)
    assert together == alone
    assert sum(r.inferences for r in together) == NUM_TASKS * (
        5 if mode == "one_image" else 60)


def test_summarize_weights_by_examples_and_inferences() -> None:
    a = TaskEvaluation(0, 100, 0.9, 0.5, 0.7, 0.5, inferences=2, inferred={0: 1, 1: 1})
    b = TaskEvaluation(1, 300, 0.5, 0.3, 0.4, 1.0, inferences=6, inferred={1: 6})
    s = summarize([a, b])
    assert s["tasks"] == 2.0 and s["examples"] == 400.0
    assert s["accuracy_gg"] == pytest.approx((0.9 * 100 + 0.5 * 300) / 400)
    assert s["accuracy_gn"] == pytest.approx((0.5 * 100 + 0.3 * 300) / 400)
    assert s["accuracy_gn_per_example"] == pytest.approx((0.7 * 100 + 0.4 * 300) / 400)
    assert s["task_inference_accuracy"] == pytest.approx((0.5 * 2 + 1.0 * 6) / 8)
    assert s["inferences"] == 8.0


def test_summarize_leaves_out_gn_unless_every_task_has_it() -> None:
    a = TaskEvaluation(0, 10, 1.0)
    b = TaskEvaluation(1, 30, 0.0, 0.0, 0.0, 0.0, inferences=1, inferred={0: 1})
    s = summarize([a, b])
    assert s == {"tasks": 2.0, "examples": 40.0, "accuracy_gg": 0.25}
    with pytest.raises(ValueError, match="no task results"):
        summarize([])


def test_to_dict_has_every_field() -> None:
    d = TaskEvaluation(3, 10, 0.5, 0.4, 0.45, 0.8, 5, {3: 4, 1: 1}).to_dict()
    assert d == {"task_id": 3, "examples": 10, "accuracy_gg": 0.5, "accuracy_gn": 0.4,
                 "accuracy_gn_per_example": 0.45, "task_inference_accuracy": 0.8,
                 "inferences": 5, "inferred": {3: 4, 1: 1}}


def test_scores_accuracy_equals_gg_of_the_exported_masks(trained: tuple) -> None:
    net, _, tasks = trained
    scores = TaskScores(net, [2, 0])
    result = train_group(net, tasks, [2, 0], TrainConfig(steps=30, lr=1e-2, batch_size=64),
                         scores=scores)
    bank = _bank(net, result, {2: 2, 0: 0})
    net.eval()
    during = scores_accuracy(net, scores, tasks, batch_size=64)
    assert during == [evaluate_task(net, bank, tasks, t, gn=False).accuracy_gg for t in (2, 0)]
    # Capped at one batch of 64 examples: a multiple of 1/64.
    capped = scores_accuracy(net, scores, tasks, batch_size=64, max_batches=1)
    assert all(round(a * 64) == a * 64 for a in capped)


# ------------------------------------------------------------------------------ bad input
def test_a_task_not_in_the_bank_is_a_key_error_naming_it(trained: tuple) -> None:
    net, result, tasks = trained
    bank = _bank(net, result, {0: 0, 1: 1})
    with pytest.raises(KeyError, match=r"task 2 was never learned; the bank holds tasks \[0, 1\]"):
        evaluate_task(net, bank, tasks, 2)
    with pytest.raises(KeyError, match="task 2 was never learned"):
        evaluate_tasks(net, bank, tasks, [0, 2])


def test_an_unlearned_candidate_is_a_key_error(trained: tuple) -> None:
    net, result, tasks = trained
    bank = _bank(net, result, {0: 0, 1: 1})
    with pytest.raises(KeyError, match="task 5 was never learned"):
        evaluate_task(net, bank, tasks, 0, candidates=[0, 5])


def test_a_task_without_test_examples_is_named(trained: tuple) -> None:
    net, result, _ = trained
    empty = TensorData(torch.zeros(0, 1, SIDE, SIDE), torch.zeros(0, dtype=torch.long))
    tasks = PermutedTasks(_blobs(64, seed=0), empty, NUM_TASKS, seed=0)
    bank = _bank(net, result, {0: 0})
    with pytest.raises(ValueError, match="task 0 has no test examples"):
        evaluate_task(net, bank, tasks, 0)
