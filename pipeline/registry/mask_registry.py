"""The mask registry: banks of per-task packed supermasks under one root.

SupSup's whole learned state is one binary mask per task over a fixed random network (Section
3.1), plus per-task BatchNorm statistics for conv nets. Layout under the root (a local folder or
any pyarrow filesystem URI: s3://, gs://, mock://, ...):

    {root}/{bank}/_manifest.json                      the bank's identity (manifest.py)
    {root}/{bank}/tasks/task-{task_id:07d}.parquet     one file per task (task_file.py)
    {root}/{bank}/reservoir.parquet                   hopfield banks only (reservoir_registry.py)

Guarantees: files appear complete or not at all (store.py); a stored task is never replaced
(identical masks are "unchanged", different ones raise RegistryConflictError and keep the file);
a task file is only ever read under the manifest it was written under, so a bank with an edited
or missing manifest is an error everywhere, never adopted by a new configuration.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from pipeline.bank_source import BankSource, snapshot_hash
from pipeline.registry import reservoir_file
from pipeline.registry.manifest import (
    ADVICE,
    LEGACY_MANIFEST_FILE,
    MANIFEST_FILE,
    RECIPE,
    BankMismatchError,
    RegistryCorruptError,
    build_manifest,
    check_matches,
    manifest_sha256,
    parse_manifest,
)
from pipeline.registry.store import TMP_MARK, Store
from pipeline.registry.task_file import (
    WRITE_OPTIONS,
    TaskRecord,
    encode_rows,
    read_footer,
    read_task_file,
    recorded_identity,
    task_checksum,
    task_table,
)
from supsup.bank import describe_ids
from supsup.networks import NetworkSpec

logger = logging.getLogger(__name__)

IO_THREADS = 8  # Parquet reads release the GIL; threads hide object-store latency
_BANK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TASK_FILE = re.compile(r"task-(\d{7,})\.parquet")


class RegistryConflictError(ValueError):
    """A task already stored with different masks; the stored file was kept."""


@dataclass
class VerifyReport:
    """What `verify` found: good tasks, damaged ones, files that are not the bank's, and
    temporary files of writes in flight (or of killed writers)."""

    bank: str
    ok: list[int]
    problems: dict[int, str]
    foreign: list[str] = field(default_factory=list)
    temporary: list[str] = field(default_factory=list)
    manifest_problem: str | None = None
    recipe: dict[str, Any] | None = None  # how the masks were trained; None: not recorded
    reservoir: bool = False
    reservoir_problem: str | None = None

    @property
    def all_ok(self) -> bool:
        """True when the manifest, every task file and the reservoir (if any) passed and the
        bank folder holds nothing else (temporary files of writers in flight do not count)."""
        return (not self.problems and not self.foreign and self.manifest_problem is None
                and self.reservoir_problem is None)


def check_bank_name(bank: str) -> str:
    if not isinstance(bank, str) or not _BANK_NAME.fullmatch(bank):
        raise ValueError(
            f"bank name {bank!r} is not allowed: use letters, digits, '.', '_' and '-', starting "
            "with a letter or digit (it becomes a folder name)")
    return bank


def check_task_id(task_id: Any) -> int:
    if isinstance(task_id, bool) or not isinstance(task_id, (int, np.integer)) or task_id < 0:
        raise ValueError(f"task_id must be a non-negative integer, got {task_id!r}")
    return int(task_id)


def task_file_name(task_id: int) -> str:
    return f"task-{task_id:07d}.parquet"


def parallel_map(fn: Any, items: Sequence[Any]) -> list[Any]:
    """`fn` over `items` in order, on a few threads (file reads release the GIL)."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(IO_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


