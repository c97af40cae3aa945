"""Where things are: the one place a registry root given by a user becomes the form every process
uses. Relative paths are resolved against the driver's working directory once, on the driver, so
Ray workers (which may run elsewhere) never resolve them against their own."""

from __future__ import annotations

import os


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
