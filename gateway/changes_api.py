"""Admin routes for run-time changes, the audit log, the effective allowlist and store checks.

=====================================  ===========  ==============================================
route                                  role         answer
=====================================  ===========  ==============================================
``GET /admin/whoami``                  any key      ``{"name", "roles"}``
``GET /admin/allowlist``               viewer       every base with its adapters (rank, served name,
                                                    pinned version), approved changes included
``GET /admin/changes?status=&limit=``  viewer       changes, newest first
``POST /admin/changes``                operator     201: the change (``pending``, or ``applied`` /
                                                    ``failed`` when it needs no approval)
``GET /admin/changes/{id}``            viewer       one change with before/after, effects, errors
``POST /admin/changes/{id}/approve``   approver     the change after it was applied (or failed);
                                                    body ``{"note"}`` optional; 403 ``self_approval``
``POST /admin/changes/{id}/reject``    approver     body ``{"note"}`` optional
``POST /admin/changes/{id}/rollback``  operator     201: the rollback change, applied at once
``GET /admin/audit?limit=&format=``    viewer       the newest entries, oldest first; ``format=jsonl``
                                                    gives the JSON lines themselves
``GET /admin/store?adapter=&pod=``     viewer       each sidecar's ``GET /store`` answer: is the store
                                                    reachable (TLS, credentials), what it holds
                                                    (default: every allowlisted adapter at its
                                                    pinned version, ``name@version``)
``POST /admin/ensure``                 operator     ``{"pod", "adapter"}``: the sidecar's own answer
                                                    to a fetch + load (status and body as it sent them)
=====================================  ===========  ==============================================

Errors are OpenAI-shaped: 400 bad body, 401/403 keys and roles, 404 unknown change, 409 a change
that does not fit the current state, 422 an adapter the store or the pods cannot serve.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from gateway.changes import ChangeManager
from gateway.errors import APIError
from gateway.roles import Principal, Role, require
from gateway.service import Gateway

_MAX_BODY = 64 * 1024


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > _MAX_BODY:
        raise APIError(413, f"the body is over {_MAX_BODY} bytes", code="request_too_large")
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise APIError(400, "the body is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    return data


def _note(body: dict[str, Any]) -> str:
    unknown = sorted(set(body) - {"note"})
    if unknown:
        raise APIError(400, f"unknown field(s) {', '.join(unknown)}; the only field is 'note'", param=unknown[0])
    note = body.get("note", "")
    if not isinstance(note, str) or len(note) > 1000:
        raise APIError(400, "'note' must be a string of at most 1000 characters", param="note")
    return note


def changes_router(gw: Gateway, manager: ChangeManager) -> APIRouter:
    router = APIRouter(prefix="/admin")

    def need(request: Request, role: Role) -> Principal:
        return require(gw.runtime.config, request, role)

    @router.get("/whoami")
    async def whoami(request: Request) -> dict[str, Any]:
        return need(request, Role.VIEWER).to_dict()

    @router.get("/allowlist")
    async def allowlist(request: Request) -> dict[str, Any]:
        need(request, Role.VIEWER)
        data = [{"base": b.name, "served_name": b.vllm_name, "aliases": list(b.aliases),
                 "adapters": [{"name": a.name, "served_name": a.vllm_name, "rank": a.rank, "version": a.version}
                              for a in b.adapters]}
                for b in gw.runtime.config.bases]
        return {"object": "list", "data": data, "generation": gw.runtime.generation}

    @router.get("/changes")
    async def list_changes(request: Request, status: str | None = None, limit: int = 100) -> dict[str, Any]:
        need(request, Role.VIEWER)
        found = await manager.changes(status, max(1, min(limit, 1000)))
        return {"object": "list", "data": [c.to_api() for c in found], "where": manager.where}

    @router.post("/changes")
    async def propose(request: Request) -> JSONResponse:
        principal = need(request, Role.OPERATOR)
        change = await manager.propose(principal, await _body(request))
        return JSONResponse(change.to_api(), status_code=201)

    @router.get("/changes/{change_id}")
    async def show(request: Request, change_id: str) -> dict[str, Any]:
        need(request, Role.VIEWER)
        return (await manager.change(change_id)).to_api()

    @router.post("/changes/{change_id}/approve")
    async def approve(request: Request, change_id: str) -> dict[str, Any]:
        principal = need(request, Role.APPROVER)
        return (await manager.approve(principal, change_id, _note(await _body(request)))).to_api()

    @router.post("/changes/{change_id}/reject")
    async def reject(request: Request, change_id: str) -> dict[str, Any]:
        principal = need(request, Role.APPROVER)
        return (await manager.reject(principal, change_id, _note(await _body(request)))).to_api()

    @router.post("/changes/{change_id}/rollback")
    async def rollback(request: Request, change_id: str) -> JSONResponse:
        principal = need(request, Role.OPERATOR)
        _note(await _body(request))
        return JSONResponse((await manager.rollback(principal, change_id)).to_api(), status_code=201)

    @router.get("/audit")
    async def audit(request: Request, limit: int = 100, format: str = "json") -> Any:
        need(request, Role.VIEWER)
        entries = await manager.audit_entries(max(1, min(limit, 10_000)))
        if format == "jsonl":
            return PlainTextResponse("".join(json.dumps(e.to_dict(), sort_keys=True) + "\n" for e in entries),
                                     media_type="application/x-ndjson")
        if format != "json":
            raise APIError(400, "format is json or jsonl", param="format")
        return {"object": "list", "data": [e.to_dict() for e in entries], "where": manager.where}

    @router.get("/store")
    async def store(request: Request, pod: str | None = None) -> dict[str, Any]:
        need(request, Role.VIEWER)
        names = request.query_params.getlist("adapter")
        if not names:  # every allowlisted adapter, at its pinned version
            names = sorted({f"{a.vllm_name}@{a.version}" if a.version else a.vllm_name
                            for b in gw.runtime.config.bases for a in b.adapters})
        if len(names) > 100:
            raise APIError(400, "at most 100 adapters per store check", param="adapter")
        answers = await manager.sidecars.store(names, pod)
        data = [{"pod": a.pod, "status": a.status, **(a.body if a.ok else {"ok": False, "error": a.error})}
                for a in answers]
        without = sorted(set(gw.endpoints) | set(gw.pods)) if pod is None else [pod]
        missing = [p for p in without if p not in manager.sidecars.with_sidecar()]
        return {"object": "list", "data": data, "without_sidecar": missing}

    @router.post("/ensure")
    async def ensure(request: Request) -> JSONResponse:
        need(request, Role.OPERATOR)
        body = await _body(request)
        unknown = sorted(set(body) - {"pod", "adapter", "version"})
        if unknown or not isinstance(body.get("pod"), str) or not isinstance(body.get("adapter"), str):
            raise APIError(400, "body: {\"pod\": \"<pod id>\", \"adapter\": \"<name as vLLM knows it>\"}",
                           code="invalid_request")
        version = body.get("version") or gw.runtime.policy.adapter_versions.get(body["adapter"])
        answer = await manager.sidecars.ensure(body["pod"], body["adapter"], version)
        return JSONResponse({"pod": answer.pod, "status": answer.status, "body": answer.body})

    return router
