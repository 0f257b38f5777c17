"""Running a benchmark point "with placement": gateway config, persisted demand, what it did.

- ``gateway_settings(preset, opts)``: the pipeline (the preset's scorers plus ``placement-plan``
  at ``opts.weight``), the ``placement`` section and a throwaway admin key (the runner reads
  ``/admin/placement`` after the replay; the gateway listens on loopback only).
- ``yesterday_snapshot(spec)``: the demand a cluster would have persisted the day before — the
  spec's workload drawn again with another seed (the same popularity, other requests), counted
  as one writer's snapshot published a day ago. ``seed_demand`` puts it where the gateway will
  read it: Redis (``{prefix}:demand:yesterday``) when the state plane has one, else the JSON
  file the gateway's ``placement.demand.file`` names.
- ``spec_plan(spec)``: the plan a cluster of the spec's shape would get from yesterday's demand
  (``loraroute bench plan SPEC`` prints it).
- ``placement_summary(doc, report, offset)``: the loads the placer made (from its
  ``/admin/placement`` report), their stall per pod and phase, and the requests that shared a pod
  with a pre-load — their count and TTFT p99 (a pre-load stalls every request running there).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.stats import is_ok, percentile
from bench.workload import WorkloadSpec, generate
from podstate.placement_store import MemoryPlacementStore, PlacementStore, RedisPlacementStore
from scorer.demand import Demand, DemandKey, DemandSnapshot, DemandTracker, merge_demand
from scorer.model import AdapterRef, PodState, RoutingRequest
from scorer.placement import PlacementPlan, plan_placement
from scorer.presets import PRESETS

ADMIN_KEY = "bench-admin-key"  # loopback-only benchmark gateway; never a real key
YESTERDAY_SEED_OFFSET = 1000
DAY_S = 86400.0


@dataclass(frozen=True)
class PlacementOptions:
    """``weight``: of the placement-plan scorer; ``persisted``: seed yesterday's demand first;
    ``settings``: extra keys of the gateway's ``placement`` section (merged over the defaults)."""

    weight: float = 0.5
    persisted: bool = True
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def admin_digest() -> str:
    return hashlib.sha256(ADMIN_KEY.encode()).hexdigest()


def pipeline_with_plan(preset: str, weight: float) -> dict[str, Any]:
    """The preset with the placement-plan scorer added to its scorers."""
    base = PRESETS[preset]
    return {"preset": preset, "name": f"{preset}+placement",
            "scorers": [*base["scorers"], {"type": "placement-plan", "weight": weight}]}


def gateway_settings(preset: str, opts: PlacementOptions, demand_file: Path | None,
                     replica: int | None = None) -> dict[str, Any]:
    """Keys to merge into the benchmark gateway's config (``replica``: its index among several,
    which makes its replica id unique)."""
    # every action kept: the runner reads them all after the replay
    replica_id = "bench-gateway" if not replica else f"bench-gateway-{replica}"
    placement: dict[str, Any] = {"enabled": True, "replica_id": replica_id, "actions_kept": 100_000,
                                 **opts.settings}
    if demand_file is not None:
        placement["demand"] = {**placement.get("demand", {}), "file": str(demand_file)}
    return {"pipeline": pipeline_with_plan(preset, opts.weight), "placement": placement,
            "admin": {"api_key_sha256": [admin_digest()]}}


def yesterday_snapshot(spec: WorkloadSpec, now: float | None = None, requests: int | None = None) -> DemandSnapshot:
    """See the module docstring. One count per request of the redrawn trace, all a day old."""
    now = time.time() if now is None else now
    other = dataclasses.replace(spec, seed=spec.seed + YESTERDAY_SEED_OFFSET)
    n = requests or spec.requests or 2000
    at = now - DAY_S
    tracker = DemandTracker(max_adapters=max(4096, spec.adapters.count))
    base = spec.cluster.base_model
    for req in generate(other, rate=1.0, requests=n):
        tracker.observe(RoutingRequest(AdapterRef(base, req.adapter, req.rank)), at)
    return tracker.snapshot("yesterday", at)


def spec_inputs(spec: WorkloadSpec, now: float) -> tuple[Demand, dict[str, PodState], dict[DemandKey, int]]:
    """What a plan for the spec's cluster is made of: yesterday's demand (merged), the cluster as
    healthy PodStates ``pod-0`` …, and the adapters' ranks."""
    c = spec.cluster
    pods = {f"pod-{i}": PodState(f"pod-{i}", "", base_models=(c.base_model,), max_loras=c.max_loras,
                                 max_cpu_loras=c.max_cpu_loras, max_lora_rank=c.max_lora_rank) for i in range(c.pods)}
    ranks = {(c.base_model, name): rank for name, rank in spec.adapters.all()}
    return merge_demand([yesterday_snapshot(spec, now)], now), pods, ranks


def spec_plan(spec: WorkloadSpec, now: float | None = None) -> PlacementPlan:
    """The plan for the spec's cluster from yesterday's demand (``spec_inputs``)."""
    now = time.time() if now is None else now
    demand, pods, ranks = spec_inputs(spec, now)
    return plan_placement(demand, pods, ranks=ranks, now=now)


