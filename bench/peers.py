"""Peer routers run beside ours in the benchmarks, each from its own virtual environment.

Peers (never installed into the project's own environment):

| name | package | policy | start |
|---|---|---|---|
| ``sglang`` | ``sglang-router`` | ``cache_aware`` | ``python -m sglang_router.launch_router --worker-urls ...`` |
| ``vllm-router`` | ``vllm-router`` (PyPI, Rust) | ``cache_aware`` | ``vllm-router --worker-urls ...`` |
| ``litellm`` | ``litellm[proxy]`` | ``least-busy`` | ``litellm --config FILE`` |
| ``production-stack`` | source snapshot, Python >= 3.12 | ``prefixaware`` | ``vllm-router --static-backends ...`` |

Virtual environments live in ``.bench-venvs/<name>/`` (ignored by git). ``loraroute bench peers
setup`` creates and fills them; a peer whose venv is missing is skipped with a message saying how
to install it. production-stack's router is only used when ``.bench-venvs/production-stack`` holds
a Python >= 3.12 install of it (it is not on the package registry under its own name).

Both Rust routers expose Prometheus metrics on port 29000 by default; each gets its own free
port here so that several peers can run side by side (the overhead benchmark does).

Model naming: our gateway and vLLM accept ``base:adapter`` via the gateway; the simulated pods
accept the adapter name itself (as vLLM does). Peers that do not rewrite model names
(sglang-router, vllm-router) are sent the adapter name directly; LiteLLM gets a config mapping
each adapter name to every pod (``openai/<adapter>`` deployments).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from loraroute.procs import Proc, free_port, http_ready, port_open, start_process

VENV_ROOT = Path(".bench-venvs")
LITELLM_KEY = "sk-bench-0000"


@dataclass(frozen=True)
class PeerSpec:
    name: str
    pip_args: tuple[str, ...]
    policy: str
    description: str
    python: str = "python3"


PEERS: dict[str, PeerSpec] = {
    "sglang": PeerSpec("sglang", ("sglang-router",), "cache_aware", "SGLang model gateway (Rust)"),
    "vllm-router": PeerSpec("vllm-router", ("vllm-router",), "cache_aware", "PyPI vllm-router (Rust)"),
    "litellm": PeerSpec("litellm", ("litellm[proxy]",), "least-busy", "LiteLLM proxy (Python)"),
    "production-stack": PeerSpec(
        "production-stack", (), "prefixaware", "vLLM production-stack router (Python >= 3.12)"
    ),
}


def venv_dir(name: str, root: Path | None = None) -> Path:
    return (root or VENV_ROOT) / name


def venv_bin(name: str, exe: str, root: Path | None = None) -> Path:
    return venv_dir(name, root) / "bin" / exe


def peer_available(name: str, root: Path | None = None) -> tuple[bool, str]:
    """(usable, reason). Reason says how to install when it is not usable."""
    if name not in PEERS:
        return False, f"unknown peer {name!r}; known: {', '.join(PEERS)}"
    if name == "sglang":
        py = venv_bin(name, "python", root)
        if not py.exists():
            return False, "sglang-router not installed: run `loraroute bench peers setup sglang`"
        ok = subprocess.run([str(py), "-c", "import sglang_router"], capture_output=True).returncode == 0
        return (ok, "ok" if ok else "sglang_router does not import in its venv; re-run setup")
    if name == "vllm-router":
        exe = venv_bin(name, "vllm-router", root)
        return (exe.exists(), "ok" if exe.exists() else
                "vllm-router not installed: run `loraroute bench peers setup vllm-router`")
    if name == "litellm":
        exe = venv_bin(name, "litellm", root)
        return (exe.exists(), "ok" if exe.exists() else
                "litellm not installed: run `loraroute bench peers setup litellm`")
    exe = venv_bin(name, "vllm-router", root)
    if not exe.exists():
        return False, ("production-stack router skipped: needs a Python >= 3.12 install of its source "
                       "snapshot in .bench-venvs/production-stack (not on the package registry)")
    return True, "ok"


def setup(names: Sequence[str], root: Path | None = None, *, out=sys.stdout) -> dict[str, str]:
    """Create each peer's venv and pip-install it, printing progress. Returns name -> outcome."""
    results: dict[str, str] = {}
    for name in names:
        spec = PEERS.get(name)
        if spec is None:
            results[name] = f"unknown peer; known: {', '.join(PEERS)}"
            continue
        if not spec.pip_args:
            ok, reason = peer_available(name, root)
            results[name] = "present" if ok else reason
            print(f"[{name}] {results[name]}", file=out, flush=True)
            continue
        vdir = venv_dir(name, root)
        t0 = time.monotonic()
        if not (vdir / "bin" / "python").exists():
            print(f"[{name}] creating venv {vdir}", file=out, flush=True)
            subprocess.run([spec.python, "-m", "venv", str(vdir)], check=True)
        print(f"[{name}] pip install {' '.join(spec.pip_args)} ...", file=out, flush=True)
        proc = subprocess.run(
            [str(vdir / "bin" / "pip"), "install", "--progress-bar", "off", "-q", *spec.pip_args],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            results[name] = "failed: " + " | ".join(tail)
        else:
            ok, reason = peer_available(name, root)
            results[name] = f"installed in {time.monotonic() - t0:.0f}s" if ok else reason
        print(f"[{name}] {results[name]}", file=out, flush=True)
    return results


def _litellm_config(pod_urls: Sequence[str], model_names: Sequence[str], path: Path) -> Path:
    """LiteLLM config: every model name -> one deployment per pod, least-busy routing."""
    model_list = []
    for model in model_names:
        for url in pod_urls:
            model_list.append({
                "model_name": model,
                "litellm_params": {"model": f"openai/{model}", "api_base": f"{url}/v1",
                                   "api_key": "none", "stream_timeout": 600, "timeout": 600},
                "model_info": {"id": f"{model}@{url}"},
            })
    config = {
        "model_list": model_list,
        "router_settings": {"routing_strategy": "least-busy", "num_retries": 0},
        "litellm_settings": {"drop_params": True, "telemetry": False, "request_timeout": 600},
        "general_settings": {"master_key": LITELLM_KEY},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def sglang_argv(python: str, port: int, pod_urls: Sequence[str]) -> list[str]:
    """sglang-router's ``cache_aware`` policy on ``port`` in front of ``pod_urls``."""
    return [python, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
            "--policy", "cache_aware", "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
            "--worker-urls", *pod_urls]


def sglang_ready(port: int) -> bool:
    """sglang-router answers only once it has a healthy worker: its port opens earlier, and a
    request sent then fails with 503 "no_available_workers" (the first request of a replay on real
    vLLM did), so ready is ``/v1/models`` answering below 500 through a worker."""
    return port_open(port) and http_ready(f"http://127.0.0.1:{port}/v1/models")


def start_peer(
    name: str,
    pod_urls: Sequence[str],
    model_names: Sequence[str],
    *,
    log_dir: Path,
    root: Path | None = None,
    timeout: float = 90.0,
) -> Proc:
    """Start peer ``name`` on a free port in front of ``pod_urls``; ready when it answers.

    ``model_names`` are the names clients will send (adapter names and the base model).
    ``proc.extra['api_key']`` holds the key clients must send (LiteLLM), else None.
    """
    ok, reason = peer_available(name, root)
    if not ok:
        raise RuntimeError(reason)
    port = free_port()
    env = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    api_key: str | None = None
    if name == "sglang":
        argv = sglang_argv(str(venv_bin(name, "python", root)), port, pod_urls)
        ready = lambda: sglang_ready(port)  # noqa: E731
    elif name == "vllm-router":
        argv = [str(venv_bin(name, "vllm-router", root)), "--host", "127.0.0.1", "--port", str(port),
                "--policy", "cache_aware", "--prometheus-host", "127.0.0.1",
                "--prometheus-port", str(free_port()), "--worker-urls", *pod_urls]
        ready = lambda: port_open(port)  # noqa: E731
    elif name == "litellm":
        cfg = _litellm_config(pod_urls, model_names, log_dir / "litellm.yaml")
        argv = [str(venv_bin(name, "litellm", root)), "--config", str(cfg), "--host", "127.0.0.1",
                "--port", str(port), "--num_workers", "1"]
        env.update({"LITELLM_MASTER_KEY": LITELLM_KEY, "LITELLM_LOG": "ERROR",
                    "LITELLM_TELEMETRY": "False", "DISABLE_SCHEMA_UPDATE": "True"})
        api_key = LITELLM_KEY
        ready = lambda: http_ready(f"http://127.0.0.1:{port}/health/liveliness")  # noqa: E731
    else:  # production-stack
        backends, models = [], []
        for url in pod_urls:
            for model in model_names:
                backends.append(url)
                models.append(model)
        argv = [str(venv_bin(name, "vllm-router", root)), "--host", "127.0.0.1", "--port", str(port),
                "--service-discovery", "static", "--static-backends", ",".join(backends),
                "--static-models", ",".join(models), "--routing-logic", "prefixaware"]
        ready = lambda: port_open(port)  # noqa: E731
    proc = start_process(f"peer-{name}", argv, port=port, ready=ready, timeout=timeout,
                         env={**os.environ, **env}, log_dir=log_dir)
    proc.extra["api_key"] = api_key
    return proc


def installed_peers(root: Path | None = None) -> list[str]:
    return [n for n in PEERS if peer_available(n, root)[0]]
