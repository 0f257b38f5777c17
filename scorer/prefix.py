"""Prompt block hashing and the approximate prefix-cache index.

``prompt_block_hashes`` cuts a prompt into blocks of ``block_chars`` characters (about
``block_chars / 4`` tokens at ~4 characters per token) and chains an xxhash64 over them:

    h₀ = xxh64(block₀, seed = xxh64(base ‖ 0x00 ‖ adapter))
    hᵢ = xxh64(blockᵢ, seed = hᵢ₋₁)

Only full blocks are hashed (vLLM caches only full blocks). Because the chain is seeded with the
base model *and* the adapter, the same text under two adapters shares no hash: KV caches never
cross adapters (vLLM puts the LoRA into every block's extra keys; see vllm-lora-surface.md §6).
Two prompts with a common leading text share the hashes of the common full blocks.

``PrefixIndex`` is the approximate index (as in llm-d's approximate prefix scorer): block hash →
pods that were sent it, plus a per-pod LRU of hashes whose capacity approximates the pod's KV
cache (``num_gpu_blocks × block_size`` tokens expressed in blocks of ``block_chars / 4``
pseudo-tokens). It learns only from the router's own dispatches and forgets by LRU; it is never
exact, and need not be.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Sequence

import xxhash

CHARS_PER_TOKEN = 4
DEFAULT_BLOCK_CHARS = 256
# Used when a pod does not report num_gpu_blocks: ~26.6k blocks of 16 tokens (8B model, H100).
DEFAULT_POD_TOKENS = 425_472

_xxh64 = xxhash.xxh64_intdigest


def chain_seed(base: str, adapter: str | None) -> int:
    """The hash-chain seed for one (base, adapter) pair."""
    return _xxh64(f"{base}\x00{adapter or ''}".encode())


def prompt_block_hashes(
    base: str, adapter: str | None, text: str, block_chars: int = DEFAULT_BLOCK_CHARS
) -> tuple[int, ...]:
    """Chained xxhash64 of every full ``block_chars``-character block of ``text``.

    ``adapter`` None means the base model. Returns an empty tuple for a prompt shorter than
    one block.
    """
    if block_chars <= 0:
        raise ValueError("block_chars must be positive")
    h = chain_seed(base, adapter)
    n = len(text) // block_chars
    out = []
    for i in range(n):
        h = _xxh64(text[i * block_chars : (i + 1) * block_chars].encode("utf-8", "surrogatepass"), h)
        out.append(h)
    return tuple(out)


def pod_capacity_blocks(num_gpu_blocks: int, block_size: int, block_chars: int) -> int:
    """How many ``block_chars`` blocks fit in a pod's KV cache.

    capacity = num_gpu_blocks × block_size / (block_chars / 4); a pod that reports no
    ``num_gpu_blocks`` gets the capacity of a typical 8B-on-H100 pod (425,472 tokens).
    """
    tokens = num_gpu_blocks * block_size if num_gpu_blocks > 0 and block_size > 0 else DEFAULT_POD_TOKENS
    return max(1, int(tokens * CHARS_PER_TOKEN // block_chars))


class PrefixIndex:
    """Block hash → pods, with a per-pod LRU bounded by the pod's estimated KV capacity.

    Memory: a block held by one pod maps to the pod id itself (a shared string), a block held
    by several to a set; each pod's LRU is an insertion-ordered dict (re-inserted on use). About
    130 bytes per remembered (block, pod) pair.
    """

    __slots__ = ("block_chars", "_where", "_lru")

    def __init__(self, block_chars: int = DEFAULT_BLOCK_CHARS) -> None:
        self.block_chars = block_chars
        self._where: dict[int, str | set[str]] = {}
        self._lru: dict[str, dict[int, None]] = {}

    def __len__(self) -> int:
        return len(self._where)

    def pods(self) -> list[str]:
        return list(self._lru)

    def blocks_on(self, pod_id: str) -> int:
        lru = self._lru.get(pod_id)
        return len(lru) if lru is not None else 0

    def holders(self, h: int) -> set[str]:
        got = self._where.get(h)
        if got is None:
            return set()
        return {got} if isinstance(got, str) else set(got)

    def record(self, pod_id: str, hashes: Sequence[int], capacity: int) -> None:
        """Remember that ``pod_id`` now holds ``hashes`` (most recently used).

        The chain is inserted last block first, so the leading, most shared blocks are the
        most recently used and the tail is evicted first — as vLLM frees a sequence's blocks.
        """
        if not hashes:
            return
        pod_id = sys.intern(pod_id)  # one string object per pod, however callers build it
        lru = self._lru.get(pod_id)
        if lru is None:
            lru = self._lru[pod_id] = {}
        where = self._where
        for h in reversed(hashes):
            if h in lru:
                del lru[h]
                lru[h] = None
                continue
            lru[h] = None
            got = where.get(h)
            if got is None:
                where[h] = pod_id
            elif isinstance(got, str):
                if got != pod_id:
                    where[h] = {got, pod_id}
            else:
                got.add(pod_id)
        excess = len(lru) - capacity
        if excess > 0:
            old = list(itertools.islice(lru, excess))
            for h in old:
                del lru[h]
                self._drop(h, pod_id)

    def _drop(self, h: int, pod_id: str) -> None:
        where = self._where
        got = where.get(h)
        if got is None:
            return
        if isinstance(got, str):
            if got == pod_id:
                del where[h]
        else:
            got.discard(pod_id)
            if len(got) == 1:
                where[h] = next(iter(got))
            elif not got:
                del where[h]

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """For every pod holding at least the first block: how many leading blocks it holds."""
        if not hashes:
            return {}
        where = self._where
        got = where.get(hashes[0])
        if got is None:
            return {}
        n = len(hashes)
        if isinstance(got, str):
            # the common case: one pod holds the beginning; walk its own LRU
            lru = self._lru[got]
            i = 1
            while i < n and hashes[i] in lru:
                i += 1
            return {got: i}
        alive = set(got)
        out: dict[str, int] = {}
        for i in range(1, n):
            got = where.get(hashes[i])
            if got is None:
                for p in alive:
                    out[p] = i
                return out
            holders = {got} if isinstance(got, str) else got
            if not alive <= holders:
                for p in alive - holders:
                    out[p] = i
                alive &= holders
                if not alive:
                    return out
        for p in alive:
            out[p] = n
        return out

    def match_one(self, pod_id: str, hashes: Sequence[int]) -> int:
        """Leading blocks of ``hashes`` that ``pod_id`` holds."""
        lru = self._lru.get(pod_id)
        if not lru:
            return 0
        n = 0
        for h in hashes:
            if h not in lru:
                break
            n += 1
        return n

    def forget(self, pod_id: str) -> None:
        """Drop every block of a pod that left the view."""
        lru = self._lru.pop(pod_id, None)
        if not lru:
            return
        for h in lru:
            self._drop(h, pod_id)

    def clear(self) -> None:
        self._where.clear()
        self._lru.clear()

    def pod_ids(self) -> Iterable[str]:
        return self._lru.keys()
