"""`supsup evaluate` of the 2,500-task PermutedMNIST bank over every test batch of every task.

The goal: the evaluation of the north star's bank, one task inference per test batch (the paper's
protocol) for every batch of every task (about 20,000 inferences on the bundled digits), in under
2 minutes on this 2-core machine, through the real command (Ray workers, the registry, MLflow).

What inference costs does not depend on what the masks learned, but what evaluation costs does a
little: a batch whose task is inferred wrongly is classified again with the mask it was given, an
extra forward pass that a trained bank (>= 99% right) rarely pays. So the bank is trained for
`--steps` steps per task (`supsup train CONFIG --set train.steps=30`, about 2 minutes here, not
the protocol's 31), enough for about 90% of the inferences to be right: the time measured is at
most a fully trained bank's. `--steps 1` gives the worst case (masks at their random initial
density, nearly every batch inferred wrongly). The table reports the task-inference accuracy the
bank reached.

    ../shared/offline-run .venv/bin/python bench/evaluate_scale.py
    ../shared/offline-run .venv/bin/python bench/evaluate_scale.py --tasks 250
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from common import emit_json, machine, print_table

ROOT = Path(__file__).resolve().parent.parent
GOAL_SECONDS = 120.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "permuted_mnist_2500.yaml"))
    p.add_argument("--tasks", type=int, default=2500)
    p.add_argument("--steps", type=int, default=30,
                   help="training steps per task (1: the worst case, every batch misinferred)")
    p.add_argument("--set", action="append", default=[], dest="sets",
                   help="more --set overrides for both commands (e.g. evaluate.digits=3)")
    p.add_argument("--folder", type=Path, default=None,
                   help="keep the run here (default: a temporary folder, removed)")
    return p.parse_args(argv)


def _supsup(args: list[str]) -> float:
    """Run the real command; its seconds. Its output goes to this terminal."""
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "supsup"), "-q", *args], check=True,
                   cwd=ROOT)
    return time.perf_counter() - start


def run(args: argparse.Namespace, folder: Path) -> None:
    sets = [f"tasks.num_tasks={args.tasks}", f"train.steps={args.steps}",
            f"output_dir={folder / 'runs'}", f"registry.root={folder / 'registry'}", *args.sets]
    flags = [x for s in sets for x in ("--set", s)]
    train_s = _supsup(["train", args.config, *flags])
    evaluate_s = _supsup(["evaluate", args.config, *flags])
    reports = sorted((folder / "runs").glob("*/evaluation/report.json"))
    report = json.loads(reports[-1].read_text())
    s = report["summary"]
    inferences = int(s["inferences"])
    load = os.getloadavg()
    print_table(f"supsup evaluate, {args.tasks} tasks, every test batch "
                f"(load average {load[0]:.1f} {load[1]:.1f})",
                ["tasks", "steps", "task inference", "inferences", "command s", "job s",
                 "ms/inference", "goal s"],
                [[args.tasks, args.steps, f"{100 * s['task_inference_accuracy']:.1f}%",
                  inferences, f"{evaluate_s:.1f}", f"{report['seconds']:.1f}",
                  f"{1000 * report['seconds'] / max(1, inferences):.2f}", GOAL_SECONDS]])
    emit_json("evaluate_scale", tasks=args.tasks, steps=args.steps, inferences=inferences,
              task_inference_accuracy=s["task_inference_accuracy"],
              train_seconds=train_s, evaluate_seconds=evaluate_s,
              job_seconds=report["seconds"], settings=report["settings"],
              goal_met=evaluate_s <= GOAL_SECONDS if args.tasks == 2500 else None,
              load_average=list(load), machine=machine())


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.folder is not None:
        args.folder.mkdir(parents=True, exist_ok=True)
        run(args, args.folder.resolve())
        return
    with tempfile.TemporaryDirectory(prefix="evaluate_scale_") as tmp:
        run(args, Path(tmp))


if __name__ == "__main__":
    main()
