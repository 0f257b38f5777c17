"""The sidecar's HTTP API (aiohttp): a thin layer over ``Sidecar``.

- ``GET /healthz`` -> 200 ``{"status": "ok", "pod_id", "vllm_healthy", "uptime_s"}`` while the
  sidecar runs (vLLM's health is reported, not mirrored: restarting the sidecar would not help).
- ``GET /metrics`` -> Prometheus text, ``loraroute_sidecar_*``.
- ``GET /adapters`` -> JSON list of local adapters ``{"adapter", "path", "size_bytes", "rank",
  "last_used", "on_gpu", "in_cpu", "registered", "version"}``, least recently used first.
- ``POST /adapters/{name}/ensure`` body optional ``{"load": true|false, "version": "<12 hex>"}``
  -> 200 ``{"adapter", "path", "source": "cached"|"downloaded"|"replaced", "seconds",
  "load_seconds", "loaded", "reloaded", "rank", "size_bytes", "version", "previous_version"}``; errors
  ``{"error": {"message", "type", "param", "code"}}`` with 400 (bad name or body), 404 (not in the
  store; diagnostics in the message), 422 (invalid adapter), 503 (store unreachable; which
  layer), 502 (vLLM refused the load; its message).
- ``POST /adapters/{name}/refresh`` body ``{"version": "<12 hex>" | null}`` -> 200 ``{"adapter",
  "status": "absent"|"current"|"replaced", "version", "previous_version", "reloaded"}``: a
  version roll on this pod (``reloaded``: swapped into vLLM with an in-place load).
- ``GET /store?adapter=a&adapter=b@<version>`` -> 200 ``{"pod_id", "source", "max_lora_rank", "ok",
  "error": {"code", "message", "layer"} | null, "adapters": {name: {"present", "version",
  "versions", "rank", "size_bytes", "sha256", "problems": [{"code", "message"}]}}}`` (at most 100
  names; ``@<version>`` looks at that version's immutable copy instead of the live folder).
- ``GET /demand?limit=N`` -> 200 the cluster's demand as this sidecar read it (``DemandView.to_dict``):
  ``{"enabled", "refresh_s", "prefetch", "bases", "reads", "read_at", "age_s", "writers",
  "adapters_with_demand", "top": [{"adapter", "base", "share", "rate_rps", "on_disk"}],
  "prefetches", "demand_evictions", "events": [{"at", "adapter", "action", "share", "detail"}]}``,
  newest event first.

With a control token (``control_token_env``), every route but ``/healthz`` and ``/metrics`` needs
``Authorization: Bearer <token>`` (compared in constant time): 401 ``invalid_control_token``
otherwise.
"""

from __future__ import annotations

import hmac
import json
import logging
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vllm_sidecar.errors import BadRequest, SidecarError
from vllm_sidecar.service import Sidecar

log = logging.getLogger("loraroute.sidecar.http")
SIDECAR_KEY = web.AppKey("sidecar", Sidecar)
#: routes open without the control token: probes and scrapers
_OPEN_PATHS = frozenset({"/healthz", "/metrics"})


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


async def demand(request: web.Request) -> web.Response:
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        raise BadRequest("limit must be an integer", param="limit") from None
    return web.json_response(request.app[SIDECAR_KEY].demand.to_dict(max(0, min(limit, 1000))))


async def _body(request: web.Request, fields: dict[str, str]) -> dict[str, object]:
    """A JSON object body (or none) with only ``fields`` (name -> what it holds, for messages)."""
    raw = await request.read()
    if not raw.strip():
        return {}
    example = json.dumps({k: None for k in fields})
    try:
        body = json.loads(raw)
    except ValueError:
        raise BadRequest(f"request body must be JSON, e.g. {example}, or empty") from None
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, e.g. {example}")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        known = ", ".join(f"'{k}' ({v})" for k, v in fields.items())
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; the fields are {known}", param=unknown[0])
    if "load" in body and not isinstance(body["load"], bool):
        raise BadRequest("'load' must be true or false", param="load")
    if body.get("version") is not None and not isinstance(body["version"], str):
        raise BadRequest("'version' must be a version string or null", param="version")
    return body


async def ensure(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR_KEY]
    body = await _body(request, {"load": "true or false", "version": "an adapter version"})
    load = body.get("load")
    version = body.get("version")
    return web.json_response(await sidecar.ensure(request.match_info["name"], load if isinstance(load, bool) else None,
                                                  version if isinstance(version, str) else None))


async def refresh(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR_KEY]
    body = await _body(request, {"version": "an adapter version, or null for the store's current one"})
    version = body.get("version")
    return web.json_response(await sidecar.refresh(request.match_info["name"],
                                                   version if isinstance(version, str) else None))


async def store(request: web.Request) -> web.Response:
    names = request.query.getall("adapter", [])
    if len(names) > 100:
        raise BadRequest("at most 100 adapters per store check", param="adapter")
    return web.json_response(await request.app[SIDECAR_KEY].inspect_store(list(dict.fromkeys(names))))


def _token_check(token: str | None):  # type: ignore[no-untyped-def]
    expected = f"Bearer {token}".encode() if token else b""

    @web.middleware
    async def check(request: web.Request, handler):  # type: ignore[no-untyped-def]
        if token and request.path not in _OPEN_PATHS:
            sent = request.headers.get("Authorization", "").encode("utf-8", "replace")
            if not hmac.compare_digest(sent, expected):
                return web.json_response({"error": {
                    "message": "the sidecar's control API needs 'Authorization: Bearer <token>' (control_token_env)",
                    "type": "AuthenticationError", "param": None, "code": "invalid_control_token"}}, status=401)
        return await handler(request)

    return check


def create_app(sidecar: Sidecar, token: str | None = None) -> web.Application:
    """The HTTP app for a started (or about to be started) ``Sidecar``; ``token``: the control
    API's token (None: open)."""
    app = web.Application(middlewares=[_token_check(token), _errors])
    app[SIDECAR_KEY] = sidecar
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/adapters", list_adapters)
    app.router.add_post("/adapters/{name:.+}/ensure", ensure)
    app.router.add_post("/adapters/{name:.+}/refresh", refresh)
    app.router.add_get("/store", store)
    app.router.add_get("/demand", demand)
    return app
