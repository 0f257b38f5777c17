"""Reading vLLM's KV-cache event stream: decoding, sequence numbers, replay, restarts.

``decode_batch`` turns one published payload into ``KVBatch`` (vLLM ≥ 0.24 tagged maps and the
tagged arrays of ≤ 0.23 alike; block hashes as ints, the low 64 bits when vLLM sends 32-byte
hashes). Only blocks on the GPU (``medium`` ``"GPU"`` or unset) are kept: those are what a new
request can hit without a transfer.

``KVEventSubscriber`` follows one pod: a SUB socket on the pod's PUB endpoint and, when the pod
has one, a DEALER on its replay endpoint. Sequence handling, per message ``seq``:

- ``seq == next``: apply it;
- ``seq > next`` (messages lost: the PUB dropped them at its high-water mark, or the subscriber
  just (re)connected): ask the replay socket for everything from ``next``; if the replay still
  cannot fill the gap (the pod's buffer no longer holds it, or there is no replay socket) the
  pod's blocks are cleared (``unrecoverable``) — what the index says from then on is a subset
  of the truth, never a superset;
- ``seq < next``: the pod restarted (vLLM numbers from 0 again, with an empty cache): clear it,
  then replay from 0 what the new process has sent so far;
- the first message after start: replay from 0 (a subscriber that starts late gets the pod's
  buffered history, up to ``buffer_steps`` batches; anything older is unknown to it).

Whatever consumes the events implements ``KVSink`` (the gateway's ``KVBlockIndex`` through
``IndexSink``, or the sidecar's publisher of compact per-pod deltas). Every wait is bounded; a
replay that does not finish within ``replay_timeout_s`` counts as failed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack
import zmq
import zmq.asyncio

from podstate.background import Background
from scorer.kv_index import KVBlockIndex

log = logging.getLogger("loraroute.kv_events")

END_SEQ = b"\xff" * 8
_GPU = (None, "GPU", "gpu")


@dataclass(frozen=True, slots=True)
class Stored:
    hashes: list[int]
    lora_name: str | None = None


@dataclass(frozen=True, slots=True)
class Removed:
    hashes: list[int]


@dataclass(frozen=True, slots=True)
class Cleared:
    pass


KVChange = Stored | Removed | Cleared


@dataclass(frozen=True, slots=True)
class KVBatch:
    ts: float
    changes: list[KVChange]


class KVDecodeError(ValueError):
    pass


def _hash(value: Any) -> int:
    if isinstance(value, int):
        return value & 0xFFFFFFFFFFFFFFFF
    if isinstance(value, (bytes, bytearray)):
        return int.from_bytes(bytes(value)[-8:], "big")
    raise KVDecodeError(f"block hash of type {type(value).__name__}")


def _event(raw: Any) -> KVChange | None:
    if isinstance(raw, dict):
        kind = raw.get("type")
        if kind == "BlockStored":
            if raw.get("medium") not in _GPU:
                return None
            return Stored([_hash(h) for h in raw["block_hashes"]], raw.get("lora_name"))
        if kind == "BlockRemoved":
            if raw.get("medium") not in _GPU:
                return None
            return Removed([_hash(h) for h in raw["block_hashes"]])
        if kind == "AllBlocksCleared":
            return Cleared()
        return None  # an event type this reader does not know (newer vLLM): skipped
    if isinstance(raw, (list, tuple)) and raw:
        # vLLM <= 0.23: ["BlockStored", hashes, parent, tokens, block_size, lora_id, medium, lora_name, ...]
        kind = raw[0]
        if kind == "BlockStored":
            medium = raw[6] if len(raw) > 6 else None
            return Stored([_hash(h) for h in raw[1]], raw[7] if len(raw) > 7 else None) if medium in _GPU else None
        if kind == "BlockRemoved":
            medium = raw[2] if len(raw) > 2 else None
            return Removed([_hash(h) for h in raw[1]]) if medium in _GPU else None
        if kind == "AllBlocksCleared":
            return Cleared()
        return None
    raise KVDecodeError(f"event of type {type(raw).__name__}")


def decode_batch(payload: bytes) -> KVBatch:
    """One KV event batch (``[ts, [events], data_parallel_rank]``); ``KVDecodeError`` if malformed."""
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as e:
        raise KVDecodeError(f"not msgpack: {e}") from None
    if not isinstance(raw, (list, tuple)) or len(raw) < 2 or not isinstance(raw[1], (list, tuple)):
        raise KVDecodeError("expected [ts, [events], ...]")
    try:
        changes = [c for c in (_event(e) for e in raw[1]) if c is not None]
        return KVBatch(float(raw[0]), changes)
    except (KeyError, TypeError, IndexError) as e:
        raise KVDecodeError(f"malformed event: {e!r}") from None


class KVSink(Protocol):
    """Where one pod's decoded changes go."""

    def apply(self, pod_id: str, batch: KVBatch) -> None: ...

    def reset(self, pod_id: str) -> None:
        """The pod's history is lost (restart, unrecoverable gap): forget its blocks."""


@dataclass
class IndexSink:
    """Apply changes straight to a ``KVBlockIndex`` (the subscriber lives in the gateway).
    ``clock`` stamps ``PodKV.last_batch_at``; ``on_batch(pod_id, batch)`` sees every batch."""

    index: KVBlockIndex
    clock: Callable[[], float] = time.time
    on_batch: Callable[[str, KVBatch], None] | None = None

    def apply(self, pod_id: str, batch: KVBatch) -> None:
        apply_batch(self.index, pod_id, batch, self.clock())
        if self.on_batch is not None:
            self.on_batch(pod_id, batch)

    def reset(self, pod_id: str) -> None:
        self.index.clear(pod_id)


