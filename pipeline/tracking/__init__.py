"""MLflow for SupSup runs and banks: the only package that imports mlflow.

- client: tracking URIs and clients (SQLite files or an `mlflow server`);
- runs: `Tracker`, the driver's runs, params, metrics and artifacts;
- pyfunc: `SupSupModel`, a registered bank as a pyfunc model that infers tasks;
- model_registry: registering a bank's content once;
- versions: what a version holds and pins, its lineage, the evaluations recorded onto it.
"""

from pipeline.paths import resolve_tracking_uri
from pipeline.tracking.model_registry import Registration, register_bank
from pipeline.tracking.pyfunc import BANK_FILE, MODEL_JSON, SupSupModel
from pipeline.tracking.runs import PARAM_VALUE_LIMIT, Tracker
from pipeline.tracking.versions import (
    load_bank_from_model,
    lookup,
    model_source,
    record_evaluation,
    run_config_text,
)

__all__ = [
    "BANK_FILE",
    "MODEL_JSON",
    "PARAM_VALUE_LIMIT",
    "Registration",
    "SupSupModel",
    "Tracker",
    "load_bank_from_model",
    "lookup",
    "model_source",
    "record_evaluation",
    "register_bank",
    "resolve_tracking_uri",
    "run_config_text",
]
