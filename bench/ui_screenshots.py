"""Screenshots of the MLflow UI for a finished `supsup run`: the experiment's runs with the
parent's child runs, the parent run, the train run's training curve, the evaluate run and its
accuracy matrix, and the model version it registered and promoted.

    ../shared/offline-run .venv/bin/python bench/ui_screenshots.py --run-dir runs/quickstart

It serves the run folder's tracking store (`mlflow.db`) with `mlflow server` on 127.0.0.1,
finds the newest `supsup run` parent run and the version it registered, and drives a headless
Chromium over the DevTools protocol (bench/devtools.py) to write PNGs to --out (docs/ui by
default). Chromium comes from Debian's packages (`apt-get install chromium`). MLflow's Assistant
panel opens by itself on a new browser profile; the local-storage keys below keep it closed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "pipeline"))  # the tests' server helpers
sys.path.insert(0, str(ROOT / "bench"))

# The UI keeps these as JSON under `<key>_v<version>`: the panel's open state, and whether the
# Assistant button already opened the panel once on its own (it does so on a first visit).
CLOSED_ASSISTANT = {"mlflow.assistant.panelOpen_v1": "false",
                    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true"}
# The UI's own switch between its GenAI and model-training views (a new profile starts in GenAI).
ML = "?workflowType=machine_learning"


@dataclass
class Shot:
    """One page: its URL, a text that shows its data arrived, an optional action once it did
    (expand a row, filter charts) and the viewport height it needs."""

    url: str
    ready_text: str
    height: int = 950
    action: Callable[..., None] | None = field(default=None)


def expand_children(tab: object) -> None:
    """Open the parent's row in the runs table so its child runs show beneath it."""
    tab.evaluate("(() => { const b = document.querySelector("  # type: ignore[attr-defined]
                 "'button[data-component-id*=\"runnamecellrenderer\"]');"
                 " if (b) b.click(); return Boolean(b); })()")


def unclip_tables(tab: object) -> None:
    """Let the tables' bodies grow to their rows (the version's tags table scrolls at 280 px,
    which hides the promotion's tags below the fold)."""
    tab.evaluate("document.querySelectorAll('.du-bois-light-table-body')"  # type: ignore[attr-defined]
                 ".forEach(b => { b.style.maxHeight = 'none'; })")


def filter_charts(text: str) -> Callable[..., None]:
    """Type `text` into the metric charts' search box, so only those charts remain."""
    def act(tab: object) -> None:
        tab.evaluate("(() => { const i = document.querySelector("  # type: ignore[attr-defined]
                     "'input[placeholder*=\"earch\"]'); if (i) i.focus(); return Boolean(i); })()")
        tab.type_text(text)  # type: ignore[attr-defined]
    return act


def shots(url: str, exp: str, parent: object, children: dict[str, object], model: str,
          version: str) -> dict[str, Shot]:
    """The pages to take, by file name."""
    run = f"{url}/#/experiments/{exp}/runs"
    ids = {name: c.info.run_id for name, c in children.items()}  # type: ignore[attr-defined]
    name = parent.info.run_name  # type: ignore[attr-defined]
    return {
        "runs.png": Shot(f"{run}{ML}", name, action=expand_children),
        "run.png": Shot(f"{run}/{parent.info.run_id}{ML}", "Parameters",  # type: ignore[attr-defined]
                        height=1100),
        "train_curve.png": Shot(f"{run}/{ids['train']}/model-metrics{ML}", "train_curve",
                                height=1380, action=filter_charts("train_curve")),
        "evaluate_run.png": Shot(f"{run}/{ids['evaluate']}{ML}", "Parameters", height=1100),
        "accuracy_matrix.png": Shot(
            f"{run}/{ids['evaluate']}/artifacts/evaluation/accuracy_matrix.png{ML}",
            "accuracy_matrix.png", height=1000),
        "model_version.png": Shot(f"{url}/#/models/{model}/versions/{version}{ML}", "champion",
                                  height=1800, action=unclip_tables),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/quickstart",
                        help="the run folder of a finished `supsup run` (holds mlflow.db)")
    parser.add_argument("--out", default="docs/ui", help="folder for the PNGs")
    parser.add_argument("--only", nargs="*", help="take only these files (e.g. run.png)")
    args = parser.parse_args()
    from devtools import browser_tab
    from mlflow.tracking import MlflowClient
    from servers import mlflow_server

    db = Path(args.run_dir).resolve() / "mlflow.db"
    if not db.is_file():
        raise SystemExit(f"error: {db} not found; run `supsup run CONFIG` first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="supsup-ui-") as work, \
            mlflow_server(f"sqlite:///{db}", work) as server:
        client = MlflowClient(server.url)
        parents = [r for e in client.search_experiments()
                   for r in client.search_runs([e.experiment_id],
                                               filter_string="tags.job = 'run'",
                                               order_by=["attributes.start_time DESC"])]
        if not parents:
            raise SystemExit(f"error: no `supsup run` parent run in {db}")
        parent = parents[0]
        exp = parent.info.experiment_id
        children = {r.info.run_name: r for r in client.search_runs(
            [exp], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
        version = parent.data.tags["model_version"]
        model = next(m.name for m in client.search_model_versions()
                     if str(m.version) == version and m.run_id in
                     {c.info.run_id for c in children.values()})
        pages = shots(server.url, exp, parent, children, model, version)
        with browser_tab() as tab:
            tab.goto(f"{server.url}/")
            for key, value in CLOSED_ASSISTANT.items():
                tab.evaluate(f"localStorage.setItem({key!r}, {value!r})")
            for file, shot in pages.items():
                if args.only and file not in args.only:
                    continue
                tab.resize(1500, shot.height)
                tab.goto(shot.url)
                tab.wait_for(f"document.body.innerText.includes({shot.ready_text!r})")
                if shot.action:
                    shot.action(tab)
                time.sleep(4)  # charts and images draw after their data arrives
                print(f"{tab.screenshot(out / file)}  <- {shot.url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
