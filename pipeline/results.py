"""docs/RESULTS.md: the paper's experiments at reduced scale, measured by this project's commands.

`supsup results --run` runs every listed command (the reduced-scale switch of each config, in one
output folder), then collects the reports they wrote into one Markdown table beside the paper's
reported numbers, and copies the plots next to it. Without `--run` it only collects, so the table
can be rebuilt from earlier runs. Every measured number is read from a report file a command wrote.

A results file is never overwritten by a table with rows missing (entries whose reports are not
under the output folder): the command refuses, naming the missing rows and the commands that make
them, before anything is written; an incomplete table can only go to a new file (`--doc`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """One row: a config at reduced scale, how it runs, and the paper's number it stands beside."""

    label: str
    config: str
    kind: str  # supsup | baseline | sweep | discovery | reservoir
    paper: str
    overrides: tuple[str, ...] = ()
    caveat: str = ""  # a known property of the method or setting that explains the row

    def command(self, out: str) -> list[str]:
        verb = {"supsup": "run", "baseline": "train", "sweep": "sweep",
                "discovery": "train", "reservoir": "train"}[self.kind]
        sets = ["scale=reduced", f"output_dir={out}", f"registry.root={out}/registry",
                *self.overrides]
        return [verb, self.config, *[a for s in sets for a in ("--set", s)]]


# The paper's numbers are quoted from its text and tables (NeurIPS 2020); they describe the full
# protocols, which the reduced rows only approximate.
ENTRIES: tuple[Entry, ...] = (
    Entry("PermutedMNIST, LeNet (100 outputs)", "configs/permuted_mnist_250_lenet.yaml",
          "supsup", "94.91% GN after 250 tasks (one-shot, one image)"),
    Entry("PermutedMNIST, FC 1024-1024 (500 outputs, G)", "configs/permuted_mnist_250_fc1024.yaml",
          "supsup", "250 tasks; GN with G above H (Fig. 5)"),
    Entry("PermutedMNIST 2500 protocol, LeNet (500 outputs)", "configs/permuted_mnist_2500.yaml",
          "supsup", "2500 tasks learned; one gradient step often finds the mask"),
    Entry("RotatedMNIST (binary, full batch)", "configs/rotated_mnist_36.yaml", "supsup",
          "36 tasks 10 degrees apart, binary inference"),
    Entry("SplitMNIST (shared labels)", "configs/split_mnist.yaml", "supsup",
          "5 tasks; the Hopfield variant recovers all masks"),
    Entry("SplitCIFAR100 stand-in, ResNet-18 + ER (GG)", "configs/split_cifar100.yaml", "supsup",
          "SplitCIFAR100 GG; lower bound 24.5%"),
    Entry("Upper bound: dense net per task", "configs/permuted_mnist_250_lenet.yaml", "baseline",
          "none for PermutedMNIST (its upper bound is reported on SplitImageNet)",
          ("model=dense", "name=pmnist-dense")),
    Entry("BatchEnsemble", "configs/permuted_mnist_250_lenet.yaml", "baseline",
          "none for PermutedMNIST (BatchE is reported on SplitImageNet)",
          ("model=batchensemble", "name=pmnist-batche"),
          "the shared weights learn with task 0 at train.lr, the rank-one fast weights of "
          "every task at their own baseline.fast_lr (at the shared train.lr they barely "
          "move and later tasks stay near chance)"),
    Entry("PSP", "configs/permuted_mnist_250_lenet.yaml", "baseline",
          "compared on PermutedMNIST (Fig. 3)", ("model=psp", "name=pmnist-psp")),
    Entry("Density sweep (top-k), Ray Tune", "configs/sweep_density.yaml", "sweep",
          "none for PermutedMNIST (densities are swept on SplitImageNet)"),
    Entry("Training without task identity (NNs)", "configs/nns_permuted.yaml", "discovery",
          "masks allocated as tasks arrive (Section 3.4)"),
    Entry("Hopfield reservoir, SplitMNIST", "configs/hopfield_split_mnist.yaml", "reservoir",
          "5 tasks recalled in under 30 steps (Section 3.5)"),
)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * float(v):.2f}%"


