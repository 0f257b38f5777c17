"""``PickContext``: the values of one pick, computed at most once and shared by every plugin.

Made by ``Pipeline.pick`` for each request; plugins read the request, the time, the pipeline's
indexes (prefix blocks, KV-event blocks, sessions, the placement plan, the learned costs) and
four memoised per-pick results: the prefix match, the precise KV match (``scorer.kv_match``),
the adapter's rank, and the placement code of the adapter on each candidate
(``scorer.view.tier_codes``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from scorer.costmodel import CostLearner
from scorer.kv_index import KVBlockIndex
from scorer.kv_match import KVMatch, KVReader
from scorer.model import RoutingRequest
from scorer.prefix import PrefixIndex
from scorer.view import PodView, tier_codes

if TYPE_CHECKING:
    from scorer.placement import PlacementPlan

__all__ = ["PickContext"]


class PickContext:
    """Per-pick values computed at most once and shared by every plugin of the pipeline.

    ``prefix`` and ``sessions`` are the pipeline's prefix index and session bindings, ``kv`` its
    index of the blocks pods reported through KV events, ``plan`` the placement plan a placer
    installed (None without one), ``costs`` the learned cost constants per pod group (None when
    no scorer learns them) — all read only here; ``shared`` is True while the router shares its
    routing state with other gateway replicas (``scorer.sharing``); ``seq`` counts the pipeline's earlier picks
    that had candidates (round-robin's counter; it lives in the local state, so it survives a
    config reload). ``state_now`` is the time pod states are judged fresh against: ``now``,
    unless the caller's view stopped being refreshed at an earlier time (its store is
    unreachable), so that the view does not age meanwhile. ``kv_reader`` is the pipeline's scorer
    fed by KV events (``precise-prefix``; None without one): it judges which pods' streams are
    live and knows the adapters' paths for ``kv_match``.
    """

    __slots__ = ("request", "now", "state_now", "adapter", "prefix", "sessions", "seq", "kv", "plan", "costs",
                 "shared", "kv_reader",
                 "_match", "_codes", "_rank", "_kvm")

    def __init__(
        self, request: RoutingRequest, now: float, prefix: PrefixIndex, sessions: Mapping[str, str], seq: int,
        kv: KVBlockIndex | None = None, plan: PlacementPlan | None = None, costs: CostLearner | None = None,
        state_now: float | None = None,
        shared: bool = False,
        kv_reader: KVReader | None = None,
    ) -> None:
        self.request = request
        self.now = now
        self.state_now = now if state_now is None else state_now
        self.adapter = request.adapter.name
        self.prefix = prefix
        self.sessions = sessions
        self.seq = seq
        self.kv = kv if kv is not None else KVBlockIndex()
        self.plan = plan
        self.costs = costs
        self.shared = shared
        self.kv_reader = kv_reader
        self._kvm: KVMatch | None = None
        self._match: dict[str, int] | None = None
        self._codes: list[int] | None = None
        self._rank: int | None = -1

    def prefix_match(self) -> dict[str, int]:
        """pod id → leading prompt blocks that pod is believed to hold (absent: 0)."""
        m = self._match
        if m is None:
            m = self._match = self.prefix.match(self.request.prefix_hashes)
        return m

    def kv_match(self, views: list[PodView]) -> KVMatch | None:
        """The precise KV match covering ``views`` (``scorer.kv_match``), computed once per pick
        and extended to views not covered yet; None when there is nothing to match (no KV reader,
        no token ids, or no pod in the index): read the approximate index then."""
        m = self._kvm
        if m is None:
            tokens = self.request.prompt_token_ids
            if self.kv_reader is None or not tokens or not self.kv.pods:
                return None
            m = self._kvm = KVMatch(self.kv_reader, tokens, self.adapter)
        return m.cover(views, self.kv, self.now)

    def computed_kv_match(self) -> KVMatch | None:
        """The precise match as the pick left it (None: no scorer asked for one)."""
        return self._kvm

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

    def narrowed(self) -> PickContext:
        """The same pick for another list of views: what depends only on the request (the prefix
        match, the precise match with its block hashes, the adapter's rank) is shared; the per-view
        placement codes are not."""
        ctx = PickContext(self.request, self.now, self.prefix, self.sessions, self.seq, self.kv, self.plan,
                          self.costs, self.state_now, self.shared, self.kv_reader)
        ctx._match = self._match
        ctx._kvm = self._kvm
        ctx._rank = self._rank
        return ctx

    def computed_match(self) -> dict[str, int] | None:
        return self._match

    def codes(self, views: list[PodView]) -> list[int]:
        """Placement code (tier * 3 + slot) of the requested adapter on each view."""
        c = self._codes
        if c is None:
            c = self._codes = tier_codes(self.adapter, views)
        return c
