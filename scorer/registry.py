"""Plugin registry: stable type name → plugin class, one table per kind.

Plugins register themselves with ``@register`` when their module is imported (``scorer.pipeline``
imports ``scorer.plugins``, which imports every built-in one); the tables are static (classes,
not instances), so every pipeline builds its own plugin instances. This module imports no
plugin, so the plugins can import it without a circle.
"""

from __future__ import annotations

import difflib
from typing import TypeVar

from scorer.errors import ConfigError
from scorer.plugin import Plugin

P = TypeVar("P", bound=type[Plugin])

_TABLES: dict[str, dict[str, type[Plugin]]] = {"filter": {}, "scorer": {}, "picker": {}}


def register(cls: P) -> P:
    """Class decorator: register a plugin under ``cls.TYPE`` in the table of ``cls.KIND``."""
    table = _TABLES[cls.KIND]
    if not cls.TYPE or cls.TYPE in table and table[cls.TYPE] is not cls:
        raise ValueError(f"plugin type name {cls.TYPE!r} missing or registered twice")
    table[cls.TYPE] = cls
    return cls


def lookup(kind: str, type_name: object, path: str) -> type[Plugin]:
    """The class for ``type_name`` or a ConfigError naming the path and the nearest names."""
    table = _TABLES[kind]
    if not isinstance(type_name, str):
        raise ConfigError(path, f"expected a {kind} type name, got {type_name!r}")
    cls = table.get(type_name)
    if cls is None:
        near = difflib.get_close_matches(type_name, list(table), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(path, f"unknown {kind} type {type_name!r}{hint}; known: {', '.join(sorted(table))}")
    return cls
