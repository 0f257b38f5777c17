"""Picker ``weighted-random``: choose at random with probability proportional to the total.

Formula: P(i) = max(0, totalᵢ)^temperature_inv / Σⱼ max(0, totalⱼ)^temperature_inv; uniform when
every total is 0. ``temperature_inv`` > 1 sharpens towards the best, 0 makes it uniform.

Parameters:
  seed (int or null, default null): seed of this picker's random generator.
  temperature_inv (float, default 1.0, ≥ 0): exponent applied to each total.

YAML:
  picker:
    type: weighted-random
    parameters: {temperature_inv: 2.0}
"""

from __future__ import annotations

import random

from scorer.params import Param
from scorer.plugin import Picker
from scorer.plugins.max_score import SEED_PARAM
from scorer.registry import register
from scorer.context import PickContext
from scorer.view import PodView


@register
class WeightedRandom(Picker):
    TYPE = "weighted-random"
    PARAMS = {"seed": SEED_PARAM, "temperature_inv": Param(1.0, float, min=0.0, doc="exponent on totals")}

    def setup(self) -> None:
        self.rng = random.Random(self.params["seed"])
        self.exp: float = self.params["temperature_inv"]

    def pick(self, totals: list[float], views: list[PodView], ctx: PickContext) -> int:
        e = self.exp
        if e == 1.0:
            ws = [t if t > 0.0 else 0.0 for t in totals]
        else:
            ws = [t**e if t > 0.0 else 0.0 for t in totals]
        s = sum(ws)
        if s <= 0.0:
            return int(self.rng.random() * len(totals))
        x = self.rng.random() * s
        acc = 0.0
        for i, w in enumerate(ws):
            acc += w
            if x < acc:
                return i
        return len(ws) - 1
