"""Learn the TTFT model's constants where the router runs: robust online regression per pod group.

Every streamed request a router completes is one observation of the model ``estimated-ttft``
predicts with::

    ttft = base_s
         + lora_s             × [adapter request]          (LoRA surcharge, even on a GPU hit)
         + cliff_s            × [uncached > graph_tokens]  (the step leaves the CUDA graph)
         + cliff_lora_s       × [uncached > graph_tokens] × [adapter request]
         + cpu_load_s         × [adapter in the CPU tier]
         + disk(rank)         × [adapter on disk or remote]
         + fetch_s_per_rank   × rank × [adapter remote]
         + prefill_s_per_token × uncached prompt tokens
         + queue_scale        × queue                       (the scorer's queue term at dispatch)

    disk(rank) = disk_scale × prior_disk(rank) + disk_offset_s

The cliff terms are vLLM's compiled mode (real-vllm-0.25.md, "the 512-token cliff"): a step of at
most ``graph_tokens`` tokens runs in a CUDA graph, a longer one does not, and costs ≈ 30 ms more
— and an adapter ≈ 40 ms more instead of ≈ 4 ms. A linear model without them puts that jump on
whatever correlates with long prompts (a new conversation's first, cold request: the disk tier).
``graph_tokens`` 0 (an eager server) turns them off.

``prior_disk`` is the scorer's configured table (``disk_load_s`` × ``model_scale``), so with no
data (``disk_scale`` 1, ``disk_offset_s`` 0) the learned model *is* the configured one; the data
learns how much slower or faster every load is (``disk_scale``: another disk, GPU or model size
scales the whole table) and a fixed part the table lacks (``disk_offset_s``: e.g. the load API's
own ≈ 32 ms per call, real-vllm-0.25.md). A table off by a factor is then learned exactly, which an
additive correction affine in rank cannot do (the configured table is not affine: its rank-8 point
is mostly the fixed part of a load).

Estimator: exponentially weighted ridge regression towards the defaults, with Huber weights::

    θ = argmin  Σᵢ λ^(n−i) wᵢ (yᵢ − xᵢ·θ)²  +  ρ Σⱼ (θⱼ − θ0ⱼ)²        (standardised features)

    yᵢ = ttftᵢ
    xᵢ = (1, uncached, adapter?, cpu?, disk? × prior_disk(rank), disk?,
          remote? × rank, queue, cliff?, cliff? × adapter?) / scale
    θ0 = the defaults (disk_scale 1, disk_offset_s 0, queue_scale 1)
    λ  = 0.5 ** (1 / half_life)             (observations; 1000 by default)
    ρ  = prior_obs                          (pseudo-observations on each standardised feature)
    wᵢ = min(1, k σ_c / |rᵢ|)               (Huber, k = 2; rᵢ the residual under the current θ,
                                             σ_c a running residual scale per tier class
                                             c ∈ {GPU or base, CPU, disk, remote})

The sufficient statistics ``A = Σ λ^(n−i) wᵢ xᵢxᵢᵀ`` and ``b = Σ λ^(n−i) wᵢ xᵢyᵢ`` are updated in
O(d²) per observation and ``(A + ρI) θ = b + ρ θ0`` is solved every ``refit_every`` observations.
The ridge term is what makes it safe online: a direction the data has not excited (no CPU-tier
request seen lately) decays back to its default instead of drifting (no RLS wind-up), and thin
data stays near the defaults. Each learned constant is clamped to a sane range (``BOUNDS``);
pinned constants keep their configured value and the rest is solved around them.

Pod group: pods that serve the same bases with the same LoRA shape (``group_key``); each group
learns its own constants (a cluster of two GPU types learns two models).

Observations the model cannot explain are not fed to it: failed or non-streamed requests,
adapters that were incoming/loading (their wait depends on a load already under way), and
requests deferred behind saturated slots.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

# tier classes of an observation
C_GPU, C_CPU, C_DISK, C_REMOTE = range(4)
CLASS_NAMES = ("gpu", "cpu", "disk", "remote")

# coefficient order (the standardised regression's columns)
NAMES = (
    "base_s", "prefill_s_per_token", "lora_s", "cpu_load_s",
    "disk_scale", "disk_offset_s", "fetch_s_per_rank", "queue_scale", "cliff_s", "cliff_lora_s",
)
D = len(NAMES)
#: the form of the features above; replicas pool statistics (scorer.sharing) only of the same form,
#: so a rolling upgrade that changes the features never sums two meanings (2: disk_scale/offset)
FEATURES_FORM = 2
# typical magnitude of each feature: standardises the columns so one ridge strength fits all
_SCALE = np.array([1.0, 1000.0, 1.0, 1.0, 0.1, 1.0, 32.0, 0.1, 1.0, 1.0])
MIN_DISK_S = 0.001  # a learned disk load never goes below this (nor below cpu_load_s)
MAX_DISK_S = 60.0
# sane ranges of the learned constants (seconds, seconds per token / per rank, or a factor)
BOUNDS: dict[str, tuple[float, float]] = {
    "base_s": (0.0, 2.0),
    "prefill_s_per_token": (1e-7, 1e-3),
    "lora_s": (0.0, 1.0),
    "cpu_load_s": (0.0, 1.0),
    "disk_scale": (0.05, 20.0),
    "disk_offset_s": (-1.0, 5.0),
    "fetch_s_per_rank": (0.0, 0.1),
    "queue_scale": (0.25, 4.0),
    "cliff_s": (0.0, 1.0),
    "cliff_lora_s": (0.0, 1.0),
}
HUBER_K = 2.0
MAX_GROUPS = 64
RECENT = 64  # observations kept per group for the admin API


def group_key(bases: Iterable[str], max_loras: int, max_cpu_loras: int, max_lora_rank: int) -> str:
    """The pod group: same served bases and LoRA shape → same learned constants."""
    return f"{'+'.join(sorted(bases)) or '-'}|loras={max_loras}|cpu={max_cpu_loras}|rank={max_lora_rank}"


def interpolate_load(table: Mapping[int, float], rank: int) -> float:
    """Piecewise-linear in rank; flat below the smallest rank, proportional above the largest."""
    ranks = sorted(table)
    if rank <= ranks[0]:
        return table[ranks[0]]
    if rank >= ranks[-1]:
        return table[ranks[-1]] * rank / ranks[-1]
    for lo, hi in zip(ranks, ranks[1:]):
        if lo <= rank <= hi:
            f = (rank - lo) / (hi - lo)
            return table[lo] + f * (table[hi] - table[lo])
    return table[ranks[-1]]  # unreachable


@dataclass(frozen=True, slots=True)
class CostPrior:
    """The configured constants: the starting point and the fallback of the fit."""

    base_s: float
    prefill_s_per_token: float
    lora_s: float
    cpu_load_s: float
    fetch_s_per_rank: float
    disk_table: tuple[tuple[int, float], ...]  # (rank, seconds), before model_scale
    model_scale: float = 1.0
    cliff_s: float = 0.0
    cliff_lora_s: float = 0.0
    graph_tokens: int = 0  # 0: no cliff (an eager server)

    def disk_s(self, rank: int) -> float:
        """The configured disk-tier seconds for ``rank`` (table interpolated × model_scale)."""
        return self.model_scale * interpolate_load(dict(self.disk_table), rank)

    def theta0(self) -> np.ndarray:
        return np.array([
            self.base_s, self.prefill_s_per_token, self.lora_s, self.cpu_load_s,
            1.0, 0.0, self.fetch_s_per_rank, 1.0, self.cliff_s, self.cliff_lora_s,
        ])


@dataclass(frozen=True, slots=True)
class LearnSettings:
    """How the fit learns (the ``learn_*`` and ``pin`` parameters of ``estimated-ttft``)."""

    enabled: bool = True
    half_life: float = 1000.0   # observations until an observation's weight halves
    prior_obs: float = 1.0      # ridge strength, in pseudo-observations per feature
    refit_every: int = 10       # observations between solves
    pin: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Observation:
    """One completed, streamed request as the router saw it (seconds, tokens)."""

    ttft_s: float
    uncached_tokens: float
    adapter: bool
    tier: int       # C_GPU (base or GPU hit), C_CPU, C_DISK or C_REMOTE
    rank: int
    queue_s: float


@dataclass(slots=True)
class Ticket:
    """What the scorer saw when a request was dispatched to a pod: the features of the
    observation its completion will be (``Pipeline.on_complete``). ``tier`` is a tier class, or None
    when the request's wait depends on something the model does not see (a load already under
    way, a slot to free first): such a completion teaches nothing."""

    group: str
    tier: int | None
    adapter: bool
    rank: int
    queue_s: float
    uncached_tokens: float = 0.0

    def observation(self, ttft_s: float) -> Observation | None:
        if self.tier is None:
            return None
        return Observation(ttft_s, self.uncached_tokens, self.adapter, self.tier, self.rank, self.queue_s)


@dataclass(frozen=True, slots=True)
class CostConstants:
    """The constants in force for one pod group (learned, clamped, pins applied)."""

    base_s: float
    prefill_s_per_token: float
    lora_s: float
    cpu_load_s: float
    disk_scale: float
    disk_offset_s: float
    fetch_s_per_rank: float
    queue_scale: float
    cliff_s: float
    cliff_lora_s: float
    prior: CostPrior = field(repr=False, compare=False)
    version: int = 0

    def disk_s(self, rank: int) -> float:
        """Disk-tier seconds for ``rank``: the configured table, scaled, plus the learned fixed part."""
        t = self.disk_scale * self.prior.disk_s(rank) + self.disk_offset_s
        return min(MAX_DISK_S, max(MIN_DISK_S, self.cpu_load_s, t))

    def as_dict(self, ranks: Iterable[int] = (8, 16, 32, 64)) -> dict[str, object]:
        return {
            **{n: getattr(self, n) for n in NAMES},
            "disk_s_by_rank": {str(r): round(self.disk_s(int(r)), 6) for r in ranks},
            "version": self.version,
        }

    @classmethod
    def from_theta(cls, theta: np.ndarray, prior: CostPrior, version: int) -> CostConstants:
        vals = {n: float(v) for n, v in zip(NAMES, theta)}
        return cls(**vals, prior=prior, version=version)  # type: ignore[arg-type]


def _clamp(theta: np.ndarray) -> np.ndarray:
    out = theta.copy()
    for j, n in enumerate(NAMES):
        lo, hi = BOUNDS[n]
        v = out[j]
        out[j] = lo if not math.isfinite(v) or v < lo else (hi if v > hi else v)
    return out


class CostFit:
    """The online fit of one pod group (see the module docstring)."""

    def __init__(self, prior: CostPrior, settings: LearnSettings) -> None:
        self.prior = prior
        self.settings = settings
        self._lam = 0.5 ** (1.0 / settings.half_life) if settings.half_life > 0 else 1.0
        self._theta0 = prior.theta0()
        unused = {"cliff_s", "cliff_lora_s"} if not prior.graph_tokens else set()
        self._pinned = np.array([n in settings.pin or n in unused for n in NAMES])
        self._A = np.zeros((D, D))
        self._b = np.zeros(D)
        # the other gateway replicas' statistics of this group, summed (scorer.sharing); the fit
        # solves the pooled system, so every replica learns from every replica's observations
        self._peer_A = np.zeros((D, D))
        self._peer_b = np.zeros(D)
        self._theta = self._theta0.copy()
        self._sigma = [0.05, 0.05, 0.1, 0.1]   # running residual scale per tier class, seconds
        self.counts = [0.0] * 4                # decayed observation count per tier class
        self.observed = 0
        self.rejected = 0
        # the latest observations with the prediction they met (the evidence /admin/model shows)
        self.recent: deque[tuple[Observation, float]] = deque(maxlen=RECENT)
        self._version = 0
        self.constants = CostConstants.from_theta(self._theta, prior, 0)

    def _features(self, obs: Observation) -> np.ndarray:
        disk = 1.0 if obs.tier in (C_DISK, C_REMOTE) else 0.0
        remote = 1.0 if obs.tier == C_REMOTE else 0.0
        adapter = 1.0 if obs.adapter else 0.0
        g = self.prior.graph_tokens
        cliff = 1.0 if g and obs.uncached_tokens > g else 0.0
        return np.array([
            1.0, obs.uncached_tokens, adapter, 1.0 if obs.tier == C_CPU else 0.0,
            disk * self.prior.disk_s(obs.rank), disk,
            remote * obs.rank, obs.queue_s, cliff, cliff * adapter,
        ])

    def predict(self, obs: Observation) -> float:
        """The current model's TTFT for the observation's features."""
        return float(self._features(obs) @ self._theta)

    def observe(self, obs: Observation) -> bool:
        """Add one observation; False when it was refused as unusable (non-finite, negative)."""
        vals = (obs.ttft_s, obs.uncached_tokens, obs.queue_s)
        if not all(math.isfinite(v) for v in vals) or obs.ttft_s < 0 or obs.uncached_tokens < 0 or obs.queue_s < 0:
            self.rejected += 1
            return False
        x = self._features(obs)
        y = obs.ttft_s
        r = y - float(x @ self._theta)
        self.recent.append((obs, obs.ttft_s - r))
        c = obs.tier
        sigma = self._sigma[c]
        w = 1.0 if abs(r) <= HUBER_K * sigma else HUBER_K * sigma / abs(r)
        # robust running scale: mean absolute residual (clipped at 3σ) × 1.25 ≈ σ for a normal
        self._sigma[c] = max(1e-4, sigma + 0.05 * (1.25 * min(abs(r), 3.0 * sigma + 1e-3) - sigma))
        xs = x / _SCALE
        lam = self._lam
        self._A *= lam
        self._b *= lam
        self._A += w * np.outer(xs, xs)
        self._b += (w * y) * xs
        for k in range(4):
            self.counts[k] *= lam
        self.counts[c] += 1.0
        self.observed += 1
        if self.observed % self.settings.refit_every == 0:
            self.refit()
        return True

    def refit(self) -> CostConstants:
        """Solve the ridge system now and publish the clamped constants."""
        rho = self.settings.prior_obs
        t0s = self._theta0 * _SCALE  # defaults in standardised units
        free = ~self._pinned
        ts = t0s.copy()
        if free.any():
            AA = self._A + self._peer_A
            A = AA[np.ix_(free, free)] + rho * np.eye(int(free.sum()))
            rhs = (self._b + self._peer_b)[free] + rho * t0s[free]
            if self._pinned.any():
                rhs -= AA[np.ix_(free, self._pinned)] @ t0s[self._pinned]
            try:
                ts[free] = np.linalg.solve(A, rhs)
            except np.linalg.LinAlgError:
                return self.constants
        theta = _clamp(ts / _SCALE)
        theta[self._pinned] = self._theta0[self._pinned]
        self._theta = theta
        self._version += 1
        self.constants = CostConstants.from_theta(theta, self.prior, self._version)
        return self.constants

    def own_stats(self) -> tuple[np.ndarray, np.ndarray, float]:
        """This fit's own sufficient statistics (A, b) and its decayed observation count: what a
        replica publishes to the others (copies)."""
        return self._A.copy(), self._b.copy(), float(sum(self.counts))

    @property
    def has_peer_stats(self) -> bool:
        return bool(self._peer_A.any())

    def set_peer_stats(self, A: np.ndarray, b: np.ndarray) -> None:
        """Install the peers' summed statistics and refit (zeros: learn alone again)."""
        if A.shape != (D, D) or b.shape != (D,) or not (np.isfinite(A).all() and np.isfinite(b).all()):
            return
        self._peer_A = A
        self._peer_b = b
        self.refit()

    def snapshot(self) -> dict[str, object]:
        """The learned constants with the evidence behind them (admin API, metrics)."""
        return {
            "constants": self.constants.as_dict(),
            "defaults": CostConstants.from_theta(self._theta0, self.prior, 0).as_dict(),
            "pinned": sorted(self.settings.pin),
            "observations": self.observed,
            "peer_weight": round(float(self._peer_A[0, 0]), 1),  # the peers' decayed, weighted count
            "rejected": self.rejected,
            "recent_by_tier": {CLASS_NAMES[k]: round(v, 1) for k, v in enumerate(self.counts)},
            "residual_scale_s": {CLASS_NAMES[k]: round(v, 6) for k, v in enumerate(self._sigma)},
            "recent": [
                {"ttft_s": round(o.ttft_s, 6), "predicted_s": round(p, 6), "tier": CLASS_NAMES[o.tier],
                 "rank": o.rank, "uncached_tokens": round(o.uncached_tokens, 1), "queue_s": round(o.queue_s, 6),
                 "adapter": o.adapter}
                for o, p in self.recent
            ],
        }


