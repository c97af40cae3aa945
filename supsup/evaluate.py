"""Accuracy with the task given (GG) and with the task inferred (GN), per task.

GN is counted two ways (Section 3.3): the paper's, where a batch whose task is inferred wrongly
counts as entirely wrong, and per example, where each prediction made with the inferred mask is
scored as it is. Task-inference accuracy is the fraction of inferences that named the right task.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch

from supsup.bank import MaskBank
from supsup.binding import use_scores, use_task
from supsup.engine import InferenceEngine
from supsup.inference import InferenceResult, infer_task
from supsup.networks import SupermaskNet
from supsup.scores import TaskScores
from supsup.tasks import TaskSet


@dataclass(frozen=True)
class TaskEvaluation:
    """Test-set results of one task; GN fields are None when GN was not evaluated."""

    task_id: int
    examples: int
    accuracy_gg: float
    accuracy_gn: float | None = None  # the paper's count: wrong task, whole batch wrong
    accuracy_gn_per_example: float | None = None
    task_inference_accuracy: float | None = None
    inferences: int = 0
    inferred: dict[int, int] | None = None  # inferred task -> count, for confusion summaries

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class _Tally:
    """Running counts of one task's evaluation."""

    n: int = 0
    gg: int = 0
    gn: int = 0
    per_example: int = 0
    right: int = 0
    inferences: int = 0
    inferred: dict[int, int] = field(default_factory=dict)

    def result(self, task_id: int, split: str) -> TaskEvaluation:
        if self.n == 0:
            raise ValueError(f"task {task_id} has no {split} examples to evaluate")
        return TaskEvaluation(task_id, self.n, self.gg / self.n, self.gn / self.n,
                              self.per_example / self.n, self.right / self.inferences,
                              self.inferences, dict(self.inferred))

    def count_gn(self, task_id: int, chosen: torch.Tensor, hit: torch.Tensor,
                 by_example: bool) -> None:
        """Count one batch of task `task_id` predicted with the inferred masks: `hit` (batch,)
        whether each prediction was right, `chosen` the inferred task ids. `by_example`: each
        inference counts on its own; otherwise `chosen[0]` was inferred for the whole batch,
        which counts as entirely wrong when it is not `task_id` (the paper's GN)."""
        self.per_example += int(hit.sum())
        if by_example:
            ok = chosen == task_id
            self.gn += int((hit & ok).sum())
            self.right += int(ok.sum())
            self.inferences += hit.numel()
            for t, c in zip(*chosen.unique(return_counts=True)):
                self.inferred[int(t)] = self.inferred.get(int(t), 0) + int(c)
            return
        task = int(chosen[0])
        ok_batch = task == task_id
        self.gn += int(hit.sum()) if ok_batch else 0
        self.right += int(ok_batch)
        self.inferences += 1
        self.inferred[task] = self.inferred.get(task, 0) + 1


def _predict(net: SupermaskNet, bank: MaskBank, task_id: int, x: torch.Tensor,
             num_classes: int) -> torch.Tensor:
    device = next(iter(net.masked_layers().values())).weight.device
    with use_task(net, bank, task_id), torch.no_grad():
        return net(x.to(device))[:, :num_classes].argmax(-1).cpu()


