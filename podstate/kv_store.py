"""Each pod's KV block set through Redis: the sidecar relays its pod's events, gateways read.

The sidecar follows its own pod's KV events (``KVEventSubscriber`` with ``KVBlockRelay`` as the
sink) and keeps the pod's block set. Changes go out as one delta at once after a quiet spell and
at most once per ``flush_interval_s`` within a burst; every ``snapshot_interval_s`` (and after a
reset) it rewrites the pod's snapshot:

- channel ``{prefix}:kv`` — msgpack ``[pod_id, epoch, version, cleared, added, removed, ts]``:
  ``added`` / ``removed`` are the block hashes packed as little-endian uint64 (8 bytes a block);
  ``cleared`` says the pod's set was emptied before these changes; ``ts`` is the pod's own time
  stamp of the oldest batch in the delta (so readers can measure pod → index latency);
  ``version`` counts deltas from 1 within an ``epoch`` (a random id per relay start);
- key ``{prefix}:kvset:{pod_id}`` — msgpack ``[epoch, version, blocks]`` (the whole set, packed
  the same way), with a TTL of ``ttl_s``: a relay that dies stops refreshing it.

``KVBlockFeed`` (in each gateway) applies deltas to its ``KVBlockIndex`` when the version is the
next one, and loads the pod's snapshot when it is not (start, a missed message, a new epoch, a
reconnect); deltas older than the snapshot are skipped. Redis is off the request path: a feed
only ever writes into the in-memory index.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from podstate.background import Background
from podstate.kv_events import Cleared, KVBatch, Removed, Stored
from podstate import redact_url
from scorer.kv_index import KVBlockIndex

log = logging.getLogger("loraroute.kv_store")


def pack_hashes(hashes: object) -> bytes:
    return np.fromiter(hashes, dtype="<u8").tobytes()  # type: ignore[call-overload]


def unpack_hashes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<u8").astype(np.uint64)


def channel(prefix: str) -> str:
    return f"{prefix}:kv"


def snapshot_key(prefix: str, pod_id: str) -> str:
    return f"{prefix}:kvset:{pod_id}"


@dataclass
class RelayStats:
    deltas: int = 0
    snapshots: int = 0
    errors: int = 0


class KVBlockRelay(Background):
    """The sidecar's side: a ``KVSink`` for its pod that publishes deltas and snapshots."""

    def __init__(self, client: aioredis.Redis, pod_id: str, *, key_prefix: str = "loraroute",
                 flush_interval_s: float = 0.005, snapshot_interval_s: float = 5.0, ttl_s: float = 30.0) -> None:
        self.client = client
        self.pod_id = pod_id
        self.prefix = key_prefix
        self.flush_interval_s = flush_interval_s
        self.snapshot_interval_s = snapshot_interval_s
        self.ttl_s = ttl_s
        self.epoch = os.urandom(6).hex()
        self.version = 0
        self.blocks: set[int] = set()
        self.stats = RelayStats()
        self._added: set[int] = set()
        self._removed: set[int] = set()
        self._cleared = False
        self._oldest_ts: float | None = None
        self._snapshot_due = True
        self._wake = asyncio.Event()
        self.task_name = f"kv-relay-{pod_id}"
        self._error_logged = False

    # --- KVSink ----------------------------------------------------------------------------------
    def apply(self, pod_id: str, batch: KVBatch) -> None:
        for change in batch.changes:
            if isinstance(change, Stored):
                for h in change.hashes:
                    if h not in self.blocks:
                        self.blocks.add(h)
                        if h in self._removed:
                            self._removed.discard(h)
                        else:
                            self._added.add(h)
            elif isinstance(change, Removed):
                for h in change.hashes:
                    if h in self.blocks:
                        self.blocks.discard(h)
                        if h in self._added:
                            self._added.discard(h)
                        else:
                            self._removed.add(h)
            elif isinstance(change, Cleared):
                self.reset(pod_id)
        if self._oldest_ts is None:
            self._oldest_ts = batch.ts
        self._wake.set()

    def reset(self, pod_id: str) -> None:
        self.blocks.clear()
        self._added.clear()
        self._removed.clear()
        self._cleared = True
        self._snapshot_due = True
        if self._oldest_ts is None:
            self._oldest_ts = time.time()
        self._wake.set()

    # --- publishing ------------------------------------------------------------------------------
    async def _run(self) -> None:
        next_snapshot = 0.0
        last_flush = 0.0
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.snapshot_interval_s)
            self._wake.clear()
            # at once after a quiet spell; within a burst, at most one delta per flush interval
            wait = last_flush + self.flush_interval_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            now = last_flush = time.monotonic()
            try:
                await self.flush(snapshot=self._snapshot_due or now >= next_snapshot)
                if now >= next_snapshot:
                    next_snapshot = now + self.snapshot_interval_s
                if self._error_logged:
                    log.info("redis reachable again: KV blocks of pod %s published", self.pod_id)
                    self._error_logged = False
            except (RedisError, OSError) as e:
                self.stats.errors += 1
                self._snapshot_due = True  # readers may have missed deltas: give them a snapshot
                if not self._error_logged:
                    log.warning("cannot publish KV blocks of pod %s to redis (%s); retrying",
                                self.pod_id, type(e).__name__)
                    self._error_logged = True
                await asyncio.sleep(0.5)

    async def flush(self, snapshot: bool = False) -> None:
        """Publish the pending delta (if any) and, with ``snapshot``, the whole set."""
        changed = self._cleared or self._added or self._removed
        if not changed and not snapshot:
            return
        msg = None
        pending = (self._added, self._removed, self._cleared, self._oldest_ts)
        if changed:
            self.version += 1
            msg = [self.pod_id, self.epoch, self.version, self._cleared, pack_hashes(self._added),
                   pack_hashes(self._removed), self._oldest_ts or time.time()]
            self._added, self._removed, self._cleared, self._oldest_ts = set(), set(), False, None
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                if snapshot:  # first, so a reader that loads it on seeing the delta finds it
                    body = msgpack.packb([self.epoch, self.version, pack_hashes(self.blocks)], use_bin_type=True)
                    pipe.set(snapshot_key(self.prefix, self.pod_id), body, px=int(self.ttl_s * 1000))
                if msg is not None:
                    pipe.publish(channel(self.prefix), msgpack.packb(msg, use_bin_type=True))
                await pipe.execute()
        except BaseException:
            if msg is not None:
                self._restore(*pending)
            raise
        if snapshot:
            self._snapshot_due = False
            self.stats.snapshots += 1
        if msg is not None:
            self.stats.deltas += 1

    def _restore(self, added: set[int], removed: set[int], cleared: bool, oldest: float | None) -> None:
        """A delta that did not go out is pending again, under the same version: merged with the
        changes made meanwhile as ``apply`` would have merged them, so no reader misses a block
        (a reset meanwhile makes the old changes moot)."""
        self.version -= 1
        self._wake.set()
        if self._cleared:
            return
        for h in self._added:
            if h in removed:
                removed.discard(h)
            else:
                added.add(h)
        for h in self._removed:
            if h in added:
                added.discard(h)
            else:
                removed.add(h)
        new_oldest = self._oldest_ts
        self._added, self._removed, self._cleared = added, removed, cleared
        self._oldest_ts = oldest if new_oldest is None or (oldest is not None and oldest < new_oldest) else new_oldest


