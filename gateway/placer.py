"""The placer: share demand, compute the placement plan, and (leader only) move pods towards it.

One ``Placer`` runs in every gateway replica with ``placement.enabled``. Every
``placement.interval_s`` (1 s) a cycle:

1. every ``demand.publish_s`` (5 s): publishes this replica's decayed demand counts, reads every
   writer's and merges them (``scorer.demand``): the cluster's demand. A replica that starts
   and finds no live writer in the store (a restarted cluster) first takes the persisted counts
   as its own, downtime removed (``resume_from``), so yesterday's popular adapters shape the
   plan until live traffic outweighs them;
2. at the same pace, and whenever a pod comes, goes or changes health or limits: computes the plan
   (``scorer.placement``) from that demand, the pods' PodStates and the ranks of the allowlist, and
   installs it in the pipeline, where the ``placement-plan`` scorer reads it — every replica
   computes it from the same inputs, so they route alike (a plan of a few hundred adapters takes
   milliseconds on the event loop, so it is not recomputed every cycle);
3. takes or renews the leader lease in the store. Only the leader acts:

   - **warm-up**: a pod it sees for the first time with nothing loaded (a fresh vLLM) and with
     targets in the plan is held out of traffic — on every replica, through the leader's status
     record — and loaded with its targets (the CPU-cache ones first, the GPU ones last so they
     end up in the slots), then released; at most ``warmup.timeout_s``. A pod that had adapters
     and shows none again (its vLLM restarted) is warmed again. A pod is looked at once it is
     healthy, and held from its first healthy PodState until a cycle has (at most one interval),
     so traffic does not beat the warm-up.
     While the pods held at start-up warm (``starting``), the gateway's ``/ready`` says 503, so a
     load balancer does not pour the traffic of a whole cluster onto the first pod released;
     later warm-ups (a pod restarted, a pod added) hold only that pod.
   - **pre-load**: on a pod that takes traffic, the first planned adapter it does not hold (hot
     ones by share, then warm ones by expected miss cost), only if every check passes — else the
     skip is recorded with its reason:

     ============  =========================================================================
     unhealthy     the PodState says so
     loading       the pod is already loading an adapter (never two loads on a pod at once;
                   nor while one of ours is in flight)
     busy          more than ``preload.max_busy`` requests running or waiting (PodState or this
                   gateway's in-flight count): a load stalls every one of them
     budget        the stall would exceed ``preload.stall_budget_s`` per ``budget_window_s``
                   (stall estimated as the larger of the plan's load cost for the rank and the
                   most expensive of the last 16 loads of that rank, ``StallEstimates``;
                   accounted as measured)
     would_evict   the pod's CPU cache is full and its least recently used entry is planned there
     gpu_busy      every GPU slot holds an adapter with requests running (the load would evict
                   one the next step needs again)
     no_path       no sidecar and no ``placement.adapter_dir``
     ============  =========================================================================

   A pre-load's estimated stall joins the pod's pending queue in the pipeline
   (``Pipeline.note_stall``), so ``estimated-ttft`` routes new requests around the pod while it
   loads, as it does around a load it triggered itself. A load that just succeeded counts as
   resident for 10 s (until the PodState shows it); one that failed is not retried on that pod
   for 30 s.

Every action (loaded, failed, skipped) is kept for ``GET /admin/placement`` (the last
``actions_kept``) and counted in ``/metrics`` (``gateway.placement_metrics``). Nothing here is on
the request path: a pick reads the installed plan, and ``admits`` is one set lookup.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from gateway.discovery import Endpoint
from gateway.placement_config import PlacementConfig
from gateway.placement_loader import AdapterLoader
from podstate.background import Background
from podstate.placement_store import PlacementStore, PlacerStatus
from scorer.demand import Demand, DemandKey, DemandSnapshot, merge_demand, resume_from
from scorer.model import PodState
from scorer.pipeline import Pipeline
from scorer.placement import HOT, WARM, PlacementPlan, load_cost_s, plan_placement



class _Runtime(Protocol):
    @property
    def pipeline(self) -> Pipeline: ...


class _Upstream(Protocol):
    @property
    def session(self) -> aiohttp.ClientSession: ...


class PlacerHost(Protocol):
    """What the placer needs of the gateway it runs in (``gateway.service.Gateway`` is one; the
    placer does not import it, so the two modules form no circle)."""

    @property
    def runtime(self) -> _Runtime: ...
    @property
    def upstream(self) -> _Upstream: ...
    def pod_states(self) -> dict[str, PodState]: ...
    def refresh_routable(self) -> None: ...
    def adapter_ranks(self) -> dict[DemandKey, int]: ...
    def note_loaded(self, pod_id: str, adapter: str, rank: int | None) -> None: ...
    def endpoint(self, pod_id: str) -> Endpoint | None: ...
    def sidecar_headers(self) -> dict[str, str]: ...

log = logging.getLogger("loraroute.gateway.placer")

WARMUP, PRELOAD = "warmup", "preload"
SKIP_REASONS = ("unhealthy", "loading", "busy", "budget", "would_evict", "gpu_busy", "no_path")
RECENT_LOAD_S = 10.0
FAILED_BACKOFF_S = 30.0


def default_replica_id() -> str:
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:60] or "gateway"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(slots=True)
class Action:
    """One thing the placer did or chose not to do (times are Unix seconds)."""

    at: float
    pod: str
    adapter: str
    role: str
    phase: str
    outcome: str          # "loaded" | "failed" | "skipped" | "started" | "released"
    reason: str
    stall_s: float = 0.0
    ended_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"at": round(self.at, 3), "pod": self.pod, "adapter": self.adapter, "role": self.role,
               "phase": self.phase, "outcome": self.outcome, "reason": self.reason}
        if self.outcome in ("loaded", "failed"):
            out["stall_s"] = round(self.stall_s, 4)
            out["ended_at"] = round(self.ended_at, 3) if self.ended_at is not None else None
        return out


class StallEstimates:
    """What a pre-load of a given rank is expected to stall its pod: the most expensive of the
    last ``keep`` loads of that rank (never below the configured cost). An average let the budget
    check pass loads that then cost more than expected: on the long tail every pod's worst 60 s
    window went 1.5-8 % over its budget. With the recent maximum the budget holds unless a load
    costs more than every one of the last ``keep`` loads of its rank."""

    def __init__(self, keep: int = 16) -> None:
        self.keep = keep
        self._by_rank: dict[int, collections.deque[float]] = {}

    def observe(self, rank: int, stall_s: float) -> None:
        if stall_s > 0:
            self._by_rank.setdefault(rank, collections.deque(maxlen=self.keep)).append(stall_s)

    def estimate(self, rank: int, configured_s: float) -> float:
        seen = self._by_rank.get(rank)
        return max(configured_s, max(seen)) if seen else configured_s


class StallBudget:
    """Engine-stall seconds per pod in a sliding window."""

    def __init__(self, budget_s: float, window_s: float) -> None:
        self.budget_s = budget_s
        self.window_s = window_s
        self._events: dict[str, collections.deque[tuple[float, float]]] = {}

    def used(self, pod: str, now: float) -> float:
        q = self._events.get(pod)
        if not q:
            return 0.0
        while q and q[0][0] <= now - self.window_s:
            q.popleft()
        return sum(s for _, s in q)

    def add(self, pod: str, now: float, seconds: float) -> None:
        self._events.setdefault(pod, collections.deque()).append((now, seconds))

    def forget(self, pod: str) -> None:
        self._events.pop(pod, None)


@dataclass(slots=True)
class _Warmup:
    started: float                     # monotonic
    started_at: float                  # unix
    attempted: set[str] = field(default_factory=set)
    loaded: int = 0


def is_fresh(state: PodState) -> bool:
    """Nothing loaded, running or loading: a vLLM server that just started."""
    return not (state.gpu_adapters or state.cpu_adapters or state.running_adapters or state.loading_adapters)


class _Cycles(Background):
    """The placer's loop as a background task (``Background`` starts and cancels it)."""

    task_name = "placer"

    def __init__(self, placer: Placer) -> None:
        self.placer = placer

    async def _run(self) -> None:
        await self.placer.loop()


