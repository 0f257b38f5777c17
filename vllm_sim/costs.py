"""Cost model of one engine step, calibrated to a real vLLM 0.25.1 on one H200 (8B-shaped Llama).

Sources (shared reference pages and their payloads, committed under ``tests/fixtures/vllm-0.25-real/``):
REAL = ``real-vllm-0.25.md`` (medians of 5 trials, batch 1, fresh prompts; ``summary-compiled.md``,
``summary-single-server.md``, ``decode-and-prefill-boundary-compiled.txt``, ``decode-itl.txt``),
CAL = ``h100-calibration.md`` (an 8B model on one H100), REF = ``vllm-lora-surface.md`` section 8.

Step duration (simulated seconds), with ``P`` the prefill tokens computed in the step, ``D`` the
sequences decoding one token, ``K`` the KV tokens those sequences attend to and ``N = P + D``::

    N <= graph_max_tokens (a CUDA graph; 512 = vLLM's largest capture size):
        P == 0 (decode only, FULL graph):   base = decode_step_s
                                            lora = lora_decode_s
        P > 0 (PIECEWISE graph):            base = prefill_step_s + prefill_graph_token_s * P
                                            lora = lora_prefill_step_s + lora_prefill_token_s * N
    N > graph_max_tokens (no graph; every step of the eager profile):
        P == 0:                             base = eager_decode_step_s
                                            lora = eager_lora_decode_s
        P > 0:                              base = max(eager_prefill_step_s, prefill_token_s * P)
                                            lora = eager_lora_prefill_s
    step = base + decode_seq_s * D + decode_kv_token_s * K
         + lora            (when any request of the step uses an adapter: vLLM runs its LoRA
                            kernels over the whole batch)
         + load stalls     (below)

A load stalls the whole step, i.e. every request in it (vLLM loads inside the engine loop)::

    load stall = sum over the batch's adapters missing from the CPU cache of disk_load_s(rank) + cpu_to_gpu_s
               + sum over the batch's adapters only in the CPU cache of cpu_to_gpu_s
               + first_lora_jit_s once, on the engine's first step with an adapter (eager only)
    load API / resolver (an engine utility call between steps) = disk_load_s(rank) + cpu_to_gpu_s
               + load_api_overhead_s

Defaults (``CostProfile()`` = ``PROFILES["8b"]``, the compiled server: vLLM's default, CUDA graphs
``FULL_AND_PIECEWISE``, capture sizes 1-512), each with its source:

- ``graph_max_tokens = 512``: REAL, "the 512-token cliff": TTFT jumps between 512 and 524 prompt
  tokens (base 23.1 -> 52.9 ms, adapter 29.1 -> 104.2 ms).
- ``decode_step_s = 4.63 ms``, ``lora_decode_s = 2.42 ms``: REAL, batch-1 decode step 4.65 ms on the
  base (4.63 + decode_seq_s) and 7.07 ms with an adapter (+52 %).
- ``prefill_step_s = 12.5 ms``, ``prefill_graph_token_s = 22.3 us``, ``lora_prefill_step_s = 1.74 ms``,
  ``lora_prefill_token_s = 7.7 us``: least-squares lines through REAL's compiled TTFT at 64 / 254 /
  384 / 504 / 512 prompt tokens (base 14.0 / 19.0 / 19.2 / 25.7 / 23.1 ms, adapter 15.9 / 22.3 /
  26.0 / 29.7 / 29.1 ms): a lone request's TTFT is one prefill step. The client-side overhead of
  those TTFTs (HTTP, tokenizing) is inside these constants.
- ``eager_prefill_step_s = 51.9 ms``: mean base TTFT above the cliff (516 / 524 / 764 / 1004 / 1028
  tokens: 48.3 / 52.9 / 55.2 / 53.3 / 49.8 ms) -- launch-bound, flat in tokens.
- ``prefill_token_s = 30.4 us``: compute-bound slope, REAL 62.4 ms at 2,052 tokens (= 30.4 us a
  token; CAL's H100 slope from 2k to 8k tokens is 31 us). Beyond 2,052 tokens not measured.
- ``eager_lora_prefill_s = 39.0 ms``: mean adapter - base TTFT above the cliff (+39.4 / +51.3 /
  +34.5 / +44.1 / +35.9 / +29.1 ms at 516 ... 2,052 tokens); held flat beyond (not measured).
- ``eager_decode_step_s = 28.8 ms``, ``eager_lora_decode_s = 15.8 ms``: a decode step of more than
  512 sequences runs without a graph; not measured in compiled mode, so the eager server's batch-1
  step (REAL ``decode-itl.txt``: base 28.2 / 29.4 ms, adapter 45.7 / 43.6 ms) stands for it.
- ``decode_seq_s = 20 us``, ``decode_kv_token_s = 65 ns``: batching was not measured on the H200;
  CAL's H100 figures are kept (128 KiB of KV per token at 3 TB/s x 1.5, per-sequence bookkeeping).
- ``disk_load_points`` (compiled: 32.4 / 88.9 / 181.8 / 272.0 ms at rank 8 / 16 / 32 / 64): REAL's
  disk-tier TTFT minus GPU-hit TTFT (126.1 - 83.7, 178.1 - 79.2, 284.7 - 92.9, 337.7 - 55.7 ms;
  page cache dropped) minus the activation ``cpu_to_gpu_s`` the same request pays. Interpolated
  linearly between the points, flat below rank 8 (the fixed part of a load dominates there) and
  extrapolated linearly above rank 64 (not measured). ``load_scale`` multiplies them (1.0).
  The page cache is not modelled: every CPU-cache miss costs the cold figure.
- ``cpu_to_gpu_s = 10 ms``: REAL, CPU tier over a GPU hit ~ +10 ms (+5 / +10 / +18 / +12 ms eager,
  -5 / +7 / +17 / +11 ms compiled; REF's 8.5-9.3 ms activation agrees); flat in rank.
- ``load_api_overhead_s = 32.2 ms``: REAL, ``/v1/load_lora_adapter`` time minus the disk-tier extra,
  mean over ranks (93.3 - 42.4, 135.0 - 98.9, 200.0 - 191.8, 315.6 - 282.0 ms); the stall trials show
  the engine is blocked for the whole call.
- ``first_lora_jit_s = 0``: a compiled server compiles the LoRA kernels before it is ready (REAL: the
  first LoRA request took 103 ms).

``PROFILES["8b-eager"]`` (``--enforce-eager``) replaces what eager mode changes, from the same pages:
no graphs (``graph_max_tokens = 0``); ``eager_prefill_step_s = 32.6 ms`` (mean base TTFT at 132 /
516 / 1,028 tokens: 30.3 / 33.5 / 34.0 ms) and ``prefill_token_s = 28.1 us`` (57.6 ms at 2,052);
``eager_lora_prefill_s = 28.6 ms`` (mean of +34.9 / +26.4 / +32.9 / +20.0 ms); disk points 52.3 /
86.4 / 141.3 / 268.4 ms (137.4 - 75.1, 155.2 - 58.8, 206.8 - 55.5, 346.0 - 67.6, minus 10 ms);
``load_api_overhead_s = 16.1 ms`` (80.7 - 62.3, 100.4 - 96.4, 184.6 - 151.3, 287.1 - 278.4);
``first_lora_jit_s = 3.65 s``: the first LoRA request of a fresh eager engine (3,718 ms) minus an
adapter prefill of that size (66.9 ms at 1,028 tokens) -- Triton compiling the LoRA kernels.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

#: ranks the measurement covered (the scorer-facing tables use them)
MEASURED_RANKS = (8, 16, 32, 64)


@dataclass(frozen=True)
class CostProfile:
    """Step and load costs in simulated seconds (see the module docstring for formula and sources)."""

    name: str = "8b"
    graph_max_tokens: int = 512
    decode_step_s: float = 0.00463
    lora_decode_s: float = 0.00242
    prefill_step_s: float = 0.0125
    prefill_graph_token_s: float = 2.23e-5
    lora_prefill_step_s: float = 0.00174
    lora_prefill_token_s: float = 7.7e-6
    eager_decode_step_s: float = 0.0288
    eager_lora_decode_s: float = 0.0158
    eager_prefill_step_s: float = 0.0519
    prefill_token_s: float = 3.04e-5
    eager_lora_prefill_s: float = 0.039
    decode_seq_s: float = 2e-5
    decode_kv_token_s: float = 6.5e-8
    # (rank, seconds): cold disk -> CPU load, the extra over a GPU hit less the activation
    disk_load_points: tuple[tuple[int, float], ...] = field(
        default=((8, 0.0324), (16, 0.0889), (32, 0.1818), (64, 0.2720))
    )
    load_scale: float = 1.0
    cpu_to_gpu_s: float = 0.010
    load_api_overhead_s: float = 0.0322
    first_lora_jit_s: float = 0.0

    def disk_load_s(self, rank: int) -> float:
        """Cold disk -> CPU load of an adapter of ``rank``: piecewise linear in rank, flat below
        the smallest point, extrapolated from the last two above the largest, times load_scale."""
        pts = sorted(self.disk_load_points)
        if rank <= pts[0][0] or len(pts) == 1:
            return pts[0][1] * self.load_scale
        if rank >= pts[-1][0]:
            (r0, t0), (r1, t1) = pts[-2], pts[-1]
        else:
            i = next(k for k in range(1, len(pts)) if pts[k][0] >= rank)
            (r0, t0), (r1, t1) = pts[i - 1], pts[i]
        return (t0 + (t1 - t0) * (rank - r0) / (r1 - r0)) * self.load_scale

    def load_api_s(self, rank: int) -> float:
        """An engine utility call that loads an adapter (load API, resolver): disk + activation + call."""
        return self.disk_load_s(rank) + self.cpu_to_gpu_s + self.load_api_overhead_s

    def step_time(self, prefill_tokens: int, decode_seqs: int, decode_kv_tokens: int, lora: bool = False) -> float:
        """Duration of a step without load stalls (``lora``: some request of the step uses an adapter)."""
        n = prefill_tokens + decode_seqs
        if n <= self.graph_max_tokens:
            if prefill_tokens:
                t = self.prefill_step_s + self.prefill_graph_token_s * prefill_tokens
                if lora:
                    t += self.lora_prefill_step_s + self.lora_prefill_token_s * n
            else:
                t = self.decode_step_s + (self.lora_decode_s if lora else 0.0)
        elif prefill_tokens:
            compute = self.prefill_token_s * prefill_tokens
            t = (compute if compute > self.eager_prefill_step_s else self.eager_prefill_step_s) + (
                self.eager_lora_prefill_s if lora else 0.0)
        else:
            t = self.eager_decode_step_s + (self.eager_lora_decode_s if lora else 0.0)
        return t + self.decode_seq_s * decode_seqs + self.decode_kv_token_s * decode_kv_tokens

    def tier_extra_s(self, tier: str, rank: int) -> float:
        """TTFT a request pays over a GPU hit for its adapter's tier (``gpu``, ``cpu`` or ``disk``)."""
        if tier == "gpu":
            return 0.0
        if tier == "cpu":
            return self.cpu_to_gpu_s
        if tier == "disk":
            return self.disk_load_s(rank) + self.cpu_to_gpu_s
        raise ValueError(f"tier must be gpu, cpu or disk, not {tier!r}")

    def truth(self, lo: int = 128, hi: int = 4096) -> TrueCosts:
        """What a TTFT-predicting scorer would ideally use on pods of this profile (see ``TrueCosts``)."""
        tokens = list(range(lo, hi + 1, 64))
        base = [ideal_ttft(self, n, 0) for n in tokens]
        with_lora = [ideal_ttft(self, n, 0, lora=True) for n in tokens]
        mean_n = sum(tokens) / len(tokens)
        mean_t = sum(base) / len(base)
        slope = sum((n - mean_n) * (t - mean_t) for n, t in zip(tokens, base)) / sum((n - mean_n) ** 2 for n in tokens)
        return TrueCosts(
            profile=self.name, fit_tokens=(lo, hi), base_s=mean_t - slope * mean_n, prefill_s_per_token=slope,
            lora_surcharge_s=sum(b - a for a, b in zip(base, with_lora)) / len(tokens),
            cpu_load_s=self.tier_extra_s("cpu", MEASURED_RANKS[0]),
            disk_load_s={r: self.tier_extra_s("disk", r) for r in MEASURED_RANKS},
            load_stall_s={r: self.load_api_s(r) for r in MEASURED_RANKS},
            decode_step_s=self.step_time(0, 1, 0), lora_decode_step_s=self.step_time(0, 1, 0, lora=True),
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["disk_load_points"] = [list(p) for p in self.disk_load_points]
        return out


@dataclass(frozen=True)
class TrueCosts:
    """The constants of a linear TTFT model (``estimated-ttft``'s shape) that are true for a profile.

    ``base_s`` + ``prefill_s_per_token`` × tokens is the least-squares line through a lone base
    request's TTFT from ``fit_tokens[0]`` to ``fit_tokens[1]`` prompt tokens (the step model is
    piecewise, so this is the best straight line, not a constant of the simulator);
    ``lora_surcharge_s`` the mean extra of an adapter request over that range; ``cpu_load_s`` /
    ``disk_load_s[rank]`` the extra over a GPU hit of a CPU-tier / disk-tier adapter (what the
    request pays); ``load_stall_s[rank]`` how long a load through the API blocks the pod."""

    profile: str
    fit_tokens: tuple[int, int]
    base_s: float
    prefill_s_per_token: float
    lora_surcharge_s: float
    cpu_load_s: float
    disk_load_s: dict[int, float]
    load_stall_s: dict[int, float]
    decode_step_s: float
    lora_decode_step_s: float

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["fit_tokens"] = list(self.fit_tokens)
        return out


COMPILED = CostProfile()
EAGER = replace(
    COMPILED, name="8b-eager", graph_max_tokens=0, eager_prefill_step_s=0.0326, prefill_token_s=2.81e-5,
    eager_lora_prefill_s=0.0286, disk_load_points=((8, 0.0523), (16, 0.0864), (32, 0.1413), (64, 0.2684)),
    load_api_overhead_s=0.0161, first_lora_jit_s=3.65,
)
#: named profiles: ``--profile`` on ``loraroute sim`` and ``cluster.profile`` in bench specs
PROFILES: dict[str, CostProfile] = {p.name: p for p in (COMPILED, EAGER)}
_OVERRIDABLE = {f.name: f.type for f in fields(CostProfile) if f.name not in ("name", "disk_load_points")}


class ProfileError(ValueError):
    """An unknown profile name or a bad override (the message names the key and the choices)."""


def _nearest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def get_profile(name: str = "8b", overrides: Mapping[str, float] | None = None) -> CostProfile:
    """The named profile with ``overrides`` (field -> number) applied; ``ProfileError`` if unknown."""
    base = PROFILES.get(name)
    if base is None:
        raise ProfileError(f"unknown cost profile {name!r}; profiles: {', '.join(PROFILES)}{_nearest(name, list(PROFILES))}")
    changes: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        kind = _OVERRIDABLE.get(key)
        if kind is None:
            raise ProfileError(f"unknown cost constant {key!r}{_nearest(key, list(_OVERRIDABLE))}; "
                               f"constants: {', '.join(_OVERRIDABLE)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
            raise ProfileError(f"cost constant {key!r} must be a non-negative number, not {value!r}")
        changes[key] = int(value) if kind in ("int", int) else float(value)
    return replace(base, **changes) if changes else base


def parse_override(text: str) -> tuple[str, float]:
    """``KEY=VALUE`` (``--cost load_scale=3``) -> (key, number); ``ProfileError`` when malformed."""
    key, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not sep or not key.strip() or number != number:
        raise ProfileError(f"--cost expects KEY=NUMBER, got {text!r}")
    return key.strip(), number


def ideal_ttft(
    profile: CostProfile, prompt_tokens: int, cached_tokens: int, max_num_batched_tokens: int = 8192,
    lora: bool = False,
) -> float:
    """TTFT of a request alone on an idle pod with its adapter (if any, ``lora``) on GPU.

    The uncached part is prefilled in chunks of ``max_num_batched_tokens``; the first token comes
    at the end of the last chunk's step::

        uncached = prompt_tokens - min(cached_tokens, prompt_tokens - 1)
        ttft = sum over chunks c of step_time(c, 0, 0, lora)

    (vLLM always recomputes at least the last prompt token, hence ``prompt_tokens - 1``.)
    """
    prompt_tokens = max(1, int(prompt_tokens))
    cached = max(0, min(int(cached_tokens), prompt_tokens - 1))
    uncached = prompt_tokens - cached
    full, rest = divmod(uncached, max_num_batched_tokens)
    t = full * profile.step_time(max_num_batched_tokens, 0, 0, lora)
    return t + (profile.step_time(rest, 0, 0, lora) if rest else 0.0)
