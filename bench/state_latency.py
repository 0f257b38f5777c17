"""State-change-to-reader latency through Redis: vLLM changes -> sidecar poll -> Redis -> gateway view.

Set-up (all real processes on loopback): a Redis server, one simulated vLLM pod
(``--max-loras 1``, near-instant loads), one ``loraroute sidecar`` polling it every
``--interval`` seconds (default 0.05) and publishing to Redis, and ``--readers`` RedisStore
readers in this process (what each gateway replica runs).

One change: load a new adapter name straight into the pod with ``/v1/load_lora_adapter`` (not
through the sidecar, so the sidecar only learns it by polling). ``t0`` is when the pod answered
200 (the change is visible from then on); the change has reached a reader when the reader's view
shows that adapter on GPU. Between changes the script sleeps a random 0.1-0.3 s so changes land
at random phases of the poll.

The latency includes the wait for the next poll (uniform in [0, interval]), the scrape of
``/metrics`` and ``/v1/models``, parsing and estimation, the Redis write + pub/sub and the
reader's update. The Redis leg alone (``published_at`` -> reader) is reported too.

    python -m bench.state_latency [--changes 200] [--readers 2] [--interval 0.05] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from loraroute import peft
from loraroute.procs import free_port, loraroute_cmd, start_process
from loraroute.services import start_redis
from podstate.redis_store import RedisStore
from scorer.model import PodState


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def summary(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 1), "p90_ms": round(percentile(ms, 90), 1),
            "p99_ms": round(percentile(ms, 99), 1), "max_ms": round(max(ms), 1) if ms else float("nan"),
            "mean_ms": round(statistics.fmean(ms), 1) if ms else float("nan")}


async def run(args: argparse.Namespace) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="loraroute-state-latency-"))
    logs = work / "logs"
    peft.make_adapter(work / "adapters" / "base-adapter", rank=8)
    redis_proc = start_redis(log_dir=logs)
    redis_url = str(redis_proc.extra["url"])
    sim_port, sidecar_port = free_port(), free_port()
    sim = start_process("sim", loraroute_cmd(
        "sim", "--port", str(sim_port), "--enable-lora", "--allow-runtime-lora-updating", "--max-loras", "1",
        "--max-cpu-loras", "1", "--adapter-dir", str(work / "adapters"), "--time-scale", "0.01"),
        port=sim_port, ready_url=f"http://127.0.0.1:{sim_port}/health", timeout=60, log_dir=logs)
    sidecar = start_process("sidecar", loraroute_cmd(
        "sidecar", "--pod-id", "pod-0", "--port", str(sidecar_port), "--vllm-url", sim.url,
        "--adapter-dir", str(work / "adapters"), "--store-url", redis_url,
        "--poll-interval-s", str(args.interval), "--log-level", "warning"),
        port=sidecar_port, ready_url=f"http://127.0.0.1:{sidecar_port}/healthz", timeout=60, log_dir=logs)
    readers = [RedisStore(redis_url) for _ in range(args.readers)]
    waiting: dict[str, float] = {}
    arrivals: list[list[float]] = [[] for _ in readers]
    redis_leg: list[float] = []

    def listener(idx: int):  # type: ignore[no-untyped-def]
        def on_state(pod_id: str, state: PodState | None) -> None:
            if state is None:
                return
            now = time.time()
            for name, t0 in list(waiting.items()):
                if name in state.gpu_adapters and not any(name == n for n, _ in seen[idx]):
                    seen[idx].append((name, now))
                    arrivals[idx].append(now - t0)
                    redis_leg.append(now - state.published_at)
        return on_state

    seen: list[list[tuple[str, float]]] = [[] for _ in readers]
    for i, r in enumerate(readers):
        r.add_listener(listener(i))
        await r.start()
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 10
            while not all("pod-0" in r.view() for r in readers) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            for i in range(args.changes):
                name = f"chg-{i}"
                body = {"lora_name": name, "lora_path": str(work / "adapters" / "base-adapter")}
                async with http.post(f"{sim.url}/v1/load_lora_adapter", json=body) as resp:
                    await resp.read()
                    assert resp.status == 200, await resp.text()
                waiting[name] = time.time()
                limit = time.monotonic() + 2.0
                while any(len(s) <= i for s in seen) and time.monotonic() < limit:
                    await asyncio.sleep(0.002)
                waiting.pop(name, None)
                if (i + 1) % 50 == 0:
                    print(f"  {i + 1}/{args.changes} changes", flush=True)
                await asyncio.sleep(random.uniform(0.1, 0.3))
    finally:
        for r in readers:
            await r.close()
        sidecar.stop()
        sim.stop()
        redis_proc.stop()
    all_latencies = [v for a in arrivals for v in a]
    missed = sum(args.changes - len(a) for a in arrivals)
    return {
        "interval_s": args.interval,
        "changes": args.changes,
        "readers": args.readers,
        "missed": missed,
        "end_to_end": summary(all_latencies),
        "per_reader": [summary(a) for a in arrivals],
        "redis_leg": summary(redis_leg),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--changes", type=int, default=200)
    p.add_argument("--readers", type=int, default=2)
    p.add_argument("--interval", type=float, default=0.05, help="sidecar poll interval, seconds")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args(argv)
    result = asyncio.run(run(args))
    e2e, leg = result["end_to_end"], result["redis_leg"]
    print(f"\nstate change -> reader view, {result['changes']} changes x {result['readers']} readers, "
          f"poll {args.interval * 1000:.0f} ms, missed {result['missed']}")
    print(f"{'':14}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}  (ms)")
    for label, s in (("end to end", e2e), ("redis leg", leg)):
        print(f"{label:14}{s['p50_ms']:>8}{s['p90_ms']:>8}{s['p99_ms']:>8}{s['max_ms']:>8}")  # type: ignore[index]
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
