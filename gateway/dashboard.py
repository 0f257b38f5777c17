"""The live dashboard at ``/dashboard``: plain HTML, CSS and JavaScript shipped in the package
(``gateway/static/``; no CDN, no external font: it runs in closed networks).

Routes (every one needs an admin key with the viewer role; a browser is asked for HTTP Basic
credentials — any user name, the admin key as the password — and a script may send
``Authorization: Bearer``):

- ``GET /dashboard`` — the page; ``GET /dashboard/static/{file}`` — its script and style sheet;
- ``GET /dashboard/state`` — what the page shows, polled every second:
  ``pods`` (health, KV-cache usage, running / waiting / deferred, in flight, state age, LoRA
  limits), ``matrix`` (pod -> adapter -> ``gpu`` | ``cpu`` | ``loading`` | ``disk``), ``models``
  (per ``<base>:<adapter>`` over the last ``window_s`` seconds: requests, the share routed to a pod
  holding the adapter on GPU / in CPU, streamed requests and their TTFT p50 / p99), ``decisions``
  (the latest, each candidate's total and per-scorer scores), ``pending`` (changes waiting for
  approval) and ``audit`` (the latest entries).

The per-model figures come from two gateway metrics, ``loraroute_adapter_routed_total`` and
``loraroute_adapter_ttft_seconds``, sampled every ``every_s`` into a ring covering the window
(``AdapterWindow``), so they mean exactly what the Grafana panels built on the same series mean:
counts are differences over the window, quantiles interpolated within histogram buckets.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CollectorRegistry

from gateway.changes import ChangeManager
from gateway.errors import APIError
from gateway.roles import AdminAuthError, Role, require
from gateway.service import Gateway

REALM = "loraroute dashboard"
_STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
_HEADERS = {"Cache-Control": "no-store", "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"}
_UNAUTHORISED = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>loraroute dashboard</title></head>
<body><h1>401: the dashboard needs an admin key</h1><p>Sign in with any user name and an admin key (any role) as
the password.</p></body></html>"""

Key = tuple[str, str]  # (base, adapter)


class AdapterWindow:
    """Per-model routed counts by tier and TTFT histogram buckets, sampled into a ring."""

    def __init__(self, registry: CollectorRegistry, *, window_s: float = 300.0, every_s: float = 5.0) -> None:
        self.registry = registry
        self.window_s = window_s
        self.every_s = every_s
        self._ring: collections.deque[tuple[float, dict[Key, dict[str, Any]]]] = collections.deque(
            maxlen=int(window_s / every_s) + 2)
        self._task: asyncio.Task[None] | None = None

    def read(self) -> dict[Key, dict[str, Any]]:
        out: dict[Key, dict[str, Any]] = {}
        for family in self.registry.collect():
            if family.name == "loraroute_adapter_routed":
                for s in family.samples:
                    if s.name.endswith("_total"):
                        entry = out.setdefault((s.labels["base"], s.labels["adapter"]), {"tiers": {}, "buckets": {}})
                        entry["tiers"][s.labels["tier"]] = s.value
            elif family.name == "loraroute_adapter_ttft_seconds":
                for s in family.samples:
                    if s.name.endswith("_bucket"):
                        entry = out.setdefault((s.labels["base"], s.labels["adapter"]), {"tiers": {}, "buckets": {}})
                        entry["buckets"][float(s.labels["le"])] = s.value
        return out

    async def start(self) -> None:
        self._ring.append((time.monotonic(), {}))
        self._task = asyncio.create_task(self._sample_forever(), name="dashboard-window")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            self._ring.append((time.monotonic(), self.read()))

    def stats(self) -> list[dict[str, Any]]:
        """Per model over the window: now minus the oldest sample inside it."""
        now_t = time.monotonic()
        old: dict[Key, dict[str, Any]] = {}
        for t, snap in self._ring:
            if now_t - t <= self.window_s + self.every_s:
                old = snap
                break
        out = []
        for key, cur in sorted(self.read().items()):
            prev = old.get(key, {"tiers": {}, "buckets": {}})
            tiers = {t: cur["tiers"][t] - prev["tiers"].get(t, 0.0) for t in cur["tiers"]}
            buckets = sorted((le, n - prev["buckets"].get(le, 0.0)) for le, n in cur["buckets"].items())
            routed = sum(tiers.values())
            streams = buckets[-1][1] if buckets else 0.0
            if routed <= 0 and streams <= 0:
                continue
            out.append({"model": f"{key[0]}:{key[1]}", "requests": int(routed), "streams": int(streams),
                        "gpu": tiers.get("gpu", 0.0) / routed if routed else None,
                        "cpu": tiers.get("cpu", 0.0) / routed if routed else None,
                        "ttft_p50": quantile(0.5, buckets), "ttft_p99": quantile(0.99, buckets)})
        return out


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile`` over cumulative (upper bound, count) pairs."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def _tier(state: Any, adapter: str) -> str | None:
    for tier, names in (("loading", state.loading_adapters), ("gpu", state.gpu_adapters),
                        ("cpu", state.cpu_adapters), ("disk", state.disk_adapters)):
        if adapter in names:
            return tier
    return None


