"""The batched inference engine against the one-image path, one row per number of queries a pass.

Issue: answering "which task is this input from?" one query at a time reads the whole packed bank
per query. `supsup.engine.InferenceEngine` answers B queries with one forward/backward of the block
and one pass over the bank. Here, on a k-task LeNet-500 bank of random masks (the cost of inference
does not depend on what was learned) and real bundled MNIST digits permuted per task, each row
times the engine's gradients for B queries, and the one-image path (`infer_task(mode="one_image")`,
one pass over the bank per query) is timed on the same queries, alternating with the engine so
both see the same load on a shared machine. The answers are compared query by query. The
engine keeps its masks unpacked to int8 and a second copy by input unit (`--resident-mib`, as
evaluation workers do by default): passes of many queries then multiply only the inputs each
query lights (`supsup.sparse_input`). The 'dense' column times an engine with the int8 masks
alone (served replicas' default budget), and 'packed' one unpacking the bits each pass.

Goals at k = 2,500 (2 cores): B = 256 at most 5 ms per query and at least 6x less time per query
than the one-image path measured in the same run.

    .venv/bin/python bench/bank_inference.py --queries 1,16,256,1024
    .venv/bin/python bench/engine_inference.py --k 250 --queries 16,256 --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from common import emit_json, machine, print_table, reset_peak_rss, status_kib

GOAL_MS_AT_256 = 5.0
GOAL_SPEEDUP = 6.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=2500, help="tasks in the bank")
    p.add_argument("--queries", default="1,16,256,1024", help="queries per pass, comma separated")
    p.add_argument("--outputs", type=int, default=500, help="lenet outputs (north star: 500)")
    p.add_argument("--digits", type=int, default=2, choices=(2, 3),
                   help="int8 digits of the fixed-point factors")
    p.add_argument("--one-image", type=int, default=8,
                   help="queries timed through the one-image path per row")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row, median kept")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resident-mib", type=int, default=2048,
                   help="the engine's budget for masks unpacked once and by input unit")
    p.add_argument("--quick", action="store_true", help="one timed call per row")
    args = p.parse_args(argv)
    args.query_list = [int(q) for q in args.queries.split(",") if q.strip()]
    if args.quick:
        args.repeats = 1
    return args


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args: argparse.Namespace) -> None:
    import torch
    from bank_inference import build_packed_bank

    from pipeline.datasets import load_dataset
    from supsup.engine import InferenceEngine
    from supsup.inference import infer_task
    from supsup.networks import build_network
    from supsup.tasks import PermutedTasks

    torch.set_num_threads(args.threads)
    net = build_network(name="lenet", num_outputs=args.outputs, seed=0)
    start = time.perf_counter()
    bank = build_packed_bank(net, args.k, 250, seed=0)
    build = time.perf_counter() - start
    train, test = load_dataset("mnist-bundled")
    tasks = PermutedTasks(train, test, args.k, seed=0)
    most = max(args.query_list)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.k, (most,), generator=g)
    pos = torch.randint(0, tasks.size(0, "test"), (most,), generator=g)
    x = torch.cat([tasks.get(int(t), "test", p.reshape(1))[0] for t, p in zip(ids, pos)])
    engine = InferenceEngine(net, bank, digits=args.digits,
                             resident_bytes=args.resident_mib << 20)
    packed = InferenceEngine(net, bank, digits=args.digits)
    dense = InferenceEngine(net, bank, digits=args.digits,
                            resident_bytes=sum(t.numel() for t in engine.resident.values()))
    for e in (engine, dense, packed):
        e.gradients(x[:8])  # first-touch allocations, tables
    rows, results = [], []
    for b in args.query_list:
        q = x[:b]
        one = q[: min(b, args.one_image)]
        reset_peak_rss()
        before = status_kib("VmRSS") / 1024
        engine_s = _median_seconds(lambda q=q: engine.gradients(q), args.repeats)
        peak = status_kib("VmHWM") / 1024
        single_s = _median_seconds(lambda one=one: [infer_task(net, bank, one[i:i + 1])
                                                    for i in range(one.shape[0])], 1)
        engine_s2 = _median_seconds(lambda q=q: engine.gradients(q), 1)  # after, same load
        packed_ms = 1000 * _median_seconds(lambda q=q: packed.gradients(q), 1) / b
        dense_ms = 1000 * _median_seconds(lambda q=q: dense.gradients(q), 1) / b
        ms = 1000 * min(engine_s, engine_s2) / b
        single_ms = 1000 * single_s / one.shape[0]
        got = engine.infer(one).task_ids
        alone = torch.tensor([infer_task(net, bank, one[i:i + 1]).task_id
                              for i in range(one.shape[0])])
        same = bool(torch.equal(got, alone))
        rows.append([b, f"{ms:.2f}", f"{dense_ms:.2f}", f"{packed_ms:.2f}", f"{single_ms:.1f}",
                     f"{single_ms / ms:.1f}x", f"{peak - before:.0f}", "yes" if same else "NO"])
        results.append({"queries": b, "ms_per_query": ms, "dense_ms_per_query": dense_ms,
                        "packed_ms_per_query": packed_ms,
                        "one_image_ms_per_query": single_ms,
                        "speedup": single_ms / ms, "transient_mib": peak - before,
                        "same_answers": same, "compared": int(one.shape[0])})
    load = os.getloadavg()
    print_table(f"Engine at k = {args.k} LeNet-{args.outputs} tasks, {args.digits} digits, "
                f"{engine.resident_nbytes / 2**20:.0f} MiB resident (bank built in {build:.1f} s; "
                f"load average {load[0]:.1f} {load[1]:.1f})",
                ["queries/pass", "ms/query", "dense ms/query", "packed ms/query",
                 "one-image ms/query", "speed-up",
                 "transient MiB", "same answers"], rows)
    at = {r["queries"]: r for r in results}
    goals = {}
    if 256 in at and args.k == 2500:
        goals = {"ms_at_256": at[256]["ms_per_query"] <= GOAL_MS_AT_256,
                 "speedup_at_256": at[256]["speedup"] >= GOAL_SPEEDUP}
        print(f"goals at B = 256: <= {GOAL_MS_AT_256} ms/query: {goals['ms_at_256']}; "
              f">= {GOAL_SPEEDUP}x the one-image path: {goals['speedup_at_256']}")
    emit_json("engine_inference", k=args.k, outputs=args.outputs, digits=args.digits,
              resident_mib=engine.resident_nbytes / 2**20, unit_masks=sorted(engine.units),
              results=results, goals=goals, load_average=list(load), machine=machine())


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
