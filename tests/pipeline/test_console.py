"""The terminal shows this project's lines; every library's lines go to the run's log file."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import pytest

from pipeline.console import MAX_LINE, Console, attach_log_file, error_line, log_file


def test_library_lines_go_to_the_log_file_not_the_terminal(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    own_stream = io.StringIO()  # a handler a library installed itself, as MLflow does
    mlflow_logger = logging.getLogger("mlflow")
    theirs = logging.StreamHandler(own_stream)
    mlflow_logger.addHandler(theirs)
    try:
        with Console():
            logging.getLogger("alembic.runtime.migration").info("Running upgrade a -> b")
            logging.getLogger("pipeline.registry").info("created bank 'x'")
            assert attach_log_file(tmp_path) == tmp_path / "supsup.log" == log_file()
            mlflow_logger.warning("cloudpickle is not the same version")
            warnings.warn("a library's deprecation", DeprecationWarning, stacklevel=1)
            logging.getLogger("ray").error("the cluster is gone")
        err = capsys.readouterr().err
        assert "created bank 'x'" in err and "the cluster is gone" in err  # ours; any ERROR
        for noise in ("Running upgrade", "cloudpickle", "deprecation"):
            assert noise not in err, noise
        text = (tmp_path / "supsup.log").read_text()
        for line in ("Running upgrade a -> b", "created bank 'x'", "cloudpickle",
                     "a library's deprecation", "the cluster is gone"):
            assert line in text, line  # the whole command, also from before the file was known
        assert own_stream.getvalue() == ""  # MLflow's own handler printed nothing meanwhile
    finally:
        mlflow_logger.removeHandler(theirs)
    assert theirs not in logging.getLogger("mlflow").handlers
    assert log_file() is None  # the command is over


def test_quiet_keeps_warnings_and_verbose_shows_libraries(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Console(quiet=True):
        logging.getLogger("supsup").info("trained 3 tasks")
        logging.getLogger("supsup").warning("2 of 5 trials failed")
    err = capsys.readouterr().err
    assert "trained 3 tasks" not in err and "2 of 5 trials failed" in err
    with Console(verbose=True):
        logging.getLogger("alembic").info("Running upgrade a -> b")
        logging.getLogger("matplotlib.font_manager").debug("findfont: score")
        logging.getLogger("pipeline.jobs").debug("group 0..2 posted 0.5")
    err = capsys.readouterr().err
    assert "Running upgrade a -> b" in err and "group 0..2 posted 0.5" in err
    assert "findfont" not in err


def test_terminal_lines_are_bounded_and_the_log_file_keeps_them_whole(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    huge = "x" * 50_000
    with Console():
        attach_log_file(tmp_path)
        logging.getLogger("pipeline.jobs").warning("trial failed: %s", huge)
    err = capsys.readouterr().err
    assert "... (49," in err and "more characters in the log file)" in err
    assert max(len(line) for line in err.splitlines()) < 1100
    assert huge in (tmp_path / "supsup.log").read_text()


def test_an_error_line_is_one_bounded_line() -> None:
    assert error_line("a short message") == "a short message"
    line = error_line("first\nsecond " + "y" * 5000)
    assert "\n" not in line and line.startswith("first second yyy")
    assert line.endswith(f"... ({5013 - MAX_LINE:,} more characters with --debug)")
    assert len(line) < MAX_LINE + 100
