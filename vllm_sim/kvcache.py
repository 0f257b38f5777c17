"""Paged KV cache with vLLM's prefix caching (``v1/core/block_pool.py`` semantics).

- ``num_gpu_blocks`` blocks of ``block_size`` tokens. A request holds
  ``ceil(tokens_with_kv / block_size)`` blocks; a decode that crosses a block boundary takes one more.
- Full prompt blocks get vLLM's block hash (``v1/core/kv_cache_utils.py::hash_block_tokens`` with
  the default ``sha256`` algorithm): ``H_i = sha256(pickle((H_{i-1} or NONE_HASH, tuple(tokens_i),
  extra_keys)))`` with ``NONE_HASH = sha256(pickle("vllm-none-hash"))`` (deterministic since vLLM
  0.29) and ``extra_keys = (("lora", adapter_name, adapter_path),)`` for an adapter (vLLM >= 0.31),
  ``None`` for the base model; so equal text under different adapters never shares a block. A
  block is known by the low 64 bits of ``H_i`` (what KV events publish). Token ids are the prompt's
  4-byte pieces (``tokenizer``).
- Freed blocks go to the tail of a free queue and keep their hash (still a cache hit) until the
  queue's head is reused for a new allocation (LRU eviction). A request's blocks are freed in
  reverse order so its tail is evicted first, as vLLM does. Never-used blocks are handed out first.
- A hit on a free cached block takes it out of the free queue (reference count > 0 again).
- ``usage = 1 - free_blocks / num_gpu_blocks`` (``vllm:kv_cache_usage_perc``); cached-but-free
  blocks count as free.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .kvevents import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from .lora_cache import LoraRef
from .tokenizer import BYTES_PER_TOKEN

ExtraKeys = tuple[tuple[str, str, str], ...] | None


def _sha256(obj: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


NONE_HASH = _sha256("vllm-none-hash")


def chain_seed(adapter_name: str | None, adapter_path: str | None) -> ExtraKeys:
    """The extra keys every block of a prompt is hashed with: the adapter's (None: base model)."""
    return None if adapter_name is None else (("lora", adapter_name, adapter_path or ""),)


def block_hashes(data: bytes, block_bytes: int, seed: ExtraKeys, max_blocks: int) -> list[int]:
    """vLLM's hashes (low 64 bits) of the first ``max_blocks`` full blocks of ``data``
    (``block_bytes`` bytes each, 4 bytes per token), hashed with extra keys ``seed``."""
    out = []
    parent = NONE_HASH
    per_block = block_bytes // BYTES_PER_TOKEN
    unpack = struct.Struct(f"<{per_block}I").unpack_from
    for i in range(min(max_blocks, len(data) // block_bytes)):
        parent = _sha256((parent, unpack(data, i * block_bytes), seed))
        out.append(int.from_bytes(parent[24:], "big"))
    return out


class BlockPool:
    """Blocks, reference counts, the free queue and the hash -> block map.

    With ``events`` on (``enable_events``) every block that gets a hash, every cached block that
    is evicted and every reset is recorded as a vLLM KV event; ``flush_events()`` (once per engine
    step) hands the step's events to the publisher. A block whose hash another block already holds
    is not cached (first writer wins), and no event says it was: the stream describes exactly
    the blocks a lookup can hit."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._never_used = num_blocks
        self._next_id = 0
        self._ref: list[int] = []
        self._hash: list[int | None] = []
        self._free: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[int, int] = {}
        self.events: list[KVEvent] | None = None
        self._on_events: Callable[[list[KVEvent]], None] | None = None

    def enable_events(self, on_events: Callable[[list[KVEvent]], None]) -> None:
        self.events = []
        self._on_events = on_events

    def flush_events(self) -> None:
        """Hand the events recorded since the last flush to the publisher (one batch)."""
        events = self.events
        if events and self._on_events is not None:
            self.events = []
            self._on_events(events)

    # -- state -------------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        return self._never_used + len(self._free)

    @property
    def cached_blocks(self) -> int:
        """Blocks that carry a prefix hash (in use or free-but-cached)."""
        return len(self._cached)

    def usage(self) -> float:
        return 1.0 - self.free_blocks / self.num_blocks if self.num_blocks else 0.0

    # -- prefix cache ------------------------------------------------------------------------
    def count_hits(self, hashes: list[int]) -> int:
        """Number of leading blocks of ``hashes`` present in the cache."""
        n = 0
        cached = self._cached
        for h in hashes:
            if h not in cached:
                break
            n += 1
        return n

    def evictable_hits(self, hashes: list[int]) -> int:
        """How many of these (hit) blocks sit in the free queue (they stop counting as free)."""
        ref, cached = self._ref, self._cached
        return sum(1 for h in hashes if ref[cached[h]] == 0)

    def take_cached(self, hashes: list[int]) -> list[int]:
        """Reference the cached blocks for ``hashes`` (all must hit); returns their ids."""
        ids = []
        for h in hashes:
            b = self._cached[h]
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1
            ids.append(b)
        return ids

    def cache_block(self, block_id: int, h: int) -> bool:
        """Give a now-full block its hash (first writer wins); True if it got it."""
        if self._hash[block_id] is None and h not in self._cached:
            self._hash[block_id] = h
            self._cached[h] = block_id
            return True
        return False

    def cache_blocks(self, blocks: list[int], hashes: list[int], start: int, end: int, prompt: bytes | None,
                     lora: LoraRef | None) -> None:
        """Cache blocks ``start:end`` of a request (``prompt``: its bytes, for the events)."""
        events = self.events
        run: list[int] = []
        first = start
        for j in range(start, end):
            if self.cache_block(blocks[j], hashes[j]):
                if not run:
                    first = j
                run.append(hashes[j])
            elif run and events is not None:
                events.append(self._stored(hashes, first, run, prompt, lora))
                run = []
        if run and events is not None:
            events.append(self._stored(hashes, first, run, prompt, lora))

    def _stored(self, hashes: list[int], first: int, run: list[int], prompt: bytes | None,
                lora: LoraRef | None) -> BlockStored:
        bs = self.block_size
        n = len(run) * bs
        tokens = list(struct.unpack_from(f"<{n}I", prompt, first * bs * BYTES_PER_TOKEN)) if prompt else []
        return BlockStored(run, hashes[first - 1] if first else None, tokens, bs,
                           None if lora is None else lora.lora_id, None if lora is None else lora.name)

    def reset(self) -> bool:
        """vLLM's ``reset_prefix_cache``: forget every hash, only when no block is in use."""
        if any(self._ref):
            return False
        for h, b in self._cached.items():
            self._hash[b] = None
        self._cached.clear()
        if self.events is not None:
            self.events.append(AllBlocksCleared())
        return True

    # -- allocation --------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int] | None:
        """``n`` fresh blocks, evicting cached free blocks from the queue head; None if short."""
        if n > self._never_used + len(self._free):
            return None
        ids = []
        for _ in range(n):
            if self._never_used:
                self._never_used -= 1
                b = self._next_id
                self._next_id += 1
                self._ref.append(1)
                self._hash.append(None)
            else:
                b, _ = self._free.popitem(last=False)
                h = self._hash[b]
                if h is not None:
                    self._hash[b] = None
                    if self._cached.get(h) == b:
                        del self._cached[h]
                        if self.events is not None:
                            self.events.append(BlockRemoved([h]))
                self._ref[b] = 1
            ids.append(b)
        return ids

    def free(self, ids: list[int]) -> None:
        """Release a request's blocks (tail first into the free queue)."""
        for b in reversed(ids):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free[b] = None
