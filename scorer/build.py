"""Building a ``Pipeline`` from configuration: a preset name or the YAML ``pipeline:`` mapping.

The mapping's keys are in ``scorer.pipeline``'s docstring. Every key is validated strictly; a
``ConfigError`` names the offending path (``pipeline.scorers[2].parameters.wieght: unknown key``).
A preset is the starting point; ``filters``, ``scorers``, ``picker`` and ``state`` replace its
parts, ``replace`` swaps named scorers for others (``{prefix-cache: {type: precise-prefix}}``: the
new scorer takes the old one's place and, unless it gives its own, its weight; the Helm chart's
``precisePrefix.enabled`` uses it on whatever pipeline the values name), ``weights`` re-weights
scorers by name afterwards, ``name`` names the policy (default: the preset's, ``<preset>+custom``
once anything is overridden, ``custom`` without a preset).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import scorer.plugins  # noqa: F401  (registers the built-in plugins)
from scorer.errors import ConfigError
from scorer.params import unknown_key
from scorer.pipeline import Pipeline
from scorer.plugin import Filter, Picker, Scorer
from scorer.presets import PRESETS
from scorer.registry import lookup

__all__ = ["build_pipeline"]

_TOP_KEYS = ("preset", "name", "filters", "scorers", "replace", "weights", "picker", "state")
_PLUGIN_KEYS = ("type", "name", "parameters")
_SCORER_KEYS = ("type", "name", "weight", "parameters")


def build_pipeline(spec: str | Mapping[str, Any] | None, *, path: str = "pipeline") -> Pipeline:
    """Build a ``Pipeline`` from a preset name or a config mapping (see the module docstring)."""
    if spec is None:
        spec = "default"
    if isinstance(spec, str):
        spec = {"preset": spec}
    if not isinstance(spec, Mapping):
        raise ConfigError(path, f"expected a preset name or a mapping, got {type(spec).__name__}")
    for k in spec:
        if k not in _TOP_KEYS:
            raise unknown_key(path, k, list(_TOP_KEYS))
    name, effective = _effective(spec, path)
    filters = _filters(effective.get("filters") or [], f"{path}.filters")
    if "replace" in spec:
        effective["scorers"] = _replaced(effective.get("scorers") or [], spec["replace"], f"{path}.replace")
        effective["replace"] = copy.deepcopy(dict(spec["replace"]))
    scorers = _scorers(effective.get("scorers") or [], f"{path}.scorers")
    if "weights" in spec:
        _reweight(scorers, spec["weights"], f"{path}.weights")
        effective["weights"] = dict(spec["weights"])
    picker = _picker(effective.get("picker") or {"type": "max-score"}, f"{path}.picker")
    return Pipeline(name, filters, scorers, picker, effective.get("state"), effective, path=path)


def _effective(spec: Mapping[str, Any], path: str) -> tuple[str, dict[str, Any]]:
    """The policy's name and its configuration: the preset's, with the spec's parts replacing it."""
    base: dict[str, Any] = {"filters": [], "scorers": [], "picker": {"type": "max-score"}}
    name = "custom"
    if "preset" in spec:
        pname = spec["preset"]
        if not isinstance(pname, str) or pname not in PRESETS:
            raise ConfigError(f"{path}.preset", f"unknown preset {pname!r}; known: {', '.join(sorted(PRESETS))}")
        base = copy.deepcopy(PRESETS[pname])
        overridden = any(k in spec for k in ("filters", "scorers", "replace", "weights", "picker"))
        name = pname if not overridden else f"{pname}+custom"
    if "name" in spec:
        if not isinstance(spec["name"], str) or not spec["name"]:
            raise ConfigError(f"{path}.name", f"expected a non-empty string, got {spec['name']!r}")
        name = spec["name"]
    effective: dict[str, Any] = {**base}
    for k in ("filters", "scorers", "picker", "state"):
        if k in spec:
            effective[k] = copy.deepcopy(spec[k])
    return name, effective


