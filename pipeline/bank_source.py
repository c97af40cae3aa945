"""The one value a mask bank travels as: which bank, where, and exactly what content.

A `BankSource` is made once on the driver (from the registry, from a publication pass, or from a
model version's description) with its root already resolved, then passed as it is to Ray workers,
to the MLflow model and to lookups. It names its content by hash, so whoever loads it
(`pipeline.registry.load_bank`, the only loader) checks that it gets exactly that content:

- `manifest_sha256`: the hash of the bank's manifest (network spec and seed, layer shapes, BN
  layers, mask rule, task family and data set, and the training recipe where it is recorded);
- `snapshot_sha256`: a hash over the manifest hash and the checksums of the listed tasks, in id
  order (`snapshot_hash`), so a model version pinned to tasks 0-1 still loads after the bank grew
  to 4 tasks, and refuses to load once task 0 or 1 changed.

The masks are read from the mask registry at `root`, or from `export`, a bank file (a registry
export, e.g. embedded in an MLflow model) holding them. Pure data: no I/O here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from supsup.bank import describe_ids

_HEX64 = re.compile(r"[0-9a-f]{64}")


def snapshot_hash(manifest_sha256: str, task_sha256: Mapping[int, str]) -> str:
    """The content hash of a bank restricted to some tasks: their checksums in id order."""
    h = hashlib.sha256(f"supsup-bank-snapshot\n{manifest_sha256}\n".encode())
    for task_id in sorted(task_sha256):
        h.update(f"{int(task_id)} {task_sha256[task_id]}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class BankSource:
    """Bank name, content hashes, task ids, and where the masks are (a registry root or a file)."""

    bank: str
    manifest_sha256: str
    snapshot_sha256: str
    task_ids: tuple[int, ...]
    root: str | None = None
    export: str | None = None

    def __post_init__(self) -> None:
        ids = tuple(int(t) for t in self.task_ids)
        if list(ids) != sorted(set(ids)) or any(t < 0 for t in ids):
            raise ValueError(f"bank source {self.bank!r}: task ids must be distinct, non-negative "
                             f"and sorted, got {describe_ids(ids)}")
        object.__setattr__(self, "task_ids", ids)
        for name in ("manifest_sha256", "snapshot_sha256"):
            if not _HEX64.fullmatch(str(getattr(self, name))):
                raise ValueError(f"bank source {self.bank!r}: {name} must be 64 hex digits, got "
                                 f"{getattr(self, name)!r}")
        if (self.root is None) == (self.export is None):
            raise ValueError(f"bank source {self.bank!r}: give exactly one of root (a mask "
                             "registry) and export (a bank file)")

    @property
    def num_tasks(self) -> int:
        return len(self.task_ids)

    @property
    def short(self) -> str:
        """The snapshot hash's first 12 digits, for messages and tags."""
        return self.snapshot_sha256[:12]

    def describe(self) -> str:
        where = f"the mask registry at {self.root}" if self.root else f"the bank file {self.export}"
        return (f"bank {self.bank!r} ({describe_ids(self.task_ids)}, snapshot {self.short}) "
                f"in {where}")

    def with_location(self, *, root: str | None = None, export: str | None = None) -> BankSource:
        """The same content read from elsewhere (a downloaded bank file, another registry)."""
        return dataclasses.replace(self, root=root, export=export)

    def restricted(self, task_ids: Iterable[int], snapshot_sha256: str) -> BankSource:
        """The same bank restricted to `task_ids`, whose snapshot hash the caller computed."""
        return dataclasses.replace(self, task_ids=tuple(sorted(task_ids)),
                                   snapshot_sha256=snapshot_sha256)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for a model's description); `export` is local to one machine and is
        left out."""
        return {"bank": self.bank, "manifest_sha256": self.manifest_sha256,
                "snapshot_sha256": self.snapshot_sha256, "task_ids": list(self.task_ids),
                "root": self.root}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], export: str | None = None) -> BankSource:
        """Inverse of `to_dict`; with `export`, the masks are read from that file instead."""
        try:
            return cls(bank=str(data["bank"]), manifest_sha256=str(data["manifest_sha256"]),
                       snapshot_sha256=str(data["snapshot_sha256"]),
                       task_ids=tuple(data["task_ids"]),
                       root=None if export else data.get("root"), export=export)
        except KeyError as exc:
            raise ValueError(f"bank source description lacks {exc.args[0]!r}: {dict(data)}"
                             ) from None