@dataclass
class FeedStats:
    deltas: int = 0
    snapshots: int = 0
    gaps: int = 0
    malformed: int = 0
    connected: bool = False
    latencies_s: list[float] = field(default_factory=list)


class KVBlockFeed(Background):
    """The gateway's side: every pod's deltas and snapshots into one ``KVBlockIndex``.

    ``clock`` stamps ``PodKV.last_batch_at`` (Unix seconds); ``record_latency`` keeps
    ``now − ts`` of each delta (bounded), for the benchmark; ``on_delta(delay_s, apply_s)`` sees
    every applied delta (pod time stamp → applied, and the time applying it took); pods for
    which ``skip(pod_id)`` is true are left alone (the gateway follows their events itself)."""

    def __init__(self, url: str, index: KVBlockIndex, *, key_prefix: str = "loraroute",
                 clock: Callable[[], float] = time.time, record_latency: bool = False,
                 password: str | None = None, on_delta: Callable[[float, float], None] | None = None,
                 skip: Callable[[str], bool] | None = None) -> None:
        self.url = url
        self.index = index
        self.on_delta = on_delta
        self.skip = skip
        self.prefix = key_prefix
        self.clock = clock
        self.record_latency = record_latency
        self.stats = FeedStats()
        self._password = password
        self._versions: dict[str, tuple[str, int]] = {}   # pod -> (epoch, version) applied
        self.task_name = "kv-feed"
        self._client: aioredis.Redis | None = None
        self.ready = asyncio.Event()

    def _new_client(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(self.url, socket_connect_timeout=1.0, socket_timeout=None,
                                       **({"password": self._password} if self._password else {}))

    async def _run(self) -> None:
        backoff = 0.05
        logged = False
        while True:
            client = self._new_client()
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel(self.prefix))
                self._client = client
                await self._load_all_snapshots()
                self.stats.connected = True
                self.ready.set()
                if logged:
                    log.info("redis at %s reachable again: KV blocks resynced", redact_url(self.url))
                backoff, logged = 0.05, False
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        await self._on_delta(msg["data"])
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as e:
                if not logged:
                    log.warning("redis at %s unreachable for KV blocks (%s); the index keeps what it knows",
                                redact_url(self.url), type(e).__name__)
                    logged = True
            finally:
                self.stats.connected = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                with contextlib.suppress(Exception):
                    await client.aclose()
                self._client = None
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, 2.0)

    async def _load_all_snapshots(self) -> None:
        assert self._client is not None
        keys = [k async for k in self._client.scan_iter(match=snapshot_key(self.prefix, "*"), count=500)]
        for key in keys:
            pod_id = (key.decode() if isinstance(key, bytes) else key).split(":kvset:", 1)[1]
            await self._load_snapshot(pod_id)

    async def _load_snapshot(self, pod_id: str) -> None:
        assert self._client is not None
        if self.skip is not None and self.skip(pod_id):
            return
        raw = await self._client.get(snapshot_key(self.prefix, pod_id))
        if raw is None:
            return
        try:
            epoch, version, blocks = msgpack.unpackb(raw, raw=False)
        except (ValueError, msgpack.UnpackException, TypeError):
            self.stats.malformed += 1
            return
        self.index.clear(pod_id)
        self.index.store(pod_id, unpack_hashes(blocks))
        rec = self.index.pods.get(pod_id)
        if rec is not None:
            rec.batches += 1
            rec.last_batch_at = self.clock()
        self._versions[pod_id] = (str(epoch), int(version))
        self.stats.snapshots += 1

    async def _on_delta(self, raw: bytes) -> None:
        try:
            pod_id, epoch, version, cleared, added, removed, ts = msgpack.unpackb(raw, raw=False)
            pod_id, epoch, version = str(pod_id), str(epoch), int(version)
        except (ValueError, msgpack.UnpackException, TypeError):
            self.stats.malformed += 1
            return
        if self.skip is not None and self.skip(pod_id):
            return
        t0 = time.perf_counter()
        have = self._versions.get(pod_id)
        if have is not None and have[0] == epoch and version <= have[1]:
            return  # already in the snapshot we loaded
        if have is None or have[0] != epoch or version != have[1] + 1:
            if not (have is None and version == 1):
                self.stats.gaps += 1
                await self._load_snapshot(pod_id)
                have = self._versions.get(pod_id)
                if have is not None and have[0] == epoch and version <= have[1]:
                    return
                if have is None or have[0] != epoch or version != have[1] + 1:
                    # the snapshot lags this delta: start from the delta (a subset of the truth)
                    self.index.clear(pod_id)
        index = self.index
        if cleared:
            index.clear(pod_id)
        if removed:
            index.remove(pod_id, unpack_hashes(removed))
        if added:
            index.store(pod_id, unpack_hashes(added))
        rec = index.pod(pod_id)
        now = self.clock()
        if rec is not None:
            rec.batches += 1
            rec.last_batch_at = now
        self._versions[pod_id] = (epoch, version)
        self.stats.deltas += 1
        if self.record_latency and len(self.stats.latencies_s) < 100_000:
            self.stats.latencies_s.append(time.time() - float(ts))
        if self.on_delta is not None:
            self.on_delta(time.time() - float(ts), time.perf_counter() - t0)
