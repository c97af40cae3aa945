"""The continual-learning view of an evaluation: the accuracy matrix and its three summaries.

A[i][j] is the accuracy on task j after the first `tasks_learned[i]` tasks were learned (j among
them). Continual-learning libraries (Avalanche, Mammoth) report it with these summaries, as defined
by Lopez-Paz & Ranzato (2017, "Gradient Episodic Memory") and Chaudhry et al. (2018, "Riemannian
Walk"), for T tasks and A[T] the last row:

- average accuracy: ACC = mean over j of A[T][j], the accuracy on every task at the end;
- backward transfer: BWT = mean over j < T of A[T][j] - A[j][j], how learning later tasks changed
  the accuracy on task j compared with right after it was learned (negative: forgotten);
- forgetting: F = mean over j < T of (max over rows l from j to T-1 of A[l][j]) - A[T][j], how far
  each task fell from the best it ever had.

With thousands of tasks the matrix is sampled: rows are the curve's points (numbers of tasks
learned) and columns a fixed sample of task ids, each measured at every row where it had been
learned. A column's own row (A[j][j] above) is then the first row at which it had been learned;
the evaluation makes each row's newest task a column, so for those the own row is right after the
task was learned. BWT and F average over the columns learned before the last row.

With SupSup and the task given (GG), a task's mask never changes once learned and the other masks
never take part, so A_GG is constant down each column: BWT and F are exactly zero. With the task
inferred (GN), every learned mask competes in task inference, so A_GN can fall as rows grow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AccuracyMatrix:
    """Accuracies at sampled rows (tasks learned) and columns (task ids); None: not yet learned."""

    tasks_learned: tuple[int, ...]  # one per row, ascending
    task_ids: tuple[int, ...]  # one per column, ascending
    values: tuple[tuple[float | None, ...], ...]  # (rows, columns)

    def __post_init__(self) -> None:
        if list(self.tasks_learned) != sorted(set(self.tasks_learned)):
            raise ValueError(f"tasks_learned must be ascending and distinct, got "
                             f"{list(self.tasks_learned)}")
        if len(self.values) != len(self.tasks_learned) or any(
                len(row) != len(self.task_ids) for row in self.values):
            raise ValueError(f"values must be {len(self.tasks_learned)} rows of "
                             f"{len(self.task_ids)} columns")

    @classmethod
    def from_cells(cls, tasks_learned: Sequence[int], task_ids: Sequence[int],
                   cells: Mapping[tuple[int, int], float]) -> AccuracyMatrix:
        """The matrix of `cells` {(tasks learned, task id): accuracy}; absent cells are None."""
        rows, cols = sorted(set(tasks_learned)), sorted(set(task_ids))
        return cls(tuple(rows), tuple(cols),
                   tuple(tuple(cells.get((k, t)) for t in cols) for k in rows))

    def _column(self, j: int) -> list[float | None]:
        return [row[j] for row in self.values]

    def own_row(self, task_id: int) -> int | None:
        """Index of the first row at which `task_id` had been learned (None: never measured)."""
        column = self._column(self.task_ids.index(task_id))
        return next((i for i, v in enumerate(column) if v is not None), None)

    def _earlier(self) -> list[tuple[list[float], float]]:
        """For each column learned before the last row and measured there: its values from its own
        row up to the row before the last, and its last value."""
        out = []
        for j in range(len(self.task_ids)):
            column = self._column(j)
            last = column[-1]
            before = [v for v in column[:-1] if v is not None]
            if last is not None and before:
                out.append((before, last))
        return out

    def average_accuracy(self) -> float | None:
        """ACC: mean of the last row over the columns measured there."""
        last = [v for v in self.values[-1] if v is not None] if self.values else []
        return sum(last) / len(last) if last else None

    def backward_transfer(self) -> float | None:
        """BWT: mean over earlier-learned columns of (last row) - (own row); None if there are
        none (a single row)."""
        pairs = self._earlier()
        return sum(last - before[0] for before, last in pairs) / len(pairs) if pairs else None

    def forgetting(self) -> float | None:
        """F: mean over earlier-learned columns of (best earlier row) - (last row)."""
        pairs = self._earlier()
        return sum(max(before) - last for before, last in pairs) / len(pairs) if pairs else None

    def table(self) -> list[dict[str, Any]]:
        """One record per row ("tasks_learned", then "task <id>" per column): the matrix as an
        MLflow table, which the UI shows as it is printed."""
        return [{"tasks_learned": k, **{f"task {t}": v for t, v in zip(self.task_ids, row)}}
                for k, row in zip(self.tasks_learned, self.values)]

    def to_dict(self) -> dict[str, Any]:
        return {"tasks_learned": list(self.tasks_learned), "task_ids": list(self.task_ids),
                "values": [list(row) for row in self.values]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AccuracyMatrix:
        return cls(tuple(data["tasks_learned"]), tuple(data["task_ids"]),
                   tuple(tuple(row) for row in data["values"]))


def continual_metrics(matrices: Mapping[str, AccuracyMatrix],
                      final: Mapping[str, Sequence[float]]) -> dict[str, float | None]:
    """average_accuracy_<name>, forgetting_<name>, backward_transfer_<name> for each matrix
    ("gg", "gn"). Average accuracy is the mean over `final[name]`, every task's accuracy after
    all were learned (the last row of the whole matrix, which the evaluation measures in full),
    when given; otherwise over the matrix's sampled last row."""
    out: dict[str, float | None] = {}
    for name, m in matrices.items():
        values = list(final.get(name, ()))
        out[f"average_accuracy_{name}"] = (sum(values) / len(values) if values
                                           else m.average_accuracy())
        out[f"forgetting_{name}"] = m.forgetting()
        out[f"backward_transfer_{name}"] = m.backward_transfer()
    return out
