"""The building blocks of every config section: strict numbers, safe names, one error type.

Values that would be silently wrong are refused here, before any job runs: every float is finite
and inside the range its meaning allows (a rate > 0, a momentum in [0, 1), a fraction in (0, 1)),
integers are whole numbers and never booleans (YAML's `true` is not 1 step), and names that become
folders or MLflow names cannot climb out of their folder or break a `models:/NAME@ALIAS` URI.
"""

from __future__ import annotations

import re
import reprlib
import unicodedata
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the key."""


# An error line shows a value, never all of it: a pasted array or a YAML file of nested aliases
# would otherwise turn one line into megabytes. reprlib stops at these sizes while it writes, so
# even a huge value costs little to show.
MAX_SHOWN = 200
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, MAX_SHOWN, MAX_SHOWN, 60


def shown(value: Any, limit: int = MAX_SHOWN) -> str:
    """repr of `value` for an error line: at most `limit` characters, cut with '...'."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def whole_number(value: Any) -> Any:
    """YAML spells some whole numbers as floats (`2.0`, `1.0e+3`): those count as integers. A
    boolean never does (YAML's `true` would otherwise become 1); strings and fractions are left
    to the strict int check, which refuses them."""
    if isinstance(value, bool):
        raise ValueError("expected a whole number, not a boolean")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def not_boolean(value: Any) -> Any:
    """Floats stay lax (PyYAML reads `1e-3` as the string '1e-3'), but `true` is not 1.0."""
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


Int = Annotated[int, Strict(), BeforeValidator(whole_number)]
Float = Annotated[float, BeforeValidator(not_boolean)]  # finite: allow_inf_nan=False below
PositiveInt = Annotated[Int, Field(ge=1)]
TaskId = Annotated[Int, Field(ge=0)]

# The mask registry's rule for bank names (check_bank_name in pipeline/registry/mask_registry.py
# enforces it again when a bank is opened); repeated here so a bad name fails at load time without
# importing the registry (and pyarrow) into the config.
BANK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(value: str, role: str, forbidden: str = "", max_bytes: int = 255) -> str:
    """`value` if it can serve as `role` (a folder name or an MLflow name), else ValueError.

    Refused: empty, '.', '..' or any leading '.' (a path step or a hidden folder), path
    separators and ':' (a drive or a URI scheme), the characters in `forbidden`, whitespace and
    control or format characters (invisible in logs and listings), more than `max_bytes` bytes.
    """
    if not value:
        raise ValueError(f"{role} must not be empty")
    if value.startswith("."):
        raise ValueError(f"{value!r} cannot be {role}: it starts with '.' (a path step or a "
                         "hidden folder)")
    bad = sorted({c for c in value if c in "/\\:" + forbidden or c.isspace()
                  or unicodedata.category(c).startswith("C")})
    if bad:
        raise ValueError(f"{value!r} cannot be {role}: it contains {', '.join(map(repr, bad))}; "
                         "use letters, digits, '.', '_' and '-'")
    if len(value.encode()) > max_bytes:
        raise ValueError(f"{role} {value[:20]!r}... is longer than {max_bytes} bytes")
    return value


def check_bank(value: str, role: str = "a bank name") -> str:
    """`value` if the mask registry accepts it as a bank (a folder under registry.root)."""
    if not BANK_NAME.fullmatch(value):
        raise ValueError(f"{value!r} cannot be {role}: use 1 to 128 letters, digits, '.', '_' "
                         "and '-', starting with a letter or digit (it becomes a folder name)")
    return value


def field_error(field: str, detail: str) -> PydanticCustomError:
    """The error of a check across fields, named by the field to change: `_format_error` puts
    `field` after the section's key path (a model validator's own location is the section)."""
    return PydanticCustomError("config_field", "{detail}", {"field": field, "detail": detail})


class Section(BaseModel):
    # allow_inf_nan=False: every float of every section is finite (.inf and .nan are refused).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
