"""Routing state shared between gateway replicas through Redis (``sharing:`` in the config).

What is shared and how it is merged: ``scorer.sharing``. This module is the transport, a
``Background`` task of its own; the request path never waits on it (it reads the merged figures
the task lays over the pipeline's ``LocalState``).

Layout in Redis (``prefix`` is ``store.key_prefix``):

- ``{prefix}:share`` — a pub/sub channel; every message is msgpack:
  ``["f", replica, seq, [[pod, inflight, tokens, pending_s, [[adapter, age_s], ...]], ...]]``
  (figures, every ``publish_ms`` when they changed, else a heartbeat every ``stale_ms / 3``) and
  ``["c", replica, seq, [[group, A (D×D floats, row-major), b (D floats), count], ...]]``
  (cost-model statistics, every ``costs_ms``).
- ``{prefix}:share:f:{replica}`` and ``{prefix}:share:c:{replica}`` — the latest message of each
  kind, ``SET … PX`` (figures: 4 × ``stale_ms``; costs: 10 × ``costs_ms``), so a replica that
  starts or reconnects reads every peer's latest state at once (its age from the key's PTTL, so
  the replicas' clocks need not agree) and a replica that dies expires.

Metrics (scrape time, only while sharing is on): ``loraroute_sharing_store_ops_total`` (Redis
commands sent: divide by ``loraroute_requests_total`` for operations per request),
``loraroute_sharing_messages_total{direction}`` (published, received),
``loraroute_sharing_malformed_total``, ``loraroute_sharing_peers`` (peers whose figures count now),
``loraroute_sharing_peer_age_seconds`` (the oldest of them), ``loraroute_sharing_connected``.

A publication is one PUBLISH; the figures key is rewritten with it (SET pipelined, one round
trip) at most every ``stale_ms / 3``, so a newcomer's read is at most that much older than the
channel, which it hears from then on. Messages from this replica itself
are ignored. Redis unreachable: one warning, the peers age out within ``stale_ms`` (every replica
routes on its own figures, exactly the local behaviour), reconnect with backoff (50 ms doubling to
2 s), then the keys are read again. A malformed message is counted and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import redis.asyncio as aioredis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from gateway.config import SharingConfig
from podstate.background import Background
from podstate.redis_store import redact_url
from scorer.costmodel import D
from scorer.sharing import (
    GroupStats, Peer, PodFigures, fingerprint, merge_costs, merge_figures, own_cost_stats, own_figures,
)
from scorer.state import LocalState

log = logging.getLogger("loraroute.gateway.sharing")

MAX_PEERS = 256
MAX_PODS = 4096            # pods accepted per message
FIGURES_TTL_FACTOR = 4.0   # figures keys live 4 × stale_ms
COSTS_TTL_FACTOR = 10.0    # cost keys (and a silent peer's statistics) live 10 × costs_ms


@dataclass
class SharingStats:
    """Counters for metrics and the benchmark (``ops``: Redis commands sent)."""

    ops: int = 0
    published: int = 0
    heartbeats: int = 0
    received: int = 0
    malformed: int = 0
    errors: int = 0
    connected: bool = False


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class StateSharing(Background):
    """Publishes this replica's figures and merges its peers' into ``local()`` (the current
    pipeline's state: a reload hands the same object on, so the callable is read each tick)."""

    task_name = "state-sharing"

    def __init__(self, url: str, settings: SharingConfig, local: Callable[[], LocalState], *,
                 key_prefix: str = "loraroute", clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self.settings = settings
        self.local = local
        self.clock = clock
        self.replica = settings.replica_id or default_replica_id()
        self.channel = f"{key_prefix}:share"
        self._fkey = f"{key_prefix}:share:f:"
        self._ckey = f"{key_prefix}:share:c:"
        self.publish_s = settings.publish_ms / 1000.0
        self.stale_s = settings.stale_ms / 1000.0
        self.costs_s = settings.costs_ms / 1000.0
        self.peers: dict[str, Peer] = {}
        self.stats = SharingStats()
        self._seq = 0
        self._last_print: tuple[object, ...] | None = None
        self._last_sent = float("-inf")
        self._last_key = float("-inf")
        self._dirty = False                  # peers' messages arrived since the last merge
        self._next_stale = float("inf")      # when the next fresh peer goes stale
        self._last_costs = float("-inf")

    # --- what the rest of the gateway reads ------------------------------------------------------
    def fresh_peers(self, now: float | None = None) -> dict[str, float]:
        """replica -> age in seconds of its latest figures, for the peers that count now."""
        now = self.clock() if now is None else now
        return {r: now - p.figures_at for r, p in self.peers.items() if now - p.figures_at <= self.stale_s}

    def describe(self) -> dict[str, Any]:
        """For x-loraroute-explain and /admin/pods."""
        ages = self.fresh_peers()
        s = self.stats
        return {"replica": self.replica, "connected": s.connected,
                "peers": {r: round(a * 1000.0, 1) for r, a in sorted(ages.items())},
                "store_ops": s.ops, "published": s.published, "received": s.received}

    # --- the task ----------------------------------------------------------------------------------
    async def _run(self) -> None:
        backoff = 0.05
        logged = False
        while True:
            client = aioredis.Redis.from_url(self.url, socket_connect_timeout=1.0, socket_timeout=2.0)
            sub = aioredis.Redis.from_url(self.url, socket_connect_timeout=1.0, socket_timeout=None)
            pubsub = sub.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.stats.ops += 1
                await self._load_keys(client)
                self._set_connected(True)
                if logged:
                    log.info("redis at %s reachable again: sharing routing state with the other replicas",
                             redact_url(self.url))
                backoff, logged = 0.05, False
                self._last_print = None  # publish in full at once
                self._last_key = float("-inf")
                await self._loop(client, pubsub)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as e:
                self.stats.errors += 1
                if not logged:
                    log.warning("redis at %s unreachable for shared routing state (%s); routing on this "
                                "replica's own state until it is back", redact_url(self.url), type(e).__name__)
                    logged = True
            finally:
                self._set_connected(False)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                with contextlib.suppress(Exception):
                    await sub.aclose()
                with contextlib.suppress(Exception):
                    await client.aclose()
            self._merge()  # the peers age out on the usual clock
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, 2.0)

    def _set_connected(self, on: bool) -> None:
        self.stats.connected = on
        self.local().shared = on

    async def _loop(self, client: aioredis.Redis, pubsub: Any) -> None:
        """A reader that blocks on the channel and a ticker that sleeps ``publish_ms`` (cheaper
        than polling the channel with a timeout every tick); the first to fail ends both."""
        tasks = [asyncio.ensure_future(self._read(pubsub)), asyncio.ensure_future(self._ticks(client))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _read(self, pubsub: Any) -> None:
        async for msg in pubsub.listen():
            if msg.get("type") == "message" and self._on_message(msg["data"], self.clock()):
                self._dirty = True

    async def _ticks(self, client: aioredis.Redis) -> None:
        while True:
            await self._tick(client)
            await asyncio.sleep(self.publish_s)

    async def _tick(self, client: aioredis.Redis) -> None:
        now = self.clock()
        # merge what arrived since the last tick, or when a peer has just gone stale (between
        # those the merged figures do not move: a peer's queue drains as the clock does)
        if self._dirty or now >= self._next_stale:
            self._merge(now)
        local = self.local()
        fp = fingerprint(local)
        heartbeat = now - self._last_sent >= self.stale_s / 3.0
        if fp != self._last_print or heartbeat:
            figures = own_figures(local, now)
            body = ["f", self.replica, self._next_seq(), [
                [pod, f.inflight, f.tokens, round(f.pending_s, 6), [[n, round(a, 4)] for n, a in f.incoming]]
                for pod, f in figures.items()
            ]]
            # the key (what a newcomer reads) is rewritten at most every stale_ms / 3
            with_key = now - self._last_key >= self.stale_s / 3.0
            await self._send(client, self._fkey, body, self.stale_s * FIGURES_TTL_FACTOR, with_key)
            self.stats.published += 1
            if fp == self._last_print:
                self.stats.heartbeats += 1
            self._last_print = fp
            self._last_sent = now
            if with_key:
                self._last_key = now
        if now - self._last_costs >= self.costs_s:
            self._last_costs = now
            stats = own_cost_stats(local.costs)
            if stats:
                body = ["c", self.replica, self._next_seq(), [
                    [g, st.A.ravel().tolist(), st.b.tolist(), st.count] for g, st in stats.items()
                ]]
                await self._send(client, self._ckey, body, self.costs_s * COSTS_TTL_FACTOR)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def _send(self, client: aioredis.Redis, key_prefix: str, body: list[Any], ttl_s: float,
                    with_key: bool = True) -> None:
        """PUBLISH the message; with ``with_key`` also SET it as this replica's key (pipelined)."""
        raw = msgpack.packb(body, use_bin_type=True)
        if not with_key:
            await client.publish(self.channel, raw)
            self.stats.ops += 1
            return
        pipe = client.pipeline(transaction=False)
        pipe.set(key_prefix + self.replica, raw, px=max(1, int(ttl_s * 1000)))
        pipe.publish(self.channel, raw)
        await pipe.execute()
        self.stats.ops += 2

    async def _load_keys(self, client: aioredis.Redis) -> None:
        """Every peer's latest figures and statistics, aged by their keys' remaining TTL."""
        keys = [k async for k in client.scan_iter(match=f"{self.channel}:*", count=500)]
        self.stats.ops += 1 + len(keys) // 500
        if not keys:
            return
        pipe = client.pipeline(transaction=False)
        for k in keys:
            pipe.get(k)
            pipe.pttl(k)
        got = await pipe.execute()
        self.stats.ops += 2 * len(keys)
        now = self.clock()
        for i, key in enumerate(keys):
            raw, pttl = got[2 * i], got[2 * i + 1]
            if raw is None or not isinstance(pttl, int) or pttl < 0:
                continue
            name = key.decode() if isinstance(key, bytes) else str(key)
            full = (self.stale_s * FIGURES_TTL_FACTOR if name.startswith(self._fkey)
                    else self.costs_s * COSTS_TTL_FACTOR)
            self._on_message(raw, now - max(0.0, full - pttl / 1000.0))
        self._merge(now)

    # --- receiving ---------------------------------------------------------------------------------
    def _on_message(self, raw: bytes, received_at: float) -> bool:
        """Apply one message (``received_at``: when it was current); True when it changed a peer."""
        try:
            kind, replica, _seq, items = msgpack.unpackb(raw, raw=False)
            replica = str(replica)
            if replica == self.replica:
                return False
            if kind == "f":
                parsed = _parse_figures(items)
            elif kind == "c":
                parsed = _parse_costs(items)
            else:
                raise ValueError(f"unknown kind {kind!r}")
        except (ValueError, TypeError, KeyError, IndexError, msgpack.UnpackException):
            self.stats.malformed += 1
            return False
        self.stats.received += 1
        peer = self.peers.get(replica)
        if peer is None:
            if len(self.peers) >= MAX_PEERS:
                self._drop_silent(received_at)
                if len(self.peers) >= MAX_PEERS:
                    return False
            peer = self.peers[replica] = Peer(replica)
        if kind == "f":
            if received_at >= peer.figures_at:
                peer.pods, peer.figures_at = parsed, received_at  # type: ignore[assignment]
        elif received_at >= peer.costs_at:
            peer.costs, peer.costs_at = parsed, received_at  # type: ignore[assignment]
            merge_costs(self.local().costs, self.peers.values(), received_at, self.costs_s * COSTS_TTL_FACTOR)
        return True

    def _drop_silent(self, now: float) -> None:
        keep = self.costs_s * COSTS_TTL_FACTOR
        for r in [r for r, p in self.peers.items()
                  if now - p.figures_at > self.stale_s and now - p.costs_at > keep]:
            del self.peers[r]

    def _merge(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        local = self.local()
        self._dirty = False
        merge_figures(local, self.peers.values(), now, self.stale_s)
        fresh = [p.figures_at + self.stale_s for p in self.peers.values() if p.figures_at + self.stale_s > now]
        self._next_stale = min(fresh, default=float("inf"))
        if any(now - p.costs_at > self.costs_s * COSTS_TTL_FACTOR and p.costs for p in self.peers.values()):
            for p in self.peers.values():
                if now - p.costs_at > self.costs_s * COSTS_TTL_FACTOR:
                    p.costs = {}
            merge_costs(local.costs, self.peers.values(), now, self.costs_s * COSTS_TTL_FACTOR)
        self._drop_silent(now)


def _parse_figures(items: Any) -> dict[str, PodFigures]:
    if not isinstance(items, list) or len(items) > MAX_PODS:
        raise ValueError("figures: expected a list of pods")
    out: dict[str, PodFigures] = {}
    for pod, inflight, tokens, pending, marks in items:
        if not isinstance(pod, str) or not isinstance(marks, list):
            raise ValueError("figures: bad pod entry")
        inc = tuple((str(n), float(a)) for n, a in marks[:64])
        out[pod] = PodFigures(max(0, int(inflight)), max(0, int(tokens)), max(0.0, min(3600.0, float(pending))), inc)
    return out


def _parse_costs(items: Any) -> dict[str, GroupStats]:
    if not isinstance(items, list) or len(items) > 64:
        raise ValueError("costs: expected a list of groups")
    out: dict[str, GroupStats] = {}
    for group, A, b, count in items:
        a = np.asarray(A, dtype=float)
        v = np.asarray(b, dtype=float)
        if a.size != D * D or v.size != D or not (np.isfinite(a).all() and np.isfinite(v).all()):
            raise ValueError("costs: bad statistics")
        out[str(group)] = GroupStats(a.reshape(D, D), v, float(count))
    return out


class SharingCollector(Collector):
    """The ``loraroute_sharing_*`` series (module docstring), read at scrape time."""

    def __init__(self, sharing: Callable[[], StateSharing | None]) -> None:
        self._sharing = sharing

    def collect(self) -> Iterable[Metric]:
        sh = self._sharing()
        if sh is None:
            return []
        st = sh.stats
        ops = CounterMetricFamily("loraroute_sharing_store_ops", "Redis commands sent for shared routing state")
        ops.add_metric([], st.ops)
        msgs = CounterMetricFamily("loraroute_sharing_messages", "Shared-state messages", labels=["direction"])
        msgs.add_metric(["published"], st.published)
        msgs.add_metric(["received"], st.received)
        bad = CounterMetricFamily("loraroute_sharing_malformed", "Shared-state messages dropped as malformed")
        bad.add_metric([], st.malformed)
        ages = sh.fresh_peers()
        peers = GaugeMetricFamily("loraroute_sharing_peers", "Other replicas whose figures count now")
        peers.add_metric([], len(ages))
        age = GaugeMetricFamily("loraroute_sharing_peer_age_seconds", "Age of the oldest fresh peer's figures")
        age.add_metric([], max(ages.values(), default=0.0))
        conn = GaugeMetricFamily("loraroute_sharing_connected", "1 while connected to the store for sharing")
        conn.add_metric([], 1.0 if st.connected else 0.0)
        return [ops, msgs, bad, peers, age, conn]
