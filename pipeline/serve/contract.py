"""What a served bank accepts: pixels, their scale, the inference parameters; one contract for
`mlflow models serve` (pipeline.tracking.pyfunc) and `supsup serve` (pipeline.serve.app).

Inputs are rows flattened to (B, prod(input_shape)) or images (B, *input_shape), any real dtype
(float64 is cast to float32). Their scale is named by `input_scale`: "normalized" as training saw
them (the data set's mean/std), or raw pixels "0-1" / "0-255", normalised here with the mean/std
the model records. Values a scale cannot hold (raw 0-255 digits sent as normalised) are refused,
so a wrong scale is a named error instead of task ids at chance confidence.

Every refusal is an `InputError` whose message names the field and what to send instead; it never
quotes the input's values, and quotes a parameter's value cut to a few dozen characters, so an
error answer stays small whatever was sent.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from supsup.inference import METHODS, MODES
from supsup.objectives import OBJECTIVES

log = logging.getLogger(__name__)

INPUT_SCALES = ("normalized", "0-1", "0-255")
INFERENCE_CHOICES: dict[str, tuple[str, ...]] = {"method": tuple(METHODS),
                                                 "objective": tuple(OBJECTIVES),
                                                 "mode": tuple(MODES)}
# Served answers infer each row's task on its own: a request mixing tasks gets each row's task.
INFERENCE_DEFAULTS = {"method": "one_shot", "objective": "entropy", "mode": "per_example"}
PARAMS = (*INFERENCE_CHOICES, "input_scale")
_SHOWN_CHARS = 40
# Raw pixels may overshoot their range a little (resampling, rounding); beyond this fraction of
# the range they are not pixels of that scale.
_SCALE_SLACK = 0.05


class InputError(ValueError):
    """A bad input or parameter: servers answer 400 with this message."""


def shown(value: Any) -> str:
    """repr(value), cut to a few dozen characters: a message may name a value, never carry it."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "...'"


@dataclass(frozen=True)
class Options:
    """How to answer one request: inference method, objective, mode, and the inputs' scale."""

    method: str
    objective: str
    mode: str
    input_scale: str = INPUT_SCALES[0]

    def inference(self) -> dict[str, str]:
        return {"method": self.method, "objective": self.objective, "mode": self.mode}


def read_params(params: Mapping[str, Any] | None, defaults: Mapping[str, str]) -> Options:
    """The request's Options: `params` over the model's `defaults`; None values keep the
    default. InputError naming an unknown parameter or a value outside its choices."""
    if params is not None and not isinstance(params, Mapping):
        raise InputError(f"params must be an object of names to strings, got "
                         f"{type(params).__name__}")
    chosen = {**INFERENCE_DEFAULTS, **defaults, "input_scale": INPUT_SCALES[0]}
    for key, value in (params or {}).items():
        if key not in PARAMS:
            raise InputError(f"unknown param {shown(key)}; known: {sorted(PARAMS)}")
        if value is None:
            continue
        choices = INPUT_SCALES if key == "input_scale" else INFERENCE_CHOICES[key]
        if value not in choices:
            raise InputError(f"param {key}={shown(value)}; choose one of {choices}")
        chosen[key] = value
    return Options(**chosen)


def as_batch(model_input: Any, input_shape: Sequence[int]) -> torch.Tensor:
    """(B, *input_shape) float32 from rows (B, prod(shape)) or images, of any real dtype.

    Accepts numpy arrays, tensors, pandas DataFrames (their values) and nested lists (JSON).
    InputError naming the shape or dtype expected otherwise, or when a value is not finite."""
    if hasattr(model_input, "to_numpy"):  # a pandas DataFrame
        model_input = model_input.to_numpy()
    if isinstance(model_input, torch.Tensor):
        model_input = model_input.detach().cpu().numpy()
    try:
        arr = np.asarray(model_input)
    except (ValueError, TypeError):
        arr = np.asarray(model_input, dtype=object)
    shape = tuple(int(d) for d in input_shape)
    flat = math.prod(shape)
    expected = f"(B, {flat}) flattened rows or (B, {', '.join(map(str, shape))}) images"
    if arr.dtype.kind not in "fiub":
        what = "ragged rows or non-numbers" if arr.dtype.kind == "O" else f"dtype {arr.dtype}"
        raise InputError(f"inputs must be numbers shaped {expected}; got {what}")
    if arr.ndim == 2 and arr.shape[1] == flat:
        arr = arr.reshape(arr.shape[0], *shape)
    elif arr.ndim != 1 + len(shape) or tuple(arr.shape[1:]) != shape:
        got = str(arr.shape) if arr.ndim <= 6 else f"of {arr.ndim} dimensions"
        raise InputError(f"inputs have shape {got}; expected {expected}")
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if not bool(torch.isfinite(x).all()):
        raise InputError("inputs hold NaN or infinite values")
    return x


