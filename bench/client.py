"""Open-loop replay of a trace with streaming chat requests, measured at the client.

Each trace request is sent at ``start + t × time_scale`` (wall seconds) whatever happened to the
earlier ones (open loop); a bound on requests in flight (``max_inflight``, default 4096) only
protects the client machine, and every request it delays is counted (``client_delayed``).

Per request (``RequestResult``), all durations in wall seconds as measured here:
- ``ttft_s``: from just before the POST is written to the first SSE chunk carrying non-empty
  ``delta.content`` (the first content byte a user would see);
- ``e2e_s``: to the end of the stream (``data: [DONE]`` or EOF);
- ``output_tokens``, ``prompt_tokens``, ``cached_tokens``: from the usage chunk
  (``stream_options.include_usage``) when the server sends one, else content chunks counted;
- ``status``: the HTTP status (0 when the connection failed), ``error``: a short reason;
- ``pod``: the ``x-loraroute-pod`` response header when present.

Each request carries ``X-Request-Id: <trace id>`` so a simulated pod's ground truth can be joined.

Several router replicas (``ReplayConfig.urls``) are reached as through a Kubernetes Service
(``Spreader``): ``per-request`` sends request i to replica i mod N; ``per-connection`` balances
*connections* round-robin (as kube-proxy's IPVS mode does) and a request rides whichever
keep-alive connection is idle, the most recently released first (aiohttp's own reuse order),
opening a new one — on the next replica — only when all are busy. ``RequestResult.replica`` says
which replica served each request.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import aiohttp

from bench.workload import TraceRequest


@dataclass
class RequestResult:
    id: str
    adapter: str
    scheduled_s: float
    sent_s: float = 0.0
    ttft_s: float | None = None
    e2e_s: float | None = None
    status: int = 0
    error: str | None = None
    pod: str | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    content_chunks: int = 0
    client_delayed: bool = False
    replica: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Spread = Literal["per-connection", "per-request"]
SPREADS: tuple[Spread, ...] = ("per-connection", "per-request")


class Spreader:
    """Which replica each request goes to (see the module docstring).

    ``acquire()`` returns the replica index of the connection a new request rides; ``release(i)``
    returns that connection to the idle pool when the request is over (per-connection mode)."""

    def __init__(self, replicas: int, spread: Spread) -> None:
        if replicas < 1:
            raise ValueError("replicas must be >= 1")
        if spread not in SPREADS:
            raise ValueError(f"spread must be one of {', '.join(SPREADS)}, got {spread!r}")
        self.replicas = replicas
        self.spread = spread
        self._next = 0
        self._idle: list[int] = []      # replica of each idle connection, most recent last
        self.connections = [0] * replicas
        self.requests = [0] * replicas

    def _round_robin(self) -> int:
        i = self._next
        self._next = (i + 1) % self.replicas
        return i

    def acquire(self) -> int:
        if self.spread == "per-request":
            i = self._round_robin()
        elif self._idle:
            i = self._idle.pop()
        else:
            i = self._round_robin()
            self.connections[i] += 1
        self.requests[i] += 1
        return i

    def release(self, replica: int) -> None:
        if self.spread == "per-connection":
            self._idle.append(replica)


@dataclass
class ReplayConfig:
    url: str                               # base URL, e.g. http://127.0.0.1:8000
    model_for: Callable[[TraceRequest], str]
    time_scale: float = 1.0
    api_key: str | None = None
    max_inflight: int = 4096
    request_timeout_s: float = 900.0
    progress_label: str = ""
    progress: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)
    pod_header: str = "x-loraroute-pod"
    urls: list[str] = field(default_factory=list)   # several replicas (default: [url])
    spread: Spread = "per-connection"

    @property
    def replica_urls(self) -> list[str]:
        return self.urls or [self.url]

    def spreader(self) -> Spreader:
        return Spreader(len(self.replica_urls), self.spread)


class Progress:
    """A one-line progress bar on stderr (a line every 5 s when stderr is not a terminal)."""

    def __init__(self, label: str, total: int, enabled: bool = True) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()
        self.last = 0.0

    def update(self, done: int, inflight: int, errors: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last < (0.5 if self.tty else 5.0):
            return
        self.last = now
        width = 30
        filled = int(width * done / max(1, self.total))
        bar = "#" * filled + "." * (width - filled)
        line = (f"{self.label} [{bar}] {done}/{self.total} in-flight {inflight} errors {errors} "
                f"{now - self.t0:6.1f}s")
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if force else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _chunk_content(obj: dict[str, Any]) -> str:
    choices = obj.get("choices") or ()
    if not choices:
        return ""
    c = choices[0]
    delta = c.get("delta")
    if delta is not None:
        return delta.get("content") or ""
    return c.get("text") or ""


async def send_one(session: aiohttp.ClientSession, cfg: ReplayConfig, req: TraceRequest,
                   res: RequestResult, url: str | None = None) -> None:
    """POST one streaming chat request to ``url`` (default ``cfg.url``) and fill ``res``."""
    body = {
        "model": cfg.model_for(req),
        "messages": req.messages,
        "max_tokens": req.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **cfg.extra_body,
    }
    headers = {"X-Request-Id": req.id, "Content-Type": "application/json"}
    if cfg.api_key:
        headers["Authorization"] = f"Bearer {cfg.api_key}"
    payload = json.dumps(body).encode()
    t0 = time.perf_counter()
    res.sent_s = time.monotonic()
    try:
        async with session.post((url or cfg.url) + "/v1/chat/completions", data=payload, headers=headers) as resp:
            res.status = resp.status
            res.pod = resp.headers.get(cfg.pod_header)
            if resp.status != 200:
                text = (await resp.text())[:300]
                res.error = f"HTTP {resp.status}: {text}"
                res.e2e_s = time.perf_counter() - t0
                return
            usage = None
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                if res.ttft_s is None or b'"usage"' in data or b'"error"' in data:
                    try:
                        obj = json.loads(data)
                    except ValueError:
                        continue
                    if "error" in obj and not obj.get("choices"):
                        res.error = f"stream error: {str(obj['error'])[:200]}"
                        continue
                    if _chunk_content(obj):
                        if res.ttft_s is None:
                            res.ttft_s = time.perf_counter() - t0
                        res.content_chunks += 1
                    if obj.get("usage"):
                        usage = obj["usage"]
                elif b'"content":"' in data or b'"text":"' in data:
                    res.content_chunks += 1
            res.e2e_s = time.perf_counter() - t0
            if usage:
                res.output_tokens = int(usage.get("completion_tokens") or 0)
                res.prompt_tokens = usage.get("prompt_tokens")
                details = usage.get("prompt_tokens_details") or {}
                res.cached_tokens = details.get("cached_tokens")
            else:
                res.output_tokens = res.content_chunks
            if res.ttft_s is None and res.error is None:
                res.error = "stream ended without content"
    except asyncio.TimeoutError:
        res.error = "client timeout"
        res.e2e_s = time.perf_counter() - t0
    except aiohttp.ClientError as e:
        res.error = f"connection: {type(e).__name__}: {str(e)[:200]}"
        res.e2e_s = time.perf_counter() - t0


async def replay(trace: Sequence[TraceRequest], cfg: ReplayConfig) -> list[RequestResult]:
    """Replay ``trace`` open-loop; returns one result per request, in trace order."""
    results = [RequestResult(id=r.id, adapter=r.adapter, scheduled_s=r.t * cfg.time_scale) for r in trace]
    sem = asyncio.Semaphore(cfg.max_inflight)
    timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s, sock_connect=10)
    state = {"done": 0, "inflight": 0, "errors": 0}
    bar = Progress(cfg.progress_label, len(trace), cfg.progress)
    spreader = cfg.spreader()

    async def run(req: TraceRequest, res: RequestResult) -> None:
        if sem.locked():
            res.client_delayed = True
        async with sem:
            state["inflight"] += 1
            try:
                await _send_spread(sessions, spreader, cfg, req, res)
            finally:
                state["inflight"] -= 1
                state["done"] += 1
                if res.error:
                    state["errors"] += 1

    async with _ReplicaSessions(cfg, timeout) as sessions:
        start = time.monotonic()
        tasks = []
        for req, res in zip(trace, results):
            delay = start + res.scheduled_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(run(req, res)))
            bar.update(state["done"], state["inflight"], state["errors"])
        pending = set(tasks)
        while pending:
            _, pending = await asyncio.wait(pending, timeout=0.5)
            bar.update(state["done"], state["inflight"], state["errors"])
        bar.update(state["done"], state["inflight"], state["errors"], force=True)
    return results


async def closed_loop(trace: Sequence[TraceRequest], cfg: ReplayConfig, concurrency: int) -> list[RequestResult]:
    """Send ``trace`` with ``concurrency`` requests always in flight (arrival times ignored)."""
    results = [RequestResult(id=r.id, adapter=r.adapter, scheduled_s=0.0) for r in trace]
    timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s, sock_connect=10)
    spreader = cfg.spreader()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(trace)):
        queue.put_nowait(i)
    state = {"done": 0, "inflight": 0, "errors": 0}
    bar = Progress(cfg.progress_label, len(trace), cfg.progress)

    async def worker() -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            state["inflight"] += 1
            await _send_spread(sessions, spreader, cfg, trace[i], results[i])
            state["inflight"] -= 1
            state["done"] += 1
            state["errors"] += 1 if results[i].error else 0
            bar.update(state["done"], state["inflight"], state["errors"])

    async with _ReplicaSessions(cfg, timeout) as sessions:
        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    bar.update(state["done"], 0, state["errors"], force=True)
    return results


class _ReplicaSessions:
    """One aiohttp session (its own keep-alive pool) per replica URL."""

    def __init__(self, cfg: ReplayConfig, timeout: aiohttp.ClientTimeout) -> None:
        self.urls = cfg.replica_urls
        self.timeout = timeout
        self.sessions: list[aiohttp.ClientSession] = []

    async def __aenter__(self) -> _ReplicaSessions:
        for _ in self.urls:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, force_close=False)
            self.sessions.append(aiohttp.ClientSession(connector=connector, timeout=self.timeout))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(s.close() for s in self.sessions))


async def _send_spread(sessions: _ReplicaSessions, spreader: Spreader, cfg: ReplayConfig, req: TraceRequest,
                       res: RequestResult) -> None:
    i = spreader.acquire()
    res.replica = i
    try:
        await send_one(sessions.sessions[i], cfg, req, res, sessions.urls[i])
    finally:
        if res.status:  # a connection that failed is closed, not reused
            spreader.release(i)
