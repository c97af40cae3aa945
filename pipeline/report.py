"""Reports people read: JSON for machines, Markdown for people, PNG plots for a glance.

Plots: accuracy against the number of tasks learned (the paper's Figure 3 view), per-task
accuracy, and a task-inference confusion matrix for banks small enough to show one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.jobs.evaluate import EvalReport


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def markdown(report: EvalReport, title: str) -> str:
    s = report.summary
    lines = [
        f"# {title}", "",
        f"Bank `{report.bank}`, {int(s['tasks'])} tasks, {int(s['examples'])} test examples; "
        f"inference {report.settings.get('method')} / {report.settings.get('objective')} / "
        f"{report.settings.get('mode')}; {report.seconds:.1f} s.", "",
        "| metric | value |", "|---|---|",
        f"| GG accuracy (task given) | {_pct(s.get('accuracy_gg'))} |",
    ]
    if "accuracy_gn" in s:
        lines += [
            f"| GN accuracy, paper's count (wrong task = whole batch wrong) | "
            f"{_pct(s['accuracy_gn'])} |",
            f"| GN accuracy, per example | {_pct(s['accuracy_gn_per_example'])} |",
            f"| task-inference accuracy | {_pct(s['task_inference_accuracy'])} |",
        ]
    if report.curve:
        lines += ["", "## Accuracy against tasks learned", "",
                  "| tasks learned | GN accuracy | task inference | GG accuracy |",
                  "|---|---|---|---|"]
        for c in report.curve:
            lines.append(f"| {c['tasks_learned']} | {_pct(c.get('accuracy_gn'))} | "
                         f"{_pct(c.get('task_inference_accuracy'))} | "
                         f"{_pct(c.get('accuracy_gg'))} |")
    conf = report.confusions()
    if conf:
        lines += ["", "## Most frequent task-inference confusions", "",
                  "| true task | inferred task | inferences |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {n} |" for a, b, n in conf]
    elif "accuracy_gn" in s:
        lines += ["", "No task was ever inferred wrongly."]
    lines += ["", "## Per task", "", "| task | GG | GN | task inference |", "|---|---|---|---|"]
    for r in report.tasks[:200]:
        lines.append(f"| {r['task_id']} | {_pct(r['accuracy_gg'])} | {_pct(r.get('accuracy_gn'))}"
                     f" | {_pct(r.get('task_inference_accuracy'))} |")
    if len(report.tasks) > 200:
        lines.append(f"| ... | {len(report.tasks) - 200} more in report.json | | |")
    return "\n".join(lines) + "\n"


def plot_curve(report: EvalReport, path: Path) -> Path | None:
    """GN and task-inference accuracy against tasks learned, with GG for reference."""
    if not report.curve:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [c["tasks_learned"] for c in report.curve]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    ax.plot(ks, [100 * c["accuracy_gn"] for c in report.curve], "o-", label="GN accuracy")
    ax.plot(ks, [100 * c["task_inference_accuracy"] for c in report.curve], "s--",
            label="task inference")
    ax.plot(ks, [100 * c["accuracy_gg"] for c in report.curve], ":", label="GG accuracy")
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{report.bank}: {report.settings.get('method')} inference")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_confusion(report: EvalReport, path: Path, max_tasks: int = 60) -> Path | None:
    """Inferred-task matrix (rows: true task) for up to `max_tasks` tasks."""
    ids = [r["task_id"] for r in report.tasks]
    if not ids or len(ids) > max_tasks or not report.tasks[0].get("inferred"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    index = {t: i for i, t in enumerate(ids)}
    m = np.zeros((len(ids), len(ids)))
    for r in report.tasks:
        total = sum(r["inferred"].values()) or 1
        for inferred, count in r["inferred"].items():
            if int(inferred) in index:
                m[index[r["task_id"]], index[int(inferred)]] = count / total
    fig, ax = plt.subplots(figsize=(4.2, 3.6), dpi=110)
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    ax.set_xlabel("inferred task")
    ax.set_ylabel("true task")
    ax.set_title("task inference")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(report: EvalReport, out_dir: Path, title: str) -> dict[str, Path]:
    """report.json, report.md and plots under `out_dir`; returns what was written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    files["json"] = out_dir / "report.json"
    files["json"].write_text(json.dumps(report.to_dict(), indent=1))
    files["markdown"] = out_dir / "report.md"
    files["markdown"].write_text(markdown(report, title))
    for name, fn in (("curve", plot_curve), ("confusion", plot_confusion)):
        p = fn(report, out_dir / f"{name}.png")
        if p is not None:
            files[name] = p
    return files


def plot_training(trained: dict[int, dict[str, Any]], path: Path) -> Path | None:
    """Training accuracy and mask density per task."""
    if not trained:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = sorted(trained)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    ax.plot(ids, [100 * trained[t]["train_accuracy"] for t in ids], ".", label="train accuracy")
    ax.plot(ids, [100 * trained[t]["density"] for t in ids], ".", label="mask density")
    ax.set_xlabel("task")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
