"""Bank files: a bank's tasks in one Parquet file, to embed in an MLflow model or move a bank.

An export has the task files' schema (rows of every task, in task id order) and carries in its
key-value metadata the bank's manifest, the manifest's hash, every task's checksum and per-task
metadata, and the snapshot hash of what it holds: the file and its identity are written together.

`export_bank` is also how a bank is published: it streams each task file once, verifies it,
writes its rows to the export (or only checks them) and returns the BankSource of exactly what
was read, so registration never reads the bank a second time.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.bank_source import BankSource, snapshot_hash
from pipeline.paths import resolve_root
from pipeline.registry.manifest import (
    FORMAT,
    BankMismatchError,
    RegistryCorruptError,
    layer_shapes,
    manifest_sha256,
    parse_manifest,
)
from pipeline.registry.mask_registry import MaskRegistry, parallel_map
from pipeline.registry.store import TMP_MARK
from pipeline.registry.task_file import (
    KEY_FORMAT,
    KEY_MANIFEST_SHA,
    KEY_TASK_META,
    SCHEMA,
    WRITE_OPTIONS,
    FileProblem,
    TaskRecord,
    check_complete,
    check_schema,
    decode_row,
    encode_rows,
    record,
    rows_table,
    task_checksum,
)

logger = logging.getLogger(__name__)

CHUNK = 256  # tasks read at once: bounds the memory of a pass over a large bank
KEY_MANIFEST = b"supsup.manifest"
KEY_SNAPSHOT = b"supsup.snapshot_sha256"
KEY_TASK_SHAS = b"supsup.task_sha256"
_REEXPORT = "the bank file is damaged: export it again from its registry"


@dataclass
class ImportResult:
    """Which tasks an import wrote and which were already present with identical masks."""

    bank: str
    written: list[int]
    unchanged: list[int]


def _public(manifest: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in manifest.items() if k != "manifest_sha256"}


def export_bank(registry: MaskRegistry, bank: str, dest: str | os.PathLike[str] | None,
                task_ids: Iterable[int] | None = None, *, expected: BankSource | None = None,
                overwrite: bool = False) -> BankSource:
    """Read every task of `bank` (or `task_ids`) once, verified, writing them to `dest`.

    Returns the BankSource of what was read (located in the registry). With `dest` None the pass
    only verifies. With `expected`, BankMismatchError unless the content read is exactly it.
    """
    manifest = registry.manifest(bank)
    digest = manifest["manifest_sha256"]
    ids = registry.select(bank, task_ids if expected is None else expected.task_ids)
    out = Path(dest) if dest is not None else None
    if out is not None and out.exists() and not overwrite:
        raise FileExistsError(f"export destination {out} exists; choose another path or remove it")
    tmp = out.with_name(f".{out.name}{TMP_MARK}{uuid.uuid4().hex}") if out else None
    checks: dict[int, str] = {}
    metas: dict[str, Any] = {}
    writer = None
    try:
        if tmp is not None:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            writer = pq.ParquetWriter(str(tmp), SCHEMA, **WRITE_OPTIONS)
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start:start + CHUNK]
            records = parallel_map(lambda t: registry.read_task(bank, t), chunk)
            tables = []
            for rec in records:
                checks[rec.task_id] = rec.task_sha256
                metas[str(rec.task_id)] = rec.metadata
                if writer is not None:
                    rows = encode_rows(bank, rec.task_id, manifest, rec.packed,
                                       rec.bn_stats or None)
                    tables.append(rows_table(bank, rec.task_id, rows))
            if writer is not None and tables:
                writer.write_table(pa.concat_tables(tables))
        snapshot = snapshot_hash(digest, checks)
        if expected is not None and (expected.manifest_sha256, expected.snapshot_sha256) != (
                digest, snapshot):
            raise BankMismatchError(
                f"{registry.where(bank)} no longer holds {expected.describe()}: its content now "
                f"hashes to {snapshot[:12]}; a task was rewritten or the manifest changed")
        if writer is not None:
            writer.add_key_value_metadata({
                KEY_FORMAT: str(FORMAT).encode(),
                KEY_MANIFEST: json.dumps(_public(manifest)).encode(),
                KEY_MANIFEST_SHA: digest.encode(),
                KEY_SNAPSHOT: snapshot.encode(),
                KEY_TASK_SHAS: json.dumps({str(t): s for t, s in checks.items()}).encode(),
                KEY_TASK_META: json.dumps(metas).encode(),
            })
            writer.close()
            writer = None
            os.replace(tmp, out)  # type: ignore[arg-type]
    finally:
        if writer is not None:
            writer.close()
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    if out is not None:
        logger.debug("exported %d tasks of bank %r to %s", len(ids), bank, out)
    return BankSource(bank, digest, snapshot, tuple(ids), root=registry.root)


def _open(path: str) -> tuple[pafs.FileSystem, str]:
    resolved = resolve_root(path)
    if "://" in resolved:
        return pafs.FileSystem.from_uri(resolved)
    return pafs.LocalFileSystem(), resolved


def read_export_manifest(path: str) -> dict[str, Any]:
    """The manifest a bank file carries (its footer alone is read), with its hash added."""
    fs, fpath = _open(path)
    try:
        with fs.open_input_file(fpath) as f:
            kv = pq.ParquetFile(f).metadata.metadata or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"bank file {path} does not exist") from None
    except (pa.ArrowException, OSError) as exc:
        raise RegistryCorruptError(f"{path}: unreadable Parquet file ({exc}); {_REEXPORT}"
                                   ) from None
    return _manifest_of(path, kv)


def _manifest_of(path: str, kv: Mapping[bytes, bytes]) -> dict[str, Any]:
    if KEY_MANIFEST not in kv:
        raise ValueError(f"{path} is not a mask bank file (no manifest in its metadata); make "
                         "one with `supsup registry export`")
    manifest = parse_manifest(path, None, kv[KEY_MANIFEST])
    manifest["manifest_sha256"] = manifest_sha256(manifest)
    if kv.get(KEY_MANIFEST_SHA, b"").decode() != manifest["manifest_sha256"]:
        raise RegistryCorruptError(f"{path}: its manifest does not hash to the recorded "
                                   f"manifest hash; {_REEXPORT}")
    return manifest


def iter_export(path: str) -> tuple[dict[str, Any], Iterator[TaskRecord]]:
    """(manifest, verified TaskRecords in file order) of a bank file; every row's checksum and
    every task's recorded checksum are checked as the records are produced."""
    fs, fpath = _open(path)
    try:
        f = fs.open_input_file(fpath)
    except FileNotFoundError:
        raise FileNotFoundError(f"bank file {path} does not exist") from None
    try:
        pf = pq.ParquetFile(f, page_checksum_verification=True)
        kv = pf.metadata.metadata or {}
        manifest = _manifest_of(path, kv)
        check_schema(pf.schema_arrow)
        recorded = json.loads(kv.get(KEY_TASK_SHAS, b"{}"))
        metas = json.loads(kv.get(KEY_TASK_META, b"{}"))
    except (FileProblem, json.JSONDecodeError, pa.ArrowException, OSError) as exc:
        f.close()
        raise RegistryCorruptError(f"{path}: {exc}; {_REEXPORT}") from None
    except BaseException:
        f.close()
        raise
    digest = manifest["manifest_sha256"]

    def records() -> Iterator[TaskRecord]:
        done: set[int] = set()
        current: int | None = None
        rows: list[Any] = []

        def finish() -> TaskRecord:
            check_complete(manifest, rows)
            checksum = task_checksum(digest, current, rows)  # type: ignore[arg-type]
            if recorded.get(str(current)) != checksum:
                raise FileProblem(f"task {current}: its rows do not give its recorded checksum")
            done.add(current)  # type: ignore[arg-type]
            return record(current, rows, metas.get(str(current), {}), checksum)  # type: ignore

        try:
            for batch in pf.iter_batches(batch_size=256):
                for row in batch.to_pylist():
                    tid = int(row["task_id"])
                    if tid != current:
                        if current is not None:
                            yield finish()
                        if tid in done:
                            raise FileProblem(f"rows of task {tid} are not contiguous")
                        current, rows = tid, []
                    rows.append(decode_row(tid, manifest, row))
            if current is not None:
                yield finish()
        except (FileProblem, pa.ArrowException, OSError) as exc:
            raise RegistryCorruptError(f"{path}: {exc}; {_REEXPORT}") from None
        finally:
            f.close()

    return manifest, records()


def import_file(registry: MaskRegistry, path: str | os.PathLike[str],
                bank: str | None = None) -> ImportResult:
    """Read a bank file into `registry` (under `bank`, default the exported name).

    Every row is verified, the bank is created or checked against the file's manifest, and every
    task goes through `write_task`, so stored different masks raise RegistryConflictError.
    Tasks written before a damaged row stay; importing again is idempotent.
    """
    manifest, records = iter_export(os.fspath(path))
    target = bank or manifest["bank"]
    registry.create_bank(target, manifest["network"], layer_shapes(manifest),
                         manifest["bn_features"], manifest["mask"], manifest.get("recipe"),
                         exact_recipe=True)
    written: list[int] = []
    unchanged: list[int] = []
    for rec in records:
        status = registry.write_task(target, rec.task_id, rec.packed, rec.bn_stats or None,
                                     rec.metadata)
        (written if status == "written" else unchanged).append(rec.task_id)
    return ImportResult(target, written, unchanged)