class Placer:
    def __init__(self, gw: PlacerHost, config: PlacementConfig, store: PlacementStore,
                 replica_id: str | None = None) -> None:
        self.gw = gw
        self.config = config
        self.store = store
        self.replica_id = replica_id or config.replica_id or default_replica_id()
        self.plan_params = config.plan_params()
        self.loader = AdapterLoader(lambda: gw.upstream.session, config.adapter_dir, config.preload.timeout_s,
                                    gw.sidecar_headers)
        self.budget = StallBudget(config.preload.stall_budget_s, config.preload.budget_window_s)
        self.plan: PlacementPlan | None = None
        self.demand: Demand | None = None
        self.is_leader = False
        self.leader: str | None = None
        self.cycles = 0
        self.last_cycle_s = 0.0
        self.actions: collections.deque[Action] = collections.deque(maxlen=config.actions_kept)
        self.counts: collections.Counter[tuple[str, str, str]] = collections.Counter()   # (pod, phase, outcome)
        self.skips: collections.Counter[str] = collections.Counter()                     # reason
        self.stall_total: collections.Counter[tuple[str, str]] = collections.Counter()   # (pod, phase)
        self.warming: dict[str, _Warmup] = {}
        self._held: frozenset[str] = frozenset()
        self._first_seen: dict[str, tuple[float, float]] = {}  # pod -> (monotonic, unix) of first sight
        self._assessed: set[str] = set()
        self._had_adapters: set[str] = set()
        self._loads: dict[str, asyncio.Task[None]] = {}
        self._recent: dict[tuple[str, str], float] = {}
        self._failed: dict[tuple[str, str], float] = {}
        self._last_skip: dict[str, tuple[str, str]] = {}
        self.stall_estimates = StallEstimates()
        self._next_refresh = 0.0
        self._pods_key: tuple[Any, ...] = ()
        self._cycles = _Cycles(self)
        self.starting = config.warmup.enabled
        self.resumed = 0  # adapters whose persisted counts this replica took over at start
        self._started = 0.0

    # --- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, resume persisted demand, run one cycle at once (so pods are assessed before
        traffic), then loop."""
        self._started = time.monotonic()
        await self.store.start()
        cfg = self.config
        prior = resume_from(await self.store.load_demand(), self.replica_id, time.time(),
                            live_window_s=3 * max(cfg.demand.publish_s, cfg.interval_s))
        if prior is not None:
            self.gw.runtime.pipeline.demand.load(prior)
            self.resumed = len(prior.entries)
            log.info("no live replica in the store: resuming the persisted demand of %d adapters", self.resumed)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.cycle(), timeout=max(5.0, 3 * cfg.interval_s))
        self._cycles.start()

    async def close(self) -> None:
        await self._cycles.close()
        for task in list(self._loads.values()):
            task.cancel()
        for task in list(self._loads.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self.store.publish_demand(self._own_snapshot(time.time()), self.config.demand.retention_s)
        if self.is_leader:
            with contextlib.suppress(Exception):
                await self.store.release_lease(self.replica_id)
        self.is_leader = False
        await self.store.close()

    async def loop(self) -> None:
        """A cycle every ``interval_s`` until cancelled."""
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                await self.cycle()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bad cycle must not stop placement for good
                log.error("placer cycle failed: %s", type(exc).__name__, exc_info=exc)

    # --- the gate on the routable set --------------------------------------------------------------
    def admits(self, pod_id: str, state: PodState) -> bool:
        """False while ``pod_id`` is held out of traffic (warming, or healthy and not yet looked at)."""
        if pod_id in self._held:
            return False
        if pod_id in self._first_seen or not self.config.warmup.enabled or not state.healthy:
            return True  # an unhealthy pod takes no traffic anyway (healthy-fresh)
        # first healthy sight: held until the next cycle has looked at it
        self._first_seen[pod_id] = (time.monotonic(), time.time())
        self._held = self._held | {pod_id}
        return False

    @property
    def held(self) -> frozenset[str]:
        return self._held

    # --- one cycle -----------------------------------------------------------------------------------
    def _own_snapshot(self, now: float) -> DemandSnapshot:
        return self.gw.runtime.pipeline.demand.snapshot(self.replica_id, now)

    async def cycle(self) -> None:
        t0 = time.perf_counter()
        now, mono = time.time(), time.monotonic()
        cfg = self.config
        states = dict(self.gw.pod_states())
        pods_key = tuple(sorted((p, st.healthy, st.base_models, st.max_loras, st.max_cpu_loras, st.max_lora_rank)
                                for p, st in states.items()))
        due = mono >= self._next_refresh
        if due:
            own = self._own_snapshot(now)
            await self.store.publish_demand(own, cfg.demand.retention_s)
            snapshots = [s for s in await self.store.load_demand() if s.writer != self.replica_id]
            self.demand = merge_demand([*snapshots, own], now)
            self._next_refresh = mono + cfg.demand.publish_s
        if due or pods_key != self._pods_key or self.plan is None:
            assert self.demand is not None
            self.plan = plan_placement(self.demand, states, ranks=self.gw.adapter_ranks(), params=self.plan_params,
                                       previous=self.plan, now=now)
            self.gw.runtime.pipeline.set_plan(self.plan)
            self._pods_key = pods_key
        self._forget_gone(states, mono)
        leader = await self.store.acquire_lease(self.replica_id, cfg.lease_ttl_s)
        if leader != self.is_leader:
            log.info("placer %s %s the leader lease", self.replica_id, "took" if leader else "lost")
            self._assessed.clear()
        self.is_leader = leader
        if leader:
            self.leader = self.replica_id
            self._assess(states, mono, now)
            self._act(states, mono, now)
            await self.store.publish_status(PlacerStatus(self.replica_id, now, tuple(sorted(self.warming))),
                                            cfg.lease_ttl_s)
            holds = set(self.warming)
            pending: set[str] = set()
        else:
            self.warming.clear()
            status = await self.store.load_status()
            self.leader = status.leader if status is not None else await self.store.lease_holder()
            holds = set(status.warming) if status is not None else set()
            # a pod first seen here waits for a leader status newer than that sight (bounded)
            patience = 3 * cfg.interval_s
            pending = {
                p for p, (seen_mono, seen_unix) in self._first_seen.items()
                if p in states and mono - seen_mono < patience and (status is None or status.at < seen_unix)
            }
        self._set_held(frozenset((holds | pending) & set(states)))
        if self.starting and ((states and not self._held) or mono - self._started > cfg.warmup.timeout_s):
            self.starting = False
        self.cycles += 1
        self.last_cycle_s = time.perf_counter() - t0

    def _forget_gone(self, states: Mapping[str, PodState], mono: float) -> None:
        """Drop what is kept about pods that left, and expired failure backoffs (all bounded)."""
        for pod_id in [p for p in self._first_seen if p not in states]:
            del self._first_seen[pod_id]
            self._assessed.discard(pod_id)
            self._had_adapters.discard(pod_id)
            self._last_skip.pop(pod_id, None)
            self.budget.forget(pod_id)
        for key in [k for k, until in self._failed.items() if until <= mono or k[0] not in states]:
            del self._failed[key]

    def _set_held(self, held: frozenset[str]) -> None:
        if held != self._held:
            self._held = held
            self.gw.refresh_routable()

    # --- leader: warm-ups --------------------------------------------------------------------------
    def _assess(self, states: Mapping[str, PodState], mono: float, now: float) -> None:
        assert self.plan is not None
        wcfg = self.config.warmup
        for pod_id, st in states.items():
            if not st.healthy:
                continue  # looked at once it is up: a vLLM that is still starting is fresh then
            self._first_seen.setdefault(pod_id, (mono, now))
            fresh = is_fresh(st)
            restarted = pod_id in self._had_adapters and fresh and pod_id in self._assessed
            if not fresh:
                self._had_adapters.add(pod_id)
            if pod_id in self._assessed and not restarted:
                continue
            self._assessed.add(pod_id)
            if restarted:
                self._had_adapters.discard(pod_id)
            plan = self.plan.pods.get(pod_id)
            if wcfg.enabled and fresh and plan is not None and (plan.gpu or plan.cpu) and pod_id not in self.warming:
                self.warming[pod_id] = _Warmup(mono, now)
                self._record(Action(now, pod_id, "", "", WARMUP, "started",
                                    f"{len(plan.gpu) + len(plan.cpu)} planned adapters"
                                    + (" (the pod restarted)" if restarted else "")))
        for pod_id in list(self.warming):
            w = self.warming[pod_id]
            if pod_id not in states:
                del self.warming[pod_id]
            elif mono - w.started > wcfg.timeout_s and pod_id not in self._loads:
                self._release(pod_id, now, f"timed out after {wcfg.timeout_s:g} s, {w.loaded} loaded")

    def _release(self, pod_id: str, now: float, why: str) -> None:
        self.warming.pop(pod_id, None)
        self._record(Action(now, pod_id, "", "", WARMUP, "released", why))

    # --- leader: loads ------------------------------------------------------------------------------
    def _resident(self, pod_id: str, st: PodState, mono: float) -> set[str]:
        have = set(st.gpu_adapters) | set(st.cpu_adapters) | set(st.loading_adapters)
        for (pid, name), at in list(self._recent.items()):
            if mono - at > RECENT_LOAD_S:
                del self._recent[(pid, name)]
            elif pid == pod_id:
                have.add(name)
        return have

    def _wanted(self, pod_id: str, st: PodState, mono: float, warming: _Warmup | None) -> list[tuple[str, str]]:
        """(adapter, role) this pod should get, in load order."""
        assert self.plan is not None
        pp = self.plan.pods.get(pod_id)
        if pp is None:
            return []
        if warming is not None:  # CPU-cache targets first, GPU ones last (the last loads hold the slots)
            order = [(a, WARM) for a in reversed(pp.cpu)] + [(a, HOT) for a in reversed(pp.gpu)]
        else:
            order = [(a, HOT) for a in pp.gpu] + [(a, WARM) for a in pp.cpu]
        have = self._resident(pod_id, st, mono)
        out = []
        for name, role in order:
            if name in have or (warming is not None and name in warming.attempted):
                continue
            if self._failed.get((pod_id, name), 0.0) > mono:
                continue
            out.append((name, role))
        return out

    def _rank(self, st: PodState, adapter: str) -> int:
        """The planned adapter's rank (the plan knows it for every adapter it placed)."""
        assert self.plan is not None
        for base in st.base_models:
            target = self.plan.get(base, adapter)
            if target is not None:
                return target.rank
        return int(self.plan_params["default_rank"])

    def estimated_stall_s(self, rank: int) -> float:
        return self.stall_estimates.estimate(rank, load_cost_s(self.plan_params, rank))

    def _act(self, states: Mapping[str, PodState], mono: float, now: float) -> None:
        pcfg = self.config.preload
        pipeline = self.gw.runtime.pipeline
        for pod_id in sorted(states):
            if pod_id in self._loads:
                continue
            st = states[pod_id]
            warming = self.warming.get(pod_id)
            wanted = self._wanted(pod_id, st, mono, warming)
            if warming is not None:
                if not wanted:
                    self._release(pod_id, now, f"done: {warming.loaded} loaded in {mono - warming.started:.1f} s")
                    continue
                if st.loading_adapters:
                    continue  # wait for the load under way (not ours) to finish
                adapter, role = wanted[0]
                if not self.loader.can_load(self._where(pod_id)[1]):
                    self._release(pod_id, now, "no way to load: no sidecar and no placement.adapter_dir")
                    continue
                self._launch(pod_id, adapter, role, WARMUP, now)
                continue
            if not pcfg.enabled or not wanted:
                continue
            adapter, role = wanted[0]
            rank = self._rank(st, adapter)
            reason = self._why_not(pod_id, st, rank, pipeline.inflight(pod_id)[0], mono)
            if reason is not None:
                self._skip(pod_id, adapter, role, reason, now)
                continue
            self._launch(pod_id, adapter, role, PRELOAD, now, self.estimated_stall_s(rank))

    def _where(self, pod_id: str) -> tuple[str, str | None]:
        """(vLLM URL, sidecar URL or None) of a pod."""
        ep = self.gw.endpoint(pod_id)
        return (ep.url, ep.sidecar_url) if ep is not None else ("", None)

    def _why_not(self, pod_id: str, st: PodState, rank: int, inflight: int, mono: float) -> tuple[str, str] | None:
        """(reason code, explanation) when a pre-load must not happen now, else None."""
        pcfg = self.config.preload
        if not st.healthy:
            return "unhealthy", "the pod's state says unhealthy"
        if st.loading_adapters:
            return "loading", f"the pod is already loading {st.loading_adapters[0]!r}"
        busy = max(st.num_running + st.num_waiting, inflight)
        if busy > pcfg.max_busy:
            return "busy", f"{busy} requests running or waiting > max_busy {pcfg.max_busy}"
        est = self.estimated_stall_s(rank)
        used = self.budget.used(pod_id, mono)
        if used + est > pcfg.stall_budget_s:
            return "budget", (f"stall budget: {used:.2f} s used + {est:.2f} s > {pcfg.stall_budget_s:g} s "
                              f"per {pcfg.budget_window_s:g} s")
        plan = self.plan.pods.get(pod_id) if self.plan is not None else None
        n_cached = len(set(st.gpu_adapters) | set(st.cpu_adapters))
        if plan is not None and n_cached >= max(st.max_cpu_loras, st.max_loras):
            victim = st.cpu_adapters[0] if st.cpu_adapters else (st.gpu_adapters[0] if st.gpu_adapters else None)
            if victim is not None and (victim in plan.cpu or victim in plan.gpu):
                return "would_evict", f"the CPU cache is full and its LRU entry {victim!r} is planned here"
        running = set(st.running_adapters)
        if len(st.gpu_adapters) >= st.max_loras and all(a in running for a in st.gpu_adapters):
            return "gpu_busy", "every GPU slot holds an adapter with requests running"
        if not self.loader.can_load(self._where(pod_id)[1]):
            return "no_path", "no sidecar and no placement.adapter_dir"
        return None

    def _skip(self, pod_id: str, adapter: str, role: str, reason: tuple[str, str], now: float) -> None:
        code, text = reason
        if self._last_skip.get(pod_id) == (adapter, code):
            return  # the same skip as last cycle: counted once
        self._last_skip[pod_id] = (adapter, code)
        self.skips[code] += 1
        self._record(Action(now, pod_id, adapter, role, PRELOAD, "skipped", f"{code}: {text}"))

    def _launch(self, pod_id: str, adapter: str, role: str, phase: str, now: float, stall_s: float = 0.0) -> None:
        self._last_skip.pop(pod_id, None)
        if stall_s > 0:  # the router prices the stall like one of its own loads and routes around it
            self.gw.runtime.pipeline.note_stall(pod_id, stall_s, now)
        action = Action(now, pod_id, adapter, role, phase, "started", "")
        self._loads[pod_id] = asyncio.get_running_loop().create_task(
            self._load(pod_id, adapter, action), name=f"placer-load-{pod_id}")

    async def _load(self, pod_id: str, adapter: str, action: Action) -> None:
        try:
            url, sidecar = self._where(pod_id)
            state = self.gw.pod_states().get(pod_id)
            rank = self._rank(state, adapter) if state is not None and self.plan is not None else None
            result = await self.loader.load(url, sidecar, adapter)
            ended, mono = time.time(), time.monotonic()
            action.ended_at = ended
            action.stall_s = result.stall_s
            action.outcome = "loaded" if result.ok else "failed"
            action.reason = f"{result.detail} (via {result.via})"
            self.stall_total[(pod_id, action.phase)] += result.stall_s
            if action.phase == PRELOAD:
                self.budget.add(pod_id, mono, result.stall_s)
            if result.ok:
                self._recent[(pod_id, adapter)] = mono
                if rank is not None:
                    self.stall_estimates.observe(rank, result.stall_s)
                if result.via == "vllm":
                    self.gw.note_loaded(pod_id, adapter, rank)
            else:
                self._failed[(pod_id, adapter)] = mono + FAILED_BACKOFF_S
                log.warning("placer could not load %r on %s: %s", adapter, pod_id, result.detail)
            warm = self.warming.get(pod_id)
            if warm is not None and action.phase == WARMUP:
                warm.attempted.add(adapter)
                warm.loaded += int(result.ok)
            self._record(action)
        finally:
            self._loads.pop(pod_id, None)

    def _record(self, action: Action) -> None:
        if action.outcome != "started":
            self.counts[(action.pod, action.phase, action.outcome)] += 1
        self.actions.append(action)

    # --- the admin view ------------------------------------------------------------------------------
    def report(self, limit: int = 200) -> dict[str, Any]:
        """Plan vs actual per pod, holds, budgets and recent actions (GET /admin/placement)."""
        mono = time.monotonic()
        states = self.gw.pod_states()
        pods: dict[str, Any] = {}
        plan = self.plan
        for pod_id in sorted(states):
            st = states[pod_id]
            pp = plan.pods.get(pod_id) if plan is not None else None
            planned = list(pp.gpu) + list(pp.cpu) if pp is not None else []
            resident = set(st.gpu_adapters) | set(st.cpu_adapters)
            pods[pod_id] = {
                "planned_gpu": list(pp.gpu) if pp else [],
                "planned_cpu": list(pp.cpu) if pp else [],
                "planned_share": round(pp.load, 6) if pp else 0.0,
                "gpu": list(st.gpu_adapters),
                "cpu": list(st.cpu_adapters),
                "missing": [a for a in planned if a not in resident],
                "unplanned": sorted(resident - set(planned)),
                "held": pod_id in self._held,
                "warming": pod_id in self.warming,
                "load_in_flight": pod_id in self._loads,
                "stall_budget": {"used_s": round(self.budget.used(pod_id, mono), 4),
                                 "budget_s": self.config.preload.stall_budget_s,
                                 "window_s": self.config.preload.budget_window_s},
            }
        recent = list(self.actions)[-limit:]
        recent.reverse()
        return {
            "enabled": True,
            "replica": self.replica_id,
            "leader": self.leader,
            "is_leader": self.is_leader,
            "starting": self.starting,
            "resumed_adapters": self.resumed,
            "cycles": self.cycles,
            "last_cycle_ms": round(1000 * self.last_cycle_s, 3),
            "held": sorted(self._held),
            "plan": plan.to_dict(limit) if plan is not None else None,
            "pods": pods,
            "counts": {
                "actions": [{"pod": p, "phase": ph, "outcome": o, "count": n}
                            for (p, ph, o), n in sorted(self.counts.items())],
                "skipped": dict(sorted(self.skips.items())),
                "stall_s": [{"pod": p, "phase": ph, "seconds": round(s, 4)}
                            for (p, ph), s in sorted(self.stall_total.items())],
            },
            "actions": [a.to_dict() for a in recent],
        }
