"""`loraroute bench overhead`: what a router adds on top of the pod, on these cores.

Set-up: two simulated pods with zero delay (``--time-scale 0``: every engine step takes no wall
time), four rank-8 adapters, all on the pods' disk. Targets: ``direct`` (the client talks to pod
0), our gateway (``default`` preset, in-process monitors: the embedded mode) and every installed
peer (``bench.peers``). Requests: a short chat prompt (about 60 tokens) for adapter ``ad000`` with
``max_tokens`` 16.

1. Latency at concurrency 1: ``requests`` sequential requests per target and mode after 20
   warm-up requests, on one keep-alive connection. Targets are interleaved in ``rounds`` rounds
   (5; each round sends requests/rounds per target and mode, and starts with the next target in
   turn) so that machine noise hits every target alike. Modes: ``non-streaming`` (time to the full JSON body), ``streaming-ttft`` (time
   to the first content chunk) and ``streaming`` (time to ``data: [DONE]``). ``added`` = target
   percentile − direct percentile, same mode; ``added_p50_rounds_ms`` = the same per round (paired
   with direct's samples of that round, which cancels slow drifts of a shared machine), whose
   median and range are the figure to quote. ``cpu_us_per_request``: the router process's CPU
   time over the latency phase, less what it burns idle (its in-process monitors: measured for
   ``IDLE_S`` seconds before and after, averaged, scaled to the phase's length), divided by the
   requests it served.
   ``--baseline-tree DIR`` adds a second gateway run from another checkout (e.g. a ``git worktree``
   of an older commit) as one more interleaved target: an A/B of two versions in one run.
   ``--sharing-ab`` adds two more, both on one Redis (their own key prefixes): shared routing
   state on — with a second, idle replica on its prefix, so the merge and the peer's heartbeats
   are paid — and off: the cost of the sharing itself (``sharing_ops_per_request`` from the
   gateway's ``loraroute_sharing_store_ops_total``).
2. Throughput: non-streaming requests open-loop (Poisson) at each offered rate in ``rates`` for
   ``rate_duration_s`` seconds; a rate is sustained when every request succeeds, the achieved
   completion rate is ≥ 90 % of the offered one (Poisson counts vary) and p99 latency ≤ ``p99_bound_ms``. Stops at the
   first rate that fails. The client, the simulator and the router share the same 2 cores, so the
   ``direct`` row is the ceiling of this set-up.

Results: one JSON document (``meta.kind = "overhead"``) that ``loraroute bench report`` renders.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench import peers as peers_mod
from bench.cluster import BenchCluster
from bench.procstats import CpuMeter
from bench.runner import code_version, sharing_ops
from bench.stats import percentile
from bench.workload import AdapterSpec, ClusterSpec, WorkloadSpec
from loraroute.services import start_redis

MODES = ("non-streaming", "streaming-ttft", "streaming")
WARMUP = 20
IDLE_S = 3.0  # seconds the routers' CPU is measured with no traffic, subtracted per request


@dataclass
class OverheadOptions:
    requests: int = 300
    peers: str = "all"
    p99_bound_ms: float = 50.0
    rates: list[float] = field(default_factory=lambda: [100, 200, 400, 800, 1200, 1600])
    rate_duration_s: float = 5.0
    out: Path = Path("bench/results/overhead/overhead.json")
    progress: bool = True
    rounds: int = 5
    baseline_tree: Path | None = None
    sharing_ab: bool = False


@dataclass
class TargetEndpoint:
    name: str
    url: str
    model: str
    api_key: str | None = None
    pid: int | None = None


def overhead_spec() -> WorkloadSpec:
    return WorkloadSpec(
        name="overhead",
        cluster=ClusterSpec(pods=2, max_loras=4, max_cpu_loras=4, max_lora_rank=64),
        adapters=AdapterSpec(count=4, ranks=(8,)),
    )


def _body(model: str, stream: bool) -> bytes:
    body: dict[str, Any] = {
        "model": model, "max_tokens": 16, "temperature": 0,
        "messages": [{"role": "user", "content": "Summarise the benefits of adapter-aware routing. " * 4}],
    }
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


async def _one(session: aiohttp.ClientSession, t: TargetEndpoint, stream: bool) -> tuple[float, float | None, bool]:
    """(total seconds, first-content seconds or None, ok)."""
    headers = {"Content-Type": "application/json"}
    if t.api_key:
        headers["Authorization"] = f"Bearer {t.api_key}"
    data = _body(t.model, stream)
    t0 = time.perf_counter()
    first = None
    try:
        async with session.post(t.url + "/v1/chat/completions", data=data, headers=headers) as resp:
            if not stream:
                await resp.read()
                return time.perf_counter() - t0, None, resp.status == 200
            async for line in resp.content:
                if first is None and line.startswith(b"data:") and b'"content":"' in line and b'"content":""' not in line:
                    first = time.perf_counter() - t0
                if line.startswith(b"data: [DONE]"):
                    break
            return time.perf_counter() - t0, first, resp.status == 200 and first is not None
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return time.perf_counter() - t0, None, False


Samples = dict[str, dict[str, list[list[float]]]]


async def sequential(targets: list[TargetEndpoint], requests: int, progress: bool, rounds: int = 5) -> Samples:
    """Interleaved sequential latency samples: target -> mode -> one list of seconds per round
    (the key ``errors`` holds the failure count)."""
    samples: Samples = {t.name: {m: [[] for _ in range(rounds)] for m in MODES} for t in targets}
    errors: dict[str, int] = {t.name: 0 for t in targets}
    per_round = max(1, requests // rounds)
    timeout = aiohttp.ClientTimeout(total=60)
    sessions = {t.name: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), timeout=timeout)
                for t in targets}
    try:
        for t in targets:
            for _ in range(WARMUP):
                await _one(sessions[t.name], t, False)
                await _one(sessions[t.name], t, True)
        for rnd in range(rounds):
            k = rnd % len(targets)  # each round starts with another target: no one always follows another
            for t in targets[k:] + targets[:k]:
                s = sessions[t.name]
                mine = samples[t.name]
                for _ in range(per_round):
                    total, _, ok = await _one(s, t, False)
                    if ok:
                        mine["non-streaming"][rnd].append(total)
                    else:
                        errors[t.name] += 1
                for _ in range(per_round):
                    total, first, ok = await _one(s, t, True)
                    if ok and first is not None:
                        mine["streaming"][rnd].append(total)
                        mine["streaming-ttft"][rnd].append(first)
                    else:
                        errors[t.name] += 1
            if progress:
                print(f"overhead latency: round {rnd + 1}/{rounds} done", file=sys.stderr, flush=True)
    finally:
        for s in sessions.values():
            await s.close()
    for name, n in errors.items():
        if n:
            samples[name]["errors"] = [[float(n)]]
    return samples


def latency_entry(mine: list[list[float]], direct: list[list[float]] | None, cpu_pct: float | None) -> dict[str, Any]:
    """p50/p99 over every sample; per round, the p50 paired with direct's p50 of the same round."""
    xs = [x for r in mine for x in r]
    p50, p99 = 1000 * (percentile(xs, 50) or 0.0), 1000 * (percentile(xs, 99) or 0.0)
    out: dict[str, Any] = {"n": len(xs), "p50_ms": p50, "p99_ms": p99, "added_p50_ms": None, "added_p99_ms": None,
                           "router_cpu_pct": cpu_pct}
    if direct is not None:
        ds = [x for r in direct for x in r]
        d50, d99 = percentile(ds, 50), percentile(ds, 99)
        out["added_p50_ms"] = None if d50 is None else p50 - 1000 * d50
        out["added_p99_ms"] = None if d99 is None else p99 - 1000 * d99
        rounds = [1000 * (percentile(a, 50) - percentile(b, 50))  # type: ignore[operator]
                  for a, b in zip(mine, direct) if a and b]
        out["added_p50_rounds_ms"] = rounds
        out["added_p50_round_median_ms"] = percentile(rounds, 50)
    return out


