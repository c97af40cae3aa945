"""One-shot task inference over a bank split across Ray actors: time per query, memory per shard.

A K-task LeNet-500 bank (784-300-100 with 500 outputs) of random masks at density 1/2 (the cost of
inference does not depend on what the masks learned) is written through the mask registry into a
temporary folder, in chunks of random bytes on a few threads. S shard actors each load one
consecutive task range through `load_bank` (`pipeline.serve.shards.ShardedBank`) and B random
queries are answered by all of them: the table gives the time per query, and per shard its tasks,
packed bytes and resident memory (now and at its peak, from the actor's /proc/self/status).

For K <= --unsharded-max (10,000) the same queries are then answered by one process holding the
whole bank (`supsup.engine.InferenceEngine`, same block of queries), and the run reports whether
the task ids (and gradients) are identical. The last line is the JSON of every number.

    ../shared/offline-run .venv/bin/python bench/shard_inference.py --tasks 200 --shards 2 \
        --queries 32
    ../shared/offline-run .venv/bin/python bench/shard_inference.py               # 10,000 tasks
    ../shared/offline-run .venv/bin/python bench/shard_inference.py --tasks 100000 --queries 64

Goal: a 100,000-task bank (about 3.9 GB packed) answered by 4 shard actors on this machine, with
per-query time and memory per shard; at 10,000 tasks, sharded and unsharded answers identical.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import emit_json, machine, mib, print_table, status_kib

BANK = "bench-shards"
CHUNK = 1000  # tasks of random bytes drawn at once (about 39 MB for LeNet-500)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=10_000, help="K, tasks in the bank")
    p.add_argument("--shards", type=int, default=4, help="S, shard actors")
    p.add_argument("--queries", type=int, default=256, help="B, queries answered (timed)")
    p.add_argument("--block", type=int, default=256, help="queries per pass over the bank")
    p.add_argument("--threads", type=int, default=1, help="torch threads per shard actor")
    p.add_argument("--unsharded-max", type=int, default=10_000,
                   help="also answer unsharded (whole bank in one process) up to this many tasks")
    p.add_argument("--folder", type=Path, default=None,
                   help="where to build the registry (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    for name in ("tasks", "shards", "queries", "block", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.shards > args.tasks:
        p.error(f"--shards ({args.shards}) cannot exceed --tasks ({args.tasks})")
    return args


def build_bank(root: Path, tasks: int) -> tuple[Any, dict[str, Any]]:
    """A registry at `root` holding `tasks` random LeNet-500 masks; (its source, build figures)."""
    from pipeline.registry import MaskRegistry
    from pipeline.registry.mask_registry import parallel_map
    from supsup.networks import build_network

    started = time.perf_counter()
    net = build_network(name="lenet", num_outputs=500)
    shapes = net.layer_shapes()
    registry = MaskRegistry(root)
    registry.create_bank(BANK, net.spec, shapes, {}, {"rule": "threshold"})
    nbytes = {k: (int(np.prod(s)) + 7) // 8 for k, s in shapes.items()}
    rng = np.random.default_rng(0)
    for start in range(0, tasks, CHUNK):
        ids = list(range(start, min(tasks, start + CHUNK)))
        drawn = {k: rng.integers(0, 256, (len(ids), n), dtype=np.uint8) for k, n in nbytes.items()}
        parallel_map(lambda i, ids=ids, drawn=drawn: registry.write_task(
            BANK, ids[i], {k: rows[i] for k, rows in drawn.items()}), list(range(len(ids))))
    built = time.perf_counter() - started
    source = registry.source(BANK)
    return source, {"build_s": round(built, 1), "stored_mib": round(mib(
        registry.stored_bytes(BANK)), 1), "packed_mib": round(mib(tasks * sum(nbytes.values())), 1)}


def timed(fn: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def run_sharded(source: Any, args: argparse.Namespace, x: torch.Tensor
                ) -> tuple[Any, dict[str, Any], list[dict[str, Any]]]:
    from pipeline.serve.shards import ShardedBank

    sharded, load_s = timed(lambda: ShardedBank.from_source(
        source, args.shards, threads=args.threads, block_queries=args.block))
    with sharded:
        sharded.infer(x[:1])  # first call: the actors' kernels and buffers warm up
        result, infer_s = timed(lambda: sharded.infer(x))
        memory = sharded.memory()
        shards = [{**d, "rss_mib": round(m["rss_kib"] / 1024, 1),
                   "peak_rss_mib": round(m["peak_rss_kib"] / 1024, 1),
                   "packed_mib": round(mib(d["packed_bytes"]), 1)}
                  for d, m in zip(describe(sharded), memory)]
    figures = {"load_s": round(load_s, 1), "infer_s": round(infer_s, 2),
               "ms_per_query": round(1000 * infer_s / x.shape[0], 2),
               "driver_rss_mib": round(status_kib("VmRSS") / 1024, 1)}
    return result, figures, shards


def describe(sharded: Any) -> list[dict[str, Any]]:
    import ray

    return [{"first_task": d["task_ids"][0], "last_task": d["task_ids"][-1],
             "num_tasks": d["num_tasks"], "packed_bytes": d["packed_bytes"], "pid": d["pid"]}
            for d in ray.get([s.actor.describe.remote() for s in sharded.shards])]


def run_unsharded(source: Any, args: argparse.Namespace, x: torch.Tensor
                  ) -> tuple[Any, dict[str, Any]]:
    from pipeline.registry import load_bank
    from supsup.engine import InferenceEngine
    from supsup.networks import build_network

    (bank, spec), load_s = timed(lambda: load_bank(source))
    engine = InferenceEngine(build_network(spec), bank, block_queries=args.block)
    engine.infer(x[:1])
    result, infer_s = timed(lambda: engine.infer(x))
    return result, {"load_s": round(load_s, 1), "infer_s": round(infer_s, 2),
                    "ms_per_query": round(1000 * infer_s / x.shape[0], 2),
                    "rss_mib": round(status_kib("VmRSS") / 1024, 1),
                    "peak_rss_mib": round(status_kib("VmHWM") / 1024, 1)}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    import ray

    from pipeline.cluster import quiet_ray_env

    with tempfile.TemporaryDirectory(prefix="shard-bench-") as tmp:
        root = (args.folder or Path(tmp)) / "registry"
        print(f"building {args.tasks:,} random LeNet-500 tasks in {root} ...", flush=True)
        source, built = build_bank(root, args.tasks)
        print(f"built in {built['build_s']} s ({built['stored_mib']} MiB stored)", flush=True)
        x = torch.randn(args.queries, 1, 28, 28, generator=torch.Generator().manual_seed(1))
        quiet_ray_env()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        try:
            sharded, sharded_figures, shards = run_sharded(source, args, x)
        finally:
            ray.shutdown()
        print_table(f"shards of a {args.tasks:,}-task bank ({args.queries} queries)",
                    ["shard", "tasks", "num_tasks", "packed_MiB", "rss_MiB", "peak_rss_MiB"],
                    [[i, f"{s['first_task']}..{s['last_task']}", s["num_tasks"], s["packed_mib"],
                      s["rss_mib"], s["peak_rss_mib"]] for i, s in enumerate(shards)])
        rows = [["sharded", args.shards, sharded_figures["load_s"],
                 sharded_figures["ms_per_query"], "-"]]
        unsharded_figures: dict[str, Any] | None = None
        if args.tasks <= args.unsharded_max:
            whole, unsharded_figures = run_unsharded(source, args, x)
            unsharded_figures["task_ids_identical"] = bool(torch.equal(whole.task_ids,
                                                                       sharded.task_ids))
            unsharded_figures["gradients_identical"] = bool(torch.equal(whole.gradients,
                                                                        sharded.gradients))
            unsharded_figures["max_gradient_difference"] = float(
                (whole.gradients - sharded.gradients).abs().max())
            rows.append(["unsharded", 1, unsharded_figures["load_s"],
                         unsharded_figures["ms_per_query"],
                         str(unsharded_figures["task_ids_identical"])])
        print_table("one-shot inference", ["bank", "processes", "load_s", "ms_per_query",
                                           "same_task_ids"], rows)
    print(f"load average: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    emit_json("shard_inference", tasks=args.tasks, shards_count=args.shards,
              queries=args.queries, block=args.block, threads=args.threads, **built,
              sharded=sharded_figures, shards=shards, unsharded=unsharded_figures,
              machine=machine())


if __name__ == "__main__":
    main()
