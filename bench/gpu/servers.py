"""Real (or stand-in) vLLM servers on one GPU host: start one after another, warm up, reset, read.

``ServerLaunch`` builds each server's command line and environment:

- vLLM (default): ``python3 -c "<vllm's CLI main>" serve MODEL --served-model-name NAME --host
  127.0.0.1 --port P --dtype bfloat16 --load-format dummy --max-model-len L
  --gpu-memory-utilization G --enable-lora --max-loras N --max-cpu-loras M --max-lora-rank R
  --enable-prefix-caching --disable-uvicorn-access-log --chat-template FILE [--enforce-eager]``
  with ``VLLM_LORA_RESOLVER_CACHE_DIR`` = the server's own adapter folder,
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` (load/unload routes and the filesystem resolver),
  ``VLLM_SERVER_DEV_MODE=1`` (``POST /reset_prefix_cache`` is a development route),
  ``VLLM_USE_FLASHINFER_SAMPLER=0`` (no FlashInfer import), ``HF_HUB_OFFLINE=1``,
  ``TRANSFORMERS_OFFLINE=1``, ``VLLM_NO_USAGE_STATS=1``, and ``OMP_NUM_THREADS`` /
  ``MKL_NUM_THREADS`` = the host's cores / servers (``threads``);
- a template (``--server-cmd``, for tests and other engines): placeholders ``{python} {model}
  {served} {port} {adapter_dir} {max_loras} {max_cpu_loras} {max_lora_rank} {gpu_mem}
  {max_model_len}``, same environment.

Servers start strictly in turn: vLLM sizes its KV cache from the GPU memory free when it starts,
so a server starts only once the previous one answers ``/health``. A server that exits or never
gets ready raises ``ServerError`` carrying the last lines of its log.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraroute.procs import Proc, free_port, start_process

VLLM_MAIN = ("import sys; from vllm.entrypoints.cli.main import main; "
             "sys.argv = ['vllm', *sys.argv[1:]]; sys.exit(main())")
_KV_LINE = re.compile(r"GPU KV cache size: ([\d,]+) tokens")
_KV_MEM = re.compile(r"Available KV cache memory: ([\d.]+) GiB")


class ServerError(RuntimeError):
    """A server that could not be started, reset or read; the message says which and why."""


@dataclass(frozen=True)
class ServerLaunch:
    model_dir: Path
    served_name: str
    max_loras: int
    max_cpu_loras: int
    max_lora_rank: int
    gpu_memory_utilization: float = 0.2
    max_model_len: int = 4096
    compiled: bool = False
    template: str | None = None
    python: str = sys.executable
    threads: int | None = None                 # OMP / MKL threads (None: the library defaults)
    extra_env: dict[str, str] = field(default_factory=dict)

    def argv(self, port: int, adapter_dir: Path) -> list[str]:
        if self.template:
            return shlex.split(self.template.format(
                python=self.python, model=self.model_dir, served=self.served_name, port=port,
                adapter_dir=adapter_dir, max_loras=self.max_loras, max_cpu_loras=self.max_cpu_loras,
                max_lora_rank=self.max_lora_rank, gpu_mem=self.gpu_memory_utilization,
                max_model_len=self.max_model_len))
        argv = [self.python, "-c", VLLM_MAIN, "serve", str(self.model_dir),
                "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(port),
                "--dtype", "bfloat16", "--load-format", "dummy", "--max-model-len", str(self.max_model_len),
                "--gpu-memory-utilization", str(self.gpu_memory_utilization), "--enable-lora",
                "--max-loras", str(self.max_loras), "--max-cpu-loras", str(self.max_cpu_loras),
                "--max-lora-rank", str(self.max_lora_rank), "--enable-prefix-caching",
                "--disable-uvicorn-access-log", "--chat-template", str(self.model_dir / "chat_template.jinja")]
        return argv if self.compiled else [*argv, "--enforce-eager"]

    def env(self, adapter_dir: Path) -> dict[str, str]:
        return {
            "VLLM_LORA_RESOLVER_CACHE_DIR": str(adapter_dir), "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_SERVER_DEV_MODE": "1", "VLLM_USE_FLASHINFER_SAMPLER": "0", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
            **({"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)} if self.threads else {}),
            **self.extra_env,
        }


@dataclass
class Server:
    id: str
    url: str
    adapter_dir: Path
    proc: Proc
    ready_s: float = 0.0
    kv_tokens: int | None = None
    kv_gib: float | None = None

    def facts(self) -> dict[str, Any]:
        return {"id": self.id, "url": self.url, "adapter_dir": str(self.adapter_dir), "ready_s": round(self.ready_s, 1),
                "kv_cache_tokens": self.kv_tokens, "kv_cache_gib": self.kv_gib, "pid": self.proc.popen.pid}


def http(method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
    """(status, body) of one request; a connection failure is status 0."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback only
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, ValueError) as e:
        return 0, str(e).encode()


