"""Publishing a trained bank: one pass over its task files, then at most one new model version.

The pass (`pipeline.registry.export_bank`) reads each task file once, verifies it, writes the bank
file that small banks embed in their model, and yields the BankSource of exactly what it read. The
model registry then registers that content unless a version of the model already holds it.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.bank_source import BankSource
from pipeline.config import ExperimentConfig
from pipeline.registry import MaskRegistry, export_bank

log = logging.getLogger(__name__)


@dataclass
class Publication:
    """The bank's content as published, and the model version that holds it (if registered)."""

    source: BankSource
    registration: Any = None  # pipeline.tracking.Registration


def publish_bank(config: ExperimentConfig, tracker: Any, run_id: str | None) -> Publication:
    """Verify the config's bank in one pass and register it when the config asks for it."""
    registry = MaskRegistry(config.registry.root)
    if not (config.tracking.register_model and run_id is not None and tracker is not None):
        return Publication(registry.source(config.bank))
    from pipeline.tracking import register_bank

    embed = registry.stored_bytes(config.bank) <= config.tracking.embed_masks_max_bytes
    e = config.evaluate
    with tempfile.TemporaryDirectory(prefix="supsup-publish-") as tmp:
        bank_file = Path(tmp) / f"{config.bank}.parquet" if embed else None
        source = export_bank(registry, config.bank, bank_file)
        registration = register_bank(
            tracker, run_id, config.model_name, source, bank_file=bank_file,
            # The evaluation's mode decides a test batch's task (the paper's protocol); a served
            # request may mix tasks, so the model keeps its own default (per_example).
            inference_defaults={"method": e.method, "objective": e.objective},
            aliases=[config.tracking.latest_alias], tags={"experiment": config.name})
    return Publication(source, registration)
