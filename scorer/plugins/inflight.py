"""Scorer ``inflight``: the router's own in-flight load per pod (exact and instant).

x = requests (``metric: requests``) or prompt + max_tokens (``metric: tokens``) that this
pipeline dispatched to the pod and that have not completed (``on_dispatch`` / ``on_complete``).
Unlike scraped metrics this sees a burst the moment it is routed.

Formula:
  normalize: capacity  →  score = max(0, 1 − x / capacity)            (default)
  normalize: minmax    →  score = (max_x − x) / (max_x − min_x) over the candidates, 1.0 if all equal
                          (llm-d's active-request scorer)

``capacity`` makes the score absolute: with weight w, every extra request in flight costs
w / capacity, so a pod holding the adapter or the prefix stays preferred until its surplus of
in-flight requests outweighs that advantage — a bounded stickiness, like sglang's
"imbalance > 64" rule but continuous.

Parameters:
  metric (str, default "requests"): "requests" or "tokens".
  normalize (str, default "capacity"): "capacity" or "minmax".
  capacity (float, default 64): requests (or tokens) at which the score reaches 0.

YAML:
  scorers:
    - type: inflight
      weight: 2
      parameters: {metric: requests, normalize: capacity, capacity: 64}
"""

from __future__ import annotations

from scorer.params import Param
from scorer.plugin import Scorer
from scorer.registry import register
from scorer.context import PickContext
from scorer.view import PodView


@register
class Inflight(Scorer):
    TYPE = "inflight"
    BOUNDED = True
    PARAMS = {
        "metric": Param("requests", str, choices=("requests", "tokens"), doc="what to count"),
        "normalize": Param("capacity", str, choices=("capacity", "minmax"), doc="absolute or relative"),
        "capacity": Param(64.0, float, min=1e-9, doc="load at which the score reaches 0"),
    }

    def setup(self) -> None:
        self.tokens = self.params["metric"] == "tokens"
        self.minmax = self.params["normalize"] == "minmax"
        self.inv_cap = 1.0 / self.params["capacity"]

    def score(self, views: list[PodView], ctx: PickContext) -> list[float]:
        if not self.minmax:
            inv = self.inv_cap
            cap = self.params["capacity"]
            if self.tokens:
                return [(cap - x) * inv if x < cap else 0.0 for x in [v.local.inflight_tokens for v in views]]
            return [(cap - v.local.inflight) * inv if v.local.inflight < cap else 0.0 for v in views]
        if self.tokens:
            xs = [v.local.inflight_tokens for v in views]
        else:
            xs = [v.local.inflight for v in views]
        hi = max(xs)
        lo = min(xs)
        if hi == lo:
            return [1.0] * len(xs)
        inv = 1.0 / (hi - lo)
        return [(hi - x) * inv for x in xs]
