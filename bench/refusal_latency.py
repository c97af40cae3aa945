"""How long the command takes to refuse what it cannot run: seconds from `supsup train` to its
`error:` line, through the command's own `main` in this process (no process start-up counted).

- a billion tasks: the memory estimate refuses them before anything is built or written;
- an unreachable tracking server (nothing listens on the port): one health check answers, not
  MLflow's client with its retries and back-off (minutes by default);
- a non-finite learning rate: the config refuses it.

The tests assert that each is refused with one named error and nothing written; how fast that
happens is a figure of this benchmark, which reports the machine's load beside it.

    /work/shared/offline-run .venv/bin/python bench/refusal_latency.py
"""

from __future__ import annotations

import argparse
import contextlib
import io
import socket
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import yaml
from common import emit_json, machine, print_table

from pipeline.cli import main as supsup


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(folder: Path) -> Path:
    path = folder / "probe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "probe", "output_dir": str(folder / "runs"),
        "network": {"name": "lenet", "num_outputs": 100},
        "tasks": {"family": "permuted", "num_tasks": 4},
        "train": {"steps": 20, "group_size": 2},
        "registry": {"root": str(folder / "registry")},
    }))
    return path


def _refusal_seconds(config: Path, option: str) -> float:
    """Seconds until `supsup train CONFIG --set OPTION` returns; it must refuse (exit 2)."""
    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = supsup(["-q", "train", str(config), "--set", option])
    seconds = time.perf_counter() - start
    if code != 2 or "error:" not in err.getvalue():
        raise RuntimeError(f"--set {option} was not refused (exit {code}): {err.getvalue()}")
    return seconds


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3,
                   help="refusals per probe: the first (with the imports its path needs) and the "
                        "best of all")
    args = p.parse_args(argv)
    probes = {
        "a billion tasks": "tasks.num_tasks=1000000000",
        "unreachable tracking server": f"tracking.uri=http://127.0.0.1:{_free_port()}",
        "non-finite learning rate": "train.lr=.inf",
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="refusal-") as folder:
        config = _config(Path(folder))
        _refusal_seconds(config, "train.lr=.inf")  # the command's own imports, untimed
        for name, option in probes.items():
            seconds = [_refusal_seconds(config, option) for _ in range(args.repeats)]
            rows.append({"probe": name, "option": option, "seconds_first": seconds[0],
                         "seconds_best": min(seconds),
                         "seconds_median": statistics.median(seconds), "seconds_all": seconds})
    info = machine()
    print_table(f"seconds from `supsup train` to its error line: the first refusal of each "
                f"probe (with the imports its path needs) and the best of {args.repeats}; load "
                f"average {info['load_average_1m']} on {info['cpus']} CPUs",
                ["probe", "first s", "best s", "median s"],
                [[r["probe"], r["seconds_first"], r["seconds_best"], r["seconds_median"]]
                 for r in rows])
    emit_json("refusal_latency", repeats=args.repeats, machine=info, results=rows)


if __name__ == "__main__":
    main()
