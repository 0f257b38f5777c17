"""The append-only audit log of run-time changes: JSON lines, in Redis or in a file.

One entry per event::

    {"seq": 17, "at": 1748770200.123, "time": "2025-06-01T09:30:00Z", "event": "approved",
     "change_id": "chg-5", "kind": "adapter.roll", "by": "bob", "what": "roll tsuzumi-base:sql to 9f8e7d6c5b4a",
     "before": {"version": "3f2a9c1b7d4e"}, "after": {"version": "9f8e7d6c5b4a"},
     "checksums": {"adapter_model.safetensors": "…"}, "detail": "…"}

Events: ``proposed``, ``approved``, ``rejected``, ``applied`` (the change took effect; for a roll
with each pod's result), ``failed`` (it could not take effect, or some pods could not swap),
``expired`` (pending beyond ``changes.proposal_ttl_s``), ``rolled_back`` (on the original, when a
rollback change undid it). ``by`` is the key's name, never the key.

- ``RedisAuditLog``: ``RPUSH {prefix}:audit`` (sequence numbers from ``INCR {prefix}:audit:seq``),
  trimmed to the newest ``changes.audit_keep`` entries.
- ``FileAuditLog``: ``<state_dir>/audit.jsonl``, appended and fsynced per entry; beyond
  ``audit_keep`` lines it is renamed to ``audit.jsonl.1`` (one older file is kept) and a new one
  starts.

Every entry is also written to the ``loraroute.audit`` logger as one JSON line, so a log
pipeline keeps the complete history beyond what the store retains.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from redis.asyncio import Redis

log = logging.getLogger("loraroute.audit")


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int
    at: float
    event: str
    change_id: str
    kind: str
    by: str
    what: str
    before: Any = None
    after: Any = None
    checksums: dict[str, str] = field(default_factory=dict)
    detail: Any = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditEntry:
        data = {k: v for k, v in data.items() if k != "time"}
        return cls(**data)


class AuditLog(Protocol):
    async def append(self, entry: AuditEntry) -> AuditEntry:
        """Store ``entry`` with the next sequence number (its ``seq`` is replaced); returns it."""

    async def recent(self, limit: int) -> list[AuditEntry]:
        """The newest ``limit`` entries, oldest first."""


def _finish(entry: AuditEntry, seq: int, on_append: Callable[[AuditEntry], None] | None) -> AuditEntry:
    stored = AuditEntry(seq, entry.at, entry.event, entry.change_id, entry.kind, entry.by, entry.what,
                        entry.before, entry.after, entry.checksums, entry.detail)
    log.info("%s", json.dumps(stored.to_dict(), sort_keys=True))
    if on_append is not None:
        on_append(stored)
    return stored


class FileAuditLog:
    def __init__(self, path: Path, *, keep: int, on_append: Callable[[AuditEntry], None] | None = None) -> None:
        self.path = path
        self.keep = keep
        self._on_append = on_append
        self._lock = asyncio.Lock()
        self._seq = 0
        self._lines = 0

    def open(self) -> None:
        """Read the last sequence number and the line count (once, at start)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for candidate in (self.path, self.path.with_name(self.path.name + ".1")):
            last = self._last_line(candidate)
            if last:
                self._seq = int(json.loads(last)["seq"])
                break
        if self.path.exists():
            with self.path.open("rb") as f:
                self._lines = sum(1 for _ in f)

    @staticmethod
    def _last_line(path: Path) -> bytes:
        if not path.is_file():
            return b""
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 65536))
            lines = [line for line in f.read().splitlines() if line.strip()]
        return lines[-1] if lines else b""

    async def append(self, entry: AuditEntry) -> AuditEntry:
        async with self._lock:
            self._seq += 1
            stored = _finish(entry, self._seq, self._on_append)
            line = json.dumps(stored.to_dict(), sort_keys=True) + "\n"
            await asyncio.to_thread(self._write, line)
            return stored

    def _write(self, line: str) -> None:
        if self._lines >= self.keep:
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            self._lines = 0
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._lines += 1

    async def recent(self, limit: int) -> list[AuditEntry]:
        def read() -> list[AuditEntry]:
            lines: list[bytes] = []
            for candidate in (self.path, self.path.with_name(self.path.name + ".1")):
                if candidate.is_file() and len(lines) < limit:
                    lines = candidate.read_bytes().splitlines()[-(limit - len(lines)):] + lines
            return [AuditEntry.from_dict(json.loads(line)) for line in lines if line.strip()][-limit:]

        return await asyncio.to_thread(read)


class RedisAuditLog:
    def __init__(self, redis: Redis, prefix: str, *, keep: int,
                 on_append: Callable[[AuditEntry], None] | None = None) -> None:
        self._redis = redis
        self._key = f"{prefix}:audit"
        self._seq_key = f"{prefix}:audit:seq"
        self.keep = keep
        self._on_append = on_append

    async def append(self, entry: AuditEntry) -> AuditEntry:
        seq = int(await self._redis.incr(self._seq_key))
        stored = _finish(entry, seq, self._on_append)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.rpush(self._key, json.dumps(stored.to_dict(), sort_keys=True))
            pipe.ltrim(self._key, -self.keep, -1)
            await pipe.execute()
        return stored

    async def recent(self, limit: int) -> list[AuditEntry]:
        raw = await self._redis.lrange(self._key, -limit, -1)
        return [AuditEntry.from_dict(json.loads(r)) for r in raw]
