"""Scorer ``estimated-ttft``: predict each candidate's time to first token; sooner is better.

Prediction for pod p, in seconds (all terms ≥ 0):

  t(p) = base_s
       + queue_scale × queue(p)
       + adapter(p)
       + lora_s                  (an adapter request: LoRA kernels cost more even on a GPU hit)
       + uncached(p) × prefill_s_per_token
       + cliff_s + cliff_lora_s × [adapter request]     when uncached(p) > graph_tokens
  uncached(p) = prompt_tokens × (1 − matched(p) / blocks)
      (compiled vLLM runs a step of at most ``graph_tokens`` tokens in a CUDA graph; a longer
      prefill leaves it and pays ≈ 30 ms more, an adapter ≈ 40 ms more: the "512-token cliff";
      graph_tokens 0 for an eager server)

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
  matched(p) / blocks: the prefix index's consecutive leading block match (0 with no blocks),
      or, where the pick has a precise KV match and p's event stream is live (the pipeline's
      ``precise-prefix`` judges it: ``scorer.kv_match``, the same rules as that scorer's), the
      tokens p really holds: matched(p) / blocks = min(1, M(p) × block_size(p) / prompt_tokens),
      M(p) the prompt's leading vLLM blocks in p's KV cache (its own events). A pod that
      evicted the prefix is then priced at the full prefill the approximate index would miss.

Learned constants (``learn: true``, the default). The parameters below are the *defaults*: each
router learns base_s, prefill_s_per_token, lora_s, cpu_load_s, disk_load (an affine correction of
the configured curve), fetch_s_per_rank and queue_scale (1 by default) from the TTFTs it observes,
per pod group (pods serving the same bases with the same LoRA shape), with the robust online
estimator of ``scorer.costmodel`` (exponentially weighted ridge regression towards these defaults,
Huber-weighted, clamped to sane ranges; thin data stays at the defaults). ``pin`` keeps any of
them at its configured value. The learning state lives with the pipeline (``LocalState.costs``),
fed by ``Pipeline.on_complete`` with each streamed request's time from dispatch to first byte and
what this scorer saw at dispatch (``ticket``); the scorer itself only reads it.

Score (normalize: absolute, the default): score = scale_s / (scale_s + t) = 1 − t / (t + scale_s).
It is monotone in t, independent of the other candidates (the same prediction always earns the
same score, so weights mean the same thing in every decision) and reads back as seconds:
t = scale_s / score − scale_s. With scale_s = 0.5: t = 0 → 1.0, 9 ms → 0.98, 0.27 s → 0.65,
1 s → 0.33. ``normalize: minmax`` gives (t_max − t) / (t_max − t_min) over the candidates (1.0
when all equal) instead; it stretches a 1 ms difference to the full [0, 1] range, so it is only
sensible as the sole scorer.

Calibrated defaults (an 8B model on one H200, vLLM 0.25.1 compiled: real-vllm-0.25.md, and the
simulator's ``8b`` profile fitted to it, ``vllm_sim.costs.CostProfile.truth()``):
  base_s 0.018, prefill_s_per_token 0.0000038, lora_s 0.0038, cliff_s 0.032, cliff_lora_s 0.035
      — the least-squares fit of this form to the 22 compiled TTFTs measured from 64 to 2,052
      prompt tokens, base and an r16 adapter (real-vllm-0.25.md, "prefill" and "the 512-token
      cliff"): a lone prefill costs little per token below 2k; leaving the graph is what costs
  graph_tokens 512 — vLLM's largest CUDA-graph capture size (compiled mode's default)
  drain_s_per_token 0.00003 — how fast a busy pod works off queued prefill (the pending queue):
      the compute-bound slope of large prefills (≈ 0.03 ms/token from 2k tokens: the simulator's
      8b profile, h100-calibration.md), not the lone request's marginal cost above
  per_running_s 0.0001 — decode step floor grows ≈ 0.045 ms per sequence (h100-calibration.md,
      batch 1 → 128: 5.4 → 11 ms; not measured on the H200); a first token spans ~2 steps
  per_waiting_s 0.09 — one queued ~1k-token adapter prefill ahead (≈ 0.018 + 0.004 + 0.032 +
      0.004 + 0.035 s in the form above)
  cpu_load_s 0.010 — CPU tier over a GPU hit, measured +5…+18 ms (≈ 10 ms)
  disk_load_s {8: 0.042, 16: 0.099, 32: 0.192, 64: 0.282} — disk tier over a GPU hit, measured
      (compiled; ≈ 31 ms + 3.9 ms × rank), model_scale 1.0 (measured on the 8B shape itself)
  fetch_s_per_rank 0.0042 — ≈ 5.25 MB per rank (336 MB at rank 64) at 10 Gb/s
      (h100-calibration.md: "336 MB at 10 Gb/s ≈ 0.27 s")
  incoming_s 0 — the load this router started is priced in pending(p) (its remaining stall)
  loading_s 0.021 — a load the sidecar started, half of the smallest disk load
  deferred_wait_s 1.0 — time for one running adapter's requests to drain (workload dependent)
  default_rank 16, scale_s 0.5
  learn true, learn_half_life 1000 observations, learn_prior_obs 1, pin [] (scorer.costmodel)

Parameters: base_s, prefill_s_per_token, lora_s, graph_tokens, cliff_s, cliff_lora_s,
drain_s_per_token, per_running_s, per_waiting_s, cpu_load_s,
disk_load_s (mapping rank → seconds), model_scale, fetch_s_per_rank, incoming_s, loading_s,
deferred_wait_s, default_rank, scale_s, normalize ("absolute" | "minmax"), learn, learn_half_life,
learn_prior_obs, pin (names among ``scorer.costmodel.NAMES``: base_s, prefill_s_per_token,
lora_s, cpu_load_s, disk_scale, disk_offset_s, fetch_s_per_rank, queue_scale, cliff_s,
cliff_lora_s; ``disk`` pins both disk terms). The pipeline also uses this scorer's
``prefill_s_per_token`` to drain the pending-prefill queue it keeps per pod.

YAML:
  scorers:
    - type: estimated-ttft
      weight: 3
      parameters:
        scale_s: 0.5
        disk_load_s: {8: 0.042, 16: 0.099, 32: 0.192, 64: 0.282}
        learn: true
        pin: [lora_s]          # keep the LoRA surcharge at its configured value
"""

