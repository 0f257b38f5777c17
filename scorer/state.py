"""The pipeline's own mutable state: in-flight counts, optimistic adapters, prefix indexes.

Owned by one ``Pipeline`` instance (no globals). ``Pipeline.adopt_state_from`` hands the same
``LocalState`` to a pipeline rebuilt on config reload, so nothing learned is lost and requests
dispatched under the old pipeline complete against the same counters.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from operator import is_

from scorer.kv_index import KVBlockIndex
from scorer.model import PodState, RoutingRequest
from scorer.prefix import DEFAULT_BLOCK_CHARS, PrefixIndex, pod_capacity_blocks
from scorer.view import PodView, slot_state

MAX_INCOMING = 16  # optimistic adapters remembered per pod (oldest dropped)

DEFAULT_PREFILL_S_PER_TOKEN = 0.000031  # h100-calibration.md: ≈ 0.031 ms/token from 2k tokens up


class PodLocal:
    """What this router itself knows about one pod, exactly and instantly.

    ``inflight`` / ``inflight_tokens``: requests dispatched and not completed, and their
    prompt + max_tokens. ``pending_until``: when the pod will have worked off what this router
    sent it: the uncached prompt tokens (drained at the prefill rate) and the adapter loads they
    trigger (each stalls the engine). ``incoming``: adapter
    → expiry time of the optimistic belief that it is being loaded there.
    """

    __slots__ = (
        "inflight", "inflight_tokens", "pending_until", "incoming", "dispatched", "inc_check_at",
    )

    def __init__(self) -> None:
        self.inflight = 0
        self.inflight_tokens = 0
        self.pending_until = 0.0
        self.incoming: dict[str, float] = {}
        self.dispatched = 0
        # The earliest expiry among ``incoming`` (inf when empty).
        self.inc_check_at = float("inf")


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
        self.rr_counter = 0
        # pods with optimistic incoming adapters, and the earliest time one of them expires
        self.inc_pods: set[str] = set()
        self._last_states: list[PodState] = []
        self._last_views: list[PodView] = []
        self.inc_next_check = float("inf")

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

    def make_view(self, pod_id: str, state: PodState) -> PodView:
        """Build (and cache) the view of a new PodState; drop incoming beliefs it confirms."""
        loc = self.pod(pod_id)
        cap = pod_capacity_blocks(state.num_gpu_blocks, state.block_size, self.block_chars)
        if self.max_blocks_per_pod and cap > self.max_blocks_per_pod:
            cap = self.max_blocks_per_pod
        view = PodView(pod_id, state, loc, cap, self.views.get(pod_id))
        self.views[pod_id] = view
        self._last_states = []
        if loc.incoming:
            self.refresh_incoming(pod_id, loc, float("-inf"), view_changed=True)  # expiry: expire_incoming
        return view

    # --- optimistic incoming adapters -------------------------------------------------------
    def refresh_incoming(self, pod_id: str, loc: PodLocal, now: float, view_changed: bool = False) -> None:
        """Drop expired (and, for a new view, confirmed) incoming adapters of one pod; update
        its view's slot state and the expiry bookkeeping."""
        inc = loc.incoming
        view = self.views.get(pod_id)
        if inc and now >= loc.inc_check_at:
            for name in [n for n, until in inc.items() if until <= now]:
                del inc[name]
        if inc and view_changed and view is not None:
            gpu, loading = view.gpu, view.loading
            for name in [n for n in inc if n in gpu or n in loading]:
                del inc[name]
        if view is not None:
            extra = len(inc)
            view.slot = slot_state(view.n_gpu + extra, view.n_running + extra, view.max_loras) if extra else view.base_slot
        if inc:
            loc.inc_check_at = min(inc.values())
            self.inc_pods.add(pod_id)
            if loc.inc_check_at < self.inc_next_check:
                self.inc_next_check = loc.inc_check_at
        else:
            loc.inc_check_at = float("inf")
            self.inc_pods.discard(pod_id)

    def expire_incoming(self, now: float) -> None:
        """Called when the earliest expiry has passed: refresh the pods concerned."""
        nxt = float("inf")
        for pod_id in list(self.inc_pods):
            loc = self.pods.get(pod_id)
            if loc is None:
                self.inc_pods.discard(pod_id)
                continue
            if loc.inc_check_at <= now:
                self.refresh_incoming(pod_id, loc, now)
            if loc.inc_check_at < nxt:
                nxt = loc.inc_check_at
        self.inc_next_check = nxt

    def views_of(self, pods: Mapping[str, PodState]) -> list[PodView]:
        """The views of ``pods`` in mapping order, reusing the last list when no state changed.

        The check compares PodState objects by identity at C speed (``map(is_, …)``); the
        returned list must not be mutated by callers.
        """
        last = self._last_states
        if len(last) == len(pods) and all(map(is_, pods.values(), last)):
            return self._last_views
        views = self._build_views(pods)
        self._last_states = [v.state for v in views]
        self._last_views = views
        return views

    def _build_views(self, pods: Mapping[str, PodState]) -> list[PodView]:
        cache = self.views
        out: list[PodView] = []
        app = out.append
        for pid, st in pods.items():
            v = cache.get(pid)
            if v is None or v.state is not st:
                v = self.make_view(pid, st)
            app(v)
        return out

    # --- updates ---------------------------------------------------------------------------
    def dispatch(self, pod_id: str, request: RoutingRequest, now: float, stall_s: float = 0.0) -> None:
        """Count ``request`` as sent to ``pod_id``; ``stall_s``: engine seconds its adapter load
        will stall the pod (joins the pending queue ahead of its prefill)."""
        loc = self.pod(pod_id)
        loc.inflight += 1
        loc.dispatched += 1
        loc.inflight_tokens += max(0, request.prompt_tokens) + max(0, request.max_tokens)
        hashes = request.prefix_hashes
        view = self.views.get(pod_id)
        if view is not None:
            cap = view.capacity_blocks
        else:
            cap = pod_capacity_blocks(0, 0, self.block_chars)
            if self.max_blocks_per_pod and cap > self.max_blocks_per_pod:
                cap = self.max_blocks_per_pod
        if hashes:
            matched = self.prefix.match_one(pod_id, hashes)
            uncached = max(0, request.prompt_tokens) * (1.0 - matched / len(hashes))
            self.prefix.record(pod_id, hashes, cap)
        else:
            uncached = float(max(0, request.prompt_tokens))
        start = loc.pending_until if loc.pending_until > now else now
        loc.pending_until = start + stall_s + uncached * self.prefill_s_per_token
        name = request.adapter.name
        if name is not None and (view is None or name not in view.gpu) and self.incoming_ttl_s > 0:
            inc = loc.incoming
            inc.pop(name, None)
            inc[name] = now + self.incoming_ttl_s
            while len(inc) > MAX_INCOMING:
                del inc[next(iter(inc))]
            self.refresh_incoming(pod_id, loc, now)
        key = request.session_key
        if key:
            sessions = self.sessions
            sessions[key] = pod_id
            sessions.move_to_end(key)
            if len(sessions) > self.max_sessions:
                sessions.popitem(last=False)

    def complete(self, pod_id: str, request: RoutingRequest, ok: bool) -> None:
        loc = self.pods.get(pod_id)
        if loc is None:
            return
        loc.inflight = max(0, loc.inflight - 1)
        loc.inflight_tokens = max(0, loc.inflight_tokens - max(0, request.prompt_tokens) - max(0, request.max_tokens))
        if not ok and request.adapter.name is not None:
            # The optimistic belief that the adapter is arriving there is no longer supported.
            if loc.incoming.pop(request.adapter.name, None) is not None:
                self.refresh_incoming(pod_id, loc, float("-inf"))

    def forget(self, pod_id: str) -> None:
        self._last_states = []
        self.pods.pop(pod_id, None)
        self.inc_pods.discard(pod_id)
        self.views.pop(pod_id, None)
        self.prefix.forget(pod_id)
        self.kv.forget(pod_id)
        stale = [k for k, p in self.sessions.items() if p == pod_id]
        for k in stale:
            del self.sessions[k]

    def known_pods(self) -> Iterable[str]:
        return self.pods.keys()
