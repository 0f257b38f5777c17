"""Where one gateway request's CPU goes: the request path profiled end to end, sampled by py-spy.

Set-up: one zero-delay simulated pod (``loraroute sim --time-scale 0``, its own process), the
gateway in this process exactly as ``loraroute gateway`` serves it (uvicorn on uvloop + httptools,
the ``default`` preset, the lean upstream client), one pod whose state says it holds the adapter
(published once, never stale, so no monitor runs beside the requests), and a client in another
process sending ``--requests`` sequential keep-alive requests (chat, a 258-character prompt,
``max_tokens`` 4; ``--stream`` for SSE).

Two passes over the same set-up:

1. unprofiled: the gateway process's CPU time (``getrusage``) per request — the real cost;
2. sampled: ``py-spy record --native`` attached to this process while the client runs (``--rate``
   samples a second, native frames included). Samples waiting in the kernel (``epoll_pwait``,
   ``wait4``, ``futex``, ...) are idle and left out; one inside the garbage collector counts as
   "garbage collector"; every other one is charged to the innermost Python frame that belongs to
   a known part — uvicorn's HTTP server, the request-path stages, the upstream client, the pick,
   policy and metrics, asyncio — so time spent in C (a socket ``write``, the httptools parser,
   orjson) counts for the Python code that called it. ``share × real CPU per request`` is the
   estimate printed as µs. A sampler, unlike cProfile, adds no cost to each Python call, so the
   shares are not skewed toward code that makes many small calls (it pauses the process for
   each sample instead, which slows all of it alike).

Usage: ``python -m bench.profile_request [--requests 5000] [--stream] [--rate 2000] [--top 25]
[--keep-stacks FILE] [--cpu-only]`` (py-spy comes with ``pip install -e '.[bench]'``). Another
checkout's gateway (an A/B of two versions) is profiled by running this file with that checkout
first on the path: ``PYTHONPATH=OTHER python bench/profile_request.py ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import http.client
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

BASE = "tsuzumi-base"
ADAPTER = "sql"
WARMUP = 200

# (group, path fragments of the code it covers); a sample is charged to its innermost matching frame
GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("pick (scorer pipeline and plugins)", ("scorer/",)),
    # (gateway/proxy.py: the single module the request path was before it became stages, so
    # that an older checkout can be profiled the same way for comparison)
    ("request path (edge, parse, route, forward, relay, echo)", tuple(
        f"gateway/{m}.py" for m in ("edge", "parse", "route", "forward", "relay", "exchange", "echo", "failures",
                                    "suspects", "proxy"))),
    ("upstream client (h1client, upstream: socket write, response parsing)", ("gateway/h1client.py", "gateway/h1conn.py",
                                                                              "gateway/upstream.py")),
    ("policy, metrics, decision record (gateway.policy, gateway.metrics, prometheus_client)", (
        "gateway/policy.py", "gateway/metrics.py", "gateway/service.py", "prometheus_client/")),
    ("uvicorn HTTP server (request parsing, ASGI cycle, socket write)", ("uvicorn/",)),
    ("asyncio (tasks, futures, locks)", ("asyncio/",)),
]
OTHER = "other (uvloop's C code between callbacks, app dispatch, ...)"
GC = "garbage collector"
IDLE = frozenset({"epoll_pwait", "epoll_wait", "wait4", "waitpid", "futex", "poll", "select", "nanosleep",
                  "clock_nanosleep", "pthread_cond_wait", "pthread_cond_timedwait", "__futex_abstimed_wait_common"})


def group_of(stack: str) -> str | None:
    """``stack``: py-spy's raw line without the count, outermost frame first; None when idle."""
    frames = stack.split(";")
    if frames[-1].split(" (", 1)[0] in IDLE:
        return None
    if any(f.startswith("gc_collect") for f in frames):
        return GC
    for frame in reversed(frames):
        path = frame.rpartition(" (")[2].rstrip(")").rpartition(":")[0]
        for label, parts in GROUPS:
            if any(path.startswith(p) or f"/{p}" in path for p in parts):
                return label
    return OTHER


