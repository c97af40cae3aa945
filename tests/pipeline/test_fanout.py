"""The shared fan-out on a real local Ray: every item's result handed back, failures named by
item, with the job's own advice on what to do next (the discovery job cannot resume)."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.jobs.fanout import fan_out

OPTIONS: dict[str, Any] = {"num_cpus": 1, "max_retries": 1, "retry_exceptions": False}


def test_every_item_comes_back_once(ray_local: None) -> None:
    def square(x: int) -> int:  # defined here so Ray ships it by value to its workers
        return x * x

    started: list[str] = []
    results: dict[str, int] = {}
    items = ["a", "bb", "ccc", "capacity"]
    fan_out(square, items, lambda item: (len(item),), options=OPTIONS,
            on_result=results.__setitem__, describe=str, max_in_flight=2,
            on_start=started.append)
    assert sorted(started) == sorted(items)
    assert results == {"a": 1, "bb": 4, "ccc": 9, "capacity": 64}


def test_a_failure_names_the_item_and_what_to_do_next(ray_local: None) -> None:
    def fail(step: str) -> None:
        raise ValueError(f"no data for {step}")

    def describe(step: str) -> str:
        return f"the discovery job of bank 'nns' ({step})"

    with pytest.raises(RuntimeError) as default:
        fan_out(fail, ["stream"], lambda s: (s,), options=OPTIONS, on_result=lambda *_: None,
                describe=describe)
    message = str(default.value)
    assert message.startswith("the discovery job of bank 'nns' (stream) failed (ValueError: ")
    assert "no data for stream" in message
    assert message.endswith("fix the cause and rerun the same command to resume.")

    advice = "Masks written before the failure stay in the registry; move the bank away."
    with pytest.raises(RuntimeError) as told:
        fan_out(fail, ["evaluation"], lambda s: (s,), options=OPTIONS,
                on_result=lambda *_: None, describe=describe, next_step=advice)
    message = str(told.value)
    assert "(evaluation) failed (ValueError: " in message and message.endswith(advice)
    assert "resume" not in message