def demand_store(redis_url: str | None, demand_file: Path | None) -> PlacementStore:
    if redis_url:
        return RedisPlacementStore(redis_url)
    return MemoryPlacementStore(demand_file)


def seed_demand(snapshot: DemandSnapshot, redis_url: str | None, demand_file: Path | None) -> None:
    async def put() -> None:
        store = demand_store(redis_url, demand_file)
        await store.start()
        try:
            await store.publish_demand(snapshot)
        finally:
            await store.close()

    asyncio.run(put())


def fetch_report(gateway_url: str, timeout: float = 30.0) -> dict[str, Any]:
    req = urllib.request.Request(gateway_url + "/admin/placement?limit=100000",
                                 headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback only
        return json.loads(resp.read())


def leader_report(gateway_urls: list[str]) -> dict[str, Any]:
    """The placement report of the replica that leads (it holds the actions), else the first's."""
    reports = [fetch_report(u) for u in gateway_urls]
    return next((r for r in reports if r.get("is_leader")), reports[0])


def max_window_stall(loads: list[dict[str, Any]], window_s: float) -> dict[str, float]:
    """Per pod, the most pre-load stall that fell in any ``window_s`` window (by load start)."""
    out: dict[str, float] = {}
    per_pod: dict[str, list[tuple[float, float]]] = {}
    for a in loads:
        if a["phase"] == "preload":
            per_pod.setdefault(a["pod"], []).append((float(a["at"]), float(a.get("stall_s") or 0.0)))
    for pod, items in per_pod.items():
        items.sort()
        best = total = 0.0
        j = 0
        for t, s in items:
            total += s
            while items[j][0] <= t - window_s:
                total -= items[j][1]
                j += 1
            best = max(best, total)
        out[pod] = round(best, 4)
    return out


def placement_summary(doc: dict[str, Any], report: dict[str, Any], mono_offset: float,
                      replay_start: float) -> dict[str, Any]:
    """``mono_offset``: ``time.time() − time.monotonic()`` on this machine (the placer's times are
    Unix seconds, the client's ``sent_s`` monotonic); ``replay_start``: monotonic time the replay
    began. ``loads`` lists every load with its wall seconds from the replay start (negative: before
    it, e.g. the warm-up); ``sharing_a_load`` the ids of the requests that shared a pod with one."""
    scale = float(doc["meta"].get("time_scale", 1.0)) or 1.0
    loads = [a for a in report.get("actions", []) if a.get("outcome") in ("loaded", "failed")]
    by_phase: dict[str, dict[str, float]] = {}
    for a in loads:
        p = by_phase.setdefault(a["phase"], {"loads": 0, "failed": 0, "stall_s": 0.0})
        p["loads"] += 1
        p["failed"] += a["outcome"] == "failed"
        p["stall_s"] += float(a.get("stall_s") or 0.0)
    windows: dict[str, list[tuple[float, float]]] = {}
    for a in loads:
        if a["phase"] == "preload" and a.get("ended_at") is not None:
            windows.setdefault(a["pod"], []).append((a["at"] - mono_offset, a["ended_at"] - mono_offset))
    shared: list[float] = []
    shared_ids: list[str] = []
    for r in doc["requests"]:
        if not is_ok(r) or not r.get("pod"):
            continue
        start, end = r["sent_s"], r["sent_s"] + r["ttft_s"]
        if any(s < end and start < e for s, e in windows.get(r["pod"], ())):
            shared.append(r["ttft_s"] / scale)
            shared_ids.append(r["id"])
    rel = [{"pod": a["pod"], "adapter": a["adapter"], "role": a["role"], "phase": a["phase"], "outcome": a["outcome"],
            "stall_s": a.get("stall_s"), "start_s": round(a["at"] - mono_offset - replay_start, 4),
            "end_s": round(a["ended_at"] - mono_offset - replay_start, 4) if a.get("ended_at") else None}
           for a in sorted(loads, key=lambda a: a["at"])]
    skipped = report.get("counts", {}).get("skipped", {})
    window = float(next(iter(report.get("pods", {}).values()), {}).get("stall_budget", {}).get("window_s", 60.0))
    return {
        "by_phase": by_phase,
        "skipped": skipped,
        "stall_by_pod": {s["pod"]: s["seconds"] for s in report.get("counts", {}).get("stall_s", [])
                         if s["phase"] == "preload"},
        "budget_s": next(iter(report.get("pods", {}).values()), {}).get("stall_budget", {}).get("budget_s"),
        "window_s": window,
        "max_window_stall_by_pod": max_window_stall(loads, window),
        "requests_sharing_a_load": len(shared),
        "ttft_p99_sharing_a_load": percentile(shared, 99),
        "sharing_a_load": shared_ids,
        "loads": rel,
        "plan_roles": (report.get("plan") or {}).get("roles"),
        "leader": report.get("leader"),
    }
