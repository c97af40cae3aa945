"""One `supsup run` on shared services against the same run on local files.

Both sides run the quickstart experiment with `--tasks` tasks end to end (train, publish and
register, evaluate) as a subprocess with its own local Ray:
- local: the mask registry on local disk and MLflow on a SQLite file;
- services: the registry on an S3-protocol server (moto's server mode on 127.0.0.1, reached
  through pyarrow's S3 client, first-writer-wins by conditional PUTs) and MLflow on an
  `mlflow server` backed by PostgreSQL 15, its artifacts served by the server.
What differs is only where masks and runs are stored, so the ratio is the price of the services.

    ../shared/offline-run .venv/bin/python bench/cluster_storage.py --tasks 100
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import emit_json, machine, print_table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "pipeline"))  # the tests' server helpers


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=100)
    p.add_argument("--steps", type=int, default=300, help="training steps per task")
    return p.parse_args(argv)


def _run(args: argparse.Namespace, folder: Path, root: str, tracking: str,
         env: dict[str, str]) -> float:
    cmd = [str(Path(sys.executable).parent / "supsup"), "run",
           str(ROOT / "configs" / "quickstart.yaml"),
           "--set", f"tasks.num_tasks={args.tasks}", "--set", f"train.steps={args.steps}",
           "--set", f"output_dir={folder / 'runs'}", "--set", f"registry.root={root}",
           "--set", f"tracking.uri={tracking}"]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr[-3000:]}")
    return seconds


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    import boto3
    from moto.server import ThreadedMotoServer
    from servers import mlflow_on_postgres

    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("RAY_ADDRESS", None)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="supsup-bench-local-") as tmp:
        folder = Path(tmp)
        seconds = _run(args, folder, str(folder / "registry"),
                       f"sqlite:///{folder / 'mlflow.db'}", env)
        rows.append({"storage": "local disk + SQLite", "seconds": seconds})
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    try:
        host, port = s3.get_host_and_port()
        aws = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
        boto3.client("s3", **{"endpoint_url": aws["AWS_ENDPOINT_URL"],
                              "aws_access_key_id": "bench", "aws_secret_access_key": "bench",
                              "region_name": "us-east-1"}).create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory(prefix="supsup-bench-services-") as tmp, \
                mlflow_on_postgres(tmp) as (server, _db):
            seconds = _run(args, Path(tmp), "s3://bench/registry", server.url, {**env, **aws})
            rows.append({"storage": "S3 server + MLflow server on PostgreSQL",
                         "seconds": seconds})
    finally:
        s3.stop()
    base = rows[0]["seconds"]
    for r in rows:
        r["vs_local"] = r["seconds"] / base
        r["tasks_per_hour"] = 3600 * args.tasks / r["seconds"]
    print_table(f"supsup run, {args.tasks} tasks x {args.steps} steps (train, register, evaluate)",
                ["storage", "seconds", "tasks/h", "vs local"],
                [[r["storage"], r["seconds"], r["tasks_per_hour"], r["vs_local"]] for r in rows])
    emit_json("cluster_storage", machine=machine(), tasks=args.tasks, steps=args.steps,
              rows=rows)


if __name__ == "__main__":
    main()