from __future__ import annotations

from typing import Any

from scorer.costmodel import (
    C_CPU, C_DISK, C_GPU, C_REMOTE, NAMES, CostConstants, CostLearner, CostPrior, LearnSettings, Ticket,
    interpolate_load,
)
from scorer.model import RoutingRequest
from scorer.params import Param
from scorer.plugin import Scorer
from scorer.registry import register
from scorer.context import PickContext
from scorer.view import (
    N_CODES, S_SATURATED, T_BASE, T_CPU, T_DISK, T_GPU, T_INCOMING, T_LOADING, T_REMOTE, PodView,
)

__all__ = ["DEFAULT_DISK_LOAD_S", "EstimatedTTFT", "Ticket", "interpolate_load"]

DEFAULT_DISK_LOAD_S: dict[int, float] = {8: 0.042, 16: 0.099, 32: 0.192, 64: 0.282}
DEFAULT_PREFILL_S_PER_TOKEN = 0.0000038
DEFAULT_DRAIN_S_PER_TOKEN = 0.00003
# Placements where the adapter still needs a slot and every slot holds a running adapter.
_NO_MATCH: dict[str, int] = {}
_DEFERRED_CODES = frozenset(t * 3 + S_SATURATED for t in (T_CPU, T_DISK, T_REMOTE))
# The tier class an observation teaches (None: the wait depends on something the model does
# not see — a load already under way, or a slot to free first).
_CLASS: dict[int, int | None] = {T_BASE: C_GPU, T_GPU: C_GPU, T_INCOMING: None, T_LOADING: None,
                                 T_CPU: C_CPU, T_DISK: C_DISK, T_REMOTE: C_REMOTE}


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


