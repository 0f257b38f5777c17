"""Scorer ``kv-usage``: prefer pods with free KV cache.

Formula: score = 1 − kv_cache_usage (vLLM's ``vllm:kv_cache_usage_perc``, 0..1), as llm-d's
kv-cache-utilization scorer.

Parameters: none.

YAML:
  scorers:
    - type: kv-usage
      weight: 2
"""

from __future__ import annotations

from scorer.plugin import ListMemo, Scorer
from scorer.registry import register
from scorer.view import PickContext, PodView


@register
class KvUsage(Scorer):
    TYPE = "kv-usage"
    BOUNDED = True
    PARAMS = {}

    def setup(self) -> None:
        self._memo = ListMemo()

    def score(self, views: list[PodView], ctx: PickContext) -> list[float]:
        hit = self._memo.get(views, None)
        if hit is not None:
            return hit  # type: ignore[no-any-return]
        return self._memo.put(None, [v.kv_free for v in views])  # type: ignore[no-any-return]
