"""Filter ``rank-fits``: drop pods that cannot host the adapter's LoRA rank.

Formula: with r the adapter's rank — ``request.adapter.rank``, else the rank the pod itself
reports in ``adapter_ranks`` — keep pod p iff r is unknown or ``r ≤ p.max_lora_rank``.
Requests for the base model pass everywhere. vLLM refuses a larger rank
("LoRA rank R is greater than max_lora_rank N"), so sending it there only produces an error.

Parameters: none.

YAML:
  filters:
    - type: rank-fits
"""

from __future__ import annotations

from scorer.plugin import Filter, ListMemo
from scorer.registry import register
from scorer.context import PickContext
from scorer.view import PodView


@register
class RankFits(Filter):
    TYPE = "rank-fits"
    PARAMS = {}

    def setup(self) -> None:
        self._memo = ListMemo()

    def filter(self, views: list[PodView], ctx: PickContext) -> list[PodView]:
        name = ctx.adapter
        if name is None:
            return views
        rank = ctx.request.adapter.rank
        key = rank if rank is not None else name
        return self._memo.cached(views, key, self._filter, views, name, rank)  # type: ignore[no-any-return]

    def _filter(self, views: list[PodView], name: str, rank: int | None) -> list[PodView]:
        if rank is not None:
            kept = [v for v in views if rank <= v.max_lora_rank]
        else:
            kept = [v for v in views if v.ranks.get(name, 0) <= v.max_lora_rank]
        return views if len(kept) == len(views) else kept