async def open_loop(t: TargetEndpoint, rate: float, duration_s: float, seed: int = 0) -> dict[str, Any]:
    """Non-streaming Poisson arrivals at ``rate`` for ``duration_s``; latency and achieved rate."""
    rng = random.Random(seed)
    lat: list[float] = []
    failures = 0
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        tasks = []

        async def go() -> None:
            nonlocal failures
            total, _, ok = await _one(session, t, False)
            if ok:
                lat.append(total)
            else:
                failures += 1

        start = time.monotonic()
        nxt = 0.0
        while nxt < duration_s:
            delay = start + nxt - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(go()))
            nxt += rng.expovariate(rate)
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - start
    sent = len(tasks)
    return {"rate": rate, "sent": sent, "failures": failures,
            "achieved_rps": round(len(lat) / elapsed, 1) if elapsed > 0 else 0.0,
            "p50_ms": 1000 * (percentile(lat, 50) or 0.0), "p99_ms": 1000 * (percentile(lat, 99) or 0.0)}


def throughput(t: TargetEndpoint, opts: OverheadOptions) -> dict[str, Any]:
    steps = []
    sustained = None
    p99_at = None
    for rate in opts.rates:
        step = asyncio.run(open_loop(t, rate, opts.rate_duration_s))
        step["ok"] = (step["failures"] == 0 and step["achieved_rps"] >= 0.9 * rate
                      and step["p99_ms"] <= opts.p99_bound_ms)
        steps.append(step)
        if opts.progress:
            print(f"overhead throughput {t.name}: {rate:.0f} req/s offered -> {step['achieved_rps']} achieved, "
                  f"p99 {step['p99_ms']:.1f} ms {'ok' if step['ok'] else 'FAIL'}", file=sys.stderr, flush=True)
        if not step["ok"]:
            break
        sustained, p99_at = rate, step["p99_ms"]
    return {"sustained_rps": sustained, "p99_ms_at_sustained": p99_at, "steps": steps}


