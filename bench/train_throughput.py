"""Training throughput: tasks per hour for learning supermasks against plain dense training.

The paper's protocol (PermutedMNIST): 1000 batches of 128 per task, RMSprop lr 1e-4, on the fc1024
network (784-1024-1024-outputs) and on LeNet (784-300-100-500, the 2500-task north star). Here the
data are the bundled MNIST digits permuted per task (`supsup.tasks.PermutedTasks`). Measured side
by side, interleaved when repeated, on one process:

- dense floor: torch.nn.Linear layers without bias of the same sizes, same optimiser, the same
  batches drawn through `PermutedTasks.train_batches` (so data cost is equal), one task at a time;
- single: `supsup.train.train_task`, one task at a time;
- group G: `supsup.train.train_group` with G tasks vectorised in one call.

Each row reports seconds per task, tasks per hour and the ratio of its tasks per hour to the dense
floor's (goal: a vectorised group reaches at least 80% of the floor). With --steps below the
protocol's 1000, per-step rates are extrapolated linearly to 1000 steps (setup included, so the
extrapolation slightly overstates setup cost); the table says when that is the case.

    .venv/bin/python bench/train_throughput.py --quick        # ~1 minute
    .venv/bin/python bench/train_throughput.py                 # the real protocol: ~30 min
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
from supsup.networks import SupermaskNet, build_network
from supsup.tasks import PermutedTasks
from supsup.train import TrainConfig, train_group, train_task

PROTOCOL_STEPS = 1000
GOAL_GROUP_RATIO = 0.8


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a check that it works: 20 steps, no repeats (about a minute)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"batches per task (default {PROTOCOL_STEPS}; --quick: 20)")
    p.add_argument("--groups", default="4,8", help="group sizes G to measure, comma separated")
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


def train_dense(net: SupermaskNet, tasks: PermutedTasks, task_id: int, steps: int,
                batch_size: int, lr: float, seed: int) -> None:
    """The floor: ordinary training of every weight, fed the batches a supermask task gets."""
    model = dense_network(net)
    opt = torch.optim.RMSprop(model.parameters(), lr=lr)
    model.train()
    for x, y in tasks.train_batches([task_id], batch_size, steps, seed=seed):
        loss = F.cross_entropy(model(x[0]), y[0])  # x (1, B, C, H, W): a group of one
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def methods(net: SupermaskNet, tasks: PermutedTasks, args: argparse.Namespace
            ) -> dict[str, tuple[int, Callable[[int], object]]]:
    """name -> (tasks per call, run(steps)), in the order they are measured each round."""
    def config(steps: int) -> TrainConfig:
        return TrainConfig(steps=steps, batch_size=args.batch_size, optimizer="rmsprop",
                           lr=args.lr, seed=args.seed, log_every=max(1, steps))

    out: dict[str, tuple[int, Callable[[int], object]]] = {
        "dense floor": (1, lambda s: train_dense(net, tasks, 0, s, args.batch_size, args.lr,
                                                 args.seed)),
        "single (train_task)": (1, lambda s: train_task(net, tasks, 0, config(s))),
    }
    for g in args.group_sizes:
        ids = list(range(g))
        out[f"group G={g} (train_group)"] = (
            g, lambda s, ids=ids: train_group(net, tasks, ids, config(s)))
    return out


def measure_network(name: str, outputs: int, tasks: PermutedTasks, args: argparse.Namespace
                    ) -> list[dict[str, Any]]:
    net = build_network(name=name, num_outputs=outputs, num_classes=tasks.num_classes,
                        input_shape=tasks.input_shape)
    runs = methods(net, tasks, args)
    for _, run in runs.values():  # allocator, thread pool and permutation caches warm up
        run(args.warmup_steps)
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
        })
    floor = rows[0]["tasks_per_hour"]
    for r in rows:
        r["ratio_to_dense"] = r["tasks_per_hour"] / floor
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
             "vs dense"],
            [[r["method"], r["group"], r["ms_per_step"], r["ms_per_task_step"],
              r["seconds_per_task"], r["tasks_per_hour"], f"{r['ratio_to_dense']:.2f}x"]
             for r in rows],
        )
    goals = {}
    for name in args.network_names:
        ratios = [r["ratio_to_dense"] for r in results
                  if r["network"] == name and r["method"].startswith("group")]
        if ratios:
            goals[f"{name}_best_group_ratio"] = max(ratios)
            goals[f"{name}_group_meets_{GOAL_GROUP_RATIO:.0%}"] = max(ratios) >= GOAL_GROUP_RATIO
    info = machine()
    print(f"\ngoal: a vectorised group >= {GOAL_GROUP_RATIO:.0%} of the dense floor: {goals}")
    print(f"load average during the run: {info['load_average_1m']} (1 min) on "
          f"{info['cpus']} CPUs; other processes make timings noisy")
    emit_json("train_throughput", quick=args.quick, steps=args.steps,
              protocol_steps=PROTOCOL_STEPS, extrapolated=extrapolated,
              batch_size=args.batch_size, lr=args.lr, repeats=args.repeats,
              threads=args.threads, machine=info, goals=goals, results=results)


if __name__ == "__main__":
    main()
