"""Strict parameter validation for plugins.

Every plugin declares ``PARAMS: dict[str, Param]``. ``validate_params`` returns the complete
parameter dict (defaults filled in) or raises ``ConfigError`` naming the offending key path:
an unknown key, a wrong type (``true`` is not a number, ``"1"`` is not a number), a value out of
range or not among the allowed choices.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from scorer.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Param:
    """One plugin parameter: default, expected kind, optional bounds/choices, one-line doc."""

    default: Any
    kind: type = float
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None
    doc: str = ""
    # Optional extra check/normaliser: returns the value to use or raises ValueError(message).
    check: Callable[[Any], Any] | None = None


def _kind_name(kind: type) -> str:
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string", dict: "a mapping"}.get(
        kind, kind.__name__
    )


def check_value(value: Any, spec: Param, path: str) -> Any:
    """Validate one value against its ``Param``; return the (normalised) value."""
    kind = spec.kind
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected {_kind_name(kind)}, got {value!r}")
        value = float(value)
        if value != value:
            raise ConfigError(path, "NaN is not allowed")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected {_kind_name(kind)}, got {value!r}")
    elif kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected {_kind_name(kind)}, got {value!r}")
    elif not isinstance(value, kind):
        raise ConfigError(path, f"expected {_kind_name(kind)}, got {value!r}")
    if value is not None and spec.min is not None and value < spec.min:
        raise ConfigError(path, f"must be >= {spec.min}, got {value!r}")
    if value is not None and spec.max is not None and value > spec.max:
        raise ConfigError(path, f"must be <= {spec.max}, got {value!r}")
    if spec.choices is not None and value not in spec.choices:
        raise ConfigError(path, f"must be one of {', '.join(map(repr, spec.choices))}, got {value!r}")
    if spec.check is not None:
        try:
            value = spec.check(value)
        except ValueError as exc:
            raise ConfigError(path, str(exc)) from None
    return value


def unknown_key(path: str, key: Any, allowed: list[str] | tuple[str, ...]) -> ConfigError:
    """The error for a key that is not allowed here, with the closest allowed name."""
    near = difflib.get_close_matches(str(key), list(allowed), n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    listing = ", ".join(sorted(allowed)) if allowed else "none"
    return ConfigError(f"{path}.{key}", f"unknown key{hint}; allowed: {listing}")


def validate_params(raw: Any, schema: Mapping[str, Param], path: str) -> dict[str, Any]:
    """Fill defaults and validate ``raw`` (a mapping or None) strictly against ``schema``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(path, f"expected a mapping of parameters, got {type(raw).__name__}")
    out: dict[str, Any] = {}
    for key in raw:
        if key not in schema:
            raise unknown_key(path, key, list(schema))
    for name, spec in schema.items():
        out[name] = check_value(raw[name], spec, f"{path}.{name}") if name in raw else spec.default
    return out
