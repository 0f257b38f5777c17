"""``loraroute demo``: the embedded default, everything on loopback in one command.

Starts:
1. a small generated adapter set (tiny real PEFT adapters, ``loraroute.peft``) in a temporary
   folder that plays vLLM's filesystem resolver directory;
2. a simulated vLLM cluster (``loraroute sim cluster`` as a child process, runtime LoRA
   updating on, adapters resolved from that folder on first use);
3. the gateway in this process: in-process pod monitors publishing into an in-memory store, the
   ``default`` pipeline, uvicorn on 127.0.0.1; run-time changes need a second person (the
   admin key proposes, the approver key approves), proposals and the audit log in the
   temporary folder.

Then prints a working ``curl`` and ``openai`` example with the real port and model names, the
dashboard's address and the two keys, and runs until Ctrl-C (or ``--duration`` seconds). Shutdown is clean: the gateway stops accepting,
monitors stop, the cluster is terminated and the temporary folder removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import secrets
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loraroute import peft
from loraroute.procs import Proc, consecutive_free_ports, free_port, http_ready, loraroute_cmd, port_open, start_process

BASE = "tsuzumi-base"
#: (name, rank) of the generated adapters: the seed's "flavors"
ADAPTERS: tuple[tuple[str, int], ...] = (("sql", 8), ("summarize", 16), ("creative", 8), ("translate", 16))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraroute demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=8000, help="gateway port (a free one if taken; default 8000)")
    p.add_argument("--pods", type=int, default=3, help="simulated vLLM pods (default 3)")
    p.add_argument("--max-loras", type=int, default=2, help="GPU adapter slots per pod (default 2)")
    p.add_argument("--max-cpu-loras", type=int, default=3, help="CPU adapter cache per pod (default 3)")
    p.add_argument("--time-scale", type=float, default=1.0, help="simulator speed: 1 real time, 0.1 ten times faster")
    p.add_argument("--pipeline", default="default", help="routing preset (default, llm-d, round-robin, random, least-loaded)")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: until Ctrl-C)")
    return p


def demo_config(port: int, pod_urls: list[str], admin_digest: str, pipeline: str, max_cpu_loras: int,
                approver_digest: str, state_dir: Path) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": port, "reload_poll_s": 0},
        "bases": [{"name": BASE, "adapters": [{"name": n, "rank": r} for n, r in ADAPTERS]}],
        "admin": {"api_key_sha256": [admin_digest],
                  "keys": [{"name": "approver", "roles": ["approver"], "api_key_sha256": [approver_digest]}]},
        "changes": {"two_person": "all", "state_dir": str(state_dir)},
        "discovery": {
            "static": [
                {"id": f"pod-{i}", "url": url, "max_lora_rank": 16, "max_cpu_loras": max_cpu_loras}
                for i, url in enumerate(pod_urls)
            ],
            "monitor": "auto",
        },
        "store": {"url": "memory://"},
        "pipeline": pipeline,
    }


def usage_text(port: int, admin_key: str, pods: int, approver_key: str) -> str:
    url = f"http://127.0.0.1:{port}"
    names = ", ".join(f"{BASE}:{n}" for n, _ in ADAPTERS)
    return f"""
loraroute demo: gateway on {url} in front of {pods} simulated vLLM pods (in-memory state).

Models: {BASE} (the base) and {names}

  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{BASE}:sql", "messages": [{{"role": "user", "content": "List the tables"}}], "max_tokens": 32}}'

  python - <<'EOF'
  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="unused")
  for chunk in client.chat.completions.create(model="{BASE}:summarize", stream=True, max_tokens=32,
          messages=[{{"role": "user", "content": "Summarise this text"}}]):
      print(chunk.choices[0].delta.content or "", end="", flush=True)
  print()
  EOF

