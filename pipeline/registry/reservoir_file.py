"""The reservoir file: a Hopfield reservoir bank's whole state in one constant-size Parquet file.

A bank of the hopfield scenario stores no task files: its masks (neuron gates, one (d,) vector per
gated layer listed in the manifest) live superimposed in `{root}/{bank}/reservoir.parquet`, one row
per array: "psi" (num_layers, d, d) and "pattern_sum" (num_layers, d), float32 little-endian
bytes with a sha256 per row, plus JSON metadata (patterns stored, task ids, ...) and the hash of
the manifest the file was written under. It depends on the store; reservoir_registry.py publishes
and reads it, and the mask registry's `verify` checks it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.registry.manifest import FORMAT, RegistryCorruptError, canonical
from pipeline.registry.store import Store
from pipeline.registry.task_file import KEY_FORMAT, KEY_MANIFEST_SHA, FileProblem

RESERVOIR_FILE = "reservoir.parquet"
_KEY_META = b"supsup.reservoir_metadata"
_ADVICE = "rewrite the reservoir (rerun the hopfield job into a new bank)"
SCHEMA = pa.schema([
    ("name", pa.string()),  # "psi" or "pattern_sum"
    ("shape", pa.list_(pa.int64())),
    ("data", pa.large_binary()),  # float32 little-endian; psi exceeds 2 GiB from d ~ 16k
    ("sha256", pa.string()),
])
_WRITE_OPTIONS: dict[str, Any] = {
    "compression": "zstd", "use_dictionary": False, "write_page_checksum": True,
}
Rows = list[tuple[str, tuple[int, ...], bytes, str]]


def reservoir_shapes(bank: str, manifest: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Array shapes a reservoir of this bank must have, from its gated layers (all (d,))."""
    shapes = [tuple(int(v) for v in s) for s in manifest["layer_shapes"].values()]
    if any(len(s) != 1 for s in shapes) or len(set(shapes)) != 1:
        raise ValueError(
            f"bank {bank!r} has masked layers {manifest['layer_shapes']}; a reservoir needs a bank "
            "whose layers are gated units of one width d (layer shapes [d]), as the hopfield "
            "scenario creates")
    num_layers, d = len(shapes), shapes[0][0]
    return {"psi": (num_layers, d, d), "pattern_sum": (num_layers, d)}


def _checksum(name: str, shape: Sequence[int], data: bytes) -> str:
    h = hashlib.sha256(json.dumps(["reservoir", name, [int(v) for v in shape]]).encode())
    h.update(b"\n")
    h.update(data)
    return h.hexdigest()


def _f32_bytes(arr: np.ndarray) -> bytes:
    return np.ascontiguousarray(arr, dtype="<f4").tobytes()


def encode(bank: str, manifest: Mapping[str, Any], arrays: Mapping[str, Any]) -> Rows:
    """Validated (name, shape, float32 bytes, sha256) rows; ValueError naming the array."""
    want = reservoir_shapes(bank, manifest)
    if not isinstance(arrays, Mapping) or set(arrays) != set(want):
        got = sorted(arrays) if isinstance(arrays, Mapping) else type(arrays).__name__
        raise ValueError(f"a reservoir needs exactly the arrays {sorted(want)}, got {got}")
    d = want["pattern_sum"][1]
    rows = []
    for name in ("psi", "pattern_sum"):
        value = arrays[name]
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
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
        rows.append((name, want[name], data, _checksum(name, want[name], data)))
    return rows


def table(rows: Rows, manifest_hash: str, metadata: Mapping[str, Any] | None) -> pa.Table:
    if metadata is not None and not isinstance(metadata, Mapping):
        raise ValueError(f"reservoir metadata must be a mapping, got {type(metadata)}")
    meta = json.dumps(canonical(dict(metadata or {}), "reservoir metadata")).encode()
    return pa.table({
        "name": [r[0] for r in rows], "shape": [list(r[1]) for r in rows],
        "data": [r[2] for r in rows], "sha256": [r[3] for r in rows],
    }, schema=SCHEMA).replace_schema_metadata({
        KEY_FORMAT: str(FORMAT).encode(), KEY_MANIFEST_SHA: manifest_hash.encode(),
        _KEY_META: meta,
    })


def write_table(out: Any, tbl: pa.Table) -> None:
    pq.write_table(tbl, out, **_WRITE_OPTIONS)


def same(rows: Rows, stored: Mapping[str, np.ndarray]) -> bool:
    theirs = {name: _checksum(name, a.shape, _f32_bytes(a)) for name, a in stored.items()}
    return {r[0]: r[3] for r in rows} == theirs


def read(store: Store, path: str, bank: str, manifest: Mapping[str, Any],
         manifest_hash: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """({"psi", "pattern_sum"} float32 arrays, metadata), every checksum verified."""
    try:
        with store.open_input(path) as f:
            pf = pq.ParquetFile(f, page_checksum_verification=True)
            tbl, kv = pf.read(), dict(pf.metadata.metadata or {})
    except FileNotFoundError:
        raise FileNotFoundError(
            f"bank {bank!r} in {store.root} holds no reservoir ({path}); the hopfield scenario "
            "writes one (ReservoirRegistry.write)") from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise RegistryCorruptError(f"{path}: unreadable or truncated Parquet file ({exc}); "
                                   f"{_ADVICE}") from None
    try:
        if kv.get(KEY_MANIFEST_SHA, b"").decode() != manifest_hash:
            raise FileProblem(f"written under another manifest than bank {bank!r} has now (the "
                              "manifest was edited, or the file belongs to another bank)")
        want = reservoir_shapes(bank, manifest)
        for f in SCHEMA:
            i = tbl.schema.get_field_index(f.name)
            if i < 0 or not tbl.schema.field(i).type.equals(f.type):
                raise FileProblem(f"column {f.name!r} is missing or not {f.type}")
        arrays: dict[str, np.ndarray] = {}
        for row in tbl.to_pylist():
            name, data = row["name"], row["data"]
            shape = tuple(int(v) for v in row["shape"] or ())
            if name not in want or name in arrays:
                raise FileProblem(f"unexpected or repeated array {name!r}")
            if shape != want[name]:
                raise FileProblem(f"array {name!r} has shape {shape}, the manifest's gated layers "
                                  f"give {want[name]}")
            if data is None or len(data) != 4 * math.prod(shape):
                raise FileProblem(f"array {name!r} holds {0 if data is None else len(data)} "
                                  f"bytes, expected {4 * math.prod(shape)}")
            if _checksum(name, shape, data) != row["sha256"]:
                raise FileProblem(f"checksum mismatch in array {name!r} (the stored bytes "
                                  "changed after they were written)")
            arrays[name] = np.frombuffer(data, "<f4").astype(np.float32).reshape(shape)
        missing = sorted(set(want) - set(arrays))
        if missing:
            raise FileProblem(f"missing arrays {missing}")
        metadata = json.loads(kv.get(_KEY_META, b"{}"))
    except (FileProblem, json.JSONDecodeError) as exc:
        raise RegistryCorruptError(f"{path}: {exc}; {_ADVICE}") from None
    return arrays, metadata
