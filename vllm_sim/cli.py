"""``loraroute sim ...`` (one pod) and ``loraroute sim cluster --pods K --base-port P ...``.

Flags keep vLLM's names and defaults where vLLM has them (``--max-loras`` 1, ``--max-cpu-loras``
= max_loras, ``--max-lora-rank`` 16 from vLLM's allowed set, ``--max-num-batched-tokens`` 8192,
``--max-num-seqs`` 1024, ``--block-size`` 16). A cluster runs K independent engines in one
process on consecutive ports sharing one adapter directory; pod ``i`` uses seed ``seed + i``.

Runtime LoRA updating (load/unload routes, resolver) is on with ``--allow-runtime-lora-updating``
or ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1|true``. ``--adapter-dir`` (or
``VLLM_LORA_RESOLVER_CACHE_DIR``) plays vLLM's filesystem resolver. ``--kv-events-config JSON``
publishes KV-cache events as vLLM does (``vllm_sim.kvevents``; in a cluster pod i offsets both
ports by i).

Costs: ``--profile`` picks a ``vllm_sim.costs.PROFILES`` entry (``8b``: compiled vLLM 0.25.1 on an
H200, the default; ``8b-eager``); ``--cost KEY=VALUE`` (repeatable) overrides one of its constants.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from dataclasses import replace

import zmq
from aiohttp import web

from .adapters import AdapterInvalid, AdapterNotFound
from .costs import PROFILES, ProfileError, get_profile, parse_override
from .engine import Engine, EngineConfig
from .gpushare import GpuShare, GpuShareError, group
from .kvevents import KVEventPublisher, KVEventsConfig
from .server import Pod, PodConfig, create_app, dev_mode_from_env, runtime_updating_from_env

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class _OneLine(logging.Filter):
    """aiohttp logs a full traceback for a malformed request (e.g. an HTTP/2 preface, which
    vLLM's HTTP/1.1 server refuses too); keep one line with the error's type and no trace."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            err = record.exc_info[1]
            message = record.getMessage()
            record.msg = "%s: %s"
            record.args = (message, type(err).__name__)
            record.exc_info = None
            record.exc_text = None
        return True


def _setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    for name in ("aiohttp.server", "aiohttp.web", "asyncio"):
        logging.getLogger(name).addFilter(_OneLine())


def _lora_module(value: str) -> tuple[str, str]:
    value = value.strip()
    if value.startswith("{"):
        try:
            data = json.loads(value)
            return str(data["name"]), str(data["path"])
        except (ValueError, KeyError, TypeError):
            raise argparse.ArgumentTypeError(f"invalid --lora-modules JSON: {value}") from None
    if "=" not in value:
        raise argparse.ArgumentTypeError(f"--lora-modules expects name=path or JSON, got {value!r}")
    name, path = value.split("=", 1)
    return name, path


def _cost_override(value: str) -> tuple[str, float]:
    try:
        return parse_override(value)
    except ProfileError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser(cluster: bool) -> argparse.ArgumentParser:
    prog = "loraroute sim cluster" if cluster else "loraroute sim"
    p = argparse.ArgumentParser(prog=prog, description="Simulated vLLM 0.33 OpenAI server(s) with multi-LoRA.")
    if cluster:
        p.add_argument("--pods", type=int, required=True, help="number of pods (independent engines)")
        p.add_argument("--base-port", type=int, required=True, help="port of pod 0; pod i listens on base+i")
    else:
        p.add_argument("--port", type=int, default=8000)
        p.add_argument("--pod-name", default=None, help="name in /sim/state (default host:port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--model", default="meta-llama/Llama-3.1-8B-Instruct")
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument("--max-model-len", type=int, default=131072)
    p.add_argument("--enable-lora", action="store_true")
    p.add_argument("--max-loras", type=int, default=1)
    p.add_argument("--max-cpu-loras", type=int, default=None)
    p.add_argument("--max-lora-rank", type=int, default=16, choices=MAX_LORA_RANKS)
    p.add_argument("--lora-modules", nargs="+", type=_lora_module, default=[])
    p.add_argument("--adapter-dir", default=None, help="filesystem resolver directory (VLLM_LORA_RESOLVER_CACHE_DIR)")
    p.add_argument("--allow-runtime-lora-updating", action="store_true")
    p.add_argument("--emit-residency-metrics", action="store_true",
                   help="also emit vllm:lora_adapter_loaded{adapter_name,level,rank}")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-gpu-blocks", "--num-gpu-blocks-override", dest="num_gpu_blocks", type=int, default=26592)
    p.add_argument("--time-scale", type=float, default=1.0, help="wall = simulated x this (0: no delays)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stream-interval", type=int, default=1,
                   help="vLLM's --stream-interval: streamed tokens are sent every N tokens (the first at once)")
    p.add_argument("--state-ring-size", type=int, default=5000, help="requests kept for /sim/state")
    p.add_argument("--kv-events-config", default=None,
                   help="vLLM's KV-event publisher config as JSON, e.g. "
                        '\'{"enable_kv_cache_events":true,"endpoint":"tcp://*:5557","replay_endpoint":"tcp://*:5558"}\'')
    p.add_argument("--profile", default="8b", choices=sorted(PROFILES),
                   help="cost profile: 8b (compiled vLLM 0.25.1 on an H200, the default) or 8b-eager")
    if cluster:
        p.add_argument("--pods-per-gpu", type=int, default=1,
                       help="consecutive groups of N pods share one GPU (default 1: a GPU each); needs --gpu-share")
        p.add_argument("--gpu-share", default=None, metavar="FILE",
                       help="slow-down factors of pods that share a GPU: the GPU kit's share.json (vllm_sim.gpushare)")
    p.add_argument("--cost", action="append", default=[], metavar="KEY=VALUE", type=_cost_override,
                   help="override one constant of the profile (seconds; repeatable), e.g. --cost load_scale=3")
    return p


def _check(args: argparse.Namespace) -> str | None:
    if args.max_loras < 1:
        return "--max-loras must be >= 1"
    if args.max_cpu_loras is not None and args.max_cpu_loras < args.max_loras:
        return f"max_cpu_loras ({args.max_cpu_loras}) must be >= max_loras ({args.max_loras})"
    if args.lora_modules and not args.enable_lora:
        return "--lora-modules requires --enable-lora"
    if args.time_scale < 0:
        return "--time-scale must be >= 0"
    for name in ("max_num_batched_tokens", "max_num_seqs", "block_size", "num_gpu_blocks", "max_model_len",
                 "stream_interval", "state_ring_size"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1"
    if args.adapter_dir and not os.path.isdir(args.adapter_dir):
        return f"adapter dir {args.adapter_dir} does not exist"
    if args.kv_events_config is not None:
        try:
            KVEventsConfig.from_json(args.kv_events_config)
        except ValueError as e:
            return str(e)
    try:
        get_profile(args.profile, dict(args.cost))
    except ProfileError as e:
        return str(e)
    if getattr(args, "pods_per_gpu", 1) < 1:
        return "--pods-per-gpu must be >= 1"
    if getattr(args, "pods_per_gpu", 1) > 1 and not args.gpu_share:
        return "--pods-per-gpu > 1 needs --gpu-share FILE (the slow-down factors of pods sharing a GPU)"
    if getattr(args, "gpu_share", None):
        try:
            GpuShare.load(args.gpu_share)
        except GpuShareError as e:
            return str(e)
    return None


def make_pods(args: argparse.Namespace, ports: list[int], names: list[str], loop: asyncio.AbstractEventLoop) -> list[Pod]:
    profile = get_profile(args.profile, dict(args.cost))
    base = EngineConfig(
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
        block_size=args.block_size, num_gpu_blocks=args.num_gpu_blocks, max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras or args.max_loras, max_lora_rank=args.max_lora_rank,
        max_model_len=args.max_model_len, time_scale=args.time_scale, seed=args.seed,
        ring_size=args.state_ring_size, stream_interval=args.stream_interval,
    )
    adapter_dir = args.adapter_dir or os.environ.get("VLLM_LORA_RESOLVER_CACHE_DIR") or None
    runtime = bool(args.allow_runtime_lora_updating or runtime_updating_from_env())
    kv_config = KVEventsConfig.from_json(args.kv_events_config) if args.kv_events_config else None
    pods = []
    for i, (_port, name) in enumerate(zip(ports, names)):
        engine = Engine(replace(base, seed=args.seed + i), profile, loop)
        config = PodConfig(
            model=args.model, served_model_names=list(args.served_model_name or []),
            enable_lora=args.enable_lora, runtime_lora_updating=runtime, adapter_dir=adapter_dir,
            emit_residency_metrics=args.emit_residency_metrics, pod_name=name,
            static_loras=list(args.lora_modules), dev_mode=dev_mode_from_env(),
        )
        publisher = None
        if kv_config is not None and kv_config.enabled:
            publisher = KVEventPublisher(kv_config, rank=i, host=args.host, wall_clock=engine.wall_clock)
        pod = Pod(config, engine, publisher)
        pod.load_static()
        pods.append(pod)
    if getattr(args, "gpu_share", None) and args.pods_per_gpu > 1:
        group([p.engine for p in pods], args.pods_per_gpu, GpuShare.load(args.gpu_share))
    return pods


async def _serve(args: argparse.Namespace, ports: list[int], names: list[str]) -> int:
    loop = asyncio.get_running_loop()
    try:
        pods = make_pods(args, ports, names, loop)
    except (AdapterInvalid, AdapterNotFound) as e:
        print(f"vllm_sim: failed to load a --lora-modules adapter: {e}", file=sys.stderr)
        return 1
    except (ValueError, zmq.ZMQError) as e:
        print(f"vllm_sim: cannot publish KV events: {e}", file=sys.stderr)
        return 1
    for pod in pods:
        if pod.kv_events is not None:
            pod.kv_events.start()
            print(f"vllm_sim: pod {pod.config.pod_name} publishes KV events on {pod.kv_events.endpoint}"
                  f" (replay {pod.kv_events.replay_endpoint or 'off'})", flush=True)
    runners = []
    for pod, port in zip(pods, ports):
        runner = web.AppRunner(create_app(pod), access_log=None, handle_signals=False,
                               handler_cancellation=True, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, args.host, port, backlog=1024)
        await site.start()
        runners.append(runner)
        print(f"vllm_sim: pod {pod.config.pod_name} serving {pod.config.served[0]} on http://{args.host}:{port}"
              f" (max_loras={pod.engine.config.max_loras}, max_cpu_loras={pod.engine.config.max_cpu_loras},"
              f" time_scale={args.time_scale}, profile={pod.engine.profile.name})", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"vllm_sim: ready ({len(pods)} pod{'s' if len(pods) != 1 else ''})", flush=True)
    await stop.wait()
    # in-flight requests are cut after a short grace period (a stopped pod, as when vLLM exits)
    await asyncio.gather(*(runner.cleanup() for runner in runners))
    await asyncio.gather(*(pod.kv_events.close() for pod in pods if pod.kv_events is not None))
    return 0


def main(argv: list[str]) -> int:
    argv = list(argv)
    cluster = bool(argv) and argv[0] == "cluster"
    if cluster:
        argv = argv[1:]
    args = build_parser(cluster).parse_args(argv)
    _setup_logging()
    problem = _check(args)
    if problem:
        print(f"loraroute sim: error: {problem}", file=sys.stderr)
        return 2
    if cluster:
        if args.pods < 1:
            print("loraroute sim: error: --pods must be >= 1", file=sys.stderr)
            return 2
        ports = [args.base_port + i for i in range(args.pods)]
        names = [f"{args.host}:{p}" for p in ports]
    else:
        ports = [args.port]
        names = [args.pod_name or f"{args.host}:{args.port}"]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    try:
        return int(runner(_serve(args, ports, names)))
    except OSError as e:
        print(f"loraroute sim: error: {e}", file=sys.stderr)
        return 1
