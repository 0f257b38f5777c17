"""Scorer ``estimated-ttft``: predict each candidate's time to first token; sooner is better.

Prediction for pod p, in seconds (all terms ≥ 0):

  t(p) = base_s
       + queue(p)
       + adapter(p)
       + prompt_tokens × (1 − matched(p) / blocks) × prefill_s_per_token

  queue(p)   = max(pending(p), num_waiting × per_waiting_s)
               + max(inflight(p), num_running + num_waiting) × per_running_s
      pending(p): seconds of work this router has sent p and p has not yet worked off — the
      uncached prefill (1 / prefill_s_per_token tokens a second) plus the engine stall of every
      adapter load it triggered (``load_stall_s``: vLLM loads a LoRA inside the engine step, so
      the whole batch and every queued request waits for it); a fluid queue, exact and instant;
      num_waiting / num_running: scraped from vLLM (covers other routers' traffic);
      inflight(p): this router's requests in flight on p.
  adapter(p) by placement of the requested adapter (see ``scorer.view``):
      base request or on GPU       0
      incoming (we just sent it)   incoming_s        (the load is under way; its remaining
                                                      stall is already in pending(p))
      being loaded by the sidecar  loading_s
      in vLLM's CPU LoRA cache     cpu_load_s        (CPU → GPU activation, ~9 ms flat)
      on local disk                disk_load(rank)
      not on the pod               disk_load(rank) + fetch_s_per_rank × rank
      + deferred_wait_s × (1 + num_deferred / max_loras) when the tier is not GPU/incoming/
        loading and every slot holds an adapter with running requests (vLLM defers the
        request until one adapter drains; nothing is preempted for LoRA)
  disk_load(rank) = model_scale × piecewise-linear interpolation of ``disk_load_s`` over rank
      (flat below the smallest rank, proportional above the largest); unknown rank →
      ``default_rank``.
  matched(p) / blocks: the prefix index's consecutive leading block match (0 with no blocks).

Score (normalize: absolute, the default): score = scale_s / (scale_s + t) = 1 − t / (t + scale_s).
It is monotone in t, independent of the other candidates (the same prediction always earns the
same score, so weights mean the same thing in every decision) and reads back as seconds:
t = scale_s / score − scale_s. With scale_s = 0.5: t = 0 → 1.0, 9 ms → 0.98, 0.27 s → 0.65,
1 s → 0.33. ``normalize: minmax`` gives (t_max − t) / (t_max − t_min) over the candidates (1.0
when all equal) instead; it stretches a 1 ms difference to the full [0, 1] range, so it is only
sensible as the sole scorer.

Calibrated defaults (8B model, one H100):
  prefill_s_per_token 0.000031 — h100-calibration.md, prefill slope ≈ 0.031 ms/token (≥ 2k tokens)
  per_running_s 0.0001 — decode step floor grows ≈ 0.045 ms per sequence (h100-calibration.md,
      batch 1 → 128: 5.4 → 11 ms); a first token spans ~2 steps
  per_waiting_s 0.03 — one queued ~1k-token prefill ahead (≈ 31 ms at the slope above)
  base_s 0.02 — scheduling + one step; a constant, only shifts the score curve
  cpu_load_s 0.009 — vllm-lora-surface.md §8, CPU → GPU activation ≈ 8.5–9.3 ms
  disk_load_s {8: 0.104, 16: 0.263, 32: 0.51, 64: 1.0} — vllm-lora-surface.md §8 cold
      disk → CPU loads on a 7B model (rank 64 extrapolated), × model_scale 1.05 (an all-module
      LoRA of Llama-3.1-8B has ≈ 1.05× the parameters of Llama-2-7B's at the same rank)
  fetch_s_per_rank 0.0042 — ≈ 5.25 MB per rank (336 MB at rank 64) at 10 Gb/s
      (h100-calibration.md: "336 MB at 10 Gb/s ≈ 0.27 s")
  incoming_s 0 — the load this router started is priced in pending(p) (its remaining stall)
  loading_s 0.05 — a load the sidecar started, half of the smallest disk load
  deferred_wait_s 1.0 — time for one running adapter's requests to drain (workload dependent)
  default_rank 16, scale_s 0.5

Parameters: base_s, prefill_s_per_token, per_running_s, per_waiting_s, cpu_load_s, disk_load_s
(mapping rank → seconds), model_scale, fetch_s_per_rank, incoming_s, loading_s, deferred_wait_s,
default_rank, scale_s, normalize ("absolute" | "minmax"). The pipeline also uses this scorer's
``prefill_s_per_token`` to drain the pending-prefill queue it keeps per pod.

YAML:
  scorers:
    - type: estimated-ttft
      weight: 3
      parameters:
        scale_s: 0.5
        disk_load_s: {8: 0.104, 16: 0.263, 32: 0.51, 64: 1.0}
        deferred_wait_s: 1.0
"""

