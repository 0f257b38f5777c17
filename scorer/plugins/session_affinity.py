"""Scorer ``session-affinity``: prefer the pod the request's session was last sent to.

Formula: score = 1 for the pod bound to ``request.session_key`` (the pod of the most recent
dispatch with that key), 0 for every other pod and for requests without a key. Bindings live in
the pipeline's local state (an LRU of ``state.max_sessions`` keys) and survive config reloads.

Parameters: none.

YAML:
  scorers:
    - type: session-affinity
      weight: 1
"""

from __future__ import annotations

from scorer.plugin import Scorer
from scorer.registry import register
from scorer.context import PickContext
from scorer.view import PodView


@register
class SessionAffinity(Scorer):
    TYPE = "session-affinity"
    BOUNDED = True
    PARAMS = {}

    def score(self, views: list[PodView], ctx: PickContext) -> list[float] | None:
        key = ctx.request.session_key
        bound = ctx.sessions.get(key) if key else None
        if bound is None:
            return None  # 0 everywhere
        return [1.0 if v.pod_id == bound else 0.0 for v in views]
