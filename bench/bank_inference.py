"""One-shot inference over a bank of many LeNet tasks: packed bits against a float32 stack.

The paper's north star: 2,500 PermutedMNIST tasks on LeNet (784-300-100-500), the task found by one
gradient of the output entropy with respect to the superposition alphas (Section 3.3). The bank
keeps each task's mask at one bit per weight (`supsup.bank.MaskBank`); the authors stacked masks
as float32 (2.9 GiB at 2,500 tasks). Masks here are random bytes (density ~0.5): the cost of
inference does not depend on what the masks learned. They are built packed, in chunks, straight
into the bank with `MaskBank.extend_packed`.

Every k runs twice, each in a fresh process: over the packed bank, and over a float32 stack of the
same masks (the authors' approach) wherever the stack fits in the memory available. The two
gradients are compared (relative difference, same task), and the float worker also times both
approaches alternately in one process ('pair' columns): on a shared machine, load from other
processes moves absolute times between runs, and alternation gives both the same load. The
driver loads the data and hands the workers one input batch in a file, so a worker holds only
torch, the network, the batch and the bank: its memory before the bank is the floor any process
running this network pays.

Memory, per worker (VmRSS/VmHWM, MiB): `baseline` before the bank exists (torch import + network
+ batch); the bank's own share, its bytes and its RSS growth once the allocator has returned the
build's freed buffers to the system (glibc malloc_trim; what that returned is reported apart);
the one-shot transient (peak above the RSS before it) and the one-shot peak (VmHWM, reset after
the build); and the build's peak, which random chunks and count updates set.

Goals at the largest k: one-shot under 0.1 s on 2 cores, never slower than the float32 stack at
any k where the stack fits, bank <= 1/30 of the stack, process peak under 500 MiB (if torch's
own import allows it: the table's baseline says).

    .venv/bin/python bench/bank_inference.py --quick
    .venv/bin/python bench/bank_inference.py
    .venv/bin/python bench/bank_inference.py --queries 1,16,256,1024   # the batched engine
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common import emit_json, machine, mib, print_table, reset_peak_rss, status_kib

GOAL_SECONDS = 0.1
GOAL_RATIO = 1 / 30
GOAL_PEAK_MIB = 500
_RESULT_TAG = "BANK_INFERENCE_RESULT "
_FLOAT_HEADROOM = 2.0  # a float stack is built only if MemAvailable holds twice its bytes + 1 GiB


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="one timed call per row and no warm-up call (about a minute)")
    p.add_argument("--ks", default="25,250,2500", help="bank sizes, comma separated")
    p.add_argument("--float-ks", default=None,
                   help="k values for the float32 stack (default: every k whose stack fits; "
                        "'none' to skip)")
    p.add_argument("--outputs", type=int, default=500, help="lenet outputs (north star: 500)")
    p.add_argument("--batch-size", type=int, default=128, help="batch for the batch-mode rows")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed inferences per row, median reported (default 10; --quick: 1)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed inferences before timing a row (default 1; --quick: 0)")
    p.add_argument("--chunk", type=int, default=250, help="tasks added per extend_packed call")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=("packed", "float"), help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 10
    if args.warmup is None:
        args.warmup = 0 if args.quick else 1
    args.k_list = [int(k) for k in args.ks.split(",") if k.strip()]
    if args.float_ks is None or args.float_ks == "auto":
        args.float_list = None
    elif args.float_ks.lower() in ("none", "0", ""):
        args.float_list = []
    else:
        args.float_list = [int(k) for k in args.float_ks.split(",") if k.strip()]
    if args.repeats < 1 or args.chunk < 1 or any(k < 1 for k in args.k_list):
        p.error("--repeats, --chunk and every k must be >= 1")
    return args


# ------------------------------------------------------------------------- worker process
def _rss() -> float:
    return status_kib("VmRSS") / 1024


def _trim_heap() -> float:
    """Return freed heap memory to the system (glibc); the MiB of RSS that released."""
    before = _rss()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return 0.0
    return before - _rss()


def _timed(fn: Callable[[], Any], repeats: int, warmup: int) -> tuple[float, float, float]:
    """Median seconds of `repeats` calls after `warmup` untimed ones (first-touch allocations);
    RSS before the calls and the peak over them in MiB (VmHWM reset first where allowed)."""
    reset_peak_rss()
    before = _rss()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), before, status_kib("VmHWM") / 1024


def _paired(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds of each function, calls alternating so that every function sees the same
    load: the ratio holds on a shared machine where absolute times drift from run to run."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def build_packed_bank(net: Any, k: int, chunk: int, seed: int) -> Any:
    """k tasks of random packed bytes, added chunk by chunk: never a (k, weights) float tensor."""
    import torch

    from supsup.bank import MaskBank
    from supsup.masks import packed_size

    bank = MaskBank(net.layer_shapes(), net.bn_features())
    bank.reserve(k)  # no growth copies: a growth briefly holds the old and the new storage
    g = torch.Generator().manual_seed(seed)
    for start in range(0, k, chunk):
        n = min(chunk, k - start)
        packed = {key: torch.randint(0, 256, (n, packed_size(math.prod(shape))),
                                     generator=g, dtype=torch.uint8)
                  for key, shape in net.layer_shapes().items()}
        bank.extend_packed(list(range(start, start + n)), packed)
    return bank


def float_stacks(bank: Any, chunk: int) -> dict[str, Any]:
    """(k, weights) float32 per layer, filled chunk by chunk (no transient of the stack's size)."""
    import torch

    from supsup.masks import unpack_bits

    stacks = {}
    for key in bank.layer_shapes:
        p = bank.packed(key)
        n = math.prod(bank.layer_shapes[key])
        s = torch.empty(p.shape[0], n)
        for start in range(0, p.shape[0], chunk):
            s[start:start + chunk] = unpack_bits(p[start:start + chunk], n)
        stacks[key] = s
    return stacks


class _FloatStackBinding:
    """The authors' superposition: a float32 (k, weights) stack per layer times alphas."""

    group = None

    def __init__(self, stacks: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                 alphas: Any) -> None:
        self.stacks, self.shapes, self.alphas = stacks, shapes, alphas

    def mask(self, layer: Any) -> Any:
        return (self.alphas @ self.stacks[layer.key]).reshape(self.shapes[layer.key])

    def bn_stats(self, layer: Any) -> None:
        return None


def float_one_shot(net: Any, stacks: dict[str, Any], x: Any) -> Any:
    """dH/dalpha at alpha = 1/k through float32 stacks (what a 3 GiB bank would compute)."""
    import torch

    from supsup.binding import bind
    from supsup.objectives import entropy

    k = next(iter(stacks.values())).shape[0]
    alphas = torch.full((k,), 1.0 / k, requires_grad=True)
    with bind(net, _FloatStackBinding(stacks, net.layer_shapes(), alphas)):
        h = entropy(net(x)).mean()
    (grad,) = torch.autograd.grad(h, alphas)
    return grad


def _packed_cases(net: Any, bank: Any, x: Any) -> dict[str, Callable[[], Any]]:
    from supsup.inference import infer_task

    modes = {
        "one_shot_one_image": dict(method="one_shot", mode="one_image"),
        "one_shot_batch": dict(method="one_shot", mode="batch"),
        "binary_one_image": dict(method="binary", mode="one_image"),
        "binary_batch": dict(method="binary", mode="batch"),
    }
    return {name: (lambda kw=kw: infer_task(net, bank, x, **kw)) for name, kw in modes.items()}


def _time_cases(cases: dict[str, Callable[[], Any]], args: argparse.Namespace,
                out: dict[str, Any]) -> None:
    """Median seconds, transient and peak memory of each case into `out`."""
    out["build_peak_mib"] = status_kib("VmHWM") / 1024  # start-up and build, before any reset
    out["peak_reset"] = reset_peak_rss()
    out.update(seconds={}, transient_mib={}, peak_mib={})
    for name, fn in cases.items():
        out["seconds"][name], before, peak = _timed(fn, args.repeats, args.warmup)
        out["transient_mib"][name] = peak - before  # above the RSS before the case
        out["peak_mib"][name] = peak  # whole-process peaks where resets fail
    out["process_peak_mib"] = max(out["build_peak_mib"], *out["peak_mib"].values())


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Build one bank of args.k tasks and time inference on it; runs in its own process.

    The float worker times the float32 stack with the bank deleted (its memory is the stack's),
    then builds the bank again to time both approaches alternately.
    """
    import torch

    from supsup.bank import kernel_plan
    from supsup.inference import alpha_gradients, infer_task
    from supsup.networks import build_network

    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {"k": args.k, "kind": args.worker, "rss_imports_mib": _rss()}
    net = build_network(name="lenet", num_outputs=args.outputs, seed=args.seed)
    x = torch.load(args.inputs)
    numel = sum(math.prod(s) for s in net.layer_shapes().values())
    out.update(weights=numel, float_stack_bytes=args.k * numel * 4, baseline_mib=_rss(),
               kernel=vars(kernel_plan(torch.device("cpu"))))
    start = time.perf_counter()
    bank = build_packed_bank(net, args.k, args.chunk, args.seed)
    out["build_seconds"] = time.perf_counter() - start
    out["bank_bytes"] = bank.nbytes()
    out["allocator_retained_mib"] = _trim_heap()
    out["bank_rss_mib"] = _rss() - out["baseline_mib"]
    if args.worker == "packed":
        _time_cases(_packed_cases(net, bank, x), args, out)
        out["binary_passes"] = infer_task(net, bank, x, method="binary").passes
        return out
    packed_grad = alpha_gradients(net, bank, x[:1], torch.arange(args.k))
    start = time.perf_counter()
    stacks = float_stacks(bank, args.chunk)
    out["float_build_seconds"] = time.perf_counter() - start
    del bank
    _trim_heap()
    out["stack_rss_mib"] = _rss() - out["baseline_mib"]
    cases = {
        "one_shot_one_image": lambda: float_one_shot(net, stacks, x[:1]),
        "one_shot_batch": lambda: float_one_shot(net, stacks, x),
    }
    _time_cases(cases, args, out)
    reference = float_one_shot(net, stacks, x[:1])
    diff = float((reference - packed_grad).abs().max())
    out["relative_diff_vs_packed"] = diff / max(float(reference.abs().max()), 1e-30)
    out["same_argmin_as_packed"] = int(reference.argmin()) == int(packed_grad.argmin())
    packed = _packed_cases(net, build_packed_bank(net, args.k, args.chunk, args.seed), x)
    out["paired_seconds"] = {
        name: _paired({"packed": packed[name], "float": fn}, args.repeats, args.warmup)
        for name, fn in cases.items()
    }
    return out


# ------------------------------------------------------------------------- driver process
def write_inputs(args: argparse.Namespace, path: Path) -> None:
    """A real test batch of permuted task 0, x (batch, 1, 28, 28), saved for the workers."""
    import torch

    from pipeline.datasets import load_dataset
    from supsup.tasks import PermutedTasks

    train, test = load_dataset("mnist-bundled", seed=args.seed)
    tasks = PermutedTasks(train, test, num_tasks=1, seed=args.seed)
    x, _ = next(tasks.eval_batches(0, "test", args.batch_size))
    torch.save(x.contiguous().clone(), path)


def _mem_available() -> int:
    """MemAvailable in bytes (0 where /proc/meminfo is unreadable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def float_fits(k: int, weights: int) -> bool:
    return _mem_available() >= _FLOAT_HEADROOM * k * weights * 4 + (1 << 30)


def spawn(args: argparse.Namespace, kind: str, k: int, inputs: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--k", str(k),
           "--inputs", str(inputs), "--outputs", str(args.outputs),
           "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--chunk", str(args.chunk), "--threads", str(args.threads), "--seed", str(args.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bank of {k} tasks ({kind}) failed:\n{proc.stderr[-4000:]}")
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_TAG):
            return json.loads(line[len(_RESULT_TAG):])
    raise RuntimeError(f"bank of {k} tasks ({kind}) printed no result:\n{proc.stdout[-2000:]}")


def _ratio(num: float | None, den: float | None) -> float:
    return num / den if num is not None and den else float("nan")


def report(args: argparse.Namespace, packed: list[dict], floats: dict[int, dict],
           skipped: list[int]) -> None:
    nan = float("nan")
    time_rows, mem_rows = [], []
    for r in packed:
        f = floats.get(r["k"])
        s = r["seconds"]
        pair = (f or {}).get("paired_seconds", {})
        one, batch = pair.get("one_shot_one_image", {}), pair.get("one_shot_batch", {})
        time_rows.append([
            r["k"], s["one_shot_one_image"], one.get("packed", nan), one.get("float", nan),
            _ratio(one.get("float"), one.get("packed")), s["one_shot_batch"],
            batch.get("packed", nan), batch.get("float", nan),
            _ratio(batch.get("float"), batch.get("packed")),
            s["binary_one_image"], s["binary_batch"],
            f"{f['relative_diff_vs_packed']:.1e}" if f else "-",
        ])
        mem_rows.append([
            r["k"], r["rss_imports_mib"], r["baseline_mib"], mib(r["bank_bytes"]),
            r["bank_rss_mib"], r["transient_mib"]["one_shot_one_image"],
            r["peak_mib"]["one_shot_one_image"], r["build_peak_mib"],
            mib(r["float_stack_bytes"]), f["stack_rss_mib"] if f else nan,
            f["peak_mib"]["one_shot_one_image"] if f else nan,
            f"1/{r['float_stack_bytes'] / r['bank_bytes']:.1f}", r["build_seconds"],
        ])
    print_table(
        f"lenet 784-300-100-{args.outputs}: seconds per inference over k random masks; median of "
        f"{args.repeats}, {args.threads} threads. 'bits' = packed bank in its own process; 'pair' "
        "= packed and float32 stack timed alternately in one process (their ratio is robust to "
        "load from other processes)",
        ["k", "bits 1-shot", "pair bits", "pair f32", "f32/bits", f"bits b{args.batch_size}",
         "pair bits", "pair f32", "f32/bits", "bits binary", f"binary b{args.batch_size}",
         "rel diff"],
        time_rows,
    )
    print_table(
        "memory (MiB): torch = RSS after importing torch and supsup; baseline = RSS before the "
        "bank (+ network + batch); bank = its bytes, and its RSS growth (freed heap returned); "
        "1-shot + = one-shot peak above the RSS before it; peaks are VmHWM",
        ["k", "torch", "baseline", "bank", "bank RSS", "1-shot +", "1-shot peak", "build peak",
         "f32 stack", "stack RSS", "f32 1-shot peak", "bits/f32", "build s"],
        mem_rows,
    )
    kernel = packed[0]["kernel"]
    print(f"kernel: {'int8 planes x int8 digits' if kernel['integer'] else 'float32 planes'}, "
          f"{kernel['block_bytes'] // 1024} KiB of packed bytes per block; torch import alone: "
          f"{packed[0]['rss_imports_mib']:.0f} MiB RSS")
    if skipped:
        print(f"float32 stack skipped at k={skipped}: it does not fit in the memory available")
    if not all(r["peak_reset"] for r in packed):
        print("the kernel refused VmHWM resets: peaks and transients are whole-process peaks")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--queries" or a.startswith("--queries=") for a in argv):
        # many queries per pass: the batched engine's rows (bench/engine_inference.py)
        from engine_inference import main as engine_main

        engine_main(argv)
        return
    args = parse_args(argv)
    if args.worker:
        print(_RESULT_TAG + json.dumps(run_worker(args)))
        return
    with tempfile.TemporaryDirectory(prefix="bank_inference_") as tmp:
        inputs = Path(tmp) / "x.pt"
        write_inputs(args, inputs)
        packed = [spawn(args, "packed", k, inputs) for k in args.k_list]
        weights = packed[0]["weights"]
        wanted = args.k_list if args.float_list is None else args.float_list
        floats, skipped = {}, []
        for k in wanted:
            if float_fits(k, weights):
                floats[k] = spawn(args, "float", k, inputs)
            else:
                skipped.append(k)
    report(args, packed, floats, skipped)
    largest = max(packed, key=lambda r: r["k"])
    goals = {
        "k": largest["k"],
        "one_shot_seconds": largest["seconds"]["one_shot_one_image"],
        "one_shot_under_goal": largest["seconds"]["one_shot_one_image"] < GOAL_SECONDS,
        "never_slower_than_float": all(
            f["paired_seconds"][c]["packed"] <= f["paired_seconds"][c]["float"]
            for f in floats.values() for c in ("one_shot_one_image", "one_shot_batch")),
        "float_to_packed_one_shot": {
            f["k"]: f["paired_seconds"]["one_shot_one_image"]["float"]
            / f["paired_seconds"]["one_shot_one_image"]["packed"] for f in floats.values()},
        "same_task_as_float": all(f["same_argmin_as_packed"] for f in floats.values()),
        "bank_to_float_ratio": largest["bank_bytes"] / largest["float_stack_bytes"],
        "bank_at_most_1_30": largest["bank_bytes"] / largest["float_stack_bytes"] <= GOAL_RATIO,
        "baseline_mib": largest["baseline_mib"],
        "torch_import_mib": largest["rss_imports_mib"],
        "bank_rss_mib": largest["bank_rss_mib"],
        "one_shot_peak_mib": largest["peak_mib"]["one_shot_one_image"],
        "process_peak_mib": largest["process_peak_mib"],
        "peak_under_500_mib": largest["process_peak_mib"] < GOAL_PEAK_MIB,
    }
    info = machine()
    print(f"goals at k={goals['k']}: one-shot {goals['one_shot_seconds']:.3f} s "
          f"(< {GOAL_SECONDS} s: {goals['one_shot_under_goal']}); never slower than the float32 "
          f"stack: {goals['never_slower_than_float']}; bank/float32 = "
          f"{goals['bank_to_float_ratio']:.4f} (<= 1/30: {goals['bank_at_most_1_30']}); process "
          f"peak {goals['process_peak_mib']:.0f} MiB (< {GOAL_PEAK_MIB}: "
          f"{goals['peak_under_500_mib']}; one-shot peak {goals['one_shot_peak_mib']:.0f}, "
          f"torch's import alone {goals['torch_import_mib']:.0f}, the bank "
          f"{mib(largest['bank_bytes']):.0f})")
    print(f"load average during the run: {info['load_average_1m']} (1 min) on {info['cpus']} "
          "CPUs; other processes make timings noisy")
    emit_json("bank_inference", quick=args.quick, outputs=args.outputs,
              batch_size=args.batch_size, repeats=args.repeats, threads=args.threads,
              machine=info, goals=goals, results=packed,
              float_results=list(floats.values()), float_skipped=skipped)


if __name__ == "__main__":
    main()