from __future__ import annotations

from typing import Any

from scorer.params import Param
from scorer.plugin import Scorer
from scorer.registry import register
from scorer.state import DEFAULT_PREFILL_S_PER_TOKEN
from scorer.view import (
    N_CODES, S_SATURATED, T_BASE, T_CPU, T_DISK, T_GPU, T_INCOMING, T_LOADING, T_REMOTE, PickContext, PodView,
)

DEFAULT_DISK_LOAD_S: dict[int, float] = {8: 0.104, 16: 0.263, 32: 0.51, 64: 1.0}
# Placements where the adapter still needs a slot and every slot holds a running adapter.
_NO_MATCH: dict[str, int] = {}
_DEFERRED_CODES = frozenset(t * 3 + S_SATURATED for t in (T_CPU, T_DISK, T_REMOTE))


def _rank_table(value: Any) -> dict[int, float]:
    out: dict[int, float] = {}
    for k, v in value.items():
        try:
            rank = int(k)
        except (TypeError, ValueError):
            raise ValueError(f"rank {k!r} is not an integer") from None
        if rank <= 0:
            raise ValueError(f"rank {k!r} must be positive")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ValueError(f"load time for rank {k!r} must be a non-negative number, got {v!r}")
        out[rank] = float(v)
    if not out:
        raise ValueError("needs at least one rank")
    return dict(sorted(out.items()))


def interpolate_load(table: dict[int, float], rank: int) -> float:
    """Piecewise-linear in rank; flat below the smallest rank, proportional above the largest."""
    ranks = list(table)
    if rank <= ranks[0]:
        return table[ranks[0]]
    if rank >= ranks[-1]:
        return table[ranks[-1]] * rank / ranks[-1]
    for lo, hi in zip(ranks, ranks[1:]):
        if lo <= rank <= hi:
            f = (rank - lo) / (hi - lo)
            return table[lo] + f * (table[hi] - table[lo])
    return table[ranks[-1]]  # unreachable


