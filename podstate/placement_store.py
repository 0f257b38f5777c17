"""What placers share: demand snapshots (persisted), the leader lease, the leader's status.

One interface (``PlacementStore``), two implementations chosen by the pod-state store's URL
(``open_placement_store``):

- ``RedisPlacementStore`` (``redis://…``): every gateway replica and sidecar sees the same.
  Keys (``prefix`` = ``store.key_prefix``, default ``loraroute``):

  - ``{prefix}:demand:{writer}`` — one writer's ``DemandSnapshot`` JSON, ``SET … PX retention``:
    refreshed on every publish, so a replica that is gone for good drops out after the
    retention (7 days by default) while a cluster restarted overnight still reads yesterday's.
    Persisted as far as Redis is (RDB/AOF in production).
  - ``{prefix}:placer:lease`` — the leader's id with a TTL, taken with ``SET NX PX`` and renewed
    or released only by its holder (compare-and-set in one Lua script, atomic in Redis).
  - ``{prefix}:placer:status`` — the leader's ``PlacerStatus`` (pods held out of traffic while
    they warm up), with the lease's TTL: when the leader dies the holds lapse with it.

- ``MemoryPlacementStore`` (``memory://``: one process): the same in a dict; demand snapshots
  are persisted to a JSON file when one is given (written whole, atomically, on every publish).

Failures never raise into callers: a Redis error logs once per outage and reads as "nothing"
(no snapshots, no status) or "not the leader" (a lease that cannot be renewed is lost).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scorer.demand import DemandSnapshot

log = logging.getLogger("loraroute.podstate.placement")

DEFAULT_RETENTION_S = 7 * 86400.0


@dataclass(frozen=True, slots=True)
class PlacerStatus:
    """What the leading placer tells the other replicas: its id and the pods it holds back."""

    leader: str
    at: float
    warming: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps({"leader": self.leader, "at": self.at, "warming": list(self.warming)})

    @classmethod
    def from_json(cls, raw: str | bytes) -> PlacerStatus:
        data = json.loads(raw)
        if not isinstance(data, dict) or not isinstance(data.get("leader"), str):
            raise ValueError("placer status needs a 'leader' string")
        warming = data.get("warming") or []
        if not isinstance(warming, list) or not all(isinstance(p, str) for p in warming):
            raise ValueError("placer status 'warming' must be a list of pod ids")
        return cls(data["leader"], float(data.get("at", 0.0)), tuple(warming))


class PlacementStore(abc.ABC):
    """See the module docstring."""

    async def start(self) -> None:
        """Connect (Redis) or read the persisted file (memory). Idempotent."""

    async def close(self) -> None:
        """Release connections. Idempotent."""

    @abc.abstractmethod
    async def publish_demand(self, snapshot: DemandSnapshot, retention_s: float = DEFAULT_RETENTION_S) -> None:
        """Store (replace) ``snapshot.writer``'s snapshot, kept ``retention_s`` seconds."""

    @abc.abstractmethod
    async def load_demand(self) -> list[DemandSnapshot]:
        """Every writer's latest snapshot (unreadable ones are skipped with a warning)."""

    @abc.abstractmethod
    async def acquire_lease(self, holder: str, ttl_s: float) -> bool:
        """Take the leader lease for ``ttl_s`` seconds, or renew it if ``holder`` has it."""

    @abc.abstractmethod
    async def release_lease(self, holder: str) -> None:
        """Give the lease up, if ``holder`` has it."""

    @abc.abstractmethod
    async def lease_holder(self) -> str | None:
        """Who leads now (None: nobody, or the store is unreachable)."""

    @abc.abstractmethod
    async def publish_status(self, status: PlacerStatus, ttl_s: float) -> None:
        """The leader's status, valid ``ttl_s`` seconds."""

    @abc.abstractmethod
    async def load_status(self) -> PlacerStatus | None:
        """The leader's last status, or None when it has expired."""