def _pins(value: Any) -> list[str]:
    """The pinned constants' names, ``disk`` expanded to both disk terms (sorted)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of constant names, got {value!r}")
    out: set[str] = set()
    for name in value:
        if name == "disk":
            out |= {"disk_scale", "disk_offset_s"}
        elif name in NAMES:
            out.add(name)
        else:
            raise ValueError(f"unknown constant {name!r}; known: disk, {', '.join(NAMES)}")
    return sorted(out)


@register
class EstimatedTTFT(Scorer):
    TYPE = "estimated-ttft"
    BOUNDED = True
    PARAMS = {
        "base_s": Param(0.018, float, min=0.0, doc="fixed scheduling + first step, seconds"),
        "prefill_s_per_token": Param(DEFAULT_PREFILL_S_PER_TOKEN, float, min=1e-9, doc="uncached prefill cost"),
        "lora_s": Param(0.0038, float, min=0.0, doc="extra TTFT of an adapter request, even on a GPU hit"),
        "graph_tokens": Param(512, int, min=0, doc="largest step in a CUDA graph (0: eager, no cliff)"),
        "cliff_s": Param(0.032, float, min=0.0, doc="extra TTFT of a prefill above graph_tokens"),
        "cliff_lora_s": Param(0.035, float, min=0.0, doc="extra LoRA cost above graph_tokens"),
        "drain_s_per_token": Param(DEFAULT_DRAIN_S_PER_TOKEN, float, min=1e-9,
                                   doc="how fast a busy pod works off queued prefill"),
        "per_running_s": Param(0.0001, float, min=0.0, doc="added TTFT per request in flight on the pod"),
        "per_waiting_s": Param(0.09, float, min=0.0, doc="added TTFT per request waiting on the pod"),
        "cpu_load_s": Param(0.010, float, min=0.0, doc="CPU → GPU adapter activation"),
        "disk_load_s": Param(dict(DEFAULT_DISK_LOAD_S), dict, check=_rank_table, doc="rank → disk load seconds"),
        "model_scale": Param(1.0, float, min=0.0, doc="multiplier on disk_load_s for the base model size"),
        "fetch_s_per_rank": Param(0.0042, float, min=0.0, doc="object-store fetch seconds per unit of rank"),
        "incoming_s": Param(0.0, float, min=0.0, doc="adapter this router just sent there"),
        "loading_s": Param(0.021, float, min=0.0, doc="adapter the sidecar is loading"),
        "deferred_wait_s": Param(1.0, float, min=0.0, doc="wait for a slot when all hold running adapters"),
        "default_rank": Param(16, int, min=1, doc="rank assumed when unknown"),
        "scale_s": Param(0.5, float, min=1e-6, doc="seconds at which the score is 0.5"),
        "normalize": Param("absolute", str, choices=("absolute", "minmax"), doc="score transform"),
        "learn": Param(True, bool, doc="learn the constants from observed TTFTs (scorer.costmodel)"),
        "learn_half_life": Param(1000.0, float, min=1.0, doc="observations until one's weight halves"),
        "learn_prior_obs": Param(1.0, float, min=0.0, doc="strength of the defaults, in observations"),
        "pin": Param([], list, check=_pins, doc="constants kept at their configured value"),
    }

    def setup(self) -> None:
        p = self.params
        self.per_running: float = p["per_running_s"]
        self.per_waiting: float = p["per_waiting_s"]
        self.scale: float = p["scale_s"]
        self.minmax = p["normalize"] == "minmax"
        self.prior = CostPrior(
            base_s=p["base_s"], prefill_s_per_token=p["prefill_s_per_token"], lora_s=p["lora_s"],
            cpu_load_s=p["cpu_load_s"], fetch_s_per_rank=p["fetch_s_per_rank"],
            disk_table=tuple(p["disk_load_s"].items()), model_scale=p["model_scale"],
            cliff_s=p["cliff_s"], cliff_lora_s=p["cliff_lora_s"], graph_tokens=p["graph_tokens"],
        )
        self.graph_tokens: int = p["graph_tokens"]
        self.settings = LearnSettings(
            enabled=p["learn"], half_life=p["learn_half_life"], prior_obs=p["learn_prior_obs"],
            pin=frozenset(p["pin"]),
        )
        self.defaults = CostLearner(self.prior, self.settings).constants("")
        # (constants object, rank) -> adapter cost per placement code; constants are immutable,
        # and a refit makes a new object, so identity is a safe key (the object is held too)
        self._tables: dict[tuple[int, int], tuple[CostConstants, list[float]]] = {}

    # --- capabilities the pipeline resolves (scorer.plugin) --------------------------------------
    @property
    def prefill_s_per_token(self) -> float:
        """The pipeline drains each pod's pending prefill at this rate (``KnowsPrefillRate``):
        ``drain_s_per_token``, a busy pod's throughput, not a lone request's marginal cost."""
        return self.params["drain_s_per_token"]

    def cost_learner(self, old: CostLearner | None) -> CostLearner:
        """The learner for this scorer's defaults and settings (``LearnsCosts``): ``old`` when it
        learned against the same ones (a config reload keeps what was learned), else a new one."""
        return old.reconfigure(self.prior, self.settings) if old is not None else CostLearner(self.prior, self.settings)

    def constants(self, view: PodView, ctx: PickContext) -> CostConstants:
        costs = ctx.costs
        return costs.constants(view.group) if costs is not None else self.defaults

    # --- the model -------------------------------------------------------------------------------
    def disk_load_s(self, rank: int) -> float:
        return self.prior.disk_s(rank)

    def adapter_table(self, rank: int | None, c: CostConstants | None = None) -> list[float]:
        """Seconds of adapter cost for each placement code, for one rank under constants ``c``
        (the defaults when None); memoised."""
        c = c if c is not None else self.defaults
        r = rank if rank is not None else self.params["default_rank"]
        key = (id(c), r)
        hit = self._tables.get(key)
        if hit is not None and hit[0] is c:
            return hit[1]
        p = self.params
        disk = c.disk_s(r)
        remote = disk + c.fetch_s_per_rank * r
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
                s = c.cpu_load_s
            elif tier == T_DISK:
                s = disk
            else:
                s = remote
            if code in _DEFERRED_CODES:
                s += p["deferred_wait_s"]  # × (1 + num_deferred / max_loras): the rest in predict
            t[code] = s
        if len(self._tables) > 512:
            self._tables.clear()
        self._tables[key] = (c, t)
        return t

    def load_stall_s(self, rank: int | None, code: int, c: CostConstants | None = None) -> float:
        """Seconds a request with this placement stalls its pod's engine by loading the adapter.

        The tier's load cost without the deferral wait (a deferred request waits alone, it does
        not stall the batch); 0 on GPU, for the base, and for a load already under way
        (incoming or loading), which was counted when it started.
        """
        tier = code // 3
        if tier in (T_BASE, T_GPU, T_INCOMING, T_LOADING):
            return 0.0
        t = self.adapter_table(rank, c)[code]
        return t - self.params["deferred_wait_s"] if code in _DEFERRED_CODES else t

    def queue_s(self, view: PodView, now: float) -> float:
        """queue(p) of the module docstring, before ``queue_scale``."""
        loc = view.local
        q = loc.pending_until - now
        w = view.num_waiting * self.per_waiting
        n = view.load
        i = loc.inflight
        return (q if q > w else w) + (i if i > n else n) * self.per_running

    def ticket(self, view: PodView, request: RoutingRequest, code: int, rank: int | None, now: float) -> Ticket:
        """The features of the observation a dispatch of ``request`` to ``view`` will make (the
        uncached tokens are filled in by the pipeline once the prefix index has matched)."""
        tier = _CLASS[code // 3]
        if code in _DEFERRED_CODES:
            tier = None  # every GPU slot is busy: the request waits for one, which the features do not see
        r = rank if rank is not None else self.params["default_rank"]
        return Ticket(view.group, tier, request.adapter.name is not None, r, max(0.0, self.queue_s(view, now)))

    def predict(self, views: list[PodView], ctx: PickContext) -> list[float]:
        """Predicted TTFT in seconds for each view (see the module docstring)."""
        k = self.scale
        return [k / s - k for s in self._transformed(views, ctx)]

    def _transformed(self, views: list[PodView], ctx: PickContext) -> list[float]:
        """k / (k + t) for each view's prediction t, with k = scale_s: the absolute score.

        The transform is applied inside the one loop (no second pass); ``predict`` inverts it
        (t = k / score − k, exact to ~1e-16 s). The constants come from the pod's group (learned,
        or the defaults); consecutive views of one group share one set of derived terms.
        """
        req = ctx.request
        now = ctx.now
        codes = ctx.codes(views)
        rank = ctx.adapter_rank(views) if ctx.adapter is not None else None
        costs = ctx.costs
        per_running = self.per_running
        per_waiting = self.per_waiting
        tokens = max(0, req.prompt_tokens)
        hashes = req.prefix_hashes
        km = ctx.kv_match(views)
        precise = km.cached_tokens.get if km is not None and km.cached_tokens else None
        match = ctx.prefix_match() if hashes and (km is None or not km.all_live) else None
        frac_per_block = 1.0 / len(hashes) if hashes else 0.0
        frac_per_token = 1.0 / tokens if tokens else 0.0
        k = self.scale
        lora = ctx.adapter is not None
        defer = self.params["deferred_wait_s"]
        out: list[float] = []
        app = out.append
        get = match.get if match else _NO_MATCH.get  # pod id -> leading blocks cached there
        graph = self.graph_tokens
        # a prompt whose uncached part stays within the graph on every pod never pays the cliff
        cliff_possible = graph > 0 and tokens > graph
        c_last: CostConstants | None = None
        group_last = None
        table: list[float] = []
        base = full = qs = pst = cliff = 0.0
        for v, code in zip(views, codes):
            if v.group is not group_last:
                group_last = v.group
                c = costs.constants(v.group) if costs is not None else self.defaults
                if c is not c_last:
                    c_last = c
                    table = self.adapter_table(rank, c)
                    pst = c.prefill_s_per_token
                    full = tokens * pst
                    base = k + c.base_s + full + (c.lora_s if lora else 0.0)  # k folded in: k + t
                    qs = c.queue_scale
                    cliff = c.cliff_s + (c.cliff_lora_s if lora else 0.0)
            loc = v.local
            q = loc.pending_until - now
            w = v.num_waiting * per_waiting
            n = v.load
            i = loc.inflight
            kt = base + ((q if q > w else w) + (i if i > n else n) * per_running) * qs + table[code]
            if v.num_deferred and code in _DEFERRED_CODES:
                kt += defer * (v.defer_factor - 1.0)
            held = precise(v.pod_id) if precise is not None else None
            if held is not None:  # a live event stream: what the pod really holds
                cached = held * frac_per_token
                if cached > 1.0:
                    cached = 1.0
            else:
                m = get(v.pod_id)
                cached = m * frac_per_block if m else 0.0
            if cached:
                kt -= cached * full
                if cliff_possible and tokens * (1.0 - cached) > graph:
                    kt += cliff
            elif cliff_possible:
                kt += cliff
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