class _ChangesCache:
    """Pending changes and the newest audit entries, read from the change store at most every
    ``ttl_s`` however many dashboards poll (with Redis, a read is a hash scan)."""

    def __init__(self, manager: ChangeManager, ttl_s: float = 2.0) -> None:
        self.manager = manager
        self.ttl_s = ttl_s
        self._at = -math.inf
        self._value: tuple[list[dict[str, Any]], list[dict[str, Any]]] = ([], [])

    async def get(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        if self.manager.store is not None and time.monotonic() - self._at > self.ttl_s:
            pending = [c.to_api() for c in await self.manager.changes("pending", 20)]
            audit = [e.to_dict() for e in await self.manager.audit_entries(12)][::-1]
            self._value, self._at = (pending, audit), time.monotonic()
        return self._value


def dashboard_router(gw: Gateway, manager: ChangeManager, window: AdapterWindow) -> APIRouter:
    router = APIRouter(prefix="/dashboard")
    changes = _ChangesCache(manager)

    def viewer(request: Request) -> None:
        require(gw.runtime.config, request, Role.VIEWER, basic_realm=REALM)

    @router.get("")
    async def page(request: Request) -> Response:
        try:
            viewer(request)
        except AdminAuthError:
            return HTMLResponse(_UNAUTHORISED, status_code=401,
                                headers={**_HEADERS, "WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'})
        html = resources.files("gateway").joinpath("static/dashboard.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers=_HEADERS)

    @router.get("/static/{name}")
    async def static(request: Request, name: str) -> Response:
        viewer(request)
        if name not in _STATIC:
            raise APIError(404, f"no dashboard file {name!r}", code="route_not_found")
        body = resources.files("gateway").joinpath(f"static/{name}").read_bytes()
        return Response(body, media_type=_STATIC[name], headers=_HEADERS)

    @router.get("/state")
    async def state(request: Request) -> JSONResponse:
        viewer(request)
        return JSONResponse(await snapshot(gw, manager, window, changes), headers=_HEADERS)

    return router


async def snapshot(gw: Gateway, manager: ChangeManager, window: AdapterWindow,
                   changes: _ChangesCache) -> dict[str, Any]:
    now = time.time()
    rt = gw.runtime
    view = gw.store.view()
    allowlisted = [a.vllm_name for b in rt.config.bases for a in b.adapters]
    pods, matrix = [], {}
    seen: set[str] = set()
    for pod_id in sorted(set(gw.endpoints) | set(gw.pods)):
        s = gw.pods.get(pod_id) or view.get(pod_id)
        ep = gw.endpoint(pod_id)
        if s is None:
            pods.append({"pod": pod_id, "healthy": False, "routable": False, "state": False})
            continue
        pods.append({"pod": pod_id, "healthy": s.healthy, "routable": pod_id in gw.pods, "state": True,
                     "kv": round(s.kv_cache_usage, 4), "running": s.num_running, "waiting": s.num_waiting,
                     "deferred": s.num_deferred, "inflight": rt.pipeline.inflight(pod_id)[0],
                     "age_s": round(max(0.0, now - s.observed_at), 2), "max_loras": s.max_loras,
                     "max_cpu_loras": s.max_cpu_loras, "max_lora_rank": s.max_lora_rank,
                     "sidecar": bool(ep and ep.sidecar_url)})
        names = set(s.gpu_adapters) | set(s.cpu_adapters) | set(s.disk_adapters) | set(s.loading_adapters)
        seen |= names
        matrix[pod_id] = {n: t for n in names if (t := _tier(s, n)) is not None}
    decisions = []
    for rec in list(gw.decisions)[-8:][::-1]:
        d = rec.to_dict()
        decisions.append({k: d[k] for k in ("at", "request_id", "model", "picked", "status", "policy", "reason",
                                            "candidates", "filtered")})
    pending, audit = await changes.get()
    return {"at": now, "generation": rt.generation, "policy": rt.pipeline.name, "window_s": window.window_s,
            "pods": pods, "adapters": list(dict.fromkeys(allowlisted + sorted(seen - set(allowlisted)))),
            "matrix": matrix, "models": window.stats(), "decisions": decisions, "pending": pending, "audit": audit,
            "changes": manager.backend}
