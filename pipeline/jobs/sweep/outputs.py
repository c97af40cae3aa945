"""What a sweep leaves behind: one row per trial, the best one, trials.csv/json and the table."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.jobs.sweep.space import _plain, with_values
from pipeline.jobs.sweep.trial import REPORTED

if TYPE_CHECKING:
    from pipeline.config import ExperimentConfig

_COLUMNS = ("trial_id", "run_id", "status", *REPORTED, "train_step", "steps", "log_points",
            "error")


@dataclass
class SweepSummary:
    """What a sweep did: one row per trial, the best one, and where everything was written."""

    keys: list[str]
    metric: str
    mode: str
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_config: Path | None
    files: dict[str, Path] = field(default_factory=dict)
    run_id: str | None = None
    storage: Path | None = None
    seconds: float = 0.0


def _describe(params: dict[str, Any], keys: list[str]) -> str:
    return " ".join(f"{k}={_fmt(params.get(k))}" for k in keys)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(_plain(value))


def _rows(results: Any, keys: list[str], runs: dict[str, str]) -> list[dict[str, Any]]:
    """One plain row per trial from Tune's ResultGrid."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or next(
            (t for t in runs if result.path and t in Path(result.path).name), "")
        row: dict[str, Any] = {"trial_id": trial_id, "run_id": runs.get(trial_id)}
        row.update({k: _plain((result.config or {}).get(k)) for k in keys})
        row.update({k: _plain(metrics.get(k)) for k in REPORTED})
        row["train_step"] = metrics.get("train_step")
        row["steps"] = metrics.get("steps")
        row["log_points"] = metrics.get("training_iteration")
        if result.error is not None:
            row["status"] = "error"
            row["error"] = str(result.error).strip().splitlines()[-1][:300]
        else:
            done = (row["train_step"] or 0) >= (row["steps"] or math.inf)
            row["status"] = "completed" if done else "stopped early"
            row["error"] = None
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial_id"])


def _best(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    scored = [r for r in rows if r["status"] != "error" and r.get(metric) is not None
              and not math.isnan(r[metric])]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda r: r[metric])


def best_config(config: ExperimentConfig, best: dict[str, Any], keys: list[str]
                ) -> ExperimentConfig:
    """The base config with the best values, named `<name>-best`, ready for `supsup train`."""
    values: dict[str, Any] = {k: best[k] for k in keys}
    values["name"] = f"{config.name}-best"
    values["sweep"] = None
    if config.registry.bank:
        values["registry.bank"] = f"{config.registry.bank}-best"
    return with_values(config, values, "best sweep config")


def write_results(summary: SweepSummary, out_dir: Path) -> dict[str, Path]:
    """trials.csv and trials.json (every trial, the best one marked)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = [*_COLUMNS[:3], *summary.keys, *_COLUMNS[3:]]
    csv_path = out_dir / "trials.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in summary.rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v
                             for k, v in row.items() if k in columns})
    json_path = out_dir / "trials.json"
    json_path.write_text(json.dumps({
        "metric": summary.metric, "mode": summary.mode, "keys": summary.keys,
        "best": summary.best, "trials": summary.rows,
    }, indent=1, default=str))
    return {"csv": csv_path, "json": json_path}


def format_table(summary: SweepSummary) -> str:
    """The trials as a small text table, best first."""
    headers = ["trial", *summary.keys, "val_acc", "density", "packed B", "zlib B", "status"]
    order = sorted(summary.rows, key=lambda r: (r is not summary.best, r["trial_id"]))
    lines = []
    for r in order:
        mark = "*" if r is summary.best else " "
        lines.append([
            f"{mark}{r['trial_id']}", *(_fmt(r.get(k)) for k in summary.keys),
            _pct(r.get("val_accuracy")), _fmt(r.get("density")),
            _bytes(r.get("stored_bytes_per_task")), _bytes(r.get("compressed_bytes_per_task")),
            r["status"],
        ])
    widths = [max(len(h), *(len(str(row[i])) for row in lines)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*headers), *(fmt.format(*row) for row in lines)])


def _bytes(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"
