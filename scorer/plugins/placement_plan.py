"""Scorer ``placement-plan``: prefer the pods the placement plan gives the requested adapter.

The plan (``scorer.placement``, installed by the gateway's placer with ``Pipeline.set_plan``)
says where each adapter should live: hot adapters on several pods' GPUs, warm ones in one pod's
CPU cache, every other adapter on a stable home pod (rendezvous hashing). Following it keeps each
adapter's traffic where its loads and CPU-cache hits concentrate. It is a signal, weighed against
the others: a pod that already holds the adapter elsewhere, or a planned pod that is swamped,
still loses to the prediction of ``estimated-ttft``.

Formula, for a request for adapter a (base b) and pod p:

  planned   if a is hot or warm in the plan and p is one of its pods
  home      if a is tail (or unknown to the plan) and p is its rendezvous home among the plan's
            pods for b that take a's rank
  other     otherwise

With no plan installed, or for a base-model request, the scorer abstains (0 everywhere, left out
of the sum).

Parameters: planned (float in [0, 1], 1.0), home (float in [0, 1], 1.0), other (float in
[0, 1], 0.0).

With the default preset's weights, weight 0.5 is worth about 0.1 s of predicted TTFT near the
typical prediction (estimated-ttft weight 3, scale_s 0.5): enough to break near-ties toward the
plan, not enough to pull a request away from a pod that holds the adapter when the plan's pods
would have to load it.

YAML:
  scorers:
    - type: placement-plan
      weight: 0.5
      parameters: {planned: 1.0, home: 1.0, other: 0.0}
"""

from __future__ import annotations

from scorer.params import Param
from scorer.placement import TAIL
from scorer.plugin import Scorer
from scorer.registry import register
from scorer.context import PickContext
from scorer.view import PodView


@register
class PlacementPlanScorer(Scorer):
    TYPE = "placement-plan"
    BOUNDED = True
    PARAMS = {
        "planned": Param(1.0, float, min=0.0, max=1.0, doc="a pod the plan gives a hot or warm adapter"),
        "home": Param(1.0, float, min=0.0, max=1.0, doc="the home pod of a tail adapter"),
        "other": Param(0.0, float, min=0.0, max=1.0, doc="every other pod"),
    }

    def setup(self) -> None:
        self.planned: float = self.params["planned"]
        self.home: float = self.params["home"]
        self.other: float = self.params["other"]

    def score(self, views: list[PodView], ctx: PickContext) -> list[float] | None:
        plan = ctx.plan
        name = ctx.adapter
        if plan is None or name is None:
            return None
        base = ctx.request.adapter.base
        target = plan.get(base, name)
        other = self.other
        if target is not None and target.role != TAIL:
            pods, hit = target.pod_set, self.planned
            return [hit if v.pod_id in pods else other for v in views]
        home = target.pods[0] if target is not None else plan.home(base, name, ctx.adapter_rank(views))
        hit = self.home
        return [hit if v.pod_id == home else other for v in views]
