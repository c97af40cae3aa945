"""The task file: one task's packed supermasks (and BN statistics) as one Parquet file.

`{root}/{bank}/tasks/task-{task_id:07d}.parquet` holds one row per masked parameter ("mask") and
per BatchNorm layer ("bn"). How `data` is packed and what `sha256` covers is written into the
Parquet schema's field metadata, so a reader needs no code from this project (a test decodes a
mask with numpy alone). The file's key-value metadata records:
- `supsup.manifest_sha256`: the hash of the bank manifest it was written under, which covers the
  training recipe. A file read under any other manifest (an edited manifest, a file copied in
  from another bank, one of the same name, seed and network trained with other steps included)
  is refused;
- `supsup.task_sha256`: the task's checksum, a hash of that manifest hash, the task id and every
  row's sha256; a bank snapshot's hash is built from these;
- `supsup.task_metadata`: informational per-task values (accuracy, seconds, ...), outside every
  checksum, so a deterministic rerun with other timings is "unchanged".
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.registry.manifest import (
    ADVICE,
    FORMAT,
    RegistryCorruptError,
    canonical,
    layer_key,
    param_name,
)
from pipeline.registry.store import Store

KEY_FORMAT = b"supsup.registry_format"
KEY_BANK = b"supsup.bank"
KEY_TASK_ID = b"supsup.task_id"
KEY_MANIFEST_SHA = b"supsup.manifest_sha256"
KEY_TASK_SHA = b"supsup.task_sha256"
KEY_TASK_META = b"supsup.task_metadata"

_PACKING = (
    "kind=mask: the 0/1 mask of the parameter named in `layer`, flattened in row-major (C) order "
    "of `shape`, packed 8 weights per byte with the first weight in the most significant bit "
    "(numpy.packbits, bitorder='big'); the last byte's unused low bits are zero. "
    "kind=bn: float32 little-endian, shape (2, C): running mean, then running variance.")
_CHECKSUM = (
    "hex sha256 of the UTF-8 bytes of json.dumps([task_id, layer, kind, shape]) (separators "
    "', '), then one newline byte, then the `data` bytes")
SCHEMA = pa.schema([
    pa.field("bank", pa.string()),
    pa.field("task_id", pa.int64()),
    pa.field("layer", pa.string(), metadata={
        b"description": b"kind=mask: name of the masked parameter (e.g. fc1.weight); "
                        b"kind=bn: module path of the BatchNorm layer"}),
    pa.field("kind", pa.string(), metadata={b"description": b"mask or bn"}),
    pa.field("shape", pa.list_(pa.int64())),
    pa.field("density", pa.float64(), metadata={
        b"description": b"fraction of ones in the mask; NaN for bn rows"}),
    pa.field("data", pa.binary(), metadata={b"packing": _PACKING.encode()}),
    pa.field("sha256", pa.string(), metadata={b"covers": _CHECKSUM.encode()}),
])
WRITE_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "use_dictionary": ["bank", "layer", "kind"],
    "write_statistics": ["task_id", "layer", "kind"],
    "write_page_checksum": True,
}
_POPCOUNT = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)


class FileProblem(Exception):
    """What is wrong with a file's contents, before the file's name is attached."""


@dataclass(frozen=True)
class Row:
    """One stored row; `layer` is the stored name (a parameter name for masks)."""

    layer: str
    kind: str
    shape: tuple[int, ...]
    density: float
    data: bytes
    sha256: str


@dataclass
class TaskRecord:
    """One task as stored, keyed as the network keys its layers: packed masks (nbytes,) uint8
    and BN stats (2, C) float32 per layer."""

    task_id: int
    packed: dict[str, np.ndarray]
    bn_stats: dict[str, np.ndarray]
    densities: dict[str, float]
    metadata: dict[str, Any] = field(default_factory=dict)
    task_sha256: str = ""


def row_checksum(task_id: int, layer: str, kind: str, shape: Sequence[int], data: bytes) -> str:
    """Hex sha256 of one row: a JSON header (task id, layer, kind, shape), a newline, the bytes.

    The bank name is left out so that a bank imported under another name keeps its checksums.
    """
    header = json.dumps([int(task_id), layer, kind, [int(d) for d in shape]])
    h = hashlib.sha256(header.encode())
    h.update(b"\n")
    h.update(data)
    return h.hexdigest()


def task_checksum(manifest_hash: str, task_id: int, rows: Sequence[Row]) -> str:
    """The task's checksum: its manifest's hash, its id and its rows' checksums."""
    entries = sorted([r.kind, r.layer, r.sha256] for r in rows)
    return hashlib.sha256(json.dumps([manifest_hash, int(task_id), entries]).encode()).hexdigest()


