"""Picker ``max-score``: the candidate with the highest total; ties broken at random.

Formula: pick uniformly among {i : totalᵢ ≥ max(total) − tie_epsilon}. With no scorers every
total is 0, so this is a uniform random choice.

Parameters:
  seed (int or null, default null): seed of this picker's own random generator (reproducible
    tie-breaks in tests and benchmarks); null seeds from the OS.
  tie_epsilon (float, default 1e-9): totals closer than this to the maximum count as ties.

YAML:
  picker:
    type: max-score
    parameters: {seed: 7}
"""

from __future__ import annotations

import random

from scorer.params import Param
from scorer.plugin import Picker
from scorer.registry import register
from scorer.view import PickContext, PodView


def _seed(value: object) -> object:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"expected an integer or null, got {value!r}")
    return value


SEED_PARAM = Param(None, object, check=_seed, doc="random seed (integer) or null")


@register
class MaxScore(Picker):
    TYPE = "max-score"
    PARAMS = {"seed": SEED_PARAM, "tie_epsilon": Param(1e-9, float, min=0.0, doc="tie tolerance")}

    def setup(self) -> None:
        self.rng = random.Random(self.params["seed"])
        self.eps: float = self.params["tie_epsilon"]

    def pick(self, totals: list[float], views: list[PodView], ctx: PickContext) -> int:
        top = max(totals)
        cut = top - self.eps
        ties = [i for i, t in enumerate(totals) if t >= cut]
        if len(ties) == 1:
            return ties[0]
        return ties[int(self.rng.random() * len(ties))]