def _peer_names(sel: str) -> list[str]:
    if sel == "none":
        return []
    if sel == "all":
        return list(peers_mod.PEERS)
    return [s.strip() for s in sel.split(",") if s.strip()]


def idle_cpu_s(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds each router burns in ``IDLE_S`` seconds without a request (its monitors)."""
    meter = CpuMeter(pids)
    meter.start()
    time.sleep(IDLE_S)
    used = meter.stop()
    return {name: used[name]["cpu_s"] for name in pids}


def _sharing_targets(cl: BenchCluster, model: str) -> list[TargetEndpoint]:
    """Two gateways on one Redis, sharing on (with an idle peer replica) and off."""
    redis = start_redis(log_dir=cl.log_dir)
    cl.procs.append(redis)
    url = str(redis.extra["url"])
    out = []
    for label, prefix, enabled in (("sharing on", "ab-on", True), ("sharing off", "ab-off", False)):
        g = cl.start_gateway("default", name=f"gateway-{prefix}", extra={
            "store": {"url": url, "key_prefix": prefix}, "sharing": {"enabled": enabled}})
        out.append(TargetEndpoint(f"loraroute (default, redis, {label})", g.url, model, pid=g.popen.pid))
    cl.start_gateway("default", name="gateway-ab-peer", extra={"store": {"url": url, "key_prefix": "ab-on"}})
    return out


def run_overhead(opts: OverheadOptions) -> Path:
    spec = overhead_spec()
    work = Path(tempfile.mkdtemp(prefix="loraroute-overhead-"))
    doc: dict[str, Any] = {"meta": {"kind": "overhead", "spec": "zero-delay pods", "sequential": opts.requests,
                                    "p99_bound_ms": opts.p99_bound_ms, "rates": opts.rates,
                                    "rate_duration_s": opts.rate_duration_s,
                                    "cores": os.cpu_count()}, "targets": []}
    skipped: list[dict[str, Any]] = []
    try:
        with BenchCluster(spec, work, zero_delay=True, sidecars=False) as cl:
            adapter = spec.adapters.name(0)
            targets = [TargetEndpoint("direct", cl.pods[0].url, adapter)]
            model = f"{spec.cluster.base_model}:{adapter}"
            gw = cl.start_gateway("default")
            targets.append(TargetEndpoint(f"loraroute (default, {code_version() or 'this checkout'})", gw.url, model,
                                          pid=gw.popen.pid))
            if opts.baseline_tree is not None:
                base = cl.start_gateway("default", source=opts.baseline_tree, name="gateway-baseline")
                label = code_version(opts.baseline_tree) or str(opts.baseline_tree)
                targets.append(TargetEndpoint(f"loraroute (default, baseline {label})", base.url, model,
                                              pid=base.popen.pid))
            if opts.sharing_ab:
                targets += _sharing_targets(cl, model)
            for name in _peer_names(opts.peers):
                ok, reason = peers_mod.peer_available(name)
                if not ok:
                    skipped.append({"target": f"peer:{name}", "skipped": reason})
                    print(f"skipping peer {name}: {reason}", file=sys.stderr)
                    continue
                try:
                    proc = cl.start_peer(name)
                except Exception as e:  # noqa: BLE001 - a peer that fails to start is reported
                    skipped.append({"target": f"peer:{name}", "skipped": f"failed to start: {str(e)[:300]}"})
                    continue
                key = proc.extra.get("api_key")
                targets.append(TargetEndpoint(f"peer:{name}", proc.url, adapter, str(key) if key else None,
                                              proc.popen.pid))
            pids = {t.name: t.pid for t in targets if t.pid}
            idle_before = idle_cpu_s(pids)
            meter = CpuMeter(pids)
            meter.start()
            ops_before = {t.name: sharing_ops([t.url]) for t in targets if "sharing on" in t.name}
            samples = asyncio.run(sequential(targets, opts.requests, opts.progress, opts.rounds))
            cpu = meter.stop()
            ops_after = {t.name: sharing_ops([t.url]) for t in targets if "sharing on" in t.name}
            idle_after = idle_cpu_s(pids)
            served = 2 * (WARMUP + opts.rounds * max(1, opts.requests // opts.rounds))
            wall = cpu["machine"]["wall_s"]
            direct = samples["direct"]
            for t in targets:
                used = cpu.get(t.name) or {}
                lat = {mode: latency_entry(samples[t.name][mode], None if t.name == "direct" else direct[mode],
                                           used.get("cpu_pct"))
                       for mode in MODES if any(samples[t.name][mode])}
                idle_s = (idle_before.get(t.name, 0.0) + idle_after.get(t.name, 0.0)) / 2 * wall / IDLE_S
                entry = {"target": t.name, "latency": lat,
                         "errors": int(samples[t.name].get("errors", [[0]])[0][0]),
                         "cpu_us_per_request": (round(1e6 * max(0.0, used["cpu_s"] - idle_s) / served, 1)
                                                if "cpu_s" in used else None)}
                if t.name in ops_after:
                    got, had = ops_after[t.name] or {}, ops_before[t.name] or {}
                    entry["sharing_ops_per_request"] = round((got.get("ops", 0.0) - had.get("ops", 0.0)) / served, 3)
                doc["targets"].append(entry)
            doc["meta"]["machine_busy_pct"] = cpu["machine"]["busy_pct"]
            doc["meta"]["rounds"] = opts.rounds
            doc["meta"]["loadavg"] = os.getloadavg()
            for t, entry in zip(targets, doc["targets"]):
                entry["throughput"] = throughput(t, opts)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc["targets"] += skipped
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(doc, indent=2))
    return opts.out
