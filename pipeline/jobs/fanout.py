"""One fan-out for every job: remote calls over items, a bounded number in flight, results
handed back in completion order, and failures named by item.

Ray retries a call whose worker process or node died (up to `max_retries`, e.g. on another node
after a node loss); an exception raised by the job's own code is not retried (retry_exceptions
is off), so the error says which of the two happened, then what to do next: by default rerun
to resume, for the jobs that keep what they stored and skip it on the next run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

_T = TypeVar("_T")


def fan_out(
    fn: Callable[..., Any],
    items: Sequence[_T],
    args: Callable[[_T], tuple[Any, ...]],
    *,
    options: dict[str, Any],
    on_result: Callable[[_T, Any], None],
    describe: Callable[[_T], str],
    max_in_flight: int | None = None,
    on_start: Callable[[_T], None] | None = None,
    poll: Callable[[], None] | None = None,
    poll_seconds: float = 1.0,
    next_step: str | None = None,
) -> None:
    """Call `fn(*args(item))` remotely for each item, at most `max_in_flight` at once (all when
    None); `on_result(item, result)` runs on the driver as each call finishes, `on_start(item)`
    as it is submitted, and `poll()` every `poll_seconds` while none finishes (progress from
    inside running calls).

    RuntimeError naming `describe(item)` when a call fails, ending with `next_step` (what to do
    now; None: rerun to resume).
    """
    import ray

    remote = ray.remote(**options)(fn)
    queue = list(items)
    limit = max_in_flight or len(queue) or 1
    running: dict[Any, _T] = {}
    # Calls still running when this raises are not cancelled here: they end with the driver
    # (Ray stops the tasks a driver owns when it disconnects), and forcing them while Ray shuts
    # down can crash its core.
    while queue or running:
        while queue and len(running) < limit:
            item = queue.pop(0)
            running[remote.remote(*args(item))] = item
            if on_start is not None:
                on_start(item)
        ready, _ = ray.wait(list(running), num_returns=1,
                            timeout=poll_seconds if poll is not None else None)
        if not ready and poll is not None:
            poll()
        for ref in ready:
            item = running.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as err:
                raise RuntimeError(_failure(describe(item), err, options, next_step)) from err
            on_result(item, result)


def _failure(what: str, err: Exception, options: dict[str, Any],
             next_step: str | None) -> str:
    import ray

    died = isinstance(err, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                            ray.exceptions.OwnerDiedError))
    if died:
        retries = options.get("max_retries", 0)
        return (f"{what}: its worker died and Ray's {retries} retries were used up ({err}). "
                + (next_step or "Results stored so far are kept; rerun the same command to "
                   "resume."))
    cause = getattr(err, "cause", None) or err
    return (f"{what} failed ({type(cause).__name__}: {cause}); Ray does not retry errors raised "
            "by the job itself. " + (next_step or "Results stored so far are kept; fix the "
                                     "cause and rerun the same command to resume."))
