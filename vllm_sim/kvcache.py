"""Paged KV cache with vLLM's prefix caching (``v1/core/block_pool.py`` semantics).

- ``num_gpu_blocks`` blocks of ``block_size`` tokens. A request holds
  ``ceil(tokens_with_kv / block_size)`` blocks; a decode that crosses a block boundary takes one more.
- Full prompt blocks get a hash: a chain ``h_i = xxh3_64(block_bytes_i, seed=h_{i-1})`` whose first
  seed is derived from ``("lora", adapter_name, adapter_path)`` (vLLM >= 0.31 extra keys), so equal
  text under different adapters never shares a block. The base model has its own seed.
- Freed blocks go to the tail of a free queue and keep their hash (still a cache hit) until the
  queue's head is reused for a new allocation (LRU eviction). A request's blocks are freed in
  reverse order so its tail is evicted first, as vLLM does. Never-used blocks are handed out first.
- A hit on a free cached block takes it out of the free queue (reference count > 0 again).
- ``usage = 1 - free_blocks / num_gpu_blocks`` (``vllm:kv_cache_usage_perc``); cached-but-free
  blocks count as free.
"""

from __future__ import annotations

from collections import OrderedDict

import xxhash

_MASK = (1 << 64) - 1


def chain_seed(adapter_name: str | None, adapter_path: str | None) -> int:
    """Seed of a prompt's hash chain: the adapter's extra key (None for the base model)."""
    key = "base" if adapter_name is None else f"lora\x00{adapter_name}\x00{adapter_path or ''}"
    return xxhash.xxh3_64_intdigest(key.encode("utf-8"))


def block_hashes(data: bytes, block_bytes: int, seed: int, max_blocks: int) -> list[int]:
    """Hashes of the first ``max_blocks`` full blocks of ``data`` (``block_bytes`` bytes each)."""
    out = []
    h = seed
    mv = memoryview(data)
    for i in range(min(max_blocks, len(data) // block_bytes)):
        h = xxhash.xxh3_64_intdigest(mv[i * block_bytes:(i + 1) * block_bytes], seed=h)
        out.append(h)
    return out


class BlockPool:
    """Blocks, reference counts, the free queue and the hash -> block map."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._never_used = num_blocks
        self._next_id = 0
        self._ref: list[int] = []
        self._hash: list[int | None] = []
        self._free: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[int, int] = {}

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

    def cache_block(self, block_id: int, h: int) -> None:
        """Give a now-full block its hash (first writer wins, like vLLM)."""
        if self._hash[block_id] is None and h not in self._cached:
            self._hash[block_id] = h
            self._cached[h] = block_id

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
                self._ref[b] = 1
            ids.append(b)
        return ids

    def free(self, ids: list[int]) -> None:
        """Release a request's blocks (tail first into the free queue)."""
        for b in reversed(ids):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free[b] = None