def apply_batch(index: KVBlockIndex, pod_id: str, batch: KVBatch, now: float) -> None:
    """Apply a batch in order; consecutive events of one kind go to the index in one call (vLLM
    sends one BlockRemoved per evicted block, often dozens in a row)."""
    rec = index.pod(pod_id)
    if rec is None:
        return
    run: list[int] = []
    run_kind: type | None = None

    def flush() -> None:
        if run:
            (index.store if run_kind is Stored else index.remove)(pod_id, run)
            run.clear()

    for change in batch.changes:
        kind = type(change)
        if kind is Cleared:
            flush()
            index.clear(pod_id)
            continue
        if kind is not run_kind:
            flush()
            run_kind = kind
        run.extend(change.hashes)  # type: ignore[union-attr]
    flush()
    rec.batches += 1
    rec.last_batch_at = now


@dataclass
class SubscriberStats:
    batches: int = 0
    replays: int = 0
    replayed: int = 0
    restarts: int = 0
    unrecoverable: int = 0
    malformed: int = 0
    next_seq: int | None = None
    last_batch_at: float = 0.0
    latencies_s: list[float] = field(default_factory=list)   # now − batch ts, when recording


class KVEventSubscriber(Background):
    """Follow one pod's KV events into ``sink`` (see the module docstring).

    ``record_latency`` keeps ``now − ts`` of each live batch in ``stats.latencies_s`` (the
    benchmark's measure of update latency; bounded to the last 100,000)."""

    def __init__(self, pod_id: str, endpoint: str, sink: KVSink, *, replay_endpoint: str | None = None,
                 topic: str = "", replay_timeout_s: float = 2.0, record_latency: bool = False,
                 context: zmq.asyncio.Context | None = None) -> None:
        self.pod_id = pod_id
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic.encode("utf-8")
        self.sink = sink
        self.replay_timeout_s = replay_timeout_s
        self.record_latency = record_latency
        self.stats = SubscriberStats()
        self._ctx = context or zmq.asyncio.Context.instance()
        self.task_name = f"kv-events-{pod_id}"
        self.connected = asyncio.Event()

    async def _run(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, self.topic)
        sub.connect(self.endpoint)
        self.connected.set()
        try:
            while True:
                frames = await sub.recv_multipart()
                await self._on_message(frames, live=True)
        finally:
            sub.close(linger=0)

    async def _on_message(self, frames: list[bytes], live: bool) -> None:
        if len(frames) != 3:
            self.stats.malformed += 1
            return
        topic, seq_bytes, payload = frames
        if self.topic and topic != self.topic:
            return
        seq = int.from_bytes(seq_bytes, "big")
        nxt = self.stats.next_seq
        if nxt is None or seq < nxt:
            if nxt is not None:
                self.stats.restarts += 1
                log.info("KV events of pod %s went back from seq %d to %d: the pod restarted", self.pod_id,
                         nxt - 1, seq)
                self.sink.reset(self.pod_id)
            # a fresh start: the pod's buffered history first; what it no longer holds is unknown
            self.stats.next_seq = 0
            await self._replay(0, until=seq, adopt=True)
            if seq > self.stats.next_seq:
                log.info("KV events of pod %s: starting at seq %d, the history before it is not available",
                         self.pod_id, seq)
                self.stats.next_seq = seq
            nxt = self.stats.next_seq
        if seq > nxt:
            await self._replay(nxt, until=seq)
            nxt = self.stats.next_seq
            if seq > nxt:  # still missing: the history is gone
                self.stats.unrecoverable += 1
                log.warning("KV events of pod %s lost seq %d..%d (not replayable); its blocks are reset",
                            self.pod_id, nxt, seq - 1)
                self.sink.reset(self.pod_id)
                self.stats.next_seq = seq
        if seq == self.stats.next_seq:
            self._apply(seq, payload, live)

    def _apply(self, seq: int, payload: bytes, live: bool) -> None:
        try:
            batch = decode_batch(payload)
        except KVDecodeError as e:
            self.stats.malformed += 1
            log.warning("skipping a malformed KV event batch from pod %s: %s", self.pod_id, e)
        else:
            self.sink.apply(self.pod_id, batch)
            self.stats.batches += 1
            now = time.time()
            self.stats.last_batch_at = now
            if live and self.record_latency and len(self.stats.latencies_s) < 100_000:
                self.stats.latencies_s.append(now - batch.ts)
        self.stats.next_seq = seq + 1

    async def _replay(self, start: int, until: int, adopt: bool = False) -> None:
        """Apply buffered batches ``start .. until-1`` from the pod's replay socket. ``adopt``
        (a fresh start: nothing to be consistent with yet): begin at the oldest batch the pod
        still buffers when ``start`` is gone."""
        if self.replay_endpoint is None or start >= until:
            return
        self.stats.replays += 1
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self.replay_endpoint)
        try:
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            deadline = time.monotonic() + self.replay_timeout_s
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not await dealer.poll(int(left * 1000)):
                    log.warning("replay of pod %s's KV events timed out", self.pod_id)
                    return
                frames = await dealer.recv_multipart()  # [b"", topic, seq, payload]; the end: seq = -1
                if len(frames) != 4:
                    self.stats.malformed += 1
                    continue
                if frames[2] == END_SEQ:
                    return
                seq = int.from_bytes(frames[2], "big")
                if adopt and self.stats.next_seq is not None and seq > self.stats.next_seq:
                    self.stats.next_seq = seq  # older history is gone; what follows is consistent
                adopt = False
                if seq == self.stats.next_seq and seq < until:
                    self._apply(seq, frames[3], live=False)
                    self.stats.replayed += 1
        finally:
            dealer.close(linger=0)
