"""Joining Ray clusters as Ray users do: `ray job submit`, RAY_ADDRESS, and no address at all after
a head was killed. A real `ray start --head` on loopback, in a Ray temp root of the test's own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.registry import MaskRegistry
from tests.pipeline.servers import Guarded, free_port, stop_group

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
VENV_BIN = Path(sys.executable).parent


def _config(folder: Path, name: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "output_dir": str(folder / "runs"),
        "network": {"name": "lenet", "num_outputs": 100},
        "tasks": {"family": "permuted", "num_tasks": 2},
        "train": {"steps": 20, "group_size": 1},
        "evaluate": {"group_size": 2, "curve_points": 0, "max_batches": 2},
        "registry": {"root": str(folder / "registry")},
    }))
    return path


def _start_head(env: dict[str, str], log: Path, dashboard: bool) -> tuple[subprocess.Popen[bytes],
                                                                          str, int | None]:
    port = free_port()
    # Ports of its own for every agent: another Ray on this host (the test session's) holds
    # the default ones, and a job needs its node's agent.
    args = [str(VENV_BIN / "ray"), "start", "--head", f"--port={port}",
            "--node-ip-address=127.0.0.1", "--num-cpus=2", "--object-store-memory=200000000",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
            "--disable-usage-stats", "--block"]
    dash = None
    if dashboard:
        dash = free_port()
        args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1",
                 f"--dashboard-port={dash}"]
    else:
        args += ["--include-dashboard=false"]
    proc = Guarded(args, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return proc, f"127.0.0.1:{port}", dash


def _wait_for_head(env: dict[str, str], address: str) -> None:
    probe = "import ray\nray.init()\nprint(int(ray.cluster_resources().get('CPU', 0)))\n"
    deadline = time.monotonic() + 90
    while True:
        done = subprocess.run([sys.executable, "-c", probe], env={**env, "RAY_ADDRESS": address},
                              capture_output=True, text=True, timeout=90)
        if done.returncode == 0 and done.stdout.strip().endswith("2"):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"Ray head at {address} did not come up: {done.stderr[-2000:]}")
        time.sleep(1)


@pytest.fixture
def ray_env() -> Iterator[dict[str, Any]]:
    """Environment for Ray processes with a Ray temp root of this test's own (RAY_TMPDIR), so
    a cluster file left behind can only ever be found by this test."""
    root = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: socket paths have a length limit
    env = {**os.environ, "RAY_TMPDIR": root, "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    try:
        yield {"env": env, "root": Path(root)}
    finally:
        subprocess.run(["rm", "-rf", root], check=False)


def test_jobs_and_drivers_join_the_cluster_and_a_killed_head_is_not_joined_later(
        ray_env: dict[str, Any], tmp_path: Path) -> None:
    """One head (with its dashboard, for jobs): `ray job submit ... -- supsup run` joins it
    through the RAY_ADDRESS Ray sets for the job; a driver with RAY_ADDRESS joins it; once the
    head is killed, a command without an address starts its own Ray instead of following the
    cluster file the dead head left."""
    env = ray_env["env"]
    head, address, dash = _start_head(env, tmp_path / "head.log", dashboard=True)
    try:
        _wait_for_head(env, address)
        work = tmp_path / "job"
        work.mkdir()
        config = _config(tmp_path, "submitted")
        (work / "exp.yaml").write_text(config.read_text())
        for _ in range(10):  # the job agent starts a little after the head answers
            done = subprocess.run(
                [str(VENV_BIN / "ray"), "job", "submit", f"--address=http://127.0.0.1:{dash}",
                 f"--working-dir={work}", "--", "supsup", "run", "exp.yaml"],
                env=env, capture_output=True, text=True, timeout=300)
            out = done.stdout + done.stderr
            if "No available agent to submit job" not in out:
                break
            time.sleep(2)
        assert done.returncode == 0, out[-4000:]
        assert f"joining Ray cluster at {address}" in out  # RAY_ADDRESS, set by Ray for the job
        assert "task inference" in out
        joined = subprocess.run([str(VENV_BIN / "supsup"), "train",
                                 str(_config(tmp_path, "joined"))],
                                env={**env, "RAY_ADDRESS": address}, capture_output=True,
                                text=True, timeout=600)
        assert joined.returncode == 0, joined.stderr[-4000:]
        assert f"joining Ray cluster at {address}" in joined.stderr
    finally:
        stop_group(head, first=signal.SIGKILL)  # killed: it cannot clean up after itself
    assert MaskRegistry(tmp_path / "registry").tasks("submitted") == [0, 1]
    assert (tmp_path / "runs" / "submitted" / "evaluation" / "report.json").is_file()
    left = list(ray_env["root"].glob("ray/ray_current_cluster"))
    assert left and address in left[0].read_text()  # the file that used to mislead ray.init
    alone = subprocess.run([str(VENV_BIN / "supsup"), "train", str(_config(tmp_path, "alone"))],
                           env=env, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-4000:]
    assert "joining Ray cluster" not in alone.stderr
    assert MaskRegistry(tmp_path / "registry").tasks("joined") == [0, 1]
    assert MaskRegistry(tmp_path / "registry").tasks("alone") == [0, 1]
