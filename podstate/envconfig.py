"""Environment overrides of a YAML config, shared by the gateway config and the sidecar settings.

A variable ``<PREFIX><KEY>[__<KEY>...]=value`` sets the key at that path of the parsed config
before it is validated, so an override is checked exactly like the file. The prefix is matched
case-insensitively (``LORAROUTE__`` for the gateway, ``LORAROUTE_SIDECAR_`` for the sidecar); keys
are lower-cased, ``__`` separates levels and a number indexes a list (``LORAROUTE__TENANTS__0__NAME``,
missing items are created). The value is read as YAML, so ``8080``, ``true``, ``[a, b]`` and
``{id: p0, url: "http://..."}`` work, text that is not valid YAML stays a string, and an empty
value is null (the key's default where the key may be null). Variables apply in name order.

It lives in ``podstate`` because that is the package both processes build on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml


class EnvOverrideError(ValueError):
    """An override names a path that cannot exist (a list item by name). A key under what was a
    value makes that value a section, which validation then refuses with the key's path."""


def apply_env_overrides(data: dict[str, Any], env: Mapping[str, str], prefix: str) -> list[str]:
    """Apply every ``prefix``-ed variable of ``env`` to ``data`` in place; returns the dotted
    paths set. Raises ``EnvOverrideError`` naming the variable's path when it cannot be set."""
    applied = []
    upper = prefix.upper()
    for name in sorted(env):
        if not name.upper().startswith(upper):
            continue
        parts = [p.lower() for p in name[len(prefix):].split("__") if p]
        if not parts:
            continue
        raw = env[name]
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        set_path(data, parts, value)
        applied.append(".".join(parts))
    return applied


def set_path(data: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set ``data[parts[0]][parts[1]]...`` to ``value``, creating sections and list items."""
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[:i]) or "(top level)"
        if isinstance(node, list):
            if not part.isdigit():
                raise EnvOverrideError(f"environment override: {where} is a list; use an index, not {part!r}")
            idx = int(part)
            while len(node) <= idx:
                node.append({})
            if last:
                node[idx] = value
                return
            if isinstance(node[idx], tuple):
                node[idx] = list(node[idx])
            elif not isinstance(node[idx], dict | list):
                node[idx] = {}
            node = node[idx]
            continue
        if last:
            node[part] = value
            return
        nxt = node.get(part)
        if isinstance(nxt, tuple):
            nxt = list(nxt)
            node[part] = nxt
        elif not isinstance(nxt, dict | list):
            nxt = [] if parts[i + 1].isdigit() else {}
            node[part] = nxt
        node = nxt
