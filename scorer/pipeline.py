"""The scoring pipeline: filters → weighted scorers → one picker, built from configuration.

    total(pod) = Σᵢ weightᵢ × clamp(scoreᵢ(pod), 0, 1)      (weights not normalised; missing → 1.0)

``scorer.build.build_pipeline(spec)`` accepts a preset name or a mapping (the YAML ``pipeline:`` section):

    preset: default            # optional starting point (see scorer.presets)
    name: my-policy            # optional policy name shown in decisions
    filters:                   # replaces the preset's filters
      - healthy-fresh          # a bare type name, or
      - {type: healthy-fresh, parameters: {max_age_s: 1.0}}
    scorers:                   # replaces the preset's scorers
      - {type: estimated-ttft, weight: 3, parameters: {scale_s: 0.5}}
      - {type: inflight, name: inflight-tokens, weight: 1, parameters: {metric: tokens, capacity: 1e6}}
    replace:                   # swaps named scorers (same place; the old weight unless given)
      prefix-cache: {type: precise-prefix}
    weights: {prefix-cache: 5} # re-weights scorers by name (after the above)
    picker: {type: max-score, parameters: {seed: 1}}
    state:                     # the pipeline's own state
      block_chars: 256         # prompt characters per prefix block (≈ 64 tokens)
      incoming_ttl_s: 5.0      # how long an optimistic "adapter is arriving there" lasts
      max_sessions: 100000     # session-affinity bindings kept (LRU)
      max_blocks_per_pod: 0    # cap the prefix index per pod (0: the pod's KV size); ~175 B/block

Every key is validated strictly; a ``ConfigError`` names the offending path
(``pipeline.scorers[2].parameters.wieght: unknown key ...``).

The ``Pipeline`` owns its mutable state (``scorer.state.LocalState``): the prefix index,
in-flight counts, optimistic incoming adapters, session bindings, the per-adapter demand it has
dispatched (``demand``) and the placement plan a placer installed (``set_plan``).
``adopt_state_from`` hands that state to a pipeline rebuilt on config reload.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from time import perf_counter
from typing import Any

import scorer.plugins  # noqa: F401  (registers the built-in plugins)
from scorer.decision import DecisionMeta, LazyDecision
from scorer.demand import DemandTracker
from scorer.errors import ConfigError
from scorer.model import Decision, PodState, RoutingRequest
from scorer.params import Param, validate_params
from scorer.placement import PlacementPlan
from scorer.costmodel import Ticket
from scorer.plugin import (
    Filter, HintsReason, KnowsPrefillRate, LearnsCosts, Picker, PredictsTTFT, PricesLoadStall, ReadsKVEvents, Scorer,
)
from scorer.prefix import DEFAULT_BLOCK_CHARS, prompt_block_hashes
from scorer.presets import PRESETS
from scorer.state import DEFAULT_PREFILL_S_PER_TOKEN, LocalState
from scorer.context import PickContext
from scorer.view import tier_codes
from scorer.weights import weighted_sum

__all__ = ["PRESETS", "Pipeline", "ConfigError"]

STATE_PARAMS: dict[str, Param] = {
    "block_chars": Param(DEFAULT_BLOCK_CHARS, int, min=16, max=65536, doc="prompt characters per prefix block"),
    "incoming_ttl_s": Param(5.0, float, min=0.0, doc="lifetime of an optimistic incoming adapter"),
    "max_sessions": Param(100_000, int, min=0, doc="session bindings kept (LRU)"),
    "max_blocks_per_pod": Param(0, int, min=0, doc="cap on the prefix index per pod (0: from num_gpu_blocks)"),
}


class Pipeline:
    """One configured routing policy plus the mutable state it learns. Not thread-safe:
    call it from one thread (the gateway's event loop)."""

    def __init__(
        self,
        name: str,
        filters: list[tuple[str, Filter]],
        scorers: list[tuple[str, Scorer, float]],
        picker: Picker,
        state: Mapping[str, Any] | None = None,
        spec: Mapping[str, Any] | None = None,
        *,
        path: str = "pipeline",
    ) -> None:
        """``state`` is the raw ``state:`` mapping, validated here (errors name ``{path}.state``)."""
        self.name = name
        self.filters = list(filters)
        self.scorers = list(scorers)
        self.picker = picker
        self.state_config = validate_params(state, STATE_PARAMS, f"{path}.state")
        self.spec: dict[str, Any] = copy.deepcopy(dict(spec)) if spec is not None else {}
        self._names = [n for n, _, _ in self.scorers]
        # capabilities, resolved once (scorer.plugin): reason hints, the load-stall price (the
        # first scorer that offers one, i.e. estimated-ttft) and the prefill rate
        hints = [(i, sc.reason_hint) for i, (_, sc, _) in enumerate(self.scorers) if isinstance(sc, HintsReason)]
        self._meta = DecisionMeta(self._names, hints)
        self._stall: PricesLoadStall | None = next(
            (sc for _, sc, _ in self.scorers if isinstance(sc, PricesLoadStall)), None)
        self._learns: LearnsCosts | None = next(
            (sc for _, sc, _ in self.scorers if isinstance(sc, LearnsCosts)), None)
        self._ttft: PredictsTTFT | None = next(
            (sc for _, sc, _ in self.scorers if isinstance(sc, PredictsTTFT)), None)
        #: the scorer fed by KV events and token ids (precise-prefix), None without one
        self.kv_reader: ReadsKVEvents | None = next(
            (sc for _, sc, _ in self.scorers if isinstance(sc, ReadsKVEvents)), None)
        rate = next((sc for _, sc, _ in self.scorers if isinstance(sc, KnowsPrefillRate)), None)
        self._prefill_s_per_token = rate.prefill_s_per_token if rate is not None else DEFAULT_PREFILL_S_PER_TOKEN
        self._bounded = all(sc.BOUNDED for _, sc, _ in self.scorers)
        self._sum = weighted_sum([float(w) for _, _, w in self.scorers])
        self._sums: dict[tuple[bool, ...], Any] = {}
        self._local = LocalState(
            block_chars=self.state_config["block_chars"],
            incoming_ttl_s=self.state_config["incoming_ttl_s"],
            max_sessions=self.state_config["max_sessions"],
            prefill_s_per_token=self._prefill_s_per_token,
            max_blocks_per_pod=self.state_config["max_blocks_per_pod"],
        )
        self._local.costs = self._learns.cost_learner(None) if self._learns is not None else None

    # --- configuration -------------------------------------------------------------------
    @property
    def block_chars(self) -> int:
        """Characters per prefix block; build ``RoutingRequest.prefix_hashes`` with it."""
        return self._local.block_chars

    @property
    def local(self) -> LocalState:
        return self._local

    @property
    def demand(self) -> DemandTracker:
        """The decayed per-adapter count of what this pipeline dispatched (``on_dispatch``)."""
        return self._local.demand

    def set_plan(self, plan: PlacementPlan | None) -> None:
        """Install the placement plan the ``placement-plan`` scorer reads (None: no plan)."""
        self._local.plan = plan

    def hash_prompt(self, base: str, adapter: str | None, text: str) -> tuple[int, ...]:
        """``prompt_block_hashes`` with this pipeline's block size."""
        return prompt_block_hashes(base, adapter, text, self._local.block_chars)

    def describe(self) -> dict[str, Any]:
        """The effective configuration (every parameter, defaults filled in)."""
        return {
            "name": self.name,
            "filters": [{"name": n, **f.describe()} for n, f in self.filters],
            "scorers": [{"name": n, "weight": w, **s.describe()} for n, s, w in self.scorers],
            "picker": self.picker.describe(),
            "state": dict(self.state_config),
        }

    def adopt_state_from(self, old: Pipeline) -> None:
        """Take over ``old``'s learned state (prefix index, in-flight counts, sessions, …).

        Both pipelines then share one state object, so requests dispatched under ``old`` and
        completed through either pipeline keep the counts right. A changed ``block_chars``
        resets the prefix index (old hashes no longer match new prompts).
        """
        local = old._local
        local.costs = self._learns.cost_learner(local.costs) if self._learns is not None else None
        local.configure(
            block_chars=self.state_config["block_chars"],
            incoming_ttl_s=self.state_config["incoming_ttl_s"],
            max_sessions=self.state_config["max_sessions"],
            prefill_s_per_token=self._prefill_s_per_token,
            max_blocks_per_pod=self.state_config["max_blocks_per_pod"],
        )
        self._local = local

    # --- the hot path --------------------------------------------------------------------
    def pick(self, request: RoutingRequest, pods: Mapping[str, PodState], now: float,
             state_as_of: float | None = None) -> Decision:
        """Choose a pod for ``request`` among ``pods``; never raises for an empty view.

        Returns a Decision with ``pod_id`` None (and ``reason``) when no pod survives the
        filters. ``now`` is the caller's clock (``time.time()``), used for freshness and the
        local state's timers; ``state_as_of`` (default ``now``) is the time the freshness of
        ``pods`` is judged against, earlier while the caller's view is not being refreshed.
        """
        t0 = perf_counter()
        local = self._local
        if now >= local.inc_next_check:
            local.expire_due(now)  # once per pick, before any plugin reads a placement
        views = local.views_of(pods)
        ctx = PickContext(request, now, local.prefix, local.sessions, local.picks, local.kv, local.plan, local.costs,
                          state_as_of, local.shared, self.kv_reader)
        filtered: dict[str, str] = {}
        for fname, flt in self.filters:
            if not views:
                break
            kept = flt.filter(views, ctx)
            if kept is not views:
                keep = {v.pod_id for v in kept}
                for v in views:
                    if v.pod_id not in keep:
                        filtered[v.pod_id] = fname
                views = kept
        if not views:
            why = "no pods in view" if not pods else "every pod was filtered out"
            return Decision(
                None, [], filtered, self.name, (perf_counter() - t0) * 1e6, reason=why,
            )
        cols = [sc.score(views, ctx) for _, sc, _ in self.scorers]
        if not self._bounded:
            cols = [
                col if sc.BOUNDED or col is None else [x if 0.0 <= x <= 1.0 else (1.0 if x > 1.0 else 0.0) for x in col]
                for col, (_, sc, _) in zip(cols, self.scorers)
            ]
        if None in cols:  # some scorer said "0 for every candidate": sum only the others
            mask = tuple(c is not None for c in cols)
            fn = self._sums.get(mask)
            if fn is None:
                fn = self._sums[mask] = weighted_sum([float(w) for (_, _, w), m in zip(self.scorers, mask) if m])
            live = [c for c in cols if c is not None]
            totals = fn(live) if live else [0.0] * len(views)
        else:
            totals = self._sum(cols) if cols else [0.0] * len(views)
        picked = self.picker.pick(totals, views, ctx)
        local.picks += 1
        d = LazyDecision(views, totals, cols, self._meta, picked, filtered, self.name, ctx)
        d.elapsed_us = (perf_counter() - t0) * 1e6
        return d

    def predicted_ttft_s(self, decision: Decision, pod_id: str) -> float | None:
        """The time to first token this pipeline predicts for ``pod_id`` in ``decision``, in
        seconds: the first scorer that predicts TTFTs (estimated-ttft, with whatever constants
        it holds, learned or configured); None without one, or for a pod that was not a candidate.
        Call it before ``on_dispatch`` of that pod to get the pick-time prediction."""
        if self._ttft is None or not isinstance(decision, LazyDecision):
            return None
        return decision.predicted_ttft_s(pod_id, self._ttft)

    def on_dispatch(self, pod_id: str, request: RoutingRequest, now: float,
                    decision: Decision | None = None) -> Ticket | None:
        """Record that ``request`` was sent to ``pod_id`` (optimistic update).

        In-flight +1 request and + (prompt + max_tokens) tokens; the prompt's blocks are
        recorded in the prefix index for that pod; the adapter counts as incoming there for
        ``state.incoming_ttl_s`` seconds (or until the pod's state shows it); the uncached
        prompt tokens join the pod's pending queue (drained at the prefill rate a scorer knows),
        and so does the engine stall of the adapter load the request triggers there (priced by the
        first scorer with ``load_stall_s``, i.e. estimated-ttft, under the pod group's learned
        constants; nothing without one); the
        session key binds to the pod; the request counts once in the demand estimate (a retry on
        another pod does not count again). With the ``decision`` the pick returned, a pod whose
        KV events were live at pick time has its uncached tokens from what it really held
        (``LazyDecision.cached_tokens``: the estimate estimated-ttft priced), not from the
        approximate index, in the pending queue and in the learning ticket alike.

        Returns the ``Ticket`` to hand back to ``on_complete`` when a scorer learns its constants
        (what it saw at dispatch: the observation's features), else None.
        """
        local = self._local
        local.demand.observe(request, now)
        local.expire_due(now)
        stall = 0.0
        name = request.adapter.name
        view = local.views.get(pod_id)
        ticket: Ticket | None = None
        if view is not None and (self._stall is not None or self._learns is not None):
            code = tier_codes(name, [view])[0]
            rank = request.adapter.rank
            if rank is None and name is not None:
                rank = view.ranks.get(name)
            costs = local.costs.constants(view.group) if local.costs is not None else None
            if self._learns is not None:
                ticket = self._learns.ticket(view, request, code, rank, now)
            if self._stall is not None and name is not None:
                stall = self._stall.load_stall_s(rank, code, costs)
        cached = decision.cached_tokens(pod_id) if isinstance(decision, LazyDecision) else None
        uncached = local.dispatch(pod_id, request, now, stall, cached)
        if ticket is not None:
            ticket.uncached_tokens = uncached
        return ticket

    def note_stall(self, pod_id: str, stall_s: float, now: float) -> None:
        """A load started on ``pod_id`` by someone else (the placer): its ``stall_s`` joins the
        pod's pending queue, so estimated-ttft steers requests away while it runs."""
        self._local.add_stall(pod_id, stall_s, now)

    def on_complete(self, pod_id: str, request: RoutingRequest, ok: bool,
                    ticket: Ticket | None = None, ttft_s: float | None = None) -> None:
        """The request sent to ``pod_id`` finished (``ok`` False: failed or cancelled).

        With the ``ticket`` its dispatch returned and ``ttft_s`` (seconds from dispatch to the
        first streamed byte, None when not streamed or never answered), a successful request
        is one observation for the learned cost model of the pod's group."""
        self._local.complete(pod_id, request, ok)
        costs = self._local.costs
        if ok and ticket is not None and ttft_s is not None and costs is not None:
            obs = ticket.observation(ttft_s)
            if obs is not None:
                costs.observe(ticket.group, obs)

    def cost_model(self) -> dict[str, Any] | None:
        """The learned cost constants per pod group with their defaults and evidence (admin API,
        metrics); None when no scorer learns its constants."""
        costs = self._local.costs
        return costs.snapshot() if costs is not None else None

    def forget_pod(self, pod_id: str) -> None:
        """The pod left the view: drop its index entries, counters and cached view."""
        self._local.forget(pod_id)

    def inflight(self, pod_id: str) -> tuple[int, int]:
        """(requests, tokens) this router has in flight on ``pod_id``."""
        loc = self._local.pods.get(pod_id)
        return (loc.own_inflight, loc.own_tokens) if loc is not None else (0, 0)

    def inflight_counts(self) -> dict[str, int]:
        """Requests this router has in flight, per pod it has dispatched to (for metrics)."""
        return {pod_id: loc.own_inflight for pod_id, loc in self._local.pods.items()}

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per-pod local state for metrics and the admin API (not for the hot path)."""
        out: dict[str, dict[str, Any]] = {}
        for pod_id, loc in self._local.pods.items():
            out[pod_id] = {
                "inflight": loc.own_inflight,
                "inflight_tokens": loc.own_tokens,
                "peer_inflight": loc.peer_inflight,
                "peer_inflight_tokens": loc.peer_tokens,
                "dispatched": loc.dispatched,
                "incoming_adapters": sorted(loc.incoming),
                "sent_adapters": sorted(loc.sent),
                "prefix_blocks": self._local.prefix.blocks_on(pod_id),
            }
        return out
