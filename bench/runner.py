"""`loraroute bench run SPEC --policy NAME | --peer NAME [--load F ...]`: one target, one or more loads.

For each load level the runner starts a *fresh* simulated cluster (cold caches, every adapter only
on disk), the state plane and the router under test (``bench.cluster``), replays the spec's trace
open-loop at ``load × capacity`` requests per simulated second (``bench.client``), then joins each
request with the simulator's ground truth (``GET /sim/state`` of every pod, by ``X-Request-Id``)
and computes its lower bound. One JSON document per (target, load) goes to
``bench/results/<spec>/<target>-load<NN>.json``::

    {"meta": {spec, target, load, rate_rps, capacity_rps, time_scale, requests, pods, state_plane,
              replicas, spread, replica_requests,
              cpu: {process: {cpu_s, cpu_pct}, machine: {busy_pct, cores, wall_s}}, ...},
     "requests": [{id, adapter, rank, turn, scheduled_s, sent_s, ttft_s, e2e_s, status, error, pod, replica,
                   output_tokens, prompt_tokens, cached_tokens, gt_adapter_tier, gt_cached_tokens,
                   gt_prompt_tokens, gt_load_s, gt_queue_s, ideal_ttft_s}, ...],
     "summary": {... bench.stats.summarize ...}}

A target with ``replicas`` > 1 runs that many gateway processes on the same Redis and sidecars;
the client spreads requests over them (``bench.client.Spreader``); each request row says which
``replica`` served it, ``cpu.router`` is the replicas' sum and ``cpu["router:<i>"]`` each one.

Client-side times (``ttft_s``, ``e2e_s``, ``sent_s``) are wall seconds; divide by ``time_scale``
for simulated seconds (``bench.stats`` does). Ground-truth and ideal times are simulated seconds.

Capacity (requests per simulated second), measured once per spec and cached in
``bench/results/<spec>/capacity.json`` with the cost profile it was measured under (reused only
under the same profile; ``--capacity R`` overrides, ``--remeasure`` refreshes):
a fresh cluster behind our gateway with the ``least-loaded`` preset (adapter-unaware, evenly
balanced: what the cluster does without adapter-aware routing) serves the spec's requests
closed-loop with ``32 × pods`` requests always in flight; capacity = requests completed between
the 20 % and the 80 % completion marks / the simulated time between them (the steady state,
without ramp-up and drain).

Disk-tier admissions against two references from the same trace (compulsory first uses, one
LRU cache of the cluster's ``pods × max_cpu_loras`` entries): ``bench.bounds``, in ``doc["bounds"]``,
with the simulator's disk loads during the replay (``meta.sim_disk_loads``).

With placement (``Target.placement``, ``--placement``): the gateway runs the placer and the
``placement-plan`` scorer (``bench.placement``); yesterday's demand is seeded into the store first
(``--no-persisted-demand``: not), so a cold cluster is warmed before the replay; what the placer
did is in ``doc["placement"]``.

Lower bound per request: ``vllm_sim.costs.ideal_ttft(profile, prompt_tokens, cached, lora=True)``
(the spec's ``cluster.profile`` and ``cluster.cost``) where
``cached`` is the block-aligned token length of the request's shareable prefix (its system prompt
and earlier turns, rendered with the simulator's chat template), i.e. the TTFT if it ran alone on
an idle pod with its adapter on GPU and its shareable prefix in the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import peers as peers_mod
from bench import placement as placement_mod
from bench.bounds import bound_summary
from bench.client import ReplayConfig, RequestResult, closed_loop, replay
from bench import precise as precise_mod
from bench.cluster import BenchCluster, Target
from bench.procstats import CpuMeter
from bench.stats import summarize
from bench.workload import TraceRequest, WorkloadSpec, generate, load_spec, sim_profile, system_prompt

RESULTS_ROOT = Path("bench/results")
CAPACITY_POLICY = "least-loaded"
CAPACITY_INFLIGHT_PER_POD = 32
BLOCK_TOKENS = 16


def code_version(checkout: Path | None = None) -> str | None:
    """``git describe --always --dirty`` of the checkout the benchmark runs from (or of
    ``checkout``; None outside git): which code produced a result file."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"],
                             cwd=checkout or Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@dataclass
