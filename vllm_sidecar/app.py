"""The sidecar's HTTP API (aiohttp): a thin layer over ``Sidecar``.

- ``GET /healthz`` -> 200 ``{"status": "ok", "pod_id", "vllm_healthy", "uptime_s"}`` while the
  sidecar runs (vLLM's health is reported, not mirrored: restarting the sidecar would not help).
- ``GET /metrics`` -> Prometheus text, ``loraroute_sidecar_*``.
- ``GET /adapters`` -> JSON list of local adapters ``{"adapter", "path", "size_bytes", "rank",
  "last_used", "on_gpu", "in_cpu", "registered"}``, least recently used first.
- ``POST /adapters/{name}/ensure`` body optional ``{"load": true|false}`` -> 200
  ``{"adapter", "path", "source": "cached"|"downloaded", "seconds", "loaded", "rank",
  "size_bytes"}``; errors ``{"error": {"message", "type", "param", "code"}}`` with 400 (bad name
  or body), 404 (not in the store; diagnostics in the message), 422 (invalid adapter), 503 (store
  unreachable; which layer), 502 (vLLM refused the load; its message).
"""

from __future__ import annotations

import json
import logging
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vllm_sidecar.errors import BadRequest, SidecarError
from vllm_sidecar.service import Sidecar

log = logging.getLogger("loraroute.sidecar.http")
SIDECAR_KEY = web.AppKey("sidecar", Sidecar)


def _error(exc: SidecarError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status)


@web.middleware
async def _errors(request: web.Request, handler):  # type: ignore[no-untyped-def]
    try:
        return await handler(request)
    except SidecarError as exc:
        return _error(exc)
    except web.HTTPException as exc:
        if exc.status >= 400:
            body = {"error": {"message": f"{request.method} {request.path}: {exc.reason}", "type": exc.reason,
                              "param": None, "code": exc.status}}
            return web.json_response(body, status=exc.status)
        raise
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        body = {"error": {"message": "internal error in the sidecar; see its log", "type": "InternalServerError",
                          "param": None, "code": "internal_error"}}
        return web.json_response(body, status=500)


async def healthz(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR_KEY]
    state = sidecar.monitor.state
    return web.json_response({
        "status": "ok",
        "pod_id": sidecar.settings.pod_id,
        "vllm_healthy": bool(state and state.healthy),
        "uptime_s": round(time.time() - sidecar.started_at, 3),
    })


async def metrics(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR_KEY]
    body = generate_latest(sidecar.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def list_adapters(request: web.Request) -> web.Response:
    return web.json_response(request.app[SIDECAR_KEY].adapters())


async def ensure(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR_KEY]
    name = request.match_info["name"]
    load: bool | None = None
    raw = await request.read()
    if raw.strip():
        try:
            body = json.loads(raw)
        except ValueError:
            raise BadRequest('request body must be JSON, e.g. {"load": true}, or empty') from None
        if not isinstance(body, dict):
            raise BadRequest('request body must be a JSON object, e.g. {"load": true}')
        unknown = sorted(set(body) - {"load"})
        if unknown:
            raise BadRequest(f"unknown field(s) {', '.join(unknown)}; the only field is 'load' (true or false)",
                             param=unknown[0])
        if "load" in body:
            if not isinstance(body["load"], bool):
                raise BadRequest("'load' must be true or false", param="load")
            load = body["load"]
    return web.json_response(await sidecar.ensure(name, load))


def create_app(sidecar: Sidecar) -> web.Application:
    """The HTTP app for a started (or about to be started) ``Sidecar``."""
    app = web.Application(middlewares=[_errors])
    app[SIDECAR_KEY] = sidecar
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/adapters", list_adapters)
    app.router.add_post("/adapters/{name:.+}/ensure", ensure)
    return app
