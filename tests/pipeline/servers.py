"""Real servers for the cluster tests: a PostgreSQL 15 cluster and an `mlflow server` on it.

Plain context managers, not pytest fixtures, so a test, a benchmark or a shell session can use
them alike. Each one binds 127.0.0.1 only (run under /work/shared/offline-run), finds a free port
by binding port 0, and stops what it started by PID and removes its folders on the way out, also
when starting failed halfway. A watchdog process (tests/pipeline/watchdog.py) stands beside each
server and stops it when the process that started it dies without its finalizers (SIGKILL).

PostgreSQL refuses to run as root, so when the tests run as root the cluster belongs to `nobody`
and lives in a folder of the system temp dir (pytest's tmp_path is private to root).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
WATCHDOG = Path(__file__).with_name("watchdog.py")
CI_TAG = "SUPSUP_CI_TAG"  # set by .ci/run; every server carries it, so CI finds what is left
PG_USER = "mlflow"  # the cluster's superuser (initdb -U), trusted on loopback
_UNPRIVILEGED = "nobody"


def free_port(host: str = HOST) -> int:
    """A port nobody listens on right now (the OS picks it for a socket bound to port 0)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def postgres_bin() -> Path | None:
    """The folder of initdb/pg_ctl/createdb: $SUPSUP_PG_BIN, the real folder of a pg_ctl on
    PATH, or the newest Debian /usr/lib/postgresql/N/bin (Debian keeps them off PATH). None when
    PostgreSQL is absent."""
    candidates = [os.environ.get("SUPSUP_PG_BIN", "")]
    on_path = shutil.which("pg_ctl")
    candidates.append(str(Path(on_path).resolve().parent) if on_path else "")  # past symlinks
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                      key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit()
                      else 0)
    candidates.extend(reversed(versions))
    for folder in candidates:
        if folder and (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    return None


@dataclass(frozen=True)
class Postgres:
    """A running cluster: connect as `user` (no password) to `database` on host:port."""

    host: str
    port: int
    user: str
    database: str
    data_dir: Path
    log: Path

    @property
    def uri(self) -> str:
        """SQLAlchemy URI with the psycopg (v3) driver named, as MLflow's backend store wants:
        a bare postgresql:// means psycopg2 in SQLAlchemy 2.0 and psycopg in 2.1."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{self.database}"


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return f"({path} unreadable)"


def _run(cmd: list[str], user: str | None, env: Mapping[str, str], what: str,
         timeout: float = 120) -> None:
    done = subprocess.run(cmd, user=user, env=dict(env), capture_output=True, text=True,
                          timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}): {' '.join(cmd)}\n"
                           f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def _postmaster_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, owned by another user
        time.sleep(0.1)
    return False


def _stop_postgres(pg_ctl: Path, data_dir: Path, user: str | None,
                   env: Mapping[str, str]) -> None:
    """pg_ctl stop -m fast; if the postmaster is still there, SIGQUIT then SIGKILL by PID."""
    pid = _postmaster_pid(data_dir)
    if pid is None:
        return
    with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
        _run([str(pg_ctl), "stop", "-D", str(data_dir), "-m", "fast", "-w", "-t", "30"],
             user, env, "pg_ctl stop", timeout=40)
    for sig in (signal.SIGQUIT, signal.SIGKILL):
        if _wait_gone(pid, 5):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    _wait_gone(pid, 5)


@contextlib.contextmanager
def postgres(database: str = "mlflow", user: str = PG_USER,
             port: int | None = None) -> Iterator[Postgres]:
    """A fresh PostgreSQL cluster with one database, listening on 127.0.0.1 only, trusted
    logins; stopped and deleted on exit. RuntimeError (with the server log) if it does not start;
    FileNotFoundError if PostgreSQL is not installed."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL binaries (initdb, pg_ctl) not found: install "
                                "postgresql or set SUPSUP_PG_BIN to their folder")
    as_root = os.geteuid() == 0
    owner = _UNPRIVILEGED if as_root else None
    root = Path(tempfile.mkdtemp(prefix="supsup-pg-"))
    data_dir, sock_dir, log = root / "data", root / "sock", root / "postgres.log"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC",
           "HOME": str(root), "PGCONNECT_TIMEOUT": "10",
           **{k: v for k, v in os.environ.items() if k == CI_TAG}}
    # pg_ctl puts the postmaster in a session of its own: the watchdog stops it by its PID
    watchdog = start_watchdog(pidfile=data_dir / "postmaster.pid", remove=[root])
    try:
        sock_dir.mkdir()
        if as_root:
            entry = pwd.getpwnam(_UNPRIVILEGED)
            for path in (root, sock_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        _run([str(bin_dir / "initdb"), "-D", str(data_dir), "-U", user, "--auth=trust",
              "--encoding=UTF8", "--locale=C", "--no-sync"], owner, env, "initdb")
        port = port or free_port()
        options = f"-p {port} -k {sock_dir} -c listen_addresses={HOST} -c fsync=off"
        try:
            _run([str(bin_dir / "pg_ctl"), "start", "-D", str(data_dir), "-l", str(log), "-w",
                  "-t", "60", "-o", options], owner, env, "pg_ctl start", timeout=90)
            _run([str(bin_dir / "createdb"), "-h", HOST, "-p", str(port), "-U", user, database],
                 None, env, "createdb")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\npostgres log:\n{_tail(log)}") from None
        yield Postgres(HOST, port, user, database, data_dir, log)
    finally:
        try:
            _stop_postgres(bin_dir / "pg_ctl", data_dir, owner, env)
        finally:
            shutil.rmtree(root, ignore_errors=True)
            end_watchdog(watchdog)


@dataclass(frozen=True)
class MlflowServer:
    """A running `mlflow server`: its URL, where it stores artifacts, its PID and log."""

    url: str
    artifacts: Path
    pid: int
    log: Path


def start_watchdog(group: int | None = None, pidfile: Path | None = None,
                   remove: Sequence[Path] = ()) -> subprocess.Popen[bytes]:
    """Start tests/pipeline/watchdog.py for `group`, the PID in `pidfile` and folders to remove:
    it stops them when this process closes the pipe (end_watchdog) or dies. Keep the returned
    handle referenced while the server runs: collecting it closes the pipe."""
    args = [sys.executable, str(WATCHDOG), "--parent", str(os.getpid())]
    if group is not None:
        args += ["--group", str(group)]
    if pidfile is not None:
        args += ["--pidfile", str(pidfile)]
    for folder in remove:
        args += ["--remove", str(folder)]
    return subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            start_new_session=True)  # out of reach of a signal to our group