def _bytes(v: Any) -> str:
    if v is None:
        return "-"
    v = float(v)
    return f"{v / 1e6:.2f} MB" if v >= 1e6 else f"{v / 1e3:.1f} kB" if v >= 1e3 else f"{v:.0f} B"


def _secs(v: Any) -> str:
    return "-" if v is None else f"{float(v):.0f} s"


def _config(entry: Entry, out: str) -> Any:
    from pipeline.config import load_config

    return load_config(entry.config, [s for s in entry.command(out)[2:] if s != "--set"])


def _supsup_row(entry: Entry, out: str, figures: Path) -> dict[str, Any]:
    from pipeline.registry import MaskRegistry

    config = _config(entry, out)
    report = _read(config.run_dir / "evaluation" / "report.json")
    train = _read(config.run_dir / "train_summary.json")
    if not report:  # trained but never evaluated counts as not run: the row has no numbers
        return {}
    s = report["summary"]
    row: dict[str, Any] = {
        "tasks": int(s["tasks"]), "gg": s.get("accuracy_gg"), "gn": s.get("accuracy_gn"),
        "inference": s.get("task_inference_accuracy"), "seconds": report.get("seconds")}
    curve = config.run_dir / "evaluation" / "curve.png"
    if curve.exists():
        row["figures"] = [(curve, figures / f"{config.name}-curve.png")]
    if train and row.get("seconds") is not None:
        row["seconds"] = float(row["seconds"]) + float(train["seconds"])
    try:
        registry = MaskRegistry(config.registry.root)
        manifest = registry.manifest(config.bank)
        ids = registry.tasks(config.bank)
        folder = Path(config.registry.root) / config.bank / "tasks"
        sizes = [p.stat().st_size for p in folder.glob("*.parquet")]
        packed = sum((_numel(s) + 7) // 8 for s in manifest["layer_shapes"].values())
        row["bytes"] = f"{_bytes(packed)} packed, {_bytes(sum(sizes) / len(sizes))} stored" \
            if sizes and ids else None
    except (KeyError, OSError, ValueError):
        pass
    return row


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _baseline_row(entry: Entry, out: str, figures: Path) -> dict[str, Any]:
    config = _config(entry, out)
    report = _read(config.run_dir / "baseline" / "report.json")
    if not report:
        return {}
    return {"tasks": len(report.get("accuracy", {})) or None, "gg": report.get("mean_accuracy"),
            "bytes": _bytes(report.get("bytes_per_task")), "seconds": report.get("seconds")}


def _sweep_row(entry: Entry, out: str, figures: Path) -> dict[str, Any]:
    from pipeline.jobs.sweep import trial_task_ids

    config = _config(entry, out)
    folder = config.run_dir / "sweep"
    trials = _read(folder / "trials.json")
    if not trials:
        return {}
    rows = trials if isinstance(trials, list) else trials.get("trials", [])
    done = [r for r in rows if r.get("val_accuracy") is not None]
    row: dict[str, Any] = {"tasks": len(trial_task_ids(config))}
    if done:
        best = max(done, key=lambda r: r["val_accuracy"])
        lo = min(done, key=lambda r: r.get("compressed_bytes_per_task") or 0)
        row["note"] = (f"{len(done)} trials; best val {_pct(best['val_accuracy'])} at density "
                       f"{best.get('train.density')}; sparsest "
                       f"{_pct(lo['val_accuracy'])} at "
                       f"{_bytes(lo.get('compressed_bytes_per_task'))}/task compressed")
        row["gg"] = best["val_accuracy"]  # validation split carved from the training data
        row["bytes"] = _bytes(best.get("compressed_bytes_per_task"))
    return _with_figures(row, folder, figures, config.name)


def _discovery_row(entry: Entry, out: str, figures: Path) -> dict[str, Any]:
    config = _config(entry, out)
    folder = config.run_dir / "discovery"
    report = _read(folder / "report.json")
    if not report:
        return {}
    s = report["summary"]
    row: dict[str, Any] = {
        "tasks": s.get("num_true_tasks"), "gn": s.get("test_accuracy"),
        "inference": s.get("inference_agreement"), "seconds": s.get("seconds"),
        "note": (f"{s.get('num_masks')} masks allocated for {s.get('num_true_tasks')} hidden "
                 f"tasks (purity {_pct(s.get('purity'))}); accuracy over the stream "
                 f"{_pct(s.get('stream_accuracy'))}"),
    }
    return _with_figures(row, folder, figures, config.name)


def _reservoir_row(entry: Entry, out: str, figures: Path) -> dict[str, Any]:
    config = _config(entry, out)
    folder = config.run_dir / "hopfield"
    report = _read(folder / "report.json")
    if not report:
        return {}
    s = report["summary"]
    row: dict[str, Any] = {
        "tasks": s.get("num_stored"), "gn": s.get("accuracy_recalled_mean"),
        "gg": s.get("accuracy_stored_mean"), "inference": s.get("recall_accuracy"),
        "bytes": f"{_bytes(s.get('reservoir_bytes'))} in all, constant",
        "seconds": s.get("seconds"),
        "note": (f"recalled gates from test batches in {s.get('settled_at_mean')} steps on "
                 f"average; mean Hamming distance to the stored gates "
                 f"{_pct(s.get('hamming_fraction_mean'))} of the bits; the GG column is the "
                 f"stored gates' accuracy, GN the recalled gates'"),
    }
    return _with_figures(row, folder, figures, config.name)


def _with_figures(row: dict[str, Any], folder: Path, figures: Path, name: str) -> dict[str, Any]:
    for png in sorted(folder.glob("*.png")):
        row.setdefault("figures", []).append((png, figures / f"{name}-{png.name}"))
    return row


def _copy_figures(rows: list[tuple[Entry, dict[str, Any]]]) -> None:
    """Copy each row's plots beside the results file (once the table is known to be written)."""
    for _, r in rows:
        for src, dest in r.get("figures", []):
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)


