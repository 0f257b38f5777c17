"""Graceful shutdown of a real gateway process: on SIGTERM /ready answers 503 at once, requests are
still served during the grace, refused after it, streams in flight finish, and a stream still
running at the deadline ends with the error event and [DONE]; then the process exits."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import yaml

from loraroute import peft
from loraroute.procs import free_port, http_ready, loraroute_cmd

BASE = "tsuzumi-base"


def test_sigterm_drains_then_cuts_what_is_left_at_the_deadline(procs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    adapters = tmp_path / "adapters"
    peft.make_adapter_set(adapters, [("sql", 8)], base_model=BASE)
    sim_port = free_port()
    # time scale 1: a decode step of ~7 ms, so 150 tokens stream for ~1 s and 3,000 for ~20 s; the grace
    # (2 s) and the deadline (4 s more) leave the short one room on a busy machine, not the long one
    procs.start("sim", loraroute_cmd("sim", "--port", str(sim_port), "--model", BASE, "--enable-lora",
                                     "--max-lora-rank", "16", "--adapter-dir", str(adapters),
                                     "--allow-runtime-lora-updating"),
                port=sim_port, ready_url=f"http://127.0.0.1:{sim_port}/health", timeout=60)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cfg = {"server": {"port": port, "reload_poll_s": 0, "drain": {"grace_s": 2.0, "deadline_s": 4.0}},
           "bases": [{"name": BASE, "adapters": ["sql"]}],
           "discovery": {"static": [{"id": "pod-0", "url": f"http://127.0.0.1:{sim_port}"}]}}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    gw = procs.start("gateway", loraroute_cmd("gateway", "--config", str(path)), port=port,
                     ready=lambda: httpx.get(url + "/ready").status_code == 200 if http_ready(url + "/health") else False,
                     timeout=60)
    streams: dict[str, list[str]] = {}

    def stream(name: str, max_tokens: int) -> None:
        with httpx.Client(timeout=60) as c, c.stream("POST", url + "/v1/chat/completions", json={
            "model": f"{BASE}:sql", "stream": True, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "tell a story"}]}) as resp:
            streams[name] = [line for line in resp.iter_lines() if line]

    short = threading.Thread(target=stream, args=("short", 150))
    long = threading.Thread(target=stream, args=("long", 3000))
    short.start()
    long.start()
    time.sleep(0.5)
    gw.popen.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    ready = httpx.get(url + "/ready")
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "draining"
    # within the grace a new request is still served
    r = httpx.post(url + "/v1/chat/completions", json={"model": f"{BASE}:sql", "max_tokens": 2,
                                                        "messages": [{"role": "user", "content": "x"}]}, timeout=10)
    assert r.status_code == 200, r.text
    time.sleep(2.2)  # the grace is over: the listener is closed
    try:
        late = httpx.post(url + "/v1/chat/completions", json={"model": f"{BASE}:sql", "max_tokens": 2,
                                                               "messages": [{"role": "user", "content": "x"}]}, timeout=5)
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
    except httpx.ConnectError:
        pass  # refused at the socket: equally "not accepted"
    short.join(30)
    long.join(30)
    assert streams["short"][-1] == "data: [DONE]" and not any('"error"' in line for line in streams["short"])
    tail = streams["long"]
    assert tail[-1] == "data: [DONE]"
    error = json.loads(tail[-2][len("data: "):])["error"]
    assert error["code"] == "shutting_down" and "shutting down" in error["message"]
    gw.popen.wait(15)
    assert not gw.alive()
    log = gw.log_tail(20000)
    assert "draining" in log and "drain deadline" in log and "Traceback" not in log
