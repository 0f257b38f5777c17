"""The precise KV match of one pick, computed once and shared by every scorer that reads it.

``precise-prefix`` scores it and ``estimated-ttft`` prices the uncached prefill with it; both
ask ``PickContext.kv_match(views)``, which builds one ``KVMatch`` per pick. For each candidate p:

  live(p)  = the pipeline's KV reader (``precise-prefix``) judges p's event stream live
             (``PrecisePrefix.live``: events seen, and not silent while computing)
  T(p)     = ⌊|token ids| / block_size(p)⌋, the prompt's full vLLM blocks at p's block size
  M(p)     = the leading blocks of T(p) that ``local.kv`` says p holds (live pods only)

The block hashes (vLLM's: ``scorer.vllm_blocks``, a pickle and a SHA-256 each) are computed
lazily by a ``HashChain`` per block size and kept, so a block is hashed at most once per pick
however many scorers, candidate lists (``PickContext.narrowed``) or walks read it; the walk stops
at the first block no live candidate holds (``KVBlockIndex.match``).

No match at all (``kv_match`` returns None) when the pipeline has no KV reader, the request has
no token ids or the index knows no pod: every scorer then reads the approximate index.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from scorer.kv_index import KVBlockIndex
from scorer.view import PodView
from scorer.vllm_blocks import NONE_HASH, ExtraKeys, next_block_hash

__all__ = ["HashChain", "KVMatch", "KVReader"]


class KVReader(Protocol):
    """What a ``KVMatch`` asks of the pipeline's KV-event scorer (``precise-prefix``)."""

    def live(self, view: PodView, kv: KVBlockIndex, now: float) -> bool: ...
    def extra_keys(self, adapter: str | None) -> ExtraKeys: ...


class HashChain:
    """A prompt's vLLM block hashes at one block size, computed on first read and kept.

    Iterating yields the kept hashes first, then computes (and keeps) the next ones for as long
    as the reader asks (``vllm_blocks.next_block_hash``, the chain ``iter_block_hashes`` walks,
    inlined here: a generator over a generator cost ≈ 9 % more per block); ``computed`` is the
    number of SHA-256 calls made so far."""

    __slots__ = ("hashes", "_tokens", "_size", "_extra", "_parent")

    def __init__(self, token_ids: Sequence[int], block_size: int, extra_keys: ExtraKeys) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.hashes: list[int] = []
        self._tokens = token_ids
        self._size = block_size
        self._extra = extra_keys
        self._parent = NONE_HASH

    @property
    def computed(self) -> int:
        return len(self.hashes)

    def __iter__(self) -> Iterator[int]:
        hashes = self.hashes
        yield from hashes
        tokens, size, extra, step = self._tokens, self._size, self._extra, next_block_hash
        start = len(hashes) * size
        last = len(tokens) - size
        while start <= last:
            parent = self._parent = step(self._parent, tokens[start:start + size], extra)
            h = int.from_bytes(parent[24:], "big")
            hashes.append(h)
            yield h
            start += size


class KVMatch:
    """live(p), T(p) and M(p) of the module docstring for the candidates seen so far.

    ``live``: pod → live(p) for every pod judged; ``matched``: pod → M(p) and ``blocks``: pod →
    T(p), live pods only; ``cached_tokens``: pod → M(p) × block_size(p), live pods only (what
    ``estimated-ttft`` subtracts from the prompt). ``all_live`` is True while every pod judged
    so far is live (no scorer then needs the approximate index)."""

    __slots__ = ("live", "matched", "blocks", "cached_tokens", "all_live", "_reader", "_tokens", "_extra",
                 "_chains", "_views")

    def __init__(self, reader: KVReader, token_ids: Sequence[int], adapter: str | None) -> None:
        self.live: dict[str, bool] = {}
        self.matched: dict[str, int] = {}
        self.blocks: dict[str, int] = {}
        self.cached_tokens: dict[str, int] = {}
        self.all_live = True
        self._reader = reader
        self._tokens = token_ids
        self._extra = reader.extra_keys(adapter)
        self._chains: dict[int, HashChain] = {}
        self._views: list[PodView] | None = None

    def chain(self, block_size: int) -> HashChain:
        ch = self._chains.get(block_size)
        if ch is None:
            ch = self._chains[block_size] = HashChain(self._tokens, block_size, self._extra)
        return ch

    @property
    def hashed(self) -> int:
        """SHA-256 calls this pick has made (over every block size)."""
        return sum(ch.computed for ch in self._chains.values())

    def cover(self, views: list[PodView], kv: KVBlockIndex, now: float) -> KVMatch:
        """Judge and match the pods of ``views`` not seen yet (the same list again: nothing to do)."""
        if views is self._views:
            return self
        self._views = views
        live = self.live
        by_size: dict[int, list[str]] = {}
        reader = self._reader
        for v in views:
            pid = v.pod_id
            if pid in live:
                continue
            ok = live[pid] = reader.live(v, kv, now)
            if ok:
                by_size.setdefault(max(1, v.state.block_size), []).append(pid)
            else:
                self.all_live = False
        n = len(self._tokens)
        for size, ids in by_size.items():
            total = n // size
            got = kv.match(self.chain(size), ids) if total else {}
            for pid in ids:
                m = got.get(pid, 0)
                self.matched[pid] = m
                self.blocks[pid] = total
                self.cached_tokens[pid] = m * size
        return self