def collect(out: str, figures: Path) -> list[tuple[Entry, dict[str, Any]]]:
    """Each entry with the row its reports under `out` make (empty when there are none); a row's
    `figures` are (plot, destination under `figures`) pairs, not copied yet."""
    readers = {
        "supsup": _supsup_row, "baseline": _baseline_row, "sweep": _sweep_row,
        "discovery": _discovery_row, "reservoir": _reservoir_row,
    }
    return [(e, readers[e.kind](e, out, figures)) for e in ENTRIES]


def provenance() -> list[str]:
    """When, from which commit, with which packages and on which machine these rows were made."""
    import datetime
    import os
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "absent"

    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=False).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    packages = ", ".join(f"{n} {v(n)}" for n in ("torch", "ray", "mlflow", "pyarrow"))
    return [f"Written {when} from commit `{commit}`; Python {platform.python_version()}, "
            f"{packages}; {cpu}, {os.cpu_count()} cores."]


def markdown(rows: list[tuple[Entry, dict[str, Any]]], out: str, doc_dir: Path,
             seconds: float | None) -> str:
    lines = [
        "# Results", "",
        "The paper's experiments at reduced scale (each config's `scale: reduced` switch: the "
        "bundled 5,000 MNIST digits, fewer tasks and steps), measured on a 2-core CPU machine by "
        "the commands listed below. The last column quotes the paper for the same experiment and "
        "protocol only (at its full scale); where the paper reports an experiment on another data "
        "set, it says so instead of quoting a number.", "",
        *provenance(), "",
        "| experiment | tasks | accuracy, task given (GG) | accuracy, task inferred (GN) | "
        "task inference | bytes per task | time | the paper reports |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e, r in rows:
        if not r:
            lines.append(f"| {e.label} | not run | | | | | | {e.paper} |")
            continue
        lines.append(
            f"| {e.label} | {r.get('tasks') or '-'} | {_pct(r.get('gg'))} | {_pct(r.get('gn'))} "
            f"| {_pct(r.get('inference'))} | {r.get('bytes') or '-'} | {_secs(r.get('seconds'))} "
            f"| {e.paper} |")
    notes = [(e, "; ".join(n for n in (r.get("note"), e.caveat) if n))
             for e, r in rows if r and (r.get("note") or e.caveat)]
    if notes:
        lines += ["", "Notes:"] + [f"- {e.label}: {n}" for e, n in notes]
    figs = [(e, dest) for e, r in rows for _, dest in r.get("figures", [])]
    if figs:
        lines += ["", "## Plots", ""]
        for e, p in figs:
            rel = p.relative_to(doc_dir) if p.is_relative_to(doc_dir) else p
            lines.append(f"![{e.label}]({rel})")
    lines += ["", "## Commands", "", "Each row, from the repository root (under "
              "`../shared/offline-run` on machines that need it):", "", "```bash"]
    for e in ENTRIES:
        lines.append("supsup " + " ".join(e.command(out)))
    lines += [f"supsup results --out {out}   # collects the reports into this file", "```"]
    if seconds is not None:
        lines += ["", f"All commands together took {seconds / 60:.1f} minutes."]
    return "\n".join(lines) + "\n"


def cmd_results(run: bool, only: str | None, out: str, doc: str) -> int:
    """Each entry runs as its own `supsup` process: its failure, memory and Ray session stay its
    own, and this module never imports the command line that dispatches to it."""
    start = time.perf_counter()
    if run:
        for e in ENTRIES:
            if only and only not in e.config and only not in e.label:
                continue
            log.info("results: supsup %s", " ".join(e.command(out)))
            code = subprocess.run([sys.executable, "-m", "pipeline", *e.command(out)],
                                  check=False).returncode
            if code != 0:
                log.error("results: %s failed with exit code %d", e.label, code)
    doc_path = Path(doc)
    figures = doc_path.parent / "results"
    timing = Path(out) / "results_seconds.json"
    if run and not only:
        timing.parent.mkdir(parents=True, exist_ok=True)
        timing.write_text(json.dumps({"seconds": time.perf_counter() - start}))
    seconds = (_read(timing) or {}).get("seconds")
    rows = collect(out, figures)
    missing = [e for e, r in rows if not r]
    if missing and doc_path.exists():
        raise IncompleteResults(_refusal(missing, out, doc_path))
    if missing:
        log.warning("results: %s has no rows for %s (no reports under %s)", doc_path,
                    "; ".join(e.label for e in missing), out)
    text = markdown(rows, out, doc_path.parent, seconds)
    _copy_figures(rows)
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc_path.with_name(f".{doc_path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(doc_path)
    print(f"wrote {doc_path}")
    return 0


class IncompleteResults(ValueError):
    """The results file would lose rows: some entries have no reports under the output folder."""


def _refusal(missing: list[Entry], out: str, doc: Path) -> str:
    """What is missing, where it was looked for, and the commands that make it."""
    names = "; ".join(e.label for e in missing[:3])
    if len(missing) > 3:
        names += f"; and {len(missing) - 3} more"
    if len(missing) == 1:
        todo = f"run `supsup {' '.join(missing[0].command(out))}`, then `supsup results"
        todo += f" --out {out}`" if out != "runs/results" else "`"
    else:
        todo = f"run them with `supsup results --run --out {out}` (or `--only TEXT` for some)"
    return (f"{doc} left as it is: no reports under {out} for {len(missing)} of "
            f"{len(ENTRIES)} rows ({names}); {todo}, or pass --doc NEW.md to write the "
            "incomplete table to a new file")
