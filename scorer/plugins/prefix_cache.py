"""Scorer ``prefix-cache``: share of the prompt's leading blocks a pod is believed to hold.

Formula: score = matched / total, where total = number of prompt blocks
(``request.prefix_hashes``, see ``scorer.prefix.prompt_block_hashes``) and matched = the number
of *consecutive leading* blocks the approximate index attributes to the pod. 0 when the prompt
has no full block. The index learns from the router's own dispatches (``Pipeline.on_dispatch``)
and keeps a per-pod LRU sized from ``num_gpu_blocks × block_size`` tokens, expressed in blocks
of ``block_chars / 4`` pseudo-tokens (``state.block_chars`` in the pipeline config, default 256).
The hash chain is seeded with base and adapter, so a cache is never credited across adapters.

Parameters:
  min_blocks (int, default 1): prompts with fewer full blocks score 0 everywhere (too short
    for a prefix hit to matter).

YAML:
  scorers:
    - type: prefix-cache
      weight: 3
      parameters: {min_blocks: 1}
"""

from __future__ import annotations

from scorer.params import Param
from scorer.plugin import Scorer
from scorer.registry import register
from scorer.context import PickContext
from scorer.view import PodView


@register
class PrefixCache(Scorer):
    TYPE = "prefix-cache"
    BOUNDED = True
    PARAMS = {"min_blocks": Param(1, int, min=1, doc="minimum prompt blocks for a non-zero score")}

    def setup(self) -> None:
        self.min_blocks: int = self.params["min_blocks"]

    def score(self, views: list[PodView], ctx: PickContext) -> list[float] | None:
        total = len(ctx.request.prefix_hashes)
        if total < self.min_blocks:
            return None  # 0 everywhere
        match = ctx.prefix_match()
        if not match:
            return None
        inv = 1.0 / total
        get = match.get
        return [get(v.pod_id, 0) * inv for v in views]
