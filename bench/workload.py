"""Workload specs (YAML, seeded) expanded into replayable JSONL traces.

A spec describes a multi-LoRA workload; ``generate(spec, rate)`` turns it into a list of
``TraceRequest`` (arrival time, adapter, chat messages, ``max_tokens``), identical for a given
spec and seed. Request *content* is drawn from streams independent of the arrival rate, so the
30 %, 60 % and 90 % points of one spec replay the very same requests, only closer together.

Spec keys (every key optional except where noted; unknown keys are errors that name themselves)::

    name: reference                # label in results
    seed: 1
    cluster:                       # how the runner builds the simulated cluster
      pods: 8
      profile: 8b                  # simulator cost profile: 8b (compiled vLLM on an H200) or 8b-eager
      cost: {}                     # constants of the profile to override, e.g. {load_scale: 3}
      base_model: meta-llama/Llama-3.1-8B-Instruct
      max_loras: 4
      max_cpu_loras: 12
      max_lora_rank: 64
      sim_args: []                 # extra flags passed to `loraroute sim cluster`
    adapters:
      count: 64
      ranks: [8, 16, 32, 64]       # adapter i has rank ranks[i % len(ranks)]
      name_format: "ad{index:03d}" # names as vLLM knows them
    popularity:
      kind: zipf                   # zipf | power | uniform
      exponent: 1.0                # zipf: P(i) ∝ 1/(i+1)^exponent, i = 0..n-1
      alpha: 0.3                   # power (S-LoRA): i = floor(n·X), X ~ power(alpha) (1 = uniform)
    prefix:
      system_prompts_per_adapter: 2  # each adapter (or tenant) owns this many system prompts
      system_prompt_tokens: 800
      followup_fraction: 0.5       # share of requests that continue an open conversation
      followup_window: 32          # a follow-up continues one of the 32 most recently active conversations
      max_turns: 6                 # a conversation closes after this many user turns
    lengths:
      user_tokens: {dist: uniform, min: 50, max: 400}
      output_tokens: {dist: uniform, min: 32, max: 256}
    arrivals:
      kind: poisson                # poisson | gamma (gamma: gap ~ Gamma(k=1/cv², θ=1/(rate·k)))
      cv: 1.0
      bursts: []                   # [{start_s, duration_s, factor}] rate × factor inside the window
    loads: [0.3, 0.6, 0.9]         # fractions of the measured capacity (runner)
    requests: 2000                 # requests per load point (or duration_s: arrivals until then)

Length distributions: ``{dist: uniform, min, max}`` (integers, inclusive), ``{dist: fixed, value}``,
``{dist: lognormal, mean, sigma, min, max}`` (mean of the underlying normal is ln(mean) − σ²/2 so
the sample mean ≈ ``mean``, then clipped).

Text: deterministic pseudo-words of exactly three lowercase letters followed by a space, i.e. 4 bytes
per word; the simulator's pseudo-tokenizer counts about 4 bytes of UTF-8 as one token, so a part of
``n`` tokens is ``n`` words. Assistant turns in a conversation's history are synthetic text of the
previous turn's ``max_tokens`` length (a real client would send the model's answer instead), so a
follow-up shares the previous prompt (system prompt + earlier turns) as a cacheable prefix.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from vllm_sim.costs import CostProfile, ProfileError, get_profile

BYTES_PER_TOKEN = 4


class SpecError(ValueError):
    """A workload spec that does not validate; the message names the key."""


# --------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LengthDist:
    dist: str = "uniform"
    min: int = 1
    max: int = 1
    value: int = 0
    mean: float = 0.0
    sigma: float = 0.5

    def sample(self, rng: np.random.Generator) -> int:
        if self.dist == "fixed":
            return int(self.value)
        if self.dist == "uniform":
            return int(rng.integers(self.min, self.max + 1))
        mu = math.log(self.mean) - self.sigma**2 / 2
        return int(min(self.max, max(self.min, round(float(rng.lognormal(mu, self.sigma))))))

    @property
    def expected(self) -> float:
        if self.dist == "fixed":
            return float(self.value)
        if self.dist == "uniform":
            return (self.min + self.max) / 2
        return float(self.mean)


@dataclass(frozen=True)
class ClusterSpec:
    pods: int = 8
    profile: str = "8b"
    cost: tuple[tuple[str, float], ...] = ()   # vllm_sim.costs constants overridden (``--cost``)
    base_model: str = "meta-llama/Llama-3.1-8B-Instruct"
    max_loras: int = 4
    max_cpu_loras: int = 12
    max_lora_rank: int = 64
    sim_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class AdapterSpec:
    count: int = 64
    ranks: tuple[int, ...] = (8, 16, 32, 64)
    name_format: str = "ad{index:03d}"

    def name(self, index: int) -> str:
        return self.name_format.format(index=index)

    def rank(self, index: int) -> int:
        return int(self.ranks[index % len(self.ranks)])

    def all(self) -> list[tuple[str, int]]:
        return [(self.name(i), self.rank(i)) for i in range(self.count)]


@dataclass(frozen=True)
class PopularitySpec:
    kind: str = "zipf"
    exponent: float = 1.0
    alpha: float = 1.0

    def probabilities(self, n: int) -> np.ndarray:
        """P(adapter i). zipf: ∝ (i+1)^-exponent; uniform: 1/n; power: P(floor(n·X) = i), X~power(α)."""
        if self.kind == "uniform":
            return np.full(n, 1.0 / n)
        if self.kind == "zipf":
            w = 1.0 / np.arange(1, n + 1) ** self.exponent
            return w / w.sum()
        # power(α): CDF of X is x^α on [0,1]; P(i) = ((i+1)/n)^α − (i/n)^α
        edges = (np.arange(n + 1) / n) ** self.alpha
        return np.diff(edges)


@dataclass(frozen=True)
class PrefixSpec:
    system_prompts_per_adapter: int = 2
    system_prompt_tokens: int = 800
    followup_fraction: float = 0.5
    followup_window: int = 32
    max_turns: int = 6


@dataclass(frozen=True)
class LengthsSpec:
    user_tokens: LengthDist = LengthDist("uniform", 50, 400)
    output_tokens: LengthDist = LengthDist("uniform", 32, 256)


@dataclass(frozen=True)
class Burst:
    start_s: float
    duration_s: float
    factor: float


@dataclass(frozen=True)
class ArrivalSpec:
    kind: str = "poisson"
    cv: float = 1.0
    bursts: tuple[Burst, ...] = ()


@dataclass(frozen=True)
class WorkloadSpec:
    name: str = "workload"
    seed: int = 1
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    adapters: AdapterSpec = field(default_factory=AdapterSpec)
    popularity: PopularitySpec = field(default_factory=PopularitySpec)
    prefix: PrefixSpec = field(default_factory=PrefixSpec)
    lengths: LengthsSpec = field(default_factory=LengthsSpec)
    arrivals: ArrivalSpec = field(default_factory=ArrivalSpec)
    loads: tuple[float, ...] = (0.3, 0.6, 0.9)
    requests: int | None = 2000
    duration_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sim_profile(cluster: ClusterSpec) -> CostProfile:
    """The simulator's cost profile a spec's cluster runs (``cluster.profile`` + ``cluster.cost``)."""
    return get_profile(cluster.profile, dict(cluster.cost))


def sim_profile_args(cluster: ClusterSpec) -> list[str]:
    """``loraroute sim cluster`` flags that select that profile."""
    args = ["--profile", cluster.profile]
    for key, value in cluster.cost:
        args += ["--cost", f"{key}={value!r}"]
    return args


def _check_keys(section: str, data: Any, allowed: Iterable[str]) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError(f"{section}: expected a mapping, got {type(data).__name__}")
    allowed = set(allowed)
    for key in data:
        if key not in allowed:
            raise SpecError(f"{section}.{key}: unknown key (allowed: {', '.join(sorted(allowed))})")
    return data


def _length(section: str, data: Any, default: LengthDist) -> LengthDist:
    d = _check_keys(section, data, ("dist", "min", "max", "value", "mean", "sigma"))
    if not d:
        return default
    dist = d.get("dist", "uniform")
    if dist not in ("uniform", "fixed", "lognormal"):
        raise SpecError(f"{section}.dist: {dist!r} is not one of uniform, fixed, lognormal")
    ld = LengthDist(dist=dist, min=int(d.get("min", 1)), max=int(d.get("max", d.get("min", 1))),
                    value=int(d.get("value", 0)), mean=float(d.get("mean", 0.0)),
                    sigma=float(d.get("sigma", 0.5)))
    if dist == "uniform" and not 0 < ld.min <= ld.max:
        raise SpecError(f"{section}: need 0 < min <= max, got {ld.min}..{ld.max}")
    if dist == "fixed" and ld.value <= 0:
        raise SpecError(f"{section}.value: must be > 0")
    if dist == "lognormal" and (ld.mean <= 0 or ld.sigma <= 0 or ld.max < ld.min):
        raise SpecError(f"{section}: lognormal needs mean > 0, sigma > 0, min <= max")
    return ld


def _fraction(section: str, value: Any, lo: float = 0.0, hi: float = 1.0) -> float:
    v = float(value)
    if not lo <= v <= hi:
        raise SpecError(f"{section}: {v} is outside [{lo}, {hi}]")
    return v


def parse_spec(data: dict[str, Any]) -> WorkloadSpec:
    """Validate a spec mapping strictly and return a ``WorkloadSpec``."""
    top = _check_keys("spec", data, (
        "name", "seed", "cluster", "adapters", "popularity", "prefix", "lengths", "arrivals",
        "loads", "requests", "duration_s",
    ))
    c = _check_keys("cluster", top.get("cluster"), (
        "pods", "profile", "cost", "base_model", "max_loras", "max_cpu_loras", "max_lora_rank", "sim_args"))
    cost = c.get("cost") or {}
    if not isinstance(cost, dict):
        raise SpecError("cluster.cost: expected a mapping of constant -> number")
    cluster = ClusterSpec(
        pods=int(c.get("pods", 8)), profile=str(c.get("profile", "8b")),
        cost=tuple((str(k), v) for k, v in cost.items()),
        base_model=str(c.get("base_model", ClusterSpec.base_model)),
        max_loras=int(c.get("max_loras", 4)), max_cpu_loras=int(c.get("max_cpu_loras", 12)),
        max_lora_rank=int(c.get("max_lora_rank", 64)),
        sim_args=tuple(str(x) for x in c.get("sim_args", ()) or ()),
    )
    if cluster.pods < 1:
        raise SpecError("cluster.pods: must be >= 1")
    try:
        sim_profile(cluster)
    except ProfileError as e:
        raise SpecError(f"cluster: {e}") from None
    a = _check_keys("adapters", top.get("adapters"), ("count", "ranks", "name_format"))
    adapters = AdapterSpec(count=int(a.get("count", 64)),
                           ranks=tuple(int(r) for r in a.get("ranks", (8, 16, 32, 64))),
                           name_format=str(a.get("name_format", "ad{index:03d}")))
    if adapters.count < 1 or not adapters.ranks:
        raise SpecError("adapters: need count >= 1 and at least one rank")
    if max(adapters.ranks) > cluster.max_lora_rank:
        raise SpecError(f"adapters.ranks: {max(adapters.ranks)} exceeds cluster.max_lora_rank "
                        f"{cluster.max_lora_rank}")
    p = _check_keys("popularity", top.get("popularity"), ("kind", "exponent", "alpha"))
    popularity = PopularitySpec(kind=str(p.get("kind", "zipf")), exponent=float(p.get("exponent", 1.0)),
                                alpha=float(p.get("alpha", 1.0)))
    if popularity.kind not in ("zipf", "power", "uniform"):
        raise SpecError(f"popularity.kind: {popularity.kind!r} is not one of zipf, power, uniform")
    if popularity.kind == "power" and popularity.alpha <= 0:
        raise SpecError("popularity.alpha: must be > 0")
    x = _check_keys("prefix", top.get("prefix"), (
        "system_prompts_per_adapter", "system_prompt_tokens", "followup_fraction", "followup_window",
        "max_turns"))
    prefix = PrefixSpec(
        system_prompts_per_adapter=int(x.get("system_prompts_per_adapter", 2)),
        system_prompt_tokens=int(x.get("system_prompt_tokens", 800)),
        followup_fraction=_fraction("prefix.followup_fraction", x.get("followup_fraction", 0.5)),
        followup_window=int(x.get("followup_window", 32)),
        max_turns=int(x.get("max_turns", 6)),
    )
    if prefix.system_prompts_per_adapter < 1 or prefix.followup_window < 1 or prefix.max_turns < 1:
        raise SpecError("prefix: system_prompts_per_adapter, followup_window, max_turns must be >= 1")
    ln = _check_keys("lengths", top.get("lengths"), ("user_tokens", "output_tokens"))
    lengths = LengthsSpec(
        user_tokens=_length("lengths.user_tokens", ln.get("user_tokens"), LengthsSpec.user_tokens),
        output_tokens=_length("lengths.output_tokens", ln.get("output_tokens"), LengthsSpec.output_tokens),
    )
    ar = _check_keys("arrivals", top.get("arrivals"), ("kind", "cv", "bursts"))
    bursts = []
    for i, b in enumerate(ar.get("bursts", ()) or ()):
        bd = _check_keys(f"arrivals.bursts[{i}]", b, ("start_s", "duration_s", "factor"))
        bursts.append(Burst(float(bd["start_s"]), float(bd["duration_s"]), float(bd["factor"])))
    arrivals = ArrivalSpec(kind=str(ar.get("kind", "poisson")), cv=float(ar.get("cv", 1.0)),
                           bursts=tuple(bursts))
    if arrivals.kind not in ("poisson", "gamma"):
        raise SpecError(f"arrivals.kind: {arrivals.kind!r} is not one of poisson, gamma")
    if arrivals.cv <= 0:
        raise SpecError("arrivals.cv: must be > 0")
    loads = tuple(float(v) for v in top.get("loads", (0.3, 0.6, 0.9)))
    if not loads or any(v <= 0 for v in loads):
        raise SpecError("loads: need at least one positive fraction of capacity")
    requests = top.get("requests", None if "duration_s" in top else 2000)
    duration = top.get("duration_s")
    if requests is None and duration is None:
        raise SpecError("spec: give requests or duration_s")
    return WorkloadSpec(
        name=str(top.get("name", "workload")), seed=int(top.get("seed", 1)), cluster=cluster,
        adapters=adapters, popularity=popularity, prefix=prefix, lengths=lengths, arrivals=arrivals,
        loads=loads, requests=int(requests) if requests is not None else None,
        duration_s=float(duration) if duration is not None else None,
    )


def load_spec(path: str | Path) -> WorkloadSpec:
    """Read and validate a YAML spec file."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    try:
        return parse_spec(data)
    except SpecError as e:
        raise SpecError(f"{path}: {e}") from None


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def _sub_rng(seed: int, *labels: object) -> np.random.Generator:
    """An RNG seeded from ``seed`` and labels, stable across runs and Python versions."""
    digest = hashlib.sha256(repr((seed, *labels)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def pseudo_text(rng: np.random.Generator, tokens: int) -> str:
    """``tokens`` pseudo-words of three letters + a space: exactly 4 bytes per intended token."""
    if tokens <= 0:
        return ""
    buf = np.full((tokens, 4), 32, dtype=np.uint8)  # trailing space
    buf[:, :3] = rng.integers(97, 123, size=(tokens, 3), dtype=np.uint8)
    return buf.tobytes().decode("ascii")


def system_prompt(spec: WorkloadSpec, adapter_index: int, k: int) -> str:
    """System prompt ``k`` of adapter ``adapter_index`` (deterministic in the seed)."""
    rng = _sub_rng(spec.seed, "system", adapter_index, k)
    head = f"You are assistant {spec.adapters.name(adapter_index)} variant {k}. "
    body_tokens = max(0, spec.prefix.system_prompt_tokens - len(head) // BYTES_PER_TOKEN)
    return head + pseudo_text(rng, body_tokens)


def text_tokens(text: str) -> int:
    """Tokens of ``text`` under the 4-bytes-per-token convention (ceil)."""
    return -(-len(text.encode()) // BYTES_PER_TOKEN)


# --------------------------------------------------------------------------------------------
# Trace
# --------------------------------------------------------------------------------------------


@dataclass
class TraceRequest:
    """One request of a trace. ``t`` is the arrival offset in seconds from the trace start.

    ``shared_prefix_messages``: how many leading messages another request may already have put
    in a prefix cache (the system prompt, plus the earlier turns of a follow-up).
    """

    id: str
    t: float
    adapter: str
    rank: int
    conversation: int
    turn: int
    system_prompt: int
    messages: list[dict[str, str]]
    max_tokens: int
    shared_prefix_messages: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @property
    def prompt_chars(self) -> int:
        return sum(len(m["content"].encode()) for m in self.messages)

    @property
    def shared_prefix_chars(self) -> int:
        return sum(len(m["content"].encode()) for m in self.messages[: self.shared_prefix_messages])


@dataclass
class _Conversation:
    index: int
    adapter: int
    system: int
    messages: list[dict[str, str]]
    turns: int = 0
    last_used: int = 0


def _content(spec: WorkloadSpec, n: int) -> Iterator[TraceRequest]:
    """The rate-independent part of a trace: adapters, conversations, messages, lengths."""
    rng = _sub_rng(spec.seed, "content")
    probs = spec.popularity.probabilities(spec.adapters.count)
    adapters_drawn = rng.choice(spec.adapters.count, size=n, p=probs)
    followup_draws = rng.random(n)
    conversations: list[_Conversation] = []  # open conversations, most recently used last
    systems: dict[tuple[int, int], str] = {}
    next_conv = 0
    for i in range(n):
        user_tokens = spec.lengths.user_tokens.sample(rng)
        out_tokens = spec.lengths.output_tokens.sample(rng)
        conv: _Conversation | None = None
        if followup_draws[i] < spec.prefix.followup_fraction and conversations:
            window = conversations[-spec.prefix.followup_window:]
            conv = window[int(rng.integers(0, len(window)))]
        if conv is None:
            adapter = int(adapters_drawn[i])
            k = int(rng.integers(0, spec.prefix.system_prompts_per_adapter))
            if (adapter, k) not in systems:
                systems[(adapter, k)] = system_prompt(spec, adapter, k)
            conv = _Conversation(next_conv, adapter, k,
                                 [{"role": "system", "content": systems[(adapter, k)]}])
            next_conv += 1
            conversations.append(conv)
            del conversations[: -spec.prefix.followup_window]  # older ones can never be picked
        else:
            conversations.remove(conv)
            conversations.append(conv)
        shared = len(conv.messages)
        user = f"[{i}] " + pseudo_text(_sub_rng(spec.seed, "user", i), user_tokens)
        messages = [*conv.messages, {"role": "user", "content": user}]
        conv.turns += 1
        yield TraceRequest(
            id=f"{spec.name}-{i:06d}", t=0.0, adapter=spec.adapters.name(conv.adapter),
            rank=spec.adapters.rank(conv.adapter), conversation=conv.index, turn=conv.turns,
            system_prompt=conv.system, messages=messages, max_tokens=out_tokens,
            shared_prefix_messages=shared,
        )
        # the answer joins the history; a real client would send the model's own answer
        answer = pseudo_text(_sub_rng(spec.seed, "answer", i), out_tokens)
        conv.messages = [*messages, {"role": "assistant", "content": answer}]
        if conv.turns >= spec.prefix.max_turns:
            conversations.remove(conv)


def arrival_times(spec: WorkloadSpec, rate: float, n: int | None = None,
                  duration_s: float | None = None) -> list[float]:
    """Arrival offsets (s) at mean ``rate`` req/s: Poisson, or Gamma gaps with CV ``cv``; bursts
    multiply the rate inside their window. Stops after ``n`` arrivals or at ``duration_s``."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    rng = _sub_rng(spec.seed, "arrivals")
    cap = n if n is not None else 10_000_000
    times: list[float] = []
    t = 0.0
    k = 1.0 / spec.arrivals.cv**2
    while len(times) < cap:
        unit = float(rng.exponential(1.0)) if spec.arrivals.kind == "poisson" else float(
            rng.gamma(k, 1.0 / k))
        factor = 1.0
        for b in spec.arrivals.bursts:
            if b.start_s <= t < b.start_s + b.duration_s:
                factor *= b.factor
        t += unit / (rate * factor)
        if duration_s is not None and t > duration_s:
            break
        times.append(t)
    return times


def generate(spec: WorkloadSpec, rate: float, requests: int | None = None,
             duration_s: float | None = None) -> list[TraceRequest]:
    """The trace of ``spec`` at ``rate`` req/s (``requests`` / ``duration_s`` override the spec)."""
    if requests is None and duration_s is None:
        requests, duration_s = spec.requests, spec.duration_s
    times = arrival_times(spec, rate, requests, duration_s)
    out = []
    for t, req in zip(times, _content(spec, len(times))):
        req.t = round(t, 6)
        out.append(req)
    return out


def write_trace(path: str | Path, trace: list[TraceRequest], meta: dict[str, Any] | None = None) -> Path:
    """JSONL: a first line ``{"meta": {...}}`` then one request per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"meta": meta or {}}) + "\n")
        for r in trace:
            f.write(r.to_json() + "\n")
    return path


def read_trace(path: str | Path) -> tuple[dict[str, Any], list[TraceRequest]]:
    meta: dict[str, Any] = {}
    out: list[TraceRequest] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            d = json.loads(line)
            if "meta" in d and len(d) == 1:
                meta = d["meta"]
                continue
            out.append(TraceRequest(**d))
    return meta, out


def summarize(trace: list[TraceRequest]) -> dict[str, float]:
    """Quick facts about a trace (for `loraroute bench workload` and the tests)."""
    if not trace:
        return {"requests": 0}
    n = len(trace)
    span = trace[-1].t - trace[0].t if n > 1 else 0.0
    counts: dict[str, int] = {}
    for r in trace:
        counts[r.adapter] = counts.get(r.adapter, 0) + 1
    top = max(counts.values())
    return {
        "requests": n,
        "duration_s": round(trace[-1].t, 3),
        "rate_rps": round((n - 1) / span, 3) if span > 0 else 0.0,
        "adapters_used": len(counts),
        "top_adapter_share": round(top / n, 4),
        "followup_share": round(sum(1 for r in trace if r.turn > 1) / n, 4),
        "mean_prompt_tokens": round(sum(r.prompt_chars for r in trace) / n / BYTES_PER_TOKEN, 1),
        "mean_shared_prefix_tokens": round(sum(r.shared_prefix_chars for r in trace) / n / BYTES_PER_TOKEN, 1),
        "mean_max_tokens": round(sum(r.max_tokens for r in trace) / n, 1),
    }
