"""Scorer ``precise-prefix``: share of the prompt's leading KV blocks a pod really holds, from the
pods' own KV-cache events (llm-d's "precise" prefix scorer), with the approximate index as the
fallback for pods whose events are not known or have stopped.

Formula, per pod p, with T = the request's vLLM blocks (``request.prompt_token_ids`` cut into
blocks of p's ``block_size``, hashed as vLLM does: ``scorer.vllm_blocks``, the adapter's path in
every block's key) and M(p) = the number of *leading* blocks of T that ``local.kv`` (the
``KVBlockIndex`` fed from p's events) says p holds:

  score(p) = M(p) / |T|                        when p's event stream is live and |T| ≥ min_blocks
  score(p) = approximate match / prompt blocks when it is not (same as ``prefix-cache``), or 0
                                               with ``fallback: false``

A stream is live once the index has applied a batch from p, until p goes silent: p computed at
least ``silence_tokens`` uncached prompt tokens (``prefix_cache_queries − prefix_cache_hits`` in
its PodState) and ``silence_s`` seconds passed without a new batch. A pod that is merely idle
publishes nothing and stays live. A request without token ids (the caller could not tokenize it)
is scored by the approximate index for every pod. The hashes are computed lazily and the walk
stops at the first block no live candidate holds (each block costs a SHA-256); liveness, hashes
and M(p) are the pick's ``PickContext.kv_match`` (``scorer.kv_match``), which ``estimated-ttft``
reads too, so a pick hashes each block at most once.

Parameters:
  lora_path (str, default "/var/lib/loraroute/adapters/{name}"): the path the pods loaded each
    adapter from, ``{name}`` standing for the adapter name — vLLM ≥ 0.31 hashes it into every
    block, and the events do not carry it (the chart's sidecars load adapters from there).
  min_blocks (int, default 1): prompts with fewer full blocks score 0 everywhere.
  silence_tokens (int, default 2048), silence_s (float, default 2.0): see above.
  fallback (bool, default true): score pods without live events by the approximate index.

YAML:
  scorers:
    - type: precise-prefix
      weight: 3
      parameters: {lora_path: "/var/lib/loraroute/adapters/{name}", silence_s: 2.0}
"""

from __future__ import annotations

from scorer.kv_index import KVBlockIndex
from scorer.params import Param
from scorer.plugin import Scorer
from scorer.registry import register
from scorer.context import PickContext
from scorer.view import PodView
from scorer.vllm_blocks import ExtraKeys, lora_extra_keys

_MAX_WATCHED = 1024


def _path_template(value: object) -> object:
    if not isinstance(value, str) or "{name}" not in value:
        raise ValueError("must contain {name}")
    return value


@register
class PrecisePrefix(Scorer):
    TYPE = "precise-prefix"
    BOUNDED = True
    PARAMS = {
        "lora_path": Param("/var/lib/loraroute/adapters/{name}", str, check=_path_template,
                           doc="path the pods loaded each adapter from ({name}: the adapter)"),
        "min_blocks": Param(1, int, min=1, doc="minimum prompt blocks for a non-zero score"),
        "silence_tokens": Param(2048, int, min=1, doc="uncached tokens a pod computes without events before it is silent"),
        "silence_s": Param(2.0, float, min=0.0, doc="seconds without events before a busy pod is silent"),
        "fallback": Param(True, bool, doc="score pods without live events by the approximate index"),
    }

    def setup(self) -> None:
        self.lora_path: str = self.params["lora_path"]
        self.min_blocks: int = self.params["min_blocks"]
        self.silence_tokens: int = self.params["silence_tokens"]
        self.silence_s: float = self.params["silence_s"]
        self.fallback: bool = self.params["fallback"]
        # pod -> (batches seen, its uncached-token counter then, when): the silence watch
        self._watch: dict[str, tuple[int, float, float]] = {}

    def live(self, view: PodView, kv: KVBlockIndex, now: float) -> bool:
        """Whether the index's view of this pod comes from a live event stream."""
        rec = kv.pods.get(view.pod_id)
        if rec is None or rec.batches == 0:
            return False
        st = view.state
        computed = st.prefix_cache_queries - st.prefix_cache_hits
        seen = self._watch.get(view.pod_id)
        if seen is None or seen[0] != rec.batches or computed < seen[1]:
            if len(self._watch) >= _MAX_WATCHED:
                self._watch.clear()
            self._watch[view.pod_id] = (rec.batches, computed, now)
            return True
        return not (computed - seen[1] >= self.silence_tokens and now - seen[2] >= self.silence_s)

    def extra_keys(self, adapter: str | None) -> ExtraKeys:
        """vLLM's extra keys of every block of a request for ``adapter`` (its path: ``lora_path``)."""
        return lora_extra_keys(adapter, self.lora_path.replace("{name}", adapter) if adapter is not None else None)

    def score(self, views: list[PodView], ctx: PickContext) -> list[float] | None:
        km = ctx.kv_match(views)
        out = [0.0] * len(views)
        live = km.live if km is not None else None
        if km is not None:
            matched, blocks, floor = km.matched, km.blocks, self.min_blocks
            for i, v in enumerate(views):
                total = blocks.get(v.pod_id, 0)
                if total >= floor:
                    out[i] = matched[v.pod_id] / total
        if self.fallback and (km is None or not km.all_live):
            total = len(ctx.request.prefix_hashes)
            if total >= self.min_blocks:
                approx = ctx.prefix_match()
                if approx:
                    inv = 1.0 / total
                    for i, v in enumerate(views):
                        if live is None or not live[v.pod_id]:
                            out[i] = approx.get(v.pod_id, 0) * inv
        return out if any(out) else None
