"""Admin routes of demand and placement (admin key required, like every ``/admin`` route).

- ``GET /admin/demand?limit=N`` — the merged demand: per (base, adapter) the decayed request rate
  (requests/s), its share of all adapter requests and when it was last seen, most demanded first;
  the writers merged (every replica's counts, persisted ones included). With placement off: this
  replica's own counts.
- ``GET /admin/placement?limit=N`` — the plan (roles, pods per adapter, per-pod targets), plan vs
  actual per pod (planned, resident, missing, unplanned), pods held while warming, the stall
  budget per pod, counters, and the last actions taken or skipped with their reason, newest
  first. With placement off: ``{"enabled": false, ...}`` and how to turn it on.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from gateway.roles import Role, require
from gateway.service import Gateway


def placement_router(gw: Gateway) -> APIRouter:
    router = APIRouter(prefix="/admin")

    @router.get("/demand")
    async def demand(request: Request, limit: int = 200) -> dict[str, Any]:
        require(gw.runtime.config, request, Role.VIEWER)
        limit = max(1, min(limit, 100_000))
        return {"object": "demand", "shared": gw.placer is not None, **gw.current_demand().to_dict(limit)}

    @router.get("/placement")
    async def placement(request: Request, limit: int = 200) -> dict[str, Any]:
        require(gw.runtime.config, request, Role.VIEWER)
        limit = max(1, min(limit, 100_000))
        if gw.placer is None:
            return {"enabled": False, "at": round(time.time(), 3),
                    "message": "placement is off: set placement.enabled: true (docs/placement.md)"}
        return gw.placer.report(limit)

    return router
