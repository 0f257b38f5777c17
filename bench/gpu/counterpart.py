"""The simulated counterpart of a real GPU run, and the tables that compare them.

- ``estimate_tiers(rows, max_loras, max_cpu_loras)``: each request's adapter tier at admission as
  the server would have had it, replayed from the order requests reached each server
  (``x-loraroute-pod``, send time) through vLLM's two LRU tiers (``vllm_sim.lora_cache.LoraTiers``:
  ``max_cpu_loras`` CPU entries, ``max_loras`` GPU slots, loading is activating). Written as
  ``est_adapter_tier`` (``gpu`` / ``cpu`` / ``disk``); rows without a pod (a peer that sets no
  header) get none. The servers are reset before every policy, so every estimate starts empty.
- ``simulate(real_docs, spec, profile, …)``: the same spec, rate and request count replayed on
  ``loraroute sim cluster`` (``bench.runner``: same pods, slots and adapters) for each target of the
  real run, with the simulator profile named on the command line.
- ``compare(real, sim)``: Markdown: policies side by side on the real servers, then real vs
  simulated TTFT p50/p99 overall and by tier, with the issue's targets checked.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from bench.stats import is_ok, percentile

TIERS = ("gpu", "cpu", "disk")


def estimate_tiers(rows: list[dict[str, Any]], max_loras: int, max_cpu_loras: int) -> int:
    """Fill ``est_adapter_tier`` in place; returns how many rows got one."""
    from vllm_sim.costs import CostProfile
    from vllm_sim.lora_cache import LoraRef, LoraTiers

    by_pod: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("pod") and row.get("status") == 200:
            by_pod.setdefault(row["pod"], []).append(row)
    ids: dict[str, int] = {}
    done = 0
    for pod_rows in by_pod.values():
        tiers = LoraTiers(max_loras, max_cpu_loras, CostProfile())
        for row in sorted(pod_rows, key=lambda r: r.get("sent_s") or 0.0):
            ref = LoraRef(ids.setdefault(row["adapter"], len(ids) + 1), row["adapter"], "", int(row.get("rank") or 8))
            row["est_adapter_tier"] = tiers.tier(ref.lora_id)
            tiers.ensure(ref)
            done += 1
    return done


def _ttfts(doc: dict[str, Any], tier_key: str | None = None, tier: str | None = None) -> list[float]:
    scale = float(doc["meta"].get("time_scale", 1.0)) or 1.0
    return [r["ttft_s"] / scale for r in doc["requests"]
            if is_ok(r) and (tier is None or r.get(tier_key or "") == tier)]


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{1000 * v:.0f}"


def _delta(real: float | None, sim: float | None) -> str:
    if real is None or sim is None or real <= 0:
        return "–"
    return f"{100 * (sim - real) / real:+.0f} %"


def real_table(docs: Sequence[dict[str, Any]]) -> str:
    lines = ["| policy | ok / sent | TTFT p50 | p90 | p99 | est. tier at admission gpu / cpu / disk | errors | "
             "requests per server |", "|---|---|---|---|---|---|---|---|"]
    for doc in sorted(docs, key=lambda d: d["meta"]["target"]):
        t = _ttfts(doc)
        ok = [r for r in doc["requests"] if is_ok(r)]
        with_tier = [r for r in ok if r.get("est_adapter_tier")]
        shares = " / ".join(f"{100 * sum(r['est_adapter_tier'] == k for r in with_tier) / len(with_tier):.0f} %"
                            for k in TIERS) if with_tier else "–"
        counts: dict[str, int] = {p: 0 for p in doc["meta"].get("pods") or []}
        for r in doc["requests"]:
            if r.get("pod"):
                counts[r["pod"]] = counts.get(r["pod"], 0) + 1
        # a router that names no pod (a peer without x-loraroute-pod) gets no split, not zeros
        per = " / ".join(str(counts[k]) for k in sorted(counts)) if any(counts.values()) else "–"
        lines.append(f"| {doc['meta']['target']} | {len(ok)} / {len(doc['requests'])} | {_ms(percentile(t, 50))} ms | "
                     f"{_ms(percentile(t, 90))} ms | {_ms(percentile(t, 99))} ms | {shares} | "
                     f"{len(doc['requests']) - len(ok)} | {per} |")
    return "\n".join(lines) + "\n"


def compare_table(real: Sequence[dict[str, Any]], sim: Sequence[dict[str, Any]]) -> str:
    sims = {d["meta"]["target"]: d for d in sim}
    lines = ["| policy | tier | real n | real p50 | sim p50 | Δ p50 | real p99 | sim p99 | Δ p99 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for doc in sorted(real, key=lambda d: d["meta"]["target"]):
        target = doc["meta"]["target"]
        sdoc = sims.get(target)
        for tier in (None, *TIERS):
            rt = _ttfts(doc, "est_adapter_tier", tier)
            st = _ttfts(sdoc, "gt_adapter_tier", tier) if sdoc else []
            if tier is not None and not rt and not st:
                continue
            r50, s50, r99, s99 = percentile(rt, 50), percentile(st, 50), percentile(rt, 99), percentile(st, 99)
            lines.append(f"| {target} | {tier or 'all'} | {len(rt)} | {_ms(r50)} ms | {_ms(s50)} ms | {_delta(r50, s50)} | "
                         f"{_ms(r99)} ms | {_ms(s99)} ms | {_delta(r99, s99)} |")
    return "\n".join(lines) + "\n"


def targets(real: Sequence[dict[str, Any]], sim: Sequence[dict[str, Any]]) -> list[str]:
    """The issue's targets, one line each: met or missed and by how much."""
    p99 = {d["meta"]["target"]: percentile(_ttfts(d), 99) for d in real}
    out = []
    d, rr, llmd = p99.get("default"), p99.get("round-robin"), p99.get("llm-d")
    if d is not None and rr:
        out.append(f"default p99 / round-robin p99 = {d / rr:.2f} (target ≤ 0.5): {'met' if d <= 0.5 * rr else 'missed'}")
    if d is not None and llmd:
        out.append(f"default p99 {_ms(d)} ms vs llm-d {_ms(llmd)} ms (target: below): {'met' if d < llmd else 'missed'}")
    sims = {s["meta"]["target"]: s for s in sim}
    for doc in real:
        s = sims.get(doc["meta"]["target"])
        if not s:
            continue
        for q in (50, 99):
            r, v = percentile(_ttfts(doc), q), percentile(_ttfts(s), q)
            if r and v is not None:
                off = (v - r) / r
                out.append(f"{doc['meta']['target']} p{q}: sim {_ms(v)} ms vs real {_ms(r)} ms ({100 * off:+.0f} %; "
                           f"target ±25 %): {'met' if abs(off) <= 0.25 else 'missed'}")
    return out


