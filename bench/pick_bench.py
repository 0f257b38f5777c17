"""Micro-benchmark of ``Pipeline.pick()``: median and p99 per decision, per preset and pool size.

Set-up per pool size (16 and 256 pods by default): 1,000 adapters known (ranks 8/16/32/64), each
pod holds 4 of them on GPU (3 with requests running), 12 in CPU and ~60 on disk and reports the
ranks of all 1,000; requests draw adapters from a skewed (power-law) popularity and carry a
prompt of 8 prefix blocks, a quarter of them sharing a system prompt; 20,000 decisions with
dispatch (9 in 10 completed) warm the prefix index, the in-flight counts and the optimistic
incoming adapters. The clock advances 1 ms per decision (1,000 decisions/s); the PodStates are
marked observed in the future so they never go stale during the run.

Columns (µs per call, median / p99, GC paused while timing):
  pick           ``pick()`` on an unchanged view (views cached per PodState object)
  pick+dispatch  ``pick()`` + ``on_dispatch(…, decision)`` + ``on_complete()`` of the result
  pick+explain   ``pick()`` + materialising ``decision.ranked`` (what the explain header costs)
  pick, churn    one pod's PodState replaced before every pick (a state push per decision)
A machine reference (a 16-element list comprehension) is printed first: numbers from a busy
machine scale by its ratio to an idle core's (typically 0.4-0.6 µs).

``--precise``: the presets with ``precise-prefix`` in place of ``prefix-cache`` (``bench.precise``,
rows labelled ``+precise``; presets without prefix-cache are skipped). Every request also carries
its prompt's token ids (≈ 34 vLLM blocks of 16, the same system prompt for a quarter of them) and
every dispatch during the warm-up stores the request's vLLM blocks for the picked pod in the
KV index, as that pod's events would; each pod's stream is live. A pick then hashes the prompt's
leading blocks (a SHA-256 each) until no candidate holds one. The index holds at most 64 pods
(``scorer.kv_index.MAX_PODS``): at 256 pods the other 192 are scored on the approximate index.

Usage:  python -m bench.pick_bench [--pods 16 256] [--presets default llm-d ...] [--n 20000] [--precise]
Goals (routing-plane issue): ≤ 20 µs median at 16 pods, ≤ 200 µs at 256 pods.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
import timeit
from collections.abc import Callable

from pathlib import Path

from bench import precise as precise_preset
from scorer.model import AdapterRef, PodState, RoutingRequest
from scorer.build import build_pipeline
from scorer.pipeline import PRESETS, Pipeline
from scorer.prefix import prompt_block_hashes
from scorer.vllm_blocks import block_hashes, lora_extra_keys

BASE = "llama-3.1-8b"
N_ADAPTERS = 1000
RANKS = (8, 16, 32, 64)
LORA_DIR = Path("/var/lib/loraroute/adapters")  # precise-prefix's default lora_path folder


def make_pods(n: int, rng: random.Random, now: float) -> dict[str, PodState]:
    ranks = {f"ad-{i:04d}": RANKS[i % 4] for i in range(N_ADAPTERS)}
    pods: dict[str, PodState] = {}
    for p in range(n):
        names = rng.sample(sorted(ranks), 76)
        gpu, cpu, disk = names[:4], names[4:16], names[16:]
        pods[f"pod-{p:03d}"] = PodState(
            pod_id=f"pod-{p:03d}", url=f"http://127.0.0.1:{9000 + p}", base_models=(BASE,),
            max_loras=4, max_cpu_loras=16, max_lora_rank=64, block_size=16, num_gpu_blocks=26592,
            kv_cache_usage=rng.random() * 0.8, num_running=rng.randrange(0, 40), num_waiting=rng.randrange(0, 5),
            gpu_adapters=tuple(gpu), cpu_adapters=tuple(cpu), disk_adapters=tuple(gpu + cpu + disk),
            running_adapters=tuple(gpu[:3]), adapter_ranks=dict(ranks), observed_at=now + 1e6,
        )
    return pods


def make_requests(k: int, rng: random.Random, token_ids: bool = False) -> list[RoutingRequest]:
    """``token_ids``: each request also carries its prompt's token ids (one per 4 characters; the
    system prompt's are the same in every request that has it)."""
    system = "You are a careful assistant. " * 40
    system_ids = tuple(rng.randrange(1, 32000) for _ in range(300))
    out = []
    for i in range(k):
        a = int(N_ADAPTERS * rng.random() ** 3)  # skewed popularity
        name = f"ad-{a:04d}"
        text = (system if i % 4 == 0 else f"user {rng.random()} " * 40)[:1200] + f"question {i} " * 80
        hashes = prompt_block_hashes(BASE, name, text[:2048])
        ids: tuple[int, ...] = ()
        if token_ids:
            head = system_ids if i % 4 == 0 else tuple(rng.randrange(1, 32000) for _ in range(300))
            ids = head + tuple(rng.randrange(1, 32000) for _ in range(len(text) // 4 - 300))
        out.append(
            RoutingRequest(AdapterRef(BASE, name, RANKS[a % 4]), prompt_tokens=len(text) // 4, max_tokens=128,
                           prefix_hashes=hashes, request_id=str(i), prompt_token_ids=ids)
        )
    return out


def vllm_blocks(reqs: list[RoutingRequest]) -> list[list[int]]:
    """Each request's vLLM blocks (16 tokens, the adapter at precise-prefix's default path)."""
    return [block_hashes(r.prompt_token_ids, 16, lora_extra_keys(r.adapter.name, f"{LORA_DIR}/{r.adapter.name}"))
            for r in reqs]


def make_pipeline(preset: str, precise: bool) -> Pipeline:
    spec = precise_preset.pipeline(preset, LORA_DIR) if precise else {"preset": preset}
    return build_pipeline({**spec, "picker": {"type": PRESETS[preset]["picker"]["type"]}})


def timed(fn: Callable[[int], object], n: int) -> list[float]:
    """Per-call durations in µs of fn(i) for i in range(n), GC paused."""
    pc = time.perf_counter_ns
    samples = [0.0] * n
    gc.collect()
    gc.disable()
    try:
        for i in range(n):
            t0 = pc()
            fn(i)
            samples[i] = (pc() - t0) / 1000.0
    finally:
        gc.enable()
    return samples


def stats(samples: list[float]) -> tuple[float, float]:
    s = sorted(samples)
    return statistics.median(s), s[min(len(s) - 1, int(len(s) * 0.99))]


def bench(preset: str, n_pods: int, n: int, seed: int, precise: bool = False) -> dict[str, tuple[float, float]]:
    rng = random.Random(seed)
    t0 = 1_800_000_000.0
    pods = make_pods(n_pods, rng, t0)
    tick = 0.001  # the clock advances 1 ms per decision (1,000 decisions/s)
    reqs = make_requests(2000, rng, token_ids=precise)
    pl = make_pipeline(preset, precise)
    kv = pl.local.kv
    blocks = vllm_blocks(reqs) if precise else []
    if precise:
        for pid in pods:  # every indexed pod's stream is live from the start
            rec = kv.pod(pid)
            if rec is not None:
                rec.batches = 1
    # warm the prefix index and in-flight counts as a running gateway would have them
    for i in range(20000):
        now = t0 + i * tick
        r = reqs[i % len(reqs)]
        d = pl.pick(r, pods, now)
        if d.pod_id is not None:
            pl.on_dispatch(d.pod_id, r, now, d)
            if precise:
                kv.store(d.pod_id, blocks[i % len(reqs)])
            if i % 10:
                pl.on_complete(d.pod_id, r, True)
    m = len(reqs)
    start = t0 + 20000 * tick
    res = {}
    res["pick"] = stats(timed(lambda i: pl.pick(reqs[i % m], pods, start + i * tick), n))

    def with_dispatch(i: int) -> None:
        r = reqs[i % m]
        now = start + (n + i) * tick
        d = pl.pick(r, pods, now)
        pl.on_dispatch(d.pod_id, r, now, d)  # type: ignore[arg-type]
        pl.on_complete(d.pod_id, r, True)  # type: ignore[arg-type]

    res["+dispatch"] = stats(timed(with_dispatch, n))
    res["+explain"] = stats(timed(lambda i: pl.pick(reqs[i % m], pods, start + 2 * n * tick).ranked, max(1000, n // 10)))
    ids = list(pods)
    # 7 successive states per pod, built before timing (dataclasses.replace itself costs ~15 µs)
    variants = {pid: [pods[pid].replace(num_waiting=k) for k in range(7)] for pid in ids}

    def churn(i: int) -> None:
        pid = ids[i % n_pods]
        pods[pid] = variants[pid][i % 7]
        pl.pick(reqs[i % m], pods, start + (3 * n + i) * tick)

    res["churn"] = stats(timed(churn, n))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, nargs="+", default=[16, 256])
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--n", type=int, default=20000, help="timed picks per cell")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--precise", action="store_true",
                    help="precise-prefix in place of prefix-cache, requests with token ids, pods with KV events")
    args = ap.parse_args(argv)
    presets = [p for p in args.presets
               if not args.precise or any(s["type"] == "prefix-cache" for s in PRESETS[p]["scorers"])]
    goal = {16: 20.0, 256: 200.0}
    ref = min(timeit.repeat("[x * 2.0 + 1.0 for x in xs]", "xs = list(range(16))", number=20000, repeat=5))
    print(f"python {sys.version.split()[0]}; {N_ADAPTERS} adapters; µs per call, median / p99")
    print(f"machine reference: a 16-element list comprehension takes {ref / 20000 * 1e6:.2f} µs here "
          "(typically 0.4-0.6 µs on an idle core; scale the table by the ratio)")
    head = f"{'preset':<15} {'pods':>4}  {'pick':>15}  {'pick+dispatch':>15}  {'pick+explain':>15}  {'pick, churn':>15}  goal"
    print(head)
    print("-" * len(head))
    for n_pods in args.pods:
        for preset in presets:
            r = bench(preset, n_pods, args.n, args.seed, args.precise)
            cells = "  ".join(f"{r[k][0]:>7.1f} /{r[k][1]:>6.1f}" for k in ("pick", "+dispatch", "+explain", "churn"))
            g = goal.get(n_pods)
            verdict = "" if g is None else ("ok" if r["pick"][0] <= g else f"MISSED ({r['pick'][0] / g:.1f}x)")
            label = f"{preset}+precise" if args.precise else preset
            print(f"{label:<15} {n_pods:>4}  {cells}  {verdict}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
