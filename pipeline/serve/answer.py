"""The one place a served bank answers rows: each row's task (Section 3.3), then its class under
that task's mask. `mlflow models serve` (pipeline.tracking.pyfunc) and `supsup serve`
(pipeline.serve.app) both answer through `Answerer`, so the two servers give the same answers.

Rows are answered by `supsup.engine.InferenceEngine`: many rows per pass over the packed bank,
each row getting the answer the one-image path gives it alone. An engine computes the bank's
uniform mixture once, so one is kept per objective.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from pipeline.serve.contract import InputError
from supsup.bank import MaskBank
from supsup.engine import InferenceEngine
from supsup.inference import InferenceResult, infer_task
from supsup.networks import SupermaskNet


class Engine(Protocol):
    """What answers rows: `supsup.engine.InferenceEngine`, or a bank's shards answering as one."""

    objective: str

    def infer(self, x: torch.Tensor, method: str = "one_shot") -> InferenceResult: ...

    def classify(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Answers:
    """Per row: the inferred task, the class under its mask, and the inference's confidence.

    task_ids: (B,) long; classes: (B,) long; confidence: (B,) float64."""

    task_ids: torch.Tensor
    classes: torch.Tensor
    confidence: torch.Tensor

    def records(self) -> list[dict[str, float | int]]:
        """JSON-ready rows: {"task_id", "class", "confidence"} each."""
        return [{"task_id": int(t), "class": int(c), "confidence": float(p)}
                for t, c, p in zip(self.task_ids.tolist(), self.classes.tolist(),
                                   self.confidence.tolist())]

    @staticmethod
    def cat(parts: list[Answers]) -> Answers:
        return Answers(torch.cat([p.task_ids for p in parts]),
                       torch.cat([p.classes for p in parts]),
                       torch.cat([p.confidence for p in parts]))

    def rows(self, start: int, stop: int) -> Answers:
        return Answers(self.task_ids[start:stop], self.classes[start:stop],
                       self.confidence[start:stop])


def _empty() -> Answers:
    return Answers(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                   torch.zeros(0, dtype=torch.float64))


class Answerer:
    """A network and a loaded bank, answering batches of normalised inputs. Not thread-safe:
    answering installs bindings on the shared network, so callers answer one batch at a time."""

    def __init__(self, net: SupermaskNet, bank: MaskBank | None,
                 sharded: Engine | None = None, *, resident_bytes: int = 0,
                 workers: int = 1) -> None:
        """`bank` held here, or (`bank` None) a `sharded` engine answering for the bank's shards
        (pipeline.serve.shards.ShardedBank: one-shot, per example, its one objective).
        `resident_bytes`, `workers`: the engine's budget for masks unpacked once and threads
        sharing a pass's task blocks (`InferenceEngine`)."""
        self.net = net.eval()
        self.bank = bank
        self.resident_bytes, self.workers = resident_bytes, workers
        self.engines: dict[str, Engine] = {}
        if sharded is not None:
            self.engines[sharded.objective] = sharded

    def engine(self, objective: str) -> Engine:
        """The engine of `objective`, made (the bank's mixture computed) on first use."""
        if objective not in self.engines:
            if self.bank is None:
                raise InputError(
                    f"objective {objective!r}: this version is served by shards that answer "
                    f"with objective {next(iter(self.engines))!r} only; leave objective out")
            self.engines[objective] = InferenceEngine(self.net, self.bank, objective=objective,
                                                      resident_bytes=self.resident_bytes,
                                                      workers=self.workers)
        return self.engines[objective]

    def answer(self, x: torch.Tensor, method: str = "one_shot",
               objective: str = "entropy") -> Answers:
        """Each row's own task and class: x (B, *input_shape), normalised."""
        if x.shape[0] == 0:
            return _empty()
        engine = self.engine(objective)
        result = engine.infer(x, method=method)
        return Answers(result.task_ids, engine.classify(x, result.task_ids),
                       result.confidence.double())

    def predict(self, x: torch.Tensor, options: Mapping[str, str]) -> Answers:
        """Answers in any inference mode: per_example through `answer`; "batch" and
        "one_image" give every row of `x` the task inferred from the whole batch or its first
        row (the paper's evaluation protocol)."""
        if options["mode"] == "per_example" or x.shape[0] == 0:
            return self.answer(x, options["method"], options["objective"])
        if self.bank is None:
            raise InputError(f"mode {options['mode']!r}: this version is served by shards, which "
                             "answer each row on its own; leave mode out (per_example)")
        result = infer_task(self.net, self.bank, x, method=options["method"],
                            objective=options["objective"], mode=options["mode"])
        classes = self.engine(options["objective"]).classify(x, result.task_ids)
        return Answers(result.task_ids, classes, result.confidence.double())
