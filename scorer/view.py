"""Derived, per-state-version views of pods and the per-pick context shared by plugins.

A ``PodView`` is computed once per ``PodState`` object (the pipeline caches it and rebuilds it
only when the state object for a pod changes), so the hot path reads frozensets and ints instead
of re-deriving them from tuples on every pick.

Adapter placement of the requested adapter on a pod is summarised as one *code*
``tier * 3 + slot`` (see ``tier_codes``):

tiers (where the adapter is)        slots (whether it can get a GPU slot)
  BASE     request for the base       FREE       fewer adapters on GPU than max_loras
  GPU      on GPU (or running)        FREEABLE   no free slot, but an adapter on GPU has
  INCOMING we just sent it there                 nothing running (eviction is free)
  LOADING  the sidecar is loading it  SATURATED  every slot holds an adapter with requests
  CPU      in vLLM's CPU LoRA cache                in flight: a new adapter waits ("deferred")
  DISK     on the pod's local disk
  REMOTE   nowhere on the pod (fetch + load)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scorer.model import PodState, RoutingRequest

if TYPE_CHECKING:
    from scorer.state import LocalState, PodLocal

T_BASE, T_GPU, T_INCOMING, T_LOADING, T_CPU, T_DISK, T_REMOTE = range(7)
S_FREE, S_FREEABLE, S_SATURATED = range(3)
TIER_NAMES = ("base", "gpu", "incoming", "loading", "cpu", "disk", "remote")
SLOT_NAMES = ("free", "freeable", "saturated")
N_CODES = 21


class PodView:
    """What the plugins read about one pod: its PodState, derived sets, and local state."""

    __slots__ = (
        "pod_id", "state", "local", "healthy", "observed_at", "bases", "gpu", "cpu", "disk",
        "loading", "running", "n_gpu", "n_running", "max_loras", "max_lora_rank", "ranks",
        "kv", "num_running", "num_waiting", "num_deferred", "capacity_blocks", "slot",
        "tier3", "load", "defer_factor", "base_slot", "incoming", "kv_free",
    )

    def __init__(
        self, pod_id: str, state: PodState, local: PodLocal, capacity_blocks: int, prev: PodView | None = None
    ) -> None:
        self.pod_id = pod_id
        self.state = state
        self.local = local
        self.healthy = state.healthy
        self.observed_at = state.observed_at
        ps = prev.state if prev is not None else None
        if (
            ps is not None
            and ps.gpu_adapters == state.gpu_adapters
            and ps.running_adapters == state.running_adapters
            and (ps.num_deferred > 0) == (state.num_deferred > 0)
            and ps.cpu_adapters == state.cpu_adapters
            and ps.disk_adapters == state.disk_adapters
            and ps.loading_adapters == state.loading_adapters
            and ps.base_models == state.base_models
        ):
            # Most updates only move counters: reuse the derived sets (compared at C speed).
            assert prev is not None
            self.bases, self.gpu, self.cpu, self.disk = prev.bases, prev.gpu, prev.cpu, prev.disk
            self.loading, self.running, self.tier3 = prev.loading, prev.running, prev.tier3
        else:
            self.bases = frozenset(state.base_models)
            running = frozenset(state.running_adapters)
            # vLLM lists adapters of deferred requests among the "running" ones too, so an adapter
            # with requests in flight is known to hold a GPU slot only while nothing is deferred;
            # with deferrals, trust the residency estimate when there is one.
            self.gpu = frozenset(state.gpu_adapters)
            if state.num_deferred == 0 or not self.gpu:
                self.gpu |= running
            self.cpu = frozenset(state.cpu_adapters)
            self.disk = frozenset(state.disk_adapters)
            self.loading = frozenset(state.loading_adapters)
            self.running = running
            # adapter name -> tier * 3 (the placement code without the slot), best tier wins
            tier3: dict[str, int] = dict.fromkeys(self.disk, T_DISK * 3)
            tier3.update(dict.fromkeys(self.cpu, T_CPU * 3))
            tier3.update(dict.fromkeys(self.loading, T_LOADING * 3))
            tier3.update(dict.fromkeys(self.gpu, T_GPU * 3))
            self.tier3 = tier3
        self.n_gpu = len(self.gpu)
        self.n_running = len(self.running)
        self.max_loras = max(1, state.max_loras)
        self.max_lora_rank = state.max_lora_rank
        self.ranks = state.adapter_ranks
        self.kv = min(1.0, max(0.0, float(state.kv_cache_usage)))
        self.kv_free = 1.0 - self.kv
        self.num_running = max(0, state.num_running)
        self.num_waiting = max(0, state.num_waiting)
        self.num_deferred = max(0, state.num_deferred)
        self.capacity_blocks = capacity_blocks
        # ``slot`` counts the router's optimistic incoming adapters as occupying slots; the
        # local state keeps it up to date (``LocalState.refresh_incoming``). ``base_slot`` is
        # what the PodState alone says. ``incoming`` is the pod's (long-lived) incoming dict.
        # a deferred request means every slot is held by an adapter with requests running
        self.base_slot = S_SATURATED if self.num_deferred else slot_state(self.n_gpu, self.n_running, self.max_loras)
        self.slot = self.base_slot
        self.incoming = local.incoming
        self.load = self.num_running + self.num_waiting
        self.defer_factor = 1.0 + self.num_deferred / self.max_loras


def slot_state(n_gpu: int, n_running: int, max_loras: int) -> int:
    """FREE if a slot is empty, FREEABLE if an idle adapter can be evicted, else SATURATED."""
    if n_gpu < max_loras:
        return S_FREE
    if n_running < max_loras:
        return S_FREEABLE
    return S_SATURATED


class PickContext:
    """Per-pick values computed at most once and shared by every plugin of the pipeline."""

    __slots__ = ("request", "now", "local", "adapter", "_match", "_codes", "_rank")

    def __init__(self, request: RoutingRequest, now: float, local: LocalState) -> None:
        self.request = request
        self.now = now
        self.local = local
        self.adapter = request.adapter.name
        self._match: dict[str, int] | None = None
        self._codes: list[int] | None = None
        self._rank: int | None = -1

    def prefix_match(self) -> dict[str, int]:
        """pod id → leading prompt blocks that pod is believed to hold (absent: 0)."""
        m = self._match
        if m is None:
            m = self._match = self.local.prefix.match(self.request.prefix_hashes)
        return m

    def adapter_rank(self, views: list[PodView]) -> int | None:
        """The adapter's rank: from the request, else from any pod that knows it, else None."""
        r = self._rank
        if r == -1:
            r = self.request.adapter.rank
            if r is None and self.adapter is not None:
                name = self.adapter
                for v in views:
                    got = v.ranks.get(name)
                    if got is not None:
                        r = got
                        break
            self._rank = r
        return r

    def computed_codes(self) -> list[int] | None:
        return self._codes

    def computed_match(self) -> dict[str, int] | None:
        return self._match

    def codes(self, views: list[PodView]) -> list[int]:
        """Placement code (tier * 3 + slot) of the requested adapter on each view."""
        c = self._codes
        if c is None:
            c = self._codes = tier_codes(self.adapter, views, self.now, self.local)
        return c


_REMOTE3 = T_REMOTE * 3
_INCOMING3 = T_INCOMING * 3


def tier_codes(adapter: str | None, views: list[PodView], now: float, local: LocalState) -> list[int]:
    """See the module docstring; optimistic incoming adapters count as occupying a slot."""
    if now >= local.inc_next_check:
        local.expire_incoming(now)
    if adapter is None:
        return [T_BASE * 3 + v.slot for v in views]
    r3 = _REMOTE3
    i3 = _INCOMING3
    return [i3 + v.slot if adapter in v.incoming else v.tier3.get(adapter, r3) + v.slot for v in views]


def code_name(code: int) -> str:
    """Human-readable placement, e.g. ``"cpu/saturated"``."""
    return f"{TIER_NAMES[code // 3]}/{SLOT_NAMES[code % 3]}"