@register
class EstimatedTTFT(Scorer):
    TYPE = "estimated-ttft"
    BOUNDED = True
    PARAMS = {
        "base_s": Param(0.02, float, min=0.0, doc="fixed scheduling + first step, seconds"),
        "prefill_s_per_token": Param(DEFAULT_PREFILL_S_PER_TOKEN, float, min=1e-9, doc="uncached prefill cost"),
        "per_running_s": Param(0.0001, float, min=0.0, doc="added TTFT per request in flight on the pod"),
        "per_waiting_s": Param(0.03, float, min=0.0, doc="added TTFT per request waiting on the pod"),
        "cpu_load_s": Param(0.009, float, min=0.0, doc="CPU → GPU adapter activation"),
        "disk_load_s": Param(dict(DEFAULT_DISK_LOAD_S), dict, check=_rank_table, doc="rank → disk load seconds"),
        "model_scale": Param(1.05, float, min=0.0, doc="multiplier on disk_load_s for the base model size"),
        "fetch_s_per_rank": Param(0.0042, float, min=0.0, doc="object-store fetch seconds per unit of rank"),
        "incoming_s": Param(0.0, float, min=0.0, doc="adapter this router just sent there"),
        "loading_s": Param(0.05, float, min=0.0, doc="adapter the sidecar is loading"),
        "deferred_wait_s": Param(1.0, float, min=0.0, doc="wait for a slot when all hold running adapters"),
        "default_rank": Param(16, int, min=1, doc="rank assumed when unknown"),
        "scale_s": Param(0.5, float, min=1e-6, doc="seconds at which the score is 0.5"),
        "normalize": Param("absolute", str, choices=("absolute", "minmax"), doc="score transform"),
    }

    def setup(self) -> None:
        p = self.params
        self.base_s: float = p["base_s"]
        self.pst: float = p["prefill_s_per_token"]
        self.per_running: float = p["per_running_s"]
        self.per_waiting: float = p["per_waiting_s"]
        self.scale: float = p["scale_s"]
        self.minmax = p["normalize"] == "minmax"
        self._tables: dict[int, list[float]] = {}

    @property
    def prefill_s_per_token(self) -> float:
        """The pipeline drains each pod's pending prefill at this rate (``KnowsPrefillRate``)."""
        return self.pst

    def disk_load_s(self, rank: int) -> float:
        return self.params["model_scale"] * interpolate_load(self.params["disk_load_s"], rank)

    def adapter_table(self, rank: int | None) -> list[float]:
        """Seconds of adapter cost for each placement code, for one rank (memoised)."""
        r = rank if rank is not None else self.params["default_rank"]
        t = self._tables.get(r)
        if t is not None:
            return t
        p = self.params
        disk = self.disk_load_s(r)
        remote = disk + p["fetch_s_per_rank"] * r
        t = [0.0] * N_CODES
        for code in range(N_CODES):
            tier = code // 3
            if tier in (T_BASE, T_GPU):
                s = 0.0
            elif tier == T_INCOMING:
                s = p["incoming_s"]
            elif tier == T_LOADING:
                s = p["loading_s"]
            elif tier == T_CPU:
                s = p["cpu_load_s"]
            elif tier == T_DISK:
                s = disk
            else:
                s = remote
            if code in _DEFERRED_CODES:
                s += p["deferred_wait_s"]  # × (1 + num_deferred / max_loras): the rest in predict
            t[code] = s
        self._tables[r] = t
        return t

    def load_stall_s(self, rank: int | None, code: int) -> float:
        """Seconds a request with this placement stalls its pod's engine by loading the adapter.

        The tier's load cost without the deferral wait (a deferred request waits alone, it does
        not stall the batch); 0 on GPU, for the base, and for a load already under way
        (incoming or loading), which was counted when it started.
        """
        tier = code // 3
        if tier in (T_BASE, T_GPU, T_INCOMING, T_LOADING):
            return 0.0
        t = self.adapter_table(rank)[code]
        return t - self.params["deferred_wait_s"] if code in _DEFERRED_CODES else t

    def predict(self, views: list[PodView], ctx: PickContext) -> list[float]:
        """Predicted TTFT in seconds for each view (see the module docstring)."""
        k = self.scale
        return [k / s - k for s in self._transformed(views, ctx)]

    def _transformed(self, views: list[PodView], ctx: PickContext) -> list[float]:
        """k / (k + t) for each view's prediction t, with k = scale_s: the absolute score.

        The transform is applied inside the one loop (no second pass); ``predict`` inverts it
        (t = k / score − k, exact to ~1e-16 s).
        """
        req = ctx.request
        now = ctx.now
        codes = ctx.codes(views)
        table = self.adapter_table(ctx.adapter_rank(views) if ctx.adapter is not None else None)
        per_running = self.per_running
        per_waiting = self.per_waiting
        full = max(0, req.prompt_tokens) * self.pst
        hashes = req.prefix_hashes
        match = ctx.prefix_match() if hashes else None
        per_block = full / len(hashes) if hashes else 0.0
        k = self.scale
        base = k + self.base_s + full  # k folded in: each value below is k + t
        defer = self.params["deferred_wait_s"]
        out: list[float] = []
        app = out.append
        get = match.get if match else _NO_MATCH.get  # pod id -> leading blocks cached there
        for v, c in zip(views, codes):
            loc = v.local
            q = loc.pending_until - now
            w = v.num_waiting * per_waiting
            n = v.load
            i = loc.inflight
            kt = base + (q if q > w else w) + (i if i > n else n) * per_running + table[c]
            if v.num_deferred and c in _DEFERRED_CODES:
                kt += defer * (v.defer_factor - 1.0)
            m = get(v.pod_id)
            if m:
                kt -= m * per_block
            app(k / kt)
        return out

    def reason_hint(self, score: float) -> str:
        """For the decision's reason: the picked pod's prediction in milliseconds."""
        if self.minmax:
            return f"estimated-ttft {score:.2f} (min-max)"
        if score <= 0.0:
            return "predicted TTFT > 1000 s"
        return f"predicted TTFT {1000.0 * (self.scale / score - self.scale):.0f} ms"

    def score(self, views: list[PodView], ctx: PickContext) -> list[float]:
        if not self.minmax:
            return self._transformed(views, ctx)
        ts = self.predict(views, ctx)
        hi = max(ts)
        lo = min(ts)
        if hi - lo <= 1e-12:
            return [1.0] * len(ts)
        inv = 1.0 / (hi - lo)
        return [(hi - t) * inv for t in ts]
