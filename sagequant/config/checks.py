"""Field checks every config section shares. Each error is a ConfigError naming the QuantConfig
field, the bad value and the valid choices."""
from __future__ import annotations

import dataclasses
import math
from fnmatch import fnmatchcase
from typing import Any, Mapping

from ..errors import ConfigError


def fail(name: str, value: Any, why: str, valid: str) -> ConfigError:
    return ConfigError(f"QuantConfig.{name}={value!r} {why}; valid: {valid}")


def choice(name: str, value: Any, choices: Mapping[str, str]) -> str:
    valid = ", ".join(sorted(choices))
    if not isinstance(value, str):
        raise fail(name, value, "must be a string", valid)
    key = value.strip().lower()
    if key not in choices:
        raise fail(name, value, "is not supported", valid)
    return choices[key]


def names(*spellings: str) -> dict[str, str]:
    """A choice table whose spellings are their own canonical value."""
    return {s: s for s in spellings}


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise fail(name, value, "must be a bool", "True, False")
    return value


def integer(name: str, value: Any, minimum: int) -> int:
    # bool is an int subclass; True as a sample count is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise fail(name, value, "is not valid", f"an int >= {minimum}")
    return value


def group(name: str, value: Any, allow_minus_one: bool) -> int | None:
    valid = "None or a positive int" + (" (-1 means None)" if allow_minus_one else "")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(name, value, "must be an int or None", valid)
    if allow_minus_one and value == -1:
        return None
    if value <= 0:
        raise fail(name, value, "is not a valid group size", valid)
    return value


def clip(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 < value <= 1.0:
        raise fail(name, value, "is out of range", "a finite float in (0, 1]")
    return float(value)


def finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail(name, value, "is not a finite number", "a finite int or float")
    return float(value)


def str_list(name: str, value: Any) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) and p for p in value):
        raise fail(name, value, "must be a list of non-empty strings", "e.g. ['lm_head']")
    return list(value)


def normalise(section, **values: Any) -> None:
    """Store the checked spellings on a frozen section (its __post_init__ calls this)."""
    for name, value in values.items():
        object.__setattr__(section, name, value)


def strict_from_dict(cls, data: Mapping[str, Any]):
    """Build a dataclass from a mapping, refusing unknown keys by name (a typo must fail)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{cls.__name__}.from_dict needs a mapping, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field {unknown[0]!r}; valid fields: {', '.join(names)}")
    return cls(**data)


def layer_matches(layer_name: str, pattern: str) -> bool:
    """True when glob `pattern` matches the whole name or a dotted suffix of it.

    So "lm_head" selects "model.lm_head" and "layers.0.*" selects "model.layers.0.mlp.up_proj",
    while "k_proj" does not select "kk_proj".
    """
    return (layer_name == pattern or fnmatchcase(layer_name, pattern)
            or fnmatchcase(layer_name, "*." + pattern))
