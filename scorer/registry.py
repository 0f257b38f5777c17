"""Plugin registry: stable type name → plugin class, one table per kind.

Plugins register themselves with ``@register`` when ``scorer.plugins`` is imported; the tables
are static (classes, not instances), so every pipeline builds its own plugin instances.
"""

from __future__ import annotations

import difflib
from typing import TypeVar

from scorer.errors import ConfigError
from scorer.plugin import Filter, Picker, Plugin, Scorer

P = TypeVar("P", bound=type[Plugin])

_TABLES: dict[str, dict[str, type[Plugin]]] = {"filter": {}, "scorer": {}, "picker": {}}


def register(cls: P) -> P:
    """Class decorator: register a plugin under ``cls.TYPE`` in the table of ``cls.KIND``."""
    table = _TABLES[cls.KIND]
    if not cls.TYPE or cls.TYPE in table and table[cls.TYPE] is not cls:
        raise ValueError(f"plugin type name {cls.TYPE!r} missing or registered twice")
    table[cls.TYPE] = cls
    return cls


def plugin_types(kind: str) -> dict[str, type[Plugin]]:
    """All registered plugins of one kind ("filter", "scorer", "picker")."""
    import scorer.plugins  # noqa: F401  (registers the built-in plugins)

    return dict(_TABLES[kind])


def lookup(kind: str, type_name: object, path: str) -> type[Plugin]:
    """The class for ``type_name`` or a ConfigError naming the path and the nearest names."""
    table = plugin_types(kind)
    if not isinstance(type_name, str):
        raise ConfigError(path, f"expected a {kind} type name, got {type_name!r}")
    cls = table.get(type_name)
    if cls is None:
        near = difflib.get_close_matches(type_name, list(table), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(path, f"unknown {kind} type {type_name!r}{hint}; known: {', '.join(sorted(table))}")
    return cls


def filter_types() -> dict[str, type[Filter]]:
    return plugin_types("filter")  # type: ignore[return-value]


def scorer_types() -> dict[str, type[Scorer]]:
    return plugin_types("scorer")  # type: ignore[return-value]


def picker_types() -> dict[str, type[Picker]]:
    return plugin_types("picker")  # type: ignore[return-value]
