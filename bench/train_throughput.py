"""Training throughput: tasks per hour for learning supermasks against plain dense training.

The paper's protocol (PermutedMNIST): 1000 batches of 128 per task, RMSprop lr 1e-4, on the fc1024
network (784-1024-1024-outputs) and on LeNet (784-300-100-500, the 2500-task north star). Here the
data are the bundled MNIST digits permuted per task (`supsup.tasks.PermutedTasks`). Measured side
by side, interleaved when repeated, on one process:

- dense floors: plain training of every weight of bias-free layers of the same sizes, same
  optimiser, the same batches drawn through `PermutedTasks.train_batches` in the same dtype as the
  supermask method of that precision (bfloat16 under bf16), so data cost is equal; in float32 and
  with bfloat16 matmuls (autocast); one network at a time (torch.nn.Linear) and, for each group
  size G, G networks vectorised (one batched matmul per layer over the G networks, as a supermask
  group trains);
- single: `supsup.train.train_task`, one task at a time;
- group G: `supsup.train.train_group` with G tasks vectorised in one call;
- each supermask method in fp32 or bf16 (`train.precision`), eager or fused (`train.fused`: the
  elementwise tail of a step compiled into one kernel per layer, `supsup.fused`).

Each row reports seconds per task, tasks per hour and the ratio of its tasks per hour to the
fastest dense floor's (the fastest dense way to train the same networks, whichever shape and
precision that is). Goals: the best supermask method at 2x or more the fastest fp32 dense floor's
tasks per hour, and at or above the fastest bf16 dense floor. With --steps below the protocol's
1000, per-step rates are extrapolated linearly to 1000 steps (the table says so). Compilation
(fused methods) happens in the untimed warm-up, once per process as in a worker; its seconds are
reported apart.

    .venv/bin/python bench/train_throughput.py --quick                     # ~2 minutes
    .venv/bin/python bench/train_throughput.py --networks lenet --steps 200  # ~10 minutes
    .venv/bin/python bench/train_throughput.py                 # the real protocol: ~1 hour
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from common import emit_json, machine, print_table
from torch import nn

from pipeline.datasets import load_dataset
from supsup.fused import autocast, compute_dtype
from supsup.networks import SupermaskNet, build_network
from supsup.tasks import PermutedTasks
from supsup.train import TrainConfig, train_group, train_task

PROTOCOL_STEPS = 1000
GOAL_DENSE_FP32_RATIO = 2.0  # best supermask method vs the fastest fp32 dense floor


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a check that it works: 20 steps, no repeats (about a minute)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"batches per task (default {PROTOCOL_STEPS}; --quick: 20)")
    p.add_argument("--groups", default="16", help="group sizes G to measure, comma separated")
    p.add_argument("--single", default="fp32 eager,bf16 fused",
                   help="methods measured one task at a time, comma separated, from: "
                        + ", ".join(v[0] for v in VARIANTS))
    p.add_argument("--networks", default="fc1024,lenet", help="networks, comma separated")
    p.add_argument("--fc-outputs", type=int, default=500, help="fc1024 outputs (paper: 500; or 10)")
    p.add_argument("--lenet-outputs", type=int, default=500, help="lenet outputs (north star: 500)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--repeats", type=int, default=1,
                   help="interleaved rounds over all methods; the best round counts")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="untimed steps per method before measuring (default 5; --quick: 2)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (20 if args.quick else PROTOCOL_STEPS)
    if args.warmup_steps is None:
        args.warmup_steps = 2 if args.quick else 5
    args.group_sizes = [int(g) for g in args.groups.split(",") if g.strip()]
    args.network_names = [n.strip() for n in args.networks.split(",") if n.strip()]
    args.single_variants = [v.strip() for v in args.single.split(",") if v.strip()]
    if args.steps < 1 or args.repeats < 1 or any(g < 1 for g in args.group_sizes):
        p.error("--steps, --repeats and every group size must be >= 1")
    return args


def dense_network(net: SupermaskNet) -> nn.Module:
    """Plain bias-free Linear layers with the masked layers' sizes and the same ReLUs."""
    shapes = list(net.layer_shapes().values())  # (out, in) per layer, in order
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (out_features, in_features) in enumerate(shapes):
        layers.append(nn.Linear(in_features, out_features, bias=False))
        if i + 1 < len(shapes):
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DenseStack(nn.Module):
    """G dense networks of the masked layers' sizes, each layer's weights stacked as one
    (G, out, in) tensor: one batched matmul per layer trains all G, as a supermask group does."""

    def __init__(self, net: SupermaskNet, group: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        bound = [1.0 / in_features ** 0.5 for _, in_features in net.layer_shapes().values()]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(group, out_features, in_features).uniform_(-b, b,
                                                                                generator=gen))
            for (out_features, in_features), b in zip(net.layer_shapes().values(), bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(2)  # (G, B, C*H*W)
        for k, w in enumerate(self.weights):
            h = torch.bmm(h, w.transpose(1, 2))  # (G, B, out_features)
            if k + 1 < len(self.weights):
                h = F.relu(h)
        return h


def train_dense(net: SupermaskNet, tasks: PermutedTasks, task_ids: Sequence[int], steps: int,
                batch_size: int, lr: float, seed: int, precision: str = "fp32") -> None:
    """The floor: ordinary training of every weight of one dense network per task, fed the
    batches the supermask path gets for the same tasks, gathered in the same dtype (bfloat16
    under bf16, which the matmuls would cast them to anyway). One task: nn.Linear layers; several:
    a DenseStack. Under bf16 the matmuls run in bfloat16 (autocast); weights and RMSprop stay
    float32. Each network's loss is its own batch mean, so its gradient is its own."""
    group = len(task_ids)
    model = dense_network(net) if group == 1 else DenseStack(net, group, seed)
    opt = torch.optim.RMSprop(model.parameters(), lr=lr)
    model.train()
    batches = tasks.train_batches(task_ids, batch_size, steps, seed=seed,
                                  dtype=compute_dtype(precision))
    for x, y in batches:  # x (G, B, C, H, W), y (G, B)
        with autocast(torch.device("cpu"), precision):
            logits = model(x[0]) if group == 1 else model(x)  # (B, outputs) or (G, B, outputs)
        loss = F.cross_entropy(logits.flatten(0, -2).float(), y.flatten(),
                               reduction="sum") / batch_size
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


PRECISIONS = ("fp32", "bf16")
# (label, precision, fused) of every supermask training method, in the order measured
VARIANTS = [("fp32 eager", "fp32", False), ("fp32 fused", "fp32", True),
            ("bf16 eager", "bf16", False), ("bf16 fused", "bf16", True)]


def methods(net: SupermaskNet, tasks: PermutedTasks, args: argparse.Namespace
            ) -> dict[str, tuple[int, Callable[[int], object]]]:
    """name -> (tasks per call, run(steps)), in the order they are measured each round."""
    def config(steps: int, precision: str, fused: bool) -> TrainConfig:
        return TrainConfig(steps=steps, batch_size=args.batch_size, optimizer="rmsprop",
                           lr=args.lr, seed=args.seed, log_every=max(1, steps),
                           precision=precision, fused=fused)

    def dense(ids: list[int], precision: str) -> Callable[[int], object]:
        return lambda s: train_dense(net, tasks, ids, s, args.batch_size, args.lr, args.seed,
                                     precision)

    out: dict[str, tuple[int, Callable[[int], object]]] = {
        f"dense, one network, {p}": (1, dense([0], p)) for p in PRECISIONS}
    for g in args.group_sizes:
        if g > 1:
            out.update({f"dense G={g} (bmm), {p}": (g, dense(list(range(g)), p))
                        for p in PRECISIONS})
    for label, precision, fused in VARIANTS:
        if label in args.single_variants:
            out[f"single, {label}"] = (1, lambda s, p=precision, f=fused: train_task(
                net, tasks, 0, config(s, p, f)))
    for g in args.group_sizes:
        ids = list(range(g))
        for label, precision, fused in VARIANTS:
            out[f"group G={g}, {label}"] = (g, lambda s, ids=ids, p=precision, f=fused: (
                train_group(net, tasks, ids, config(s, p, f))))
    return out


def measure_network(name: str, outputs: int, tasks: PermutedTasks, args: argparse.Namespace
                    ) -> list[dict[str, Any]]:
    net = build_network(name=name, num_outputs=outputs, num_classes=tasks.num_classes,
                        input_shape=tasks.input_shape)
    runs = methods(net, tasks, args)
    warmup: dict[str, float] = {}
    for method, (_, run) in runs.items():  # allocator, thread pool, caches; compilation
        start = time.perf_counter()
        run(args.warmup_steps)
        warmup[method] = time.perf_counter() - start
    seconds: dict[str, list[float]] = {m: [] for m in runs}
    for _ in range(args.repeats):
        for method, (_, run) in runs.items():
            start = time.perf_counter()
            run(args.steps)
            seconds[method].append(time.perf_counter() - start)
    scale = PROTOCOL_STEPS / args.steps
    rows = []
    for method, (group, _) in runs.items():
        best = min(seconds[method])
        per_task = best * scale / group  # seconds per task at the protocol's steps
        rows.append({
            "network": name, "outputs": outputs, "method": method, "group": group,
            "steps_measured": args.steps, "seconds_best": best, "seconds_all": seconds[method],
            "ms_per_step": 1000 * best / args.steps,
            "ms_per_task_step": 1000 * best / args.steps / group,
            "seconds_per_task": per_task, "tasks_per_hour": 3600.0 / per_task,
            "warmup_seconds": warmup[method],
        })
    floor = max(r["tasks_per_hour"] for r in rows if r["method"].startswith("dense"))
    for r in rows:
        r["ratio_to_fastest_dense"] = r["tasks_per_hour"] / floor
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test = load_dataset("mnist-bundled", seed=args.seed)
    tasks = PermutedTasks(train, test, num_tasks=max([1, *args.group_sizes]), seed=args.seed)
    outputs = {"fc1024": args.fc_outputs, "lenet": args.lenet_outputs}
    extrapolated = args.steps != PROTOCOL_STEPS
    results: list[dict[str, Any]] = []
    for name in args.network_names:
        rows = measure_network(name, outputs.get(name, 10), tasks, args)
        results += rows
        note = (f"measured over {args.steps} steps, extrapolated linearly to {PROTOCOL_STEPS}"
                if extrapolated else f"measured over the full {PROTOCOL_STEPS} steps")
        print_table(
            f"{name} ({rows[0]['outputs']} outputs), batch {args.batch_size}, RMSprop "
            f"lr {args.lr}, {args.threads} threads; best of {args.repeats}; {note}",
            ["method", "tasks/call", "ms/step", "ms/task-step", "s/task", "tasks/hour",
             "vs fastest dense", "warm-up s"],
            [[r["method"], r["group"], r["ms_per_step"], r["ms_per_task_step"],
              r["seconds_per_task"], r["tasks_per_hour"], f"{r['ratio_to_fastest_dense']:.2f}x",
              r["warmup_seconds"]] for r in rows],
        )
    goals: dict[str, Any] = {}
    for name in args.network_names:
        rows = {r["method"]: r for r in results if r["network"] == name}
        best = max((r for m, r in rows.items() if not m.startswith("dense")),
                   key=lambda r: r["tasks_per_hour"])
        fastest = {p: max((r for m, r in rows.items() if m.startswith("dense") and
                           m.endswith(p)), key=lambda r: r["tasks_per_hour"])
                   for p in PRECISIONS}
        floor32, floor16 = (fastest[p]["tasks_per_hour"] for p in PRECISIONS)
        goals[name] = {
            "best_method": best["method"],
            "fastest_dense_fp32": fastest["fp32"]["method"],
            "fastest_dense_bf16": fastest["bf16"]["method"],
            "best_vs_fastest_dense": best["tasks_per_hour"] / max(floor32, floor16),
            "best_vs_dense_fp32": best["tasks_per_hour"] / floor32,
            "best_vs_dense_bf16": best["tasks_per_hour"] / floor16,
            f"meets_{GOAL_DENSE_FP32_RATIO:g}x_dense_fp32":
                best["tasks_per_hour"] >= GOAL_DENSE_FP32_RATIO * floor32,
            "meets_dense_bf16": best["tasks_per_hour"] >= floor16,
        }
    info = machine()
    print(f"\ngoals: best supermask method >= {GOAL_DENSE_FP32_RATIO:g}x the fastest fp32 dense "
          f"floor and >= the fastest bf16 dense floor: {goals}")
    print(f"load average during the run: {info['load_average_1m']} (1 min) on "
          f"{info['cpus']} CPUs; other processes make timings noisy")
    emit_json("train_throughput", quick=args.quick, steps=args.steps,
              protocol_steps=PROTOCOL_STEPS, extrapolated=extrapolated,
              batch_size=args.batch_size, lr=args.lr, repeats=args.repeats,
              threads=args.threads, machine=info, goals=goals, results=results)


if __name__ == "__main__":
    main()
