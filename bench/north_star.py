"""The north star, run for real: the 2,500-task PermutedMNIST protocol end to end.

Runs `supsup run configs/permuted_mnist_2500.yaml` (LeNet-500, 2,500 permuted tasks, 1000 batches
of 128 per task, bf16 fused training, one-shot task inference from one image among all 2,500
masks) as a child process, from an empty registry and MLflow store of its own, its output going
to a log file. While it runs, the memory of the driver, of every Ray worker and of Ray's own
processes is sampled from /proc (the peak resident set each process reached, VmHWM). At the end
it writes a JSON with the minutes of training, registration and evaluation, tasks per hour, peak
memory per role and the GG, GN and task-inference accuracy, prints a table, and as its last line
the same JSON.

    ../shared/offline-run .venv/bin/python bench/north_star.py                 # ~45-90 minutes
    ../shared/offline-run .venv/bin/python bench/north_star.py --reduced       # 50 tasks, minutes
    nohup ../shared/offline-run .venv/bin/python bench/north_star.py > ns.out 2>&1 &

Goal: under 45 minutes on a 2-core machine, task inference at least 99% among 2,500 masks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import emit_json, machine, print_table

ROOT = Path(__file__).resolve().parent.parent
GOAL_MINUTES, GOAL_TASK_INFERENCE = 45.0, 0.99


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "permuted_mnist_2500.yaml"))
    p.add_argument("--out", default=str(ROOT / "runs" / "north_star"),
                   help="a new folder per run is made under it (log, registry, MLflow, JSON)")
    p.add_argument("--reduced", action="store_true", help="the config's reduced scale")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="more overrides passed to `supsup run`")
    p.add_argument("--every", type=float, default=1.0, help="memory sampling period, seconds")
    return p.parse_args(argv)


def descendants(root: int) -> list[int]:
    """`root` and every process below it, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def sample(pid: int) -> tuple[str, int] | None:
    """(command line, peak RSS in KiB) of one process, or None once it is gone."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return cmd, int(line.split()[1])
    except (OSError, ValueError):
        return None
    return cmd, 0


def role(pid: int, driver: int, cmd: str) -> str:
    if pid == driver:
        return "driver"
    if cmd.startswith("ray::"):  # Ray renames its worker processes after the task they run
        return "worker"
    return "ray system"


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    run_dir = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True)
    overrides = [f"output_dir={run_dir}", f"registry.root={run_dir / 'registry'}",
                 *(["scale=reduced"] if args.reduced else []), *args.set]
    command = [sys.executable, "-m", "pipeline", "run", args.config]
    for o in overrides:
        command += ["--set", o]
    log_path = run_dir / "north_star.log"
    print(f"running {' '.join(command)}\nlog: {log_path}", flush=True)
    peaks: dict[int, tuple[str, int]] = {}
    start = time.perf_counter()
    with log_path.open("w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        last_note = start
        while child.poll() is None:
            for pid in descendants(child.pid):
                got = sample(pid)
                if got is not None and got[1] >= peaks.get(pid, ("", -1))[1]:
                    peaks[pid] = (role(pid, child.pid, got[0]), got[1])
            if time.perf_counter() - last_note > 60:
                last_note = time.perf_counter()
                stored = sum(1 for _ in (run_dir / "registry").glob("*/tasks/task-*.parquet"))
                print(f"{(last_note - start) / 60:.0f} min: {stored} tasks stored; "
                      f"{_last_line(log_path)}", flush=True)
            time.sleep(args.every)
    wall = time.perf_counter() - start
    if child.returncode != 0:
        print(f"error: `supsup run` exited with {child.returncode}; see {log_path}",
              file=sys.stderr)
        raise SystemExit(child.returncode)
    result = summarise(run_dir, wall, peaks)
    (run_dir / "north_star.json").write_text(json.dumps(result, indent=2) + "\n")
    print_table(
        f"north star: {result['tasks']} tasks, {result['steps']} steps each, {result['config']}",
        ["phase", "minutes"],
        [[k, v] for k, v in result["minutes"].items()],
    )
    print_table("accuracy and memory", ["measure", "value"], [
        ["tasks per hour (training)", result["tasks_per_hour"]],
        ["GG accuracy", result["accuracy_gg"]], ["GN accuracy", result["accuracy_gn"]],
        ["task inference accuracy", result["task_inference_accuracy"]],
        *[[f"peak RSS MiB, {k}", v] for k, v in result["peak_rss_mib"].items()],
    ])
    print(f"goals: under {GOAL_MINUTES:g} minutes: {result['goals']['under_minutes']}; "
          f"task inference >= {GOAL_TASK_INFERENCE:.0%}: "
          f"{result['goals']['task_inference']}\nwritten: {run_dir / 'north_star.json'}")
    emit_json("north_star", **result)


def summarise(run_dir: Path, wall: float, peaks: dict[int, tuple[str, int]]) -> dict[str, Any]:
    """The JSON: phase minutes from the run's own files, accuracy from its report."""
    (config_dir,) = [p.parent for p in run_dir.glob("*/train_summary.json")]
    train = json.loads((config_dir / "train_summary.json").read_text())
    report = json.loads((config_dir / "evaluation" / "report.json").read_text())
    minutes = {
        "training": train["seconds"] / 60,
        "registration": train["publish_seconds"] / 60,
        "evaluation": report["seconds"] / 60,
    }
    minutes["start-up and the rest"] = wall / 60 - sum(minutes.values())
    minutes["total"] = wall / 60
    by_role: dict[str, int] = {}
    for r, kib in peaks.values():
        by_role[r] = max(by_role.get(r, 0), kib)
    s = report["summary"]
    return {
        "config": str(config_dir.name), "tasks": train["tasks_trained"],
        "steps": max(int(m["steps"]) for m in train["tasks"].values()),
        "minutes": minutes, "tasks_per_hour": train["tasks_per_hour"],
        "tasks_per_hour_end_to_end": 3600 * train["tasks_trained"] / wall,
        "peak_rss_mib": {k: v / 1024 for k, v in sorted(by_role.items())},
        "workers_seen": sum(1 for r, _ in peaks.values() if r == "worker"),
        "accuracy_gg": s["accuracy_gg"], "accuracy_gn": s.get("accuracy_gn"),
        "task_inference_accuracy": s.get("task_inference_accuracy"),
        "goals": {"under_minutes": wall / 60 < GOAL_MINUTES,
                  "task_inference": (s.get("task_inference_accuracy") or 0) >= GOAL_TASK_INFERENCE},
        "run_dir": str(run_dir), "machine": machine(),
    }


def _last_line(path: Path) -> str:
    """The log's newest line (progress bars redraw with carriage returns)."""
    try:
        tail = path.read_bytes()[-2000:].decode(errors="replace")
    except OSError:
        return ""
    parts = [p.strip() for p in tail.replace("\r", "\n").split("\n") if p.strip()]
    return parts[-1][:160] if parts else ""


if __name__ == "__main__":
    main()
