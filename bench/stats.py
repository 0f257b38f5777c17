"""Summary statistics of one benchmark result (one target at one load level).

All latencies are in *simulated* seconds: wall seconds measured at the client divided by the run's
``time_scale``. Definitions (``ok`` = HTTP 200 with content and no stream error):

- ``ttft_p50/p90/p99``, ``e2e_p50/p99``: percentiles over ok requests (linear interpolation).
- ``output_tok_s``: Σ output tokens of ok requests / (last completion − first send), simulated.
- ``adapter_gpu_hit``: share of ok requests whose adapter was already in a GPU slot when the
  simulator admitted them (ground truth), among those with ground truth.
- ``prefix_hit``: Σ cached prompt tokens / Σ prompt tokens (ground truth, else the usage chunk).
- ``imbalance``: max / mean of requests per pod (1.0 = perfectly even), over all pods of the
  cluster (a pod that got nothing counts as 0).
- ``ideal_ratio_p50``: median over ok requests of achieved TTFT / ideal TTFT, where ideal is the
  simulator's TTFT alone on an idle pod, adapter resident and shareable prefix cached.
- ``sim_ideal_ratio_p50``, ``sim_ttft_p50``, ``sim_ttft_p99``: the same from the simulator's own
  TTFT (ground truth, arrival at the engine to first token): routing quality without the HTTP hops
  and the client's CPU contention.
- ``client_extra_p50``: median over ok requests of client TTFT − simulator TTFT: what the client,
  the router and the HTTP hops add (it grows with CPU contention, not with routing).
- ``ttft_p99_warm``, ``adapter_gpu_hit_warm``: the same without each adapter's first request of
  the run (a compulsory cold load from disk whatever the router does; every point starts cold).
- ``errors``: requests that are not ok.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def is_ok(r: dict[str, Any]) -> bool:
    return r.get("status") == 200 and r.get("error") is None and r.get("ttft_s") is not None


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Summary of a result document (``{"meta": ..., "requests": [...]}``)."""
    meta = result["meta"]
    scale = float(meta.get("time_scale", 1.0)) or 1.0
    reqs = result["requests"]
    ok = [r for r in reqs if is_ok(r)]
    ttft = [r["ttft_s"] / scale for r in ok]
    e2e = [r["e2e_s"] / scale for r in ok if r.get("e2e_s") is not None]
    out_tokens = sum(int(r.get("output_tokens") or 0) for r in ok)
    if ok:
        t_first = min(r["sent_s"] for r in ok)
        t_last = max(r["sent_s"] + (r.get("e2e_s") or 0.0) for r in ok)
        span = max(1e-9, (t_last - t_first) / scale)
    else:
        span = 0.0
    gt = [r for r in ok if r.get("gt_adapter_tier") is not None]
    gpu_hit = (sum(1 for r in gt if r["gt_adapter_tier"] == "gpu") / len(gt)) if gt else None
    prompt_sum = cached_sum = 0
    for r in ok:
        p = r.get("gt_prompt_tokens", r.get("prompt_tokens"))
        c = r.get("gt_cached_tokens", r.get("cached_tokens"))
        if p is not None and c is not None:
            prompt_sum += int(p)
            cached_sum += int(c)
    pods = list(meta.get("pods") or [])
    counts: dict[str, int] = {p: 0 for p in pods}
    for r in reqs:
        if r.get("pod"):
            counts[r["pod"]] = counts.get(r["pod"], 0) + 1
    mean = (sum(counts.values()) / len(counts)) if counts else 0.0
    ratios = [r["ttft_s"] / scale / r["ideal_ttft_s"] for r in ok if r.get("ideal_ttft_s")]
    sim_ratios = [r["gt_ttft_s"] / r["ideal_ttft_s"] for r in ok
                  if r.get("ideal_ttft_s") and r.get("gt_ttft_s") is not None]
    first_use: set[str] = set()
    seen: set[str] = set()
    for r in sorted(reqs, key=lambda r: r.get("sent_s") or 0.0):
        if r.get("adapter") not in seen:
            seen.add(r.get("adapter"))
            first_use.add(r["id"])
    warm = [r for r in ok if r["id"] not in first_use]
    warm_gt = [r for r in gt if r["id"] not in first_use]
    cpu = meta.get("cpu") or {}
    return {
        "target": meta.get("target"),
        "load": meta.get("load"),
        "rate_rps": meta.get("rate_rps"),
        "requests": len(reqs),
        "ok": len(ok),
        "errors": len(reqs) - len(ok),
        "with_pod": sum(1 for r in reqs if r.get("pod")),
        "ttft_p50": percentile(ttft, 50),
        "ttft_p90": percentile(ttft, 90),
        "ttft_p99": percentile(ttft, 99),
        "ttft_p99_warm": percentile([r["ttft_s"] / scale for r in warm], 99),
        "adapter_gpu_hit_warm": (sum(1 for r in warm_gt if r["gt_adapter_tier"] == "gpu") / len(warm_gt))
        if warm_gt else None,
        "e2e_p50": percentile(e2e, 50),
        "e2e_p99": percentile(e2e, 99),
        "output_tok_s": (out_tokens / span) if span > 0 else None,
        "adapter_gpu_hit": gpu_hit,
        "prefix_hit": (cached_sum / prompt_sum) if prompt_sum else None,
        "imbalance": (max(counts.values()) / mean) if mean > 0 else None,
        "ideal_ratio_p50": percentile(ratios, 50),
        "sim_ideal_ratio_p50": percentile(sim_ratios, 50),
        "sim_ttft_p50": percentile([r["gt_ttft_s"] for r in ok if r.get("gt_ttft_s") is not None], 50),
        "sim_ttft_p99": percentile([r["gt_ttft_s"] for r in ok if r.get("gt_ttft_s") is not None], 99),
        "client_extra_p50": percentile([r["ttft_s"] / scale - r["gt_ttft_s"] for r in ok
                                        if r.get("gt_ttft_s") is not None], 50),
        "pod_counts": counts,
        "router_cpu_pct": (cpu.get("router") or {}).get("cpu_pct"),
        "machine_busy_pct": (cpu.get("machine") or {}).get("busy_pct"),
        "cpu": cpu,
        "finished_at": meta.get("finished_at"),
        "code_version": meta.get("code_version"),
    }