class CostLearner:
    """One ``CostFit`` per pod group; the pipeline owns it and feeds it from ``on_complete``."""

    def __init__(self, prior: CostPrior, settings: LearnSettings) -> None:
        self.prior = prior
        self.settings = settings
        self._defaults = CostConstants.from_theta(prior.theta0(), prior, 0)
        self.fits: OrderedDict[str, CostFit] = OrderedDict()

    def constants(self, group: str) -> CostConstants:
        """The constants in force for ``group`` (the defaults until it has learned)."""
        fit = self.fits.get(group)
        return fit.constants if fit is not None else self._defaults

    def observe(self, group: str, obs: Observation) -> None:
        if not self.settings.enabled:
            return
        self.fit_for(group).observe(obs)

    def fit_for(self, group: str) -> CostFit:
        """The fit of ``group``, created (at the defaults) when it has none yet."""
        fit = self.fits.get(group)
        if fit is None:
            fit = self.fits[group] = CostFit(self.prior, self.settings)
            while len(self.fits) > MAX_GROUPS:
                self.fits.popitem(last=False)
        return fit

    def reconfigure(self, prior: CostPrior, settings: LearnSettings) -> CostLearner:
        """The learner for a reloaded config: keeps what was learned when the prior and settings
        did not change, starts over otherwise (the old data was fitted against other defaults)."""
        if prior == self.prior and settings == self.settings:
            return self
        return CostLearner(prior, settings)

    def snapshot(self) -> dict[str, object]:
        return {
            "enabled": self.settings.enabled,
            "half_life": self.settings.half_life,
            "prior_obs": self.settings.prior_obs,
            "groups": {g: f.snapshot() for g, f in self.fits.items()},
            "defaults": self._defaults.as_dict(),
        }
