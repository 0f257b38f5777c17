"""Picker ``random``: a uniformly random candidate, ignoring scores (a baseline).

Parameters:
  seed (int or null, default null): seed of this picker's random generator.

YAML:
  picker: {type: random, parameters: {seed: 1}}
"""

from __future__ import annotations

import random

from scorer.plugin import Picker
from scorer.plugins.max_score import SEED_PARAM
from scorer.registry import register
from scorer.context import PickContext
from scorer.view import PodView


@register
class RandomPick(Picker):
    TYPE = "random"
    PARAMS = {"seed": SEED_PARAM}

    def setup(self) -> None:
        self.rng = random.Random(self.params["seed"])

    def pick(self, totals: list[float], views: list[PodView], ctx: PickContext) -> int:
        return int(self.rng.random() * len(views))
