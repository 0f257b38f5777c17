"""``python -m bench.tokenize_cost``: what producing a prompt's token ids costs on the request path.

The prompts are the reference workload's chat requests (``bench/specs/reference.yaml``: an
800-token system prompt, follow-ups carrying their history; about 1,000–3,000 tokens each).

1. **The stage alone**, in this process, ``requests`` prompts per mode: ``sim`` (``pseudotok``:
   template + tokenizer), ``local`` (``gateway.tokens_local`` over the GPU kit's ``tokenizer.json``
   and chat template, ``bench.gpu.model``: a WordLevel model, so cheaper than a real BPE
   tokenizer), ``pod`` (``POST /tokenize`` on a zero-delay simulated pod over one keep-alive
   connection, each prompt new: a cache miss) and ``cached`` (the XXH3-128 digest of the body and
   the LRU lookup that answer a repeated conversation without a call).
2. **End to end**, a gateway process per mode in front of the same pod (``memory://``, the pod's
   events followed by the gateway itself), ``requests`` sequential non-streaming requests per
   gateway in 5 interleaved rounds (``max_tokens`` 1): the baseline is the ``default`` preset
   without precise-prefix (no token ids at all); the others run ``default`` with
   ``precise-prefix`` in place of ``prefix-cache`` (``bench.precise``) and the mode's tokenizer.
   ``added_p50_ms`` is the mode's median minus the baseline's, per round, then the median.

Prints one JSON document (and writes it with ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import xxhash
import yaml

from bench.precise import pipeline as precise_pipeline
from bench.workload import generate, load_spec
from gateway.parse import Kind
from gateway.tokens import IdCache, sim_ids
from loraroute.procs import Proc, free_port, free_ports, loraroute_cmd, start_process

SPEC = Path(__file__).parent / "specs" / "reference.yaml"
BASE = "base"


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def _summary_us(xs: list[float]) -> dict[str, float]:
    return {"p50_us": round(1e6 * _pct(xs, 0.5), 1), "p99_us": round(1e6 * _pct(xs, 0.99), 1),
            "mean_us": round(1e6 * statistics.fmean(xs), 1)}


def prompts(n: int) -> list[list[dict[str, str]]]:
    return [r.messages for r in generate(load_spec(SPEC), rate=10.0, requests=n)]


def stage_costs(convs: list[list[dict[str, str]]], pod_url: str, model_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    times: list[float] = []
    for m in convs:
        t0 = time.perf_counter()
        sim_ids(Kind.CHAT, {"messages": m}, 262_144)
        times.append(time.perf_counter() - t0)
    out["sim"] = _summary_us(times)
    tokens = [len(sim_ids(Kind.CHAT, {"messages": m}, 262_144)) for m in convs]
    out["prompt_tokens"] = {"p50": int(_pct(tokens, 0.5)), "max": max(tokens)}
    try:
        from gateway.tokens_local import LocalTokenizer

        tok = LocalTokenizer.load(str(model_dir))
        times = []
        for m in convs:
            t0 = time.perf_counter()
            tok.chat_ids(m, {})
            times.append(time.perf_counter() - t0)
        out["local"] = _summary_us(times)
    except Exception as e:  # noqa: BLE001 - the optional packages may be missing
        out["local"] = {"error": str(e)[:200]}
    cache = IdCache(4096)
    times = []
    for m in convs:
        body = orjson.dumps({"model": BASE, "messages": m})
        cache.put(xxhash.xxh3_128_digest(body), (1,))
    for m in convs:
        t0 = time.perf_counter()
        body = orjson.dumps({"model": BASE, "messages": m})
        cache.get(xxhash.xxh3_128_digest(body))
        times.append(time.perf_counter() - t0)
    out["cached"] = _summary_us(times)
    out["pod"] = asyncio.run(_pod_costs(convs, pod_url))
    return out


async def _pod_costs(convs: list[list[dict[str, str]]], url: str) -> dict[str, float]:
    times: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        for m in convs[:10]:  # warm the connection
            async with session.post(url + "/tokenize", data=orjson.dumps({"model": BASE, "messages": m}),
                                    headers={"Content-Type": "application/json"}) as resp:
                await resp.read()
        for m in convs:
            t0 = time.perf_counter()
            async with session.post(url + "/tokenize", data=orjson.dumps({"model": BASE, "messages": m}),
                                    headers={"Content-Type": "application/json"}) as resp:
                await resp.read()
            times.append(time.perf_counter() - t0)
    return _summary_us(times)


def _gateway(work: Path, name: str, pod_url: str, pub: int, replay: int, tokenizer: dict[str, Any] | None,
             adapter_dir: Path) -> Proc:
    port = free_port()
    cfg: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "reload_poll_s": 0, "log_level": "warning"},
        "bases": [{"name": BASE, "tokenizer": tokenizer or {"mode": "none"}}],
        "discovery": {"static": [{"id": "pod-0", "url": pod_url, "kv_events": {
            "endpoint": f"tcp://127.0.0.1:{pub}", "replay_endpoint": f"tcp://127.0.0.1:{replay}"}}]},
        "ensure": {"enabled": False},
        "pipeline": precise_pipeline("default", adapter_dir) if tokenizer else "default",
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return start_process(name, loraroute_cmd("gateway", "--config", str(path)), port=port,
                         ready_url=f"http://127.0.0.1:{port}/ready", timeout=60, log_dir=work / "logs")


async def _end_to_end(urls: dict[str, str], convs: list[list[dict[str, str]]], warm: list[list[dict[str, str]]],
                      rounds: int) -> dict[str, list[list[float]]]:
    samples: dict[str, list[list[float]]] = {k: [] for k in urls}
    per_round = max(1, len(convs) // rounds)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=len(urls))) as session:
        for name, url in urls.items():  # warm-up, on other prompts (the measured ones are cache misses)
            for m in warm:
                await _chat(session, url, m)
        order = list(urls)
        for r in range(rounds):
            chunk = convs[r * per_round:(r + 1) * per_round]
            for name in order[r % len(order):] + order[:r % len(order)]:
                times = []
                for m in chunk:
                    t0 = time.perf_counter()
                    await _chat(session, urls[name], m)
                    times.append(time.perf_counter() - t0)
                samples[name].append(times)
    return samples


async def _chat(session: aiohttp.ClientSession, url: str, messages: list[dict[str, str]]) -> None:
    body = orjson.dumps({"model": BASE, "messages": messages, "max_tokens": 1})
    async with session.post(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tokenize_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    from bench.gpu import model

    everything = prompts(args.requests + 10)
    convs, warm = everything[:args.requests], everything[args.requests:]
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="tokcost-") as tmp:
        work = Path(tmp)
        model_dir = model.write_model(work / "model", model.SHAPES["tiny"])
        (work / "adapters").mkdir()
        port, pub, replay = free_ports(3)
        kv = json.dumps({"enable_kv_cache_events": True, "endpoint": f"tcp://*:{pub}", "replay_endpoint": f"tcp://*:{replay}"})
        try:
            procs.append(start_process("sim", loraroute_cmd("sim", "--port", str(port), "--model", BASE, "--time-scale", "0",
                                                            "--kv-events-config", kv), port=port,
                                       ready_url=f"http://127.0.0.1:{port}/health", timeout=60, log_dir=work / "logs"))
            pod = f"http://127.0.0.1:{port}"
            stage = stage_costs(convs, pod, model_dir)
            modes: dict[str, dict[str, Any] | None] = {
                "baseline": None, "sim": {"mode": "sim"}, "pod": {"mode": "pod", "min_chars": 0},
                "local": {"mode": "local", "path": str(model_dir), "min_chars": 0}}
            urls = {}
            for name, tok in modes.items():
                gw = _gateway(work, f"gw-{name}", pod, pub, replay, tok, work / "adapters")
                procs.append(gw)
                urls[name] = gw.url
            samples = asyncio.run(_end_to_end(urls, convs, warm, args.rounds))
        finally:
            for proc in reversed(procs):
                proc.stop()
    e2e: dict[str, Any] = {}
    for name, rounds in samples.items():
        flat = [x for r in rounds for x in r]
        e2e[name] = {"p50_ms": round(1e3 * _pct(flat, 0.5), 3), "p99_ms": round(1e3 * _pct(flat, 0.99), 3)}
        if name != "baseline":
            added = [statistics.median(mine) - statistics.median(base)
                     for mine, base in zip(rounds, samples["baseline"])]
            e2e[name]["added_p50_ms"] = round(1e3 * statistics.median(added), 3)
            e2e[name]["added_p50_rounds_ms"] = [round(1e3 * a, 3) for a in added]
    doc = {"meta": {"kind": "tokenize-cost", "requests": args.requests, "rounds": args.rounds,
                    "spec": str(SPEC.name)}, "stage": stage, "end_to_end": e2e}
    text = json.dumps(doc, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
