"""Scorer ``recovery``: a bounded bonus for a pod that has just (re)joined and has spare capacity.

A pod back from a restart holds no adapter and no cached prefix, so every adapter- and
prefix-aware score prefers the pods that kept theirs, even when those are busier: in one run a
restarted pod, healthy again within 2 s, received no request for 47 s. This term sends it
traffic within seconds, and stops by itself:

  fresh(p) = max(0, 1 − (now − healthy_since(p)) / window_s)
  score(p) = fresh(p) − min over the candidates of fresh(q),  if load(p) ≤ mean load of the candidates
           = 0,                                               otherwise
  load(p)  = max(requests this router has in flight on p, p's running + waiting)

``healthy_since`` is the pod's first healthy observation since it joined the view or recovered
(``scorer.view.PodView``). Bounded three ways: it fades to 0 within ``window_s``; it is relative
(when every pod is equally new, as when the gateway starts, it is 0 for all); and a pod that has
taken its share (its load above the mean) gets none. The decision's reason names it when it
applied to the picked pod ("recovery bonus 0.80").

Parameters:
  window_s (float, default 20, > 0): seconds over which the bonus fades.

YAML:
  scorers:
    - type: recovery
      weight: 3
      parameters: {window_s: 20}
"""

from __future__ import annotations

from scorer.params import Param
from scorer.plugin import ListMemo, Scorer
from scorer.registry import register
from scorer.context import PickContext
from scorer.view import PodView


@register
class Recovery(Scorer):
    TYPE = "recovery"
    BOUNDED = True
    PARAMS = {"window_s": Param(20.0, float, min=1e-3, doc="seconds over which the bonus fades")}

    def setup(self) -> None:
        self.window_s: float = self.params["window_s"]
        self._memo = ListMemo()

    def score(self, views: list[PodView], ctx: PickContext) -> list[float] | None:
        now = ctx.now
        newest = self._memo.cached(views, "newest", self._newest, views)
        if newest <= now - self.window_s or len(views) < 2:
            return None  # nobody joined recently (the common case: one memoised comparison)
        inv = 1.0 / self.window_s
        fresh = [1.0 - (now - v.healthy_since) * inv if now - v.healthy_since < self.window_s else 0.0
                 for v in views]
        floor = min(fresh)
        loads = [v.local.inflight if v.local.inflight > v.load else v.load for v in views]
        mean = sum(loads) / len(loads)
        return [f - floor if load <= mean else 0.0 for f, load in zip(fresh, loads)]

    @staticmethod
    def _newest(views: list[PodView]) -> float:
        return max((v.healthy_since for v in views if v.healthy_since != float("inf")), default=float("-inf"))

    def reason_hint(self, score: float) -> str:
        """Named in the decision's reason only when it applied to the picked pod."""
        return f"recovery bonus {score:.2f}" if score > 0.0 else ""
