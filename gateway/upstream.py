"""HTTP clients to vLLM pods and sidecars.

- Completions to ``http://`` pods go through ``gateway.h1client.Pool``: keep-alive connections per
  pod (``server.pool_per_pod`` idle ones kept), body bytes handed over as they arrive. Chosen by
  measurement over aiohttp and httpx (docs/gateway.md, "Overhead"): it halves the client's CPU per
  request.
- ``https://`` pods and everything off the hot path (sidecar ensures) use one
  ``aiohttp.ClientSession`` (``limit_per_host`` = ``server.pool_per_pod``).

``await upstream.post(base_url, path, body)`` returns an ``UpstreamResponse`` either way:
``status``, ``headers`` (look up lower-case names), ``read_chunk()`` (``b""`` at the end),
``read_all()``, ``complete``, ``release()``, ``close()``. Failures raise ``UpstreamError`` (an
``OSError``) or ``asyncio.TimeoutError`` (``server.timeouts.total_s`` for the whole exchange).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import aiohttp

from gateway.config import ServerConfig
from gateway.h1client import Pool, UpstreamError, build_head, split_url

_JSON_HEADERS = {"Content-Type": "application/json", "Accept": "*/*"}


class UpstreamResponse(Protocol):
    status: int
    headers: Mapping[str, str]

    async def read_chunk(self) -> bytes: ...

    async def read_all(self) -> bytes: ...

    @property
    def complete(self) -> bool: ...

    def release(self) -> None: ...

    def close(self) -> None: ...


class _AiohttpResponse:
    """aiohttp's response behind the same small interface (errors mapped to UpstreamError)."""

    __slots__ = ("_resp", "status", "headers")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers = {k.lower(): v for k, v in resp.headers.items()}

    async def read_chunk(self) -> bytes:
        try:
            return await self._resp.content.readany()
        except aiohttp.ClientError as e:
            raise UpstreamError(f"upstream failed while sending the body ({type(e).__name__})") from None

    async def read_all(self) -> bytes:
        try:
            return await self._resp.read()
        except aiohttp.ClientError as e:
            raise UpstreamError(f"upstream failed while sending the body ({type(e).__name__})") from None

    @property
    def complete(self) -> bool:
        return self._resp.content.at_eof()

    def release(self) -> None:
        if self._resp.content.at_eof():
            self._resp.release()
        else:
            self._resp.close()

    def close(self) -> None:
        self._resp.close()


class Upstream:
    def __init__(self, server: ServerConfig) -> None:
        self._server = server
        self.session: aiohttp.ClientSession | None = None
        self.pool = Pool(connect_timeout_s=server.timeouts.connect_s, max_idle_per_host=server.pool_per_pod)
        self._targets: dict[str, tuple[str, int, str] | None] = {}
        self.configure(server)

    def configure(self, server: ServerConfig) -> None:
        """Apply (re)loaded timeouts; the pools keep their size until restart."""
        self._server = server
        t = server.timeouts
        self.total_s = t.total_s
        self.timeout = aiohttp.ClientTimeout(total=t.total_s, connect=None, sock_connect=t.connect_s)
        self.ensure_timeout = aiohttp.ClientTimeout(total=t.ensure_s, sock_connect=t.connect_s)
        self.first_byte_s = t.first_byte_s
        self.pool.connect_timeout_s = t.connect_s
        self.retries = server.retries

    async def start(self) -> None:
        if self.session is None:
            connector = aiohttp.TCPConnector(
                limit=0, limit_per_host=self._server.pool_per_pod, keepalive_timeout=60.0, ttl_dns_cache=300
            )
            self.session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
            )

    async def close(self) -> None:
        self.pool.close()
        if self.session is not None:
            await self.session.close()
            self.session = None

    def _target(self, base_url: str) -> tuple[str, int, str] | None:
        try:
            return self._targets[base_url]
        except KeyError:
            try:
                target: tuple[str, int, str] | None = split_url(base_url)
            except ValueError:
                target = None
            if len(self._targets) > 10_000:
                self._targets.clear()
            self._targets[base_url] = target
            return target

    async def post(self, base_url: str, path: str, body: bytes, request_id: str | None = None) -> UpstreamResponse:
        """POST ``body`` (JSON) to ``base_url + path``; returns once the status and headers are in.
        ``request_id`` goes out as ``X-Request-Id`` (vLLM builds its response ids from it)."""
        headers = _JSON_HEADERS if not request_id else {**_JSON_HEADERS, "X-Request-Id": request_id}
        target = self._target(base_url)
        if target is not None:
            host, port, prefix = target
            head = build_head("POST", prefix + path, host, port, headers, len(body))
            return await self.pool.request(host, port, head, body, self.total_s)
        assert self.session is not None
        try:
            resp = await self.session.post(base_url + path, data=body, headers=headers, timeout=self.timeout)
        except aiohttp.ClientError as e:
            raise UpstreamError(f"cannot reach {base_url} ({type(e).__name__})") from None
        return _AiohttpResponse(resp)
