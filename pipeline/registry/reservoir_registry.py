"""The reservoirs of hopfield banks in a mask registry: one constant-size file per bank.

A bank of the hopfield scenario stores no task files: its whole state is `reservoir.parquet`
beside the bank's manifest (the format is reservoir_file.py). This module publishes and reads that
file with the registry's guarantees: it appears complete or not at all, is only read under the
manifest it was written under, and a different reservoir never silently replaces a stored one.
It sits on top of the mask registry (banks, manifests, the store), which knows nothing of it
beyond the file's name and its check in `verify`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.registry import reservoir_file
from pipeline.registry.mask_registry import MaskRegistry, RegistryConflictError, check_bank_name

logger = logging.getLogger(__name__)


class ReservoirRegistry:
    """The reservoir files of the banks of `registry` (whose manifests they are read under)."""

    def __init__(self, registry: MaskRegistry) -> None:
        self.registry = registry
        self.store = registry.store

    def __repr__(self) -> str:
        return f"ReservoirRegistry({self.registry.root!r})"

    def path(self, bank: str) -> str:
        return self.store.join(check_bank_name(bank), reservoir_file.RESERVOIR_FILE)

    def exists(self, bank: str) -> bool:
        """Whether `bank` holds a Hopfield reservoir file."""
        return self.store.exists(self.path(bank))

    def write(self, bank: str, arrays: Mapping[str, np.ndarray | torch.Tensor],
              metadata: Mapping[str, Any] | None = None, *, overwrite: bool = False) -> str:
        """Store the bank's reservoir; "written", "unchanged" or (overwrite=True) "replaced".

        `arrays` holds exactly "psi" (num_layers, d, d) and "pattern_sum" (num_layers, d), stored
        as float32, so the file has the same size whatever number of patterns it holds. An
        existing reservoir with other arrays is kept and RegistryConflictError raised unless
        `overwrite`.
        """
        manifest = self.registry.manifest(bank)
        rows = reservoir_file.encode(bank, manifest, arrays)
        tbl = reservoir_file.table(rows, manifest["manifest_sha256"], metadata)
        final = self.path(bank)

        def write(out: Any) -> None:
            reservoir_file.write_table(out, tbl)

        if self.store.exists(final):
            if reservoir_file.same(rows, self.read(bank)[0]):
                return "unchanged"
            if not overwrite:
                raise self._conflict(bank, final)
            self.store.replace(final, write)
            logger.info("replaced the reservoir of bank %r", bank)
            return "replaced"
        published = self.store.publish_new(final, write)
        if not published or not self.store.exclusive:
            if not reservoir_file.same(rows, self.read(bank)[0]):
                raise self._conflict(bank, final)
            if not published:
                return "unchanged"
        logger.info("wrote the reservoir of bank %r", bank)
        return "written"

    def _conflict(self, bank: str, path: str) -> RegistryConflictError:
        return RegistryConflictError(
            f"bank {bank!r} already holds a different reservoir at {path} (it was kept). A "
            "reservoir holds every stored task at once: pass overwrite=True to replace it with "
            f"this one, or write to a new bank name (e.g. '{bank}-v2').")

    def read(self, bank: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """({"psi": (L, d, d), "pattern_sum": (L, d)} float32, metadata), checksums verified.

        FileNotFoundError when the bank holds no reservoir; RegistryCorruptError naming the file
        when it is damaged or was written under another manifest.
        """
        manifest = self.registry.manifest(bank)
        return reservoir_file.read(self.store, self.path(bank), bank, manifest,
                                   manifest["manifest_sha256"])

    def copy(self, bank: str, dest_path: str | os.PathLike[str]) -> Path:
        """Copy the (verified) reservoir file to a local path, e.g. to log it as an artifact."""
        self.read(bank)
        dest = Path(dest_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(self.store.read_bytes(self.path(bank)))
        return dest
