"""What `lookup`, `registry ls`, `registry verify`, `registry import` and `evaluate` print.

Two forms of the same data (`--format`): `table`, for a person, is bounded in lines whatever the
number of tasks (task ids as ranges such as `0..2499 (2,500 tasks)`, counts, the few worst tasks,
the first problems), and `json`, for programs, is one JSON document on stdout carrying everything
(every task id, every problem). Log lines go to stderr and the log file, so stdout parses.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

Format = Literal["table", "json"]
FORMATS: tuple[str, ...] = ("table", "json")
# How many tasks, problems or ranges a summary names before it counts the rest.
SHOWN = 5
_ALL = "--format json lists all"


def emit(lines: Sequence[str] | None, data: Any, fmt: Format) -> None:
    """Print `lines` (table) or `data` as one JSON document (json)."""
    if fmt == "json":
        print(json.dumps(data, indent=1, default=str))
    else:
        print("\n".join(lines or []))


def task_ranges(ids: Sequence[int], shown: int = SHOWN) -> str:
    """Task ids as runs of consecutive ids: `0..2499 (2,500 tasks)`, `0..9, 20..29 (20 tasks)`;
    beyond `shown` runs the rest are counted, never listed."""
    if not ids:
        return "no tasks"
    ordered = sorted(set(int(i) for i in ids))
    runs: list[tuple[int, int]] = []
    for t in ordered:
        if runs and t == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], t)
        else:
            runs.append((t, t))
    parts = [f"{a}..{b}" if b > a else str(a) for a, b in runs[:shown]]
    if len(runs) > shown:
        parts.append(f"... {len(runs) - shown:,} more ranges")
    count = len(ordered)
    return f"{', '.join(parts)} ({count:,} task{'s' if count != 1 else ''})"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _first_line(text: str, limit: int = 200) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= limit else line[:limit] + "..."


# ------------------------------------------------------------------------------ lookup
def lookup_lines(info: Mapping[str, Any]) -> list[str]:
    """A registered model version in about ten lines, whatever its number of tasks."""
    network, mask = info.get("network") or {}, info.get("mask") or {}
    aliases = ", ".join(f"@{a}" for a in info.get("aliases") or []) or "none"
    where = ("embedded in the model version (a bank file)" if info.get("embedded")
             else f"mask registry {info.get('registry_root')}")
    rule = ", ".join(f"{k} {v}" for k, v in mask.items() if isinstance(v, (str, int, float)))
    lineage = info.get("lineage") or {}
    lines = [
        f"{info['model_uri']} (aliases: {aliases})",
        f"bank: {info['bank']}, tasks {task_ranges(info.get('tasks') or [])}",
        f"snapshot: {info['snapshot']}",
        f"masks: {where}",
        f"network: {network.get('name', '?')} seed {network.get('seed', '?')}"
        + (f"; mask {rule}" if rule else ""),
        f"recipe: {info.get('recipe')}",
        f"lineage: registered by run {lineage.get('registered_by_run')}, trained by run "
        f"{lineage.get('trained_by_run')}, parent run {lineage.get('parent_run')}",
    ]
    evaluations = lineage.get("evaluations") or []
    if evaluations:
        e = evaluations[0]
        lines.append(f"evaluations: {len(evaluations)}; newest: run {e['run_id']}: GG "
                     f"{_pct(e.get('accuracy_gg'))}, GN {_pct(e.get('accuracy_gn'))}, task "
                     f"inference {_pct(e.get('task_inference_accuracy'))}")
    else:
        lines.append("evaluations: none yet (`supsup evaluate MODEL_URI`)")
    if info.get("description"):
        lines.append(f"description: {_first_line(info['description'])}")
    lines.append("every field and task id: --format json")
    return lines


def task_record_lines(info: Mapping[str, Any]) -> list[str]:
    """One stored task of a model version: its densities per layer and training metadata."""
    densities: Mapping[str, float] = info.get("densities") or {}
    lines = [f"task {info['task_id']} of {info['model']} (version {info['version']})"]
    layers = list(densities.items())
    for name, value in layers[:SHOWN * 2]:
        lines.append(f"  density {name}: {value:.4f}")
    if len(layers) > SHOWN * 2:
        lines.append(f"  ... {len(layers) - SHOWN * 2} more layers ({_ALL})")
    for key, value in list((info.get("metadata") or {}).items())[:SHOWN * 3]:
        lines.append(f"  {key}: {value}")
    return lines


# ------------------------------------------------------------------------------ registry
def bank_entry(bank: str, ids: Sequence[int], manifest: Mapping[str, Any]) -> dict[str, Any]:
    """One bank of `registry ls`, as JSON carries it (every task id)."""
    return {"bank": bank, "tasks": list(ids), "num_tasks": len(ids),
            "network": manifest["network"]["name"], "seed": manifest["network"]["seed"],
            "rule": manifest["mask"].get("rule"), "density": manifest["mask"].get("density")}


def bank_line(entry: Mapping[str, Any]) -> str:
    ids = entry["tasks"]
    span = task_ranges(ids).rsplit(" (", 1)[0] if ids else "-"
    return (f"{entry['bank']}: {len(ids):,} tasks ({span}), network {entry['network']} seed "
            f"{entry['seed']}, rule {entry['rule']}")


def verify_data(report: Any, recipe_text: str) -> dict[str, Any]:
    """Everything `registry verify` found, for JSON (task ids as ints; problems by task)."""
    return {"bank": report.bank, "all_ok": report.all_ok, "tasks_ok": list(report.ok),
            "problems": {str(t): msg for t, msg in sorted(report.problems.items())},
            "foreign": list(report.foreign), "temporary": list(report.temporary),
            "manifest_problem": report.manifest_problem, "recipe": report.recipe,
            "recipe_text": recipe_text, "reservoir_problem": report.reservoir_problem}


def verify_lines(report: Any, recipe_text: str) -> list[str]:
    """The verdict, counts, and the first problems of each kind (the rest counted)."""
    bank = report.bank
    lines = [f"{bank}: manifest: {report.manifest_problem}" if report.manifest_problem
             else f"{bank}: recipe: {recipe_text}"]
    lines.append(f"{bank}: {len(report.ok):,} tasks ok, {len(report.problems):,} with problems, "
                 f"{len(report.foreign):,} files that are not the bank's")
    if report.ok:
        lines.append(f"  ok: tasks {task_ranges(report.ok)}")
    problems = sorted(report.problems.items())
    for t, msg in problems[:SHOWN]:
        lines.append(f"  task {t}: {msg}")
    if len(problems) > SHOWN:
        rest = [t for t, _ in problems[SHOWN:]]
        lines.append(f"  ... and tasks {task_ranges(rest)} with problems ({_ALL})")
    for name in report.foreign[:SHOWN]:
        lines.append(f"  not a file of this bank: {name} (move it out of the bank folder)")
    if len(report.foreign) > SHOWN:
        lines.append(f"  ... and {len(report.foreign) - SHOWN:,} more such files ({_ALL})")
    for name in report.temporary[:SHOWN]:
        lines.append(f"  temporary file of an unfinished write: {name} (safe to delete when no "
                     "job writes to this bank)")
    if len(report.temporary) > SHOWN:
        lines.append(f"  ... and {len(report.temporary) - SHOWN:,} more temporary files "
                     f"({_ALL})")
    if report.reservoir_problem:
        lines.append(f"  reservoir: {report.reservoir_problem}")
    return lines


def import_data(result: Any, path: str, root: str) -> dict[str, Any]:
    return {"bank": result.bank, "file": path, "root": root, "written": list(result.written),
            "unchanged": list(result.unchanged)}


def import_lines(result: Any, path: str, root: str) -> list[str]:
    lines = [f"imported {path} into bank {result.bank} under {root}: "
             f"{len(result.written):,} tasks written, {len(result.unchanged):,} already stored "
             "with identical masks"]
    if result.written:
        lines.append(f"  written: tasks {task_ranges(result.written)}")
    if result.unchanged:
        lines.append(f"  unchanged: tasks {task_ranges(result.unchanged)}")
    return lines


# ------------------------------------------------------------------------------ evaluate
_RANKED = ("task_inference_accuracy", "accuracy_gn", "accuracy_gg")


def worst_tasks(tasks: Sequence[Mapping[str, Any]], shown: int = SHOWN
                ) -> tuple[str, list[Mapping[str, Any]]]:
    """The measure tasks are ranked by (task inference when it was measured) and the `shown`
    tasks lowest on it, lowest first."""
    key = next((k for k in _RANKED if any(t.get(k) is not None for t in tasks)), "accuracy_gg")
    ranked = sorted((t for t in tasks if t.get(key) is not None),
                    key=lambda t: (t[key], t["task_id"]))
    return key, ranked[:shown]


def evaluation_data(report: Any, files: Mapping[str, Path]) -> dict[str, Any]:
    """Everything an evaluation measured, every task included, for JSON."""
    return {"bank": report.bank, "run_id": report.run_id, "model_version": report.model_version,
            "summary": report.summary, "continual": getattr(report, "continual", {}),
            "curve": report.curve, "settings": report.settings,
            "tasks": [{k: v for k, v in t.items() if k != "inferred"} for t in report.tasks],
            "files": {k: str(Path(v).resolve()) for k, v in files.items()}}


def evaluation_lines(report: Any, files: Mapping[str, Path]) -> list[str]:
    s = report.summary
    line = f"GG accuracy {100 * s['accuracy_gg']:.2f}%"
    if "accuracy_gn" in s:
        line += (f" | GN accuracy {100 * s['accuracy_gn']:.2f}% | task inference "
                 f"{100 * s['task_inference_accuracy']:.2f}%")
    lines = [f"{line} over {int(s['tasks'])} tasks"]
    key, worst = worst_tasks(report.tasks)
    best = max((t[key] for t in report.tasks if t.get(key) is not None), default=None)
    if worst and best is not None and worst[0][key] < best:  # all equal: nothing stands out
        shown = ", ".join(f"{t['task_id']} ({_pct(t[key])})" for t in worst)
        lines.append(f"lowest {key.replace('_', ' ')}: tasks {shown}")
    lines.append(f"report: {Path(files['markdown']).resolve()}")
    return lines
