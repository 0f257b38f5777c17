"""Locust load test for a real (or simulated) cluster: streaming chat requests, TTFT as a metric.

Requests are drawn, in order and shared by all users, from a workload spec's trace (multi-turn
conversations, system prompts per adapter, Zipf adapter popularity; see ``bench.workload``); the
trace's arrival times are ignored — Locust's users and ``wait_time`` set the pace.

Each request is a streaming ``POST /v1/chat/completions``. Locust's own row (type ``POST``)
records the time to the response headers; this file adds two rows of its own (named ``chat``, or per model name):

- type ``TTFT``: time to the first SSE chunk with non-empty content (first content byte);
- type ``E2E``: time to ``data: [DONE]``, with the content size as response length.

Configuration (environment variables; Locust's ``--host`` sets the target as usual):

| variable | default | meaning |
|---|---|---|
| ``LORAROUTE_BENCH_SPEC`` | ``bench/specs/reference.yaml`` | workload spec to draw requests from |
| ``LORAROUTE_BENCH_API_KEY`` | (none) | sent as ``Authorization: Bearer ...`` |
| ``LORAROUTE_BENCH_BASE`` | the spec's ``cluster.base_model`` | base model name clients use |
| ``LORAROUTE_BENCH_MODEL_FORMAT`` | ``{base}:{adapter}`` | model name per request (``{adapter}`` alone for a vLLM pod) |
| ``LORAROUTE_BENCH_MODELS`` | (none) | comma list replacing the spec's adapters by position (adapter *i* → item *i* mod n) |
| ``LORAROUTE_BENCH_MAX_TOKENS`` | (spec) | cap on ``max_tokens`` |
| ``LORAROUTE_BENCH_REQUESTS`` | 2000 | trace length before it repeats |
| ``LORAROUTE_BENCH_WAIT`` | ``0`` | seconds between a user's requests (``a,b`` for uniform between) |
| ``LORAROUTE_BENCH_PER_MODEL`` | ``0`` | ``1``: one row per model name instead of one ``chat`` row |

Headless example::

    locust -f bench/locustfile.py --headless -u 32 -r 8 -t 2m --host http://127.0.0.1:8000 --csv out

Web UI: ``locust -f bench/locustfile.py --host http://127.0.0.1:8000`` then open http://127.0.0.1:8089.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from locust import HttpUser, between, constant, task

from bench.workload import TraceRequest, generate, load_spec

_DEFAULT_SPEC = Path(__file__).with_name("specs") / "reference.yaml"


class _TraceFeed:
    """The spec's trace, handed out in order to all users (thread- and greenlet-safe)."""

    def __init__(self) -> None:
        spec = load_spec(os.environ.get("LORAROUTE_BENCH_SPEC") or _DEFAULT_SPEC)
        n = int(os.environ.get("LORAROUTE_BENCH_REQUESTS", "2000"))
        self.trace: list[TraceRequest] = generate(spec, rate=1.0, requests=n)
        self.base = os.environ.get("LORAROUTE_BENCH_BASE") or spec.cluster.base_model
        self.fmt = os.environ.get("LORAROUTE_BENCH_MODEL_FORMAT") or "{base}:{adapter}"
        models = os.environ.get("LORAROUTE_BENCH_MODELS")
        self.models = [m.strip() for m in models.split(",") if m.strip()] if models else None
        self.index = {spec.adapters.name(i): i for i in range(spec.adapters.count)}
        cap = os.environ.get("LORAROUTE_BENCH_MAX_TOKENS")
        self.max_tokens_cap = int(cap) if cap else None
        self._i = 0
        self._lock = threading.Lock()

    def next(self) -> TraceRequest:
        with self._lock:
            req = self.trace[self._i % len(self.trace)]
            self._i += 1
            return req

    def model(self, req: TraceRequest) -> str:
        if self.models:
            return self.models[self.index.get(req.adapter, 0) % len(self.models)]
        return self.fmt.format(base=self.base, adapter=req.adapter)

    def max_tokens(self, req: TraceRequest) -> int:
        return min(req.max_tokens, self.max_tokens_cap) if self.max_tokens_cap else req.max_tokens


_FEED: _TraceFeed | None = None
_FEED_LOCK = threading.Lock()


def feed() -> _TraceFeed:
    global _FEED
    with _FEED_LOCK:
        if _FEED is None:
            _FEED = _TraceFeed()
        return _FEED


def _wait_time() -> Any:
    raw = os.environ.get("LORAROUTE_BENCH_WAIT", "0")
    if "," in raw:
        a, b = (float(x) for x in raw.split(",", 1))
        return between(a, b)
    return constant(float(raw))


class ChatUser(HttpUser):
    """One simulated user sending streaming chat requests drawn from the spec's trace."""

    wait_time = _wait_time()

    def on_start(self) -> None:
        self.feed = feed()
        key = os.environ.get("LORAROUTE_BENCH_API_KEY")
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"

    def _fire(self, kind: str, name: str, seconds: float, length: int, exc: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type=kind, name=name, response_time=seconds * 1000.0, response_length=length,
            exception=exc, context={},
        )

    @task
    def chat(self) -> None:
        req = self.feed.next()
        model = self.feed.model(req)
        name = model if os.environ.get("LORAROUTE_BENCH_PER_MODEL") == "1" else "chat"
        body = {"model": model, "messages": req.messages, "max_tokens": self.feed.max_tokens(req),
                "temperature": 0, "stream": True}
        headers = dict(self.headers, **{"X-Request-Id": f"{req.id}-{time.time_ns()}"})
        t0 = time.perf_counter()
        first: float | None = None
        size = 0
        error: Exception | None = None
        with self.client.post("/v1/chat/completions", data=json.dumps(body), headers=headers, stream=True,
                              name=name, catch_response=True) as resp:
            if resp.status_code != 200:
                error = RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
                resp.failure(error)
            else:
                try:
                    for line in resp.iter_lines():
                        if not line or not line.startswith(b"data:"):
                            continue
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            break
                        obj = json.loads(data)
                        if obj.get("error"):
                            error = RuntimeError(f"stream error: {str(obj['error'])[:200]}")
                            break
                        choices = obj.get("choices") or [{}]
                        content = (choices[0].get("delta") or {}).get("content") or ""
                        if content:
                            size += len(content.encode())
                            if first is None:
                                first = time.perf_counter() - t0
                except Exception as e:  # noqa: BLE001 - reported as a Locust failure
                    error = e
                if error is None and first is None:
                    error = RuntimeError("stream ended without content")
                if error is not None:
                    resp.failure(error)
                else:
                    resp.success()
        total = time.perf_counter() - t0
        if first is not None:
            self._fire("TTFT", name, first, 0, None)
        self._fire("E2E", name, total, size, error)
