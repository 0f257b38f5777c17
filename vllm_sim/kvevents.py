"""KV-cache events as vLLM 0.33 publishes them (``vllm/distributed/kv_events.py``).

Enabled with vLLM's own flag, ``--kv-events-config '{"enable_kv_cache_events": true,
"publisher": "zmq", "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558",
"topic": "kv@pod-a"}'`` (keys and defaults of vLLM's ``KVEventsConfig``; an unknown key is an error).

Wire format (checked byte for byte against ``tests/fixtures/vllm/kv-events-0.33.0.out.txt``):

- a ZMQ PUB socket sends one multipart message per engine step that produced events:
  ``[topic, seq as 8 bytes big-endian, msgpack(batch)]``, ``seq`` counting from 0;
- ``batch`` is msgspec's encoding of ``KVEventBatch`` (an array-like struct):
  ``[ts, [event, ...], data_parallel_rank]``; each event a tagged map (``"type"`` first, fields in
  declaration order, fields whose value is their default left out). msgspec writes the map header
  of a struct that *may* have more than 15 entries as map16 even when fewer are present, so
  ``BlockStored`` (15 fields and the tag) always starts with ``de 00 NN`` — this encoder does the same;
- ``BlockStored``: block_hashes (low 64 bits of each 32-byte hash), parent_block_hash, token_ids
  (the stored blocks' tokens), block_size, lora_id, medium ``"GPU"``, lora_name, extra_keys (one
  entry per block: ``[lora_name]`` for an adapter, ``None`` for the base model), group_idx 0;
  ``BlockRemoved``: block_hashes (one per evicted block), medium, group_idx; ``AllBlocksCleared``;
- replay: a ROUTER socket answers ``[b"", start_seq (8 bytes)]`` (DEALER) with one
  ``[b"", topic, seq, payload]`` per buffered batch with ``seq >= start_seq`` (the last
  ``buffer_steps`` batches) and then ``[b"", b"", b"\\xff" * 8, b""]``.

Endpoints: one containing ``*`` or ``::``, or any ``ipc://`` / ``inproc://`` one, is bound; any other
is connected (the subscriber binds), as in vLLM. ``*`` binds on the simulator's ``--host``
(127.0.0.1 unless told otherwise). In a ``sim cluster`` pod *i* adds *i* to both ports, as vLLM
does for data-parallel rank *i* (pick ports far enough apart). Sends never block: the PUB socket
drops at its high-water mark (``hwm``), as vLLM's does; ``max_queue_size`` (vLLM's queue in front of
its publisher thread) is accepted and has no effect here, where events are sent in the engine loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import msgpack
import zmq
import zmq.asyncio

_log = logging.getLogger("vllm_sim.kvevents")

MEDIUM_GPU = "GPU"
END_SEQ = (-1).to_bytes(8, "big", signed=True)


@dataclass(frozen=True)
class KVEventsConfig:
    """vLLM's ``KVEventsConfig`` (``config/kv_events.py``), same keys and defaults."""

    enable_kv_cache_events: bool = False
    publisher: str | None = None       # "zmq" when enabled, else "null"
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""

    @property
    def enabled(self) -> bool:
        return self.enable_kv_cache_events and self.effective_publisher == "zmq"

    @property
    def effective_publisher(self) -> str:
        if self.publisher is not None:
            return self.publisher
        return "zmq" if self.enable_kv_cache_events else "null"

    @classmethod
    def from_json(cls, text: str) -> KVEventsConfig:
        """Parse the ``--kv-events-config`` value; ``ValueError`` naming the problem."""
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"--kv-events-config is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError("--kv-events-config must be a JSON object")
        known = {f.name: f for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ValueError(f"--kv-events-config: unknown key {key!r}; known: {', '.join(known)}")
        types: dict[str, tuple[type, ...]] = {
            "enable_kv_cache_events": (bool,), "publisher": (str,), "endpoint": (str,),
            "replay_endpoint": (str,), "buffer_steps": (int,), "hwm": (int,), "max_queue_size": (int,),
            "topic": (str,),
        }
        for key, value in data.items():
            if value is None and key in ("publisher", "replay_endpoint"):
                continue
            if not isinstance(value, types[key]) or (isinstance(value, bool) and bool not in types[key]):
                raise ValueError(f"--kv-events-config: {key} must be {types[key][0].__name__}, got {value!r}")
        config = cls(**data)
        if config.effective_publisher not in ("zmq", "null"):
            raise ValueError(f"--kv-events-config: publisher {config.publisher!r} is not supported "
                             "(the simulator has 'zmq' and 'null')")
        for key in ("buffer_steps", "hwm", "max_queue_size"):
            if getattr(config, key) < 1:
                raise ValueError(f"--kv-events-config: {key} must be >= 1")
        return config


# --- events -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    lora_name: str | None
    medium: str = MEDIUM_GPU


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: list[int]
    medium: str = MEDIUM_GPU


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared

_packer = msgpack.Packer(use_bin_type=True)


def _map16(n: int) -> bytes:
    return b"\xde" + n.to_bytes(2, "big")


def _fixmap(n: int) -> bytes:
    return bytes([0x80 | n])


def _pairs(pairs: list[tuple[str, Any]]) -> bytes:
    pack = _packer.pack
    return b"".join(pack(k) + pack(v) for k, v in pairs)


def encode_event(event: KVEvent) -> bytes:
    """One event as msgspec encodes vLLM 0.33's tagged struct (see the module docstring)."""
    if isinstance(event, BlockStored):
        extra = [[event.lora_name] for _ in event.block_hashes] if event.lora_name is not None else \
            [None for _ in event.block_hashes]
        pairs: list[tuple[str, Any]] = [
            ("type", "BlockStored"), ("block_hashes", event.block_hashes),
            ("parent_block_hash", event.parent_block_hash), ("token_ids", event.token_ids),
            ("block_size", event.block_size), ("lora_id", event.lora_id), ("medium", event.medium),
            ("lora_name", event.lora_name), ("extra_keys", extra), ("group_idx", 0),
        ]
        return _map16(len(pairs)) + _pairs(pairs)  # 15 fields + tag > 15: msgspec's map16 header
    if isinstance(event, BlockRemoved):
        pairs = [("type", "BlockRemoved"), ("block_hashes", event.block_hashes), ("medium", event.medium),
                 ("group_idx", 0)]
        return _fixmap(len(pairs)) + _pairs(pairs)
    return _fixmap(1) + _pairs([("type", "AllBlocksCleared")])


def encode_batch(ts: float, events: list[KVEvent], data_parallel_rank: int | None) -> bytes:
    """``KVEventBatch(ts, events, data_parallel_rank)`` as msgpack bytes."""
    n = len(events)
    header = bytes([0x90 | n]) if n < 16 else (b"\xdc" + n.to_bytes(2, "big") if n < 65536
                                                 else b"\xdd" + n.to_bytes(4, "big"))
    return (b"\x93" + _packer.pack(float(ts)) + header + b"".join(encode_event(e) for e in events)
            + _packer.pack(data_parallel_rank))


# --- publisher ----------------------------------------------------------------------------------
def _binds(endpoint: str) -> bool:
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def offset_endpoint(endpoint: str | None, rank: int) -> str | None:
    """vLLM's ``offset_endpoint_port``: tcp port + rank, inproc name + ``_dp<rank>``."""
    if not endpoint or rank == 0:
        return endpoint
    if "inproc" in endpoint:
        return f"{endpoint}_dp{rank}"
    if "tcp" in endpoint:
        head, _, port = endpoint.rpartition(":")
        return f"{head}:{int(port) + rank}"
    raise ValueError(f"endpoint {endpoint!r} cannot be offset for pod {rank}: use tcp:// in a cluster")


def _local(endpoint: str, host: str) -> str:
    """``tcp://*:P`` binds on the simulator's host (every interface only when that is 0.0.0.0)."""
    if endpoint.startswith("tcp://*") and host not in ("0.0.0.0", "*", ""):
        return "tcp://" + (f"[{host}]" if ":" in host else host) + endpoint[len("tcp://*"):]
    return endpoint


class KVEventPublisher:
    """One pod's PUB socket, replay buffer and ROUTER socket (see the module docstring).

    ``publish(events)`` runs in the engine loop at the end of a step; it stamps the batch with
    ``wall_clock()`` as vLLM stamps ``time.time()``, and never blocks."""

    def __init__(self, config: KVEventsConfig, rank: int = 0, host: str = "127.0.0.1",
                 wall_clock: Callable[[], float] | None = None, data_parallel_rank: int = 0) -> None:
        import time

        self.config = config
        endpoint = offset_endpoint(config.endpoint, rank) or config.endpoint
        self.binds = _binds(endpoint)
        self.endpoint = _local(endpoint, host)
        replay = offset_endpoint(config.replay_endpoint, rank)
        self.replay_endpoint = _local(replay, host) if replay else None
        self.topic = config.topic.encode("utf-8")
        self.wall_clock = wall_clock or time.time
        self.data_parallel_rank = data_parallel_rank
        self.buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self.next_seq = 0
        self.sending = True  # False: numbered and buffered, not sent (/sim/faults)
        self._ctx = zmq.asyncio.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(config.hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        if self.binds:
            self._pub.bind(self.endpoint)
        else:
            self._pub.connect(self.endpoint)
        self._replay: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        if self.replay_endpoint is not None:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(self.replay_endpoint)

    def start(self) -> None:
        """Start answering replay requests (call from the running event loop)."""
        if self._replay is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._serve_replay(), name="kv-events-replay")

    def publish(self, events: list[KVEvent]) -> None:
        if not events:
            return
        seq = self.next_seq
        self.next_seq += 1
        payload = encode_batch(self.wall_clock(), events, self.data_parallel_rank)
        if self.sending:
            with contextlib.suppress(zmq.Again):
                self._pub.send_multipart((self.topic, seq.to_bytes(8, "big"), payload), flags=zmq.NOBLOCK)
        self.buffer.append((seq, payload))

    async def _serve_replay(self) -> None:
        assert self._replay is not None
        while True:
            frames = await self._replay.recv_multipart()
            if len(frames) != 3:
                _log.warning("vllm_sim: invalid KV-event replay request with %d frames", len(frames))
                continue
            client, _, start = frames
            start_seq = int.from_bytes(start, "big")
            for seq, payload in list(self.buffer):
                if seq >= start_seq:
                    await self._replay.send_multipart((client, b"", self.topic, seq.to_bytes(8, "big"), payload))
            await self._replay.send_multipart((client, b"", b"", END_SEQ, b""))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
        self._ctx.term()
