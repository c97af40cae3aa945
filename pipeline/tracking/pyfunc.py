"""The registered model: a mask bank as an MLflow pyfunc that infers the task, then classifies.

`SupSupModel` rebuilds the fixed random network from its seed (Section 3.1) and loads the bank
named by the model's description (`model.json`: a BankSource, network, mask rule, inference
defaults) through `pipeline.registry.load_bank`, which checks the masks against the registered
snapshot. `predict` infers each input's task from the gradient of the objective with respect to the
superposition coefficients (Section 3.3), then classifies with the inferred task's mask.

A model is logged as code, not as a pickle: MLflow stores `model_code.py` (which makes a fresh
`SupSupModel`) and runs it at load time, with `supsup` and `pipeline` shipped beside it as source
(`code_paths`); the model's data is `model.json` and, when embedded, the bank file. Loading a
model therefore never unpickles anything, and what it computes is the reviewed source it carries.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModelContext
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from pipeline.bank_source import BankSource
from pipeline.registry import load_bank
from pipeline.serve.answer import Answerer
from pipeline.serve.contract import (
    INFERENCE_CHOICES,
    INFERENCE_DEFAULTS,
    INPUT_SCALES,
    InputError,
    as_batch,
    normalize,
    read_params,
)
from pipeline.tracking.client import quiet
from supsup.networks import NetworkSpec, SupermaskNet, build_network

MODEL_FORMAT = 2
MODEL_KIND = "supsup-mask-bank"
MODEL_JSON = "model.json"
BANK_FILE = "bank.parquet"
MODEL_CODE = "model_code.py"  # MLflow copies it to the model's root under this name


class ModelInputError(MlflowException, ValueError):
    """A bad input or parameter: MLflow's scoring server answers 400 with this message (not a 500
    with a traceback), and local callers can catch it as a ValueError."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def model_bank_source(info: Mapping[str, Any], bank_file: str | None = None) -> BankSource:
    """The BankSource a model description pins: read from `bank_file` (the embedded masks,
    downloaded) when given, else from the mask registry it names."""
    return BankSource.from_dict(info["source"], export=bank_file)