def client_main(url: str, n: int, stream: bool) -> None:
    """Sequential keep-alive requests (the other process)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"model": f"{BASE}:{ADAPTER}", "max_tokens": 4, "stream": stream,
                       "messages": [{"role": "user", "content": "Summarise the benefits of adapter routing. " * 6}]})
    for _ in range(n):
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise SystemExit(f"gateway answered {resp.status}: {resp.read()[:300]!r}")


async def serve_and_measure(pod_url: str, requests: int, stream: bool, sampler: list[str] | None) -> float:
    """Serve ``requests`` + warm-up from a client process; returns this process's CPU s per request.
    ``sampler``: a command run (and stopped with SIGINT) around the measured requests."""
    import uvicorn

    from gateway.app import create_app
    from gateway.cli import uvicorn_config
    from gateway.config import load_config
    from gateway.service import Gateway
    from loraroute.procs import free_port
    from scorer.model import PodState

    port = free_port()
    cfg = load_config({
        "server": {"port": port, "reload_poll_s": 0, "log_level": "warning"},
        "bases": [{"name": BASE, "adapters": [{"name": ADAPTER, "rank": 8}]}],
        "discovery": {"static": [{"id": "pod-0", "url": pod_url}], "monitor": "never"},
    }, env={})
    gw = Gateway(cfg)
    server = uvicorn.Server(uvicorn_config(create_app(gw), cfg, "127.0.0.1", port))  # type: ignore[arg-type]
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    serving = asyncio.create_task(server.serve())
    while not (server.started and gw.ready):
        await asyncio.sleep(0.02)
    await gw.store.publish(PodState("pod-0", pod_url, base_models=(BASE,), max_loras=4, max_lora_rank=16,
                                    gpu_adapters=(ADAPTER,), observed_at=time.time() + 1e6), ttl_s=1e6)
    argv = [sys.executable, str(Path(__file__).resolve()), "--client", f"http://127.0.0.1:{port}"]
    await asyncio.to_thread(subprocess.run, [*argv, str(WARMUP), "1" if stream else "0"], check=True)
    spy = subprocess.Popen(sampler, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) if sampler else None
    if spy is not None:
        await asyncio.sleep(1.0)  # attached
    gc0 = [g["collections"] for g in gc.get_stats()]
    t0 = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.to_thread(subprocess.run, [*argv, str(requests), "1" if stream else "0"], check=True)
    t1 = resource.getrusage(resource.RUSAGE_SELF)
    gc_per_k = [round(1000 * (g["collections"] - c) / requests, 1) for g, c in zip(gc.get_stats(), gc0)]
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        await asyncio.to_thread(spy.wait, 60)
    server.should_exit = True
    await serving
    await gw.close()
    if sampler is None:
        print(f"garbage collections per 1000 requests (generations 0 / 1 / 2): {' / '.join(map(str, gc_per_k))}")
    # the thread that waits for the client costs nothing measurable; the loop thread is the gateway
    return (t1.ru_utime - t0.ru_utime + t1.ru_stime - t0.ru_stime) / requests


def report(stacks: Path, requests: int, cpu_s: float, rate: float, top: int) -> str:
    """The groups' shares and the hottest innermost frames, from py-spy's raw (collapsed) output."""
    groups: Counter[str] = Counter()
    frames: Counter[str] = Counter()
    idle = 0
    for line in stacks.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        group = group_of(stack)
        if group is None:
            idle += n
            continue
        groups[group] += n
        inner = stack.rsplit(";", 1)[-1]
        name, _, where = inner.partition(" (")
        frames[f"{name} ({Path(where.rstrip(')').rpartition(':')[0] or where.rstrip(')')).name})"] += n
    total = sum(groups.values()) or 1
    lines = [f"real CPU per request (unprofiled): {1e6 * cpu_s:.0f} µs; {total} busy samples at {rate:g}/s "
             f"({idle} idle ones left out)", "",
             "| where | share | ≈ µs per request |", "|---|---|---|"]
    for label, n in groups.most_common():
        lines.append(f"| {label} | {100 * n / total:.1f} % | {1e6 * cpu_s * n / total:.0f} |")
    lines += ["", f"innermost frames, top {top} (share of samples):", ""]
    for name, n in frames.most_common(top):
        lines.append(f"  {100 * n / total:5.1f} %  {name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--rate", type=float, default=2000, help="py-spy samples a second")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--keep-stacks", type=Path, help="copy py-spy's raw stacks here (flame-graph input)")
    ap.add_argument("--cpu-only", action="store_true", help="only the unprofiled pass: CPU per request")
    ap.add_argument("--client", nargs=3, metavar=("URL", "N", "STREAM"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.client:
        client_main(args.client[0], int(args.client[1]), args.client[2] == "1")
        return 0
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not args.cpu_only and not Path(spy).exists():
        print("py-spy is needed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    import uvloop

    from loraroute import peft
    from loraroute.procs import free_port, loraroute_cmd, start_process

    work = Path(tempfile.mkdtemp(prefix="loraroute-profile-"))
    peft.make_adapter(work / "adapters" / ADAPTER, base_model=BASE, rank=8)
    port = free_port()
    sim = start_process("sim", loraroute_cmd(
        "sim", "--port", str(port), "--model", BASE, "--enable-lora", "--allow-runtime-lora-updating", "--time-scale", "0",
        "--adapter-dir", str(work / "adapters")), port=port, ready_url=f"http://127.0.0.1:{port}/health",
        timeout=60, log_dir=work)
    stacks = work / "stacks.txt"
    sampler = [spy, "record", "--pid", str(os.getpid()), "--rate", f"{args.rate:g}", "--native",
               "--format", "raw", "--output", str(stacks)]
    try:
        cpu_s = uvloop.run(serve_and_measure(sim.url, args.requests, args.stream, None))
        if not args.cpu_only:
            uvloop.run(serve_and_measure(sim.url, args.requests, args.stream, sampler))
    finally:
        sim.stop()
    load = os.getloadavg()
    print(f"{args.requests} sequential {'streaming' if args.stream else 'non-streaming'} requests; "
          f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores")
    if args.cpu_only:
        print(f"CPU per request: {1e6 * cpu_s:.0f} µs")
        return 0
    print(report(stacks, args.requests, cpu_s, args.rate, args.top))
    if args.keep_stacks is not None:
        shutil.copy(stacks, args.keep_stacks)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