def report(real: Sequence[dict[str, Any]], sim: Sequence[dict[str, Any]]) -> str:
    parts = ["## Policies on the real servers\n\n", real_table(real), "\n"]
    if sim:
        parts += ["## Real vs simulated (same spec, rate and requests)\n\n", compare_table(real, sim), "\n"]
    parts += ["## Targets\n\n", *(f"- {line}\n" for line in targets(real, sim))]
    return "".join(parts)


def counterpart_spec(spec_path: Path, profile: str, sim_args: Sequence[str], pods: int, folder: Path) -> Path:
    """A copy of the spec whose cluster uses ``profile`` (and extra simulator flags). The real
    servers were warmed up before the replays (the driver's ``warmup`` phase: an eager engine's
    one-off LoRA kernel compile is paid there), so the simulated pods start without it."""
    data = yaml.safe_load(spec_path.read_text()) or {}
    cluster = dict(data.get("cluster") or {})
    cluster["profile"] = profile
    cluster["pods"] = pods
    cluster["sim_args"] = [*(cluster.get("sim_args") or []), "--cost", "first_lora_jit_s=0", *sim_args]
    data["cluster"] = cluster
    out = folder / spec_path.name
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def simulate(real: Sequence[dict[str, Any]], spec_path: Path, profile: str, out_dir: Path, *,
             sim_args: Sequence[str] = (), time_scale: float = 1.0) -> list[Path]:
    """Replay each real result's target, rate and request count on the simulator."""
    from bench.cluster import Target
    from bench.runner import RunOptions, run

    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="loraroute-counterpart-") as tmp:
        for doc in real:
            meta = doc["meta"]
            spec = counterpart_spec(spec_path, profile, sim_args, len(meta["pods"]), Path(tmp))
            opts = RunOptions(spec_path=spec, target=Target.parse(meta["target"]), loads=[float(meta["load"])],
                              requests=int(meta["requests"]), time_scale=time_scale,
                              capacity=float(meta["capacity_rps"]), out_dir=out_dir, progress=False,
                              extra_meta={"counterpart_of": doc.get("_path"), "profile": profile})
            written += run(dataclasses.replace(opts))
    return written
