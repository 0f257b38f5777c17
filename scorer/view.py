"""What plugins read about pods: immutable per-state views, the router's live counters, the pick context.

- ``PodView`` is derived once per ``PodState`` object (the pipeline caches it and rebuilds it only
  when the state object for a pod changes) and never written afterwards, so the hot path reads
  frozensets and ints instead of re-deriving them from tuples on every pick. It carries one
  thing across states: ``healthy_since``, the first healthy observation since the pod joined
  the view or recovered (the ``recovery`` scorer reads it).
- ``PodLocal`` is what this router itself knows about one pod, exactly and instantly (requests in
  flight, pending work, adapters it has just sent there). It is mutable and owned by
  ``scorer.state.LocalState``; every view of the pod points to the same ``PodLocal``.
- ``scorer.context.PickContext`` (its own module) holds the per-pick values computed at most
  once and shared by every plugin.

Adapter placement of the requested adapter on a pod is one *tier* (``placement``), and together
with the pod's slot state one *code* ``tier * 3 + slot`` (``tier_codes``):

tiers (where the adapter is)        slots (whether it can get a GPU slot)
  BASE     request for the base       FREE       fewer adapters on GPU than max_loras
  GPU      on GPU (or running)        FREEABLE   no free slot, but an adapter on GPU has
  INCOMING we just sent it there                 nothing running (eviction is free)
  LOADING  the sidecar is loading it  SATURATED  every slot holds an adapter with requests
  CPU      in vLLM's CPU LoRA cache                in flight: a new adapter waits ("deferred")
  DISK     on the pod's local disk
  REMOTE   nowhere on the pod (fetch + load)

``stored_tier`` is the tier the pod's own state reports (GPU, LOADING, CPU, DISK or REMOTE, best
first; the order is fixed once per view in ``PodView.tier3``); ``placement`` adds this router's
belief that it has just sent the adapter there (INCOMING, which outranks every stored tier but
GPU). The scorers use ``placement``; the gateway's decision to ask a sidecar to fetch the adapter
uses ``stored_tier``, because only the pod itself can say the adapter is on its disk.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

from scorer.model import (
    T_BASE, T_CPU, T_DISK, T_GPU, T_INCOMING, T_LOADING, T_REMOTE, TIER_NAMES, PodState,
)
from scorer.costmodel import group_key

__all__ = [
    "N_CODES", "S_FREE", "S_FREEABLE", "S_SATURATED", "SLOT_NAMES", "T_BASE", "T_CPU", "T_DISK", "T_GPU",
    "T_INCOMING", "T_LOADING", "T_REMOTE", "TIER_NAMES", "PodLocal", "PodView", "code_name",
    "placement", "slot_state", "stored_tier", "tier_codes",
]

S_FREE, S_FREEABLE, S_SATURATED = range(3)
SLOT_NAMES = ("free", "freeable", "saturated")
N_CODES = 21


class PodLocal:
    """What this router itself knows about one pod, exactly and instantly.

    ``inflight`` / ``inflight_tokens``: requests dispatched and not completed, and their
    prompt + max_tokens. ``pending_until``: when the pod will have worked off what this router
    sent it: the uncached prompt tokens (drained at the prefill rate) and the adapter loads they
    trigger (each stalls the engine). ``incoming``: adapter → expiry time of the optimistic
    belief that it is being loaded there. ``slot``: the slot state of the pod's current view with
    the incoming adapters counted as occupying slots (kept up to date by ``LocalState``).

    With routing state shared between gateway replicas (``scorer.sharing``) the three figures the
    scorers read — ``inflight``, ``inflight_tokens``, ``pending_until`` — are the merged ones:
    this router's own (``own_*``, what it publishes) plus the fresh peers' (``peer_*``), and
    ``incoming`` holds the peers' marks too (``sent``: the marks this router made, with their
    time). Without peers the merged figures equal the own ones.
    """

    __slots__ = (
        "inflight", "inflight_tokens", "pending_until", "incoming", "dispatched", "inc_check_at", "slot",
        "own_inflight", "own_tokens", "own_pending_until", "peer_inflight", "peer_tokens", "sent",
    )

    def __init__(self) -> None:
        self.inflight = 0
        self.inflight_tokens = 0
        self.pending_until = 0.0
        self.incoming: dict[str, float] = {}
        self.dispatched = 0
        # The earliest expiry among ``incoming`` (inf when empty).
        self.inc_check_at = float("inf")
        self.slot = S_FREE
        self.own_inflight = 0
        self.own_tokens = 0
        self.own_pending_until = 0.0
        self.peer_inflight = 0
        self.peer_tokens = 0
        # adapter -> when this router sent it here (its own incoming marks, for the peers)
        self.sent: dict[str, float] = {}


class PodView:
    """What the plugins read about one pod: its PodState, derived sets, and its ``PodLocal``."""

    __slots__ = (
        "pod_id", "state", "local", "healthy", "observed_at", "bases", "gpu", "cpu", "disk",
        "loading", "running", "n_gpu", "n_running", "max_loras", "max_lora_rank", "ranks",
        "kv", "num_running", "num_waiting", "num_deferred", "capacity_blocks",
        "tier3", "load", "defer_factor", "base_slot", "kv_free", "group", "healthy_since",
    )

    def __init__(
        self, pod_id: str, state: PodState, local: PodLocal, capacity_blocks: int, prev: PodView | None = None
    ) -> None:
        self.pod_id = pod_id
        self.state = state
        self.local = local
        self.healthy = state.healthy
        self.observed_at = state.observed_at
        # since when the pod has been healthy without a break in this router's view (its first
        # healthy observation after it joined the view or recovered); inf while unhealthy
        if not state.healthy:
            self.healthy_since = float("inf")
        elif prev is not None and prev.healthy:
            self.healthy_since = prev.healthy_since
        else:
            self.healthy_since = state.observed_at
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
            gpu = frozenset(state.gpu_adapters)
            if state.num_deferred == 0 or not gpu:
                gpu |= running
            self.gpu = gpu
            self.cpu = frozenset(state.cpu_adapters)
            self.disk = frozenset(state.disk_adapters)
            self.loading = frozenset(state.loading_adapters)
            self.running = running
            # adapter name -> stored tier * 3 (the placement code without the slot): the one
            # place that orders the tiers a pod reports; the best tier wins
            tier3: dict[str, int] = dict.fromkeys(self.disk, T_DISK * 3)
            tier3.update(dict.fromkeys(self.cpu, T_CPU * 3))
            tier3.update(dict.fromkeys(self.loading, T_LOADING * 3))
            tier3.update(dict.fromkeys(self.gpu, T_GPU * 3))
            self.tier3: Mapping[str, int] = tier3
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
        # What the PodState alone says about slots; ``local.slot`` adds the incoming adapters.
        # A deferred request means every slot is held by an adapter with requests running.
        self.base_slot = S_SATURATED if self.num_deferred else slot_state(self.n_gpu, self.n_running, self.max_loras)
        self.load = self.num_running + self.num_waiting
        self.defer_factor = 1.0 + self.num_deferred / self.max_loras
        # the pod group whose cost constants apply (scorer.costmodel.group_key), interned so that
        # views of one group share one string object
        if ps is not None and prev is not None and ps.base_models == state.base_models and (
                ps.max_loras, ps.max_cpu_loras, ps.max_lora_rank) == (state.max_loras, state.max_cpu_loras,
                                                                      state.max_lora_rank):
            self.group = prev.group
        else:
            self.group = sys.intern(group_key(state.base_models, state.max_loras, state.max_cpu_loras,
                                              state.max_lora_rank))

    def slot_with(self, extra: int) -> int:
        """The slot state with ``extra`` more adapters occupying slots (incoming ones)."""
        if not extra:
            return self.base_slot
        return slot_state(self.n_gpu + extra, self.n_running + extra, self.max_loras)


def slot_state(n_gpu: int, n_running: int, max_loras: int) -> int:
    """FREE if a slot is empty, FREEABLE if an idle adapter can be evicted, else SATURATED."""
    if n_gpu < max_loras:
        return S_FREE
    if n_running < max_loras:
        return S_FREEABLE
    return S_SATURATED


_REMOTE3 = T_REMOTE * 3
_INCOMING3 = T_INCOMING * 3
_BASE3 = T_BASE * 3


def stored_tier(view: PodView, adapter: str | None) -> int:
    """Where the pod's own state puts ``adapter`` (None: the base model): T_BASE, T_GPU,
    T_LOADING, T_CPU, T_DISK or T_REMOTE."""
    if adapter is None:
        return T_BASE
    return view.tier3.get(adapter, _REMOTE3) // 3


def placement(view: PodView, adapter: str | None) -> int:
    """The tier the scorers price: ``stored_tier``, or T_INCOMING when this router has just sent
    ``adapter`` to the pod and the pod does not show it on GPU yet."""
    if adapter is not None and adapter in view.local.incoming:
        return T_INCOMING
    return stored_tier(view, adapter)


def tier_codes(adapter: str | None, views: list[PodView]) -> list[int]:
    """``placement(v, adapter) * 3 + v.local.slot`` for each view, in one comprehension.

    Incoming entries are current: ``LocalState.expire_due`` runs once at the start of each pick
    and on each dispatch, before any code is computed.
    """
    if adapter is None:
        return [_BASE3 + v.local.slot for v in views]
    r3 = _REMOTE3
    i3 = _INCOMING3
    return [
        (i3 if adapter in (loc := v.local).incoming else v.tier3.get(adapter, r3)) + loc.slot for v in views
    ]


def code_name(code: int) -> str:
    """Human-readable placement, e.g. ``"cpu/saturated"``."""
    return f"{TIER_NAMES[code // 3]}/{SLOT_NAMES[code % 3]}"
