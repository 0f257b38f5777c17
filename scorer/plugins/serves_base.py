"""Filter ``serves-base``: keep pods that serve the request's base model.

Formula: keep pod p iff ``request.adapter.base ∈ p.base_models``; a pod that reports no base
models at all is kept only when ``allow_unknown`` is true.

Parameters:
  allow_unknown (bool, default false): keep pods whose base model list is empty (not yet
    scraped). Off by default: such a pod would answer 404 for a model it does not serve.

YAML:
  filters:
    - type: serves-base
      parameters: {allow_unknown: false}
"""

from __future__ import annotations

from scorer.params import Param
from scorer.plugin import Filter, ListMemo
from scorer.registry import register
from scorer.context import PickContext
from scorer.view import PodView


@register
class ServesBase(Filter):
    TYPE = "serves-base"
    PARAMS = {"allow_unknown": Param(False, bool, doc="keep pods with an empty base model list")}

    def setup(self) -> None:
        self.allow_unknown: bool = self.params["allow_unknown"]
        self._memo = ListMemo()

    def filter(self, views: list[PodView], ctx: PickContext) -> list[PodView]:
        base = ctx.request.adapter.base
        return self._memo.cached(views, base, self._filter, views, base)  # type: ignore[no-any-return]

    def _filter(self, views: list[PodView], base: str) -> list[PodView]:
        if self.allow_unknown:
            kept = [v for v in views if base in v.bases or not v.bases]
        else:
            kept = [v for v in views if base in v.bases]
        return views if len(kept) == len(views) else kept
