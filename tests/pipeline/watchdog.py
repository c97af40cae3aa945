"""A watchdog that stops a test's server when the test process is gone, however it went.

A finalizer (a `finally:`, a fixture's teardown) does not run when the test process is killed
(SIGKILL, an OOM kill, a native library's `_exit`), and a server started in a session of its own
(as tests/pipeline/servers.py starts them, so that it can be stopped as a group) outlives it.
This script runs beside each server, in a session of its own too: it reads its stdin, a pipe
whose only writer is the test process, and when the pipe closes (the test ended the server and
closed it, or the process died and the kernel closed it) or its parent is gone, it stops what it
guards: a process group (SIGTERM, SIGKILL after a grace period), a PID read from a pidfile
(PostgreSQL's postmaster: SIGQUIT, then SIGKILL) and folders to remove.

Standard library only, run as a script (`python watchdog.py ...`), never imported by the server.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

POLL_S = 1.0  # how often the parent is checked besides the pipe (a pipe inherited by a fork)


def _gone(probe: Callable[[int], None], target: int) -> bool:
    try:
        probe(target)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by another user
    return False


def _stop(probe: Callable[[int], None], send: Callable[[int, int], None], target: int,
          first: int, grace_s: float) -> None:
    """`first` to `target`, SIGKILL if it is still there after `grace_s`."""
    for sig in (first, signal.SIGKILL):
        if _gone(probe, target):
            return
        with contextlib.suppress(ProcessLookupError):
            send(target, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and not _gone(probe, target):
            time.sleep(0.1)


def _pid_in(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def _wait_for_end(parent: int) -> str:
    """Block until stdin closes or the parent is gone; say which."""
    stdin = sys.stdin.buffer
    while True:
        if os.getppid() != parent:
            return "parent gone"
        ready, _, _ = select.select([stdin], [], [], POLL_S)
        if ready and not os.read(stdin.fileno(), 4096):
            return "pipe closed"


def guard(parent: int, group: int | None, pidfile: Path | None, remove: Sequence[Path],
          grace_s: float) -> None:
    """Wait for the end, then stop the group and the pidfile's process and remove folders."""
    _wait_for_end(parent)
    if group is not None:
        _stop(lambda g: os.killpg(g, 0), os.killpg, group, signal.SIGTERM, grace_s)
    if pidfile is not None:
        pid = _pid_in(pidfile)
        if pid is not None:
            _stop(lambda p: os.kill(p, 0), os.kill, pid, signal.SIGQUIT, grace_s)
    for folder in remove:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--parent", type=int, required=True, help="the test process's PID")
    parser.add_argument("--group", type=int, help="process group to stop")
    parser.add_argument("--pidfile", type=Path, help="file whose first line is a PID to stop")
    parser.add_argument("--remove", type=Path, action="append", default=[],
                        help="folder to remove once the processes are stopped")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds before SIGKILL")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the test is handled by the test
    guard(args.parent, args.group, args.pidfile, args.remove, args.grace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
