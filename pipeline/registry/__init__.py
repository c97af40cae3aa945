"""The mask registry: where workers write each task's packed supermask and every loader reads it.

The only pyarrow importer. Split by file and concern, each depending on the ones above it:
- store: one resolved root, atomic first-writer-wins publication (local disk and object stores);
- manifest: a bank's identity and its hash;
- task_file: the Parquet format of one task's masks, and their checksums;
- reservoir_file: the constant-size Hopfield reservoir of a hopfield bank;
- mask_registry: `MaskRegistry`, banks and their tasks, verify, and a bank's current BankSource;
- reservoir_registry: `ReservoirRegistry`, a hopfield bank's reservoir published and read;
- transfer: bank files (exports), publication in one pass, import;
- loading: `load_bank(source)`, the one loader, which checks the content against the source.
"""

from pipeline.registry.loading import check_snapshot, load_bank, read_manifest
from pipeline.registry.manifest import (
    FORMAT,
    MANIFEST_FILE,
    BankMismatchError,
    RegistryCorruptError,
    check_matches,
)
from pipeline.registry.mask_registry import MaskRegistry, RegistryConflictError, VerifyReport
from pipeline.registry.reservoir_registry import ReservoirRegistry
from pipeline.registry.task_file import TaskRecord, row_checksum
from pipeline.registry.transfer import ImportResult, export_bank, import_file

__all__ = [
    "FORMAT",
    "MANIFEST_FILE",
    "BankMismatchError",
    "ImportResult",
    "MaskRegistry",
    "RegistryConflictError",
    "RegistryCorruptError",
    "ReservoirRegistry",
    "TaskRecord",
    "VerifyReport",
    "check_matches",
    "check_snapshot",
    "export_bank",
    "import_file",
    "load_bank",
    "read_manifest",
    "row_checksum",
]
