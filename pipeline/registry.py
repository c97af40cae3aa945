"""The mask registry: where workers write each task's packed supermask and evaluation reads it back.

SupSup's whole learned state is one binary mask per task over a fixed random network (Section 3.1),
plus per-task BatchNorm statistics for conv nets. Only the network's seed and spec are stored, so a
bank of thousands of tasks is a few bytes per weight-bit. This module is the only pyarrow importer.

Layout under `root` (a local path or any pyarrow filesystem URI: file://, s3://, mock://, ...):

    {root}/{bank}/manifest.json                 format, bank, network spec, layer shapes,
                                                BN features, mask rule, creation time
    {root}/{bank}/tasks/task-{task_id:07d}.parquet   one file per task

A task file has one row per masked layer ("mask": numpy.packbits bytes of the flattened mask, most
significant bit first, zero padding) and per BN layer ("bn": float32 little-endian bytes of the
(2, C) running mean and variance). Each row carries `sha256 = row_checksum(...)`, a hash of the
task id, layer, kind, shape and bytes, checked on every read; the Parquet pages also carry CRCs.
Optional per-task metadata (accuracy, seconds, steps, ...) lives in the file's key-value metadata.

Guarantees:
- Writes are atomic: a task file appears complete or not at all (temp file in the same folder,
  then published under its final name).
- A task's stored mask is never replaced. Rewriting identical masks returns "unchanged"; different
  masks raise RegistryConflictError and keep the stored file. On a local file system the final
  name is published with a hard link, which the kernel refuses when the name exists, so of two
  concurrent writers exactly one wins and the other gets the conflict. On other file systems (object
  stores have no create-if-absent) the writer checks right before the move and reads the file back
  after it: a loser is told unless both writers pass the check within the same moment.
- Per-task metadata is informational: it does not take part in the "unchanged" comparison, so a
  rerun of a deterministic task (different timings, same masks) is "unchanged" and keeps the
  first run's metadata.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import logging
import math
import os
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from supsup.bank import MaskBank, describe_ids
from supsup.networks import NetworkSpec

logger = logging.getLogger(__name__)

FORMAT = 1
LOAD_CHUNK = 256  # tasks per MaskBank.extend_packed call: bounds the stacked numpy buffers
_IO_THREADS = 8  # Parquet reads release the GIL; threads hide object-store latency
_EXPORT_FLUSH_BYTES = 256 << 20  # bytes of row data buffered before a row group is written
_BANK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TASK_FILE = re.compile(r"task-(\d+)\.parquet")
_TMP_MARK = ".tmp-"
_MANIFEST = "manifest.json"
_KEY_TASK_META = b"supsup.task_metadata"
_KEY_MANIFEST = b"supsup.manifest"
_KEY_FORMAT = b"supsup.registry_format"
_MANIFEST_FIELDS = ("network", "layer_shapes", "bn_features", "mask")
_ADVICE = "run `supsup registry verify` on the bank to list every damaged task"
_POPCOUNT = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)
_NOT_LINKABLE = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS}

SCHEMA = pa.schema([
    ("bank", pa.string()),
    ("task_id", pa.int64()),
    ("layer", pa.string()),
    ("kind", pa.string()),  # "mask" or "bn"
    ("shape", pa.list_(pa.int64())),
    ("density", pa.float64()),  # fraction of ones for masks; NaN for BN rows
    ("data", pa.binary()),
    ("sha256", pa.string()),
])
_WRITE_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "use_dictionary": ["bank", "layer", "kind"],
    "write_statistics": ["task_id", "layer", "kind"],
    "write_page_checksum": True,
}

_T = TypeVar("_T")
_R = TypeVar("_R")


class RegistryConflictError(ValueError):
    """A task already stored with different masks; the stored file was kept."""


class RegistryCorruptError(ValueError):
    """A registry file is unreadable, truncated or fails its checksums."""


class _Problem(Exception):
    """Internal: what is wrong with a file's contents, before the file name is attached."""


@dataclass
class TaskRecord:
    """One task as stored: packed masks (nbytes,) uint8 and BN stats (2, C) float32 per layer."""

    task_id: int
    packed: dict[str, np.ndarray]
    bn_stats: dict[str, np.ndarray]
    densities: dict[str, float]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class VerifyReport:
    """Result of checking every task file of a bank; strays are temp files or unknown names."""

    bank: str
    ok: list[int]
    problems: dict[int, str]
    stray: list[str]
    manifest_problem: str | None = None
    reservoir: bool = False  # the bank holds a Hopfield reservoir file
    reservoir_problem: str | None = None

    @property
    def all_ok(self) -> bool:
        """True when the manifest, every task file and the reservoir (if any) passed (stray files
        do not count)."""
        return (not self.problems and self.manifest_problem is None
                and self.reservoir_problem is None)


@dataclass
class ImportResult:
    """Which tasks an import wrote and which were already present with identical masks."""

    bank: str
    written: list[int]
    unchanged: list[int]


@dataclass(frozen=True)
class _Row:
    layer: str
    kind: str
    shape: tuple[int, ...]
    density: float
    data: bytes
    sha256: str


def row_checksum(task_id: int, layer: str, kind: str, shape: Sequence[int], data: bytes) -> str:
    """Hex sha256 of one row: a JSON header (task id, layer, kind, shape), a newline, the bytes.

    The bank name is left out so that an exported bank imported under another name keeps its
    checksums (and its snapshot hash).
    """
    header = json.dumps([int(task_id), layer, kind, [int(d) for d in shape]])
    h = hashlib.sha256(header.encode())
    h.update(b"\n")
    h.update(data)
    return h.hexdigest()


