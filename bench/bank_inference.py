"""One-shot task inference over a bank of many LeNet tasks: time, bank bytes and peak memory.

The paper's north star: 2,500 PermutedMNIST tasks on LeNet (784-300-100-500), the task found by one
gradient of the output entropy with respect to the superposition alphas (Section 3.3). The bank
keeps each task's mask at one bit per weight (`supsup.bank.MaskBank`); the authors stacked masks
as float32 (3.2 GB at 2,500 tasks). Masks here are random bytes (density ~0.5): the cost of
inference does not depend on what the masks learned. They are built packed, in chunks, straight
into the bank with `MaskBank.extend_packed`; no float stack of the whole bank is ever built, except
in the optional float32 reference row (`--float-reference K`, small K only), which runs the
authors' approach in its own process for comparison.

Each bank size k runs in a fresh subprocess, so its peak RSS (VmHWM) is its own. Inside it the
peak is reset (clear_refs) after the bank is built, so the inference peak is measured apart from
the build's where the kernel allows it.

Rows: seconds per inference for one-shot with one image (the paper's protocol) and with a batch
of 128, and for the binary method (ceil(log2 k) passes); bank bytes against the float32 stack's
(goal <= 1/30); RSS. Goal: one-shot under 1 s at k = 2,500 on 2 cores.

    .venv/bin/python bench/bank_inference.py --quick
    .venv/bin/python bench/bank_inference.py
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from common import emit_json, machine, mib, print_table, reset_peak_rss, status_kib

GOAL_SECONDS = 1.0
GOAL_RATIO = 1 / 30
_RESULT_TAG = "BANK_INFERENCE_RESULT "


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="one timed call per row and no warm-up call (about a minute)")
    p.add_argument("--ks", default="250,1000,2500", help="bank sizes, comma separated")
    p.add_argument("--outputs", type=int, default=500, help="lenet outputs (north star: 500)")
    p.add_argument("--batch-size", type=int, default=128, help="batch for the batch-mode rows")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed inferences per row, median reported (default 10; --quick: 1)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed inferences before timing a row (default 1; --quick: 0)")
    p.add_argument("--chunk", type=int, default=250, help="tasks added per extend_packed call")
    p.add_argument("--float-reference", type=int, default=250, metavar="K",
                   help="also time the float32-stack approach at this k (0: skip)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=("packed", "float"), help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 10
    if args.warmup is None:
        args.warmup = 0 if args.quick else 1
    args.k_list = [int(k) for k in args.ks.split(",") if k.strip()]
    if args.repeats < 1 or args.chunk < 1 or any(k < 1 for k in args.k_list):
        p.error("--repeats, --chunk and every k must be >= 1")
    return args


# ------------------------------------------------------------------------- worker process
def _timed(fn: Callable[[], Any], repeats: int, warmup: int) -> tuple[float, float]:
    """Median seconds of `repeats` calls after `warmup` untimed ones (first-touch allocations),
    and the peak RSS in MiB over those calls (VmHWM reset first where the kernel allows)."""
    reset_peak_rss()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), status_kib("VmHWM") / 1024


def _inputs(args: argparse.Namespace) -> torch.Tensor:
    """A real test batch of permuted task 0: x (batch, 1, 28, 28)."""
    from pipeline.datasets import load_dataset
    from supsup.tasks import PermutedTasks

    train, test = load_dataset("mnist-bundled", seed=args.seed)
    tasks = PermutedTasks(train, test, num_tasks=1, seed=args.seed)
    x, _ = next(tasks.eval_batches(0, "test", args.batch_size))
    return x


def build_packed_bank(net: Any, k: int, chunk: int, seed: int) -> Any:
    """k tasks of random packed bytes, added chunk by chunk: never a (k, weights) float tensor."""
    from supsup.bank import MaskBank
    from supsup.masks import packed_size

    bank = MaskBank(net.layer_shapes(), net.bn_features())
    g = torch.Generator().manual_seed(seed)
    for start in range(0, k, chunk):
        n = min(chunk, k - start)
        packed = {key: torch.randint(0, 256, (n, packed_size(math.prod(shape))),
                                     generator=g, dtype=torch.uint8)
                  for key, shape in net.layer_shapes().items()}
        bank.extend_packed(list(range(start, start + n)), packed)
    return bank


class _FloatStackBinding:
    """The authors' superposition: a float32 (k, weights) stack per layer times alphas."""

    group = None

    def __init__(self, stacks: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                 alphas: torch.Tensor) -> None:
        self.stacks, self.shapes, self.alphas = stacks, shapes, alphas

    def mask(self, layer: Any) -> torch.Tensor:
        return (self.alphas @ self.stacks[layer.key]).reshape(self.shapes[layer.key])

    def bn_stats(self, layer: Any) -> None:
        return None


