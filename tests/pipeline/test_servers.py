"""The test servers (tests/pipeline/servers.py) never outlive the process that started them: a
Python process starts a real server, is killed with SIGKILL (no finalizer runs), and the
server's processes and folders are gone soon after, stopped by their watchdog."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.pipeline.servers import postgres_bin

pytestmark = [pytest.mark.cluster]
REPO = Path(__file__).resolve().parents[2]
BOUND_S = 60  # a bound on the wait for the watchdog, not a measurement

# The child: start a server, write what identifies it, then wait to be killed.
_MLFLOW = """
    from tests.pipeline.servers import mlflow_server
    with mlflow_server(f"sqlite:///{WORK}/server.db", WORK) as server:
        import os
        (WORK / "started").write_text(f"{server.pid} {os.getpgid(server.pid)}")
        time.sleep(600)
"""
_POSTGRES = """
    from tests.pipeline.servers import postgres
    with postgres() as db:
        pid = int((db.data_dir / "postmaster.pid").read_text().split()[0])
        (WORK / "started").write_text(f"{pid} {db.data_dir.parent}")
        time.sleep(600)
"""


def _living(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its reaper has stopped running)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _group_members(pgid: int) -> list[int]:
    """PIDs of running processes in process group `pgid`, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _watchdogs_of(parent: int) -> list[int]:
    """PIDs of running watchdogs started by process `parent`, from their command lines."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(a.endswith("watchdog.py") for a in args) and "--parent" in args \
                and args[args.index("--parent") + 1] == str(parent) and _living(int(entry.name)):
            found.append(int(entry.name))
    return found


def _start_and_kill(tmp_path: Path, body: str) -> list[str]:
    """Run `body` in a child Python process until it wrote `started`, SIGKILL the child, and
    return the words it wrote. Its watchdogs end too once they have done their work."""
    script = ("import time\nfrom pathlib import Path\n"
              f"WORK = Path({str(tmp_path)!r})\n" + textwrap.dedent(body))
    log = (tmp_path / "child.log").open("wb")
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=log,
                             stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "started").exists():
            assert child.poll() is None, (tmp_path / "child.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        words = (tmp_path / "started").read_text().split()
        assert _watchdogs_of(child.pid)
    finally:
        child.send_signal(signal.SIGKILL)  # no finally, no atexit, no fixture teardown
        child.wait(timeout=60)
    _wait_until(lambda: not _watchdogs_of(child.pid), f"watchdog of {child.pid}")
    return words


def _wait_until(condition: object, what: str) -> None:
    deadline = time.monotonic() + BOUND_S
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} still there {BOUND_S} s after the kill"
        time.sleep(0.2)


def test_an_mlflow_server_is_stopped_when_its_test_process_is_killed(tmp_path: Path) -> None:
    pid, pgid = (int(w) for w in _start_and_kill(tmp_path, _MLFLOW))
    assert pgid == pid  # a session of its own: the watchdog stops the whole group
    _wait_until(lambda: not _group_members(pgid), f"mlflow server group {pgid}")
    assert not _living(pid)


def test_a_postgres_cluster_is_stopped_and_removed_when_its_test_process_is_killed(
        tmp_path: Path) -> None:
    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (initdb, pg_ctl)")
    pid, folder = _start_and_kill(tmp_path, _POSTGRES)
    _wait_until(lambda: not _living(int(pid)), f"postmaster {pid}")
    _wait_until(lambda: not Path(folder).exists(), f"cluster folder {folder}")
