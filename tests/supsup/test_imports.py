"""The layering rule: importing supsup, or any of its modules, pulls in none of the pipeline's
heavy dependencies (checked in a fresh interpreter, where nothing else has imported them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BANNED = ("ray", "mlflow", "pyarrow", "yaml", "pipeline")
CORE = {"masks", "seeding", "layers", "networks", "bank", "binding", "scores", "convert", "tasks"}

_PROBE = """
import importlib, json, sys
import supsup
names = json.loads(sys.argv[1])
for name in names:
    importlib.import_module("supsup." + name)
banned = json.loads(sys.argv[2])
print(json.dumps({
    "imported": sorted(m for m in sys.modules if m.startswith("supsup.")),
    "banned": sorted(m for m in sys.modules if m.split(".")[0] in banned),
}))
"""


def test_supsup_imports_no_pipeline_dependency() -> None:
    names = sorted(p.stem for p in (ROOT / "supsup").glob("*.py") if p.stem != "__init__")
    assert CORE <= set(names)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(names), json.dumps(BANNED)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {f"supsup.{n}" for n in names} <= set(report["imported"])
    assert report["banned"] == []
    # Nothing runs at import: no output besides the probe's own line.
    assert result.stdout.strip().count("\n") == 0
