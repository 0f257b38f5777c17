"""The placement plan: where each adapter *should* live, from demand, slots and ranks. Pure.

``plan_placement(demand, pods, ranks=…, params=…, previous=…)`` assigns every adapter with
demand one of three roles, in this order:

1. **hot** — on GPU on several pods, replicas in proportion to its load. With N pods serving
   the base, S the base's total share and s the adapter's share, one pod's fair traffic is S/N and
   one replica should carry at most ``replica_load`` of it::

       replicas = clamp(⌈ s · N / (replica_load · S) ⌉, 1, min(eligible pods, max_replicas))

   Each replica takes one of the pod's ``max_loras − gpu_reserve`` GPU slots (and one CPU-cache
   entry). Adapters are taken by share, most demanded first, until the GPU slots run out.
2. **warm** — in the CPU LoRA cache of exactly one pod, so the cluster's CPU tiers together hold
   as many *distinct* adapters as they can (no pod caching what another already caches). vLLM's
   CPU cache also holds the GPU-resident adapters, so a pod has ``max_cpu_loras − cpu_reserve``
   entries for hot and warm adapters together. Taken by expected cost of a miss,
   ``share × load_cost(rank)``, with ``load_cost(rank) = load_s_base + load_s_per_rank × rank``
   (real vLLM 0.25.1 on an H200: a disk-tier adapter costs ≈ 31 ms + 3.9 ms × rank over a GPU hit,
   ../shared/reference/real-vllm-0.25.md), until the CPU entries run out.
3. **tail** — everything else, including adapters never seen: a stable *home* pod by weighted
   rendezvous hashing (highest ``w_p / −ln(u)``, u = xxh64(base ‖ adapter ‖ pod) / 2⁶⁴, w_p the
   pod's ``max_cpu_loras``), so an adapter's loads and CPU-cache hits concentrate on one pod and
   a pod joining or leaving moves only the adapters it wins or held.

Choosing pods (hot replicas, warm homes), most demanded adapters first: the pods the previous
plan gave the adapter keep it while they have a free slot and their planned traffic stays within
``load_slack`` × their fair share (so a plan recomputed every few seconds does not move adapters
around); the other replicas go to the least loaded pods with a free slot within that bound (ties
in rendezvous order), which balances the planned traffic like longest-processing-time-first
scheduling; if none is within the bound, to the least loaded pods with a free slot. Eligible pods:
healthy, serving the base, ``max_lora_rank`` ≥ the adapter's rank (``ranks``, else a pod's
``adapter_ranks``, else ``default_rank``).

Parameters (``PLAN_PARAMS``; YAML ``placement.plan``):

    gpu_reserve      1     GPU slots per pod kept out of the plan (tail and bursts use them)
    cpu_reserve      2     CPU-cache entries per pod kept out of the plan (for the tail)
    replica_load     0.5   share of one pod's fair traffic one hot replica carries at most
    max_replicas     0     cap on replicas of one adapter (0: every eligible pod)
    load_slack       1.25  a pod takes an adapter while its planned traffic ≤ slack × fair share
    min_share        0.0   adapters below this share of all demand are tail
    load_s_base      0.031 disk-tier cost at rank 0, seconds (real vLLM 0.25.1, 8B, H200)
    load_s_per_rank  0.0039 disk-tier cost per unit of rank, seconds (same source)
    default_rank     16    rank assumed when no one knows it (vLLM's default max-lora-rank)

YAML:

    placement:
      plan: {gpu_reserve: 1, cpu_reserve: 2, replica_load: 0.5, load_slack: 1.25}
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import xxhash

from scorer.demand import Demand, DemandKey
from scorer.model import PodState
from scorer.params import Param, validate_params

HOT, WARM, TAIL = "hot", "warm", "tail"
ROLES = (HOT, WARM, TAIL)
_ORDERS_MAX = 65_536

PLAN_PARAMS: dict[str, Param] = {
    "gpu_reserve": Param(1, int, min=0, doc="GPU slots per pod kept out of the plan"),
    "cpu_reserve": Param(2, int, min=0, doc="CPU-cache entries per pod kept out of the plan"),
    "replica_load": Param(0.5, float, min=0.01, max=1.0, doc="share of a pod's fair traffic one hot replica carries"),
    "max_replicas": Param(0, int, min=0, doc="cap on replicas of one adapter (0: no cap)"),
    "load_slack": Param(1.25, float, min=1.0, max=100.0, doc="planned traffic bound, × fair share"),
    "min_share": Param(0.0, float, min=0.0, max=1.0, doc="adapters below this share are tail"),
    "load_s_base": Param(0.031, float, min=0.0, doc="disk-tier cost at rank 0, seconds"),
    "load_s_per_rank": Param(0.0039, float, min=0.0, doc="disk-tier cost per unit of rank, seconds"),
    "default_rank": Param(16, int, min=1, doc="rank assumed when unknown"),
}


def validate_plan_params(raw: Mapping[str, Any] | None, path: str = "placement.plan") -> dict[str, Any]:
    return validate_params(raw, PLAN_PARAMS, path)


def load_cost_s(params: Mapping[str, Any], rank: int) -> float:
    """Seconds a disk-tier use of a rank-``rank`` adapter costs over a GPU hit (and stalls its pod)."""
    return float(params["load_s_base"] + params["load_s_per_rank"] * rank)


def rendezvous_score(base: str, adapter: str, pod_id: str, weight: float = 1.0) -> float:
    """Weighted rendezvous (highest random weight) score of ``pod_id`` for an adapter."""
    h = xxhash.xxh64_intdigest(f"{base}\x00{adapter}\x00{pod_id}".encode())
    u = (h + 0.5) / 18446744073709551616.0  # in (0, 1)
    return weight / -math.log(u)


def rendezvous_order(base: str, adapter: str, pods: Iterable[tuple[str, float]]) -> list[str]:
    """Pod ids (given with weights) best first for this adapter; ties (never in practice) by id."""
    scored = [(rendezvous_score(base, adapter, pid, w), pid) for pid, w in pods]
    scored.sort(key=lambda x: (-x[0], x[1]))
    return [pid for _, pid in scored]


@dataclass(frozen=True, slots=True)
class AdapterPlacement:
    """One adapter's target: its role and the pods that should hold it (a tail: its home)."""

    base: str
    adapter: str
    role: str
    pods: tuple[str, ...]
    share: float
    rank: int
    pod_set: frozenset[str] = field(default=frozenset(), compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "adapter": self.adapter, "role": self.role, "pods": list(self.pods),
                "share": round(self.share, 6), "rank": self.rank}


