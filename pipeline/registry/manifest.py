"""A bank's manifest: what every mask of the bank is defined against, and its content hash.

The manifest (`{root}/{bank}/_manifest.json`; Arrow's dataset readers skip names starting with
"_", so the bank folder reads as one Parquet dataset) holds the base network's spec and seed
(Section 3.1: only the seed is stored, never the weights), the masked parameters and their
shapes, the BatchNorm layers, the mask rule and the task family and data set, and the training
recipe (`recipe`: steps or epochs, optimiser, learning rate and schedule, batch size, precision,
fused step, ...: every setting that changes the trained bits). Its hash (`manifest_sha256`)
covers exactly those fields: neither the bank's name (an exported bank imported under another
name keeps its identity) nor its creation time. Every task file records the hash of the manifest
it was written under, so an edited manifest, or a task file from another bank (one trained with
another recipe included), is detected wherever the bank is read.

The recipe is additive: banks written before it was recorded have no `recipe` field, their hash
is computed exactly as before and they load and verify unchanged, but nothing is added to them
(how their masks were trained is unknown).

Masked layers are keyed by the name of the parameter their mask multiplies ("fc1.weight"), BN
layers by their module path ("bn1"), never by positions inside a Sequential.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from supsup.networks import NetworkSpec

FORMAT = 2
MANIFEST_FILE = "_manifest.json"
LEGACY_MANIFEST_FILE = "manifest.json"
IDENTITY_FIELDS = ("format", "network", "layer_shapes", "bn_features", "mask")
RECIPE = "recipe"  # hashed when present; absent from banks written before it was recorded
_RECIPE_SHORT = {"batch_size": "batch", "data_parallel_workers": "workers",
                 "weight_decay": "wd", "warmup_steps": "warmup"}
_MAX_BANK = 128  # a bank name's most characters (mask_registry's _BANK_NAME)
_WEIGHT = ".weight"
ADVICE = "run `supsup registry verify` on the bank to list every damaged task"


class RegistryCorruptError(ValueError):
    """A registry file is unreadable, truncated, fails its checksums or belongs elsewhere."""


class BankMismatchError(ValueError):
    """A config, or the files of a bank, disagree with the bank's manifest."""


def param_name(layer: str) -> str:
    """The parameter a masked layer's mask multiplies, as stored: "fc1" -> "fc1.weight"."""
    return f"{layer}{_WEIGHT}"


def layer_key(param: str) -> str:
    """The network's layer key of a stored parameter name: "fc1.weight" -> "fc1"."""
    if not param.endswith(_WEIGHT):
        raise RegistryCorruptError(f"masked parameter {param!r} does not end in {_WEIGHT!r}")
    return param[: -len(_WEIGHT)]


