"""What a person sees in the terminal, and the log file behind it.

The terminal gets this project's own log lines (INFO; WARNING and up with --quiet; DEBUG with
--verbose), progress bars, results and errors. Everything else that logs or warns (MLflow,
alembic, Ray, urllib3, Python warnings) goes to the run folder's `supsup.log` and reaches the
terminal only from ERROR up (from INFO up with --verbose; libraries' DEBUG lines never).
Records logged before the run folder is known are held in memory and written to the file once
it is attached, so the file holds the whole command.

The only module that installs logging handlers or draws progress bars.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

OWN_LOGGERS = ("supsup", "pipeline")
LOG_FILE = "supsup.log"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Set before MLflow is imported: MLflow then leaves its loggers to this module's handlers, and
# artifact downloads draw no bars of their own between ours (users may still set these).
_QUIET_LIBRARIES = {
    "MLFLOW_CONFIGURE_LOGGING": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


_THIRD_PARTY = ("mlflow", "alembic", "urllib3", "ray", "filelock", "py.warnings")

# A terminal line says what happened in a few hundred characters; the log file keeps all of it.
# A value that grew without bound (a pasted array, a file of nested aliases, a library echoing a
# whole request) must not turn one line into megabytes.
MAX_LINE = 1000


def bounded(text: str, limit: int = MAX_LINE, rest: str = "in the log file") -> str:
    """Each line of `text` cut to `limit` characters, naming how much was left out and where
    it can be read."""
    lines = []
    for line in text.split("\n"):
        if len(line) > limit:
            line = f"{line[:limit]}... ({len(line) - limit:,} more characters {rest})"
        lines.append(line)
    return "\n".join(lines)


def error_line(text: str) -> str:
    """A failure's message as the one bounded `error:` line of the terminal (--debug shows the
    whole message with its traceback)."""
    return bounded(" ".join(text.splitlines()), rest="with --debug")


class _Terminal(logging.Handler):
    """Writes through tqdm, so a line never lands inside a progress bar; filters by origin."""

    def __init__(self, own_level: int, other_level: int) -> None:
        super().__init__(logging.DEBUG)
        self.own_level, self.other_level = own_level, other_level
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name.split(".")[0] in OWN_LOGGERS
        return record.levelno >= (self.own_level if own else self.other_level)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(bounded(self.format(record)), file=sys.stderr)
        except Exception:  # noqa: BLE001  (logging must never raise into the job)
            self.handleError(record)


class Console:
    """The terminal and log-file settings of one command (`--quiet`, `--verbose`)."""

    def __init__(self, quiet: bool = False, verbose: bool = False) -> None:
        self.quiet, self.verbose = quiet, verbose
        self.log_file: Path | None = None
        self._handlers: list[logging.Handler] = []
        self._buffer: logging.handlers.MemoryHandler | None = None
        self._root_level = logging.root.level
        self._saved: dict[str, tuple[int, bool, list[logging.Handler]]] = {}
        self._own_levels: dict[str, int] = {}

    def __enter__(self) -> Console:
        for key, value in _QUIET_LIBRARIES.items():
            os.environ.setdefault(key, value)
        own = logging.DEBUG if self.verbose else logging.WARNING if self.quiet else logging.INFO
        other = logging.INFO if self.verbose else logging.ERROR
        terminal = _Terminal(own, other)
        # Holds everything until the run folder is known; `attach_file` writes it out.
        self._buffer = logging.handlers.MemoryHandler(100_000, flushLevel=logging.CRITICAL + 1,
                                                      flushOnClose=False)
        self._handlers = [terminal, self._buffer]
        root = logging.getLogger()
        root.setLevel(logging.INFO)  # libraries' DEBUG lines (fonts, git, HTTP) help nobody
        self._own_levels = {name: logging.getLogger(name).level for name in OWN_LOGGERS}
        for name in OWN_LOGGERS:
            logging.getLogger(name).setLevel(logging.DEBUG if self.verbose else logging.NOTSET)
        for h in self._handlers:
            root.addHandler(h)
        # A library that installed handlers of its own before this command (MLflow does when
        # imported first) would print past ours: its records go through ours for the command.
        for name in _THIRD_PARTY:
            lib = logging.getLogger(name)
            self._saved[name] = (lib.level, lib.propagate, list(lib.handlers))
            for h in list(lib.handlers):
                lib.removeHandler(h)
            lib.setLevel(logging.NOTSET)  # decided by the handlers
            lib.propagate = True
        logging.captureWarnings(True)
        _console[0] = self
        return self

    def __exit__(self, *exc: Any) -> None:
        root = logging.getLogger()
        for h in self._handlers:
            root.removeHandler(h)
            h.close()
        self._handlers = []
        root.setLevel(self._root_level)
        for name, level in self._own_levels.items():
            logging.getLogger(name).setLevel(level)
        for name, (level, propagate, handlers) in self._saved.items():
            lib = logging.getLogger(name)
            lib.setLevel(level)
            lib.propagate = propagate
            for h in handlers:
                lib.addHandler(h)
        logging.captureWarnings(False)
        _console[0] = None

    def attach_file(self, folder: Path) -> Path:
        """Send this command's whole log, from its first record, to `folder/supsup.log`."""
        path = Path(folder).resolve() / LOG_FILE  # printed, and logged to MLflow: absolute
        if self.log_file == path:
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter(_FORMAT))
        root = logging.getLogger()
        root.addHandler(handler)
        if self._buffer is not None:
            for record in self._buffer.buffer:
                handler.handle(record)
            root.removeHandler(self._buffer)
            self._handlers.remove(self._buffer)
            self._buffer.close()
            self._buffer = None
        if self.log_file is not None:  # a second run folder in one command: move on to it
            old = next(h for h in self._handlers if isinstance(h, logging.FileHandler))
            root.removeHandler(old)
            self._handlers.remove(old)
            old.close()
        self._handlers.append(handler)
        self.log_file = path
        return path


