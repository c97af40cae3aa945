"""`load_bank(source)`: the only way a mask bank is loaded, and it checks what it loads.

Whether the masks come from the mask registry or from a bank file (e.g. the one embedded in an
MLflow model version), every task file is verified row by row, the manifest must be the one the
source names, and the snapshot hash of exactly the source's tasks must equal the source's: a
model version therefore always means the same masks, and refuses to load once the registry no
longer holds them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from pipeline.bank_source import BankSource, snapshot_hash
from pipeline.registry.manifest import BankMismatchError, layer_shapes
from pipeline.registry.mask_registry import MaskRegistry, parallel_map
from pipeline.registry.task_file import TaskRecord
from pipeline.registry.transfer import CHUNK, iter_export, read_export_manifest
from supsup.bank import MaskBank, describe_ids
from supsup.networks import NetworkSpec


def read_manifest(source: BankSource) -> dict[str, Any]:
    """The manifest of the source's bank (its identity fields and `manifest_sha256`), checked
    against the hash the source names. Reads no task file."""
    if source.export is not None:
        manifest = read_export_manifest(source.export)
    else:
        manifest = MaskRegistry(source.root).manifest(source.bank)  # type: ignore[arg-type]
    if manifest["manifest_sha256"] != source.manifest_sha256:
        raise BankMismatchError(
            f"{source.describe()}: the manifest there hashes to "
            f"{manifest['manifest_sha256'][:12]}, not {source.manifest_sha256[:12]}; the bank was "
            "replaced or its manifest edited since this source was made")
    return manifest


def _records(source: BankSource, manifest: dict[str, Any]) -> Iterable[list[TaskRecord]]:
    """The source's task records in chunks, verified as they are read."""
    wanted = set(source.task_ids)
    if source.root is not None:
        registry = MaskRegistry(source.root)
        try:
            registry.select(source.bank, source.task_ids)
        except KeyError as exc:
            raise BankMismatchError(f"{source.describe()}: {exc.args[0]}; the registry no longer "
                                    "holds this content") from None
        for start in range(0, source.num_tasks, CHUNK):
            chunk = source.task_ids[start:start + CHUNK]
            yield parallel_map(lambda t: registry.read_task(source.bank, t), chunk)
        return
    _, records = iter_export(source.export)  # type: ignore[arg-type]
    chunk: list[TaskRecord] = []
    for rec in records:
        if rec.task_id in wanted:
            chunk.append(rec)
            if len(chunk) == CHUNK:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


@functools.lru_cache(maxsize=2)
def _cached(source: BankSource, device: str) -> tuple[MaskBank, NetworkSpec]:
    return load_bank(source, device)


def load_bank(source: BankSource, device: torch.device | str = "cpu",
              *, cache: bool = False) -> tuple[MaskBank, NetworkSpec]:
    """The MaskBank (rows in the source's task order) and base NetworkSpec of `source`.

    BankMismatchError naming the source when the content differs from its hashes or tasks are
    missing; RegistryCorruptError naming the file when a file is damaged. With `cache`, a process
    (e.g. a Ray worker evaluating many groups) loads each source once per device and hands
    every caller the same bank: callers must not change it (`MaskBank.to` makes a new bank).
    """
    if cache:
        return _cached(source, str(torch.device(device)))
    manifest = read_manifest(source)
    spec = NetworkSpec.from_dict(manifest["network"])
    shapes = layer_shapes(manifest)
    out = MaskBank(shapes, manifest["bn_features"], device)
    checks: dict[int, str] = {}
    for records in _records(source, manifest):
        records.sort(key=lambda r: r.task_id)
        for rec in records:
            checks[rec.task_id] = rec.task_sha256
        packed = {k: torch.from_numpy(np.stack([r.packed[k] for r in records])) for k in shapes}
        stats = {k: torch.from_numpy(np.stack([r.bn_stats[k] for r in records]))
                 for k in manifest["bn_features"]}
        out.extend_packed([r.task_id for r in records], packed, stats or None)
    missing = sorted(set(source.task_ids) - set(checks))
    if missing:
        raise BankMismatchError(f"{source.describe()}: {describe_ids(missing)} are not "
                                "there; the bank file does not hold this content")
    check_snapshot(source, checks)
    return out, spec


def check_snapshot(source: BankSource, checks: Mapping[int, str],
                   masks: str = "the masks there") -> None:
    """BankMismatchError naming the source unless the task checksums read (`checks`, task id ->
    task_sha256) hash to the source's snapshot; `masks` says where they were read, e.g. "its
    shards' masks". Whoever loads a source, whole or in ranges, checks it here."""
    snapshot = snapshot_hash(source.manifest_sha256, checks)
    if snapshot != source.snapshot_sha256:
        raise BankMismatchError(
            f"{source.describe()}: {masks} hash to {snapshot[:12]}; a task was rewritten since "
            "this snapshot was taken, so it is refused (register or evaluate the bank as it is "
            "now)")
