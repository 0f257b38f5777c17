"""The pipeline's own mutable state: in-flight counts, optimistic adapters, prefix indexes,
the demand it has dispatched and the placement plan it was given.

Owned by one ``Pipeline`` instance (no globals). ``Pipeline.adopt_state_from`` hands the same
``LocalState`` to a pipeline rebuilt on config reload, so nothing learned is lost and requests
dispatched under the old pipeline complete against the same counters.

The views (``scorer.view.PodView``) are immutable; everything that changes between two state
pushes lives here, in one ``PodLocal`` per pod. Optimistic incoming adapters expire in
``expire_due``, which the pipeline calls once at the start of every pick and on every dispatch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from operator import is_
from typing import TYPE_CHECKING

from scorer.costmodel import CostLearner
from scorer.demand import DemandTracker
from scorer.kv_index import KVBlockIndex
from scorer.model import PodState, RoutingRequest
from scorer.prefix import DEFAULT_BLOCK_CHARS, PrefixIndex, pod_capacity_blocks
from scorer.view import PodLocal, PodView

if TYPE_CHECKING:
    from scorer.placement import PlacementPlan

MAX_INCOMING = 16  # optimistic adapters remembered per pod (oldest dropped)

DEFAULT_PREFILL_S_PER_TOKEN = 0.00003  # a busy pod's prefill throughput (estimated-ttft's drain_s_per_token)


class LocalState:
    """All mutable state of a pipeline; see the module docstring."""

    def __init__(
        self,
        block_chars: int = DEFAULT_BLOCK_CHARS,
        incoming_ttl_s: float = 5.0,
        max_sessions: int = 100_000,
        prefill_s_per_token: float = DEFAULT_PREFILL_S_PER_TOKEN,
        max_blocks_per_pod: int = 0,
    ) -> None:
        self.block_chars = block_chars
        self.max_blocks_per_pod = max_blocks_per_pod
        self.incoming_ttl_s = incoming_ttl_s
        self.max_sessions = max_sessions
        self.prefill_s_per_token = prefill_s_per_token
        self.prefix = PrefixIndex(block_chars)
        # the precise index: filled from the pods' KV events by whoever runs a KV feed
        # (podstate.kv_store / podstate.kv_events), read by the precise-prefix scorer
        self.kv = KVBlockIndex()
        self.pods: dict[str, PodLocal] = {}
        self.views: dict[str, PodView] = {}
        self.sessions: OrderedDict[str, str] = OrderedDict()
        # picks that had candidates (round-robin's counter, see PickContext.seq)
        self.picks = 0
        # pods with optimistic incoming adapters, and the earliest time one of them expires
        self.inc_pods: set[str] = set()
        # pods whose merged figures include other gateway replicas' (scorer.sharing)
        self.peer_pods: set[str] = set()
        # True while this router is connected to its peers (max-score's cold-adapter hash)
        self.shared = False
        self._last_states: list[PodState] = []
        self._last_views: list[PodView] = []
        self.inc_next_check = float("inf")
        # what this router dispatched, per adapter (decayed); the plan a placer installed
        self.demand = DemandTracker()
        self.plan: PlacementPlan | None = None
        # the cost constants learned per pod group (None when no scorer learns them)
        self.costs: CostLearner | None = None

    def configure(
        self,
        block_chars: int,
        incoming_ttl_s: float,
        max_sessions: int,
        prefill_s_per_token: float,
        max_blocks_per_pod: int = 0,
    ) -> None:
        """Apply new settings (config reload). A new block size invalidates the prefix index."""
        self._last_states = []
        if block_chars != self.block_chars:
            self.prefix = PrefixIndex(block_chars)
            self.views.clear()
        if max_blocks_per_pod != self.max_blocks_per_pod:
            self.views.clear()  # capacities are derived per view
        self.max_blocks_per_pod = max_blocks_per_pod
        self.block_chars = block_chars
        self.incoming_ttl_s = incoming_ttl_s
        self.max_sessions = max_sessions
        self.prefill_s_per_token = prefill_s_per_token
        while len(self.sessions) > max_sessions:
            self.sessions.popitem(last=False)

    # --- views ---------------------------------------------------------------------------
    def pod(self, pod_id: str) -> PodLocal:
        loc = self.pods.get(pod_id)
        if loc is None:
            loc = self.pods[pod_id] = PodLocal()
        return loc

    def _capacity(self, state: PodState | None) -> int:
        if state is None:
            cap = pod_capacity_blocks(0, 0, self.block_chars)
        else:
            cap = pod_capacity_blocks(state.num_gpu_blocks, state.block_size, self.block_chars)
        if self.max_blocks_per_pod and cap > self.max_blocks_per_pod:
            cap = self.max_blocks_per_pod
        return cap

    def make_view(self, pod_id: str, state: PodState) -> PodView:
        """Build (and cache) the view of a new PodState; drop incoming beliefs it confirms."""
        loc = self.pod(pod_id)
        view = PodView(pod_id, state, loc, self._capacity(state), self.views.get(pod_id))
        self.views[pod_id] = view
        self._last_states = []
        inc = loc.incoming
        if inc:
            gpu, loading = view.gpu, view.loading
            for name in [n for n in inc if n in gpu or n in loading]:
                del inc[name]
                loc.sent.pop(name, None)
        self._incoming_changed(pod_id, loc)
        return view

    def views_of(self, pods: Mapping[str, PodState]) -> list[PodView]:
        """The views of ``pods`` in mapping order, reusing the last list when no state changed.

        The check compares PodState objects by identity at C speed (``map(is_, …)``); the
        returned list must not be mutated by callers.
        """
        last = self._last_states
        if len(last) == len(pods) and all(map(is_, pods.values(), last)):
            return self._last_views
        cache = self.views
        views: list[PodView] = []
        app = views.append
        for pid, st in pods.items():
            v = cache.get(pid)
            if v is None or v.state is not st:
                v = self.make_view(pid, st)
            app(v)
        self._last_states = [v.state for v in views]
        self._last_views = views
        return views

    # --- optimistic incoming adapters -------------------------------------------------------
    def _incoming_changed(self, pod_id: str, loc: PodLocal) -> None:
        """Recompute the pod's slot state and the expiry bookkeeping after its incoming changed."""
        inc = loc.incoming
        view = self.views.get(pod_id)
        if view is not None:
            loc.slot = view.slot_with(len(inc))
        if inc:
            loc.inc_check_at = min(inc.values())
            self.inc_pods.add(pod_id)
            if loc.inc_check_at < self.inc_next_check:
                self.inc_next_check = loc.inc_check_at
        else:
            loc.inc_check_at = float("inf")
            self.inc_pods.discard(pod_id)

    def expire_due(self, now: float) -> None:
        """Drop the incoming beliefs that have expired by ``now`` (cheap when none has)."""
        if now < self.inc_next_check:
            return
        nxt = float("inf")
        for pod_id in list(self.inc_pods):
            loc = self.pods.get(pod_id)
            if loc is None:
                self.inc_pods.discard(pod_id)
                continue
            if loc.inc_check_at <= now:
                inc = loc.incoming
                for name in [n for n, until in inc.items() if until <= now]:
                    del inc[name]
                    loc.sent.pop(name, None)
                self._incoming_changed(pod_id, loc)
            if loc.inc_check_at < nxt:
                nxt = loc.inc_check_at
        self.inc_next_check = nxt

    def note_incoming(self, pod_id: str, name: str, until: float) -> None:
        """Another gateway replica has just sent ``name`` to ``pod_id``: count it as incoming
        there until ``until``, unless the pod's state already shows it on GPU or loading."""
        view = self.views.get(pod_id)
        if view is None or name in view.gpu or name in view.loading:
            return
        loc = self.pod(pod_id)
        inc = loc.incoming
        if inc.get(name, 0.0) >= until:
            return
        inc[name] = until
        while len(inc) > MAX_INCOMING:
            del inc[next(iter(inc))]
        self._incoming_changed(pod_id, loc)

    # --- updates ---------------------------------------------------------------------------
    def dispatch(self, pod_id: str, request: RoutingRequest, now: float, stall_s: float = 0.0,
                 cached_tokens: int | None = None) -> float:
        """Count ``request`` as sent to ``pod_id``; ``stall_s``: engine seconds its adapter load
        will stall the pod (joins the pending queue ahead of its prefill, which drains at the
        pipeline's prefill rate). Returns the prompt tokens the pod must compute: prompt −
        ``cached_tokens`` (the pod's own KV events said it holds them, ``scorer.kv_match``) when
        given, else what the approximate prefix index believes."""
        loc = self.pod(pod_id)
        loc.inflight += 1
        loc.own_inflight += 1
        loc.dispatched += 1
        tokens = max(0, request.prompt_tokens) + max(0, request.max_tokens)
        loc.inflight_tokens += tokens
        loc.own_tokens += tokens
        hashes = request.prefix_hashes
        view = self.views.get(pod_id)
        cap = view.capacity_blocks if view is not None else self._capacity(None)
        prompt = max(0, request.prompt_tokens)
        if cached_tokens is not None:
            uncached = float(max(0, prompt - cached_tokens))
            if hashes:
                self.prefix.record(pod_id, hashes, cap)
        elif hashes:
            matched = self.prefix.match_one(pod_id, hashes)
            uncached = prompt * (1.0 - matched / len(hashes))
            self.prefix.record(pod_id, hashes, cap)
        else:
            uncached = float(prompt)
        work = stall_s + uncached * self.prefill_s_per_token
        loc.pending_until = (loc.pending_until if loc.pending_until > now else now) + work
        loc.own_pending_until = (loc.own_pending_until if loc.own_pending_until > now else now) + work
        name = request.adapter.name
        if name is not None and (view is None or name not in view.gpu) and self.incoming_ttl_s > 0:
            inc = loc.incoming
            inc.pop(name, None)
            inc[name] = now + self.incoming_ttl_s
            while len(inc) > MAX_INCOMING:
                del inc[next(iter(inc))]
            sent = loc.sent
            sent.pop(name, None)
            sent[name] = now
            while len(sent) > MAX_INCOMING:
                del sent[next(iter(sent))]
            self._incoming_changed(pod_id, loc)
        key = request.session_key
        if key:
            sessions = self.sessions
            sessions[key] = pod_id
            sessions.move_to_end(key)
            if len(sessions) > self.max_sessions:
                sessions.popitem(last=False)
        return uncached

    def add_stall(self, pod_id: str, stall_s: float, now: float) -> None:
        """An engine stall this router did not dispatch (a placement load) joins the pod's queue."""
        loc = self.pod(pod_id)
        loc.pending_until = (loc.pending_until if loc.pending_until > now else now) + stall_s
        loc.own_pending_until = (loc.own_pending_until if loc.own_pending_until > now else now) + stall_s

    def complete(self, pod_id: str, request: RoutingRequest, ok: bool) -> None:
        loc = self.pods.get(pod_id)
        if loc is None:
            return
        if loc.own_inflight > 0:
            loc.own_inflight -= 1
            loc.own_tokens = max(0, loc.own_tokens - max(0, request.prompt_tokens) - max(0, request.max_tokens))
            loc.inflight = loc.own_inflight + loc.peer_inflight
            loc.inflight_tokens = loc.own_tokens + loc.peer_tokens
        if not ok and request.adapter.name is not None:
            # The optimistic belief that the adapter is arriving there is no longer supported.
            loc.sent.pop(request.adapter.name, None)
            if loc.incoming.pop(request.adapter.name, None) is not None:
                self._incoming_changed(pod_id, loc)

    def forget(self, pod_id: str) -> None:
        self._last_states = []
        self.pods.pop(pod_id, None)
        self.inc_pods.discard(pod_id)
        self.peer_pods.discard(pod_id)
        self.views.pop(pod_id, None)
        self.prefix.forget(pod_id)
        self.kv.forget(pod_id)
        stale = [k for k, p in self.sessions.items() if p == pod_id]
        for k in stale:
            del self.sessions[k]
