"""pipeline.accuracy_matrix: the standard summaries computed by hand on small matrices."""

from __future__ import annotations

import pytest

from pipeline.accuracy_matrix import AccuracyMatrix, continual_metrics
from pipeline.jobs.evaluate import curve_points, matrix_columns

# Three tasks learned one at a time (the full, unsampled matrix of Lopez-Paz & Ranzato):
#   after 1: [0.9,  -,    -  ]
#   after 2: [0.8,  0.7,  -  ]
#   after 3: [0.6,  0.75, 0.5]
FULL = AccuracyMatrix.from_cells([1, 2, 3], [0, 1, 2], {
    (1, 0): 0.9, (2, 0): 0.8, (3, 0): 0.6,
    (2, 1): 0.7, (3, 1): 0.75,
    (3, 2): 0.5,
})


def test_summaries_follow_the_standard_definitions() -> None:
    assert FULL.average_accuracy() == pytest.approx((0.6 + 0.75 + 0.5) / 3)
    # BWT: mean over the tasks before the last of A[T][j] - A[j][j]
    assert FULL.backward_transfer() == pytest.approx(((0.6 - 0.9) + (0.75 - 0.7)) / 2)
    # forgetting: best earlier row minus the last; task 1 improved, so its term is negative
    assert FULL.forgetting() == pytest.approx(((0.9 - 0.6) + (0.7 - 0.75)) / 2)
    assert [FULL.own_row(t) for t in (0, 1, 2)] == [0, 1, 2]


def test_an_unchanging_matrix_has_zero_forgetting_and_transfer() -> None:
    """GG of SupSup: a learned task's accuracy is the same at every later row, exactly."""
    cells = {(k, t): 0.5 + 0.1 * t for k in (2, 4, 6) for t in (0, 1, 3, 5) if t < k}
    m = AccuracyMatrix.from_cells([2, 4, 6], [0, 1, 3, 5], cells)
    assert m.forgetting() == 0.0 and m.backward_transfer() == 0.0
    assert m.values[0] == (0.5, 0.6, None, None)  # tasks 3 and 5 not yet learned


def test_one_row_has_no_forgetting_and_the_final_accuracies_give_acc() -> None:
    m = AccuracyMatrix.from_cells([4], [0, 3], {(4, 0): 0.5, (4, 3): 1.0})
    assert m.forgetting() is None and m.backward_transfer() is None
    metrics = continual_metrics({"gn": m}, {"gn": [0.5, 1.0, 0.0, 0.5]})
    assert metrics == {"average_accuracy_gn": 0.5, "forgetting_gn": None,
                       "backward_transfer_gn": None}
    assert continual_metrics({"gn": m}, {})["average_accuracy_gn"] == 0.75


def test_round_trip_and_bad_shapes() -> None:
    assert AccuracyMatrix.from_dict(FULL.to_dict()) == FULL
    with pytest.raises(ValueError, match="tasks_learned must be ascending"):
        AccuracyMatrix((3, 2), (0,), ((0.1,), (0.2,)))
    with pytest.raises(ValueError, match="2 rows of 1 columns"):
        AccuracyMatrix((1, 2), (0,), ((0.1,),))


@pytest.mark.parametrize("num_tasks, points, sample", [(6, 3, 10), (2500, 6, 10), (40, 6, 3)])
def test_columns_hold_each_rows_newest_task_and_an_early_sample(
        num_tasks: int, points: int, sample: int) -> None:
    ids = list(range(num_tasks))
    ks = curve_points(ids, points)
    columns = matrix_columns(ids, ks, sample)
    assert {k - 1 for k in ks} <= set(columns)  # each row's diagonal entry is measured
    early = [c for c in columns if c < ks[0]]  # learned at every row
    assert len(early) >= min(sample, ks[0]) and len(columns) <= sample + len(ks)
    assert columns == sorted(set(columns))