class RunOptions:
    spec_path: Path
    target: Target
    loads: list[float] | None = None
    requests: int | None = None
    time_scale: float = 5.0
    capacity: float | None = None
    capacity_requests: int | None = None   # requests of the capacity run (default: see module doc)
    remeasure: bool = False
    out_dir: Path = RESULTS_ROOT
    progress: bool = True
    max_inflight: int = 4096
    keep_logs: bool = False
    sidecars: bool | None = None
    warmup: bool = False      # steady state: every adapter's system prompts served once first
    placement: placement_mod.PlacementOptions = field(default_factory=placement_mod.PlacementOptions)
    extra_meta: dict[str, Any] = field(default_factory=dict)
    # top-level gateway config sections laid over every replica's generated config (policies only)
    gateway_extra: dict[str, Any] | None = None
    # entered with the router URLs around the measured replay (e.g. polling an admin route)
    observer: Callable[[list[str]], contextlib.AbstractContextManager[Any]] | None = None


# ------------------------------------------------------------------------------------ helpers
def model_name(target: Target, spec: WorkloadSpec, req: TraceRequest) -> str:
    """What the client sends as ``model``: ``<base>:<adapter>`` to our gateway, the adapter name
    vLLM knows to peers (which do not rewrite names) and to a pod directly."""
    if target.kind == "policy":
        return f"{spec.cluster.base_model}:{req.adapter}"
    return req.adapter


