"""How many requests per second one simulator process sustains, and the default profile's TTFTs.

    python -m bench.sim_capacity [--pods 16] [--rates 50,100,200,300] [--duration 10]
                                 [--time-scale 1] [--stream-frac 1.0] [--profile 8b]
                                 [--skip-capacity] [--skip-ttft]

Part 1 (capacity): one ``loraroute sim cluster --pods K`` process at ``--time-scale`` (default 1,
real time), loaded open-loop (Poisson arrivals, round-robin over pods) from this process with an
aiohttp client. Requests: ``--adapters`` (8) adapters resolved from an adapter directory (Zipf-like
popularity) plus the base model, on pods with ``--max-loras`` (8) GPU slots so that the simulated
pods themselves do not saturate (this measures the process, not the LoRA gate), each with its adapter's ~300-token system prompt and a ~60-token question,
``max_tokens`` uniform in [32, 128], streamed (``--stream-frac``). For each rate it reports the
achieved rate, the simulator's CPU use (share of one core, from /proc), this client's CPU use,
and the *lag*: client wall-clock e2e minus the simulator's ground-truth e2e x time-scale (joined
by X-Request-Id). While the simulator keeps up the lag stays at a few ms; when its own CPU is the
bottleneck, the lag and the CPU share climb and the achieved rate falls behind. A rate counts as
sustained when the steady-state completion rate (completions between 25 % and 100 % of the arrival
window) is >= 90 % of offered (Poisson noise), the, lag p50 <= 25 ms and the simulator's CPU < 95 %.

Part 2 (TTFT table): one pod at time-scale 0, requests one at a time, TTFT from ground truth
(simulated seconds, the ``--profile`` cost profile, default ``8b``) for resident / CPU-tier / cold
adapters of several ranks and for cold vs cached prefixes, beside ``vllm_sim.costs.ideal_ttft``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx

from loraroute import peft
from loraroute.procs import Proc, consecutive_free_ports, free_port, http_ready, loraroute_cmd, start_process
from vllm_sim.costs import PROFILES, get_profile, ideal_ttft
from vllm_sim.tokenizer import apply_chat_template, count_tokens

BASE = "meta-llama/Llama-3.1-8B-Instruct"


def _proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


@dataclass
class RateResult:
    offered: float
    sent: int
    ok: int
    errors: int
    achieved: float
    sim_cpu: float
    client_cpu: float
    lag_p50_ms: float
    lag_p99_ms: float
    ttft_wall_p50_ms: float
    cpu_ms_per_request: float

    @property
    def sustained(self) -> bool:
        return self.achieved >= 0.9 * self.offered and self.lag_p50_ms <= 25 and self.sim_cpu < 0.95


# -- part 1 ------------------------------------------------------------------------------------
def start_cluster(pods: int, adapter_dir: Path, time_scale: float, log_dir: Path, max_loras: int,
                  stream_interval: int = 1, profile: str = "8b") -> tuple[Proc, list[str]]:
    base_port = consecutive_free_ports(pods)
    urls = [f"http://127.0.0.1:{base_port + i}" for i in range(pods)]
    argv = loraroute_cmd("sim", "cluster", "--pods", str(pods), "--base-port", str(base_port), "--enable-lora",
                         "--max-loras", str(max_loras), "--max-cpu-loras", str(2 * max_loras), "--max-lora-rank", "16",
                         "--adapter-dir", str(adapter_dir), "--allow-runtime-lora-updating",
                         "--time-scale", str(time_scale), "--state-ring-size", "20000",
                         "--stream-interval", str(stream_interval), "--profile", profile)
    proc = start_process("sim-cluster", argv, ready=lambda: all(http_ready(u + "/health") for u in urls),
                         timeout=60, log_dir=log_dir)
    return proc, urls


async def _one(session: aiohttp.ClientSession, url: str, body: dict, rid: str, stream: bool,
               out: dict[str, tuple[float, float, float]], errors: list[str]) -> None:
    t0 = time.monotonic()
    first = None
    try:
        async with session.post(url + "/v1/chat/completions", json=body, headers={"X-Request-Id": rid}) as resp:
            if resp.status != 200:
                errors.append(f"{resp.status}")
                await resp.read()
                return
            if stream:
                async for line in resp.content:
                    if first is None and line.startswith(b"data: "):
                        first = time.monotonic()  # role + first token arrive together
            else:
                await resp.read()
                first = time.monotonic()
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        errors.append(type(e).__name__)
        return
    end = time.monotonic()
    out[rid] = ((first or end) - t0, end - t0, end)


async def run_rate(urls: list[str], rate: float, duration: float, stream_frac: float, names: list[str],
                   systems: dict[str, str], seed: int, tag: str) -> tuple[int, dict[str, tuple[float, float, float]], list[str], float]:
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(len(names))]
    out: dict[str, tuple[float, float, float]] = {}
    errors: list[str] = []
    tasks = []
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.monotonic()
        next_t = start
        i = 0
        while True:
            next_t += rng.expovariate(rate)
            if next_t - start > duration:
                break
            delay = next_t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            model = rng.choices(names, weights)[0]
            question = " ".join(rng.choice(("how", "many", "orders", "per", "region", "last", "week", "total"))
                                for _ in range(40))
            body = {"model": model, "max_tokens": rng.randint(32, 128),
                    "messages": [{"role": "system", "content": systems[model]}, {"role": "user", "content": question}]}
            stream = rng.random() < stream_frac
            if stream:
                body["stream"] = True
            tasks.append(asyncio.create_task(_one(session, urls[i % len(urls)], body, f"{tag}-{i}", stream, out, errors)))
            i += 1
        await asyncio.gather(*tasks)
    return i, out, errors, start


def steady_rate(finish_offsets: list[float], window: float) -> float:
    """Completions per second between 25 % and 100 % of the arrival window (after warm-up)."""
    lo = 0.25 * window
    return sum(1 for t in finish_offsets if lo <= t <= window) / (window - lo)


def sim_e2e(urls: list[str], tag: str) -> dict[str, float]:
    got = {}
    with httpx.Client(timeout=30) as http:
        for u in urls:
            for r in http.get(u + "/sim/state").json()["requests"]:
                if r["request_id"].startswith(tag + "-") and r["e2e"] is not None:
                    got[r["request_id"]] = r["e2e"]
    return got


def capacity(args: argparse.Namespace, work: Path) -> list[RateResult]:
    adapter_dir = work / "adapters"
    names = [BASE] + [f"lora-{i:02d}" for i in range(args.adapters)]
    peft.make_adapter_set(adapter_dir, [(n, 8 if i % 2 else 16) for i, n in enumerate(names[1:])])
    systems = {n: f"You are the assistant of team {n}. Follow the style guide carefully. " * 20 for n in names}
    proc, urls = start_cluster(args.pods, adapter_dir, args.time_scale, work / "logs", args.max_loras,
                               args.stream_interval, args.profile)
    results = []
    try:
        pid = proc.popen.pid
        for k, rate in enumerate(args.rates):
            tag = f"r{k}"
            cpu0, me0, t0 = _proc_cpu_seconds(pid), _self_cpu(), time.monotonic()
            sent, out, errors, start = asyncio.run(
                run_rate(urls, rate, args.duration, args.stream_frac, names, systems, args.seed + k, tag))
            elapsed = time.monotonic() - t0
            sim_cpu = (_proc_cpu_seconds(pid) - cpu0) / elapsed
            client_cpu = (_self_cpu() - me0) / elapsed
            truth = sim_e2e(urls, tag)
            lags = [(out[r][1] - truth[r] * args.time_scale) * 1000 for r in out if r in truth]
            res = RateResult(
                offered=rate, sent=sent, ok=len(out), errors=len(errors),
                achieved=steady_rate([v[2] - start for v in out.values()], args.duration),
                sim_cpu=sim_cpu, client_cpu=client_cpu, lag_p50_ms=_pct(lags, 0.5), lag_p99_ms=_pct(lags, 0.99),
                ttft_wall_p50_ms=_pct([v[0] * 1000 for v in out.values()], 0.5),
                cpu_ms_per_request=sim_cpu * elapsed / max(1, len(out)) * 1000,
            )
            results.append(res)
            print(f"  rate {rate:>6.0f}/s: ok {res.ok}/{sent}, errors {res.errors}, sim cpu {sim_cpu:.0%}, "
                  f"lag p50 {res.lag_p50_ms:.1f} ms", flush=True)
            time.sleep(1.0)
    finally:
        proc.stop()
    return results


def print_capacity(results: list[RateResult], args: argparse.Namespace) -> None:
    print(f"\nCapacity: one simulator process, {args.pods} pods, time-scale {args.time_scale}, "
          f"{args.duration:.0f} s per rate, stream fraction {args.stream_frac}, stream interval "
          f"{args.stream_interval}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print("| offered req/s | completed | achieved req/s | errors | sim CPU (1 core) | sim CPU ms/req | client CPU | "
          "lag p50 ms | lag p99 ms | wall TTFT p50 ms | sustained |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.offered:.0f} | {r.ok}/{r.sent} | {r.achieved:.1f} | {r.errors} | {r.sim_cpu:.0%} | "
              f"{r.cpu_ms_per_request:.2f} | {r.client_cpu:.0%} | {r.lag_p50_ms:.1f} | {r.lag_p99_ms:.1f} | "
              f"{r.ttft_wall_p50_ms:.1f} | {'yes' if r.sustained else 'no'} |")
    costs = [r.cpu_ms_per_request for r in results if r.ok]
    if costs:
        print(f"\nSimulator CPU per request: {min(costs):.2f}-{max(costs):.2f} ms "
              f"(one core's worth: ~{1000 / statistics.median(costs):.0f} req/s)")
    ok = [r.offered for r in results if r.sustained]
    print(f"\nHighest sustained offered rate: {max(ok):.0f} req/s" if ok else "\nNo rate sustained.")


# -- part 2 ------------------------------------------------------------------------------------
def ttft_table(work: Path, profile_name: str) -> None:
    profile = get_profile(profile_name)
    root = work / "ttft-adapters"
    ranks = {"r8": 8, "r16": 16, "r32": 32, "r64": 64, "cpu16": 16, "evict1": 16, "evict2": 16}
    for name, rank in ranks.items():
        peft.make_adapter(root / name, rank=rank)
    port = free_port()
    proc = start_process("sim-ttft", loraroute_cmd(
        "sim", "--port", str(port), "--enable-lora", "--max-loras", "1", "--max-cpu-loras", "2",
        "--max-lora-rank", "64", "--adapter-dir", str(root), "--allow-runtime-lora-updating", "--time-scale", "0",
        "--profile", profile_name),
        ready_url=f"http://127.0.0.1:{port}/health", timeout=30, log_dir=work / "logs")
    url = f"http://127.0.0.1:{port}"
    system = "You are a careful SQL assistant for the analytics warehouse. " * 64  # ~960 tokens
    rows: list[tuple[str, dict, float]] = []
    try:
        with httpx.Client(timeout=60) as http:
            def ask(model: str, content: str, rid: str) -> dict:
                # the content leads the system prompt, so equal content = equal (cacheable) prefix
                msgs = [{"role": "system", "content": f"[{content}] {system}"}, {"role": "user", "content": "go"}]
                http.post(url + "/v1/chat/completions", headers={"X-Request-Id": rid},
                          json={"model": model, "messages": msgs, "max_tokens": 1}).raise_for_status()
                rec = next(r for r in http.get(url + "/sim/state").json()["requests"] if r["request_id"] == rid)
                n = count_tokens(apply_chat_template(msgs))
                rec["ideal"] = ideal_ttft(profile, n, rec["cached_tokens"], lora=model != BASE)
                return rec

            for rank_name in ("r8", "r16", "r32", "r64"):
                rows.append((f"cold adapter from disk, rank {ranks[rank_name]}, cold prefix",
                             ask(rank_name, f"first question for {rank_name}", f"cold-{rank_name}"), 0))
            rows.append(("resident adapter (GPU), cold prefix", ask("r64", "another unrelated question", "res"), 0))
            rows.append(("resident adapter (GPU), cached prefix", ask("r64", "another unrelated question", "res-cached"), 0))
            ask("cpu16", "warm it", "w1")
            ask("evict1", "push cpu16 to the CPU tier", "w2")  # GPU: evict1; CPU: cpu16, evict1
            rows.append(("CPU-tier adapter (CPU -> GPU), cold prefix", ask("cpu16", "a new question", "cpu"), 0))
            rows.append(("base model, cold prefix", ask(BASE, "question for the base", "base"), 0))
            rows.append(("base model, cached prefix", ask(BASE, "question for the base", "base-cached"), 0))
    finally:
        proc.stop()
    print(f"\nTTFT under the {profile.name} profile, one request on an idle pod, simulated ms:")
    print("| case | prompt tokens | cached | adapter tier | queue | adapter load | prefill | TTFT | ideal_ttft (resident) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, r, _ in rows:
        print(f"| {label} | {r['prompt_tokens']} | {r['cached_tokens']} | {r['adapter_tier']} | "
              f"{r['queue_wait'] * 1000:.1f} | {r['adapter_load'] * 1000:.1f} | {r['prefill'] * 1000:.1f} | "
              f"{r['ttft'] * 1000:.1f} | {r['ideal'] * 1000:.1f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sim_capacity", description=__doc__.split("\n\n")[0])
    p.add_argument("--pods", type=int, default=16)
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[50.0, 100.0, 200.0, 300.0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds of arrivals per rate")
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--stream-frac", type=float, default=1.0, help="share of streamed requests")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--adapters", type=int, default=8, help="adapters in the workload (plus the base model)")
    p.add_argument("--max-loras", type=int, default=8, help="GPU slots per pod (CPU cache: twice that)")
    p.add_argument("--stream-interval", type=int, default=1, help="the simulator's --stream-interval")
    p.add_argument("--profile", default="8b", choices=sorted(PROFILES), help="the simulator's cost profile")
    p.add_argument("--skip-capacity", action="store_true")
    p.add_argument("--skip-ttft", action="store_true")
    args = p.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    with tempfile.TemporaryDirectory(prefix="sim-capacity-") as tmp:
        work = Path(tmp)
        if not args.skip_ttft:
            ttft_table(work, args.profile)
        if not args.skip_capacity:
            print(f"\nCapacity sweep over {args.rates} req/s ...", flush=True)
            print_capacity(capacity(args, work), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