def _filters(raw: Any, path: str) -> list[tuple[str, Filter]]:
    if not isinstance(raw, list):
        raise ConfigError(path, "expected a list")
    out: list[tuple[str, Filter]] = []
    for i, item in enumerate(raw):
        p = f"{path}[{i}]"
        entry = _plugin_entry(item, p, _PLUGIN_KEYS)
        cls = lookup("filter", entry["type"], f"{p}.type")
        out.append((_unique_name(entry, p, [n for n, _ in out], "filter"),
                    cls(entry.get("parameters"), f"{p}.parameters")))  # type: ignore[arg-type]
    return out


def _scorers(raw: Any, path: str) -> list[tuple[str, Scorer, float]]:
    if not isinstance(raw, list):
        raise ConfigError(path, "expected a list")
    out: list[tuple[str, Scorer, float]] = []
    for i, item in enumerate(raw):
        p = f"{path}[{i}]"
        entry = _plugin_entry(item, p, _SCORER_KEYS)
        cls = lookup("scorer", entry["type"], f"{p}.type")
        name = _unique_name(entry, p, [n for n, _, _ in out], "scorer")
        weight = _weight(entry.get("weight", 1.0), f"{p}.weight")
        out.append((name, cls(entry.get("parameters"), f"{p}.parameters"), weight))  # type: ignore[arg-type]
    return out


def _replaced(raw: Any, rmap: Any, path: str) -> list[Any]:
    """The scorer entries with ``replace: {scorer name: new entry}`` applied (same place; the old
    entry's weight unless the new one has its own)."""
    if not isinstance(rmap, Mapping):
        raise ConfigError(path, "expected a mapping of scorer name to a scorer entry")
    if not isinstance(raw, list):
        return raw  # _scorers reports it
    entries = [{"type": e} if isinstance(e, str) else dict(e) if isinstance(e, Mapping) else e for e in raw]
    names = [e.get("name", e.get("type")) if isinstance(e, dict) else None for e in entries]
    for sname, new in rmap.items():
        if sname not in names:
            known = ", ".join(n for n in names if isinstance(n, str)) or "none"
            raise ConfigError(f"{path}.{sname}", f"no scorer named {sname!r} to replace; the pipeline's scorers: {known}")
        entry = _plugin_entry(new, f"{path}.{sname}", _SCORER_KEYS)
        j = names.index(sname)
        if "weight" not in entry and "weight" in entries[j]:
            entry["weight"] = entries[j]["weight"]
        entries[j] = entry
    return entries


def _reweight(scorers: list[tuple[str, Scorer, float]], wmap: Any, path: str) -> None:
    """Apply ``weights: {scorer name: weight}`` in place."""
    if not isinstance(wmap, Mapping):
        raise ConfigError(path, "expected a mapping of scorer name to weight")
    names = [n for n, _, _ in scorers]
    for sname, weight in wmap.items():
        if sname not in names:
            raise unknown_key(path, sname, names)
        j = names.index(sname)
        scorers[j] = (sname, scorers[j][1], _weight(weight, f"{path}.{sname}"))


def _picker(raw: Any, path: str) -> Picker:
    entry = _plugin_entry(raw, path, _PLUGIN_KEYS)
    cls = lookup("picker", entry["type"], f"{path}.type")
    return cls(entry.get("parameters"), f"{path}.parameters")  # type: ignore[return-value]


def _weight(weight: Any, path: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight < float("inf"):
        raise ConfigError(path, f"expected a finite number >= 0, got {weight!r}")
    return float(weight)


def _plugin_entry(entry: Any, path: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if isinstance(entry, str):
        return {"type": entry}
    if not isinstance(entry, Mapping):
        raise ConfigError(path, f"expected a type name or a mapping, got {type(entry).__name__}")
    for k in entry:
        if k not in keys:
            raise unknown_key(path, k, list(keys))
    if "type" not in entry:
        raise ConfigError(f"{path}.type", "missing")
    return dict(entry)


def _unique_name(entry: Mapping[str, Any], path: str, taken: list[str], kind: str) -> str:
    name = entry.get("name", entry["type"])
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path}.name", f"expected a non-empty string, got {name!r}")
    if name in taken:
        raise ConfigError(f"{path}.name", f"duplicate {kind} name {name!r}; give one a distinct 'name'")
    return name
