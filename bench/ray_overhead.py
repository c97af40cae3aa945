"""Ray's overhead per task: the training job against the same groups trained in one process.

Both sides do the same work end to end: create the bank in a fresh mask registry, rebuild data
and base network from the config, train every group with `supsup.train.train_group` and write each
task's packed masks to the registry (`pipeline.jobs.train.train_group_worker`). The single-process
side calls that function group after group; the Ray side is `pipeline.jobs.train.run_training`,
which also starts a local Ray, ships task ids to workers and collects their metrics. Tracking
(MLflow) is not involved. Caches of the base data are cleared before each measurement so both
sides load the data as a fresh process would.

overhead = 1 - ray_tasks_per_hour / single_tasks_per_hour (goal: under 10%).

Two Ray layouts on this machine's cores, both shown: workers of 1 CPU and 1 torch thread (as many
workers as cores, each group on one core) and one worker of 2 CPUs and 2 threads; the single
process uses 2 threads. Scales: the quickstart (configs/quickstart.yaml: 20 permuted tasks, lenet
with 100 outputs, 300 steps, groups of 5) and 250 lenet tasks, whose per-task steps are shrunk
with --large-steps for a feasible run (the table says so).

Ray must stay on loopback: run under the offline wrapper,

    /work/shared/offline-run .venv/bin/python bench/ray_overhead.py --quick
    /work/shared/offline-run .venv/bin/python bench/ray_overhead.py
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from common import emit_json, machine, print_table

from pipeline import builders, datasets
from pipeline.builders import task_groups
from pipeline.cluster import ray_session
from pipeline.config import ExperimentConfig, parse_config
from pipeline.jobs.train import prepare_bank, run_training, train_group_worker

QUICKSTART = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
GOAL_OVERHEAD = 0.10
# (label, cpus_per_worker, threads_per_worker) of the Ray layouts compared.
LAYOUTS = (("ray 1 cpu x 1 thread", 1, 1), ("ray 2 cpus x 2 threads", 2, 2))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="quickstart scale only, 30 steps per task (about a minute)")
    p.add_argument("--scales", default=None,
                   help="comma separated: quickstart, large (default both; --quick: quickstart)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per task at quickstart scale (default: the file's 300; --quick 30)")
    p.add_argument("--large-tasks", type=int, default=250)
    p.add_argument("--large-steps", type=int, default=100,
                   help="steps per task at the large scale (the protocol's 1000 shrunk)")
    p.add_argument("--large-group-size", type=int, default=None,
                   help="group size at the large scale (default: the quickstart's)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs given to the local Ray")
    p.add_argument("--single-threads", type=int, default=2,
                   help="torch threads of the single-process run")
    p.add_argument("--repeats", type=int, default=1,
                   help="interleaved rounds; the best round counts")
    p.add_argument("--allow-network", action="store_true",
                   help="run even outside the loopback-only namespace (not recommended)")
    args = p.parse_args(argv)
    if args.scales is None:
        args.scales = "quickstart" if args.quick else "quickstart,large"
    args.scale_names = [s.strip() for s in args.scales.split(",") if s.strip()]
    unknown = set(args.scale_names) - {"quickstart", "large"}
    if unknown:
        p.error(f"unknown scales {sorted(unknown)}; choose from quickstart, large")
    if args.steps is None and args.quick:
        args.steps = 30
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def check_offline(allow: bool) -> None:
    """Refuse to start Ray where a network interface other than loopback is visible."""
    others = sorted(name for _, name in socket.if_nameindex() if name != "lo")
    if others and not allow:
        raise SystemExit(
            f"network interfaces {others} are visible: run this under /work/shared/offline-run "
            "so Ray stays on loopback (or pass --allow-network)"
        )


def scale_config(args: argparse.Namespace, scale: str, root: Path, label: str,
                 cpus_per_worker: int, threads: int) -> ExperimentConfig:
    """The quickstart file's settings, with this measurement's registry, scale and layout."""
    raw = yaml.safe_load(QUICKSTART.read_text())
    overrides = [
        f"registry.root={root / label.replace(' ', '_')}",
        f"cluster.num_cpus={args.num_cpus}",
        f"cluster.cpus_per_worker={cpus_per_worker}",
        f"cluster.threads_per_worker={threads}",
    ]
    if scale == "quickstart" and args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if scale == "large":
        overrides += [f"tasks.num_tasks={args.large_tasks}", f"train.steps={args.large_steps}"]
        if args.large_group_size:
            overrides.append(f"train.group_size={args.large_group_size}")
    return parse_config(raw, f"{QUICKSTART} ({scale})", overrides)


def _fresh_process_caches() -> None:
    """Forget the base data this process loaded, as a new worker process would not have it."""
    builders._base_data.cache_clear()
    datasets._bundled_mnist.cache_clear()


def run_single(config: ExperimentConfig) -> dict[str, Any]:
    """Every group in this process, one after another, into the registry."""
    _fresh_process_caches()
    start = time.perf_counter()
    _, stored = prepare_bank(config)
    assert not stored, "each measurement needs a fresh registry"
    ids = list(range(config.tasks.num_tasks))
    for group in task_groups(ids, config.train.group_size):
        train_group_worker(config.model_dump(), group)
    return {"seconds": time.perf_counter() - start, "tasks": len(ids)}


def run_ray(config: ExperimentConfig) -> dict[str, Any]:
    """The training job as users run it (local Ray started and stopped inside)."""
    _fresh_process_caches()
    start = time.perf_counter()
    summary = run_training(config)
    wall = time.perf_counter() - start
    if len(summary.trained) != config.tasks.num_tasks:
        raise RuntimeError(f"the job trained {len(summary.trained)} of "
                           f"{config.tasks.num_tasks} tasks")
    return {"seconds": wall, "tasks": len(summary.trained), "job_seconds": summary.seconds}


def ray_startup_seconds(config: ExperimentConfig) -> float:
    """Seconds to start and stop a local Ray alone: the fixed part of the overhead."""
    start = time.perf_counter()
    with ray_session(config.cluster):
        pass
    return time.perf_counter() - start


def measure_scale(args: argparse.Namespace, scale: str) -> list[dict[str, Any]]:
    best: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="supsup-ray-bench-") as tmp:
        for rep in range(args.repeats):
            root = Path(tmp) / f"round{rep}"
            runs: list[tuple[str, int, int, ExperimentConfig]] = [(
                f"single process, {args.single_threads} threads", 0, args.single_threads,
                scale_config(args, scale, root, "single", args.num_cpus, args.single_threads),
            )]
            for label, cpus, threads in LAYOUTS:
                runs.append((label, cpus, threads,
                             scale_config(args, scale, root, label, cpus, threads)))
            for label, cpus, threads, config in runs:
                torch.set_num_threads(args.single_threads)  # the driver's own setting
                result = run_single(config) if cpus == 0 else run_ray(config)
                if cpus:
                    result["ray_start_stop_seconds"] = ray_startup_seconds(config)
                workers = 1 if cpus == 0 else max(1, args.num_cpus // cpus)
                result.update(label=label, scale=scale, workers=workers, threads=threads,
                              num_tasks=config.tasks.num_tasks, steps=config.train.steps,
                              group_size=config.train.group_size,
                              tasks_per_hour=3600.0 * result["tasks"] / result["seconds"])
                if label not in best or result["seconds"] < best[label]["seconds"]:
                    best[label] = result
    rows = list(best.values())
    single = rows[0]["tasks_per_hour"]
    for r in rows:
        r["overhead"] = 1.0 - r["tasks_per_hour"] / single
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    check_offline(args.allow_network)
    results: list[dict[str, Any]] = []
    for scale in args.scale_names:
        rows = measure_scale(args, scale)
        results += rows
        r0 = rows[0]
        protocol = 300 if scale == "quickstart" else 1000  # the quickstart file's, the paper's
        shrunk = "" if r0["steps"] >= protocol else " (steps shrunk)"
        print_table(
            f"{scale}: {r0['num_tasks']} permuted tasks, lenet 100 outputs, {r0['steps']} "
            f"steps/task{shrunk}, groups of {r0['group_size']}, {args.num_cpus} CPUs for Ray; "
            f"best of {args.repeats}",
            ["run", "workers", "threads", "wall s", "tasks/hour", "overhead", "ray start+stop s"],
            [[r["label"], r["workers"], r["threads"], r["seconds"], r["tasks_per_hour"],
              f"{100 * r['overhead']:.1f}%", r.get("ray_start_stop_seconds", float("nan"))]
             for r in rows],
        )
    goals = {}
    for scale in args.scale_names:
        ray_rows = [r for r in results if r["scale"] == scale and r["label"].startswith("ray")]
        best = min(ray_rows, key=lambda r: r["overhead"])
        goals[scale] = {"best_layout": best["label"], "overhead": best["overhead"],
                        "under_10%": best["overhead"] < GOAL_OVERHEAD}
    info = machine()
    print(f"\ngoal: overhead under {GOAL_OVERHEAD:.0%}: {goals}")
    print("overhead = 1 - ray tasks/hour / single-process tasks/hour; Ray wall time includes "
          "starting Ray and its workers (each loads the data once)")
    print(f"load average during the run: {info['load_average_1m']} (1 min) on {info['cpus']} "
          "CPUs; other processes make timings noisy")
    emit_json("ray_overhead", quick=args.quick, num_cpus=args.num_cpus,
              single_threads=args.single_threads, repeats=args.repeats,
              large_steps_shrunk_from=1000, machine=info, goals=goals, results=results)


if __name__ == "__main__":
    main()
