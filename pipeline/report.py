"""Reports people read: JSON for machines, Markdown for people, PNG plots for a glance.

The one module that draws (matplotlib, on the file-only Agg backend): accuracy against the number
of tasks learned (the paper's Figure 3 view), the continual-learning accuracy matrix (GG beside
GN), the task-inference confusion matrix for banks small enough to show one, training per task,
sweep trials, the discovery stream and Hopfield capacity.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.accuracy_matrix import AccuracyMatrix
    from pipeline.jobs.evaluate import EvalReport
    from pipeline.jobs.sweep.outputs import SweepSummary


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
        if "inferences" in s:
            per = ("one per test batch" if report.settings.get("mode") == "one_image"
                   else "one per test example")
            lines.append(f"| task inferences made | {int(s['inferences']):,} ({per}) |")
    if report.curve:
        lines += ["", "## Accuracy against tasks learned", "",
                  "| tasks learned | GN accuracy | task inference | GG accuracy |",
                  "|---|---|---|---|"]
        for c in report.curve:
            lines.append(f"| {c['tasks_learned']} | {_pct(c.get('accuracy_gn'))} | "
                         f"{_pct(c.get('task_inference_accuracy'))} | "
                         f"{_pct(c.get('accuracy_gg'))} |")
    lines += _continual_markdown(report)
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


def _points(v: float | None) -> str:
    if v is None:
        return "-"
    return "0.00 points" if v == 0 else f"{100 * v:+.2f} points"  # exactly zero: no sign


def _sampled(n: int, most: int) -> list[int]:
    """Up to `most` indices of `n`, evenly spread, always with the first and the last."""
    if n <= most:
        return list(range(n))
    return sorted({round(i * (n - 1) / (most - 1)) for i in range(most)})


def _continual_markdown(report: EvalReport, most: int = 12) -> list[str]:
    """The three summaries for GG and GN, and the GN matrix at up to `most` rows and columns."""
    c, gn = report.continual, report.matrices.get("gn")
    if not c or gn is None:
        return []
    lines = ["", "## Continual learning", "",
             "Accuracy matrix A[i][j]: accuracy on task j after the first i tasks were learned "
             "(rows: the curve's points; columns: a fixed sample of tasks, each measured at every "
             "row where it had been learned). Average accuracy: mean over all tasks at the end; "
             "forgetting: mean drop from a task's best earlier accuracy to the end; backward "
             "transfer: mean change from a task's first row to the end (negative: forgotten).", "",
             "| | GG (task given) | GN (task inferred) |", "|---|---|---|",
             f"| average accuracy | {_pct(c.get('average_accuracy_gg'))} | "
             f"{_pct(c.get('average_accuracy_gn'))} |",
             f"| forgetting | {_points(c.get('forgetting_gg'))} | "
             f"{_points(c.get('forgetting_gn'))} |",
             f"| backward transfer | {_points(c.get('backward_transfer_gg'))} | "
             f"{_points(c.get('backward_transfer_gn'))} |", ""]
    rows, cols = _sampled(len(gn.tasks_learned), most), _sampled(len(gn.task_ids), most)
    shown = "" if (len(rows), len(cols)) == _shape(gn) else (
        f" ({len(rows)} of {len(gn.tasks_learned)} rows, {len(cols)} of {len(gn.task_ids)} "
        "columns; all in report.json)")
    lines += [f"GN accuracy matrix{shown}; GG's is constant down each column (a learned mask "
              "never changes):", "",
              "| tasks learned | " + " | ".join(f"task {gn.task_ids[j]}" for j in cols) + " |",
              "|---" * (len(cols) + 1) + "|"]
    for i in rows:
        cells = [gn.values[i][j] for j in cols]
        lines.append(f"| {gn.tasks_learned[i]} | " + " | ".join(
            "" if v is None else _pct(v) for v in cells) + " |")
    return lines


def _shape(m: AccuracyMatrix) -> tuple[int, int]:
    return len(m.tasks_learned), len(m.task_ids)


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (workers and servers have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_with_side_legend(fig: Any, ax: Any, path: Path) -> Path:
    """Grid, the legend beside the axes (never over a point), saved and closed."""
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def plot_curve(report: EvalReport, path: Path) -> Path | None:
    """GN and task-inference accuracy against tasks learned, with GG for reference.

    The y axis spans 0-100% (no zoom that would magnify a point into a cliff); GG is drawn as a
    wide pale band under the GN line, so it stays visible where the two coincide (inference
    right every time); the legend sits beside the axes, never over a point.
    """
    if not report.curve:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    ks = [int(c["tasks_learned"]) for c in report.curve]
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=110)
    ax.plot(ks, [100 * c["accuracy_gg"] for c in report.curve], "-", color="tab:green",
            linewidth=7, alpha=0.3, solid_capstyle="round", label="GG (task given)")
    ax.plot(ks, [100 * c["accuracy_gn"] for c in report.curve], "o-", color="tab:blue",
            label="GN (task inferred)")
    ax.plot(ks, [100 * c["task_inference_accuracy"] for c in report.curve], "s--",
            color="tab:orange", label="task inference")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("tasks learned (masks in the bank)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 101)
    s = report.settings
    ax.set_title(f"{report.bank}: accuracy as tasks are added\n"
                 f"{s.get('method')} inference, {s.get('objective')} objective, "
                 f"{s.get('mode')}", fontsize=9)
    return _save_with_side_legend(fig, ax, path)


def plot_accuracy_matrix(report: EvalReport, path: Path, max_cells: int = 24) -> Path | None:
    """GG and GN accuracy matrices side by side on one colour scale (0-100%): rows are tasks
    learned, columns tasks; cells a task had not been learned at are left blank (grey), and
    small matrices carry their values in the cells."""
    panels = [(name, report.matrices[name]) for name in ("gg", "gn") if name in report.matrices]
    if not panels:
        return None
    plt = _pyplot()
    import numpy as np

    rows, cols = _shape(panels[0][1])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 + 2.6 * len(panels), 4.4), dpi=110,
                             squeeze=False, sharey=True, layout="constrained")
    cmap = plt.get_cmap("viridis").with_extremes(bad="0.88")
    titles = {"gg": "GG: task given", "gn": "GN: task inferred"}
    annotate = rows <= max_cells and cols <= max_cells
    image = None
    for ax, (name, m) in zip(axes[0], panels):
        grid = np.array([[np.nan if v is None else 100 * v for v in row] for row in m.values])
        image = ax.imshow(np.ma.masked_invalid(grid), vmin=0, vmax=100, cmap=cmap,
                          aspect="auto", interpolation="nearest")
        if annotate:
            for (i, j), v in np.ndenumerate(grid):
                if not np.isnan(v):
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6,
                            color="black" if v > 60 else "white")
        xs, ys = _sampled(cols, max_cells), _sampled(rows, max_cells)  # each a real id
        ax.set_xticks(xs, [str(m.task_ids[j]) for j in xs], rotation=90, fontsize=7)
        ax.set_yticks(ys, [str(m.tasks_learned[i]) for i in ys], fontsize=7)
        ax.set_xlabel("task (accuracy measured on)")
        c = report.continual
        ax.set_title(f"{titles[name]}\nforgetting {_points(c.get(f'forgetting_{name}'))}, "
                     f"BWT {_points(c.get(f'backward_transfer_{name}'))}", fontsize=8)
    axes[0][0].set_ylabel("tasks learned")
    bar = fig.colorbar(image, ax=list(axes[0]), fraction=0.04, pad=0.02)
    bar.set_label("accuracy on the task (%); grey: not yet learned", fontsize=8)
    fig.suptitle(f"{report.bank}: accuracy on each task (column) after learning the number of "
                 "tasks in the row", fontsize=9)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_confusion(report: EvalReport, path: Path, max_tasks: int = 60) -> Path | None:
    """Inferred-task matrix (rows: true task) for up to `max_tasks` tasks."""
    ids = [r["task_id"] for r in report.tasks]
    if not ids or len(ids) > max_tasks or not report.tasks[0].get("inferred"):
        return None
    plt = _pyplot()
    import numpy as np

    index = {t: i for i, t in enumerate(ids)}
    m = np.zeros((len(ids), len(ids)))
    for r in report.tasks:
        total = sum(r["inferred"].values()) or 1
        for inferred, count in r["inferred"].items():
            if int(inferred) in index:
                m[index[r["task_id"]], index[int(inferred)]] = count / total
    fig, ax = plt.subplots(figsize=(5.2, 4.2), dpi=110)
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    step = max(1, len(ids) // 10)  # at most ~10 labelled ticks, each a real task id
    ax.set_xticks(range(0, len(ids), step), [str(t) for t in ids[::step]])
    ax.set_yticks(range(0, len(ids), step), [str(t) for t in ids[::step]])
    ax.set_xlabel("inferred task")
    ax.set_ylabel("true task")
    ax.set_title(f"{report.bank}: which task was inferred", fontsize=9)
    bar = fig.colorbar(im, ax=ax, fraction=0.046)
    bar.set_label("share of the true task's inferences")
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
    for name, fn in (("curve", plot_curve), ("accuracy_matrix", plot_accuracy_matrix),
                     ("confusion", plot_confusion)):
        p = fn(report, out_dir / f"{name}.png")
        if p is not None:
            files[name] = p
    return files


def plot_training(trained: dict[int, dict[str, Any]], path: Path) -> Path | None:
    """Training accuracy (the last logging window) and mask density for each task."""
    if not trained:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    ids = sorted(trained)
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=110)
    ax.plot(ids, [100 * trained[t]["train_accuracy"] for t in ids], "o", markersize=3,
            label="training accuracy, last window (%)")
    ax.plot(ids, [100 * trained[t]["density"] for t in ids], "s", markersize=3,
            label="mask density: weights kept (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("task id")
    ax.set_ylabel("percent")
    ax.set_ylim(0, 101)
    ax.set_title(f"training: {len(ids)} tasks", fontsize=9)
    return _save_with_side_legend(fig, ax, path)


def plot_sweep(summary: SweepSummary, out_dir: Path) -> dict[str, Path]:
    """Validation accuracy against mask density and against compressed bytes per task."""
    rows = [r for r in summary.rows if r["status"] != "error" and r.get("val_accuracy") is not None]
    if not rows:
        return {}
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, x_key, label in (
        ("accuracy_vs_density", "density", "mask density (fraction of weights kept)"),
        ("accuracy_vs_bytes", "compressed_bytes_per_task", "bytes per task (zlib-compressed)"),
    ):
        fig, ax = plt.subplots(figsize=(5, 3.4), dpi=110)
        for status, marker in (("completed", "o"), ("stopped early", "x")):
            sel = [r for r in rows if r["status"] == status]
            if sel:
                ax.plot([r[x_key] for r in sel], [100 * r["val_accuracy"] for r in sel],
                        marker, linestyle="none", label=status)
        if summary.best is not None:
            ax.plot(summary.best[x_key], 100 * summary.best["val_accuracy"], "*", markersize=14,
                    color="crimson", label="best")
        if x_key == "compressed_bytes_per_task":
            stored = {r["stored_bytes_per_task"] for r in rows}
            if len(stored) == 1:
                ax.axvline(stored.pop(), linestyle="--", color="grey", label="bit-packed")
            xs = [r[x_key] for r in rows]
            if min(xs) > 0 and max(xs) / min(xs) > 10:
                ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(f"sweep over {', '.join(summary.keys)}: {len(rows)} trials", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        files[name] = path
    return files


def plot_discovery(stream: dict[str, Any], order: list[int], batches_per_task: int,
                   path: Path) -> Path:
    """Mask id trained on each batch against the true task, allocations marked; below it, the
    training accuracy of each window between checks."""
    plt = _pyplot()

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 4.6), dpi=110, sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1]})
    for i, t in enumerate(order):
        a = i * batches_per_task
        top.plot([a, a + batches_per_task], [t, t], color="0.6", lw=6, solid_capstyle="butt",
                 label="true task" if i == 0 else None)
    for n, (a, b, m) in enumerate(stream["segments"]):
        top.plot([a, b + 1], [m, m], color="C0", lw=2, label="mask trained" if n == 0 else None)
    if stream["allocations"]:
        xs, ms = zip(*stream["allocations"])
        top.plot(xs, ms, "v", color="C3", ms=6, label="mask allocated")
    top.set_ylabel("task / mask id")
    top.set_title(f"{stream['num_masks']} masks for {len(set(order))} hidden tasks")
    top.legend(fontsize=7, loc="upper left")
    top.grid(alpha=0.3)
    checks = stream["checks"]
    pts = [(b, a) for b, a in zip(checks["batch"], checks["window_accuracy"]) if math.isfinite(a)]
    if pts:
        bottom.plot(*zip(*pts), ".-", color="C2", ms=3)
    bottom.set_ylim(0, 1)
    bottom.set_xlabel("batch of the stream")
    bottom.set_ylabel("train acc.")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_capacity(capacity: list[list[float]], d: int, flip: float, path: Path) -> Path:
    """Recall rate of random patterns against the number stored, with d / sqrt(2 ln d)."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    ax.plot([c for c, _ in capacity], [100 * r for _, r in capacity], "o-",
            label=f"exact recall, {100 * flip:.0f}% bits flipped")
    if d > 1:
        ax.axvline(d / math.sqrt(2 * math.log(d)), color="0.5", ls=":",
                   label=r"$d / \sqrt{2 \ln d}$")
    ax.set_xlabel("patterns stored")
    ax.set_ylabel("recalled (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(f"Hopfield reservoir capacity, d = {d}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
