"""A ``Decision`` whose explanation is built only when someone reads it.

Building one ``Candidate`` (with its per-scorer dict) per pod would cost more than the whole
scoring pass, and most decisions are never explained nor fall back. ``LazyDecision`` is a
``Decision`` (same fields, same ``explain()``) that keeps the raw columns and materialises
``ranked`` and ``reason`` on first access.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from scorer.costmodel import CostConstants
from scorer.model import Candidate, Decision
from scorer.plugin import PredictsTTFT
from scorer.context import PickContext
from scorer.view import PodView, code_name, stored_tier

_RANKED = Decision.__dict__["ranked"]
_REASON = Decision.__dict__["reason"]
_COSTS = Decision.__dict__["costs"]


class DecisionMeta:
    """Per-pipeline constants a decision needs to explain itself: scorer names, and for
    scorers that offer ``reason_hint(score) -> str`` (e.g. a predicted TTFT) their hints."""

    __slots__ = ("names", "hints")

    def __init__(self, names: list[str], hints: list[tuple[int, Callable[[float], str]]]) -> None:
        self.names = names
        self.hints = hints


class LazyDecision(Decision):
    """``ranked`` (picked first, then by total, best first) and ``reason`` are computed lazily."""

    __slots__ = ("_views", "_totals", "_cols", "_meta", "_picked", "_ctx", "_constants")


    def __init__(
        self,
        views: list[PodView],
        totals: list[float],
        cols: list[list[float] | None],
        meta: DecisionMeta,
        picked: int,
        filtered: dict[str, str],
        policy: str,
        ctx: PickContext,
    ) -> None:
        self.pod_id = views[picked].pod_id
        self.filtered = filtered
        self.policy = policy
        self.elapsed_us = 0.0
        self._views = views
        self._totals = totals
        self._cols = cols
        self._meta = meta
        self._picked = picked
        self._ctx = ctx
        costs = ctx.costs
        # the constants the picked pod was scored with (a refit before the explanation is read
        # must not change it)
        self._constants: CostConstants | None = (
            costs.constants(views[picked].group) if costs is not None else None)

    # --- lazily materialised fields ------------------------------------------------------
    def _order(self) -> list[int]:
        totals = self._totals
        rest = sorted((i for i in range(len(totals)) if i != self._picked), key=lambda i: -totals[i])
        return [self._picked, *rest]

    def _kv_state(self, pod_id: str) -> dict[str, Any]:
        """``Candidate.kv`` for ``pod_id``: what the pick computed, nothing recomputed now."""
        km = self._ctx.computed_kv_match()
        approx = self._ctx.computed_match()
        live = km.live.get(pod_id) if km is not None else None
        return {"live": live,
                "precise": km.matched.get(pod_id) if km is not None else None,
                "precise_of": km.blocks.get(pod_id) if km is not None else None,
                "approx": approx.get(pod_id, 0) if approx is not None else None,
                "approx_of": len(self._ctx.request.prefix_hashes) if approx is not None else None}

    @property  # type: ignore[override]
    def ranked(self) -> list[Candidate]:
        try:
            return _RANKED.__get__(self, LazyDecision)
        except AttributeError:
            pass
        views, totals, cols, names = self._views, self._totals, self._cols, self._meta.names
        kv = self._kv_state if self._ctx.kv_reader is not None else None
        out = [
            Candidate(views[i].pod_id, totals[i], {n: (col[i] if col is not None else 0.0) for n, col in zip(names, cols)},
                      kv(views[i].pod_id) if kv is not None else None)
            for i in self._order()
        ]
        _RANKED.__set__(self, out)
        return out

    @ranked.setter
    def ranked(self, value: list[Candidate]) -> None:
        _RANKED.__set__(self, value)

    @property  # type: ignore[override]
    def reason(self) -> str:
        try:
            return _REASON.__get__(self, LazyDecision)
        except AttributeError:
            pass
        ctx = self._ctx
        view = self._views[self._picked]
        parts = [f"{len(self._views)} candidates, {len(self.filtered)} filtered"]
        # Only what the scorers computed at pick time: recomputing now would see the state
        # as changed by the dispatch that followed the decision.
        codes = ctx.computed_codes()
        if ctx.adapter is not None and codes is not None:
            parts.append(f"adapter {ctx.adapter}: {code_name(codes[self._picked])}")
        match = ctx.computed_match()
        blocks = len(ctx.request.prefix_hashes)
        if blocks and match is not None:
            parts.append(f"prefix {match.get(view.pod_id, 0)}/{blocks} blocks")
        km = ctx.computed_kv_match()
        if km is not None and km.live.get(view.pod_id):
            parts.append(f"KV events {km.matched[view.pod_id]}/{km.blocks[view.pod_id]} blocks")
        for i, hint in self._meta.hints:
            col = self._cols[i]
            phrase = hint(col[self._picked] if col is not None else 0.0)
            if phrase:  # a hint may have nothing to say about this pick
                parts.append(phrase)
        text = "; ".join(parts)
        _REASON.__set__(self, text)
        return text

    @reason.setter
    def reason(self, value: str) -> None:
        _REASON.__set__(self, value)

    def ranked_ids(self) -> list[str]:
        """Pod ids best first (the fallback order) without building the explanation."""
        views = self._views
        return [views[i].pod_id for i in self._order()]

    def matched_blocks(self, pod_id: str) -> int:
        """Prompt blocks the prefix index attributed to ``pod_id`` at pick time; 0 when no
        scorer looked at the prefix index for this decision."""
        match = self._ctx.computed_match()
        return 0 if match is None else match.get(pod_id, 0)

    def cached_tokens(self, pod_id: str) -> int | None:
        """Prompt tokens ``pod_id`` held at pick time by its own KV events (M × block_size,
        ``scorer.kv_match``); None when its stream was not live or no precise match was made."""
        km = self._ctx.computed_kv_match()
        return None if km is None else km.cached_tokens.get(pod_id)

    def stored_tier(self, pod_id: str) -> int | None:
        """``scorer.view.stored_tier`` of the requested adapter on the candidate ``pod_id``, from
        the view the pick scored (the picked pod is found first); None for a non-candidate."""
        views = self._views
        view = views[self._picked]
        if view.pod_id != pod_id:
            found = [v for v in views if v.pod_id == pod_id]
            if not found:
                return None
            view = found[0]
        return stored_tier(view, self._ctx.adapter)

    def predicted_ttft_s(self, pod_id: str, predictor: PredictsTTFT) -> float | None:
        """``predictor``'s TTFT for the candidate ``pod_id`` in seconds, from the views this pick
        scored (and the router's own counters as they are now); None for a non-candidate."""
        for v in self._views:
            if v.pod_id == pod_id:
                return predictor.predict([v], self._ctx.narrowed())[0]
        return None

    def placement(self, pod_id: str) -> str | None:
        """The requested adapter's placement on ``pod_id`` as the scorers priced it at pick time
        (``code_name``, e.g. ``"cpu/free"``); None when no scorer computed placements or the pod
        was not a candidate."""
        codes = self._ctx.computed_codes()
        if codes is None:
            return None
        for v, c in zip(self._views, codes):
            if v.pod_id == pod_id:
                return code_name(c)
        return None

    @property  # type: ignore[override]
    def costs(self) -> dict[str, Any] | None:
        try:
            return _COSTS.__get__(self, LazyDecision)
        except AttributeError:
            pass
        c = self._constants
        out = None
        if c is not None:
            out = {"group": self._views[self._picked].group, "learned": c.version > 0,
                   **{k: (round(v, 7) if isinstance(v, float) else v) for k, v in c.as_dict().items()}}
        _COSTS.__set__(self, out)
        return out

    @costs.setter
    def costs(self, value: dict[str, Any] | None) -> None:
        _COSTS.__set__(self, value)

    def __repr__(self) -> str:
        return f"LazyDecision(pod_id={self.pod_id!r}, policy={self.policy!r}, candidates={len(self._views)})"

    def to_decision(self) -> Decision:
        """A plain ``Decision`` (everything materialised, no reference to the pipeline's state)."""
        return Decision(self.pod_id, self.ranked, dict(self.filtered), self.policy, self.elapsed_us, self.reason,
                        self.costs)

    def __reduce__(self) -> Any:
        return (Decision, (self.pod_id, self.ranked, dict(self.filtered), self.policy, self.elapsed_us, self.reason,
                           self.costs))