def _tail(proc: Proc, lines: int = 40) -> str:
    return "\n".join(proc.log_tail(64_000).splitlines()[-lines:])


def start_server(launch: ServerLaunch, sid: str, adapter_dir: Path, log_dir: Path, timeout_s: float) -> Server:
    """Start one server and wait (bounded) until ``/health`` answers 200."""
    port = free_port()
    t0 = time.monotonic()
    # no readiness probe here: vLLM opens its port only after a minute of start-up; polled below
    proc = start_process(sid, launch.argv(port, adapter_dir), env=launch.env(adapter_dir), log_dir=log_dir)
    proc.port = port
    url = f"http://127.0.0.1:{port}"
    deadline = t0 + timeout_s
    while True:
        if not proc.alive():
            raise ServerError(f"server {sid} exited with {proc.popen.returncode} while starting; "
                              f"last lines of {proc.log_path}:\n{_tail(proc)}")
        if http("GET", url + "/health", timeout=2)[0] == 200:
            break
        if time.monotonic() > deadline:
            proc.kill()
            raise ServerError(f"server {sid} not ready after {timeout_s:.0f}s; last lines of {proc.log_path}:\n"
                              f"{_tail(proc)}")
        time.sleep(1.0)
    server = Server(sid, url, adapter_dir, proc, ready_s=time.monotonic() - t0)
    log = proc.log_tail(2_000_000)
    if m := _KV_LINE.findall(log):
        server.kv_tokens = int(m[-1].replace(",", ""))
    if m := _KV_MEM.findall(log):
        server.kv_gib = float(m[-1])
    return server


def chat(url: str, model: str, max_tokens: int = 4, content: str = "warm up the LoRA kernels",
         timeout: float = 300.0) -> tuple[int, float]:
    """(status, seconds) of one non-streaming chat request."""
    t0 = time.monotonic()
    status, _ = http("POST", url + "/v1/chat/completions", {
        "model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
        "messages": [{"role": "user", "content": content}]}, timeout=timeout)
    return status, time.monotonic() - t0


def adapters_listed(url: str) -> list[str]:
    status, body = http("GET", url + "/v1/models", timeout=10)
    if status != 200:
        raise ServerError(f"GET {url}/v1/models answered {status}: {body[:200]!r}")
    return [m["id"] for m in json.loads(body).get("data", []) if m.get("parent")]


def base_root(url: str) -> str | None:
    """The base model's ``root`` in ``/v1/models``: vLLM's ``--model``, which the filesystem
    resolver requires adapters to name in ``base_model_name_or_path``."""
    status, body = http("GET", url + "/v1/models", timeout=10)
    if status != 200:
        return None
    return next((m.get("root") for m in json.loads(body).get("data", []) if not m.get("parent")), None)


def unload(url: str, name: str) -> int:
    return http("POST", url + "/v1/unload_lora_adapter", {"lora_name": name}, timeout=60)[0]


def reset(server: Server) -> dict[str, Any]:
    """Unload every adapter the server lists and reset its prefix cache; what happened."""
    names = adapters_listed(server.url)
    failed = [n for n in names if unload(server.url, n) != 200]
    status, body = http("POST", server.url + "/reset_prefix_cache", timeout=60)
    if failed:
        raise ServerError(f"server {server.id}: unloading {failed} failed")
    return {"unloaded": len(names), "prefix_cache_reset": status == 200,
            **({} if status == 200 else {"prefix_cache_reset_status": status, "body": body[:200].decode("utf-8", "replace")})}


def snapshot(server: Server, folder: Path, label: str) -> None:
    """``/metrics`` and ``/v1/models`` of the server as files ``<id>-<label>-metrics.txt`` / ``-models.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    for path, suffix in (("/metrics", "metrics.txt"), ("/v1/models", "models.json")):
        status, body = http("GET", server.url + path, timeout=30)
        (folder / f"{server.id}-{label}-{suffix}").write_bytes(body if status == 200 else
                                                              f"HTTP {status}: ".encode() + body[:2000])


def stop_all(servers: list[Server]) -> None:
    for s in reversed(servers):
        try:
            s.proc.stop(timeout=30)
        except Exception:  # noqa: BLE001 - best effort at teardown
            s.proc.kill()

