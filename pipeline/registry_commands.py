"""The `supsup registry` subcommands: list, verify, import and export the banks of a mask
registry. Reads and writes through `pipeline.registry` only; no MLflow, no Ray."""

from __future__ import annotations

from pathlib import Path

from pipeline.summaries import Format


def registry_ls(root: str, bank: str | None, fmt: Format = "table") -> int:
    from pipeline.preflight import check_registry_exists
    from pipeline.registry import MaskRegistry
    from pipeline.summaries import bank_entry, bank_line, emit

    check_registry_exists(root)
    registry = MaskRegistry(root)
    banks = [bank] if bank else registry.banks()
    entries = [bank_entry(b, registry.tasks(b), registry.manifest(b)) for b in banks]
    lines = [bank_line(e) for e in entries] or [f"no banks under {registry.root}"]
    emit(lines, {"root": registry.root, "banks": entries}, fmt)
    return 0


def registry_verify(root: str, bank: str, fmt: Format = "table") -> int:
    """0 when every file of the bank checks out, 1 otherwise; the first problems of each kind
    are named (json: all of them)."""
    from pipeline.registry import MaskRegistry
    from pipeline.registry.manifest import describe_recipe
    from pipeline.summaries import emit, verify_data, verify_lines

    report = MaskRegistry(root).verify(bank)
    recipe = describe_recipe(report.recipe)
    emit(verify_lines(report, recipe), verify_data(report, recipe), fmt)
    return 0 if report.all_ok else 1


def registry_import(root: str, path: str, bank: str | None, fmt: Format = "table") -> int:
    """A bank file (from `registry export` or a model version) into the registry at `root`:
    every row verified; masks already stored under the same task id must be identical."""
    from pipeline.registry import MaskRegistry, import_file
    from pipeline.summaries import emit, import_data, import_lines

    if not Path(path).is_file() and "://" not in path:
        raise FileNotFoundError(f"bank file {path} does not exist; write one with `supsup "
                                "registry export BANK --dest FILE`")
    registry = MaskRegistry(root)
    result = import_file(registry, path, bank)
    emit(import_lines(result, path, registry.root), import_data(result, path, registry.root),
         fmt)
    return 0


def registry_export(root: str, bank: str, dest: str) -> int:
    from pipeline.registry import MaskRegistry, export_bank

    source = export_bank(MaskRegistry(root), bank, Path(dest))
    print(f"exported {source.describe()} to {dest}")
    return 0
