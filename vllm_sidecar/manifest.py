"""The manifest beside an adapter's files: what ``loraroute adapters push`` published.

``<prefix><adapter>/loraroute-manifest.json``::

    {"format": 1, "adapter": "sql", "version": "3f2a9c1b7d4e",
     "files": {"adapter_config.json": {"sha256": "…", "size": 812},
               "adapter_model.safetensors": {"sha256": "…", "size": 14680320}},
     "rank": 8, "base_model": "meta-llama/Llama-3.1-8B-Instruct", "pushed_at": "2025-06-01T09:30:00Z"}

``version`` is derived from the file checksums only (the first 12 hex digits of the SHA-256 of
the sorted ``name sha256`` lines), so the same files always give the same version and a push of
unchanged files changes nothing. Every version ever pushed also stays, immutable, at
``versions_prefix(...)``: ``<prefix>.versions/<adapter>/<version>/`` (``.versions`` can never be
an adapter name), which is where a pinned version is fetched from.

Publishing protocol (what makes a push atomic for a sidecar fetching at the same time): the
writer uploads the weights, then the config, then the manifest, last; a reader downloads the
manifest first, then the files, and accepts them only when every checksum matches that manifest
(``mismatch``). A reader overlapping a writer sees a mismatch and fetches again; it never keeps
the config of one version with the weights of another.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_sidecar.errors import AdapterInvalid
from vllm_sidecar.validation import MANIFEST_FILE, REQUIRED_FILES, in_folder

FORMAT = 1
VERSION_RE = re.compile(r"^[0-9a-f]{12}$")
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class Manifest:
    adapter: str
    version: str
    files: Mapping[str, FileEntry]
    rank: int | None = None
    base_model: str | None = None
    pushed_at: str = ""

    def to_json(self) -> bytes:
        body: dict[str, Any] = {
            "format": FORMAT,
            "adapter": self.adapter,
            "version": self.version,
            "files": {n: {"sha256": f.sha256, "size": f.size} for n, f in sorted(self.files.items())},
            "rank": self.rank,
            "base_model": self.base_model,
            "pushed_at": self.pushed_at,
        }
        return json.dumps(body, indent=1).encode() + b"\n"

    @classmethod
    def parse(cls, raw: bytes, *, where: str) -> Manifest:
        """Read a manifest; a damaged one is a 422 ``manifest`` naming ``where``."""
        try:
            data = json.loads(raw)
            files = {str(n): FileEntry(str(f["sha256"]), int(f["size"])) for n, f in data["files"].items()}
            manifest = cls(adapter=str(data["adapter"]), version=str(data["version"]), files=files,
                           rank=int(data["rank"]) if data.get("rank") is not None else None,
                           base_model=data.get("base_model"), pushed_at=str(data.get("pushed_at") or ""))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise AdapterInvalid(f"{in_folder(where, MANIFEST_FILE)} is not a loraroute manifest; push the adapter again "
                                 "with `loraroute adapters push`", code="manifest") from None
        if not VERSION_RE.match(manifest.version) or manifest.version != version_of(files) \
                or set(files) != set(REQUIRED_FILES):
            raise AdapterInvalid(f"{in_folder(where, MANIFEST_FILE)} is inconsistent (its version does not match its "
                                 "checksums, or files are missing); push the adapter again", code="manifest")
        return manifest

    def mismatch(self, folder: Path) -> str:
        """"" when every file in ``folder`` matches; otherwise which one differs and how."""
        for name, entry in sorted(self.files.items()):
            path = folder / name
            size = path.stat().st_size if path.is_file() else -1
            if size != entry.size:
                return f"{name} is {size} bytes, the manifest says {entry.size}"
            digest = sha256_file(path)
            if digest != entry.sha256:
                return f"{name} has sha256 {digest[:12]}…, the manifest says {entry.sha256[:12]}…"
        return ""

    def summary(self) -> dict[str, Any]:
        return {"version": self.version, "rank": self.rank, "pushed_at": self.pushed_at,
                "size_bytes": sum(f.size for f in self.files.values()),
                "sha256": {n: f.sha256 for n, f in sorted(self.files.items())}}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def version_of(files: Mapping[str, FileEntry]) -> str:
    lines = "".join(f"{name} {entry.sha256}\n" for name, entry in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()[:12]


def build(adapter: str, folder: Path, *, rank: int | None, base_model: str | None,
          pushed_at: str | None = None) -> Manifest:
    """The manifest of the adapter files in ``folder`` (checksums computed here); ``pushed_at``
    defaults to now."""
    files = {name: FileEntry(sha256_file(folder / name), (folder / name).stat().st_size) for name in REQUIRED_FILES}
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) if pushed_at is None else pushed_at
    return Manifest(adapter=adapter, version=version_of(files), files=files, rank=rank, base_model=base_model,
                    pushed_at=when)


def read_local(folder: Path) -> Manifest | None:
    """The manifest kept in a local adapter folder, or None (none, or unreadable)."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return Manifest.parse(path.read_bytes(), where=f"{folder}/")
    except (AdapterInvalid, OSError):
        return None


def _parent(prefix: str) -> str:
    trimmed = prefix.rstrip("/")
    return trimmed.rsplit("/", 1)[0] + "/" if "/" in trimmed else ""


def versions_root(prefix: str, adapter: str) -> str:
    """``adapters/sql/`` -> ``adapters/.versions/sql/``: where every pushed version of it stays."""
    return f"{_parent(prefix)}.versions/{adapter}/"


def versions_prefix(prefix: str, adapter: str, version: str) -> str:
    """The immutable copy of one version: ``adapters/.versions/sql/3f2a9c1b7d4e/``."""
    return f"{versions_root(prefix, adapter)}{version}/"
