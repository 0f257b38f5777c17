"""Explain an "Adapter Not Found": what was looked for, what exists nearby, what probably went wrong.

Most not-found errors are path mismatches (the seed's most common accident). Given the expected
folder (``prefix``, e.g. ``adapters/sql-lora/``) and the listing of the store around it, this
reports, in order of likelihood:

- **trailing slash**: an *object* named like the folder without ``/`` (a file, not a folder), or
  the adapter's files lying directly in the parent folder (synced without the folder's name);
- **case**: a sibling folder equal to the name but for letter case (keys are case-sensitive);
- **depth**: an ``adapter_config.json`` in a folder with the adapter's name at another depth
  (one level too deep — ``adapters/sql-lora/sql-lora/`` — or under another parent);
- **close names**: siblings similar to the name (``difflib``, cutoff 0.6);
- and what the parent folder holds (up to 15 names).

``listing`` is every key under the layout's fixed root (text before the first ``{``), capped by
the caller.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from vllm_sidecar.sources import ObjectInfo
from vllm_sidecar.validation import CONFIG_FILE


def _parent(prefix: str) -> str:
    """``adapters/sql-lora/`` -> ``adapters/``; ``sql-lora/`` -> ``""``."""
    trimmed = prefix.rstrip("/")
    return trimmed.rsplit("/", 1)[0] + "/" if "/" in trimmed else ""


def _children(listing: Sequence[ObjectInfo], parent: str) -> tuple[set[str], set[str]]:
    """(sub-folder names, file names) directly under ``parent``."""
    folders: set[str] = set()
    files: set[str] = set()
    for obj in listing:
        if not obj.key.startswith(parent):
            continue
        rest = obj.key[len(parent):]
        if rest.startswith(".versions/"):
            continue  # the versions `loraroute adapters push` keeps; never an adapter folder
        if "/" in rest:
            folders.add(rest.split("/", 1)[0])
        elif rest:
            files.add(rest)
    return folders, files


def diagnose(adapter: str, prefix: str, listing: Sequence[ObjectInfo], *, describe: str) -> str:
    """The message of a 404: ``describe`` is how the expected location is shown (``s3://b/key``)."""
    looked_for = f"{describe}{CONFIG_FILE}" if describe.endswith("/") else f"{describe}/{CONFIG_FILE}"
    parent = _parent(prefix)
    hints: list[str] = []
    keys = {o.key for o in listing}
    folder_key = prefix.rstrip("/")
    if folder_key in keys:
        hints.append(f"there is an object '{folder_key}' without a trailing slash: it is a file, not a folder; "
                     f"upload the adapter's files under '{folder_key}/'")
    if f"{parent}{CONFIG_FILE}" in keys:
        hints.append(f"'{parent}{CONFIG_FILE}' exists: the adapter's files were copied straight into "
                     f"'{parent or '/'}' without their folder (a trailing slash on the sync source); copy them "
                     f"to '{prefix}' instead, e.g. aws s3 sync ./{adapter}/ s3://<bucket>/{prefix}")
    folders, files = _children(listing, parent)
    case_matches = sorted(f for f in folders if f.lower() == adapter.lower() and f != adapter)
    if case_matches:
        hints.append(f"folder(s) {', '.join(repr(parent + f + '/') for f in case_matches)} differ only in letter "
                     "case; names are case-sensitive: rename the folder or request that exact name")
    config_dirs = sorted({o.key[: -len(CONFIG_FILE)] for o in listing if o.key.endswith("/" + CONFIG_FILE)})
    expected_depth = prefix.rstrip("/").count("/") + 1
    depth_matches = [d for d in config_dirs
                     if d.rstrip("/").rsplit("/", 1)[-1].lower() == adapter.lower() and d != prefix
                     and d.rstrip("/").count("/") + 1 != expected_depth]
    for d in depth_matches[:3]:
        depth = d.rstrip("/").count("/") + 1
        where = "one level too deep" if depth == expected_depth + 1 else (
            "deeper" if depth > expected_depth else "shallower")
        hints.append(f"found {CONFIG_FILE} in '{d}' ({where}: depth {depth}, the layout expects depth "
                     f"{expected_depth}, '{prefix}'); move the folder or change source.*.layout to match")
    inside = [o.key for o in listing if o.key.startswith(prefix)]
    if inside and not depth_matches:
        hints.append(f"'{prefix}' exists but holds no {CONFIG_FILE} directly: {', '.join(inside[:5])}")
    close = difflib.get_close_matches(adapter, sorted(folders - set(case_matches)), n=3, cutoff=0.6)
    close = [c for c in close if c != adapter]
    if close:
        hints.append(f"close names in '{parent or '/'}': {', '.join(close)}")
    if folders or files:
        shown = sorted(f + "/" for f in folders)[:15] + sorted(files)[:5]
        more = len(folders) + len(files) - len(shown)
        hints.append(f"'{parent or '/'}' holds: {', '.join(shown)}{f' (+{more} more)' if more > 0 else ''}")
    else:
        hints.append(f"nothing exists under '{parent or '/'}': check the bucket/folder and source.*.layout")
    return f"adapter {adapter!r} not found: looked for {looked_for}. " + "; ".join(hints)
