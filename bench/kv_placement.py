"""Where the precise prefix index gets its data: each gateway replica subscribes to every pod's
KV events (``direct``), or each pod's sidecar relays a compact block set through Redis (``store``).

    python -m bench.kv_placement [--pods 4] [--rate 12] [--duration 60] [--num-gpu-blocks 4096]
                                 [--blocks 1000000] [--json FILE]

Part 1, memory (in process, synthetic): ``--blocks`` cached blocks spread over 8 pods, every block
on one pod and then every block on two, in the gateway's ``KVBlockIndex`` (table bytes and the
Python heap traced while filling it); the sidecar's own set of its pod's blocks (a Python set of
ints); and the Redis snapshot (``MEMORY USAGE`` of one pod's key). Also the CPU each replica
spends per stored block: decoding vLLM's msgpack batches and applying them (``direct``) against
unpacking the relay's deltas and applying them (``store``); and what hashing a request's tokens
as vLLM does costs the router per block (``scorer.vllm_blocks``).

Part 2, live (real processes on loopback): one ``loraroute sim cluster`` with ``--pods`` pods
publishing KV events (vLLM's format; a KV cache of ``--num-gpu-blocks`` blocks, so blocks are
evicted too), Redis, one *relay* process standing for the pods' sidecars (a ``KVEventSubscriber``
per pod into a ``KVBlockRelay``: the code a sidecar runs), and two *replica* processes standing
for one gateway replica each: ``direct`` (a subscriber per pod into its ``KVBlockIndex``) and
``store`` (a ``KVBlockFeed``). The load is the reference workload's chat requests (base model,
``--rate`` per second, open loop, spread over the pods) for ``--duration`` seconds. Reported per
process: CPU (% of one core over the window, and µs per stored block), and per replica the
update latency — from the pod's time stamp on the batch to the moment the change is in the
replica's index — p50 / p99 / max, plus the blocks each index ends with (they must agree).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from bench.state_latency import summary


# ------------------------------------------------------------------------------------ part 1
def memory_and_apply_cost(n_blocks: int) -> dict[str, Any]:
    import msgpack

    from podstate.kv_events import apply_batch, decode_batch
    from podstate.kv_store import pack_hashes, unpack_hashes
    from scorer.kv_index import KVBlockIndex

    rng = random.Random(7)
    pods = [f"pod-{i}" for i in range(8)]
    hashes = [rng.getrandbits(64) for _ in range(n_blocks)]
    out: dict[str, Any] = {"blocks": n_blocks}
    for label, holders in (("one_pod_per_block", 1), ("two_pods_per_block", 2)):
        distinct = hashes[: n_blocks // holders]
        gc.collect()
        tracemalloc.start()
        index = KVBlockIndex()
        step = len(distinct) // len(pods)
        for k in range(holders):
            for i, pod in enumerate(pods):
                part = distinct[i * step:(i + 1) * step]
                j = (i + k) % len(pods)
                for s in range(0, len(part), 512):
                    index.store(pods[j], part[s:s + 512])
        cur, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        cached = sum(rec.blocks for rec in index.pods.values())
        out[label] = {"cached_blocks": cached, "distinct_blocks": len(index), "table_bytes": index.nbytes,
                      "bytes_per_cached_block": round(index.nbytes / cached, 1),
                      "heap_bytes_per_cached_block": round(cur / cached, 1),
                      "heap_peak_bytes_per_cached_block": round(peak / cached, 1)}
        del index
    # the sidecar's own set for its pod (one pod of 26,592 blocks: an 8B model on an H100)
    gc.collect()
    tracemalloc.start()
    pod_set = set(hashes[:26_592])
    cur, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out["sidecar_set_bytes_per_block"] = round(cur / len(pod_set), 1)
    out["snapshot_bytes_per_block"] = len(pack_hashes(pod_set)) / len(pod_set)
    del pod_set

    # CPU per stored block on a replica: vLLM batches of 85-block BlockStored events (a ~1,360-token
    # prompt) and one BlockRemoved per evicted block, against the relay's packed deltas
    events = []
    for r in range(200):
        hs = hashes[r * 85:(r + 1) * 85]
        events.append({"type": "BlockStored", "block_hashes": hs, "parent_block_hash": None,
                       "token_ids": [rng.getrandbits(17) for _ in range(85 * 16)], "block_size": 16,
                       "lora_id": 1, "medium": "GPU", "lora_name": "ad000",
                       "extra_keys": [["ad000"]] * 85, "group_idx": 0})
        events += [{"type": "BlockRemoved", "block_hashes": [h], "medium": "GPU", "group_idx": 0}
                   for h in hashes[n_blocks - (r + 1) * 85:n_blocks - r * 85]]
    payloads = [msgpack.packb([time.time(), events[i:i + 86], 0]) for i in range(0, len(events), 86)]
    deltas = [msgpack.packb(["pod-0", "e", i + 1, False, pack_hashes(hashes[i * 85:(i + 1) * 85]),
                             pack_hashes(hashes[n_blocks - (i + 1) * 85:n_blocks - i * 85]), time.time()])
              for i in range(200)]
    stored = 200 * 85
    index = KVBlockIndex()
    t0 = time.process_time()
    for p in payloads:
        apply_batch(index, "pod-0", decode_batch(p), 0.0)
    direct_s = time.process_time() - t0
    index = KVBlockIndex()
    t0 = time.process_time()
    for d in deltas:
        _, _, _, _, added, removed, _ = msgpack.unpackb(d)
        index.remove("pod-0", unpack_hashes(removed))
        index.store("pod-0", unpack_hashes(added))
    store_s = time.process_time() - t0
    out["replica_cpu_us_per_stored_block"] = {"direct": round(direct_s / stored * 1e6, 2),
                                              "store": round(store_s / stored * 1e6, 2)}
    from scorer.vllm_blocks import iter_block_hashes, lora_extra_keys

    tokens = [rng.getrandbits(17) for _ in range(16 * 100)]
    extra = lora_extra_keys("ad000", "/var/lib/loraroute/adapters/ad000")
    samples = []
    for _ in range(30):
        t0 = time.perf_counter()
        for _ in iter_block_hashes(tokens, 16, extra):
            pass
        samples.append((time.perf_counter() - t0) / 100 * 1e6)
    samples.sort()
    out["router_hash_us_per_block"] = {"p50": round(samples[15], 2), "p90": round(samples[27], 2)}
    return out


# ------------------------------------------------------------------------------------ part 2: processes
def _pod_endpoints(base_pub: int, base_replay: int, pods: int) -> list[tuple[str, str, str]]:
    return [(f"pod-{i}", f"tcp://127.0.0.1:{base_pub + i}", f"tcp://127.0.0.1:{base_replay + i}") for i in range(pods)]


async def _relay_main(args: argparse.Namespace) -> dict[str, Any]:
    """One process standing for the pods' sidecars: subscriber → relay → Redis, per pod."""
    import redis.asyncio as aioredis

    from podstate.kv_events import KVEventSubscriber
    from podstate.kv_store import KVBlockRelay

    client = aioredis.Redis.from_url(args.redis_url)
    relays, subs = [], []
    for pod_id, pub, replay in _pod_endpoints(args.base_pub, args.base_replay, args.pods):
        relay = KVBlockRelay(client, pod_id)
        relay.start()
        sub = KVEventSubscriber(pod_id, pub, relay, replay_endpoint=replay)
        sub.start()
        relays.append(relay)
        subs.append(sub)
    await _window(args)
    return {"deltas": sum(r.stats.deltas for r in relays), "snapshots": sum(r.stats.snapshots for r in relays),
            "blocks": sum(len(r.blocks) for r in relays), "batches": sum(s.stats.batches for s in subs)}


