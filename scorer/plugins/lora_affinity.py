"""Scorer ``lora-affinity``: llm-d's / GIE's published LoRA affinity formula, as a baseline.

Formula, with m the requested model name (the adapter, or the base for a base request),
R = running adapters, W = waiting adapters, both from vLLM's ``lora_requests_info``:

  1.0  if m ∈ R
  0.8  elif |R ∪ W| < max_lora        (a free slot)
  0.6  elif m ∈ W
  0.0  otherwise

``PodState.running_adapters`` is vLLM's ``lora_requests_info`` list. Since vLLM 0.11 the running
and waiting label carry the same list (adapters with requests in flight), so W = R here and the
0.6 row never fires — exactly the behaviour (and the flaw, llm-d issue #2605: an idle but loaded
adapter looks absent) of the original. It ignores the sidecar's residency estimate and the
router's optimistic state on purpose; use ``adapter-residency`` for that.

Parameters: none.

YAML:
  scorers:
    - type: lora-affinity
      weight: 1
"""

from __future__ import annotations

from scorer.plugin import ListMemo, Scorer
from scorer.registry import register
from scorer.context import PickContext
from scorer.view import PodView


@register
class LoraAffinity(Scorer):
    TYPE = "lora-affinity"
    BOUNDED = True
    PARAMS = {}

    def setup(self) -> None:
        self._memo = ListMemo()

    def score(self, views: list[PodView], ctx: PickContext) -> list[float]:
        name = ctx.adapter if ctx.adapter is not None else ctx.request.adapter.base
        return self._memo.cached(views, name, self._score, views, name)  # type: ignore[no-any-return]

    def _score(self, views: list[PodView], name: str) -> list[float]:
        out: list[float] = []
        app = out.append
        for v in views:
            running = v.running  # vLLM >= 0.11: waiting list == running list
            if name in running:
                app(1.0)
            elif v.n_running < v.max_loras:
                app(0.8)
            else:
                app(0.0)  # the 0.6 row (m in W \ R) cannot occur when W == R
        return out
