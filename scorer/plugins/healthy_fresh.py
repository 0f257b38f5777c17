"""Filter ``healthy-fresh``: drop pods that are unhealthy or whose state is too old to trust.

Formula: keep pod p iff ``p.healthy`` and ``state_now − p.observed_at ≤ max_age_s``, where
``state_now`` is the pick's clock, or the moment the caller's view was last refreshed when that
is earlier (``PickContext.state_now``: the gateway's state store is unreachable, and the last
view must not age meanwhile).

Parameters:
  max_age_s (float, default 2.0, > 0): oldest acceptable observation, in seconds. The sidecars
    poll every 50 ms, so 2 s means ~40 missed polls; a view ~50 ms stale costs almost nothing.

YAML:
  filters:
    - type: healthy-fresh
      parameters: {max_age_s: 2.0}
"""

from __future__ import annotations

from scorer.params import Param
from scorer.plugin import Filter
from scorer.registry import register
from scorer.context import PickContext
from scorer.view import PodView


@register
class HealthyFresh(Filter):
    TYPE = "healthy-fresh"
    PARAMS = {"max_age_s": Param(2.0, float, min=1e-6, doc="oldest acceptable observation, seconds")}

    def setup(self) -> None:
        self.max_age_s: float = self.params["max_age_s"]
        # last result: (views, computed at, valid until, kept)
        self._memo: tuple[list[PodView], float, float, list[PodView]] | None = None

    def filter(self, views: list[PodView], ctx: PickContext) -> list[PodView]:
        now = ctx.state_now
        m = self._memo
        if m is not None and m[0] is views and m[1] <= now < m[2]:
            return m[3]
        oldest = now - self.max_age_s
        kept = [v for v in views if v.healthy and v.observed_at >= oldest]
        out = views if len(kept) == len(views) else kept
        # unchanged until the first kept pod turns stale (time moves forward; states are fixed)
        valid_until = min((v.observed_at for v in kept), default=now) + self.max_age_s if kept else float("inf")
        self._memo = (views, now, valid_until, out)
        return out