def check_inference_defaults(given: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(INFERENCE_DEFAULTS)
    for key, value in (given or {}).items():
        if key not in INFERENCE_CHOICES:
            raise ValueError(f"inference_defaults: unknown key {key!r}; known: "
                             f"{sorted(INFERENCE_CHOICES)}")
        if value not in INFERENCE_CHOICES[key]:
            raise ValueError(f"inference_defaults[{key!r}] = {value!r}; choose one of "
                             f"{INFERENCE_CHOICES[key]}")
        out[key] = value
    return out


def signature(spec: NetworkSpec, defaults: Mapping[str, str]) -> ModelSignature:
    """No input schema: MLflow's tensor check wants one exact dtype (float64 refused where
    float32 is declared) and quotes the data in its error; `predict` checks inputs itself
    (pipeline.serve.contract: rows of prod(input_shape) values, any real dtype, named errors
    that never quote the input). Out: task_id, class and confidence per row; params: the
    inference options and `input_scale`: "normalized" (as in training, the default), "0-1" or
    "0-255"."""
    del spec  # the shape is checked by the contract, against the bank's network
    return ModelSignature(
        inputs=None,
        outputs=Schema([ColSpec("long", "task_id"), ColSpec("long", "class"),
                        ColSpec("double", "confidence")]),
        params=ParamSchema([ParamSpec(k, "string", v) for k, v in defaults.items()]
                           + [ParamSpec("input_scale", "string", INPUT_SCALES[0])]),
    )


def input_normalization(dataset: str | None) -> dict[str, list[float]] | None:
    """The per-channel mean/std the model's training data was normalised with, for model.json
    (None for a data set without a known normalisation: raw inputs are then refused)."""
    from pipeline.datasets import NORMALIZATION

    if dataset not in NORMALIZATION:
        return None
    mean, std = NORMALIZATION[dataset]
    return {"dataset": dataset, "mean": list(mean), "std": list(std)}


def pip_requirements() -> list[str]:
    """The packages the model needs at load time (given, so MLflow does not load it to guess)."""
    import pyarrow

    def pin(name: str, version: str) -> str:
        return f"{name}=={version.split('+')[0]}"

    return [pin("mlflow", mlflow.__version__), pin("torch", torch.__version__),
            pin("numpy", np.__version__), pin("pandas", pd.__version__),
            pin("pyarrow", pyarrow.__version__)]


def model_code_path() -> str:
    """The file MLflow logs as the model (models-from-code): it defines the model by running
    `mlflow.models.set_model(SupSupModel())`, so no object is pickled into the artifact store
    and nothing is unpickled when a version is loaded."""
    return str(Path(__file__).with_name(MODEL_CODE))


def code_paths() -> list[str]:
    """supsup and pipeline travel with the model, so a bare environment can load it.

    MLflow puts the model's copy of them first on sys.path before it runs the model file, so
    `model_code.py`'s import of `pipeline.tracking.pyfunc` finds them in a fresh process; a process
    that already imported `pipeline` keeps using the modules it has."""
    import pipeline
    import supsup

    return [str(Path(supsup.__file__).parent), str(Path(pipeline.__file__).parent)]


MODEL_JSON_KEY = "model_json_sha256"  # in the logged model's metadata (its MLmodel file)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (model.json is small: read whole)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_model_json(path: str | os.PathLike[str]) -> None:
    """ValueError naming model.json when its bytes are not the ones logged with the model (the
    hash in the model's MLmodel metadata, beside the version's `supsup.model_json` tag): an
    edited description (another input mean, another bank) would load and answer wrongly.

    `path` is model.json inside a model folder (`<model>/artifacts/model.json`, as MLflow hands
    artifacts to `load_context`); a model logged before descriptions were hashed is not
    checked."""
    mlmodel = Path(path).parent.parent / "MLmodel"
    if not mlmodel.is_file():
        return
    recorded = (mlflow.models.Model.load(str(mlmodel)).metadata or {}).get(MODEL_JSON_KEY)
    if recorded is None:
        return
    actual = file_sha256(path)
    if actual != recorded:
        raise ValueError(
            f"{path}: {MODEL_JSON} hashes to {actual[:12]}, but the model was registered with "
            f"{recorded[:12]}; its description was edited after registration, so the model is "
            "refused (restore model.json, or register the bank again)")


class SupSupModel(mlflow.pyfunc.PythonModel):
    """A registered mask bank: infers each input's task, then classifies with that task's mask.

    Input: rows flattened to (B, prod(input_shape)) (the signature's form, also as a DataFrame
    of that many columns), float32 or float64; called directly, `predict` also takes
    (B, *input_shape). Normalised as in training by default; with param input_scale "0-1" or
    "0-255", raw pixels, normalised here with the training data's mean/std that model.json
    records; values the scale cannot hold are refused (pipeline.serve.contract).
    Output: a DataFrame with task_id, class and confidence per row.
    Params: method (one_shot | binary), objective (entropy | g), mode (per_example: one task per
    row, the default; batch | one_image: one task per call); defaults come from the
    registration. `supsup serve` answers through the same `Answerer`.
    """

    def load_context(self, context: PythonModelContext) -> None:
        """Rebuild the base network from its seed, and load exactly the registered masks: from the
        embedded bank file, or from the registry, which must still hold the pinned snapshot."""
        quiet()
        check_model_json(context.artifacts["model_json"])
        info = read_model_json(context.artifacts["model_json"])
        self.info = info
        self.source = model_bank_source(info, context.artifacts.get("bank"))
        self.bank, self.spec = load_bank(self.source)
        self.defaults = dict(info["inference_defaults"])
        self.net: SupermaskNet = build_network(self.spec).eval()
        self.input = info.get("input")  # mean/std of the training data, when known
        self._lock = threading.Lock()  # bindings are installed on the shared network per call

    def predict(self, context: PythonModelContext, model_input: np.ndarray,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Task, class and confidence for each row of `model_input` (see the class docstring)."""
        try:
            options = read_params(params, self.defaults)
            x = normalize(as_batch(model_input, self.spec.input_shape), options.input_scale,
                          getattr(self, "input", None))
        except InputError as exc:
            raise ModelInputError(str(exc)) from None
        with self._lock:
            if getattr(self, "_answerer", None) is None:
                self._answerer = Answerer(self.net, self.bank)
            answers = self._answerer.predict(x, options.inference())
        return pd.DataFrame({"task_id": answers.task_ids.numpy().astype(np.int64),
                             "class": answers.classes.numpy().astype(np.int64),
                             "confidence": answers.confidence.numpy().astype(np.float64)})


def read_model_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        info = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable model description ({exc})") from None
    if not isinstance(info, dict) or info.get("kind") != MODEL_KIND:
        raise ValueError(f"{path} does not describe a SupSup mask bank model")
    if info.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: model format {info.get('format')!r} is not supported (this "
                         f"version reads format {MODEL_FORMAT}); upgrade supsup-pipeline")
    return info
