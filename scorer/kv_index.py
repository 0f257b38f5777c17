"""The precise prefix index: which pod holds which vLLM KV block, from the pods' own KV events.

One open-addressing hash table for all pods (linear probing, numpy arrays):

    keys[slot]  : a block hash (vLLM's low 64 bits; 0 marks an empty slot, a hash 0 is stored as 1)
    masks[slot] : a bit per pod holding that block (pod i ↔ bit i; at most ``MAX_PODS`` = 64 pods)

16 bytes per slot; when live plus dead slots reach 0.75 of the table it is rebuilt, at twice the
live blocks rounded up to a power of two, so a distinct block costs 21–64 bytes (about 32 on
average) however many pods hold it (``nbytes``). A removal
clears a bit and leaves the key (a block stored again finds it); rebuilds drop the dead keys.

Updates come in batches (one KV event batch per engine step) and are vectorized; a pod's
``clear`` (AllBlocksCleared, a restart) is one pass over the masks. ``match`` is the request path:
it walks the request's block hashes — a lazy iterator, since each costs a SHA-256 — and probes
the table per hash from Python (``array('Q')`` reads, no numpy scalars), stopping at the first hash no
candidate pod holds. Pure data: no I/O, no clock; callers stamp ``PodKV`` with their times.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

MAX_PODS = 64
_MIN_CAPACITY = 1 << 10
_MAX_LOAD = 0.75
_TARGET_LOAD = 0.5
_SCALAR_MAX = 512  # batches up to this size are applied in Python (faster than numpy below ~500)


@dataclass(slots=True)
class PodKV:
    """What the index knows about one pod's event stream.

    ``blocks``: blocks the pod holds now; ``batches``: event batches applied; ``last_batch_at``:
    caller's clock (seconds) of the last batch; ``cleared``: AllBlocksCleared and restarts."""

    pod_id: str
    bit: int
    blocks: int = 0
    batches: int = 0
    last_batch_at: float = 0.0
    cleared: int = 0


def _as_keys(hashes: Sequence[int] | np.ndarray) -> np.ndarray:
    if isinstance(hashes, np.ndarray):
        arr = hashes.astype(np.uint64, copy=True)
    else:
        arr = np.array(hashes, dtype=np.uint64)
    arr[arr == 0] = 1
    return arr


