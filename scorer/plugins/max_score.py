"""Picker ``max-score``: the candidate with the highest total; ties broken at random, or — for
an adapter no candidate holds — by a consistent hash of the adapter's name.

Formula: pick uniformly among {i : totalᵢ ≥ max(total) − tie_epsilon}. With no scorers every
total is 0, so this is a uniform random choice.

Cold adapters, while the router shares its routing state with other gateway replicas
(``PickContext.shared``; alone, ties stay random): when the request names an adapter that every candidate has at best on disk
(``placement`` DISK or REMOTE: nobody holds it in GPU, CPU, loading or as just sent), the pick is
the candidate with the highest rendezvous hash ``crc32(adapter NUL pod)`` among
{i : totalᵢ ≥ max(total) − cold_margin}. Several gateway replicas that have not yet heard of
each other's "incoming" marks then still send a burst for a new adapter to the same pod (the
hash does not depend on the replica, and a pod that leaves moves only its own adapters); the
margin lets the hash overrule small load differences only. ``cold_margin`` 0 turns it off.

Parameters:
  seed (int or null, default null): seed of this picker's own random generator (reproducible
    tie-breaks in tests and benchmarks); null seeds from the OS.
  tie_epsilon (float, default 1e-9): totals closer than this to the maximum count as ties.
  cold_margin (float, default 0.25): totals within this of the maximum are equals for a cold
    adapter (in total-score units; the default preset's weights sum to 9).

YAML:
  picker:
    type: max-score
    parameters: {seed: 7, cold_margin: 0.25}
"""

from __future__ import annotations

import random
import zlib

from scorer.model import T_DISK
from scorer.params import Param
from scorer.plugin import Picker
from scorer.registry import register
from scorer.context import PickContext
from scorer.view import PodView


def _seed(value: object) -> object:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"expected an integer or null, got {value!r}")
    return value


SEED_PARAM = Param(None, object, check=_seed, doc="random seed (integer) or null")


@register
class MaxScore(Picker):
    TYPE = "max-score"
    PARAMS = {
        "seed": SEED_PARAM,
        "tie_epsilon": Param(1e-9, float, min=0.0, doc="tie tolerance"),
        "cold_margin": Param(0.25, float, min=0.0, doc="equal totals for an adapter no candidate holds"),
    }

    def setup(self) -> None:
        self.rng = random.Random(self.params["seed"])
        self.eps: float = self.params["tie_epsilon"]
        self.cold_margin: float = self.params["cold_margin"]

    def pick(self, totals: list[float], views: list[PodView], ctx: PickContext) -> int:
        top = max(totals)
        adapter = ctx.adapter
        if ctx.shared and adapter is not None and self.cold_margin > 0 and len(views) > 1:
            if min(ctx.codes(views)) >= T_DISK * 3:
                return cold_pick(adapter, totals, views, top - self.cold_margin)
        cut = top - self.eps
        ties = [i for i, t in enumerate(totals) if t >= cut]
        if len(ties) == 1:
            return ties[0]
        return ties[int(self.rng.random() * len(ties))]


def cold_pick(adapter: str, totals: list[float], views: list[PodView], cut: float) -> int:
    """The candidate with total ≥ ``cut`` whose rendezvous hash with ``adapter`` is highest."""
    seed = zlib.crc32(adapter.encode() + b"\0")
    best, best_h = -1, -1
    for i, t in enumerate(totals):
        if t >= cut:
            h = zlib.crc32(views[i].pod_id.encode(), seed)
            if h > best_h:
                best, best_h = i, h
    return best
