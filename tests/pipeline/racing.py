"""Two processes writing different masks to the same tasks of bank "b" at the same instant:
the check that first-writer-wins holds on a given registry root (local disk or object store)."""

from __future__ import annotations

import multiprocessing
from typing import Any

import numpy as np

from pipeline.registry import MaskRegistry, RegistryConflictError
from pipeline.registry.manifest import layer_shapes


def _writer(root: str, which: int, tasks: tuple[int, ...], barrier: Any, results: Any) -> None:
    """Child process: for each task, write masks drawn from `which`; report the outcome."""
    registry = MaskRegistry(root)
    shapes = layer_shapes(registry.manifest("b"))
    rng = np.random.default_rng(which)
    for task in tasks:
        packed = {k: rng.integers(0, 256, (int(np.prod(s)) + 7) // 8, dtype=np.uint8)
                  for k, s in shapes.items()}
        barrier.wait(timeout=60)
        try:
            status = registry.write_task("b", task, packed, metadata={"writer": which})
        except RegistryConflictError as exc:
            status = f"conflict: {exc}"
        results.put((task, which, status))


def race(root: str, tasks: tuple[int, ...]) -> dict[int, dict[int, str]]:
    """Writers 1 and 2 race on every task of `tasks` (a barrier before each); returns
    {task: {writer: "written" | "unchanged" | "conflict: ..."}}. Bank "b" must exist."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(root, w, tasks, barrier, results))
             for w in (1, 2)]
    for p in procs:
        p.start()
    outcomes: dict[int, dict[int, str]] = {t: {} for t in tasks}
    for _ in range(len(procs) * len(tasks)):
        task, which, status = results.get(timeout=180)
        outcomes[task][which] = status
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return outcomes


def assert_one_winner_each(registry: MaskRegistry, outcomes: dict[int, dict[int, str]]) -> None:
    """Every task has exactly one "written" and one told conflict, and holds the winner's masks."""
    for task, by_writer in outcomes.items():
        winners = [w for w, s in by_writer.items() if s == "written"]
        losers = [w for w, s in by_writer.items() if s.startswith("conflict")]
        assert len(winners) == 1 and len(losers) == 1, (task, by_writer)
        assert f"already holds task {task}" in by_writer[losers[0]]
        assert "the stored mask was kept" in by_writer[losers[0]]
        assert registry.read_task("b", task).metadata == {"writer": winners[0]}
