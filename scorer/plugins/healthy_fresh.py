"""Filter ``healthy-fresh``: drop pods that are unhealthy or whose state is too old to trust.

Formula: keep pod p iff ``p.healthy`` and ``now − p.observed_at ≤ max_age_s``.

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
from scorer.view import PickContext, PodView


@register
class HealthyFresh(Filter):
    TYPE = "healthy-fresh"
    PARAMS = {"max_age_s": Param(2.0, float, min=1e-6, doc="oldest acceptable observation, seconds")}

    def setup(self) -> None:
        self.max_age_s: float = self.params["max_age_s"]

    def filter(self, views: list[PodView], ctx: PickContext) -> list[PodView]:
        oldest = ctx.now - self.max_age_s
        kept = [v for v in views if v.healthy and v.observed_at >= oldest]
        return views if len(kept) == len(views) else kept