def _scale_range(scale: str, norm: Mapping[str, Any] | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (low, high) that pixels of `scale` can hold."""
    if scale == "0-1":
        return np.zeros(1), np.ones(1)
    if scale == "0-255":
        return np.zeros(1), np.full(1, 255.0)
    mean = np.asarray(norm["mean"], dtype=np.float64)  # type: ignore[index]
    std = np.asarray(norm["std"], dtype=np.float64)  # type: ignore[index]
    return (0.0 - mean) / std, (1.0 - mean) / std


def check_scale(x: torch.Tensor, scale: str, norm: Mapping[str, Any] | None) -> None:
    """InputError naming input_scale when `x` (B, C, ...) holds values that pixels of `scale`
    cannot (0-255 digits sent as normalised or 0-1); a warning when 0-255 inputs all lie in
    [0, 1] (likely 0-1 pixels). Normalised inputs are checked only when the model records the
    normalisation of its training data."""
    if x.numel() == 0 or (scale == "normalized" and norm is None):
        return
    low, high = _scale_range(scale, norm)
    channels = x.shape[1] if x.dim() > 2 else 1
    per_channel = x.transpose(0, 1).reshape(channels, -1) if x.dim() > 2 else x.reshape(1, -1)
    lo_seen = per_channel.amin(1).double().numpy()
    hi_seen = per_channel.amax(1).double().numpy()
    slack = _SCALE_SLACK * (high - low)
    if low.size not in (1, channels):
        return  # the recorded statistics do not describe these channels; nothing to check
    if bool(((lo_seen < low - slack) | (hi_seen > high + slack)).any()):
        span = f"[{float(low.min()):.3g}, {float(high.max()):.3g}]"
        if scale == "normalized":
            span += f" ({norm.get('dataset', 'the training data')} normalised)"  # type: ignore[union-attr]
        guess = ("0-1" if lo_seen.min() >= -slack.max() and hi_seen.max() <= 1 + slack.max()
                 else "0-255" if lo_seen.min() >= 0 and hi_seen.max() <= 255 * (1 + _SCALE_SLACK)
                 else None)
        hint = (f"send input_scale={guess!r} for these pixels" if guess and guess != scale
                else "send pixels in that range, or name their scale with input_scale")
        raise InputError(f"inputs hold values outside {span}, the range of "
                         f"input_scale={scale!r}; {hint} (one of {INPUT_SCALES})")
    if scale == "0-255" and float(hi_seen.max()) <= 1.0 and float(hi_seen.max()) > 0:
        log.warning("input_scale='0-255' but every value lies in [0, 1]: if these are 0-1 "
                    "pixels, send input_scale='0-1'")


def normalize(x: torch.Tensor, scale: str, norm: Mapping[str, Any] | None) -> torch.Tensor:
    """Inputs of `scale` in the normalised units training used, after `check_scale`; raw scales
    need the mean/std the model records (`norm`), else InputError."""
    if scale not in INPUT_SCALES:
        raise InputError(f"param input_scale={shown(scale)}; choose one of {INPUT_SCALES}")
    if scale != "normalized" and norm is None:
        raise InputError(
            f"input_scale={scale!r}: this model does not record the normalisation of its "
            "training data; send normalised inputs (input_scale='normalized')")
    check_scale(x, scale, norm)
    if scale == "normalized":
        return x
    if scale == "0-255":
        x = x / 255.0
    shape = (1, len(norm["mean"])) + (1,) * (x.dim() - 2)  # type: ignore[index]
    mean = torch.tensor(norm["mean"], dtype=x.dtype).view(shape)  # type: ignore[index]
    std = torch.tensor(norm["std"], dtype=x.dtype).view(shape)  # type: ignore[index]
    return (x - mean) / std
