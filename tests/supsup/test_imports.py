"""The layering rule: importing supsup, or any of its modules, pulls in none of the pipeline's
heavy dependencies (checked in a fresh interpreter, where nothing else has imported them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def _internal_imports(path: Path, modules: set[str], typing: bool = False) -> set[str]:
    """Modules of this project that `path` imports anywhere (functions included); those under
    `if TYPE_CHECKING:` (which never runs) only with `typing`."""
    import ast

    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only and not typing:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


@pytest.mark.parametrize("typing", [False, True])
def test_no_import_circles(typing: bool) -> None:
    """Neither package has a circle of imports, not even through imports inside functions, nor
    through the imports that annotations alone need (a direction, not a deferred import)."""
    files = {}
    for package in ("supsup", "pipeline"):
        for p in (ROOT / package).rglob("*.py"):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            files[name] = p
    graph = {m: {t for t in _internal_imports(p, set(files), typing)
                 if t != m and not m.startswith(t + ".")}  # a package's own __init__ aside
             for m, p in files.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            assert state.get(t) != 1, "import circle: " + " -> ".join([*path, m, t])
            if t not in state:
                visit(t, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert "pipeline.cli" in graph and "supsup.bank" in graph  # the walk saw both packages