def canonical(value: Any, what: str) -> Any:
    """JSON round trip (tuples become lists), with a ValueError naming `what` on failure."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable: {exc}") from None


def build_manifest(
    bank: str,
    network_spec: Mapping[str, Any] | NetworkSpec,
    layer_shapes: Mapping[str, Sequence[int]],
    bn_features: Mapping[str, int] | None,
    mask_info: Mapping[str, Any],
    recipe: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A validated manifest for layers keyed as the network keys them ("fc1", "bn1"); with
    `recipe` (the training settings that change the trained bits), the manifest records it and
    its hash covers it."""
    spec = (network_spec if isinstance(network_spec, NetworkSpec)
            else NetworkSpec.from_dict(dict(network_spec)))
    if not layer_shapes:
        raise ValueError("layer_shapes is empty: a bank needs at least one masked layer")
    shapes: dict[str, list[int]] = {}
    for layer, shape in layer_shapes.items():
        dims = [int(d) for d in shape]
        if not dims or min(dims) < 1:
            raise ValueError(f"layer_shapes[{layer!r}] = {list(shape)} must be positive dims")
        shapes[param_name(str(layer))] = dims
    feats: dict[str, int] = {}
    for layer, c in (bn_features or {}).items():
        if int(c) < 1:
            raise ValueError(f"bn_features[{layer!r}] = {c} must be a positive channel count")
        feats[str(layer)] = int(c)
    if not isinstance(mask_info, Mapping):
        raise ValueError(f"mask_info must be a mapping (rule, density, ...), got {mask_info!r}")
    if recipe is not None and not isinstance(recipe, Mapping):
        raise ValueError(f"recipe must be a mapping (steps, optimizer, ...), got {recipe!r}")
    manifest = {
        "format": FORMAT,
        "bank": bank,
        "network": spec.to_dict(),
        "layer_shapes": shapes,
        "bn_features": feats,
        "mask": canonical(dict(mask_info), "mask_info"),
    }
    if recipe is not None:
        manifest[RECIPE] = canonical(dict(recipe), "recipe")
    manifest["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return manifest


def manifest_sha256(manifest: Mapping[str, Any]) -> str:
    """Hex sha256 of the manifest's identity fields (canonical JSON, sorted keys); the recipe
    enters only when the manifest has one, so a bank written before it was recorded keeps its
    hash (and every task file and model version that names it stays valid)."""
    core = {k: manifest[k] for k in IDENTITY_FIELDS}
    if RECIPE in manifest:
        core[RECIPE] = manifest[RECIPE]
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


def describe_recipe(recipe: Mapping[str, Any] | None) -> str:
    """One compact line of a recipe, e.g. "steps=1000 optimizer=rmsprop lr=0.0001 batch=128
    precision=fp32 fused=false"; says so when the bank predates recorded recipes."""
    if recipe is None:
        return "not recorded (the bank was written before training recipes were recorded)"
    def text(v: Any) -> str:
        return json.dumps(v) if isinstance(v, (bool, type(None))) else str(v)

    return " ".join(f"{_RECIPE_SHORT.get(k, k)}={text(v)}" for k, v in recipe.items())


def layer_shapes(manifest: Mapping[str, Any]) -> dict[str, list[int]]:
    """Masked layer shapes keyed as the network keys its layers ("fc1")."""
    return {layer_key(p): s for p, s in manifest["layer_shapes"].items()}


def parse_manifest(path: str, bank: str | None, raw: bytes) -> dict[str, Any]:
    """A manifest read from `raw`; RegistryCorruptError naming `path` when it is not one."""
    try:
        manifest = json.loads(raw)
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise RegistryCorruptError(
            f"{path}: manifest is not valid JSON ({exc}); {ADVICE}") from None
    if manifest.get("format") != FORMAT:
        raise RegistryCorruptError(
            f"{path}: manifest format {manifest.get('format')!r} is not supported (this version "
            f"reads format {FORMAT}, whose task files record their manifest's hash); train the "
            "bank again under a new bank name")
    missing = [k for k in ("bank", *IDENTITY_FIELDS) if k not in manifest]
    if missing:
        raise RegistryCorruptError(f"{path}: manifest lacks {missing}; {ADVICE}")
    if RECIPE in manifest and not isinstance(manifest[RECIPE], dict):
        raise RegistryCorruptError(f"{path}: manifest's recipe is not a JSON object; {ADVICE}")
    if bank is not None and manifest["bank"] != bank:
        raise RegistryCorruptError(f"{path}: manifest names bank {manifest['bank']!r}, not "
                                   f"{bank!r} (was the folder renamed?); {ADVICE}")
    try:
        NetworkSpec.from_dict(dict(manifest["network"]))
        layer_shapes(manifest)
    except (TypeError, ValueError) as exc:
        raise RegistryCorruptError(f"{path}: manifest's network is not valid ({exc}); "
                                   f"{ADVICE}") from None
    return manifest


def differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """'field.key: bank has X, given Y' for every differing identity entry of two manifests
    (the recipe is compared by `recipe_differences`)."""
    out: list[str] = []
    for key in IDENTITY_FIELDS[1:]:
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _entry_differences(key, a, b)
        elif a != b:
            out.append(f"{key}: bank has {a}, given {b}")
    return out


def _entry_differences(prefix: str, a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    return [f"{prefix}.{k}: bank has {a.get(k, '<absent>')}, given {b.get(k, '<absent>')}"
            for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k)]


def recipe_differences(stored: Mapping[str, Any], recipe: Mapping[str, Any]) -> list[str]:
    """'train.KEY: bank has X, given Y' for every recipe entry of `recipe` that is not the
    stored manifest's (which must have a recipe); a dotted key names its own config section
    ("discovery.batches_per_task: ...")."""
    a, b = stored[RECIPE], canonical(dict(recipe), "recipe")
    return [f"{k if '.' in k else 'train.' + k}: bank has {a.get(k, '<absent>')}, given "
            f"{b.get(k, '<absent>')}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def suggested_bank(bank: str, stored: Mapping[str, Any], recipe: Mapping[str, Any]) -> str:
    """A new bank name for masks of another recipe: the bank's name and the first differing
    setting, e.g. "quickstart-steps10"."""
    old = stored.get(RECIPE) or {}
    new = canonical(dict(recipe), "recipe")
    for k in sorted(set(old) | set(new), key=str):
        if old.get(k) != new.get(k):
            value = re.sub(r"[^A-Za-z0-9._-]", "-", str(new.get(k, "none")).lower())
            short = _RECIPE_SHORT.get(k, k).rsplit(".", 1)[-1].replace("_", "-")
            return f"{bank}-{short}{value}"[:_MAX_BANK]
    return f"{bank}-v2"[:_MAX_BANK]


def check_recipe(stored: Mapping[str, Any], recipe: Mapping[str, Any], where: str) -> None:
    """BankMismatchError unless `recipe` is the recipe the bank's masks were trained with,
    naming each differing setting with both values and a new bank name to train into instead.
    A bank without a recorded recipe (written before recipes were recorded) is refused too:
    masks trained now could differ from its own in ways nobody can check."""
    bank = str(stored.get("bank", "bank"))
    if RECIPE not in stored:
        raise BankMismatchError(
            f"{where} was written before training recipes were recorded, so how its masks were "
            "trained is unknown and no masks are added to it (it still loads and evaluates as "
            f"it is); train into a new bank instead: --set registry.bank={bank}-v2")
    advice = (f"train into a new bank instead: --set registry.bank="
              f"{suggested_bank(bank, stored, recipe)} (a bank's masks are all trained the same "
              "way)")
    diffs = recipe_differences(stored, recipe)
    if diffs:
        raise BankMismatchError(
            f"{where} was trained with another recipe: {'; '.join(diffs[:8])}. Use the bank's "
            f"recipe ({describe_recipe(stored[RECIPE])}), or {advice}")


def check_matches(stored: Mapping[str, Any], wanted: Mapping[str, Any], where: str,
                  *, exact_recipe: bool = False) -> None:
    """BankMismatchError naming every differing value when `wanted` is not the bank's manifest.

    `where` says what the bank is (e.g. "bank 'quickstart' in /abs/registry"). The recipe is
    compared when `wanted` has one (a job that trains); evaluation reads masks whatever recipe
    made them. With `exact_recipe` (masks copied in from elsewhere), a `wanted` without a recipe
    matches only a bank without one.
    """
    diffs = differences(stored, wanted)
    if diffs:
        raise BankMismatchError(
            f"{where} was made with a different configuration: {'; '.join(diffs[:8])}. A bank "
            "never mixes base networks, seeds, task families, data sets or mask rules: use the "
            "configuration the bank was trained with, or a new bank name (registry.bank)")
    if RECIPE in wanted:
        check_recipe(stored, wanted[RECIPE], where)
    elif exact_recipe and RECIPE in stored:
        raise BankMismatchError(
            f"{where} was trained with recipe {describe_recipe(stored[RECIPE])}; the masks given "
            "record no recipe (they were written before recipes were recorded), so they are not "
            "added to it: import them under a new bank name")