def float_one_shot(net: Any, stacks: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """dH/dalpha at alpha = 1/k through float32 stacks (what a 3.2 GB bank would compute)."""
    from supsup.binding import bind
    from supsup.objectives import entropy

    k = next(iter(stacks.values())).shape[0]
    alphas = torch.full((k,), 1.0 / k, requires_grad=True)
    with bind(net, _FloatStackBinding(stacks, net.layer_shapes(), alphas)):
        h = entropy(net(x)).mean()
    (grad,) = torch.autograd.grad(h, alphas)
    return grad


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Build one bank of args.k tasks and time inference on it; runs in its own process."""
    from supsup.inference import alpha_gradients, infer_task
    from supsup.networks import build_network

    torch.set_num_threads(args.threads)
    net = build_network(name="lenet", num_outputs=args.outputs, seed=args.seed)
    x = _inputs(args)
    numel = sum(math.prod(s) for s in net.layer_shapes().values())
    out: dict[str, Any] = {"k": args.k, "kind": args.worker, "weights": numel,
                           "float_stack_bytes": args.k * numel * 4,
                           "rss_start_mib": status_kib("VmRSS") / 1024}
    start = time.perf_counter()
    bank = build_packed_bank(net, args.k, args.chunk, args.seed)
    out["build_seconds"] = time.perf_counter() - start
    out["bank_bytes"] = bank.nbytes()
    if args.worker == "float":
        start = time.perf_counter()
        stacks = {key: bank.masks(list(range(args.k)), key).reshape(args.k, -1)
                  for key in net.layer_shapes()}  # (k, weights) float32 per layer
        out["float_build_seconds"] = time.perf_counter() - start
        out["float_stack_bytes_held"] = sum(s.numel() * s.element_size() for s in stacks.values())
    out["rss_after_build_mib"] = status_kib("VmRSS") / 1024
    out["hwm_after_build_mib"] = status_kib("VmHWM") / 1024
    # Start-up and build peak; a reset below lowers ru_maxrss too, so it is read here first.
    out["ru_maxrss_after_build_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["peak_reset"] = reset_peak_rss()  # each timed case resets it again
    rows = torch.arange(args.k)
    timings: dict[str, float] = {}
    peaks: dict[str, float] = {}
    if args.worker == "float":
        for name, seen in (("one_shot_one_image", x[:1]), ("one_shot_batch", x)):
            timings[name], peaks[name] = _timed(
                lambda seen=seen: float_one_shot(net, stacks, seen), args.repeats, args.warmup)
        reference = float_one_shot(net, stacks, x[:1])
        packed = alpha_gradients(net, bank, x[:1], rows)
        scale = float(reference.abs().max())
        out["max_abs_diff_vs_packed"] = float((reference - packed).abs().max())
        out["relative_diff_vs_packed"] = out["max_abs_diff_vs_packed"] / max(scale, 1e-30)
        out["same_argmin_as_packed"] = int(reference.argmin()) == int(packed.argmin())
    else:
        cases = {
            "one_shot_one_image": dict(method="one_shot", mode="one_image"),
            "one_shot_batch": dict(method="one_shot", mode="batch"),
            "binary_one_image": dict(method="binary", mode="one_image"),
            "binary_batch": dict(method="binary", mode="batch"),
        }
        for name, kw in cases.items():
            timings[name], peaks[name] = _timed(
                lambda kw=kw: infer_task(net, bank, x, **kw), args.repeats, args.warmup)
        out["binary_passes"] = infer_task(net, bank, x, method="binary").passes
    out["seconds"] = timings
    out["peak_rss_mib"] = peaks  # per case: since its reset, or of the whole process
    out["rss_end_mib"] = status_kib("VmRSS") / 1024
    out["hwm_inference_mib"] = max(peaks.values())
    return out


# ------------------------------------------------------------------------- driver process
def spawn(args: argparse.Namespace, kind: str, k: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--k", str(k),
           "--outputs", str(args.outputs), "--batch-size", str(args.batch_size),
           "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--chunk", str(args.chunk),
           "--threads", str(args.threads), "--seed", str(args.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bank of {k} tasks ({kind}) failed:\n{proc.stderr[-4000:]}")
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_TAG):
            return json.loads(line[len(_RESULT_TAG):])
    raise RuntimeError(f"bank of {k} tasks ({kind}) printed no result:\n{proc.stdout[-2000:]}")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(_RESULT_TAG + json.dumps(run_worker(args)))
        return
    torch.set_num_threads(args.threads)
    results = [spawn(args, "packed", k) for k in args.k_list]
    reference = spawn(args, "float", args.float_reference) if args.float_reference else None
    rows = []
    for r in results + ([reference] if reference else []):
        s = r["seconds"]
        label = "bits (MaskBank)" if r["kind"] == "packed" else "float32 stack (reference)"
        rows.append([
            label, r["k"], s["one_shot_one_image"], s["one_shot_batch"],
            s.get("binary_one_image", float("nan")), s.get("binary_batch", float("nan")),
            mib(r["bank_bytes"]) if r["kind"] == "packed" else mib(r["float_stack_bytes_held"]),
            mib(r["float_stack_bytes"]), f"1/{r['float_stack_bytes'] / r['bank_bytes']:.1f}",
            r["build_seconds"] if r["kind"] == "packed" else r["float_build_seconds"],
            r["rss_after_build_mib"], r["peak_rss_mib"]["one_shot_one_image"],
            r["hwm_inference_mib"],
        ])
    print_table(
        f"lenet 784-300-100-{args.outputs}: task inference over k random masks; median of "
        f"{args.repeats}, {args.threads} threads, batch {args.batch_size}; seconds per inference",
        ["bank", "k", "1-shot 1img", f"1-shot b{args.batch_size}", "binary 1img",
         f"binary b{args.batch_size}", "held MiB", "f32 MiB", "bits/f32", "build s",
         "RSS MiB", "peak 1-shot", "peak any"],
        rows,
    )
    if reference:
        print(f"float32 reference at k={reference['k']}: relative max |difference| of dH/dalpha "
              f"vs the packed bank {reference['relative_diff_vs_packed']:.2e}; same task: "
              f"{reference['same_argmin_as_packed']}")
    reset_note = ("peaks = VmHWM (MiB) reset before each case, so each is that case's own"
                  if all(r["peak_reset"] for r in results)
                  else "peaks = VmHWM (MiB) of the whole worker (the kernel refused the reset)")
    print(reset_note + "; RSS = VmRSS (MiB) with the bank built, imports and data included; "
          "every k in a fresh process")
    largest = max(results, key=lambda r: r["k"])
    goals = {
        "k": largest["k"],
        "one_shot_seconds": largest["seconds"]["one_shot_one_image"],
        "one_shot_under_1s": largest["seconds"]["one_shot_one_image"] < GOAL_SECONDS,
        "bank_to_float_ratio": largest["bank_bytes"] / largest["float_stack_bytes"],
        "bank_at_most_1_30": largest["bank_bytes"] / largest["float_stack_bytes"] <= GOAL_RATIO,
    }
    info = machine()
    print(f"goals at k={goals['k']}: one-shot {goals['one_shot_seconds']:.3f} s (< 1 s: "
          f"{goals['one_shot_under_1s']}); bank/float32 = {goals['bank_to_float_ratio']:.4f} "
          f"(<= 1/30: {goals['bank_at_most_1_30']})")
    print(f"load average during the run: {info['load_average_1m']} (1 min) on {info['cpus']} "
          "CPUs; other processes make timings noisy")
    emit_json("bank_inference", quick=args.quick, outputs=args.outputs,
              batch_size=args.batch_size, repeats=args.repeats, threads=args.threads,
              machine=info, goals=goals, results=results, float_reference=reference)


if __name__ == "__main__":
    main()
