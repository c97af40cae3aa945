"""YAML -> a validated, frozen ExperimentConfig: dotted overrides (`--set train.lr=0.01`) are
applied to the raw YAML before validation, so they are checked exactly like the file; every
problem is reported with its key path and the file."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config.experiment import ExperimentConfig
from pipeline.config.fields import MAX_SHOWN, ConfigError, shown
from pipeline.config.strict_yaml import read_yaml


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Apply `key.path=value` strings (values parsed as YAML) to a raw config mapping."""
    out = dict(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override {shown(item)}: expected KEY=VALUE, e.g. "
                              "train.lr=0.01")
        path, _, text = item.partition("=")
        keys = path.strip().split(".")
        if not all(keys):
            raise ConfigError(f"{source}: override {shown(item)}: the key {shown(path.strip())} "
                              "has an empty part; expected a dotted KEY=VALUE, e.g. "
                              "train.lr=0.01")
        where = f"{source}: override {shown(item)}"
        try:
            # Plain data only: a tag such as !!python/object is a YAMLError.
            value = read_yaml(text, where)
        except yaml.YAMLError as err:
            raise ConfigError(f"{where}: the value is not valid YAML ({_problem(err)}); write a "
                              "plain value, e.g. train.lr=0.01, and quote strings") from None
        out = set_dotted(out, keys, value, where)
    return out


def set_dotted(raw: dict[str, Any], keys: list[str], value: Any, where: str) -> dict[str, Any]:
    """A copy of `raw` with the value at the dotted path `keys` set: the one walker of config
    paths for overrides, `reduced` scales and sweeps. Sections on the path are copied, never
    shared with `raw`; ConfigError naming `where` when a value stands where a section should."""
    out = dict(raw)
    node = out
    for i, k in enumerate(keys[:-1]):
        child = node.get(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {'.'.join(keys[:i + 1])} is not a section")
        node[k] = child = dict(child)
        node = child
    node[keys[-1]] = value
    return out


def get_dotted(config: BaseModel, path: str) -> Any:
    """The value of a validated config at a dotted path such as "train.lr"."""
    value: Any = config
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line, its quoted snippet of the text cut to a bounded length."""
    text = " ".join(str(err).split())
    return text if len(text) <= 2 * MAX_SHOWN else text[:2 * MAX_SHOWN - 3] + "..."


def _key_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key a config may hold (sections and their fields): the candidates of "did
    you mean"."""
    out = []
    for name, field in model.model_fields.items():
        out.append(prefix + name)
        for kind in (field.annotation, *get_args(field.annotation)):
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                out += _key_paths(kind, f"{prefix}{name}.")
    return out


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, _key_paths(ExperimentConfig), n=1, cutoff=0.75)
    return f"; did you mean '{close[0]}'?" if close else ""


def _blamed(key: str, source: str, overridden: dict[str, str], unknown: bool) -> str:
    """The config file, and the --set that put `key` there if one did: the error names what to
    fix (an unknown section is put there by a --set of any key under it)."""
    for path, item in overridden.items():
        if key == path or key.startswith(path + ".") or unknown and path.startswith(key + "."):
            return f"--set {shown(item)}" if source.startswith("--set") else (
                f"{source}: --set {shown(item)}")
    return source


def _format_error(err: ValidationError, source: str,
                  overridden: dict[str, str] | None = None) -> str:
    lines = []
    for e in err.errors():
        field = (e.get("ctx") or {}).get("field")  # a check across fields names its field
        loc = [str(p) for p in e["loc"]] + ([field] if field else [])
        key = ".".join(loc) or "(top level)"
        where = _blamed(key, source, overridden or {}, e["type"] == "extra_forbidden")
        if len(key) > MAX_SHOWN:
            key = key[:MAX_SHOWN - 3] + "..."
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key '{key}'{_did_you_mean(key)}")
        else:
            got = e.get("input")
            value = "" if field or isinstance(got, (dict, BaseModel)) else f" (got {shown(got)})"
            msg = e["msg"] if len(e["msg"]) <= 2 * MAX_SHOWN else e["msg"][:2 * MAX_SHOWN] + "..."
            lines.append(f"{where}: {key}: {msg}{value}")
    return "\n".join(lines)


def parse_config(raw: dict[str, Any] | None, source: str = "<config>",
                 overrides: list[str] | None = None) -> ExperimentConfig:
    """Validate a raw mapping (plus overrides) into an ExperimentConfig."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    overrides = overrides or []
    merged = apply_overrides(raw, overrides, source)
    if merged.get("scale") == "reduced":
        reduced = merged.get("reduced") or {}
        if not isinstance(reduced, dict):
            raise ConfigError(f"{source}: reduced: expected a mapping of dotted keys to values")
        # The reduced block first, then the command line again, so --set always wins.
        items = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                 for k, v in reduced.items()]
        items = [i[:-4] if i.endswith("\n...") else i for i in items]
        merged = apply_overrides(apply_overrides(raw, items, source), overrides, source)
        merged["reduced"] = {}  # resolved: a dumped config reloads to the same values
    try:
        return ExperimentConfig.model_validate(merged)
    except ValidationError as err:
        overridden = {i.partition("=")[0].strip(): i for i in overrides}
        raise ConfigError(_format_error(err, source, overridden)) from None


def load_config(path: str | os.PathLike[str], overrides: list[str] | None = None
                ) -> ExperimentConfig:
    """Read and validate a YAML experiment file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; see configs/ for examples")
    try:
        raw = read_yaml(path.read_text(), str(path))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_problem(err)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: its values are nested too deeply") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the config file: {err}") from None
    if raw is None:
        # An empty file would otherwise be every default: a 10-task experiment nobody asked for.
        raise ConfigError(f"{path}: the config file is empty (or only comments); write the "
                          "settings of the experiment, e.g. start from configs/quickstart.yaml")
    return parse_config(raw, str(path), overrides)


def dump_config(config: ExperimentConfig) -> str:
    """The resolved config as YAML (logged as an artifact; loads back to the same config)."""
    return yaml.safe_dump(config.model_dump(), sort_keys=False)
