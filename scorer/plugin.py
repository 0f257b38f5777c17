"""The plugin protocols: ``Filter``, ``Scorer``, ``Picker``.

Plugins are vectorised: each call receives the whole candidate list (``PodView`` objects, see
``scorer.view``) and the per-pick ``PickContext``, and returns a list, so a pick costs one Python
call per plugin rather than one per plugin per pod.

- ``Filter.filter(views, ctx) -> list[PodView]``: the views that pass (return ``views`` itself
  when every one passes).
- ``Scorer.score(views, ctx) -> list[float] | None``: one score per view, each in [0, 1];
  ``None`` means 0 for every view (e.g. no session key), which the pipeline leaves out of the
  sum and explains as 0.
- ``Picker.pick(totals, views, ctx) -> int``: the index of the chosen view.

Parameters are validated strictly at construction from ``PARAMS`` (see ``scorer.params``).

Optional capabilities are declared as ``runtime_checkable`` Protocols below; the pipeline finds
the plugins that offer one once, when it is built (never on the hot path):

- ``PricesLoadStall``: ``load_stall_s(rank, code)``, the engine seconds an adapter load with that
  placement code stalls its pod (the pipeline adds it to the pod's pending work on dispatch).
- ``HintsReason``: ``reason_hint(score)``, a phrase for the decision's reason (a predicted TTFT;
  "" when there is nothing to say about this pick).
- ``KnowsPrefillRate``: ``prefill_s_per_token``, the rate at which the pipeline drains the
  pending prefill it keeps per pod.
- ``PredictsTTFT``: ``predict(views, ctx)``, each candidate's predicted time to first token in
  seconds (``Pipeline.predicted_ttft_s`` reads it for the gateway's first-byte deadlines).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

from scorer.costmodel import CostConstants, CostLearner, Ticket
from scorer.kv_index import KVBlockIndex
from scorer.model import RoutingRequest
from scorer.params import Param, validate_params
from scorer.context import PickContext
from scorer.view import PodView
from scorer.vllm_blocks import ExtraKeys


class ListMemo:
    """Results memoised per candidate list object.

    ``LocalState.views_of`` returns the very same list while no PodState changed, and filters
    return their input list when everything passes, so a plugin whose result depends only on
    the views and a small key (a base name, a rank) can skip its pass on every pick until a
    state changes. Holding the list keeps its id from being reused.
    """

    __slots__ = ("views", "results")

    def __init__(self) -> None:
        self.views: list[PodView] | None = None
        self.results: dict[Any, Any] = {}

    def get(self, views: list[PodView], key: Any) -> Any:
        if views is not self.views:
            self.views = views
            self.results = {}
            return None
        return self.results.get(key)

    def put(self, key: Any, value: Any) -> Any:
        if len(self.results) > 64:
            self.results.clear()
        self.results[key] = value
        return value

    def cached(self, views: list[PodView], key: Any, compute: Any, *args: Any) -> Any:
        """The memoised result for (``views``, ``key``), else ``compute(*args)`` remembered."""
        hit = self.get(views, key)
        if hit is not None:
            return hit
        return self.put(key, compute(*args))


class Plugin:
    """Common parts: type name, parameter schema, validated parameters."""

    TYPE: ClassVar[str] = ""
    KIND: ClassVar[str] = ""
    PARAMS: ClassVar[dict[str, Param]] = {}

    def __init__(self, params: Mapping[str, Any] | None = None, path: str = "parameters") -> None:
        self.params: dict[str, Any] = validate_params(params, self.PARAMS, path)
        self.setup()

    def setup(self) -> None:
        """Derive fast-path constants from ``self.params`` (override as needed)."""

    def describe(self) -> dict[str, Any]:
        return {"type": self.TYPE, "parameters": dict(self.params)}


class Filter(Plugin):
    KIND = "filter"

    def filter(self, views: list[PodView], ctx: PickContext) -> list[PodView]:
        raise NotImplementedError


class Scorer(Plugin):
    """``BOUNDED = True`` promises every score is already in [0, 1] (the pipeline then skips
    the clamp); third-party scorers that may leave the range keep the default False."""

    KIND = "scorer"
    BOUNDED: ClassVar[bool] = False

    def score(self, views: list[PodView], ctx: PickContext) -> list[float] | None:
        raise NotImplementedError


class Picker(Plugin):
    KIND = "picker"

    def pick(self, totals: list[float], views: list[PodView], ctx: PickContext) -> int:
        raise NotImplementedError


@runtime_checkable
class ReadsKVEvents(Protocol):
    """A scorer fed by the pods' KV events (``LocalState.kv``) and the request's token ids
    (``RoutingRequest.prompt_token_ids``): the gateway runs a KV feed and tokenizes prompts
    only while its pipeline has one. ``live`` says whether a pod's event stream counts now;
    ``extra_keys`` gives the extra keys vLLM hashes into every block of a request for the adapter
    (``scorer.vllm_blocks``). The pick's ``PickContext.kv_match`` asks it both."""

    def live(self, view: PodView, kv: KVBlockIndex, now: float) -> bool: ...
    def extra_keys(self, adapter: str | None) -> ExtraKeys: ...


@runtime_checkable
class PricesLoadStall(Protocol):
    def load_stall_s(self, rank: int | None, code: int, c: CostConstants | None = None) -> float: ...


@runtime_checkable
class LearnsCosts(Protocol):
    """A scorer whose constants the pipeline learns online (``scorer.costmodel``)."""

    def cost_learner(self, old: CostLearner | None) -> CostLearner: ...
    def ticket(self, view: PodView, request: RoutingRequest, code: int, rank: int | None, now: float) -> Ticket: ...


@runtime_checkable
class HintsReason(Protocol):
    def reason_hint(self, score: float) -> str: ...


@runtime_checkable
class KnowsPrefillRate(Protocol):
    @property
    def prefill_s_per_token(self) -> float: ...


@runtime_checkable
class PredictsTTFT(Protocol):
    def predict(self, views: list[PodView], ctx: PickContext) -> list[float]: ...
