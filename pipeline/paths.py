"""Where things are: the one place a registry root or a tracking URI given by a user becomes the
form every process uses. Relative paths are resolved against the driver's working directory once,
on the driver, so Ray workers (which may run elsewhere) never resolve them against their own.

Tracking URIs: `sqlite:///ABS/PATH/mlflow.db` (a local file; MLflow 3 refuses its plain file
store) or `http(s)://HOST:PORT` (an `mlflow server`).
"""

from __future__ import annotations

import os
from pathlib import Path


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
