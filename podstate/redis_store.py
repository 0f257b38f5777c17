"""Redis-backed pod-state store: many writers (sidecars), many readers (gateway replicas).

Layout (``prefix`` defaults to ``loraroute``):

- ``{prefix}:pod:{pod_id}`` — the PodState JSON, written with ``SET ... PX ttl``; a sidecar that
  dies stops refreshing it and Redis drops it after the TTL.
- ``{prefix}:pods`` — a pub/sub channel carrying every write, so readers update within
  milliseconds. Messages are JSON:
  ``{"op":"set","ttl_ms":N,"state":{...}}`` (content changed),
  ``{"op":"hb","pod_id":..,"observed_at":..,"published_at":..,"ttl_ms":N}`` (heartbeat: nothing
  but the timestamps changed; the key itself is still rewritten in full),
  ``{"op":"del","pod_id":..}`` (clean withdrawal).

Readers keep a local dict (``view()`` never touches the network) with a local expiry deadline
per pod (receipt time + TTL, so clocks need not agree). Healing:

- every ``resync_interval_s`` (default 1 s) a reader SCANs the keys and reloads values and PTTLs
  (a missed message heals within one interval);
- the subscriber reconnects with exponential backoff (50 ms doubling to 2 s) and resyncs at
  once; while Redis is unreachable (the subscription is down, or nothing — no message, no
  successful resync — came for ``liveness_s``, as when Redis hangs) the view keeps the last
  known state and does not expire it; ``last_contact()`` is the last sign of life, against which
  the gateway judges freshness, so the last view does not age during an outage; once Redis
  answers again every deadline is extended by ``reconnect_grace_s`` so that pods whose keys
  were lost in a Redis restart (or expired while it hung) survive until their sidecars
  publish again (within one heartbeat);
- a writer whose publish fails logs once per outage and, on the first success afterwards,
  republishes every state it owns in full.

Nothing here raises into callers on Redis failures: ``publish`` and ``withdraw`` log and return.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from podstate import redact_url
from podstate.store import PodStateStore
from scorer.model import PodState

log = logging.getLogger("loraroute.podstate.redis")


class RedisStore(PodStateStore):
    """PodState in Redis with TTLs and pub/sub; a local view kept fresh by pushes and resyncs.

    Parameters (defaults): ``key_prefix`` ("loraroute"), ``resync_interval_s`` (1.0),
    ``reader`` (True: subscribe and keep a view; a sidecar that only writes passes False),
    ``sweep_interval_s`` (0.05: how often expired pods leave the view),
    ``reconnect_grace_s`` (2.0), ``socket_timeout_s`` (2.0) for commands, ``password`` (None:
    the URL's, if any; never logged), ``liveness_s`` (3.0: no sign of life for this long counts
    as unreachable; a resync runs every ``resync_interval_s``).
    """

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "loraroute",
        resync_interval_s: float = 1.0,
        reader: bool = True,
        sweep_interval_s: float = 0.05,
        reconnect_grace_s: float = 2.0,
        socket_timeout_s: float = 2.0,
        password: str | None = None,
        liveness_s: float = 3.0,
    ) -> None:
        super().__init__()
        self.url = url
        self.key_prefix = key_prefix
        self.channel = f"{key_prefix}:pods"
        self.resync_interval_s = resync_interval_s
        self.reader = reader
        self.sweep_interval_s = sweep_interval_s
        self.reconnect_grace_s = reconnect_grace_s
        self._socket_timeout_s = socket_timeout_s
        self._password = password
        self._client: aioredis.Redis | None = None
        self._sub_client: aioredis.Redis | None = None
        self._states: dict[str, PodState] = {}
        self._deadlines: dict[str, float] = {}
        self._tombstones: dict[str, float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._connected = False
        self.liveness_s = liveness_s
        self._last_contact = 0.0  # Unix time of the last message or successful resync
        self._outage = False  # the sweeper saw the store unreachable and has not extended deadlines yet
        self._resync_wanted = asyncio.Event()
        # writer side
        self._owned: dict[str, tuple[PodState, float]] = {}
        self._last_sent: dict[str, PodState] = {}
        self._writer_ok = True
        self.stats: dict[str, int] = {"messages": 0, "resyncs": 0, "reconnects": 0, "publish_errors": 0}

    # --- helpers ------------------------------------------------------------------------------
    def key(self, pod_id: str) -> str:
        return f"{self.key_prefix}:pod:{pod_id}"

    def _new_client(self, socket_timeout: float | None) -> aioredis.Redis:
        return aioredis.Redis.from_url(
            self.url,
            socket_connect_timeout=1.0,
            socket_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            **({"password": self._password} if self._password else {}),
        )

    @property
    def connected(self) -> bool:
        """True while the reader's subscription is up (always False for a write-only store)."""
        return self._connected

    def last_contact(self) -> float | None:
        return self._last_contact

    @property
    def reachable(self) -> bool:
        """The subscription is up and the store showed a sign of life within ``liveness_s``."""
        return self._connected and time.time() - self._last_contact < self.liveness_s

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._client is not None:
            return
        self._client = self._new_client(self._socket_timeout_s)
        if not self.reader:
            return
        self._sub_client = self._new_client(None)
        with contextlib.suppress(RedisError, OSError):
            await self._resync_once()
        self._tasks = [
            asyncio.create_task(self._subscribe_forever(), name="redis-store-subscribe"),
            asyncio.create_task(self._resync_forever(), name="redis-store-resync"),
            asyncio.create_task(self._sweep_forever(), name="redis-store-sweep"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        for client in (self._client, self._sub_client):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()
        self._client = self._sub_client = None
        self._connected = False

    # --- writer side --------------------------------------------------------------------------
    async def publish(self, state: PodState, ttl_s: float) -> None:
        if self._client is None:
            await self.start()
        assert self._client is not None
        ttl_ms = max(1, int(ttl_s * 1000))
        self._owned[state.pod_id] = (state, ttl_s)
        previous = self._last_sent.get(state.pod_id)
        if self._writer_ok and previous is not None and state.same_content(previous):
            message: dict[str, Any] = {
                "op": "hb", "pod_id": state.pod_id, "observed_at": state.observed_at,
                "published_at": state.published_at, "healthy": state.healthy, "ttl_ms": ttl_ms,
            }
        else:
            message = {"op": "set", "ttl_ms": ttl_ms, "state": state.to_dict()}
        try:
            await self._write(state, ttl_ms, message)
        except (RedisError, OSError) as exc:
            self.stats["publish_errors"] += 1
            if self._writer_ok:
                log.warning("redis at %s unreachable while publishing pod %s (%s); will retry on the next "
                            "heartbeat", redact_url(self.url), state.pod_id, type(exc).__name__)
            self._writer_ok = False
            return
        self._last_sent[state.pod_id] = state
        if not self._writer_ok:
            self._writer_ok = True
            log.info("redis at %s reachable again; republishing %d pod(s)", redact_url(self.url), len(self._owned))
            for other, other_ttl in list(self._owned.values()):
                if other.pod_id != state.pod_id:
                    with contextlib.suppress(RedisError, OSError):
                        other_ms = max(1, int(other_ttl * 1000))
                        await self._write(other, other_ms, {"op": "set", "ttl_ms": other_ms, "state": other.to_dict()})

    async def _write(self, state: PodState, ttl_ms: int, message: dict[str, Any]) -> None:
        assert self._client is not None
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.set(self.key(state.pod_id), state.to_json(), px=ttl_ms)
            pipe.publish(self.channel, json.dumps(message, separators=(",", ":")))
            await pipe.execute()

    async def withdraw(self, pod_id: str) -> None:
        self._owned.pop(pod_id, None)
        self._last_sent.pop(pod_id, None)
        if self._client is None:
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.delete(self.key(pod_id))
                pipe.publish(self.channel, json.dumps({"op": "del", "pod_id": pod_id}))
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("could not withdraw pod %s from redis (%s); it expires with its TTL", pod_id,
                        type(exc).__name__)

    # --- reader side ----------------------------------------------------------------------------
    def view(self) -> Mapping[str, PodState]:
        return MappingProxyType(self._states)

    def _set(self, state: PodState, ttl_ms: int) -> None:
        self._deadlines[state.pod_id] = time.monotonic() + ttl_ms / 1000.0
        old = self._states.get(state.pod_id)
        if old is not None and old == state:
            return
        self._states[state.pod_id] = state
        self._notify(state.pod_id, state)

    def _drop(self, pod_id: str, withdrawn: bool = False) -> None:
        if withdrawn:
            self._tombstones[pod_id] = time.monotonic()
        self._deadlines.pop(pod_id, None)
        if self._states.pop(pod_id, None) is not None:
            self._notify(pod_id, None)

    def _apply(self, raw: bytes | str) -> None:
        """Apply one pub/sub message to the view. Malformed messages are logged and skipped."""
        self.stats["messages"] += 1
        self._last_contact = time.time()
        try:
            msg = json.loads(raw)
            op = msg["op"]
            if op == "set":
                self._tombstones.pop(msg["state"]["pod_id"], None)
                self._set(PodState.from_dict(msg["state"]), int(msg["ttl_ms"]))
            elif op == "hb":
                pod_id = msg["pod_id"]
                old = self._states.get(pod_id)
                if old is None or old.healthy != bool(msg.get("healthy", old.healthy)):
                    self._resync_wanted.set()  # missed the full record: fetch it
                    return
                self._set(old.replace(observed_at=float(msg["observed_at"]),
                                      published_at=float(msg["published_at"])), int(msg["ttl_ms"]))
            elif op == "del":
                self._drop(str(msg["pod_id"]), withdrawn=True)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("skipping malformed pod-state message on %s: %s", self.channel, exc)

    async def _resync_once(self) -> None:
        """Reload every pod key and its remaining TTL; pods missing from Redis keep their deadline."""
        assert self._client is not None
        started = time.monotonic()
        keys = [k async for k in self._client.scan_iter(match=f"{self.key_prefix}:pod:*", count=500)]
        self.stats["resyncs"] += 1
        self._last_contact = time.time()
        if not keys:
            return
        async with self._client.pipeline(transaction=False) as pipe:
            for k in keys:
                pipe.get(k)
                pipe.pttl(k)
            results = await pipe.execute()
        self._last_contact = time.time()
        for i in range(len(keys)):
            value, pttl = results[2 * i], results[2 * i + 1]
            if value is None or pttl == -2:
                continue
            try:
                state = PodState.from_json(value)
            except ValueError as exc:
                log.warning("skipping unreadable pod-state key %r: %s", keys[i], exc)
                continue
            if self._tombstones.get(state.pod_id, -1.0) >= started:
                continue  # withdrawn while this resync was in flight
            current = self._states.get(state.pod_id)
            if current is not None and current.published_at > state.published_at:
                continue  # a newer message arrived while this resync was in flight
            self._set(state, int(pttl) if pttl and pttl > 0 else 3_600_000)
        cutoff = time.monotonic() - 60.0
        for pod_id in [p for p, t in self._tombstones.items() if t < cutoff]:
            del self._tombstones[pod_id]

    async def _subscribe_forever(self) -> None:
        backoff = 0.05
        outage_logged = False
        while True:
            assert self._sub_client is not None
            pubsub = self._sub_client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                if not self._connected:
                    now = time.monotonic()
                    for pod_id, deadline in self._deadlines.items():
                        self._deadlines[pod_id] = max(deadline, now + self.reconnect_grace_s)
                    if outage_logged:
                        self.stats["reconnects"] += 1
                        log.info("redis at %s reachable again; resyncing", redact_url(self.url))
                self._connected = True
                self._last_contact = time.time()
                backoff = 0.05
                outage_logged = False
                self._resync_wanted.set()
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        self._apply(msg["data"])
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self._connected = False
                if not outage_logged:
                    log.warning("redis at %s unreachable (%s); keeping the last known view and retrying",
                                redact_url(self.url), type(exc).__name__)
                    outage_logged = True
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _resync_forever(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._resync_wanted.wait(), timeout=self.resync_interval_s)
            self._resync_wanted.clear()
            if not self._connected:
                continue
            try:
                await self._resync_once()
            except (RedisError, OSError):
                pass  # the subscriber notices the outage and logs it

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            now = time.monotonic()
            if not self.reachable:
                self._outage = True
                continue  # keep the last known state while Redis is down or hangs
            if self._outage:  # back: give the pods whose keys expired meanwhile time to publish
                self._outage = False
                for pod_id, deadline in self._deadlines.items():
                    self._deadlines[pod_id] = max(deadline, now + self.reconnect_grace_s)
                continue
            for pod_id in [p for p, t in self._deadlines.items() if t <= now]:
                self._drop(pod_id)