class MaskRegistry:
    """Banks of per-task packed masks under one root (local path or pyarrow filesystem URI)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fspath(root)
        if "://" in self.root:
            self._fs, path = pafs.FileSystem.from_uri(self.root)
        else:
            self._fs = pafs.LocalFileSystem()
            path = os.path.abspath(os.path.expanduser(self.root))
        self._base = path.rstrip("/")
        self._local = isinstance(self._fs, pafs.LocalFileSystem)
        self._manifests: dict[str, dict[str, Any]] = {}  # manifests never change once written

    def __repr__(self) -> str:
        return f"MaskRegistry({self.root!r})"

    # ---------------------------------------------------------------------------- paths
    def _join(self, *parts: str) -> str:
        return "/".join(p for p in (self._base, *parts) if p)

    def _bank_dir(self, bank: str) -> str:
        return self._join(_check_bank_name(bank))

    def _task_path(self, bank: str, task_id: int) -> str:
        return self._join(_check_bank_name(bank), "tasks", _task_name(task_id))

    def _exists(self, path: str) -> bool:
        return self._fs.get_file_info(path).type != pafs.FileType.NotFound

    def _listdir(self, path: str) -> list[pafs.FileInfo]:
        return self._fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))

    # -------------------------------------------------------------------------- banks
    def banks(self) -> list[str]:
        """Names of the banks under the root (folders holding a manifest), sorted."""
        names = [
            info.base_name for info in self._listdir(self._base)
            if info.type == pafs.FileType.Directory and _BANK_NAME.fullmatch(info.base_name)
        ]
        return sorted(n for n in names if self._exists(self._join(n, _MANIFEST)))

    def create_bank(
        self,
        bank: str,
        network_spec: Mapping[str, Any] | NetworkSpec,
        layer_shapes: Mapping[str, Sequence[int]],
        bn_features: Mapping[str, int] | None,
        mask_info: Mapping[str, Any],
    ) -> None:
        """Write the bank's manifest; a no-op when an identical one exists.

        ValueError naming the differing fields when the bank exists with another network, layer
        shapes, BN layers or mask rule: a bank never mixes base networks.
        """
        _check_bank_name(bank)
        manifest = {
            "format": FORMAT,
            "bank": bank,
            **_manifest_core(network_spec, layer_shapes, bn_features, mask_info),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        path = self._join(bank, _MANIFEST)
        if self._exists(path):
            self._check_same_manifest(bank, manifest)
            return
        self._fs.create_dir(self._bank_dir(bank), recursive=True)
        tmp = self._join(bank, f".{_MANIFEST}{_TMP_MARK}{uuid.uuid4().hex}")
        try:
            with self._fs.open_output_stream(tmp) as out:
                out.write(json.dumps(manifest, indent=1).encode())
            self._sync(tmp)
            if not self._publish(tmp, path):  # another process created the bank meanwhile
                self._check_same_manifest(bank, manifest)
        finally:
            self._remove_quietly(tmp)
        if not self._local:
            self._check_same_manifest(bank, manifest)
        logger.info("created bank %r in %s", bank, self.root)

    def _check_same_manifest(self, bank: str, wanted: Mapping[str, Any]) -> None:
        self._manifests.pop(bank, None)
        stored = self.manifest(bank)
        diffs = {key: _diff(key, stored[key], wanted[key]) for key in _MANIFEST_FIELDS}
        fields = [key for key, d in diffs.items() if d]
        if fields:
            details = [line for key in fields for line in diffs[key]]
            raise ValueError(
                f"bank {bank!r} in {self.root} already exists with a different "
                f"{', '.join(fields)}: {'; '.join(details[:8])}. A bank never mixes base networks "
                "or mask rules: choose a new bank name for this configuration."
            )

    def manifest(self, bank: str) -> dict[str, Any]:
        """The bank's manifest (a copy); KeyError listing the banks present for an unknown bank."""
        if bank not in self._manifests:
            path = self._join(_check_bank_name(bank), _MANIFEST)
            try:
                with self._fs.open_input_stream(path) as f:
                    raw = f.read()
            except FileNotFoundError:
                present = self.banks()
                raise KeyError(
                    f"no bank {bank!r} in the registry at {self.root}; banks present: "
                    f"{present if present else 'none'} (create one with create_bank)"
                ) from None
            self._manifests[bank] = _parse_manifest(path, bank, raw)
        return copy.deepcopy(self._manifests[bank])

    def tasks(self, bank: str) -> list[int]:
        """Task ids stored in `bank`, sorted (temp files of writers in flight are ignored)."""
        self.manifest(bank)
        return sorted(self._scan(bank)[0])

    def _scan(self, bank: str) -> tuple[dict[int, str], list[str]]:
        """({task_id: path}, stray file names) of the bank's folders."""
        found: dict[int, str] = {}
        stray = [
            info.base_name for info in self._listdir(self._bank_dir(bank))
            if _TMP_MARK in info.base_name
        ]
        for info in self._listdir(self._join(bank, "tasks")):
            m = _TASK_FILE.fullmatch(info.base_name)
            if (m and info.type == pafs.FileType.File
                    and info.base_name == _task_name(int(m.group(1)))):
                found[int(m.group(1))] = info.path
            else:
                stray.append(f"tasks/{info.base_name}")
        return found, sorted(stray)

    # -------------------------------------------------------------------------- write
    def write_task(
        self,
        bank: str,
        task_id: int,
        packed: Mapping[str, np.ndarray | torch.Tensor],
        bn_stats: Mapping[str, np.ndarray | torch.Tensor] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> str:
        """Store one task's packed masks (and BN stats); "written" or "unchanged".

        `packed[layer]` is the flattened mask packed with supsup.masks.pack_bits or numpy.packbits
        ((ceil(numel / 8),) uint8); `bn_stats[layer]` is (2, C) running mean and variance.
        Everything is validated against the manifest before anything touches the disk.
        RegistryConflictError when the task is stored with different masks (the stored file stays).
        """
        task_id = _check_task_id(task_id)
        manifest = self.manifest(bank)
        rows = _encode_rows(bank, task_id, manifest, packed, bn_stats)
        meta = _metadata_bytes(task_id, metadata)
        final = self._task_path(bank, task_id)
        if self._exists(final):
            return self._compare_stored(bank, task_id, final, rows)
        table = _rows_table(bank, task_id, rows).replace_schema_metadata({
            _KEY_FORMAT: str(FORMAT).encode(), _KEY_TASK_META: meta,
        })
        folder = self._join(bank, "tasks")
        self._fs.create_dir(folder, recursive=True)
        tmp = f"{folder}/.{_task_name(task_id)}{_TMP_MARK}{uuid.uuid4().hex}"
        try:
            with self._fs.open_output_stream(tmp) as out:
                pq.write_table(table, out, **_WRITE_OPTIONS)
            self._sync(tmp)
            published = self._publish(tmp, final)
        finally:
            self._remove_quietly(tmp)
        if not published:  # another writer got there between our check and our publish
            return self._compare_stored(bank, task_id, final, rows)
        if not self._local:  # no create-if-absent: make sure the file now holds our masks
            self._compare_stored(bank, task_id, final, rows)  # raises if another writer won
        logger.debug("wrote task %d of bank %r", task_id, bank)
        return "written"

    def _compare_stored(self, bank: str, task_id: int, path: str, rows: list[_Row]) -> str:
        stored, _ = self._read_rows(bank, task_id, path)
        mine = {(r.kind, r.layer): r.sha256 for r in rows}
        theirs = {(r.kind, r.layer): r.sha256 for r in stored}
        if mine == theirs:
            return "unchanged"
        differing = sorted(f"{kind} {layer}" for (kind, layer), h in mine.items()
                           if theirs.get((kind, layer)) != h)
        raise RegistryConflictError(
            f"bank {bank!r} already holds task {task_id} with different masks "
            f"({', '.join(differing[:6])} differ); the stored mask was kept at {path}. "
            f"Masks are never replaced: write these to a new bank name (e.g. '{bank}-v2'), "
            "or move the stored file away by hand if it is the wrong one."
        )

    def _publish(self, tmp: str, final: str) -> bool:
        """Make `tmp` visible as `final` unless `final` exists (then False, nothing changed)."""
        if self._local:
            try:
                os.link(tmp, final)  # fails with EEXIST atomically: the first writer wins
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in _NOT_LINKABLE:
                    raise
                # a file system without hard links: check, then rename (a narrow race window)
                if os.path.exists(final):
                    return False
                os.rename(tmp, final)
            _sync_dir(os.path.dirname(final))
            return True
        if self._exists(final):
            return False
        self._fs.move(tmp, final)
        return True

    def _sync(self, path: str) -> None:
        """Flush a local file to disk before it is published, so a crash cannot publish holes."""
        if self._local:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _remove_quietly(self, path: str) -> None:
        try:
            if self._exists(path):
                self._fs.delete_file(path)
        except OSError as exc:
            logger.warning("could not remove temp file %s: %s", path, exc)

    # --------------------------------------------------------------------------- read
    def _read_parquet(self, path: str) -> tuple[pa.Table, dict[bytes, bytes]]:
        """A whole Parquet file with its page checksums verified, and its schema metadata."""
        with self._fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f, page_checksum_verification=True)
            return pf.read(), dict(pf.metadata.metadata or {})

    def _read_rows(
        self, bank: str, task_id: int, path: str | None = None
    ) -> tuple[list[_Row], dict[str, Any]]:
        """Verified rows and metadata of one task file; RegistryCorruptError naming the file."""
        manifest = self.manifest(bank)
        path = path or self._task_path(bank, task_id)
        try:
            table, kv = self._read_parquet(path)
        except FileNotFoundError:
            raise self._missing(bank, [task_id]) from None
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise RegistryCorruptError(
                f"{path}: unreadable or truncated Parquet file ({exc}); {_ADVICE}"
            ) from None
        try:
            _check_schema(table.schema)
            cols = table.to_pydict()
            rows = []
            for i in range(table.num_rows):
                if cols["bank"][i] != bank or cols["task_id"][i] != task_id:
                    raise _Problem(
                        f"row {i} belongs to bank {cols['bank'][i]!r} task {cols['task_id'][i]}, "
                        f"not bank {bank!r} task {task_id} (was the file copied here by hand?)"
                    )
                rows.append(_decode_row(task_id, manifest, {k: v[i] for k, v in cols.items()}))
            _check_complete(manifest, rows)
            metadata = json.loads(kv.get(_KEY_TASK_META, b"{}"))
        except (_Problem, json.JSONDecodeError) as exc:
            raise RegistryCorruptError(f"{path}: {exc}; {_ADVICE}") from None
        return rows, metadata

    def read_task(self, bank: str, task_id: int) -> TaskRecord:
        """One task, every row's checksum verified; RegistryCorruptError names file and problem."""
        task_id = _check_task_id(task_id)
        rows, metadata = self._read_rows(bank, task_id)
        return _record(task_id, rows, metadata)

    def _missing(self, bank: str, missing: Sequence[int]) -> KeyError:
        held = describe_ids(self.tasks(bank))
        return KeyError(
            f"bank {bank!r} has no task {', '.join(map(str, missing[:20]))}"
            f"{' ...' if len(missing) > 20 else ''}; it holds {held}"
        )

    def _select(self, bank: str, task_ids: Iterable[int] | None) -> list[int]:
        present = self.tasks(bank)
        if task_ids is None:
            return present
        ids = [_check_task_id(t) for t in task_ids]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate task ids requested from bank {bank!r}: {ids[:20]}")
        have = set(present)
        missing = [t for t in ids if t not in have]
        if missing:
            raise self._missing(bank, missing)
        return ids

    def verify(self, bank: str) -> VerifyReport:
        """Check the manifest and every task file of `bank`; reports problems instead of raising."""
        _check_bank_name(bank)
        found, stray = self._scan(bank)
        try:
            self._manifests.pop(bank, None)
            self.manifest(bank)
        except RegistryCorruptError as exc:
            return VerifyReport(bank, [], {}, stray, manifest_problem=str(exc))

        def check(tid: int) -> str | None:
            try:
                self._read_rows(bank, tid, found[tid])
            except (RegistryCorruptError, KeyError) as exc:
                return str(exc)
            return None

        ids = sorted(found)
        results = _map(check, ids)
        problems = {t: msg for t, msg in zip(ids, results) if msg is not None}
        has_reservoir = self.has_reservoir(bank)
        reservoir_problem = None
        if has_reservoir:
            try:
                self.read_reservoir(bank)
            except (RegistryCorruptError, FileNotFoundError) as exc:
                reservoir_problem = str(exc)
        return VerifyReport(bank, [t for t in ids if t not in problems], problems, stray,
                            reservoir=has_reservoir, reservoir_problem=reservoir_problem)

    def load_bank(
        self,
        bank: str,
        task_ids: Iterable[int] | None = None,
        device: torch.device | str = "cpu",
    ) -> tuple[MaskBank, NetworkSpec]:
        """A MaskBank of `task_ids` (all tasks when None, rows in the given order) and its spec."""
        manifest = self.manifest(bank)
        spec = NetworkSpec.from_dict(manifest["network"])
        ids = self._select(bank, task_ids)
        out = MaskBank(manifest["layer_shapes"], manifest["bn_features"], device)
        for start in range(0, len(ids), LOAD_CHUNK):
            chunk = ids[start:start + LOAD_CHUNK]
            records = _map(lambda t: self.read_task(bank, t), chunk)
            packed = {  # (chunk, nbytes) per layer
                k: torch.from_numpy(np.stack([r.packed[k] for r in records]))
                for k in manifest["layer_shapes"]
            }
            stats = {  # (chunk, 2, C) per BN layer
                k: torch.from_numpy(np.stack([r.bn_stats[k] for r in records]))
                for k in manifest["bn_features"]
            }
            out.extend_packed(chunk, packed, stats or None)
        return out, spec

    def snapshot(self, bank: str) -> dict[str, Any]:
        """Content hashes pinning what a bank holds (e.g. to tag an MLflow model version).

        content_sha256 covers the manifest's network, layer shapes, BN layers and mask rule, then
        every task in id order with its rows' checksums (each file is verified on the way). The
        bank name and creation time are left out: an exported and re-imported bank hashes equal.
        """
        manifest = self.manifest(bank)
        ids = self.tasks(bank)
        h = hashlib.sha256(json.dumps(
            {k: manifest[k] for k in _MANIFEST_FIELDS}, sort_keys=True).encode())
        for start in range(0, len(ids), LOAD_CHUNK):
            chunk = ids[start:start + LOAD_CHUNK]
            for tid, (rows, _) in zip(chunk, _map(lambda t: self._read_rows(bank, t), chunk)):
                h.update(f"task {tid}\n".encode())
                for r in sorted(rows, key=lambda r: (r.kind, r.layer)):
                    h.update(f"{r.kind} {r.layer} {r.sha256}\n".encode())
        return {
            "bank": bank,
            "tasks": len(ids),
            "task_ids_hash": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
            "content_sha256": h.hexdigest(),
        }

    # ------------------------------------------------------------------------ reservoir
    # A bank of the hopfield scenario stores no task files: its masks (neuron gates, one (d,)
    # vector per gated layer listed in the manifest's layer_shapes) live superimposed in one
    # constant-size file {root}/{bank}/reservoir.parquet, one row per array: "psi"
    # (num_layers, d, d) and "pattern_sum" (num_layers, d), float32 little-endian bytes with a
    # sha256 per row, plus JSON metadata (patterns stored, task ids, ...).

    def _reservoir_path(self, bank: str) -> str:
        return self._join(_check_bank_name(bank), _RESERVOIR_FILE)

    def has_reservoir(self, bank: str) -> bool:
        """Whether `bank` holds a Hopfield reservoir file."""
        return self._exists(self._reservoir_path(bank))

    def write_reservoir(
        self,
        bank: str,
        arrays: Mapping[str, np.ndarray | torch.Tensor],
        metadata: Mapping[str, Any] | None = None,
        *,
        overwrite: bool = False,
    ) -> str:
        """Store the bank's reservoir; "written", "unchanged" or (overwrite=True) "replaced".

        `arrays` holds exactly "psi" (num_layers, d, d) and "pattern_sum" (num_layers, d), where
        the manifest lists num_layers gated layers of shape (d,); both are stored as float32, so
        the file has the same size whatever number of patterns it holds. The write is atomic
        (temp file, then published). An existing reservoir with the same arrays is "unchanged";
        with other arrays it is kept and RegistryConflictError raised unless `overwrite`.
        """
        manifest = self.manifest(bank)
        rows = _reservoir_rows(bank, manifest, arrays)
        if metadata is not None and not isinstance(metadata, Mapping):
            raise ValueError(f"reservoir metadata must be a mapping, got {type(metadata)}")
        meta = json.dumps(_canonical(dict(metadata or {}), "reservoir metadata")).encode()
        final = self._reservoir_path(bank)
        if self._exists(final):
            status = self._compare_reservoir(bank, final, rows, overwrite)
            if status == "unchanged":
                return status
        table = pa.table({
            "name": [r[0] for r in rows],
            "shape": [list(r[1]) for r in rows],
            "data": [r[2] for r in rows],
            "sha256": [r[3] for r in rows],
        }, schema=_RESERVOIR_SCHEMA).replace_schema_metadata({
            _KEY_FORMAT: str(FORMAT).encode(), _KEY_RESERVOIR_META: meta,
        })
        tmp = self._join(bank, f".{_RESERVOIR_FILE}{_TMP_MARK}{uuid.uuid4().hex}")
        replaced = False
        try:
            with self._fs.open_output_stream(tmp) as out:
                pq.write_table(table, out, **_RESERVOIR_WRITE_OPTIONS)
            self._sync(tmp)
            if overwrite and self._exists(final):
                if self._local:
                    os.replace(tmp, final)
                    _sync_dir(os.path.dirname(final))
                else:
                    self._fs.move(tmp, final)
                replaced = True
            elif not self._publish(tmp, final):  # another writer published first
                return self._compare_reservoir(bank, final, rows, overwrite=False)
        finally:
            self._remove_quietly(tmp)
        if not self._local:  # no create-if-absent: make sure the file now holds our arrays
            self._compare_reservoir(bank, final, rows, overwrite=False)
        logger.info("%s the reservoir of bank %r", "replaced" if replaced else "wrote", bank)
        return "replaced" if replaced else "written"

    def _compare_reservoir(self, bank: str, path: str, rows: list[tuple[str, tuple[int, ...],
                           bytes, str]], overwrite: bool) -> str:
        """"unchanged" when the stored arrays equal `rows`; "differs" (overwrite) or a conflict."""
        stored, _ = self._read_reservoir_file(bank, path)
        mine = {r[0]: r[3] for r in rows}
        theirs = {name: _reservoir_checksum(name, a.shape, _f32_bytes(a))
                  for name, a in stored.items()}
        if mine == theirs:
            return "unchanged"
        if overwrite:
            return "differs"
        raise RegistryConflictError(
            f"bank {bank!r} already holds a different reservoir at {path} (it was kept). A "
            "reservoir holds every stored task at once: pass overwrite=True to replace it with "
            f"this one, or write to a new bank name (e.g. '{bank}-v2').")

    def _read_reservoir_file(self, bank: str, path: str) -> tuple[dict[str, np.ndarray],
                                                                  dict[str, Any]]:
        manifest = self.manifest(bank)
        try:
            table, kv = self._read_parquet(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"bank {bank!r} in {self.root} holds no reservoir ({path}); the hopfield "
                "scenario writes one (MaskRegistry.write_reservoir)") from None
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise RegistryCorruptError(
                f"{path}: unreadable or truncated Parquet file ({exc}); rewrite the reservoir "
                "(rerun the hopfield job into a new bank)") from None
        try:
            want = _reservoir_shapes(bank, manifest)
            for f in _RESERVOIR_SCHEMA:
                i = table.schema.get_field_index(f.name)
                if i < 0 or not table.schema.field(i).type.equals(f.type):
                    raise _Problem(f"column {f.name!r} is missing or not {f.type}")
            arrays: dict[str, np.ndarray] = {}
            for row in table.to_pylist():
                name, data = row["name"], row["data"]
                shape = tuple(int(v) for v in row["shape"] or ())
                if name not in want or name in arrays:
                    raise _Problem(f"unexpected or repeated array {name!r}")
                if shape != want[name]:
                    raise _Problem(f"array {name!r} has shape {shape}, the manifest's gated "
                                   f"layers give {want[name]}")
                if data is None or len(data) != 4 * _numel(shape):
                    raise _Problem(f"array {name!r} holds {0 if data is None else len(data)} "
                                   f"bytes, expected {4 * _numel(shape)}")
                if _reservoir_checksum(name, shape, data) != row["sha256"]:
                    raise _Problem(f"checksum mismatch in array {name!r} (the stored bytes "
                                   "changed after they were written)")
                arrays[name] = np.frombuffer(data, "<f4").astype(np.float32).reshape(shape)
            missing = sorted(set(want) - set(arrays))
            if missing:
                raise _Problem(f"missing arrays {missing}")
            metadata = json.loads(kv.get(_KEY_RESERVOIR_META, b"{}"))
        except (_Problem, json.JSONDecodeError) as exc:
            raise RegistryCorruptError(f"{path}: {exc}; rewrite the reservoir (rerun the "
                                       "hopfield job into a new bank)") from None
        return arrays, metadata

    def read_reservoir(self, bank: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """({"psi": (L, d, d), "pattern_sum": (L, d)} float32, metadata), checksums verified.

        FileNotFoundError when the bank holds no reservoir; RegistryCorruptError naming the file
        when it is damaged.
        """
        return self._read_reservoir_file(bank, self._reservoir_path(bank))

    def copy_reservoir(self, bank: str, dest_path: str | os.PathLike[str]) -> Path:
        """Copy the (verified) reservoir file to a local path, e.g. to log it as an artifact."""
        self.read_reservoir(bank)
        dest = Path(dest_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}{_TMP_MARK}{uuid.uuid4().hex}")
        try:
            with self._fs.open_input_stream(self._reservoir_path(bank)) as src, \
                    open(tmp, "wb") as out:
                while chunk := src.read(16 << 20):
                    out.write(chunk)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    # --------------------------------------------------------------------- export/import
    def export(
        self,
        bank: str,
        dest_path: str | os.PathLike[str],
        task_ids: Iterable[int] | None = None,
        *,
        overwrite: bool = False,
    ) -> Path:
        """Write the bank's rows (verified) to one local Parquet file with the manifest inside.

        For MLflow artifacts and for moving a bank between registries; see `import_file`.
        """
        dest = Path(dest_path)
        if dest.exists() and not overwrite:
            raise FileExistsError(f"export destination {dest} exists; pass overwrite=True or "
                                  "choose another path")
        manifest = self.manifest(bank)
        ids = self._select(bank, task_ids)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}{_TMP_MARK}{uuid.uuid4().hex}")
        task_meta: dict[str, Any] = {}
        try:
            with pq.ParquetWriter(str(tmp), SCHEMA, **_WRITE_OPTIONS) as writer:
                buffered: list[pa.Table] = []
                size = 0
                for start in range(0, len(ids), LOAD_CHUNK):
                    chunk = ids[start:start + LOAD_CHUNK]
                    for tid, (rows, meta) in zip(
                            chunk, _map(lambda t: self._read_rows(bank, t), chunk)):
                        buffered.append(_rows_table(bank, tid, rows))
                        size += sum(len(r.data) for r in rows)
                        task_meta[str(tid)] = meta
                        if size >= _EXPORT_FLUSH_BYTES:
                            writer.write_table(pa.concat_tables(buffered))
                            buffered, size = [], 0
                if buffered:
                    writer.write_table(pa.concat_tables(buffered))
                writer.add_key_value_metadata({
                    _KEY_FORMAT: str(FORMAT).encode(),
                    _KEY_MANIFEST: json.dumps(manifest).encode(),
                    _KEY_TASK_META: json.dumps(task_meta).encode(),
                })
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        logger.info("exported %d tasks of bank %r to %s", len(ids), bank, dest)
        return dest

    def import_file(self, path: str | os.PathLike[str], bank: str | None = None) -> ImportResult:
        """Read an `export` file into this registry (under `bank`, default the exported name).

        Every row's checksum is verified, the bank is created or checked against the exported
        manifest, and every task goes through `write_task`, so existing different masks raise
        RegistryConflictError. Tasks written before a damaged row stay; re-importing is idempotent.
        """
        source = os.fspath(path)
        fs, fpath = (pafs.FileSystem.from_uri(source) if "://" in source
                     else (pafs.LocalFileSystem(), os.path.abspath(source)))
        written: list[int] = []
        unchanged: list[int] = []
        try:
            with fs.open_input_file(fpath) as f:
                pf = pq.ParquetFile(f, page_checksum_verification=True)
                kv = pf.metadata.metadata or {}
                if _KEY_MANIFEST not in kv:
                    raise ValueError(f"{source} is not a mask registry export (no manifest in its "
                                     "metadata); make one with MaskRegistry.export")
                manifest = _parse_manifest(source, None, kv[_KEY_MANIFEST])
                _check_schema(pf.schema_arrow)
                target = bank or manifest["bank"]
                self.create_bank(target, manifest["network"], manifest["layer_shapes"],
                                 manifest["bn_features"], manifest["mask"])
                task_meta = json.loads(kv.get(_KEY_TASK_META, b"{}"))
                done: set[int] = set()
                current: int | None = None
                rows: list[_Row] = []

                def flush() -> None:
                    if current is None:
                        return
                    _check_complete(manifest, rows)
                    packed, stats = _row_arrays(rows)
                    status = self.write_task(target, current, packed, stats or None,
                                             task_meta.get(str(current)))
                    (written if status == "written" else unchanged).append(current)
                    done.add(current)

                for batch in pf.iter_batches(batch_size=256):
                    for row in batch.to_pylist():
                        tid = int(row["task_id"])
                        if tid != current:
                            flush()
                            if tid in done:
                                raise _Problem(f"rows of task {tid} are not contiguous")
                            current, rows = tid, []
                        rows.append(_decode_row(tid, manifest, row))
                flush()
        except FileNotFoundError:
            raise FileNotFoundError(f"registry export {source} does not exist") from None
        except (_Problem, json.JSONDecodeError) as exc:
            raise RegistryCorruptError(f"{source}: {exc}; the export is damaged, re-export the "
                                       "bank from its registry") from None
        except (pa.ArrowException, OSError) as exc:
            raise RegistryCorruptError(f"{source}: unreadable or truncated Parquet file ({exc}); "
                                       "re-export the bank from its registry") from None
        return ImportResult(target, written, unchanged)


