"""Scorer ``queue``: llm-d's queue scorer, min-max over the candidates of the waiting queue.

Formula, q = ``num_waiting`` (vLLM ``vllm:num_requests_waiting``):
  score = (max_q − q) / (max_q − min_q) over the candidates; 1.0 for every pod when all equal.

Parameters: none.

YAML:
  scorers:
    - type: queue
      weight: 2
"""

from __future__ import annotations

from scorer.plugin import ListMemo, Scorer
from scorer.registry import register
from scorer.context import PickContext
from scorer.view import PodView


@register
class Queue(Scorer):
    TYPE = "queue"
    BOUNDED = True
    PARAMS = {}

    def setup(self) -> None:
        self._memo = ListMemo()

    def score(self, views: list[PodView], ctx: PickContext) -> list[float]:
        return self._memo.cached(views, None, self._score, views)  # type: ignore[no-any-return]

    def _score(self, views: list[PodView]) -> list[float]:
        qs = [v.num_waiting for v in views]
        hi = max(qs)
        lo = min(qs)
        if hi == lo:
            return [1.0] * len(qs)
        inv = 1.0 / (hi - lo)
        return [(hi - q) * inv for q in qs]
