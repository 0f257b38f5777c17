"""Split a file into parts of a fixed size with a sha256 manifest; join them back, refusing any
part that does not match.

Standard library only: the GPU host runs this before anything else of the kit is unpacked.

Manifest (``manifest.json`` beside the parts)::

    {"file": "kit.tar.xz", "size": 189906432, "sha256": "...", "part_size": 62914560,
     "parts": [{"file": "kit.tar.xz.000", "size": 62914560, "sha256": "..."}, ...],
     "info": {...free-form facts about the contents...}}
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
DEFAULT_PART_MIB = 60
MANIFEST = "manifest.json"
_CHUNK = 4 * MIB


class PartsError(RuntimeError):
    """A part is missing, has the wrong size or checksum, or the manifest is unreadable."""


@dataclass(frozen=True)
class Part:
    file: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    file: str
    size: int
    sha256: str
    part_size: int
    parts: tuple[Part, ...]
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        d = asdict(self)
        d["parts"] = [asdict(p) for p in self.parts]
        return json.dumps(d, indent=1)

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            d = json.loads(path.read_text())
            parts = tuple(Part(str(p["file"]), int(p["size"]), str(p["sha256"])) for p in d["parts"])
            return cls(str(d["file"]), int(d["size"]), str(d["sha256"]), int(d["part_size"]), parts,
                       dict(d.get("info") or {}))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PartsError(f"manifest {path} is unreadable ({type(e).__name__}: {e}); copy it again") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _chunks(f: Any, n: int) -> Iterator[bytes]:
    """Up to ``n`` bytes of ``f`` in pieces."""
    left = n
    while left > 0:
        data = f.read(min(_CHUNK, left))
        if not data:
            return
        left -= len(data)
        yield data


def split(path: Path, out_dir: Path, part_size: int = DEFAULT_PART_MIB * MIB,
          info: dict[str, Any] | None = None) -> Manifest:
    """Write ``path`` as ``<name>.000``, ``.001``, … of at most ``part_size`` bytes into
    ``out_dir`` with ``manifest.json``; stale parts of an earlier split are removed."""
    if part_size < 1:
        raise ValueError("part_size must be positive")
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(f"{path.name}.[0-9][0-9][0-9]"):
        old.unlink()
    whole = hashlib.sha256()
    parts: list[Part] = []
    with open(path, "rb") as f:
        while True:
            name = f"{path.name}.{len(parts):03d}"
            h = hashlib.sha256()
            size = 0
            with open(out_dir / name, "wb") as out:
                for data in _chunks(f, part_size):
                    out.write(data)
                    h.update(data)
                    whole.update(data)
                    size += len(data)
            if size == 0:
                (out_dir / name).unlink()
                break
            parts.append(Part(name, size, h.hexdigest()))
            if size < part_size:
                break
    manifest = Manifest(path.name, sum(p.size for p in parts), whole.hexdigest(), part_size, tuple(parts),
                        dict(info or {}))
    (out_dir / MANIFEST).write_text(manifest.to_json())
    return manifest


def verify(parts_dir: Path, manifest: Manifest | None = None) -> Manifest:
    """Check every part's presence, size and sha256; raise ``PartsError`` naming the first bad one."""
    manifest = manifest or Manifest.read(parts_dir / MANIFEST)
    for part in manifest.parts:
        p = parts_dir / part.file
        if not p.is_file():
            raise PartsError(f"part {part.file} is missing from {parts_dir}; copy it there")
        size = p.stat().st_size
        if size != part.size:
            raise PartsError(f"part {part.file} has {size} bytes, the manifest says {part.size}: "
                             "the copy is incomplete; copy it again")
        digest = sha256_file(p)
        if digest != part.sha256:
            raise PartsError(f"part {part.file} is corrupted (sha256 {digest[:12]}…, expected "
                             f"{part.sha256[:12]}…); copy it again")
    return manifest


def join(parts_dir: Path, out_path: Path) -> Manifest:
    """Verify the parts, then concatenate them into ``out_path`` and check the whole file."""
    manifest = verify(parts_dir)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    whole = hashlib.sha256()
    tmp = out_path.with_name(out_path.name + ".partial")
    with open(tmp, "wb") as out:
        for part in manifest.parts:
            with open(parts_dir / part.file, "rb") as f:
                for data in iter(lambda: f.read(_CHUNK), b""):
                    out.write(data)
                    whole.update(data)
    if whole.hexdigest() != manifest.sha256:
        tmp.unlink()
        raise PartsError(f"the joined {manifest.file} does not match the manifest's sha256; "
                         "the parts come from different builds: copy all of them again")
    tmp.replace(out_path)
    return manifest