def end_watchdog(watchdog: subprocess.Popen[bytes], seconds: float = 30) -> None:
    """Close the watchdog's pipe (it stops what is left of its server, normally nothing) and
    wait for it; SIGKILL if it does not end within `seconds`."""
    if watchdog.stdin is not None:
        with contextlib.suppress(OSError):
            watchdog.stdin.close()
    try:
        watchdog.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        watchdog.kill()
        watchdog.wait(timeout=seconds)


class Guarded(subprocess.Popen[bytes]):
    """A server process in a session of its own (so stop_group stops it with its children) and
    a watchdog that stops that group if this process dies first. Takes Popen's arguments."""

    def __init__(self, args: Sequence[str], **kwargs: Any) -> None:
        kwargs["start_new_session"] = True
        super().__init__(args, **kwargs)
        self.watchdog = start_watchdog(group=self.pid)


def stop_group(proc: subprocess.Popen[bytes], seconds: float = 15,
               first: int = signal.SIGTERM) -> None:
    """`first` (SIGTERM) to the process group `proc` leads (started with start_new_session),
    SIGKILL to what is left after `seconds`: servers and `ray start` have children. A Guarded
    process's watchdog is ended too."""
    pgid = proc.pid  # start_new_session: the group id is the leader's pid
    try:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, first)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            proc.poll()
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        proc.wait(timeout=seconds)
    finally:
        if isinstance(proc, Guarded):
            end_watchdog(proc.watchdog)


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path,
                 seconds: float = 90) -> None:
    """Poll GET url/health until 200; RuntimeError with the log tail if the server exits or
    does not answer within `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"mlflow server at {url} not healthy after {seconds:g} s:\n"
                               f"{_tail(log)}")
        time.sleep(0.3)


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, workdir: str | os.PathLike[str],
                  port: int | None = None) -> Iterator[MlflowServer]:
    """`mlflow server` on 127.0.0.1 with one worker and no job runner, storing runs in
    `backend_store_uri` and serving artifacts from `workdir`/artifacts (its log is
    `workdir`/mlflow-server.log). Stopped by its process group on exit."""
    work = Path(workdir)
    artifacts, log_path = work / "artifacts", work / "mlflow-server.log"
    artifacts.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    mlflow = Path(sys.executable).parent / "mlflow"
    with log_path.open("wb") as log:
        proc = Guarded(
            [str(mlflow), "server", "--backend-store-uri", backend_store_uri,
             "--artifacts-destination", str(artifacts), "--host", HOST, "--port", str(port),
             "--workers", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    url = f"http://{HOST}:{port}"
    try:
        wait_healthy(url, proc, log_path)
        yield MlflowServer(url, artifacts, proc.pid, log_path)
    finally:
        stop_group(proc)


@contextlib.contextmanager
def model_server(model_uri: str, tracking_uri: str,
                 workdir: str | os.PathLike[str]) -> Iterator[str]:
    """`mlflow models serve` of `model_uri` on 127.0.0.1, in this environment (no new virtualenv),
    one worker; yields its URL; stopped by its process group on exit."""
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    log_path, port = work / "model-server.log", free_port()
    bin_dir = Path(sys.executable).parent  # the server execs `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    mlflow = bin_dir / "mlflow"
    with log_path.open("wb") as log:
        proc = Guarded(
            [str(mlflow), "models", "serve", "-m", model_uri, "--env-manager", "local",
             "--host", HOST, "--port", str(port), "--workers", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    url = f"http://{HOST}:{port}"
    try:
        wait_healthy(url, proc, log_path, seconds=180)
        yield url
    finally:
        stop_group(proc)


@contextlib.contextmanager
def mlflow_on_postgres(workdir: str | os.PathLike[str]) -> Iterator[tuple[MlflowServer, Postgres]]:
    """A PostgreSQL cluster and an `mlflow server` backed by it, stopped in reverse order."""
    with postgres() as db, mlflow_server(db.uri, workdir) as server:
        yield server, db