_console: list[Console | None] = [None]


def attach_log_file(folder: Path) -> Path | None:
    """The running command's log goes to `folder/supsup.log` (None outside a command)."""
    console = _console[0]
    return console.attach_file(folder) if console is not None else None


def to_log_file_only(message: str, exc_info: bool = True) -> None:
    """`message` with the traceback being handled, written to the command's log file (or held
    for it) but not to the terminal: how a failure shown as one `error:` line keeps its whole
    story in supsup.log."""
    console = _console[0]
    if console is None:
        return
    record = logging.getLogger("supsup").makeRecord(
        "supsup", logging.ERROR, __file__, 0, message, (), sys.exc_info() if exc_info else None)
    for h in console._handlers:
        if not isinstance(h, _Terminal):
            h.handle(record)


def log_file() -> Path | None:
    """Where the running command's log is written, once known."""
    console = _console[0]
    return console.log_file if console is not None else None


@contextlib.contextmanager
def native_stderr_to_log() -> Iterator[None]:
    """While starting native libraries (Ray's core), file descriptor 2 goes to the command's log
    file: their start-up warnings are written by C++ straight to the descriptor, past Python's
    logging, and would land inside a progress bar. Without a log file, or with --verbose,
    nothing changes."""
    console = _console[0]
    if console is None or console.log_file is None or console.verbose:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(console.log_file, "ab") as f:
            os.dup2(f.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


class Progress:
    """A bar over tasks, with tasks per hour and time left; `done` may be fractional (a group
    of tasks part-way through its steps). Drawn only on a terminal, never with --quiet."""

    def __init__(self, desc: str, unit: str = "task") -> None:
        from tqdm import tqdm

        console = _console[0]
        quiet = console.quiet if console is not None else False
        self.bar = tqdm(total=0, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr,
                        mininterval=0.5, disable=True if quiet else None,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total} "
                                   f"{unit}s [{{elapsed}}<{{remaining}}{{postfix}}]")
        self.start = time.perf_counter()
        self.first: float | None = None
        self.unit = unit

    def __call__(self, done: float, total: int) -> None:
        if self.first is None:
            self.first = done
        self.bar.total = total
        self.bar.n = max(float(done), float(self.bar.n))  # a retried group never moves it back
        elapsed = time.perf_counter() - self.start
        new = self.bar.n - self.first
        if new > 0 and elapsed > 0:
            self.bar.set_postfix_str(f"{3600 * new / elapsed:,.0f} {self.unit}s/h", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
