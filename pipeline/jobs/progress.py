"""Progress from inside running Ray tasks: workers post how far each item is, the driver reads.

A group of tasks trains as one Ray task for minutes; counting only finished groups leaves a bar at
0/6 until the first group ends. So each worker posts its item's fraction done to a ProgressBoard
(a Ray actor holding no CPU), at most every `min_seconds`, and the driver adds the fractions of
items still running to the count of finished ones each time it polls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any


class ProgressBoard:
    """Fraction done per item key, posted by workers, read by the driver (as a Ray actor)."""

    def __init__(self) -> None:
        self._done: dict[str, float] = {}

    def post(self, key: str, fraction: float) -> None:
        self._done[key] = min(1.0, max(0.0, float(fraction)))

    def read(self) -> dict[str, float]:
        return dict(self._done)


def start_board() -> Any:
    """A ProgressBoard actor in the current Ray session (it ends with the session)."""
    import ray

    return ray.remote(num_cpus=0)(ProgressBoard).remote()


def item_key(item: Sequence[Hashable]) -> str:
    """The board key of a work item (a list of task ids)."""
    return ",".join(str(i) for i in item)


def poster(board: Any, key: str, min_seconds: float = 0.5) -> Callable[[float], None]:
    """Inside a worker: `post(fraction)` sends to `board`, at most once per `min_seconds` (the
    last post, fraction 1, always goes), without waiting for the actor."""
    last = [float("-inf")]

    def post(fraction: float) -> None:
        now = time.monotonic()
        if fraction >= 1.0 or now - last[0] >= min_seconds:
            last[0] = now
            board.post.remote(key, fraction)

    return post


class BoardReader:
    """On the driver: the posted fractions of the items still running, in units (tasks).

    `weight(item)` is how many units an item counts for; `finish(item)` stops counting an item
    (the caller counts it as done), so its last fraction is never counted twice."""

    def __init__(self, board: Any, weight: Callable[[Any], float]) -> None:
        self.board, self.weight = board, weight
        self._running: dict[str, Any] = {}

    def start(self, item: Any) -> None:
        self._running[item_key(item)] = item

    def finish(self, item: Any) -> None:
        self._running.pop(item_key(item), None)

    def poll(self, timeout: float = 5.0) -> float:
        """Units of the running items done now (0 if the board does not answer within
        `timeout` seconds)."""
        import ray

        try:
            posted = ray.get(self.board.read.remote(), timeout=timeout)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError):
            return 0.0
        return sum(posted.get(k, 0.0) * self.weight(item) for k, item in self._running.items())