def evaluate_task(
    net: SupermaskNet,
    bank: MaskBank,
    tasks: TaskSet,
    task_id: int,
    *,
    gn: bool = True,
    batch_size: int = 128,
    method: str = "one_shot",
    objective: str = "entropy",
    mode: str = "one_image",
    split: str = "test",
    candidates: Sequence[int] | None = None,
    max_batches: int | None = None,
) -> TaskEvaluation:
    """Evaluate one learned task on its `split`; GN infers among `candidates` (default: all).

    `max_batches` caps the test batches per task: each GN inference over thousands of tasks
    costs a backward pass, so large banks are evaluated on a fixed prefix of each test set.
    """
    bank.row(task_id)
    net.eval()
    tally = _Tally()
    for i, (x, y) in enumerate(tasks.eval_batches(task_id, split, batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        y = y.cpu()  # labels compared on the host; x stays where the tasks keep their data
        pred = _predict(net, bank, task_id, x, tasks.num_classes)
        tally.gg += int((pred == y).sum())
        tally.n += y.numel()
        if not gn:
            continue
        result = infer_task(net, bank, x, method=method, objective=objective, mode=mode,
                            task_ids=candidates)
        chosen = result.task_ids
        gn_pred = torch.empty_like(y)
        for t in chosen.unique().tolist():
            sel = chosen == t
            gn_pred[sel] = pred[sel] if t == task_id else _predict(
                net, bank, t, x[sel], tasks.num_classes)
        tally.count_gn(task_id, chosen, gn_pred == y, by_example=mode == "per_example")
    if tally.n == 0:
        raise ValueError(f"task {task_id} has no {split} examples to evaluate")
    if not gn:
        return TaskEvaluation(task_id, tally.n, tally.gg / tally.n)
    return tally.result(task_id, split)


class GroupEngine(Protocol):
    """What answers a group's queries: `InferenceEngine`, or a bank's shards answering as one."""

    def infer(self, x: torch.Tensor, method: str = "one_shot") -> InferenceResult: ...

    def classify(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor: ...


_PREDICT_CHUNK = 8  # test batches classified by one forward pass with the task's own mask


@dataclass
class _Pending:
    """One test batch waiting for its queries' answers: where it came from, its labels, the
    predictions with its own task's mask, and the queries (its first image, or all of it)."""

    task_id: int
    start: int
    y: torch.Tensor
    pred: torch.Tensor
    queries: torch.Tensor


def evaluate_group(
    net: SupermaskNet,
    bank: MaskBank | None,
    tasks: TaskSet,
    task_ids: Sequence[int],
    *,
    gn: bool = True,
    batch_size: int = 128,
    method: str = "one_shot",
    objective: str = "entropy",
    mode: str = "one_image",
    split: str = "test",
    candidates: Sequence[int] | None = None,
    max_batches: int | None = None,
    digits: int = 2,
    queries_per_pass: int = 256,
    engine: GroupEngine | None = None,
) -> list[TaskEvaluation]:
    """`evaluate_task` for many tasks, with the queries of all their test batches answered
    together by the batched engine (`supsup.engine`): the first image of each batch (the paper's
    protocol, `one_image`) or every image (`per_example`), `queries_per_pass` per pass over the
    bank. Each query gets the answer the one-image path gives it, so the counts are the same;
    `batch` mode (one objective over a whole batch) and GG alone keep `evaluate_task`.

    `engine` answers instead of a local one (e.g. a bank's shards, each holding a task range:
    `bank` may then be None, and classification too goes through `engine.classify`)."""
    if engine is not None:
        if not gn or mode == "batch" or candidates is not None:
            raise ValueError("an outside engine answers one_image or per_example GN over its "
                             "whole bank: no batch mode, GG alone or candidate subsets")
    elif not gn or mode == "batch":
        return [evaluate_task(net, bank, tasks, t, gn=gn, batch_size=batch_size, method=method,
                              objective=objective, mode=mode, split=split,
                              candidates=candidates, max_batches=max_batches)
                for t in task_ids]
    outside = engine
    if engine is None:
        assert bank is not None
        for t in task_ids:
            bank.row(t)
        engine = InferenceEngine(net, bank, objective=objective, task_ids=candidates,
                                 digits=digits, block_queries=queries_per_pass)

    def predict(task: int, x: torch.Tensor) -> torch.Tensor:
        if outside is None:
            return _predict(net, bank, task, x, tasks.num_classes)  # type: ignore[arg-type]
        return outside.classify(x, torch.full((x.shape[0],), task, dtype=torch.long))
    net.eval()
    tallies = {int(t): _Tally() for t in task_ids}
    pending: list[_Pending] = []

    def answer() -> None:
        if not pending:
            return
        chosen = engine.infer(torch.cat([p.queries for p in pending]), method).task_ids
        offset = 0
        for p in pending:
            size = p.queries.shape[0]
            _score(predict, tasks, split, p, chosen[offset:offset + size], tallies[p.task_id])
            offset += size
        pending.clear()

    queued = 0
    for t in task_ids:
        n = tasks.size(t, split)
        if max_batches is not None:
            n = min(n, max_batches * batch_size)
        tally = tallies[int(t)]
        # GG: the task's own mask over its examples, a few batches per forward (its mask is
        # unpacked once per forward, not once per batch)
        for chunk in range(0, n, _PREDICT_CHUNK * batch_size):
            pos = torch.arange(chunk, min(n, chunk + _PREDICT_CHUNK * batch_size),
                               device=tasks.device)
            x_all, y_all = tasks.get(t, split, pos)
            pred_all, y_all = predict(int(t), x_all), y_all.cpu()
            tally.n += y_all.numel()
            tally.gg += int((pred_all == y_all).sum())
            for b0 in range(0, y_all.numel(), batch_size):
                x = x_all[b0:b0 + batch_size]
                queries = x[:1] if mode == "one_image" else x
                pending.append(_Pending(int(t), chunk + b0, y_all[b0:b0 + batch_size],
                                        pred_all[b0:b0 + batch_size], queries))
                queued += queries.shape[0]
                if queued >= queries_per_pass:
                    answer()
                    queued = 0
    answer()
    return [tallies[int(t)].result(int(t), split) for t in task_ids]


def _score(predict: Callable[[int, torch.Tensor], torch.Tensor], tasks: TaskSet, split: str,
           p: _Pending, chosen: torch.Tensor, tally: _Tally) -> None:
    """Count one batch's GN results from the tasks its queries were given."""
    if chosen.numel() == 1:  # one image decides the whole batch
        task = int(chosen[0])
        if task == p.task_id:
            gn_pred = p.pred
        else:  # rare: the batch again, classified with the mask it was given
            pos = torch.arange(p.start, p.start + p.y.numel(), device=tasks.device)
            gn_pred = predict(task, tasks.get(p.task_id, split, pos)[0])
        tally.count_gn(p.task_id, chosen, gn_pred == p.y, by_example=False)
        return
    gn_pred = p.pred.clone()
    for t in chosen.unique().tolist():
        if t != p.task_id:
            sel = chosen == t
            gn_pred[sel] = predict(int(t), p.queries[sel])
    tally.count_gn(p.task_id, chosen, gn_pred == p.y, by_example=True)


def evaluate_tasks(
    net: SupermaskNet,
    bank: MaskBank,
    tasks: TaskSet,
    task_ids: Sequence[int] | None = None,
    *,
    callback: Callable[[TaskEvaluation], None] | None = None,
    **options: object,
) -> list[TaskEvaluation]:
    """`evaluate_task` for each of `task_ids` (default: every task in the bank)."""
    out = []
    for t in task_ids if task_ids is not None else bank.task_ids:
        result = evaluate_task(net, bank, tasks, t, **options)  # type: ignore[arg-type]
        out.append(result)
        if callback is not None:
            callback(result)
    return out


def summarize(results: Sequence[TaskEvaluation]) -> dict[str, float]:
    """Example-weighted means over tasks of every metric present."""
    if not results:
        raise ValueError("no task results to summarise")
    total = sum(r.examples for r in results)
    out = {"tasks": float(len(results)), "examples": float(total),
           "accuracy_gg": sum(r.accuracy_gg * r.examples for r in results) / total}
    if all(r.accuracy_gn is not None for r in results):
        out["accuracy_gn"] = sum(r.accuracy_gn * r.examples for r in results) / total
        out["accuracy_gn_per_example"] = sum(
            r.accuracy_gn_per_example * r.examples for r in results) / total
        inf = sum(r.inferences for r in results)
        out["task_inference_accuracy"] = sum(
            r.task_inference_accuracy * r.inferences for r in results) / inf
        out["inferences"] = float(inf)
    return out


def scores_accuracy(
    net: SupermaskNet,
    scores: TaskScores,
    tasks: TaskSet,
    *,
    split: str = "test",
    batch_size: int = 256,
    max_batches: int | None = None,
) -> list[float]:
    """Accuracy of each task's current masks (still being trained) on `split`, in group mode.

    Every task is scored on the same number of examples (the smallest split among the group,
    capped by `max_batches`), so the group runs as one vectorised forward per batch.
    """
    ids = scores.task_ids
    n = min(tasks.size(t, split) for t in ids)
    if max_batches is not None:
        n = min(n, max_batches * batch_size)
    if n == 0:
        raise ValueError(f"no {split} examples to score tasks {ids}")
    device = next(iter(net.masked_layers().values())).weight.device
    correct = torch.zeros(len(ids))
    with use_scores(net, scores), torch.no_grad():
        for start in range(0, n, batch_size):
            pos = torch.arange(start, min(n, start + batch_size)).expand(len(ids), -1)
            x, y = tasks.get_group(ids, split, pos)
            logits = net(x.to(device))[..., : tasks.num_classes]
            correct += (logits.argmax(-1).cpu() == y.cpu()).float().sum(1)
    return (correct / n).tolist()
