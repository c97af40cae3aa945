"""Helpers shared by the benchmark scripts: tables, the closing JSON line, process memory.

Every benchmark prints a table for people and, as its very last line, one JSON object holding all
its numbers, so a later run can be compared field by field. The machine's load is recorded beside
the numbers because the benchmarks often run on a shared machine, where timings are noisy.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print `rows` under `headers` as an aligned plain-text table; floats get 3 significant
    digits unless already formatted as strings."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    sys.stdout.flush()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


def emit_json(bench: str, **data: Any) -> None:
    """The closing line: one JSON object with every number of the run."""
    print(json.dumps({"bench": bench, **data}, sort_keys=False, default=_jsonable))
    sys.stdout.flush()


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def machine() -> dict[str, Any]:
    """What the numbers were measured on, including the load at the time (other processes)."""
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1m": round(load[0], 2),
        "load_average_5m": round(load[1], 2),
    }


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: now, VmHWM: peak); -1 where unavailable."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); False if refused.

    Lets one process measure the peak of a later phase on its own instead of the peak so far.
    """
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20
