"""Where proposals and the approved overlay live: Redis (shared by every gateway replica) or a
file (one gateway with the ``memory://`` store).

Redis keys (``prefix`` is ``store.key_prefix``):

- ``{prefix}:changes`` — hash ``change id -> change JSON``; ``{prefix}:changes:seq`` numbers them;
- ``{prefix}:changes:overlay`` — the overlay JSON (``gateway.changes.Overlay``, with a
  ``generation`` every replica polls);
- ``{prefix}:changes:lock`` — held (``SET NX PX``, released only by its holder) while one
  replica decides and applies a change, so two approvals of one change cannot both apply it.

File: ``<state_dir>/changes.json`` ``{"seq", "overlay", "changes"}``, replaced atomically
(write, fsync, rename) on every change, guarded by an asyncio lock.

Both keep at most ``keep`` decided changes (the oldest are dropped; pending ones always stay);
the audit log (gateway/audit.py) keeps the history.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from redis.asyncio import Redis

from gateway.change_model import Change, Overlay
from gateway.errors import APIError

KEEP = 1000
_LOCK_TTL_MS = 120_000
_LOCK_WAIT_S = 30.0


class ChangeStore(Protocol):
    async def next_id(self) -> str: ...

    async def get(self, change_id: str) -> Change | None: ...

    async def put(self, change: Change) -> None: ...

    async def all(self) -> list[Change]: ...

    async def overlay(self) -> Overlay | None: ...

    async def set_overlay(self, overlay: Overlay) -> None: ...

    def lock(self) -> contextlib.AbstractAsyncContextManager[None]: ...


def _prune(changes: list[Change], keep: int) -> list[str]:
    """Ids of the oldest decided changes beyond ``keep``."""
    decided = sorted((c for c in changes if c.status != "pending"), key=lambda c: c.proposed_at)
    return [c.id for c in decided[: max(0, len(decided) - keep)]]


class FileChangeStore:
    def __init__(self, path: Path, *, keep: int = KEEP) -> None:
        self.path = path
        self.keep = keep
        self._lock = asyncio.Lock()
        self._data: dict[str, Any] = {"seq": 0, "overlay": None, "changes": {}}

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            self._data = json.loads(self.path.read_text(encoding="utf-8"))

    def _save(self) -> None:
        tmp = self.path.with_name(self.path.name + f".tmp-{secrets.token_hex(4)}")
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(self._data, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    async def next_id(self) -> str:
        self._data["seq"] = int(self._data.get("seq", 0)) + 1
        await asyncio.to_thread(self._save)
        return f"chg-{self._data['seq']}"

    async def get(self, change_id: str) -> Change | None:
        found = self._data["changes"].get(change_id)
        return Change.model_validate(found) if found is not None else None

    async def put(self, change: Change) -> None:
        changes = self._data["changes"]
        changes[change.id] = change.model_dump(mode="json")
        for old in _prune([Change.model_validate(c) for c in changes.values()], self.keep):
            del changes[old]
        await asyncio.to_thread(self._save)

    async def all(self) -> list[Change]:
        return [Change.model_validate(c) for c in self._data["changes"].values()]

    async def overlay(self) -> Overlay | None:
        found = self._data.get("overlay")
        return Overlay.model_validate(found) if found is not None else None

    async def set_overlay(self, overlay: Overlay) -> None:
        self._data["overlay"] = overlay.model_dump(mode="json")
        await asyncio.to_thread(self._save)

    @contextlib.asynccontextmanager
    async def lock(self) -> AsyncIterator[None]:
        async with self._lock:
            yield


class RedisChangeStore:
    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"

    def __init__(self, redis: Redis, prefix: str, *, keep: int = KEEP) -> None:
        self._redis = redis
        self._changes = f"{prefix}:changes"
        self._seq = f"{prefix}:changes:seq"
        self._overlay = f"{prefix}:changes:overlay"
        self._lock_key = f"{prefix}:changes:lock"
        self.keep = keep

    async def next_id(self) -> str:
        return f"chg-{int(await self._redis.incr(self._seq))}"

    async def get(self, change_id: str) -> Change | None:
        raw = await self._redis.hget(self._changes, change_id)
        return Change.model_validate_json(raw) if raw is not None else None

    async def put(self, change: Change) -> None:
        await self._redis.hset(self._changes, change.id, change.model_dump_json())
        if await self._redis.hlen(self._changes) > self.keep + 50:
            old = _prune(await self.all(), self.keep)
            if old:
                await self._redis.hdel(self._changes, *old)

    async def all(self) -> list[Change]:
        return [Change.model_validate_json(v) for v in (await self._redis.hgetall(self._changes)).values()]

    async def overlay(self) -> Overlay | None:
        raw = await self._redis.get(self._overlay)
        return Overlay.model_validate_json(raw) if raw is not None else None

    async def set_overlay(self, overlay: Overlay) -> None:
        await self._redis.set(self._overlay, overlay.model_dump_json())

    @contextlib.asynccontextmanager
    async def lock(self) -> AsyncIterator[None]:
        token = secrets.token_hex(8)
        deadline = time.monotonic() + _LOCK_WAIT_S
        while not await self._redis.set(self._lock_key, token, nx=True, px=_LOCK_TTL_MS):
            if time.monotonic() > deadline:
                raise APIError(503, "another gateway replica has been applying a change for 30 s; try again",
                               code="change_busy")
            await asyncio.sleep(0.05)
        try:
            yield
        finally:
            await self._redis.eval(self._RELEASE, 1, self._lock_key, token)
