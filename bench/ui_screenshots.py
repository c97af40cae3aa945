"""Screenshots of the MLflow UI for a finished `supsup run`: its parent run, the evaluate run,
the model version page and the experiment's run list, taken with headless Chromium.

    ../shared/offline-run .venv/bin/python bench/ui_screenshots.py --run-dir runs/quickstart

It serves the run folder's tracking store (`mlflow.db`) with `mlflow server` on 127.0.0.1,
finds the newest `supsup run` parent run and the version it registered, and writes PNGs to
--out (docs/ui by default). Chromium comes from Debian's packages (`apt-get install chromium`).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "pipeline"))  # the tests' server helpers


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("error: no chromium on PATH; install it with `apt-get install chromium`")


def shoot(url: str, out: Path, size: str = "1500,950") -> Path:
    """One page, after its scripts had 15 s of (virtual) time to fetch and draw."""
    with tempfile.TemporaryDirectory(prefix="supsup-chromium-") as profile:
        subprocess.run(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={profile}", f"--window-size={size}",
             "--virtual-time-budget=15000", f"--screenshot={out}", url],
            check=True, capture_output=True, timeout=120)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/quickstart",
                        help="the run folder of a finished `supsup run` (holds mlflow.db)")
    parser.add_argument("--out", default="docs/ui", help="folder for the PNGs")
    args = parser.parse_args()
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
        name, version = parent.data.tags["mlflow.runName"], parent.data.tags["model_version"]
        model = next(m.name for m in client.search_model_versions()
                     if str(m.version) == version and m.run_id in
                     {c.info.run_id for c in children.values()})
        # The UI's own switch between its GenAI and model-training views (it starts in GenAI
        # on a new browser profile); the experiment itself is tagged as model training.
        ml = "?workflowType=machine_learning"
        pages = {
            "runs.png": f"{server.url}/#/experiments/{exp}/runs{ml}",
            "run.png": f"{server.url}/#/experiments/{exp}/runs/{parent.info.run_id}{ml}",
            "register_run.png": (f"{server.url}/#/experiments/{exp}/runs/"
                                 f"{children['register'].info.run_id}{ml}"),
            "evaluate_run.png": (f"{server.url}/#/experiments/{exp}/runs/"
                                 f"{children['evaluate'].info.run_id}{ml}"),
            "model_version.png": f"{server.url}/#/models/{model}/versions/{version}{ml}",
        }
        for file, url in pages.items():
            print(f"{shoot(url, out / file)}  <- {url}  ({name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
