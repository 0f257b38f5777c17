"""Admin API: recent decisions, the pod view, config reload. Every route needs the admin key.

- ``GET /admin/decisions?limit=N`` — newest first: picked pod, each candidate's total and
  per-scorer scores, filtered pods with the filter that removed them, attempts, status.
- ``GET /admin/pods`` — every discovered pod: endpoint, routable or not, in-flight count, the
  pipeline's own per-pod state (``router``: in-flight tokens, the other replicas' in flight,
  incoming adapters, prefix blocks), PodState; ``store``: whether the state store is reachable
  and, during an outage, how the gateway routes meanwhile (``gateway.store_watch``); with shared
  routing state, ``sharing`` (this replica's name, the peers that count and their age in ms,
  store operations); while a KV feed runs (precise-prefix, gateway/kv_feed.py), ``kv`` per pod:
  the feed's source, the blocks the index holds, batches applied, the last one's age, and
  ``live`` (false: the pod's events are silent and it is scored by the approximate index).
- ``GET /admin/model`` — the learned cost model (``scorer.costmodel``): per pod group the
  constants in force, their defaults, the pins, observations and residual scales, and which pods
  are in each group.
- ``POST /admin/reload`` — re-read the config file; 200 ``{"status": "reloaded", "generation",
  "restart_required"}`` or 400 with the reason (the previous config keeps serving).

Auth (gateway/roles.py): ``Authorization: Bearer <admin key>`` or ``x-loraroute-admin-key: <admin
key>``; reading needs the viewer role, a reload the operator role. 401 without a valid key, 403
when the key lacks the role or the config has no admin key at all. Run-time changes, the audit
log and the dashboard have their own routers (gateway/changes_api.py, gateway/dashboard.py).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from gateway.config import ConfigError
from gateway.errors import APIError
from gateway.roles import Role, require
from gateway.service import Gateway
from scorer.costmodel import group_key
from scorer.model import PodState


def _group(state: PodState) -> str:
    return group_key(state.base_models, state.max_loras, state.max_cpu_loras, state.max_lora_rank)


def admin_router(gw: Gateway) -> APIRouter:
    router = APIRouter(prefix="/admin")

    @router.get("/decisions")
    async def decisions(request: Request, limit: int = 50) -> dict[str, Any]:
        require(gw.runtime.config, request, Role.VIEWER)
        limit = max(1, min(limit, 10_000))
        recent = list(gw.decisions)[-limit:]
        recent.reverse()
        return {"object": "list", "data": [r.to_dict() for r in recent]}

    @router.get("/pods")
    async def pods(request: Request) -> dict[str, Any]:
        require(gw.runtime.config, request, Role.VIEWER)
        now = time.time()
        view = gw.store.view()
        ids = sorted(set(gw.endpoints) | set(gw.pods))
        data = []
        pipeline = gw.runtime.pipeline
        local = pipeline.snapshot()
        for pod_id in ids:
            ep = gw.endpoint(pod_id)
            state = gw.pods.get(pod_id) or view.get(pod_id)
            data.append({
                "pod_id": pod_id,
                "url": ep.url if ep else None,
                "sidecar_url": ep.sidecar_url if ep else None,
                "routable": pod_id in gw.pods,
                "inflight": pipeline.inflight(pod_id)[0],
                "state_age_s": round(state.age(now), 3) if state else None,
                "router": local.get(pod_id),
                "kv": gw.kv_feeds.pod_status(pod_id, now),
                "state": state.to_dict() if state else None,
            })
        out: dict[str, Any] = {"object": "list", "data": data, "store": gw.store_watch.describe(now)}
        if gw.sharing is not None:
            out["sharing"] = gw.sharing.describe()
        return out

    @router.get("/model")
    async def model(request: Request) -> dict[str, Any]:
        """The learned cost model: per pod group the constants in force, the defaults they
        started from, the pins, and the evidence (observations by tier, residual scales)."""
        require(gw.runtime.config, request, Role.VIEWER)
        pipeline = gw.runtime.pipeline
        snap = pipeline.cost_model()
        if snap is None:
            return {"object": "cost_model", "policy": pipeline.name, "learning": False,
                    "message": "no scorer of this pipeline learns costs (estimated-ttft does)"}
        groups = {gid: sorted(p for p, st in gw.pods.items() if _group(st) == gid) for gid in snap["groups"]}
        return {"object": "cost_model", "policy": pipeline.name, "learning": snap["enabled"], **snap,
                "pods_by_group": groups}

    @router.post("/reload")
    async def reload(request: Request) -> dict[str, Any]:
        require(gw.runtime.config, request, Role.OPERATOR)
        try:
            restart = gw.reload()
        except ConfigError as e:
            gw.metrics.reload("invalid")
            raise APIError(400, f"config refused, the previous one keeps serving: {e}", code="invalid_config") from None
        return {"status": "reloaded", "generation": gw.runtime.generation, "restart_required": restart}

    return router