class MaskRegistry:
    """Banks of per-task packed masks under one root (local path or pyarrow filesystem URI)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.store = Store(root)
        self.root = self.store.root
        self._manifests: dict[str, dict[str, Any]] = {}  # a manifest never changes once written

    def __repr__(self) -> str:
        return f"MaskRegistry({self.root!r})"

    # ------------------------------------------------------------------------- paths
    def bank_dir(self, bank: str) -> str:
        return self.store.join(check_bank_name(bank))

    def task_path(self, bank: str, task_id: int) -> str:
        return self.store.join(check_bank_name(bank), "tasks", task_file_name(task_id))

    def where(self, bank: str) -> str:
        return f"bank {bank!r} in {self.root}"

    # ------------------------------------------------------------------------- banks
    def banks(self) -> list[str]:
        """Names of the banks under the root (folders holding a manifest), sorted."""
        names = [i.base_name for i in self.store.listdir(self.store.base)
                 if i.type == pafs.FileType.Directory and _BANK_NAME.fullmatch(i.base_name)]
        return sorted(n for n in names if self.store.exists(self.store.join(n, MANIFEST_FILE)))

    def create_bank(self, bank: str, network_spec: Mapping[str, Any] | NetworkSpec,
                    layer_shapes: Mapping[str, Sequence[int]],
                    bn_features: Mapping[str, int] | None,
                    mask_info: Mapping[str, Any], recipe: Mapping[str, Any] | None = None,
                    *, exact_recipe: bool = False) -> dict[str, Any]:
        """Write the bank's manifest, or check an existing one; returns the bank's manifest.

        BankMismatchError naming each differing value when the bank exists with another network,
        seed, layers or mask rule, or (given a training `recipe`) was trained with another recipe
        or before recipes were recorded; `exact_recipe` also refuses a bank with a recipe when
        none is given (see `check_matches`). A bank folder that holds task files (or a
        reservoir) but no manifest is refused: those files are never adopted under a new
        manifest.
        """
        wanted = build_manifest(check_bank_name(bank), network_spec, layer_shapes, bn_features,
                                mask_info, recipe)
        path = self.store.join(bank, MANIFEST_FILE)
        if not self.store.exists(path):
            self._refuse_orphans(bank)
            data = json.dumps(wanted, indent=1).encode()
            if self.store.publish_new(path, lambda out: out.write(data)):
                logger.info("created bank %r in %s", bank, self.root)
            self._manifests.pop(bank, None)
        stored = self.manifest(bank)
        check_matches(stored, wanted, self.where(bank), exact_recipe=exact_recipe)
        return stored

    def _refuse_orphans(self, bank: str) -> None:
        if self.store.exists(self.store.join(bank, LEGACY_MANIFEST_FILE)):
            raise RegistryCorruptError(
                f"{self.where(bank)} was written by an older registry format (manifest.json, "
                "task files that do not record their manifest); train it again under a new "
                "bank name (registry.bank)")
        tasks, _, _ = self._scan(bank)
        if tasks or self.store.exists(self.store.join(bank, reservoir_file.RESERVOIR_FILE)):
            raise RegistryCorruptError(
                f"{self.where(bank)} holds {len(tasks)} task files but no {MANIFEST_FILE}: "
                "restore the manifest they were written under, or move the folder "
                f"{self.bank_dir(bank)} away; files without their manifest are never adopted")

    def manifest(self, bank: str) -> dict[str, Any]:
        """The bank's manifest (a copy); KeyError listing the banks present for an unknown bank."""
        if bank not in self._manifests:
            path = self.store.join(check_bank_name(bank), MANIFEST_FILE)
            try:
                raw = self.store.read_bytes(path)
            except FileNotFoundError:
                if self.store.exists(self.store.join(bank, "tasks")):
                    self._refuse_orphans(bank)
                present = self.banks()
                raise KeyError(
                    f"no bank {bank!r} in the registry at {self.root}; banks present: "
                    f"{present if present else 'none'} (`supsup train` creates one)") from None
            manifest = parse_manifest(path, bank, raw)
            manifest["manifest_sha256"] = manifest_sha256(manifest)
            self._manifests[bank] = manifest
        return copy.deepcopy(self._manifests[bank])

    def manifest_hash(self, bank: str) -> str:
        return self.manifest(bank)["manifest_sha256"]

    def tasks(self, bank: str) -> list[int]:
        """Task ids with a file in `bank`, sorted (from the listing; files are not read)."""
        self.manifest(bank)
        return sorted(self._scan(bank)[0])

    def stored_bytes(self, bank: str) -> int:
        """Bytes of the bank's task files, from the listing (to decide whether to embed them)."""
        return sum(int(i.size or 0) for i in self.store.listdir(self.store.join(bank, "tasks"))
                   if _TASK_FILE.fullmatch(i.base_name))

    def _scan(self, bank: str) -> tuple[dict[int, str], list[str], list[str]]:
        """({task_id: path}, foreign names, temporary names) of the bank's folder."""
        found: dict[int, str] = {}
        foreign: list[str] = []
        temporary: list[str] = []
        known = {MANIFEST_FILE, reservoir_file.RESERVOIR_FILE, "tasks"}
        for info in self.store.listdir(self.bank_dir(bank)):
            name = info.base_name
            if TMP_MARK in name:
                temporary.append(name)
            elif name not in known:
                foreign.append(name)
        for info in self.store.listdir(self.store.join(bank, "tasks")):
            name = info.base_name
            m = _TASK_FILE.fullmatch(name)
            if TMP_MARK in name:
                temporary.append(f"tasks/{name}")
            elif (m and info.type == pafs.FileType.File
                  and name == task_file_name(int(m.group(1)))):
                found[int(m.group(1))] = info.path
            else:
                foreign.append(f"tasks/{name}")
        return found, sorted(foreign), sorted(temporary)

    # ------------------------------------------------------------------------ tasks
    def write_task(self, bank: str, task_id: int,
                   packed: Mapping[str, np.ndarray | torch.Tensor],
                   bn_stats: Mapping[str, np.ndarray | torch.Tensor] | None = None,
                   metadata: Mapping[str, Any] | None = None) -> str:
        """Store one task's packed masks (and BN stats); "written" or "unchanged".

        `packed[layer]` is the flattened mask packed with supsup.masks.pack_bits or numpy.packbits
        ((ceil(numel / 8),) uint8); `bn_stats[layer]` is (2, C) running mean and variance.
        Everything is validated against the manifest before anything touches the disk.
        RegistryConflictError when the task is stored with different masks (the stored file stays).
        """
        task_id = check_task_id(task_id)
        manifest = self.manifest(bank)
        digest = manifest["manifest_sha256"]
        rows = encode_rows(bank, task_id, manifest, packed, bn_stats)
        tbl = task_table(bank, task_id, rows, digest, metadata)
        mine = task_checksum(digest, task_id, rows)
        final = self.task_path(bank, task_id)
        if self.store.exists(final):
            return self._compare_stored(bank, task_id, final, mine)
        published = self.store.publish_new(final, lambda out: pq.write_table(tbl, out,
                                                                            **WRITE_OPTIONS))
        if not published or not self.store.exclusive:  # lost the race, or no create-if-absent
            status = self._compare_stored(bank, task_id, final, mine)
            if not published:
                return status
        logger.debug("wrote task %d of bank %r", task_id, bank)
        return "written"

    def _compare_stored(self, bank: str, task_id: int, path: str, mine: str) -> str:
        stored = self.read_task(bank, task_id)
        if stored.task_sha256 == mine:
            return "unchanged"
        raise RegistryConflictError(
            f"bank {bank!r} already holds task {task_id} with different masks; the stored mask "
            f"was kept at {path}. Masks are never replaced: write these to a new bank name (e.g. "
            f"'{bank}-v2'), or move the stored file away by hand if it is the wrong one.")

    def read_task(self, bank: str, task_id: int) -> TaskRecord:
        """One task, every checksum verified; RegistryCorruptError names the file and problem."""
        task_id = check_task_id(task_id)
        manifest = self.manifest(bank)
        try:
            return read_task_file(self.store, self.task_path(bank, task_id), bank, task_id,
                                  manifest, manifest["manifest_sha256"])
        except FileNotFoundError:
            raise self._missing(bank, [task_id]) from None

    def _missing(self, bank: str, missing: Sequence[int]) -> KeyError:
        return KeyError(f"{self.where(bank)} lacks {describe_ids(missing)}; it holds "
                        f"{describe_ids(self.tasks(bank)) or 'no tasks'}")

    def select(self, bank: str, task_ids: Iterable[int] | None) -> list[int]:
        """`task_ids` checked against the bank (all stored tasks when None), sorted."""
        present = self.tasks(bank)
        if task_ids is None:
            return present
        ids = [check_task_id(t) for t in task_ids]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate task ids requested from bank {bank!r}: "
                             f"{describe_ids(ids)}")
        missing = sorted(set(ids) - set(present))
        if missing:
            raise self._missing(bank, missing)
        return sorted(ids)

    def source(self, bank: str, task_ids: Iterable[int] | None = None) -> BankSource:
        """The bank's current content as a BankSource (all tasks, or `task_ids`).

        Reads only the task files' footers, so it is cheap on the driver; every loader verifies
        the rows against it. BankMismatchError naming the files written under another manifest.
        """
        digest = self.manifest_hash(bank)
        checks = self.checksums(bank, task_ids)
        return BankSource(bank, digest, snapshot_hash(digest, checks), tuple(checks),
                          root=self.root)

    def checksums(self, bank: str, task_ids: Iterable[int] | None = None) -> dict[int, str]:
        """{task_id: task_sha256} of the bank's tasks (all, or `task_ids`) in id order, from the
        footers alone: what a snapshot hash is made of (e.g. one range of a sharded bank)."""
        manifest = self.manifest(bank)
        digest = manifest["manifest_sha256"]
        ids = self.select(bank, task_ids)
        footers = parallel_map(lambda t: recorded_identity(
            read_footer(self.store, self.task_path(bank, t))), ids)
        wrong = [t for t, (name, tid, under, _) in zip(ids, footers)
                 if (name, tid, under) != (bank, str(t), digest)]
        if wrong:
            raise BankMismatchError(
                f"{self.where(bank)}: the task files of {describe_ids(wrong)} were written for "
                f"another bank or task, or under another manifest than the bank's "
                f"{MANIFEST_FILE} (was it edited, or were files copied in by hand, e.g. from a "
                f"bank trained with another recipe?); they are never adopted. {ADVICE}")
        return {t: task for t, (_, _, _, task) in zip(ids, footers)}

    # ----------------------------------------------------------------------- verify
    def verify(self, bank: str) -> VerifyReport:
        """Check the manifest and every file of `bank`; reports problems instead of raising."""
        check_bank_name(bank)
        found, foreign, temporary = self._scan(bank)
        report = VerifyReport(bank, [], {}, foreign, temporary)
        try:
            self._manifests.pop(bank, None)
            report.recipe = self.manifest(bank).get(RECIPE)
        except (RegistryCorruptError, KeyError) as exc:
            report.manifest_problem = str(exc.args[0] if isinstance(exc, KeyError) else exc)
            return report

        def check(tid: int) -> str | None:
            try:
                self.read_task(bank, tid)
            except (RegistryCorruptError, KeyError) as exc:
                return str(exc).replace(f"; {ADVICE}", "")  # verify is what the advice says
            return None

        ids = sorted(found)
        for tid, problem in zip(ids, parallel_map(check, ids)):
            if problem is None:
                report.ok.append(tid)
            else:
                report.problems[tid] = problem
        # A hopfield bank's reservoir (reservoir_registry.py publishes it) is checked here too.
        path = self.store.join(bank, reservoir_file.RESERVOIR_FILE)
        report.reservoir = self.store.exists(path)
        if report.reservoir:
            manifest = self.manifest(bank)
            try:
                reservoir_file.read(self.store, path, bank, manifest, manifest["manifest_sha256"])
            except (RegistryCorruptError, FileNotFoundError) as exc:
                report.reservoir_problem = str(exc)
        return report
