"""Picker ``round-robin``: cycle through the candidates, ignoring scores (a baseline).

Formula: candidates ordered by pod id; pick index = counter mod n, where counter is the number of
earlier picks with candidates (``PickContext.seq``). The counter lives in the pipeline's local
state, so it survives a config reload.

Parameters: none.

YAML:
  picker: {type: round-robin}
"""

from __future__ import annotations

from scorer.plugin import Picker
from scorer.registry import register
from scorer.context import PickContext
from scorer.view import PodView


@register
class RoundRobin(Picker):
    TYPE = "round-robin"
    PARAMS = {}

    def pick(self, totals: list[float], views: list[PodView], ctx: PickContext) -> int:
        n = len(views)
        k = ctx.seq % n
        order = sorted(range(n), key=lambda i: views[i].pod_id)
        return order[k]
