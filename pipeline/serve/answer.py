"""The one place a served bank answers rows: each row's task (Section 3.3), then its class under
that task's mask. `mlflow models serve` (pipeline.tracking.pyfunc) and `supsup serve`
(pipeline.serve.app) both answer through `Answerer`, so the two servers give the same answers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from supsup.bank import MaskBank
from supsup.binding import use_task
from supsup.inference import infer_task
from supsup.networks import SupermaskNet

# per_example inference keeps (rows, weights) gradients: bound the rows of one pass.
_PER_EXAMPLE_ROWS = 64


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

    def __init__(self, net: SupermaskNet, bank: MaskBank) -> None:
        self.net = net.eval()
        self.bank = bank

    def answer(self, x: torch.Tensor, method: str = "one_shot",
               objective: str = "entropy") -> Answers:
        """Each row's own task and class: x (B, *input_shape), normalised."""
        if x.shape[0] == 0:
            return _empty()
        task_ids, confidence = [], []
        for start in range(0, x.shape[0], _PER_EXAMPLE_ROWS):
            result = infer_task(self.net, self.bank, x[start:start + _PER_EXAMPLE_ROWS],
                                method=method, objective=objective, mode="per_example")
            task_ids.append(result.task_ids)
            confidence.append(result.confidence)
        chosen = torch.cat(task_ids)
        return Answers(chosen, self.classify(x, chosen), torch.cat(confidence).double())

    def classify(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """(B,) argmax over the real classes, each row under its own task's mask."""
        classes = torch.empty(x.shape[0], dtype=torch.long)
        with torch.no_grad():
            for t in task_ids.unique().tolist():
                sel = task_ids == t
                with use_task(self.net, self.bank, int(t)):
                    logits = self.net(x[sel.to(x.device)])[:, :self.net.spec.num_classes]
                classes[sel] = logits.argmax(-1).cpu()
        return classes

    def predict(self, x: torch.Tensor, options: Mapping[str, str]) -> Answers:
        """Answers in any inference mode: per_example through `answer`; "batch" and
        "one_image" give every row of `x` the task inferred from the whole batch or its first
        row (the paper's evaluation protocol)."""
        if options["mode"] == "per_example" or x.shape[0] == 0:
            return self.answer(x, options["method"], options["objective"])
        result = infer_task(self.net, self.bank, x, method=options["method"],
                            objective=options["objective"], mode=options["mode"])
        return Answers(result.task_ids, self.classify(x, result.task_ids),
                       result.confidence.double())
