"""Where things are: the one place a registry root or a tracking URI given by a user becomes the
form every process uses. Relative paths are resolved against the driver's working directory once,
on the driver, so Ray workers (which may run elsewhere) never resolve them against their own.

Tracking URIs: `sqlite:///ABS/PATH/mlflow.db` (a local file; MLflow 3 refuses its plain file
store) or `http(s)://HOST:PORT` (an `mlflow server`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


def resolve_root(root: str | os.PathLike[str]) -> str:
    """A registry root as workers must see it: an absolute local path, or a URI unchanged.

    A `~` is expanded and a trailing slash dropped. ValueError for an empty root.
    """
    text = os.fspath(root).strip()
    if not text:
        raise ValueError("registry.root is empty: give a folder or a filesystem URI "
                         "(e.g. runs/registry or s3://bucket/registry)")
    if "://" in text:
        return text.rstrip("/")
    return os.path.abspath(os.path.expanduser(text))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (None for other URIs)."""
    if not uri.startswith("sqlite:"):
        return None
    if not uri.startswith("sqlite:///"):
        raise ValueError(f"tracking URI {uri!r}: write SQLite URIs as sqlite:///ABS/PATH/mlflow.db")
    rest = uri[len("sqlite:///"):]
    if rest in ("", ":memory:"):
        raise ValueError(f"tracking URI {uri!r}: an in-memory database keeps nothing; use "
                         "sqlite:///ABS/PATH/mlflow.db")
    return Path(rest.split("?", 1)[0])


def resolve_tracking_uri(uri: str) -> str:
    """`uri` checked, with a relative SQLite path made absolute (runs may change directory).

    ValueError for plain paths and file: URIs, which MLflow 3 refuses as tracking stores.
    """
    uri = str(uri).strip()
    if not uri or "://" not in uri and not uri.startswith("sqlite:"):
        raise ValueError(
            f"tracking URI {uri!r} is not supported: MLflow 3 refuses the plain file store; use "
            "sqlite:///ABS/PATH/mlflow.db or the http://HOST:PORT of an `mlflow server`")
    if uri.startswith("file:"):
        raise ValueError(
            f"tracking URI {uri!r}: MLflow 3 refuses the file store; use "
            "sqlite:///ABS/PATH/mlflow.db or the http://HOST:PORT of an `mlflow server`")
    path = sqlite_path(uri)
    if path is not None and not path.is_absolute():
        query = uri.split("?", 1)[1] if "?" in uri else ""
        uri = f"sqlite:///{path.resolve()}" + (f"?{query}" if query else "")
    return uri


# ------------------------------------------------------------------ outputs of a `ray job submit`
# What Ray sets for a job's entrypoint (the job's config) and for its workers (the job id).
_RAY_JOB_ENV = ("RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_JOB_ID")


def ray_job_copy(cwd: str | os.PathLike[str] | None = None) -> Path | None:
    """The working directory when it is Ray's copy of a job's `--working-dir` (under a Ray
    session's `runtime_resources` folder), else None. Ray deletes such a copy once no job uses
    it, and no other node sees it."""
    here = Path(cwd or os.getcwd())
    parts = here.parts
    for i, part in enumerate(parts[:-1]):
        if part.startswith("session_") and parts[i + 1] == "runtime_resources":
            return here
    return None


def inside_ray_job() -> bool:
    """True in the entrypoint (and tasks) of a `ray job submit` / RayJob."""
    return any(os.environ.get(k) for k in _RAY_JOB_ENV) or ray_job_copy() is not None


class _Outputs(Protocol):
    """What the check reads of an experiment config (structural: paths imports no config)."""

    output_dir: str

    @property
    def tracking_uri(self) -> str: ...


def _under(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def job_output_problems(config: _Outputs, registry_root: str) -> list[str]:
    """Inside a Ray job, the outputs that would be written relative to the job's working
    directory, as "FIELD VALUE (what is written there)"; empty outside a job. The masks and
    the tracking store come first; the run folder's files are also MLflow artifacts."""
    if not inside_ray_job():
        return []
    cwd = Path(os.getcwd()).resolve()
    found = []
    if "://" not in registry_root and _under(Path(registry_root).resolve(), cwd):
        found.append(f"registry.root {registry_root} (the masks)")
    db = sqlite_path(config.tracking_uri)
    if db is not None and _under(db.resolve(), cwd):
        found.append(f"the tracking store {config.tracking_uri} (MLflow's runs and models)")
    if not os.path.isabs(os.path.expanduser(config.output_dir)):
        found.append(f"output_dir {config.output_dir!r} (the run folder: reports, supsup.log)")
    return found


_FIX = ("set absolute paths on storage that outlives the job, e.g. --set "
        "output_dir=/mnt/shared/runs --set registry.root=/mnt/shared/registry (or "
        "s3://BUCKET/registry) --set tracking.uri=http://MLFLOW_HOST:5000 (without tracking.uri "
        "the SQLite store is made in the run folder)")


def check_job_outputs(config: _Outputs, registry_root: str) -> None:
    """Before anything is written: refuse a command inside a Ray job whose masks or tracking
    store would land in Ray's copy of the job's `--working-dir` (deleted by Ray, seen by no
    other node); warn when only the run folder would (its reports and supsup.log are also
    artifacts of the MLflow run), or when a job runs in a plain folder (its relative outputs
    stay on the node that runs the job's entrypoint). Names each field and what to set."""
    problems = job_output_problems(config, registry_root)
    if not problems:
        return
    copy = ray_job_copy()
    lost = [p for p in problems if not p.startswith("output_dir")]
    if copy is not None and lost:
        raise ValueError(
            f"this command runs inside a Ray job, in Ray's copy of its --working-dir ({copy}), "
            f"which Ray deletes when no job uses it: {'; '.join(problems)} would be written "
            f"there and lost; {_FIX}")
    where = (f"Ray's copy of the job's --working-dir ({copy}), which Ray deletes when no job "
             "uses it (they are also artifacts of the MLflow run)" if copy is not None
             else f"the job's working directory {os.getcwd()} on the node that runs the job's "
             "entrypoint")
    log.warning("this command runs inside a Ray job: %s resolve into %s; %s",
                "; ".join(problems), where, _FIX)