def shareable_tokens(req: TraceRequest) -> int:
    """Block-aligned simulator tokens of the request's shareable prefix: its system prompt and
    earlier turns rendered with the simulator's chat template, plus the header of the next
    (user) message, which every request continuing that prefix shares."""
    from vllm_sim.tokenizer import apply_chat_template

    shared = req.messages[: req.shared_prefix_messages]
    text = apply_chat_template(shared, add_generation_prompt=False)
    nxt = req.messages[req.shared_prefix_messages:req.shared_prefix_messages + 1]
    if nxt:
        full = apply_chat_template([*shared, nxt[0]], add_generation_prompt=False)
        header_end = full.index(nxt[0]["content"], len(text)) if nxt[0]["content"] else len(full)
        text = full[:header_end]
    n_bytes = len(text.encode())
    return (n_bytes // (4 * BLOCK_TOKENS)) * BLOCK_TOKENS


def prompt_tokens_of(req: TraceRequest) -> int:
    from vllm_sim.tokenizer import apply_chat_template, count_tokens

    return count_tokens(apply_chat_template(req.messages))


def ideal_ttft_s(profile: Any, req: TraceRequest, prompt_tokens: int | None = None,
                 cached_tokens: int | None = None) -> float:
    """Lower bound; the cached part is the shareable prefix, or what the pod actually had cached
    when that was more (e.g. a few bytes of the user turn shared by chance)."""
    from vllm_sim.costs import ideal_ttft

    p = prompt_tokens if prompt_tokens is not None else prompt_tokens_of(req)
    cached = max(shareable_tokens(req), int(cached_tokens or 0))
    return float(ideal_ttft(profile, p, cached, lora=True))  # every trace request names an adapter


# ------------------------------------------------------------------------------------ ground truth
_ID_KEYS = ("request_id", "id", "x_request_id", "external_id")
_LIST_KEYS = ("requests", "recent_requests", "recent", "finished")


def _records(state: dict[str, Any]) -> list[dict[str, Any]]:
    for key in _LIST_KEYS:
        value = state.get(key)
        if isinstance(value, list):
            return [v for v in value if isinstance(v, dict)]
        if isinstance(value, dict):
            return [dict(v, request_id=k) if isinstance(v, dict) else {} for k, v in value.items()]
    return []


def _first(d: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return None


def _tier(rec: dict[str, Any]) -> str | None:
    tier = _first(rec, "adapter_tier", "adapter_tier_at_admission", "lora_tier", "tier")
    if isinstance(tier, str):
        t = tier.lower()
        return "gpu" if t.startswith("gpu") else "cpu" if t.startswith("cpu") else (
            "none" if t in ("none", "base", "") else "disk")
    on_gpu = _first(rec, "adapter_on_gpu", "adapter_was_on_gpu", "lora_on_gpu")
    if on_gpu is not None:
        return "gpu" if on_gpu else "cpu_or_disk"
    return None


def _content_key(adapter: Any, prompt_tokens: Any, output_tokens: Any) -> tuple[str, int, int]:
    return (str(adapter), int(prompt_tokens or 0), int(output_tokens or 0))


def join_ground_truth(rows: list[dict[str, Any]], states: dict[str, dict[str, Any]]) -> int:
    """Add ``gt_*`` fields (and ``pod`` when missing) to ``rows`` from each pod's /sim/state.

    Join by ``X-Request-Id`` (the simulator echoes it as ``request_id``). A router that does not
    forward that header leaves the simulator to invent ids; those records are then joined by
    content: (pod when known, adapter, prompt tokens, output tokens), in arrival order among equal
    keys (rows need ``expected_prompt_tokens``). Returns how many rows found their record."""
    by_id: dict[str, tuple[str, dict[str, Any]]] = {}
    by_content: dict[tuple[str, int, int], list[tuple[float, str, dict[str, Any]]]] = {}
    for pod_id, state in states.items():
        for rec in _records(state):
            rid = _first(rec, *_ID_KEYS)
            if rid is not None:
                by_id[str(rid)] = (pod_id, rec)
            key = _content_key(rec.get("adapter"), rec.get("prompt_tokens"), rec.get("output_tokens"))
            by_content.setdefault(key, []).append((float(rec.get("arrival") or 0.0), pod_id, rec))
    for recs in by_content.values():
        recs.sort(key=lambda x: x[0])
    used: set[int] = set()
    found = 0
    for row in sorted(rows, key=lambda r: r.get("sent_s") or 0.0):
        hit = by_id.get(row["id"])
        if hit is None and row.get("status") == 200 and row.get("expected_prompt_tokens") is not None:
            key = _content_key(row.get("adapter"), row["expected_prompt_tokens"], row.get("output_tokens"))
            for _, pod_id, rec in by_content.get(key, ()):
                if id(rec) in used or (row.get("pod") and row["pod"] != pod_id):
                    continue
                hit = (pod_id, rec)
                break
        if hit is None:
            continue
        used.add(id(hit[1]))
        found += 1
        pod_id, rec = hit
        row["gt_pod"] = pod_id
        if not row.get("pod"):
            row["pod"] = pod_id
        row["gt_adapter_tier"] = _tier(rec)
        row["gt_cached_tokens"] = _first(rec, "cached_tokens", "num_cached_tokens")
        row["gt_prompt_tokens"] = _first(rec, "prompt_tokens", "num_prompt_tokens")
        row["gt_load_s"] = _first(rec, "adapter_load", "adapter_load_s", "load_s")
        row["gt_queue_s"] = _first(rec, "queue_wait", "queue_s")
        row["gt_ttft_s"] = _first(rec, "ttft", "ttft_s")
    return found


# ------------------------------------------------------------------------------------ one run
def _replay_cfg(router_urls: list[str], target: Target, spec: WorkloadSpec, opts: RunOptions, label: str,
                api_key: str | None) -> ReplayConfig:
    return ReplayConfig(
        url=router_urls[0], urls=router_urls, spread=target.spread,  # type: ignore[arg-type]
        model_for=lambda r: model_name(target, spec, r), time_scale=opts.time_scale,
        api_key=api_key, max_inflight=opts.max_inflight, progress_label=label, progress=opts.progress,
    )


def _start_router(cluster: BenchCluster, target: Target,
                  placement: placement_mod.PlacementOptions | None = None,
                  gateway_extra: dict[str, Any] | None = None) -> tuple[list[str], str | None]:
    """(URLs of the router's replicas, api key) of the router under test; its processes are
    named ``router`` (one) or ``router:<i>`` (several replicas) for the CPU meter. With
    ``target.placement`` yesterday's demand is seeded first (unless ``placement.persisted`` is
    off) and the gateways wait for their warm-up before they count as ready; ``gateway_extra``
    is laid over every replica's config last."""
    if target.kind == "policy":
        extras: list[dict[str, Any]] | None = None
        ready_timeout = 30.0
        if target.placement:
            opts = placement or placement_mod.PlacementOptions()
            demand_file = None if cluster.redis_url else cluster.work_dir / "demand.json"
            if opts.persisted:
                placement_mod.seed_demand(placement_mod.yesterday_snapshot(cluster.spec), cluster.redis_url,
                                          demand_file)
            extras = [placement_mod.gateway_settings(target.name, opts, demand_file, i)
                      for i in range(target.replicas)]
            ready_timeout = 300.0  # the warm-up of every pod before it takes traffic
        if not target.sharing:
            gateway_extra = {**(gateway_extra or {}), "sharing": {"enabled": False}}
        if target.precise:
            gateway_extra = {**(gateway_extra or {}),
                             "pipeline": precise_mod.pipeline(target.name, cluster.adapter_dir_for(cluster.pods[0]))}
        if gateway_extra:
            extras = [{**(extras[i] if extras else {}), **gateway_extra} for i in range(target.replicas)]
        procs = cluster.start_gateways(target.name, target.replicas, extras, ready_timeout)
        for i, proc in enumerate(procs):
            proc.name = "router" if len(procs) == 1 else f"router:{i}"
        return [p.url for p in procs], None
    if target.kind == "peer":
        proc = cluster.start_peer(target.name)
        proc.name = "router"
        key = proc.extra.get("api_key")
        return [proc.url], (str(key) if key else None)
    return [cluster.pods[0].url], None


def measure_capacity(spec: WorkloadSpec, opts: RunOptions, work_dir: Path) -> dict[str, Any]:
    """Closed-loop steady-state throughput (requests per simulated second); see module docstring."""
    n_pods = spec.cluster.pods
    concurrency = CAPACITY_INFLIGHT_PER_POD * n_pods
    n = opts.capacity_requests or max(4 * concurrency, min(spec.requests or 2000, 2000))
    trace = generate(spec, rate=1.0, requests=n)
    target = Target("policy", CAPACITY_POLICY)
    with BenchCluster(spec, work_dir / "capacity", time_scale=opts.time_scale, sidecars=opts.sidecars) as cl:
        urls, key = _start_router(cl, target)
        cfg = _replay_cfg(urls, target, spec, opts, f"capacity {spec.name}", key)
        results = asyncio.run(closed_loop(trace, cfg, concurrency))
    done = sorted(r.sent_s + (r.e2e_s or 0.0) for r in results if r.error is None and r.ttft_s is not None)
    if len(done) < 10:
        errors = [r.error for r in results if r.error][:3]
        raise RuntimeError(f"capacity run failed: {len(done)} ok of {len(results)}; e.g. {errors}")
    i0, i1 = int(0.2 * len(done)), int(0.8 * len(done))
    span_sim = (done[i1] - done[i0]) / opts.time_scale
    capacity = (i1 - i0) / span_sim
    return {"capacity_rps": round(capacity, 3), "policy": CAPACITY_POLICY, "inflight": concurrency,
            "requests": n, "ok": len(done), "time_scale": opts.time_scale,
            "profile": sim_profile(spec.cluster).to_dict(),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def get_capacity(spec: WorkloadSpec, opts: RunOptions, work_dir: Path) -> dict[str, Any]:
    if opts.capacity:
        return {"capacity_rps": opts.capacity, "policy": "given on the command line"}
    path = opts.out_dir / spec.name / "capacity.json"
    if path.exists() and not opts.remeasure:
        cached = json.loads(path.read_text())
        if cached.get("profile") == sim_profile(spec.cluster).to_dict():
            return cached  # type: ignore[no-any-return]
        print(f"{path} was measured with another cost profile; measuring again", file=sys.stderr)
    print(f"measuring capacity of {spec.name} ({CAPACITY_POLICY}, closed loop) ...", file=sys.stderr)
    cap = measure_capacity(spec, opts, work_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cap, indent=2))
    print(f"capacity: {cap['capacity_rps']:.1f} requests per simulated second", file=sys.stderr)
    return cap


def warmup_trace(spec: WorkloadSpec) -> list[TraceRequest]:
    """One short request per (adapter, system prompt) of the spec, ids ``warmup-...``.

    Sent through the router under test before the measured replay, so the run starts from a
    cluster that has served every adapter and system prompt once (a steady state) instead of a
    cold one where every adapter's first use is a disk load no router can avoid. The router makes
    its own placement decisions during the warm-up; nothing of it is recorded. Output is 8
    tokens, so no warm-up record can be mistaken for a trace request in the ground-truth join."""
    out = []
    for a in range(spec.adapters.count):
        for k in range(spec.prefix.system_prompts_per_adapter):
            out.append(TraceRequest(
                id=f"warmup-{a:04d}-{k}", t=0.0, adapter=spec.adapters.name(a), rank=spec.adapters.rank(a),
                conversation=-1, turn=0, system_prompt=k,
                messages=[{"role": "system", "content": system_prompt(spec, a, k)},
                          {"role": "user", "content": "warm-up"}],
                max_tokens=8, shared_prefix_messages=1,
            ))
    return out


def request_rows(trace: list[TraceRequest], results: list[RequestResult]) -> list[dict[str, Any]]:
    """One result row per request: the client's measurement plus what the trace says of it."""
    rows = []
    for req, res in zip(trace, results):
        row = res.to_dict()
        row.update(rank=req.rank, turn=req.turn, conversation=req.conversation,
                   expected_prompt_tokens=prompt_tokens_of(req))
        rows.append(row)
    return rows


def run_point(spec: WorkloadSpec, opts: RunOptions, load: float, capacity: dict[str, Any],
              work_dir: Path) -> dict[str, Any]:
    """One target at one load level on a fresh cluster; returns the result document."""
    rate = load * float(capacity["capacity_rps"])
    n = opts.requests or spec.requests
    trace = generate(spec, rate=rate, requests=n, duration_s=None if n else spec.duration_s)
    target = opts.target
    label = f"{target.label} @{int(round(load * 100))}%"
    with BenchCluster(spec, work_dir / f"{target.label.replace(':', '-')}-{load}",
                      time_scale=opts.time_scale, sidecars=opts.sidecars, kv_events=target.precise) as cl:
        urls, key = _start_router(cl, target, opts.placement, opts.gateway_extra)
        warmed = 0
        if opts.warmup:
            warm = warmup_trace(spec)
            wcfg = _replay_cfg(urls, target, spec, opts, f"{label} warm-up", key)
            warm_results = asyncio.run(closed_loop(warm, wcfg, 2 * spec.cluster.pods))
            warmed = sum(r.error is None for r in warm_results)
        loads_before = sum(int(cl.sim_state(pod, limit=0).get("disk_loads", 0)) for pod in cl.pods)
        mono_offset = time.time() - time.monotonic()
        meter = CpuMeter({**cl.pids(), "client": os.getpid()}, own_only={"client"})
        meter.start()
        t0 = time.monotonic()
        ops_before = sharing_ops(urls) if target.kind == "policy" else None
        with opts.observer(urls) if opts.observer is not None else contextlib.nullcontext():
            results: list[RequestResult] = asyncio.run(replay(trace, _replay_cfg(urls, target, spec, opts, label, key)))
        wall = time.monotonic() - t0
        cpu = meter.stop()
        ops_after = sharing_ops(urls) if target.kind == "policy" else None
        states = {}
        for pod in cl.pods:
            try:
                states[pod.id] = cl.sim_state(pod)
            except Exception as e:  # noqa: BLE001 - recorded, the run still reports client data
                states[pod.id] = {"error": str(e)[:200]}
        state_plane = cl.state_plane
        pods = [p.id for p in cl.pods]
        report = placement_mod.leader_report(urls) if target.placement else None
        precise = precise_mod.feed_meta(urls) if target.precise else None
    loads_after = sum(int(st.get("disk_loads", 0)) for st in states.values())
    profile = sim_profile(spec.cluster)
    rows = request_rows(trace, results)
    found = join_ground_truth(rows, states)
    for req, row in zip(trace, rows):
        row["ideal_ttft_s"] = round(ideal_ttft_s(profile, req, row.get("gt_prompt_tokens"),
                                                     row.get("gt_cached_tokens")), 6)
    cpu_grouped = _group_cpu(cpu)
    doc = {
        "meta": {
            "spec": spec.name, "spec_path": str(opts.spec_path), "target": target.label,
            "target_kind": target.kind, "load": load, "rate_rps": round(rate, 3),
            "capacity": capacity, "capacity_rps": capacity["capacity_rps"], "time_scale": opts.time_scale,
            "requests": len(rows), "pods": pods, "state_plane": state_plane,
            "replicas": target.replicas, "spread": target.spread if target.replicas > 1 else None,
            "replica_requests": _replica_counts(rows, target.replicas),
            "ground_truth_joined": found, "warmup_requests": warmed, "wall_s": round(wall, 2), "cpu": cpu_grouped,
            "cluster": spec.to_dict()["cluster"], "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "code_version": code_version(),
            "sim_disk_loads": {"before": loads_before, "replay": loads_after - loads_before},
            "placement": opts.placement.to_dict() if target.placement else None,
            "sharing": _sharing_meta(ops_before, ops_after, len(rows)), "precise_prefix": precise,
            **opts.extra_meta,
        },
        "requests": rows,
    }
    doc["summary"] = summarize(doc)
    doc["bounds"] = bound_summary(doc)
    if report is not None:
        doc["placement"] = placement_mod.placement_summary(doc, report, mono_offset, t0)
    return doc


def sharing_ops(urls: list[str]) -> dict[str, float] | None:
    """The replicas' ``loraroute_sharing_*`` counters summed (None when sharing is off), from
    their /metrics."""
    names = {"loraroute_sharing_store_ops_total": "ops",
             'loraroute_sharing_messages_total{direction="published"}': "published",
             'loraroute_sharing_messages_total{direction="received"}': "received"}
    out: dict[str, float] = {}
    for url in urls:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if name in names:
                out[names[name]] = out.get(names[name], 0.0) + float(value)
    return out or None


def _sharing_meta(before: dict[str, float] | None, after: dict[str, float] | None,
                  requests: int) -> dict[str, float] | None:
    """Store operations and messages of the shared routing state during the replay."""
    if before is None or after is None:
        return None
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    return {**d, "ops_per_request": round(d.get("ops", 0.0) / requests, 3) if requests else None}


def _replica_counts(rows: list[dict[str, Any]], replicas: int) -> list[int]:
    counts = [0] * replicas
    for row in rows:
        i = row.get("replica")
        if isinstance(i, int) and 0 <= i < replicas:
            counts[i] += 1
    return counts


def _group_cpu(cpu: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Sidecars summed under ``sidecars``; gateway replicas summed under ``router`` (each replica
    also kept as ``router:<i>``)."""
    out: dict[str, dict[str, float]] = {}
    groups: dict[str, list[dict[str, float]]] = {"sidecars": [], "router": []}
    for name, v in cpu.items():
        if name.startswith("sidecar:"):
            groups["sidecars"].append(v)
            continue
        if name.startswith("router:"):
            groups["router"].append(v)
        out[name] = v
    for group, members in groups.items():
        if members:
            out[group] = {"cpu_s": round(sum(v["cpu_s"] for v in members), 3),
                          "cpu_pct": round(sum(v["cpu_pct"] for v in members), 1), "count": float(len(members))}
    return out


def result_path(out_dir: Path, spec: WorkloadSpec, target: Target, load: float, warm: bool = False) -> Path:
    folder = f"{spec.name}-warm" if warm else spec.name
    return out_dir / folder / f"{target.label.replace(':', '-')}-load{int(round(load * 100)):02d}.json"


def run(opts: RunOptions) -> list[Path]:
    """Run every requested load for one target; returns the result files written."""
    spec = load_spec(opts.spec_path)
    if opts.target.kind == "peer":
        ok, reason = peers_mod.peer_available(opts.target.name)
        if not ok:
            print(f"skipping peer {opts.target.name}: {reason}", file=sys.stderr)
            return []
    work_dir = Path(tempfile.mkdtemp(prefix=f"loraroute-bench-{spec.name}-"))
    written = []
    try:
        capacity = get_capacity(spec, opts, work_dir)
        for load in opts.loads or list(spec.loads):
            doc = run_point(spec, opts, load, capacity, work_dir)
            path = result_path(opts.out_dir, spec, opts.target, load, opts.warmup)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(doc))
            s = doc["summary"]
            b = doc["bounds"]
            print(_one_line(s) + f" disk-tier {b['disk_admissions']} (compulsory {b['compulsory']}, "
                  f"cluster LRU {b['cluster_lru']})", file=sys.stderr)
            written.append(path)
    finally:
        if opts.keep_logs:
            print(f"logs kept in {work_dir}", file=sys.stderr)
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    return written


def _fmt(v: Any, unit: str = "", nd: int = 3) -> str:
    return "-" if v is None else f"{v:.{nd}f}{unit}"


def _one_line(s: dict[str, Any]) -> str:
    return (f"{s['target']} load {s['load']}: ok {s['ok']}/{s['requests']} TTFT p50 {_fmt(s['ttft_p50'], 's')} "
            f"p99 {_fmt(s['ttft_p99'], 's')} gpu-hit {_fmt(s['adapter_gpu_hit'], nd=2)} "
            f"prefix-hit {_fmt(s['prefix_hit'], nd=2)} ideal-ratio {_fmt(s['ideal_ratio_p50'], nd=2)} "
            f"router CPU {_fmt(s['router_cpu_pct'], '%', 0)} machine {_fmt(s['machine_busy_pct'], '%', 0)}")