@dataclass(frozen=True, slots=True)
class PodPlan:
    """What one pod should hold: hot adapters (GPU), warm ones (CPU cache), by priority."""

    pod_id: str
    gpu: tuple[str, ...]
    cpu: tuple[str, ...]
    load: float
    max_loras: int
    max_cpu_loras: int

    def to_dict(self) -> dict[str, Any]:
        return {"gpu": list(self.gpu), "cpu": list(self.cpu), "planned_share": round(self.load, 6),
                "max_loras": self.max_loras, "max_cpu_loras": self.max_cpu_loras}


BasePods = dict[str, tuple[tuple[str, int, float], ...]]  # base -> ((pod id, max_lora_rank, weight), ...)


class RendezvousOrders:
    """Rendezvous orders of every pod serving a base, per adapter, for one set of pods; memoised
    (bounded), so plans recomputed over the same pods hash each adapter once."""

    __slots__ = ("base_pods", "_orders", "_max_rank")

    def __init__(self, base_pods: BasePods) -> None:
        self.base_pods = base_pods
        self._orders: dict[DemandKey, tuple[str, ...]] = {}
        self._max_rank = {pid: r for pods in base_pods.values() for pid, r, _ in pods}

    def order(self, base: str, adapter: str) -> tuple[str, ...]:
        key = (base, adapter)
        got = self._orders.get(key)
        if got is None:
            if len(self._orders) >= _ORDERS_MAX:
                self._orders.clear()
            got = self._orders[key] = tuple(rendezvous_order(
                base, adapter, [(pid, w) for pid, _, w in self.base_pods.get(base, ())]))
        return got

    def home(self, base: str, adapter: str, rank: int | None) -> str | None:
        """The first pod in the adapter's order that takes ``rank`` (any, for an unknown rank)."""
        order = self.order(base, adapter)
        if rank is None:
            return order[0] if order else None
        max_rank = self._max_rank
        return next((pid for pid in order if rank <= max_rank[pid]), None)


