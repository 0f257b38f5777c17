"""The gateway's calls to the sidecars outside the request path: a version roll's refresh on
every pod, store checks, and an ensure asked for by an operator (``loraroute doctor request``).

Every call is bounded by ``changes.sidecar_timeout_s`` and runs concurrently over the pods; a
pod without a sidecar, or one that does not answer, is reported, never raised. Sidecar answers
are passed on as the sidecar wrote them (``GET /store``, ``POST .../ensure``: docs/sidecar.md).

``sidecar_auth(config)`` is the header every call to a sidecar's control API carries (this
module's, the request path's ensures, the placer's loads): the token from the environment
variable ``security.sidecar_token_env`` names, when it is set.
"""

from __future__ import annotations

import asyncio
import os
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from gateway.change_model import Effect
from gateway.config import GatewayConfig
from gateway.discovery import Endpoint


def sidecar_auth(config: GatewayConfig) -> dict[str, str]:
    """``{"Authorization": "Bearer <token>"}`` for the sidecars' control API, or ``{}``."""
    name = config.security.sidecar_token_env
    token = os.environ.get(name, "").strip() if name else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


@dataclass(frozen=True, slots=True)
class SidecarAnswer:
    """One sidecar's HTTP answer: ``status`` 0 when it did not answer (``body`` then holds an
    ``error`` saying why)."""

    pod: str
    status: int
    body: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def error(self) -> dict[str, Any]:
        err = self.body.get("error")
        return err if isinstance(err, dict) else {"message": str(self.body)[:300], "code": None}


class Sidecars:
    def __init__(self, endpoints: Callable[[], Mapping[str, Endpoint | None]], timeout_s: float,
                 headers: Callable[[], Mapping[str, str]] = dict) -> None:
        self._endpoints = endpoints
        self.timeout_s = timeout_s
        self._headers = headers
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def with_sidecar(self) -> dict[str, str]:
        return {pod: ep.sidecar_url for pod, ep in sorted(self._endpoints().items()) if ep and ep.sidecar_url}

    async def _call(self, pod: str, method: str, url: str, **kwargs: Any) -> SidecarAnswer:
        assert self._session is not None
        try:
            async with self._session.request(method, url, timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                                             headers=self._headers(), **kwargs) as resp:
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    body = {"error": {"message": (await resp.text())[:300], "code": None}}
                return SidecarAnswer(pod, resp.status, body if isinstance(body, dict) else {"data": body})
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return SidecarAnswer(pod, 0, {"error": {
                "message": f"the sidecar of pod {pod!r} did not answer ({type(exc).__name__})", "code": "unreachable"}})

    async def _each(self, make: Callable[[str, str], Awaitable[SidecarAnswer]]) -> list[SidecarAnswer]:
        return list(await asyncio.gather(*(make(pod, url) for pod, url in self.with_sidecar().items())))

    async def store(self, names: list[str], pod: str | None = None) -> list[SidecarAnswer]:
        """``GET /store`` on every sidecar (or one): what each pod's store holds for ``names``
        (``name`` or ``name@version``)."""
        query = urllib.parse.urlencode([("adapter", n) for n in names])

        async def one(pod_id: str, url: str) -> SidecarAnswer:
            return await self._call(pod_id, "GET", f"{url}/store?{query}")

        answers = await self._each(one)
        return [a for a in answers if pod is None or a.pod == pod]

    async def refresh(self, adapter: str, version: str | None) -> list[Effect]:
        """A roll: every pod with a sidecar brings ``adapter`` to ``version`` if it holds it; pods
        without a sidecar are listed as such (they fetch nothing themselves)."""
        quoted = urllib.parse.quote(adapter, safe="")

        async def one(pod_id: str, url: str) -> SidecarAnswer:
            return await self._call(pod_id, "POST", f"{url}/adapters/{quoted}/refresh", json={"version": version})

        effects = []
        for answer in await self._each(one):
            if answer.ok:
                b = answer.body
                effects.append(Effect(pod=answer.pod, status=b.get("status", "failed"), version=b.get("version"),
                                      previous_version=b.get("previous_version"), reloaded=bool(b.get("reloaded"))))
            else:
                err = answer.error
                effects.append(Effect(pod=answer.pod, status="failed",
                                      error=f"[{err.get('code')}] {err.get('message')}"))
        with_sidecar = set(self.with_sidecar())
        effects += [Effect(pod=p, status="no_sidecar") for p in sorted(set(self._endpoints()) - with_sidecar)]
        return effects

    async def ensure(self, pod: str, adapter: str, version: str | None) -> SidecarAnswer:
        url = self.with_sidecar().get(pod)
        if url is None:
            return SidecarAnswer(pod, 0, {"error": {"message": f"pod {pod!r} has no sidecar (or is unknown)",
                                                    "code": "no_sidecar"}})
        body: dict[str, Any] = {"load": True}
        if version:
            body["version"] = version
        return await self._call(pod, "POST", f"{url}/adapters/{urllib.parse.quote(adapter, safe='')}/ensure",
                                json=body)