def count_ones(packed: np.ndarray) -> int:
    """Set bits in packed bytes (padding bits are zero, so this counts kept weights)."""
    return int(_POPCOUNT[packed].sum(dtype=np.int64))


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def encode_rows(bank: str, task_id: int, manifest: Mapping[str, Any],
                packed: Mapping[str, Any], bn_stats: Mapping[str, Any] | None) -> list[Row]:
    """Validated rows of one task (masks in manifest order, then BN); ValueError/KeyError else.

    `packed` and `bn_stats` are keyed as the network keys its layers ("fc1", "bn1").
    """
    shapes = {layer_key(p): s for p, s in manifest["layer_shapes"].items()}
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
        numel = math.prod(shape)
        nbytes = (numel + 7) // 8
        if arr.dtype != np.uint8 or arr.ndim != 1:
            raise ValueError(f"task {task_id}: packed mask of layer {layer!r} is {arr.dtype} of "
                             f"shape {arr.shape}; pack the flattened 0/1 mask into one row of "
                             "bytes with supsup.masks.pack_bits or numpy.packbits(mask.ravel())")
        if arr.size != nbytes:
            raise ValueError(f"task {task_id}: packed mask of layer {layer!r} has {arr.size} "
                             f"bytes, expected {nbytes} = ceil({numel} weights of shape "
                             f"{tuple(shape)} / 8)")
        pad = nbytes * 8 - numel
        if pad and int(arr[-1]) & ((1 << pad) - 1):
            raise ValueError(f"task {task_id}: packed mask of layer {layer!r} has padding bits "
                             "set past its last weight; pack with zero padding (pack_bits does)")
        data, name = arr.tobytes(), param_name(layer)
        rows.append(Row(name, "mask", tuple(shape), count_ones(arr) / numel, data,
                        row_checksum(task_id, name, "mask", shape, data)))
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
        rows.append(Row(layer, "bn", (2, c), math.nan, data,
                        row_checksum(task_id, layer, "bn", (2, c), data)))
    return rows


def rows_table(bank: str, task_id: int, rows: Sequence[Row]) -> pa.Table:
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


def task_table(bank: str, task_id: int, rows: Sequence[Row], manifest_hash: str,
               metadata: Mapping[str, Any] | None) -> pa.Table:
    """The table of one task file, with its manifest hash, checksum and metadata attached."""
    if metadata is not None and not isinstance(metadata, Mapping):
        raise ValueError(f"task {task_id}: metadata must be a mapping, got {type(metadata)}")
    meta = json.dumps(canonical(dict(metadata or {}), f"task {task_id} metadata"))
    return rows_table(bank, task_id, rows).replace_schema_metadata({
        KEY_FORMAT: str(FORMAT).encode(), KEY_BANK: bank.encode(),
        KEY_TASK_ID: str(task_id).encode(), KEY_MANIFEST_SHA: manifest_hash.encode(),
        KEY_TASK_SHA: task_checksum(manifest_hash, task_id, rows).encode(),
        KEY_TASK_META: meta.encode(),
    })


def check_schema(schema: pa.Schema) -> None:
    for f in SCHEMA:
        i = schema.get_field_index(f.name)
        if i < 0 or not schema.field(i).type.equals(f.type):
            raise FileProblem(f"column {f.name!r} is missing or not {f.type} "
                              f"(columns: {schema.names})")


def decode_row(task_id: int, manifest: Mapping[str, Any], row: Mapping[str, Any]) -> Row:
    """One stored row checked against the manifest and its checksum; FileProblem otherwise."""
    layer, kind, data = row["layer"], row["kind"], row["data"]
    shape = tuple(int(d) for d in row["shape"] or ())
    if kind == "mask":
        want = manifest["layer_shapes"].get(layer)
        size = (math.prod(shape) + 7) // 8
    elif kind == "bn":
        c = manifest["bn_features"].get(layer)
        want = None if c is None else [2, c]
        size = 8 * (c or 0)
    else:
        raise FileProblem(f"row for layer {layer!r} has unknown kind {kind!r}")
    if want is None:
        raise FileProblem(f"{kind} row for layer {layer!r}, which the manifest does not list")
    if list(shape) != list(want):
        raise FileProblem(f"{kind} row for layer {layer!r} has shape {list(shape)}, manifest "
                          f"says {want}")
    if data is None or len(data) != size:
        raise FileProblem(f"{kind} row for layer {layer!r} holds {0 if data is None else len(data)}"
                          f" bytes, expected {size}")
    if row_checksum(task_id, layer, kind, shape, data) != row["sha256"]:
        raise FileProblem(f"checksum mismatch in the {kind} of layer {layer!r} (the stored bytes "
                          "changed after they were written)")
    density = row["density"]
    if kind == "mask":
        numel = math.prod(shape)
        ones = count_ones(np.frombuffer(data, np.uint8))
        if density is None or not math.isclose(density, ones / numel, rel_tol=1e-12):
            raise FileProblem(f"density of layer {layer!r} is {density}, its mask has "
                              f"{ones / numel}")
    return Row(layer, kind, shape, math.nan if density is None else float(density), data,
               row["sha256"])