# ------------------------------------------------------------------------------ helpers
def _check_bank_name(bank: str) -> str:
    if not isinstance(bank, str) or not _BANK_NAME.fullmatch(bank):
        raise ValueError(
            f"bank name {bank!r} is not allowed: use letters, digits, '.', '_' and '-', starting "
            "with a letter or digit (it becomes a folder name)"
        )
    return bank


def _check_task_id(task_id: Any) -> int:
    if isinstance(task_id, bool) or not isinstance(task_id, (int, np.integer)) or task_id < 0:
        raise ValueError(f"task_id must be a non-negative integer, got {task_id!r}")
    return int(task_id)


def _task_name(task_id: int) -> str:
    return f"task-{task_id:07d}.parquet"


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)


def _canonical(value: Any, what: str) -> Any:
    """JSON round trip (tuples become lists), with a ValueError naming `what` on failure."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable: {exc}") from None


def _manifest_core(
    network_spec: Mapping[str, Any] | NetworkSpec,
    layer_shapes: Mapping[str, Sequence[int]],
    bn_features: Mapping[str, int] | None,
    mask_info: Mapping[str, Any],
) -> dict[str, Any]:
    """Validated, normalised network / layer_shapes / bn_features / mask fields of a manifest."""
    spec = (network_spec if isinstance(network_spec, NetworkSpec)
            else NetworkSpec.from_dict(dict(network_spec)))
    if not layer_shapes:
        raise ValueError("layer_shapes is empty: a bank needs at least one masked layer")
    shapes: dict[str, list[int]] = {}
    for layer, shape in layer_shapes.items():
        dims = [int(d) for d in shape]
        if not dims or min(dims) < 1:
            raise ValueError(f"layer_shapes[{layer!r}] = {list(shape)} must be positive dims")
        shapes[str(layer)] = dims
    feats: dict[str, int] = {}
    for layer, c in (bn_features or {}).items():
        if int(c) < 1:
            raise ValueError(f"bn_features[{layer!r}] = {c} must be a positive channel count")
        feats[str(layer)] = int(c)
    if not isinstance(mask_info, Mapping):
        raise ValueError(f"mask_info must be a mapping (rule, density, ...), got {mask_info!r}")
    return {
        "network": spec.to_dict(),
        "layer_shapes": shapes,
        "bn_features": feats,
        "mask": _canonical(dict(mask_info), "mask_info"),
    }


def _parse_manifest(path: str, bank: str | None, raw: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(raw)
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise RegistryCorruptError(
            f"{path}: manifest is not valid JSON ({exc}); {_ADVICE}") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: manifest format {manifest.get('format')!r} is not supported "
                         f"(this version reads format {FORMAT}); upgrade supsup-pipeline")
    missing = [k for k in ("bank", *_MANIFEST_FIELDS) if k not in manifest]
    if missing:
        raise RegistryCorruptError(f"{path}: manifest lacks {missing}; {_ADVICE}")
    if bank is not None and manifest["bank"] != bank:
        raise RegistryCorruptError(f"{path}: manifest names bank {manifest['bank']!r}, not "
                                   f"{bank!r} (was the folder renamed?); {_ADVICE}")
    return manifest


def _diff(key: str, stored: Any, wanted: Any) -> list[str]:
    """'key.sub (stored X, given Y)' for every differing entry of two manifest fields."""
    if isinstance(stored, dict) and isinstance(wanted, dict):
        return [f"{key}.{k} (stored {stored.get(k, '<absent>')}, given {wanted.get(k, '<absent>')})"
                for k in sorted(set(stored) | set(wanted), key=str)
                if stored.get(k) != wanted.get(k)]
    return [] if stored == wanted else [f"{key} (stored {stored}, given {wanted})"]


def _metadata_bytes(task_id: int, metadata: Mapping[str, Any] | None) -> bytes:
    if metadata is not None and not isinstance(metadata, Mapping):
        raise ValueError(f"task {task_id}: metadata must be a mapping, got {type(metadata)}")
    return json.dumps(_canonical(dict(metadata or {}), f"task {task_id} metadata")).encode()


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _encode_rows(
    bank: str,
    task_id: int,
    manifest: Mapping[str, Any],
    packed: Mapping[str, Any],
    bn_stats: Mapping[str, Any] | None,
) -> list[_Row]:
    """Validated rows of one task (masks in manifest order, then BN); ValueError/KeyError else."""
    shapes: dict[str, list[int]] = manifest["layer_shapes"]
    feats: dict[str, int] = manifest["bn_features"]
    extra = sorted(set(packed) - set(shapes))
    if extra:
        raise ValueError(f"task {task_id}: layers {extra} are not masked layers of bank {bank!r} "
                         f"(its layers: {list(shapes)})")
    missing = [k for k in shapes if k not in packed]
    if missing:
        raise KeyError(f"task {task_id}: no packed mask for layers {missing} of bank {bank!r}")
    rows = []
    for layer, shape in shapes.items():
        arr = _as_numpy(packed[layer])
        numel = _numel(shape)
        nbytes = (numel + 7) // 8
        if arr.dtype != np.uint8:
            raise ValueError(f"task {task_id}: packed mask of layer {layer!r} has dtype "
                             f"{arr.dtype}; pack the 0/1 mask with supsup.masks.pack_bits or "
                             "numpy.packbits first")
        if arr.ndim != 1:
            raise ValueError(f"task {task_id}: packed mask of layer {layer!r} has shape "
                             f"{arr.shape}; pack the flattened mask (numpy.packbits(mask.ravel())) "
                             "into one row of bytes")
        if arr.size != nbytes:
            raise ValueError(f"task {task_id}: packed mask of layer {layer!r} has {arr.size} "
                             f"bytes, expected {nbytes} = ceil({numel} weights of shape "
                             f"{tuple(shape)} / 8)")
        pad = nbytes * 8 - numel
        if pad and int(arr[-1]) & ((1 << pad) - 1):
            raise ValueError(f"task {task_id}: packed mask of layer {layer!r} has padding bits "
                             "set past its last weight; pack with zero padding (pack_bits does)")
        data = arr.tobytes()
        rows.append(_Row(layer, "mask", tuple(shape), _count_ones(arr) / numel,
                         data, row_checksum(task_id, layer, "mask", shape, data)))
    stats = dict(bn_stats or {})
    if feats and bn_stats is None:
        raise ValueError(f"task {task_id}: bank {bank!r} has BatchNorm layers {list(feats)}; "
                         "pass bn_stats with a (2, C) running mean and variance per layer")
    extra = sorted(set(stats) - set(feats))
    if extra:
        raise ValueError(f"task {task_id}: BN stats for {extra}, which are not BatchNorm layers of "
                         f"bank {bank!r} (its BN layers: {list(feats)})")
    for layer, c in feats.items():
        if layer not in stats:
            raise KeyError(f"task {task_id}: no BN stats for layer {layer!r} of bank {bank!r}")
        arr = _as_numpy(stats[layer])
        if arr.shape != (2, c):
            raise ValueError(f"task {task_id}: BN stats of layer {layer!r} have shape {arr.shape}, "
                             f"expected (2, {c}) (running mean, running var)")
        arr = arr.astype("<f4")
        if not np.isfinite(arr).all():
            raise ValueError(f"task {task_id}: BN stats of layer {layer!r} are not all finite")
        data = arr.tobytes()
        rows.append(_Row(layer, "bn", (2, c), math.nan, data,
                         row_checksum(task_id, layer, "bn", (2, c), data)))
    return rows


def _rows_table(bank: str, task_id: int, rows: Sequence[_Row]) -> pa.Table:
    return pa.table({
        "bank": [bank] * len(rows),
        "task_id": [task_id] * len(rows),
        "layer": [r.layer for r in rows],
        "kind": [r.kind for r in rows],
        "shape": [list(r.shape) for r in rows],
        "density": [r.density for r in rows],
        "data": [r.data for r in rows],
        "sha256": [r.sha256 for r in rows],
    }, schema=SCHEMA)


def _check_schema(schema: pa.Schema) -> None:
    for f in SCHEMA:
        i = schema.get_field_index(f.name)
        if i < 0 or not schema.field(i).type.equals(f.type):
            raise _Problem(f"column {f.name!r} is missing or not {f.type} "
                           f"(columns: {schema.names})")


def _decode_row(task_id: int, manifest: Mapping[str, Any], row: Mapping[str, Any]) -> _Row:
    """One stored row checked against the manifest and its checksum; _Problem otherwise."""
    layer, kind, data = row["layer"], row["kind"], row["data"]
    shape = tuple(int(d) for d in row["shape"] or ())
    if kind == "mask":
        want = manifest["layer_shapes"].get(layer)
        numel = _numel(shape)
        size = (numel + 7) // 8
    elif kind == "bn":
        c = manifest["bn_features"].get(layer)
        want = None if c is None else [2, c]
        size = 8 * (c or 0)
    else:
        raise _Problem(f"row for layer {layer!r} has unknown kind {kind!r}")
    if want is None:
        raise _Problem(f"{kind} row for layer {layer!r}, which the manifest does not list")
    if list(shape) != list(want):
        raise _Problem(f"{kind} row for layer {layer!r} has shape {list(shape)}, manifest says "
                       f"{want}")
    if data is None or len(data) != size:
        raise _Problem(f"{kind} row for layer {layer!r} holds {0 if data is None else len(data)} "
                       f"bytes, expected {size}")
    if row_checksum(task_id, layer, kind, shape, data) != row["sha256"]:
        raise _Problem(f"checksum mismatch in the {kind} of layer {layer!r} (the stored bytes "
                       "changed after they were written)")
    density = row["density"]
    if kind == "mask":
        ones = _count_ones(np.frombuffer(data, np.uint8))
        if density is None or not math.isclose(density, ones / numel, rel_tol=1e-12):
            raise _Problem(f"density of layer {layer!r} is {density}, its mask has {ones / numel}")
    return _Row(layer, kind, shape, math.nan if density is None else float(density), data,
                row["sha256"])


def _check_complete(manifest: Mapping[str, Any], rows: Sequence[_Row]) -> None:
    seen: set[tuple[str, str]] = set()
    for r in rows:
        if (r.kind, r.layer) in seen:
            raise _Problem(f"two {r.kind} rows for layer {r.layer!r}")
        seen.add((r.kind, r.layer))
    missing = [f"mask {k}" for k in manifest["layer_shapes"] if ("mask", k) not in seen]
    missing += [f"bn {k}" for k in manifest["bn_features"] if ("bn", k) not in seen]
    if missing:
        raise _Problem(f"missing layer rows: {missing}")


def _count_ones(packed: np.ndarray) -> int:
    """Set bits in packed bytes (padding bits are zero, so this counts kept weights)."""
    return int(_POPCOUNT[packed].sum(dtype=np.int64))


def _row_arrays(rows: Sequence[_Row]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    packed = {r.layer: np.frombuffer(r.data, np.uint8).copy() for r in rows if r.kind == "mask"}
    stats = {
        r.layer: np.frombuffer(r.data, "<f4").astype(np.float32).reshape(r.shape)
        for r in rows if r.kind == "bn"
    }
    return packed, stats


def _record(task_id: int, rows: Sequence[_Row], metadata: dict[str, Any]) -> TaskRecord:
    packed, stats = _row_arrays(rows)
    densities = {r.layer: r.density for r in rows if r.kind == "mask"}
    return TaskRecord(task_id, packed, stats, densities, metadata)


def _map(fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
    """`fn` over `items` in order, on a few threads (file reads release the GIL)."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(_IO_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


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