Why a pod was chosen (admin key of this run: {admin_key}):
  curl -s -D- -o /dev/null {url}/v1/chat/completions -H 'x-loraroute-debug: 1' -H 'Authorization: Bearer {admin_key}' \\
    -H 'Content-Type: application/json' -d '{{"model": "{BASE}:sql", "messages": [{{"role": "user", "content": "hi"}}]}}'
  curl -s {url}/admin/decisions?limit=5 -H 'Authorization: Bearer {admin_key}'
  curl -s {url}/metrics | grep ^loraroute_

Live dashboard: {url}/dashboard (any user name; password: the admin key)
Run-time changes need two people: the admin key proposes, the approver key ({approver_key}) approves:
  LORAROUTE_GATEWAY={url} LORAROUTE_ADMIN_KEY={admin_key} .venv/bin/loraroute changes propose weights prefix-cache=2
  LORAROUTE_GATEWAY={url} LORAROUTE_ADMIN_KEY={approver_key} .venv/bin/loraroute changes approve chg-1

Ctrl-C stops everything.
""".strip("\n")


def start_cluster(adapter_dir: Path, args: argparse.Namespace, log_dir: Path) -> tuple[Proc, list[str]]:
    base_port = consecutive_free_ports(args.pods)
    urls = [f"http://127.0.0.1:{base_port + i}" for i in range(args.pods)]
    argv = loraroute_cmd(
        "sim", "cluster", "--pods", str(args.pods), "--base-port", str(base_port), "--model", BASE,
        "--enable-lora", "--max-loras", str(args.max_loras), "--max-cpu-loras", str(args.max_cpu_loras),
        "--max-lora-rank", "16", "--adapter-dir", str(adapter_dir), "--allow-runtime-lora-updating",
        "--time-scale", str(args.time_scale),
    )
    proc = start_process(
        "sim-cluster", argv, ready=lambda: all(http_ready(u + "/health") for u in urls), timeout=60, log_dir=log_dir
    )
    return proc, urls


async def run_gateway(config: dict[str, Any], duration: float | None, on_ready: Any) -> None:
    import uvicorn

    from gateway.app import create_app
    from gateway.cli import uvicorn_config
    from gateway.config import load_config
    from gateway.service import Gateway

    cfg = load_config(config, env={})
    gw = Gateway(cfg)
    server = uvicorn.Server(uvicorn_config(create_app(gw), cfg, cfg.server.host, cfg.server.port))  # type: ignore[arg-type]
    # uvicorn's own signal handlers would swallow Ctrl-C without telling us; we stop it ourselves.
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    serve = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 30
    while not (server.started and gw.ready and gw.pods) and time.monotonic() < deadline:
        if serve.done():
            await serve  # raises the start-up error
            return
        await asyncio.sleep(0.05)
    on_ready()
    try:
        if duration is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), duration)
        else:
            await stop.wait()
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(serve, 10)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.pods < 1:
        print("loraroute demo: --pods must be at least 1", file=sys.stderr)
        return 2
    port = args.port if args.port and not port_open(args.port) else free_port()
    workdir = Path(tempfile.mkdtemp(prefix="loraroute-demo-"))
    adapter_dir = workdir / "adapters"
    peft.make_adapter_set(adapter_dir, ADAPTERS, base_model=BASE)
    admin_key = secrets.token_urlsafe(18)
    admin_digest = hashlib.sha256(admin_key.encode()).hexdigest()
    approver_key = secrets.token_urlsafe(18)
    approver_digest = hashlib.sha256(approver_key.encode()).hexdigest()
    print(f"loraroute demo: starting {args.pods} simulated pods and the gateway ...", flush=True)
    cluster: Proc | None = None
    try:
        cluster, urls = start_cluster(adapter_dir, args, workdir / "logs")
        config = demo_config(port, urls, admin_digest, args.pipeline, args.max_cpu_loras, approver_digest,
                             workdir / "state")
        import uvloop

        uvloop.run(run_gateway(config, args.duration,
                               lambda: print(usage_text(port, admin_key, args.pods, approver_key), flush=True)))
    except KeyboardInterrupt:
        pass
    except Exception as e:  # a start-up failure: say what, not a trace
        print(f"loraroute demo: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        print("loraroute demo: stopped", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
