"""Where registry files live: one resolved root (local folder or pyarrow filesystem URI) and the
atomic, first-writer-wins publication of a file under it.

Roots are resolved by `pipeline.paths.resolve_root`, the one place that does it.

Publication: the bytes go to a temporary name in the same folder (".NAME.tmp-<uuid>", which
Parquet dataset readers skip), are flushed to disk, and become visible under the final name only
if that name is free. On a local file system a hard link does that atomically (the kernel refuses
an existing name), so of two concurrent writers exactly one wins. Object stores have no
create-if-absent of their own: on S3 a conditional PUT (`If-None-Match: *`, s3.py) gives the same
rule atomically; on other object stores the writer checks right before the move and the caller
reads the file back after it, so a loser is told unless both pass the check at the same instant.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import BinaryIO

import pyarrow.fs as pafs

from pipeline.paths import resolve_root
from pipeline.registry.s3 import conditional_put

logger = logging.getLogger(__name__)

TMP_MARK = ".tmp-"
READS: Counter[str] = Counter()  # files opened for reading in this process, by path
_NOT_LINKABLE = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS}


class Store:
    """Files under one resolved registry root, with atomic first-writer-wins publication.

    Every file opened for reading is counted in `READS` (by path, for the whole process):
    publication promises to read each task file once, and tests hold it to that.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = resolve_root(root)
        if "://" in self.root:
            self.fs, path = pafs.FileSystem.from_uri(self.root)
        else:
            self.fs, path = pafs.LocalFileSystem(), self.root
        self.base = path.rstrip("/")
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self._s3 = conditional_put(self.fs, self.root)

    @property
    def exclusive(self) -> bool:
        """Whether publication is atomic create-if-absent here (local disk, S3 with conditional
        writes); elsewhere the caller reads a published file back to learn who won."""
        return self.local or self._s3 is not None

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    def join(self, *parts: str) -> str:
        return "/".join(p for p in (self.base, *parts) if p)

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def size(self, path: str) -> int:
        return int(self.fs.get_file_info(path).size or 0)

    def listdir(self, path: str) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))

    def open_input(self, path: str) -> pafs.NativeFile:
        """A random-access reader (Parquet footers are read from the end)."""
        READS[path] += 1
        return self.fs.open_input_file(path)

    def read_bytes(self, path: str) -> bytes:
        READS[path] += 1
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def publish_new(self, final: str, write: Callable[[BinaryIO], None]) -> bool:
        """Write a file through `write(stream)` and publish it as `final` unless `final` exists.

        True when this call published it; False when another writer had (nothing changed). Where
        the store is not `exclusive`, the caller must read `final` back to learn who won.
        """
        if self._s3 is not None:  # one atomic conditional PUT: no temporary object at all
            return self._s3.put(final, _bytes_of(write), only_if_absent=True)
        folder = final.rsplit("/", 1)[0]
        self.fs.create_dir(folder, recursive=True)
        tmp = f"{folder}/.{final.rsplit('/', 1)[1]}{TMP_MARK}{uuid.uuid4().hex}"
        try:
            with self.fs.open_output_stream(tmp) as out:
                write(out)
            self._sync(tmp)
            return self._publish(tmp, final)
        finally:
            self.remove_quietly(tmp)

    def replace(self, final: str, write: Callable[[BinaryIO], None]) -> None:
        """Write a file and put it in place of `final` (for files that may be replaced on request,
        such as a reservoir; never task files)."""
        if self._s3 is not None:
            self._s3.put(final, _bytes_of(write), only_if_absent=False)
            return
        folder = final.rsplit("/", 1)[0]
        tmp = f"{folder}/.{final.rsplit('/', 1)[1]}{TMP_MARK}{uuid.uuid4().hex}"
        try:
            with self.fs.open_output_stream(tmp) as out:
                write(out)
            self._sync(tmp)
            if self.local:
                os.replace(tmp, final)
                _sync_dir(folder)
            else:
                self.fs.move(tmp, final)
        finally:
            self.remove_quietly(tmp)

    def _publish(self, tmp: str, final: str) -> bool:
        if self.local:
            try:
                os.link(tmp, final)  # fails with EEXIST atomically: the first writer wins
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in _NOT_LINKABLE:
                    raise
                if os.path.exists(final):  # no hard links here: check, then rename
                    return False
                os.rename(tmp, final)
            _sync_dir(os.path.dirname(final))
            return True
        if self.exists(final):
            return False
        self.fs.move(tmp, final)
        return True

    def _sync(self, path: str) -> None:
        """Flush a local file before it is published, so a crash cannot publish holes."""
        if self.local:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def remove_quietly(self, path: str) -> None:
        try:
            if self.exists(path):
                self.fs.delete_file(path)
        except OSError as exc:
            logger.warning("could not remove temporary file %s: %s", path, exc)


@contextlib.contextmanager
def probe(root: str) -> Iterator[str]:
    """A small object written under `root` for the duration of the block; yields its name.

    Lets the driver ask every node of a cluster whether it sees the same registry
    (`probe_seen`), then removes it.
    """
    store = Store(root)
    name = f".supsup-probe{TMP_MARK}{uuid.uuid4().hex}"
    path = store.join(name)
    store.fs.create_dir(store.base, recursive=True)
    store.publish_new(path, lambda out: out.write(b"supsup registry probe\n"))
    try:
        yield name
    finally:
        store.remove_quietly(path)


def probe_seen(root: str, name: str) -> bool:
    """Whether the probe `name` is visible under `root` from this process (run on each node)."""
    store = Store(root)
    return store.exists(store.join(name))


def _bytes_of(write: Callable[[BinaryIO], None]) -> bytes:
    buffer = io.BytesIO()
    write(buffer)
    return buffer.getvalue()


def _sync_dir(path: str) -> None:
    """fsync a folder so a published name survives a crash; not all platforms allow it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
