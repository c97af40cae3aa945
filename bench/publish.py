"""Publishing a bank: the one pass that verifies it, writes its bank file and registers it.

For each bank size k (LeNet 784-300-100-500, random masks: what is timed is file work, not
learning), a fresh registry on local disk is filled with k task files, then timed:
- write: storing the k task files (what training workers do, summed);
- source: a BankSource from the task files' footers alone (what evaluation makes on the driver);
- verify pass: every task file read once and checked, no bank file;
- export pass: the same pass also writing the bank file that small banks embed in their model;
- publish: `pipeline.publish.publish_bank`, the pass plus MLflow registration (SQLite), as
  `supsup train` runs it (banks over tracking.embed_masks_max_bytes, 64 MiB by default, are not
  embedded: the version pins the registry snapshot);
- load: `load_bank(source)` into a MaskBank, every row verified.
Reads per task file during publication are counted (the promise: exactly one).

    .venv/bin/python bench/publish.py --ks 250
    .venv/bin/python bench/publish.py
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from common import emit_json, machine, mib, print_table

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", default="250,2500", help="bank sizes, comma separated")
    p.add_argument("--outputs", type=int, default=500, help="lenet outputs (north star: 500)")
    return p.parse_args(argv)


def _timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(k: int, outputs: int, folder: Path) -> dict[str, Any]:
    from pipeline.config import parse_config
    from pipeline.publish import publish_bank
    from pipeline.registry import MaskRegistry, export_bank, load_bank
    from pipeline.registry.store import READS
    from pipeline.tracking import Tracker
    from supsup.networks import build_network

    net = build_network(name="lenet", num_outputs=outputs)
    registry = MaskRegistry(folder / "registry")
    registry.create_bank("bench", net.spec, net.layer_shapes(), {}, {"rule": "threshold"})
    rng = np.random.default_rng(0)
    shapes = net.layer_shapes()

    def write() -> None:
        for t in range(k):
            packed = {key: rng.integers(0, 256, (int(np.prod(s)) + 7) // 8, dtype=np.uint8)
                      for key, s in shapes.items()}
            registry.write_task("bench", t, packed, metadata={"train_accuracy": 0.5})

    _, write_s = _timed(write)
    source, source_s = _timed(lambda: registry.source("bench"))
    _, verify_s = _timed(lambda: export_bank(registry, "bench", None))
    dest = folder / "bench.parquet"
    _, export_s = _timed(lambda: export_bank(registry, "bench", dest))
    config = parse_config({
        "name": "bench", "output_dir": str(folder / "runs"),
        "network": {"name": "lenet", "num_outputs": outputs},
        "registry": {"root": str(folder / "registry")},
        "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}"},
    })
    tracker = Tracker(config.tracking_uri, "bench")
    with tracker.run("publish") as run_id:
        READS.clear()
        publication, publish_s = _timed(lambda: publish_bank(config, tracker, run_id))
    reads = [n for path, n in READS.items() if "/tasks/" in path]
    assert publication.source == source
    _, load_s = _timed(lambda: load_bank(source))
    stored = registry.stored_bytes("bench")
    return {
        "tasks": k, "write_s": write_s, "source_s": source_s, "verify_pass_s": verify_s,
        "export_pass_s": export_s, "publish_s": publish_s, "load_s": load_s,
        "stored_mib": mib(stored), "bank_file_mib": mib(dest.stat().st_size),
        "embedded": stored <= config.tracking.embed_masks_max_bytes,
        "task_files_read": len(reads), "max_reads_per_task_file": max(reads, default=0),
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    rows = []
    for k in (int(v) for v in args.ks.split(",")):
        with tempfile.TemporaryDirectory(prefix="supsup-bench-publish-") as tmp:
            rows.append(measure(k, args.outputs, Path(tmp)))
    print_table(
        "Publishing a LeNet-500 bank (seconds; local disk; MLflow on SQLite)",
        ["tasks", "write", "source", "verify pass", "export pass", "publish", "load",
         "stored MiB", "embedded", "reads/file"],
        [[r["tasks"], r["write_s"], r["source_s"], r["verify_pass_s"], r["export_pass_s"],
          r["publish_s"], r["load_s"], r["stored_mib"], str(r["embedded"]).lower(),
          r["max_reads_per_task_file"]] for r in rows])
    emit_json("publish", machine=machine(), rows=rows)


if __name__ == "__main__":
    main()