class PlacementPlan:
    """The result of ``plan_placement``. Read-only after construction (the rendezvous orders it
    carries are memoised, and shared with the next plan over the same pods)."""

    __slots__ = ("created_at", "adapters", "pods", "params", "orders", "unplaceable")

    def __init__(
        self,
        created_at: float,
        adapters: dict[DemandKey, AdapterPlacement],
        pods: dict[str, PodPlan],
        params: Mapping[str, Any],
        orders: RendezvousOrders,
        unplaceable: tuple[DemandKey, ...] = (),
    ) -> None:
        self.created_at = created_at
        self.adapters = adapters
        self.pods = pods
        self.params = dict(params)
        self.orders = orders
        self.unplaceable = unplaceable

    def get(self, base: str, adapter: str) -> AdapterPlacement | None:
        return self.adapters.get((base, adapter))

    def home(self, base: str, adapter: str, rank: int | None = None) -> str | None:
        """The rendezvous home of any adapter among this plan's pods for ``base`` (None: no pod
        serves the base, or none takes the rank)."""
        return self.orders.home(base, adapter, rank)

    def role_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(ROLES, 0)
        for a in self.adapters.values():
            counts[a.role] += 1
        return counts

    def to_dict(self, limit: int | None = None) -> dict[str, Any]:
        items = sorted(self.adapters.values(), key=lambda a: (ROLES.index(a.role), -a.share, a.base, a.adapter))
        if limit is not None:
            items = items[:limit]
        return {
            "created_at": round(self.created_at, 3),
            "params": dict(self.params),
            "roles": self.role_counts(),
            "adapters": [a.to_dict() for a in items],
            "pods": {pid: p.to_dict() for pid, p in sorted(self.pods.items())},
            "unplaceable": [{"base": b, "adapter": a} for b, a in self.unplaceable],
        }


@dataclass(slots=True)
class _Pod:
    pod_id: str
    max_loras: int
    max_cpu_loras: int
    max_rank: int
    weight: float
    gpu_left: int
    cpu_left: int
    bound: float = 0.0
    load: float = 0.0
    gpu: list[str] = field(default_factory=list)
    cpu: list[str] = field(default_factory=list)