def check_complete(manifest: Mapping[str, Any], rows: Sequence[Row]) -> None:
    seen: set[tuple[str, str]] = set()
    for r in rows:
        if (r.kind, r.layer) in seen:
            raise FileProblem(f"two {r.kind} rows for layer {r.layer!r}")
        seen.add((r.kind, r.layer))
    missing = [f"mask {k}" for k in manifest["layer_shapes"] if ("mask", k) not in seen]
    missing += [f"bn {k}" for k in manifest["bn_features"] if ("bn", k) not in seen]
    if missing:
        raise FileProblem(f"missing layer rows: {missing}")


def record(task_id: int, rows: Sequence[Row], metadata: dict[str, Any],
           task_sha256: str) -> TaskRecord:
    """A TaskRecord keyed as the network keys its layers."""
    packed = {layer_key(r.layer): np.frombuffer(r.data, np.uint8).copy()
              for r in rows if r.kind == "mask"}
    stats = {r.layer: np.frombuffer(r.data, "<f4").astype(np.float32).reshape(r.shape)
             for r in rows if r.kind == "bn"}
    densities = {layer_key(r.layer): r.density for r in rows if r.kind == "mask"}
    return TaskRecord(task_id, packed, stats, densities, metadata, task_sha256)


def recorded_identity(kv: Mapping[bytes, bytes]) -> tuple[str, str, str, str]:
    """(bank, task id, manifest_sha256, task_sha256) a task file's metadata records, as text
    ("" when absent)."""
    return tuple(kv.get(k, b"").decode()  # type: ignore[return-value]
                 for k in (KEY_BANK, KEY_TASK_ID, KEY_MANIFEST_SHA, KEY_TASK_SHA))


def read_footer(store: Store, path: str) -> dict[bytes, bytes]:
    """A task file's key-value metadata, from its footer alone."""
    try:
        with store.open_input(path) as f:
            return dict(pq.ParquetFile(f).metadata.metadata or {})
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise RegistryCorruptError(
            f"{path}: unreadable or truncated Parquet file ({exc}); {ADVICE}") from None


def read_task_file(store: Store, path: str, bank: str, task_id: int,
                   manifest: Mapping[str, Any], manifest_hash: str) -> TaskRecord:
    """One task file read whole and verified: page CRCs, schema, every row's checksum, the
    manifest it was written under and its task checksum. RegistryCorruptError naming the file."""
    try:
        with store.open_input(path) as f:
            pf = pq.ParquetFile(f, page_checksum_verification=True)
            table, kv = pf.read(), dict(pf.metadata.metadata or {})
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise RegistryCorruptError(
            f"{path}: unreadable or truncated Parquet file ({exc}); {ADVICE}") from None
    try:
        written_for, written_as, written_under, recorded = recorded_identity(kv)
        if (written_for, written_as) != (bank, str(task_id)):
            raise FileProblem(f"written for bank {written_for!r} task {written_as}, not bank "
                              f"{bank!r} task {task_id} (was the file copied here by hand?); it "
                              "is never adopted")
        if written_under != manifest_hash:
            raise FileProblem(
                f"written under manifest {written_under[:12] or '<none>'}, but bank {bank!r} has "
                f"manifest {manifest_hash[:12]}: the manifest was edited after this file was "
                "written, or the file belongs to another bank (or one trained with another "
                "recipe); it is never adopted (restore the manifest, or move the file out of the "
                "bank)")
        check_schema(table.schema)
        cols = table.to_pydict()
        rows = []
        for i in range(table.num_rows):
            if cols["bank"][i] != bank or cols["task_id"][i] != task_id:
                raise FileProblem(
                    f"row {i} belongs to bank {cols['bank'][i]!r} task {cols['task_id'][i]}, "
                    f"not bank {bank!r} task {task_id} (was the file copied here by hand?)")
            rows.append(decode_row(task_id, manifest, {k: v[i] for k, v in cols.items()}))
        check_complete(manifest, rows)
        checksum = task_checksum(manifest_hash, task_id, rows)
        if checksum != recorded:
            raise FileProblem(f"task checksum {recorded[:12] or '<none>'} recorded, rows give "
                              f"{checksum[:12]}")
        metadata = json.loads(kv.get(KEY_TASK_META, b"{}"))
    except (FileProblem, json.JSONDecodeError) as exc:
        raise RegistryCorruptError(f"{path}: {exc}; {ADVICE}") from None
    return record(task_id, rows, metadata, checksum)
