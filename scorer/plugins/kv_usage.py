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
from scorer.context import PickContext
from scorer.view import PodView


@register
class KvUsage(Scorer):
    TYPE = "kv-usage"
    BOUNDED = True
    PARAMS = {}

    def setup(self) -> None:
        self._memo = ListMemo()

    def score(self, views: list[PodView], ctx: PickContext) -> list[float]:
        return self._memo.cached(views, None, _kv_free, views)  # type: ignore[no-any-return]


def _kv_free(views: list[PodView]) -> list[float]:
    return [v.kv_free for v in views]