def plan_placement(
    demand: Demand,
    pods: Mapping[str, PodState],
    *,
    ranks: Mapping[DemandKey, int] | None = None,
    params: Mapping[str, Any] | None = None,
    previous: PlacementPlan | None = None,
    now: float | None = None,
) -> PlacementPlan:
    """The target assignment (see the module docstring). ``params`` must be validated already
    (``validate_plan_params``) or None for the defaults."""
    p = dict(params) if params is not None else validate_plan_params(None)
    ranks = ranks or {}
    state: dict[str, _Pod] = {}
    base_pods: dict[str, list[str]] = {}
    known_ranks: dict[str, int] = {}
    for pid in sorted(pods):
        st = pods[pid]
        for name, r in st.adapter_ranks.items():
            known_ranks.setdefault(name, r)
        if not st.healthy:
            continue
        state[pid] = _Pod(
            pid, max(1, st.max_loras), max(1, st.max_cpu_loras), st.max_lora_rank, float(max(1, st.max_cpu_loras)),
            gpu_left=max(0, st.max_loras - p["gpu_reserve"]),
            cpu_left=max(0, max(st.max_cpu_loras, st.max_loras) - p["cpu_reserve"]),
        )
        for base in st.base_models:
            base_pods.setdefault(base, []).append(pid)

    def rank_of(key: DemandKey) -> int:
        r = ranks.get(key)
        if r is None:
            r = known_ranks.get(key[1], p["default_rank"])
        return int(r)

    entries = [a for a in demand.adapters if a.share > 0 and a.share >= p["min_share"]]
    base_share: dict[str, float] = {}
    for a in entries:
        base_share[a.base] = base_share.get(a.base, 0.0) + a.share
    for base, pids in base_pods.items():
        fair = base_share.get(base, 0.0) / len(pids)
        for pid in pids:
            state[pid].bound += p["load_slack"] * fair

    def eligible(base: str, rank: int) -> list[_Pod]:
        return [state[pid] for pid in base_pods.get(base, ()) if rank <= state[pid].max_rank]

    weighted: BasePods = {
        base: tuple((pid, state[pid].max_rank, state[pid].weight) for pid in pids) for base, pids in base_pods.items()
    }
    same_pods = previous is not None and previous.orders.base_pods == weighted
    orders = previous.orders if previous is not None and same_pods else RendezvousOrders(weighted)

    def candidates(key: DemandKey, elig: list[_Pod]) -> tuple[list[_Pod], set[str]]:
        """Eligible pods in rendezvous order, and the ones the previous plan gave the adapter."""
        by_id = {s.pod_id: s for s in elig}
        order = [pid for pid in orders.order(*key) if pid in by_id]
        prev = previous.get(*key) if previous is not None else None
        sticky = {pid for pid in prev.pods if pid in by_id} if prev is not None and prev.role != TAIL else set()
        return [by_id[pid] for pid in order], sticky

    def choose(cands: tuple[list[_Pod], set[str]], n: int, per: float, fits: Any) -> list[_Pod]:
        order, sticky = cands
        rank = {s.pod_id: i for i, s in enumerate(order)}
        ok = [s for s in order if fits(s) and s.load + per <= s.bound + 1e-12]
        chosen = [s for s in ok if s.pod_id in sticky][:n]
        taken = {s.pod_id for s in chosen}
        for pool in (ok, [s for s in order if fits(s)]):
            if len(chosen) >= n:
                break
            rest = sorted((s for s in pool if s.pod_id not in taken), key=lambda s: (s.load, rank[s.pod_id]))
            chosen += rest[: n - len(chosen)]
            taken = {s.pod_id for s in chosen}
        return chosen

    placed: dict[DemandKey, AdapterPlacement] = {}
    unplaceable: list[DemandKey] = []
    later: list[tuple[DemandKey, float, int]] = []
    # 1. hot: by share
    for a in entries:
        key = (a.base, a.adapter)
        rank = rank_of(key)
        elig = eligible(a.base, rank)
        if not elig:
            unplaceable.append(key)
            continue
        if not any(s.gpu_left > 0 and s.cpu_left > 0 for s in elig):
            later.append((key, a.share, rank))
            continue
        n_base = len(base_pods[a.base])
        want = math.ceil(a.share * n_base / (p["replica_load"] * base_share[a.base]) - 1e-9)
        cap = len(elig) if p["max_replicas"] == 0 else min(len(elig), p["max_replicas"])
        want = max(1, min(want, cap))
        chosen = choose(candidates(key, elig), want, a.share / want, lambda s: s.gpu_left > 0 and s.cpu_left > 0)
        if not chosen:
            later.append((key, a.share, rank))
            continue
        per = a.share / len(chosen)
        for s in chosen:
            s.gpu_left -= 1
            s.cpu_left -= 1
            s.load += per
            s.gpu.append(a.adapter)
        placed[key] = _placement(key, HOT, tuple(s.pod_id for s in chosen), a.share, rank)
    # 2. warm: by expected miss cost
    later.sort(key=lambda x: (-x[1] * load_cost_s(p, x[2]), x[0]))
    tail: list[tuple[DemandKey, float, int]] = []
    for key, share, rank in later:
        elig = eligible(key[0], rank)
        if not any(s.cpu_left > 0 for s in elig):
            tail.append((key, share, rank))
            continue
        chosen = choose(candidates(key, elig), 1, share, lambda s: s.cpu_left > 0)
        if not chosen:
            tail.append((key, share, rank))
            continue
        s = chosen[0]
        s.cpu_left -= 1
        s.load += share
        s.cpu.append(key[1])
        placed[key] = _placement(key, WARM, (s.pod_id,), share, rank)
    # 3. tail: rendezvous home
    plan_pods = {
        pid: PodPlan(pid, tuple(s.gpu), tuple(s.cpu), s.load, s.max_loras, s.max_cpu_loras) for pid, s in state.items()
    }
    plan = PlacementPlan(demand.at if now is None else now, placed, plan_pods, p, orders, tuple(unplaceable))
    for key, share, rank in tail:
        home = plan.home(key[0], key[1], rank)
        if home is not None:
            placed[key] = _placement(key, TAIL, (home,), share, rank)
    return plan


def _placement(key: DemandKey, role: str, pods: tuple[str, ...], share: float, rank: int) -> AdapterPlacement:
    return AdapterPlacement(key[0], key[1], role, pods, share, rank, frozenset(pods))
