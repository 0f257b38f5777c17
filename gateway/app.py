"""The ASGI application: ``create_app(gateway) -> ASGI app``.

The two completion routes are served by ``gateway.edge.CompletionsEndpoint`` directly (a raw
ASGI handler: no routing table walk, no middleware, no request object — measured cheaper,
docs/gateway.md); everything else goes to a small FastAPI app:

- ``GET /v1/models`` — the bases and ``<base>:<adapter>`` names the caller may use.
- ``GET /health`` (the process is up), ``GET /ready`` (started, with at least one routable pod),
  ``GET /metrics`` (Prometheus; with ``metrics.auth.required``, a scraper's key or an admin key).
- ``GET /admin/decisions``, ``GET /admin/pods``, ``POST /admin/reload``, ``GET /admin/demand``,
  ``GET /admin/placement`` — admin key required
  (``Authorization: Bearer <admin key>`` or ``x-loraroute-admin-key: <admin key>``; roles:
  gateway/roles.py).
- ``/admin/changes``, ``/admin/audit``, ``/admin/allowlist``, ``/admin/store``, ``/admin/ensure`` —
  audited run-time changes (gateway/changes_api.py), served by a ``ChangeManager`` the app starts
  and stops with the gateway.
- ``GET /dashboard`` — the live dashboard (gateway/dashboard.py, files in gateway/static/).

Every error, including unknown routes and unexpected exceptions, is in OpenAI's shape; a stack
trace goes to the log (never to the client).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.admin import admin_router
from gateway.changes import ChangeManager
from gateway.changes_api import changes_router
from gateway.dashboard import AdapterWindow, dashboard_router
from gateway.errors import APIError
from gateway.edge import CompletionsEndpoint
from gateway.exchange import Receive, Scope, Send
from gateway.metrics import CONTENT_TYPE
from gateway.parse import Kind
from gateway.placement_admin import placement_router
from gateway.roles import AdminAuthError, require_metrics_key
from gateway.service import Gateway

log = logging.getLogger("loraroute.gateway")


def error_response(err: APIError) -> JSONResponse:
    headers = None
    if err.status == 401:
        realm = err.realm if isinstance(err, AdminAuthError) else None
        headers = {"www-authenticate": f'Basic realm="{realm}", charset="UTF-8"' if realm else "Bearer"}
    return JSONResponse(err.to_dict(), status_code=err.status, headers=headers)


def _fastapi(gw: Gateway, manage_lifecycle: bool) -> FastAPI:
    changes = ChangeManager(gw)
    window = AdapterWindow(gw.metrics.registry)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await changes.start()  # first: the approved overlay is in the runtime before the first request
        if manage_lifecycle:
            await gw.start()
        await window.start()
        try:
            yield
        finally:
            await window.close()
            await changes.close()
            if manage_lifecycle:
                await gw.close()

    api = FastAPI(title="loraroute gateway", openapi_url=None, docs_url=None, redoc_url=None, lifespan=lifespan)

    @api.exception_handler(APIError)
    async def _api_error(_r: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_r: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(APIError(404, "no such route; the OpenAI routes are /v1/chat/completions, "
                                                "/v1/completions and /v1/models", code="route_not_found"))
        if exc.status_code == 405:
            return error_response(APIError(405, "method not allowed on this route", code="method_not_allowed"))
        return error_response(APIError(exc.status_code, str(exc.detail)))

    @api.exception_handler(RequestValidationError)
    async def _validation(_r: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query"))
        return error_response(APIError(400, f"{loc or 'request'}: {first.get('msg', 'invalid')}", param=loc or None))

    @api.exception_handler(Exception)
    async def _unexpected(_r: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error: %s", type(exc).__name__, exc_info=exc)
        return error_response(APIError(500, "internal error in the gateway; see its log", code="internal_error"))

    @api.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        rt = gw.runtime
        auth = request.headers.get("authorization")
        tenant = None if rt.policy.is_admin(auth) else rt.policy.authenticate(auth)
        created = int(gw.started_at or time.time())
        data = []
        for name in rt.policy.visible_models(tenant):
            base_name, _, adapter = name.partition(":")
            base = rt.policy.bases[base_name]
            data.append({
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "loraroute",
                "root": base.vllm_name if not adapter else next(a.vllm_name for a in base.adapters if a.name == adapter),
                "parent": base.name if adapter else None,
            })
        return JSONResponse({"object": "list", "data": data})

    @api.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok"}

    @api.get("/ready")
    async def ready() -> JSONResponse:
        healthy = [p for p, s in gw.pods.items() if s.healthy]
        if gw.draining_since is not None:
            return error_response(APIError(503, "the gateway is shutting down", code="draining"))
        if not gw.ready:
            return error_response(APIError(503, "the gateway is starting", code="not_ready"))
        if gw.placer is not None and gw.placer.starting:
            return error_response(APIError(
                503, f"warming {len(gw.placer.held)} pod(s) up with their share of the demand before taking "
                     "traffic; see GET /admin/placement", code="not_ready"))
        if not healthy:
            held = len(gw.placer.held) if gw.placer is not None else 0
            why = (f"{held} pod(s) are held out of traffic while the placer warms them up; see GET /admin/placement"
                   if held else "no healthy pod with a fresh state yet; see GET /admin/pods")
            return error_response(APIError(503, why, code="no_pod_available"))
        return JSONResponse({"status": "ready", "pods": len(gw.pods), "healthy_pods": len(healthy),
                             "config_generation": gw.runtime.generation})

    @api.get("/metrics")
    async def metrics(request: Request) -> Response:
        config = gw.runtime.config
        if not config.metrics.enabled:
            raise APIError(404, "metrics are turned off (metrics.enabled: false)", code="route_not_found")
        if config.metrics.auth.required:
            require_metrics_key(config, request)
        return Response(gw.metrics.render(), media_type=CONTENT_TYPE)

    api.include_router(admin_router(gw))
    api.include_router(placement_router(gw))
    api.include_router(changes_router(gw, changes))
    api.include_router(dashboard_router(gw, changes, window))
    return api


def create_app(gw: Gateway, *, manage_lifecycle: bool = True) -> Any:
    """The gateway's ASGI app. With ``manage_lifecycle`` the ASGI lifespan starts and closes ``gw``."""
    api = _fastapi(gw, manage_lifecycle)
    hot = {kind.value: CompletionsEndpoint(gw, kind) for kind in Kind}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            handler = hot.get(scope["path"])
            if handler is not None:
                await handler(scope, receive, send)  # answers every error itself, a 500 included
                return
        await api(scope, receive, send)

    app.gateway = gw  # type: ignore[attr-defined]
    return app