class KVBlockIndex:
    """Block hash → pods holding it (see the module docstring). Not thread-safe."""

    def __init__(self, capacity: int = _MIN_CAPACITY) -> None:
        cap = _MIN_CAPACITY
        while cap < capacity:
            cap <<= 1
        self._alloc(cap)
        self.pods: dict[str, PodKV] = {}
        self._bit_pod: list[str | None] = [None] * MAX_PODS

    def _alloc(self, cap: int) -> None:
        # array('Q') storage for fast scalar reads on the request path, numpy views over the same
        # memory for the vectorized updates
        self._cap = cap
        self._karr = array("Q", bytes(8 * cap))
        self._marr = array("Q", bytes(8 * cap))
        self._keys = np.frombuffer(self._karr, dtype=np.uint64)
        self._masks = np.frombuffer(self._marr, dtype=np.uint64)
        self._used = 0  # slots with a key, live or dead

    # --- pods -----------------------------------------------------------------------------------
    def pod(self, pod_id: str) -> PodKV | None:
        """The pod's record, creating it (and giving it a bit) on first use; None when all
        ``MAX_PODS`` bits are taken (that pod is then not indexed: callers fall back)."""
        rec = self.pods.get(pod_id)
        if rec is not None:
            return rec
        try:
            bit = self._bit_pod.index(None)
        except ValueError:
            return None
        self._bit_pod[bit] = pod_id
        rec = self.pods[pod_id] = PodKV(pod_id, bit)
        return rec

    def forget(self, pod_id: str) -> None:
        """Drop a pod entirely (it left the cluster); its bit is reused."""
        rec = self.pods.pop(pod_id, None)
        if rec is not None:
            self._clear_bit(rec.bit)
            self._bit_pod[rec.bit] = None

    # --- updates --------------------------------------------------------------------------------
    def store(self, pod_id: str, hashes: Sequence[int] | np.ndarray) -> None:
        """The pod now holds ``hashes`` (ints below 2**64, or a uint64 array)."""
        rec = self.pod(pod_id)
        if rec is None or not len(hashes):
            return
        if self._used + len(hashes) > _MAX_LOAD * self._cap:
            self._rebuild(len(hashes))
        if len(hashes) <= _SCALAR_MAX:
            bit, masks = 1 << rec.bit, self._marr
            for h in hashes:
                s = self._slot(int(h), insert=True)
                m = masks[s]
                if not m & bit:
                    masks[s] = m | bit
                    rec.blocks += 1
            return
        keys = np.unique(_as_keys(hashes))
        slots = self._probe(keys, insert=True)
        vbit = np.uint64(1 << rec.bit)
        had = self._masks[slots] & vbit
        rec.blocks += int(np.count_nonzero(had == 0))
        self._masks[slots] |= vbit

    def remove(self, pod_id: str, hashes: Sequence[int] | np.ndarray) -> None:
        rec = self.pods.get(pod_id)
        if rec is None or not len(hashes):
            return
        if len(hashes) <= _SCALAR_MAX:
            bit, masks = 1 << rec.bit, self._marr
            for h in hashes:
                s = self._slot(int(h), insert=False)
                if s >= 0:
                    m = masks[s]
                    if m & bit:
                        masks[s] = m & ~bit
                        rec.blocks -= 1
            return
        keys = np.unique(_as_keys(hashes))
        slots = self._probe(keys, insert=False)
        slots = slots[slots >= 0]
        vbit = np.uint64(1 << rec.bit)
        had = self._masks[slots] & vbit
        rec.blocks -= int(np.count_nonzero(had))
        self._masks[slots] &= ~vbit

    def _slot(self, h: int, insert: bool) -> int:
        """Slot of one key (small batches: Python beats numpy's per-call overhead)."""
        h = (h & 0xFFFFFFFFFFFFFFFF) or 1
        keys, cap_mask = self._karr, self._cap - 1
        s = h & cap_mask
        while True:
            k = keys[s]
            if k == h:
                return s
            if k == 0:
                if not insert:
                    return -1
                keys[s] = h
                self._used += 1
                return s
            s = (s + 1) & cap_mask

    def clear(self, pod_id: str) -> None:
        """Every block of the pod is gone (AllBlocksCleared, or the pod restarted)."""
        rec = self.pods.get(pod_id)
        if rec is None:
            return
        self._clear_bit(rec.bit)
        rec.blocks = 0
        rec.cleared += 1

    def _clear_bit(self, bit: int) -> None:
        self._masks &= ~np.uint64(1 << bit)

    def _probe(self, keys: np.ndarray, insert: bool) -> np.ndarray:
        """Slot of each (distinct) key; with ``insert`` empty slots are claimed, else -1."""
        tab_keys = self._keys
        cap_mask = np.uint64(self._cap - 1)
        slots = (keys & cap_mask).astype(np.int64)
        out = np.full(len(keys), -1, dtype=np.int64)
        todo = np.arange(len(keys))
        while todo.size:
            s = slots[todo]
            k = tab_keys[s]
            want = keys[todo]
            hit = k == want
            out[todo[hit]] = s[hit]
            empty = k == 0
            if insert:
                e = np.flatnonzero(empty)
                if e.size:
                    # distinct keys may reach the same empty slot: the first claims it, the others
                    # stay put and find it taken next round
                    uniq, first = np.unique(s[e], return_index=True)
                    win = e[first]
                    tab_keys[uniq] = want[win]
                    out[todo[win]] = uniq
                    self._used += len(uniq)
                    hit[win] = True
                    empty[win] = False
                done = hit
                move = ~hit & ~empty
            else:
                done = hit | empty
                move = ~done
            adv = todo[move]
            slots[adv] = (slots[adv] + 1) & (self._cap - 1)
            todo = todo[~done]
        return out

    def _rebuild(self, incoming: int) -> None:
        live = self._masks != 0
        keys, masks = self._keys[live], self._masks[live]
        need = int((len(keys) + incoming) / _TARGET_LOAD) + 1
        cap = _MIN_CAPACITY
        while cap < need:
            cap <<= 1
        self._alloc(cap)
        if len(keys):
            slots = self._probe(keys, insert=True)
            self._masks[slots] = masks

    # --- the request path ---------------------------------------------------------------------------
    def mask_of(self, h: int) -> int:
        """Bit mask of the pods holding block ``h`` (0: none)."""
        if h == 0:
            h = 1
        keys, cap_mask = self._karr, self._cap - 1
        s = h & cap_mask
        while True:
            k = keys[s]
            if k == h:
                return self._marr[s]
            if k == 0:
                return 0
            s = (s + 1) & cap_mask

    def match(self, hashes: Iterable[int], pod_ids: Iterable[str]) -> dict[str, int]:
        """Leading blocks of ``hashes`` each of ``pod_ids`` holds (pods unknown here: absent;
        known pods holding none: 0). Stops consuming ``hashes`` once no candidate holds a block."""
        out: dict[str, int] = {}
        alive = 0
        for pid in pod_ids:
            rec = self.pods.get(pid)
            if rec is not None:
                out[pid] = 0
                if rec.blocks:
                    alive |= 1 << rec.bit
        if not alive:
            return out
        bit_pod = self._bit_pod
        keys, masks, cap_mask = self._karr, self._marr, self._cap - 1
        n = 0
        for h in hashes:
            s = (h or 1) & cap_mask
            while True:  # mask_of, inlined
                k = keys[s]
                if k == h or (k == 1 and h == 0):
                    m = masks[s]
                    break
                if k == 0:
                    m = 0
                    break
                s = (s + 1) & cap_mask
            still = alive & m
            if still != alive:
                gone = alive & ~still
                while gone:
                    low = gone & -gone
                    out[bit_pod[low.bit_length() - 1]] = n  # type: ignore[index]
                    gone ^= low
                alive = still
                if not alive:
                    return out
            n += 1
        while alive:
            low = alive & -alive
            out[bit_pod[low.bit_length() - 1]] = n  # type: ignore[index]
            alive ^= low
        return out

    # --- introspection ------------------------------------------------------------------------------
    def holders(self, h: int) -> set[str]:
        m = self.mask_of(h)
        return {p for i, p in enumerate(self._bit_pod) if p is not None and m >> i & 1}

    def __len__(self) -> int:
        """Distinct blocks some pod holds."""
        return int(np.count_nonzero(self._masks))

    @property
    def capacity(self) -> int:
        return self._cap

    @property
    def nbytes(self) -> int:
        """Bytes of the table (keys and masks)."""
        return int(self._keys.nbytes + self._masks.nbytes)
