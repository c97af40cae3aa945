"""The condition an evaluation must meet to promote a model version, e.g. `accuracy_gn>=0.9`.

A rule is one comparison, `METRIC OP NUMBER`, parsed by a regular expression rather than
evaluated as Python, so a config value or a command-line flag can never run code. It is parsed
when the config or the command is read, before anything runs, so a typo fails at once instead of
after an hour of training.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, ">": operator.gt, "<": operator.lt,
}
# What an evaluation's summary holds (supsup.evaluate.summarize): GG always, GN when evaluated.
GG_METRICS = ("accuracy_gg", "tasks", "examples")
GN_METRICS = ("accuracy_gn", "accuracy_gn_per_example", "task_inference_accuracy", "inferences")
_RULE = re.compile(r"\s*(?P<metric>[A-Za-z_][\w.]*)\s*(?P<op>>=|<=|==|>|<)\s*"
                   r"(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*")


@dataclass(frozen=True)
class PromotionRule:
    """`metric op value`: holds when the evaluation's `metric` compares so with `value`."""

    metric: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"

    def check(self, metrics: Mapping[str, float]) -> bool:
        """Whether the rule holds for `metrics`; KeyError naming the metric and the available
        ones when the evaluation did not measure it (a GG-only evaluation has no accuracy_gn)."""
        if self.metric not in metrics:
            raise KeyError(f"promotion rule {self}: the evaluation has no metric "
                           f"{self.metric!r}; available: {', '.join(sorted(metrics))}")
        return OPERATORS[self.op](float(metrics[self.metric]), self.value)

    def check_measured(self, gn: bool) -> None:
        """Before evaluating: KeyError unless an evaluation (with GN when `gn`) measures the
        rule's metric, naming the ones it does."""
        measured = GG_METRICS + (GN_METRICS if gn else ())
        if self.metric not in measured:
            extra = " (GN metrics need evaluate.gn: true)" if self.metric in GN_METRICS else ""
            raise KeyError(f"promotion rule {self}: an evaluation does not measure "
                           f"{self.metric!r}{extra}; available: {', '.join(sorted(measured))}")


def parse_rule(text: str) -> PromotionRule:
    """The rule written in `text`; ValueError saying the expected form otherwise."""
    m = _RULE.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"promotion rule {text!r} is not METRIC OP NUMBER with OP one of "
                         ">=, >, <=, <, == (e.g. 'accuracy_gn>=0.9')")
    value = float(m.group("value"))
    if not math.isfinite(value):
        raise ValueError(f"promotion rule {text!r}: the number must be finite")
    return PromotionRule(m.group("metric"), m.group("op"), value)