async def _replica_main(args: argparse.Namespace) -> dict[str, Any]:
    from podstate.kv_events import IndexSink, KVEventSubscriber
    from podstate.kv_store import KVBlockFeed
    from scorer.kv_index import KVBlockIndex

    index = KVBlockIndex()
    if args.mode == "direct":
        subs = [KVEventSubscriber(pod_id, pub, IndexSink(index), replay_endpoint=replay, record_latency=True)
                for pod_id, pub, replay in _pod_endpoints(args.base_pub, args.base_replay, args.pods)]
        for s in subs:
            s.start()
        await _window(args)
        lat = [x for s in subs for x in s.stats.latencies_s]
        extra = {"batches": sum(s.stats.batches for s in subs), "gaps_replayed": sum(s.stats.replays for s in subs)}
    else:
        feed = KVBlockFeed(args.redis_url, index, record_latency=True)
        feed.start()
        await _window(args)
        lat = feed.stats.latencies_s
        extra = {"deltas": feed.stats.deltas, "snapshots": feed.stats.snapshots, "gaps": feed.stats.gaps}
    return {"latency": summary(lat), "blocks": sum(r.blocks for r in index.pods.values()),
            "index_bytes": index.nbytes, **extra}


async def _window(args: argparse.Namespace) -> None:
    """Run until SIGTERM; CPU is counted from the 'start' line on stdin's signal (SIGUSR1)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: setattr(args, "cpu0", time.process_time()))
    print("ready", flush=True)
    await asyncio.wait_for(stop.wait(), timeout=args.max_s)
    args.cpu1 = time.process_time()


def _child(args: argparse.Namespace) -> int:
    args.cpu0 = time.process_time()
    fn = _relay_main if args.role == "relay" else _replica_main
    result = asyncio.run(fn(args))
    result["cpu_s"] = round(args.cpu1 - args.cpu0, 3)
    Path(args.result).write_text(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------ part 2
async def _drive(pod_urls: list[str], rate: float, duration: float) -> dict[str, int]:
    """Open-loop chat requests of the reference workload (base model) spread over the pods."""
    import aiohttp

    from bench.workload import generate, load_spec

    spec = load_spec(Path(__file__).parent / "specs" / "reference.yaml")
    trace = generate(spec, rate=rate, requests=int(rate * duration) + 1)
    counts = {"ok": 0, "errors": 0}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def one(i: int, messages: list[dict[str, str]], max_tokens: int) -> None:
            url = pod_urls[i % len(pod_urls)] + "/v1/chat/completions"
            try:
                async with session.post(url, json={"model": spec.cluster.base_model, "messages": messages,
                                                   "max_tokens": max_tokens}) as resp:
                    await resp.read()
                    counts["ok" if resp.status == 200 else "errors"] += 1
            except aiohttp.ClientError:
                counts["errors"] += 1

        start = time.monotonic()
        tasks = []
        for i, req in enumerate(trace):
            delay = start + req.t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, req.messages, min(req.max_tokens, 64))))
        await asyncio.gather(*tasks)
    return counts


def live(args: argparse.Namespace) -> dict[str, Any]:
    from loraroute.procs import consecutive_free_ports, loraroute_cmd, python_module, start_process
    from loraroute.services import start_redis
    from vllm_sim.kvevents import KVEventsConfig  # noqa: F401 - the simulator must have KV events

    work = Path(tempfile.mkdtemp(prefix="loraroute-kv-placement-"))
    logs = work / "logs"
    procs = []
    try:
        redis = start_redis(log_dir=logs)
        procs.append(redis)
        base_http = consecutive_free_ports(args.pods)
        base_pub = consecutive_free_ports(args.pods, start=base_http + args.pods + 10)
        base_replay = consecutive_free_ports(args.pods, start=base_pub + args.pods + 10)
        if base_replay - base_pub < args.pods:
            raise RuntimeError("no room for the replay ports")
        kv = {"enable_kv_cache_events": True, "endpoint": f"tcp://*:{base_pub}",
              "replay_endpoint": f"tcp://*:{base_replay}", "topic": ""}
        sim = start_process("sim", loraroute_cmd(
            "sim", "cluster", "--pods", str(args.pods), "--base-port", str(base_http), "--time-scale", "1",
            "--num-gpu-blocks", str(args.num_gpu_blocks), "--kv-events-config", json.dumps(kv)),
            ready_url=f"http://127.0.0.1:{base_http + args.pods - 1}/health", timeout=90, log_dir=logs)
        procs.append(sim)
        common = ["--pods", str(args.pods), "--base-pub", str(base_pub), "--base-replay", str(base_replay),
                  "--redis-url", str(redis.extra["url"]), "--max-s", str(args.duration + 120)]
        children = {}
        for role, mode in (("relay", "-"), ("replica", "direct"), ("replica", "store")):
            name = role if role == "relay" else f"replica-{mode}"
            result = work / f"{name}.json"
            argv = python_module("bench.kv_placement", "_child", "--role", role, "--mode", mode,
                                 "--result", str(result), *common)
            log_path = logs / f"{name}.log"
            proc = start_process(name, argv, ready=lambda p=log_path: p.exists() and b"ready" in p.read_bytes(),
                                 timeout=60, log_dir=logs)
            procs.append(proc)
            children[name] = (proc, result)
        time.sleep(1.0)  # subscriptions up (a PUB drops what is sent before)
        for proc, _ in children.values():
            os.kill(proc.popen.pid, signal.SIGUSR1)
        t0 = time.monotonic()
        counts = asyncio.run(_drive([f"http://127.0.0.1:{base_http + i}" for i in range(args.pods)],
                                    args.rate, args.duration))
        time.sleep(1.0)  # the last events through every path
        wall = time.monotonic() - t0
        snapshot_bytes = _snapshot_memory(str(redis.extra["url"]))
        for proc, _ in children.values():
            proc.stop(timeout=10)
        out: dict[str, Any] = {"pods": args.pods, "rate_rps": args.rate, "duration_s": args.duration,
                               "num_gpu_blocks": args.num_gpu_blocks, "requests": counts, "wall_s": round(wall, 1)}
        for name, (_, result) in children.items():
            doc = json.loads(result.read_text())
            doc["cpu_pct"] = round(100 * doc["cpu_s"] / wall, 1)
            out[name] = doc
        held = max(1, out["relay"]["blocks"])
        out["redis_cpu_s_total"] = _redis_cpu(str(redis.extra["url"]))
        out["redis_snapshot_bytes_per_block"] = round(snapshot_bytes / held, 1) if snapshot_bytes else None
        return out
    finally:
        for p in reversed(procs):
            with contextlib.suppress(Exception):
                p.stop(timeout=5)


def _redis_cpu(url: str) -> float | None:
    import redis

    try:
        info = redis.Redis.from_url(url).info("cpu")
        return round(float(info["used_cpu_sys"]) + float(info["used_cpu_user"]), 3)
    except Exception:  # noqa: BLE001 - a figure, not a requirement
        return None


def _snapshot_memory(url: str) -> float | None:
    import redis

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match="loraroute:kvset:*"))
    if not keys:
        return None
    used = sum(int(client.memory_usage(k) or 0) for k in keys)
    return float(used)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_child":
        p = argparse.ArgumentParser()
        for flag in ("--role", "--mode", "--result", "--redis-url"):
            p.add_argument(flag, required=True)
        for flag in ("--pods", "--base-pub", "--base-replay"):
            p.add_argument(flag, type=int, required=True)
        p.add_argument("--max-s", type=float, default=600.0)
        return _child(p.parse_args(argv[1:]))
    p = argparse.ArgumentParser(prog="python -m bench.kv_placement", description=__doc__.split("\n\n")[0])
    p.add_argument("--pods", type=int, default=4)
    p.add_argument("--rate", type=float, default=12.0, help="chat requests per second over all pods")
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--num-gpu-blocks", type=int, default=4096)
    p.add_argument("--blocks", type=int, default=1_000_000, help="cached blocks for the memory part")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from bench.runner import code_version

    result = {"memory": memory_and_apply_cost(args.blocks), "live": live(args),
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "code_version": code_version()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