class MemoryPlacementStore(PlacementStore):
    """One process. ``path``: a JSON file that persists the demand snapshots (None: memory only)."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._demand: dict[str, tuple[DemandSnapshot, float]] = {}  # writer -> (snapshot, expires at, unix)
        self._lease: tuple[str, float] | None = None  # (holder, monotonic expiry)
        self._status: tuple[PlacerStatus, float] | None = None
        self._started = False
        self._write_lock = asyncio.Lock()

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        if self.path is not None and self.path.exists():
            loaded = await asyncio.to_thread(_read_file, self.path)
            for snap, expires in loaded:
                self._demand.setdefault(snap.writer, (snap, expires))

    async def publish_demand(self, snapshot: DemandSnapshot, retention_s: float = DEFAULT_RETENTION_S) -> None:
        self._demand[snapshot.writer] = (snapshot, time.time() + retention_s)
        self._expire()
        if self.path is not None:
            items = list(self._demand.values())
            async with self._write_lock:
                try:
                    await asyncio.to_thread(_write_file, self.path, items)
                except OSError as e:
                    log.warning("cannot persist demand to %s (%s); keeping it in memory", self.path, e.strerror or e)

    async def load_demand(self) -> list[DemandSnapshot]:
        self._expire()
        return [snap for snap, _ in self._demand.values()]

    def _expire(self) -> None:
        now = time.time()
        for writer in [w for w, (_, exp) in self._demand.items() if exp <= now]:
            del self._demand[writer]

    async def acquire_lease(self, holder: str, ttl_s: float) -> bool:
        now = time.monotonic()
        if self._lease is None or self._lease[1] <= now or self._lease[0] == holder:
            self._lease = (holder, now + ttl_s)
            return True
        return False

    async def release_lease(self, holder: str) -> None:
        if self._lease is not None and self._lease[0] == holder:
            self._lease = None

    async def lease_holder(self) -> str | None:
        if self._lease is None or self._lease[1] <= time.monotonic():
            return None
        return self._lease[0]

    async def publish_status(self, status: PlacerStatus, ttl_s: float) -> None:
        self._status = (status, time.monotonic() + ttl_s)

    async def load_status(self) -> PlacerStatus | None:
        if self._status is None or self._status[1] <= time.monotonic():
            return None
        return self._status[0]


def _read_file(path: Path) -> list[tuple[DemandSnapshot, float]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        items = data["snapshots"]
        if not isinstance(items, list):
            raise ValueError("'snapshots' must be a list")
        out = [(DemandSnapshot.from_dict(item["snapshot"]), float(item["expires_at"])) for item in items]
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable demand file %s (%s)", path, e)
        return []
    now = time.time()
    return [(s, exp) for s, exp in out if exp > now]


def _write_file(path: Path, items: list[tuple[DemandSnapshot, float]]) -> None:
    body = json.dumps({"snapshots": [{"snapshot": s.to_dict(), "expires_at": exp} for s, exp in items]})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".demand-", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(body)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


_RENEW = """
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisPlacementStore(PlacementStore):
    """See the module docstring. ``password``: None uses the URL's, if any; never logged."""

    def __init__(self, url: str, *, key_prefix: str = "loraroute", password: str | None = None,
                 socket_timeout_s: float = 2.0) -> None:
        self.url = url
        self.key_prefix = key_prefix
        self._password = password
        self._timeout = socket_timeout_s
        self._client: Any = None
        self._renew: Any = None
        self._release: Any = None
        self._outage = False

    @property
    def lease_key(self) -> str:
        return f"{self.key_prefix}:placer:lease"

    @property
    def status_key(self) -> str:
        return f"{self.key_prefix}:placer:status"

    def demand_key(self, writer: str) -> str:
        return f"{self.key_prefix}:demand:{writer}"

    async def start(self) -> None:
        if self._client is not None:
            return
        import redis.asyncio as aioredis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._client = aioredis.Redis.from_url(
            self.url, socket_connect_timeout=1.0, socket_timeout=self._timeout, retry=Retry(NoBackoff(), 0),
            health_check_interval=0, **({"password": self._password} if self._password else {}),
        )
        self._renew = self._client.register_script(_RENEW)
        self._release = self._client.register_script(_RELEASE)

    async def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()
        self._client = None

    def _failed(self, what: str, exc: BaseException) -> None:
        from podstate import redact_url

        if not self._outage:
            log.warning("redis at %s unreachable while %s (%s); placement state unavailable until it is back",
                        redact_url(self.url), what, type(exc).__name__)
        self._outage = True

    def _ok(self) -> None:
        if self._outage:
            log.info("placement state reachable again")
        self._outage = False

    async def _call(self, what: str, coro_fn: Any, default: Any) -> Any:
        from redis.exceptions import RedisError

        if self._client is None:
            await self.start()
        try:
            result = await coro_fn()
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._failed(what, exc)
            return default
        self._ok()
        return result

    async def publish_demand(self, snapshot: DemandSnapshot, retention_s: float = DEFAULT_RETENTION_S) -> None:
        body = json.dumps(snapshot.to_dict(), separators=(",", ":"))
        await self._call("publishing demand", lambda: self._client.set(
            self.demand_key(snapshot.writer), body, px=max(1, int(retention_s * 1000))), None)

    async def load_demand(self) -> list[DemandSnapshot]:
        async def read() -> list[Any]:
            keys = [k async for k in self._client.scan_iter(match=self.demand_key("*"), count=500)]
            return list(zip(keys, await self._client.mget(keys))) if keys else []

        out = []
        for key, raw in await self._call("reading demand", read, []):
            if raw is None:
                continue
            try:
                out.append(DemandSnapshot.from_dict(json.loads(raw)))
            except ValueError as e:
                log.warning("skipping unreadable demand key %r: %s", key, e)
        return out

    async def acquire_lease(self, holder: str, ttl_s: float) -> bool:
        got = await self._call("renewing the placer lease", lambda: self._renew(
            keys=[self.lease_key], args=[holder, max(1, int(ttl_s * 1000))]), 0)
        return bool(got)

    async def release_lease(self, holder: str) -> None:
        await self._call("releasing the placer lease", lambda: self._release(keys=[self.lease_key], args=[holder]), 0)

    async def lease_holder(self) -> str | None:
        raw = await self._call("reading the placer lease", lambda: self._client.get(self.lease_key), None)
        return raw.decode() if isinstance(raw, bytes) else raw

    async def publish_status(self, status: PlacerStatus, ttl_s: float) -> None:
        await self._call("publishing the placer status", lambda: self._client.set(
            self.status_key, status.to_json(), px=max(1, int(ttl_s * 1000))), None)

    async def load_status(self) -> PlacerStatus | None:
        raw = await self._call("reading the placer status", lambda: self._client.get(self.status_key), None)
        if raw is None:
            return None
        try:
            return PlacerStatus.from_json(raw)
        except ValueError as e:
            log.warning("ignoring unreadable placer status: %s", e)
            return None


def open_placement_store(url: str | None, *, key_prefix: str = "loraroute", file: str | None = None,
                         password: str | None = None) -> PlacementStore:
    """The placement store that goes with a pod-state store URL (see the module docstring)."""
    if not url or url.startswith("memory:"):
        return MemoryPlacementStore(file)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisPlacementStore(url, key_prefix=key_prefix, password=password)
    raise ValueError(f"unknown state store URL scheme in {url!r}; use memory:// or redis://host:port/db")
