"""The baseline job: train and evaluate one of the paper's baselines on an experiment's tasks.

`config.model` picks the baseline (dense, batchensemble or psp; see supsup.baselines). The tasks,
network sizes, optimiser, steps and batches come from the same config SupSup's training job uses,
so the report lines up with SupSup's evaluation report in one results table.

It runs in this process, with no Ray: batchensemble and psp learn their tasks one after another
by nature (each task's training starts from what the previous ones left), and the per-task dense
networks are small fc-family nets. The report is written to runs/<name>/baseline/report.json.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.builders import build_spec, build_tasks
from pipeline.config import ExperimentConfig
from pipeline.jobs.devices import worker_device

log = logging.getLogger(__name__)


def report_path(config: ExperimentConfig) -> Path:
    """Where `run_baseline` writes its report."""
    return config.run_dir / "baseline" / "report.json"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically (temp file + rename): a reader sees the old report or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_baseline(
    config: ExperimentConfig,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Train the baseline `config.model` on all tasks of `config`, evaluate every task after all
    are learned, write the report and return it.

    `progress(done, total)` is called once before training and as each task finishes.
    The report holds kind, mean_accuracy (example-weighted, like SupSup's accuracy_gg),
    accuracy per task id, forgetting, bytes_per_task, shared_bytes, total_bytes, seconds and
    one row per task.
    """

    from supsup.baselines import BASELINES, evaluate_baseline, train_baseline
    from supsup.train import TrainProgress

    if config.model not in BASELINES:
        raise ValueError(f"model is {config.model!r}: the baseline job trains one of "
                         f"dense, batchensemble or psp (set model: in the config or "
                         f"--set model=psp); SupSup itself is trained by the train command")
    start = time.perf_counter()
    tasks = build_tasks(config)
    spec = build_spec(config, tasks)
    task_ids = list(range(config.tasks.num_tasks))
    total = len(task_ids)
    done = 0
    if progress:
        progress(done, total)

    def on_progress(p: TrainProgress) -> None:
        nonlocal done
        log.debug("%s task %d step %d/%d loss %.4f", config.model, p.task_ids[0], p.step,
                  p.steps, p.loss[0])
        if p.step == p.steps:
            done += 1
            if progress:
                progress(done, total)

    device = worker_device(config.cluster)
    log.info("training baseline %s on %d %s tasks (%s, %s)", config.model, total,
             config.tasks.family, spec.name, device)
    result = train_baseline(config.model, spec, tasks, task_ids, config.train_config(),
                            device=device, callback=on_progress,
                            fast_lr=config.baseline.fast_lr)
    if progress and done < total:  # zero steps: no task reported its end
        progress(total, total)
    report = evaluate_baseline(result, tasks, task_ids, batch_size=config.evaluate.batch_size)
    path = report_path(config)
    report.update({
        "name": config.name,
        "family": config.tasks.family,
        "dataset": config.data.dataset,
        "device": device,
        "seconds": time.perf_counter() - start,
        "path": str(path),
    })
    _write_json(path, report)
    log.info("baseline %s: mean accuracy %.4f over %d tasks, %d bytes per task; report %s",
             config.model, report["mean_accuracy"], total, report["bytes_per_task"], path)
    return report
