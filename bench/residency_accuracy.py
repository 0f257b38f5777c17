"""How right is the residency estimate? Compared with the simulator's ground truth under a Zipf load.

Set-up: one simulated vLLM pod (``--max-loras``, ``--max-cpu-loras``, adapters served through its
filesystem resolver, real time by default) and a ``PodMonitor`` in this process polling it every
50 ms — the same loop the sidecar runs, told the pod's limits as the sidecar's settings would. A Poisson stream of chat requests (``--rate`` per second)
picks adapters with Zipf weights ``1 / k^s`` (``--zipf``, default 1.1) over ``--adapters``
names; ``max_tokens`` uniform in [8, 64].

Every ``--sample`` seconds (default 0.1) the script reads ``/sim/state`` (truth) and the
monitor's current PodState (what a router would use at that moment) and scores:

- GPU set exact: share of samples in which the estimated GPU set equals the true one;
- on-GPU precision / recall over (sample, adapter) pairs: precision = |est ∩ true| / |est|,
  recall = |est ∩ true| / |true|;
- CPU tier (adapters in CPU memory but not on GPU) precision / recall, and "resident anywhere"
  (GPU ∪ CPU) precision / recall.

"Settled" repeats the scores over the samples in which every adapter truly on GPU is already
listed in ``/v1/models``: a load triggered by a request (vLLM's resolver) is invisible in vLLM's
HTTP surface until it finishes, so those samples measure the surface, not the estimator.

``--compare-crowded`` runs one monitor per estimator rule for "more adapters in flight than
slots" (``arrival``, ``resident``) on the same pod and scores them on the same samples.

``--exact`` makes the pod emit ``vllm:lora_adapter_loaded`` so the monitor reads the truth
instead of estimating (a check of the plumbing: expect ~100 %, minus the poll lag).

    python -m bench.residency_accuracy [--duration 30] [--rate 12] [--adapters 16] [--exact]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path

import aiohttp

from loraroute import peft
from loraroute.procs import free_port, loraroute_cmd, start_process
from podstate import MemoryStore
from podstate.monitor import MonitorSettings, PodMonitor
from podstate.residency import ResidencyEstimator


class Score:
    def __init__(self) -> None:
        self.samples = 0
        self.exact = 0
        self.tp = {"gpu": 0, "cpu": 0, "any": 0}
        self.est = {"gpu": 0, "cpu": 0, "any": 0}
        self.true = {"gpu": 0, "cpu": 0, "any": 0}

    def add(self, est: dict[str, set[str]], true: dict[str, set[str]]) -> None:
        self.samples += 1
        self.exact += est["gpu"] == true["gpu"]
        for tier in ("gpu", "cpu", "any"):
            self.tp[tier] += len(est[tier] & true[tier])
            self.est[tier] += len(est[tier])
            self.true[tier] += len(true[tier])

    def result(self) -> dict[str, float]:
        out: dict[str, float] = {"samples": self.samples,
                                 "gpu_set_exact": round(self.exact / max(1, self.samples), 4)}
        for tier in ("gpu", "cpu", "any"):
            out[f"{tier}_precision"] = round(self.tp[tier] / max(1, self.est[tier]), 4)
            out[f"{tier}_recall"] = round(self.tp[tier] / max(1, self.true[tier]), 4)
        return out


def zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (k ** s) for k in range(1, n + 1)]


async def run(args: argparse.Namespace) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="loraroute-residency-"))
    names = [f"ad-{i:02d}" for i in range(args.adapters)]
    for i, name in enumerate(names):
        peft.make_adapter(work / "adapters" / name, rank=8 if i % 2 else 16, seed=i)
    port = free_port()
    argv = loraroute_cmd("sim", "--port", str(port), "--enable-lora", "--allow-runtime-lora-updating",
                         "--adapter-dir", str(work / "adapters"), "--max-loras", str(args.max_loras),
                         "--max-cpu-loras", str(args.max_cpu_loras), "--max-lora-rank", "16",
                         "--time-scale", str(args.time_scale), "--seed", str(args.seed))
    if args.exact:
        argv.append("--emit-residency-metrics")
    sim = start_process("sim", argv, port=port, ready_url=f"http://127.0.0.1:{port}/health", timeout=60,
                        log_dir=work / "logs")
    rng = random.Random(args.seed)
    weights = zipf_weights(len(names), args.zipf)
    store = MemoryStore()
    policies = list(ResidencyEstimator.CROWDED_POLICIES) if args.compare_crowded else [args.crowded]
    monitors = {
        policy: PodMonitor(f"pod-0-{policy}", sim.url, store,
                           MonitorSettings(max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras,
                                           interval_s=args.interval),
                           estimator=ResidencyEstimator(args.max_loras, args.max_cpu_loras, crowded=policy))
        for policy in policies
    }
    monitor = monitors[policies[0]]
    scores = {p: (Score(), Score()) for p in policies}
    score, settled = scores[policies[0]]
    shown = [0]
    sent = errors = 0
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as http:
            for m in monitors.values():
                await m.start()

            async def one(model: str) -> None:
                nonlocal errors
                body = {"model": model, "max_tokens": rng.randint(8, 64),
                        "messages": [{"role": "user", "content": f"question {rng.random()} " * 8}]}
                try:
                    async with http.post(f"{sim.url}/v1/chat/completions", json=body,
                                         timeout=aiohttp.ClientTimeout(total=120)) as resp:
                        await resp.read()
                        errors += resp.status != 200
                except aiohttp.ClientError:
                    errors += 1

            async def generate(stop_at: float) -> None:
                nonlocal sent
                tasks: set[asyncio.Task[None]] = set()
                while time.monotonic() < stop_at:
                    model = rng.choices(names, weights)[0]
                    task = asyncio.create_task(one(model))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    sent += 1
                    await asyncio.sleep(rng.expovariate(args.rate))
                if tasks:
                    await asyncio.wait(tasks, timeout=60)

            async def sample(stop_at: float) -> None:
                next_report = time.monotonic() + 5
                while time.monotonic() < stop_at:
                    await asyncio.sleep(args.sample)
                    async with http.get(f"{sim.url}/sim/state?limit=0") as resp:
                        truth = await resp.json()
                    async with http.get(f"{sim.url}/v1/models") as resp:
                        registered = {m["id"] for m in (await resp.json())["data"]}
                    states = {p: m.state for p, m in monitors.items()}
                    if any(st is None or not st.healthy for st in states.values()):
                        continue
                    t_gpu = set(truth["gpu_adapters"])
                    t_cpu = set(truth["cpu_adapters"]) - t_gpu
                    true_sets = {"gpu": t_gpu, "cpu": t_cpu, "any": t_gpu | t_cpu}
                    for policy, st_p in states.items():
                        assert st_p is not None
                        e_gpu_p, e_cpu_p = set(st_p.gpu_adapters), set(st_p.cpu_adapters)
                        est_p = {"gpu": e_gpu_p, "cpu": e_cpu_p, "any": e_gpu_p | e_cpu_p}
                        scores[policy][0].add(est_p, true_sets)
                        if t_gpu <= registered:  # no resolver load in flight (those are invisible)
                            scores[policy][1].add(est_p, true_sets)
                    st = states[policies[0]]
                    assert st is not None
                    e_gpu = set(st.gpu_adapters)
                    if e_gpu != t_gpu and t_gpu <= registered and shown[0] < args.show_mismatches:
                        shown[0] += 1
                        print(f"  mismatch: true GPU {truth['gpu_adapters']} est {list(st.gpu_adapters)} "
                              f"in flight {list(st.running_adapters)} deferred {st.num_deferred}", flush=True)
                    if time.monotonic() >= next_report:
                        r = score.result()
                        print(f"  {score.samples} samples, {sent} requests: GPU set exact {r['gpu_set_exact']:.1%}, "
                              f"on-GPU precision {r['gpu_precision']:.1%} recall {r['gpu_recall']:.1%}", flush=True)
                        next_report += 5

            stop_at = time.monotonic() + args.duration
            await asyncio.gather(generate(stop_at), sample(stop_at))
            async with http.get(f"{sim.url}/sim/state?limit=0") as resp:
                final = await resp.json()
    finally:
        for m in monitors.values():
            await m.close()
        sim.stop()
    return {
        "mode": "exact" if args.exact else "estimated",
        "adapters": args.adapters, "zipf_s": args.zipf, "rate": args.rate, "duration_s": args.duration,
        "max_loras": args.max_loras, "max_cpu_loras": args.max_cpu_loras, "poll_interval_s": args.interval,
        "requests": sent, "errors": errors, "disk_loads": final.get("disk_loads"), "gpu_loads": final.get("gpu_loads"),
        "crowded": policies[0],
        **score.result(),
        "settled": settled.result(),
        "by_crowded_policy": {p: {**a.result(), "settled": b.result()} for p, (a, b) in scores.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--rate", type=float, default=12.0, help="requests per second (Poisson)")
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--max-loras", type=int, default=4)
    p.add_argument("--max-cpu-loras", type=int, default=8)
    p.add_argument("--interval", type=float, default=0.05, help="monitor poll interval, seconds")
    p.add_argument("--sample", type=float, default=0.1, help="seconds between accuracy samples")
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--exact", action="store_true", help="pod exposes vllm:lora_adapter_loaded")
    p.add_argument("--crowded", choices=ResidencyEstimator.CROWDED_POLICIES, default="arrival",
                   help="estimator rule when more adapters are in flight than slots")
    p.add_argument("--compare-crowded", action="store_true",
                   help="run one monitor per rule on the same pod and samples, and report each")
    p.add_argument("--show-mismatches", type=int, default=0, help="print the first N wrong GPU sets of settled samples")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    r = asyncio.run(run(args))
    print(f"\nresidency {r['mode']}: {r['requests']} requests ({r['errors']} errors), {r['samples']} samples, "
          f"{r['adapters']} adapters Zipf s={r['zipf_s']}, max_loras {r['max_loras']}, "
          f"max_cpu_loras {r['max_cpu_loras']}, disk loads {r['disk_loads']}, gpu loads {r['gpu_loads']}")
    print(f"  GPU set exactly right: {r['gpu_set_exact']:.1%}")
    for tier, label in (("gpu", "on GPU"), ("cpu", "CPU only"), ("any", "resident (GPU or CPU)")):
        print(f"  {label:22} precision {r[f'{tier}_precision']:.1%}  recall {r[f'{tier}_recall']:.1%}")
    if args.compare_crowded:
        for policy, res in r["by_crowded_policy"].items():  # type: ignore[attr-defined]
            print(f"  crowded={policy:9} GPU set exact {res['gpu_set_exact']:.1%} (settled "
                  f"{res['settled']['gpu_set_exact']:.1%}), on-GPU precision {res['gpu_precision']:.1%} "
                  f"recall {res['gpu_recall']:.1%}")
    st = r["settled"]
    print(f"  settled samples only (no resolver load in flight; {st['samples']} of {r['samples']}): "
          f"GPU set exact {st['gpu_set_exact']:.1%}, on-GPU precision {st['gpu_precision']:.1%} "
          f"recall {st['gpu_recall']:.1%}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
