"""The cluster's adapter demand as this sidecar sees it: eviction order and prefetch.

Every gateway replica with placement enabled publishes its decayed request counts per (base,
adapter) to the store (``podstate.placement_store``, ``{prefix}:demand:{replica}``). A
``DemandView`` reads every writer's snapshot every ``demand.refresh_s`` and merges them with
``scorer.demand.merge_demand``: the same read and merge the placer does, so a sidecar ranks
adapters as the gateways do. Only its pod's bases count: the served names in its PodState, plus
``served_model_name`` and ``base_model``. The sidecar never writes demand (it sees no requests).

What the demand decides:

- ``eviction_order(local)``: what ``AdapterStore.enforce_budget`` removes first. Adapters without
  demand go first (least recently used first, as without demand), then the others by rising
  demand; equal demand keeps the least recently used order. The budget's rules on what is never
  removed (on GPU, running, loading, being ensured) are the store's and do not change.
- prefetch (``demand.prefetch`` = N > 0): after each read, those of the base's N most demanded
  adapters that are not on local disk are fetched and validated into the folder (not loaded
  into vLLM), one at a time, most demanded first, so a pod's first load of a popular adapter
  reads local disk instead of waiting for the source. Before a download the adapter's size is
  listed in the source: when it fits only by removing adapters at least as demanded as itself,
  the pass ends (the budget is full of adapters the cluster wants more). An adapter the source
  does not have, or that fails validation, is not tried again for ``_RETRY_FAILED_S``; an
  unreachable source ends the pass.

Degrades to least recently used: a memory:// store (nothing shared), an unreachable store, no
writer, or demand only for other bases all read as "no demand". The read and the prefetch run
in one background task; ``eviction_order`` costs a dict lookup per adapter.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from podstate.background import Background
from podstate.placement_store import PlacementStore
from scorer.demand import AdapterDemand, merge_demand
from vllm_sidecar.adapter_store import AdapterStore, LocalAdapter
from vllm_sidecar.errors import SidecarError, StoreUnreachable
from vllm_sidecar.settings import DemandSettings
from vllm_sidecar.validation import CONFIG_FILE, MANIFEST_FILE, REQUIRED_FILES, validate_name

log = logging.getLogger("loraroute.sidecar.demand")

#: an adapter whose prefetch failed (not in the source, invalid) is left alone this long
_RETRY_FAILED_S = 600.0
#: room kept for the manifest the sidecar writes when the source has none
_MANIFEST_ALLOWANCE = 4096
_EVENTS_KEPT = 100


@dataclass(frozen=True, slots=True)
class DemandEvent:
    """One thing the demand made the sidecar do (or not do), for ``GET /demand``."""

    at: float
    adapter: str
    action: str  # "prefetched" | "prefetch_failed" | "prefetch_no_room" | "evicted"
    share: float | None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"at": round(self.at, 3), "adapter": self.adapter, "action": self.action,
                "share": None if self.share is None else round(self.share, 6), "detail": self.detail}


class DemandView(Background):
    """The merged demand of the pod's bases, refreshed in the background (see the module
    docstring). ``store`` None: nothing is shared (memory://), the view stays empty."""

    def __init__(self, settings: DemandSettings, store: PlacementStore | None, adapters: AdapterStore, *,
                 bases: Callable[[], Iterable[str]], in_use: Callable[[], Iterable[str]]) -> None:
        self.settings = settings
        self.store = store if settings.enabled else None
        self.adapters = adapters
        self._bases = bases
        self._in_use = in_use
        self._by_adapter: dict[str, AdapterDemand] = {}  # this pod's bases, most demanded first
        self.read_at: float | None = None  # unix time of the last read that found demand
        self.writers: tuple[str, ...] = ()
        self.reads = 0
        self.prefetches: collections.Counter[str] = collections.Counter()  # outcome -> count
        self.demand_evictions = 0
        self.events: collections.deque[DemandEvent] = collections.deque(maxlen=_EVENTS_KEPT)
        self._retry_at: dict[str, float] = {}  # adapter -> monotonic time it may be tried again
        self._no_room: str | None = None  # the adapter the last pass stopped at for the budget

    # --- lifecycle ------------------------------------------------------------------------------
    task_name = "sidecar-demand"

    def start(self) -> None:
        if self.store is not None:
            super().start()

    async def close(self) -> None:
        await super().close()
        if self.store is not None:
            await self.store.close()

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
                await self.prefetch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bad round must not stop the next one
                log.error("demand round failed: %s", type(exc).__name__, exc_info=exc)
            await asyncio.sleep(self.settings.refresh_s)

    # --- reading --------------------------------------------------------------------------------
    async def refresh(self) -> int:
        """Read and merge every writer's snapshot; returns how many adapters of the pod's bases
        have demand (0: eviction is least recently used until the next read finds some)."""
        if self.store is None:
            return 0
        snapshots = await self.store.load_demand()  # an unreachable store reads as none
        now = time.time()
        self.reads += 1
        bases = {b for b in self._bases() if b}
        merged = merge_demand(snapshots, now)
        by_adapter: dict[str, AdapterDemand] = {}
        for entry in merged.adapters:  # most demanded first: the first entry of a name wins
            if entry.base in bases:
                by_adapter.setdefault(entry.adapter, entry)
        if by_adapter:  # shares of the pod's bases' demand, not of the whole cluster's
            total = _logsumexp([a.log_rate for a in by_adapter.values()])
            by_adapter = {n: dataclasses.replace(a, share=math.exp(a.log_rate - total)) for n, a in by_adapter.items()}
        if not by_adapter and self._by_adapter:
            log.info("no demand for %s in the store any more; evicting least recently used first",
                     ", ".join(sorted(bases)) or "this pod's base")
        self._by_adapter = by_adapter
        self.writers = merged.writers
        self.read_at = now if by_adapter else None
        return len(by_adapter)

    def demand_of(self, name: str) -> AdapterDemand | None:
        return self._by_adapter.get(name)

    def top(self, limit: int | None = None) -> list[AdapterDemand]:
        """The pod's bases' adapters with demand, most demanded first."""
        items = list(self._by_adapter.values())
        return items if limit is None else items[:limit]

    def age_s(self) -> float | None:
        """Seconds since the last read that found demand; None: no demand (least recently used)."""
        return None if self.read_at is None else max(0.0, time.time() - self.read_at)

    def _key(self, name: str) -> float:
        entry = self._by_adapter.get(name)
        return -math.inf if entry is None else entry.log_rate

    def eviction_order(self, local: list[LocalAdapter]) -> list[LocalAdapter]:
        """``local`` (least recently used first) with the least demanded first; a stable sort,
        so adapters of equal (or no) demand keep their least recently used order."""
        if not self._by_adapter:
            return local
        return sorted(local, key=lambda a: self._key(a.name))

    def note_evicted(self, name: str) -> None:
        """Called for every eviction; one made while demand was known counts as demand-ordered."""
        entry = self._by_adapter.get(name)
        if self._by_adapter:
            self.demand_evictions += 1
        self.events.append(DemandEvent(time.time(), name, "evicted", entry.share if entry else None,
                                       "by demand" if self._by_adapter else "least recently used"))

    # --- prefetch -------------------------------------------------------------------------------
    async def prefetch(self) -> list[str]:
        """One pass over the ``demand.prefetch`` most demanded adapters (module docstring);
        returns the names fetched."""
        wanted = self.settings.prefetch
        if wanted <= 0 or not self._by_adapter:
            return []
        fetched: list[str] = []
        for entry in self.top(wanted):
            name = entry.adapter
            if name in self.adapters.names() or name in self.adapters.inflight():
                continue
            if self._retry_at.get(name, 0.0) > time.monotonic():
                continue
            try:
                validate_name(name)
                size = await asyncio.to_thread(self._remote_size, name)
                if size is None:
                    self._failed(entry, "not in the adapter source")
                    continue
                if not self._fits(size, entry.log_rate):
                    if self._no_room != name:  # once per stop, not once per pass
                        self._no_room = name
                        self._record(entry, "prefetch_no_room", f"{size} bytes would evict adapters at least as demanded")
                        self.prefetches["no_room"] += 1
                    break
                await self.adapters.ensure(name)
            except StoreUnreachable as exc:
                self._record(entry, "prefetch_failed", exc.code)
                self.prefetches["failed"] += 1
                break
            except SidecarError as exc:
                self._failed(entry, exc.code)
                continue
            fetched.append(name)
            self._no_room = None
            self.prefetches["downloaded"] += 1
            self._record(entry, "prefetched", f"{size} bytes")
            log.info("prefetched adapter %s (share %.4f of its base's demand)", name, entry.share)
        return fetched

    def _remote_size(self, name: str) -> int | None:
        """Runs in a worker thread: the bytes the adapter will take on disk, from a listing of its
        folder in the source; None when the source has no adapter there."""
        prefix = self.adapters.expected_prefix(name)
        direct = {o.key[len(prefix):]: o.size for o in self.adapters.source.list(prefix, limit=200)
                  if "/" not in o.key[len(prefix):]}
        if CONFIG_FILE not in direct:
            return None
        size = sum(direct.get(f, 0) for f in REQUIRED_FILES)
        return size + direct.get(MANIFEST_FILE, _MANIFEST_ALLOWANCE)

    def _fits(self, size: int, log_rate: float) -> bool:
        """Whether ``size`` more bytes fit in the budget by removing only adapters not in use and
        less demanded than ``log_rate``."""
        store = self.adapters
        free = store.disk_budget_bytes - store.disk_bytes()
        if size <= free:
            return True
        busy = set(self._in_use()) | set(store.inflight())
        reclaimable = sum(a.size_bytes for a in store.local() if a.name not in busy and self._key(a.name) < log_rate)
        return size <= free + reclaimable

    def _failed(self, entry: AdapterDemand, why: str) -> None:
        self._retry_at[entry.adapter] = time.monotonic() + _RETRY_FAILED_S
        self.prefetches["failed"] += 1
        self._record(entry, "prefetch_failed", why)
        log.info("prefetch of adapter %s failed (%s); not tried again for %gs", entry.adapter, why, _RETRY_FAILED_S)

    def _record(self, entry: AdapterDemand, action: str, detail: str) -> None:
        self.events.append(DemandEvent(time.time(), entry.adapter, action, entry.share, detail))

    # --- what it shows --------------------------------------------------------------------------
    def to_dict(self, limit: int = 20) -> dict[str, Any]:
        """``GET /demand``: where it reads, how old the demand is, its top adapters, what it did."""
        on_disk = set(self.adapters.names())
        age = self.age_s()
        return {
            "enabled": self.store is not None,
            "refresh_s": self.settings.refresh_s,
            "prefetch": self.settings.prefetch,
            "bases": sorted(b for b in self._bases() if b),
            "reads": self.reads,
            "read_at": None if self.read_at is None else round(self.read_at, 3),
            "age_s": None if age is None else round(age, 3),
            "writers": list(self.writers),
            "adapters_with_demand": len(self._by_adapter),
            "top": [{"adapter": a.adapter, "base": a.base, "share": round(a.share, 6),
                     "rate_rps": round(a.rate_rps, 6), "on_disk": a.adapter in on_disk}
                    for a in self.top(limit)],
            "prefetches": dict(self.prefetches),
            "demand_evictions": self.demand_evictions,
            "events": [e.to_dict() for e in reversed(self.events)],
        }


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))