# ------------------------------------------------------------------- reservoir helpers
_RESERVOIR_FILE = "reservoir.parquet"
_KEY_RESERVOIR_META = b"supsup.reservoir_metadata"
_RESERVOIR_SCHEMA = pa.schema([
    ("name", pa.string()),  # "psi" or "pattern_sum"
    ("shape", pa.list_(pa.int64())),
    ("data", pa.large_binary()),  # float32 little-endian; psi exceeds 2 GiB from d ~ 16k
    ("sha256", pa.string()),
])
_RESERVOIR_WRITE_OPTIONS: dict[str, Any] = {
    "compression": "zstd", "use_dictionary": False, "write_page_checksum": True,
}


def _reservoir_shapes(bank: str, manifest: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Array shapes a reservoir of this bank must have, from its gated layers (all (d,))."""
    shapes = [tuple(int(v) for v in s) for s in manifest["layer_shapes"].values()]
    if any(len(s) != 1 for s in shapes) or len(set(shapes)) != 1:
        raise ValueError(
            f"bank {bank!r} has masked layers {manifest['layer_shapes']}; a reservoir needs a bank "
            "whose layers are gated units of one width d (layer shapes [d]), as the hopfield "
            "scenario creates")
    num_layers, d = len(shapes), shapes[0][0]
    return {"psi": (num_layers, d, d), "pattern_sum": (num_layers, d)}


def _reservoir_checksum(name: str, shape: Sequence[int], data: bytes) -> str:
    h = hashlib.sha256(json.dumps(["reservoir", name, [int(v) for v in shape]]).encode())
    h.update(b"\n")
    h.update(data)
    return h.hexdigest()


def _f32_bytes(arr: np.ndarray) -> bytes:
    return np.ascontiguousarray(arr, dtype="<f4").tobytes()


def _reservoir_rows(
    bank: str, manifest: Mapping[str, Any], arrays: Mapping[str, Any]
) -> list[tuple[str, tuple[int, ...], bytes, str]]:
    """Validated (name, shape, float32 bytes, sha256) rows; ValueError naming the array."""
    want = _reservoir_shapes(bank, manifest)
    if not isinstance(arrays, Mapping) or set(arrays) != set(want):
        got = sorted(arrays) if isinstance(arrays, Mapping) else type(arrays).__name__
        raise ValueError(f"a reservoir needs exactly the arrays {sorted(want)}, got {got}")
    d = want["pattern_sum"][1]
    rows = []
    for name in ("psi", "pattern_sum"):
        arr = _as_numpy(arrays[name])
        if tuple(arr.shape) != want[name]:
            raise ValueError(
                f"reservoir array {name!r} has shape {tuple(arr.shape)}, but bank {bank!r} has "
                f"{want[name][0]} gated layers of width d={d}, so it must be {want[name]}: build "
                "the reservoir with d equal to the gated network's hidden width")
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"reservoir array {name!r} has dtype {arr.dtype}; expected floats")
        if not np.isfinite(arr).all():
            raise ValueError(f"reservoir array {name!r} is not all finite")
        data = _f32_bytes(arr)
        rows.append((name, want[name], data, _reservoir_checksum(name, want[name], data)))
    return rows
