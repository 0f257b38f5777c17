"""HTTP clients to vLLM pods and sidecars, and the one place their errors become typed failures.

- Completions to ``http://`` pods go through ``gateway.h1client.Pool``: keep-alive connections per
  pod (``server.pool_per_pod`` idle ones kept), body bytes handed over as they arrive. Chosen by
  measurement over aiohttp and httpx (docs/gateway.md, "Overhead"): it halves the client's CPU per
  request.
- ``https://`` pods and everything off the hot path (sidecar ensures) use one
  ``aiohttp.ClientSession`` (``limit_per_host`` = ``server.pool_per_pod``).

``await upstream.open(pod_id, base_url, path, body, request_id, first_byte)`` returns a ``Reply``
once the status and headers are in, whichever client carried it: ``status``, ``headers``
(lower-case names), ``await read_chunk()`` (``b""`` at the end), ``await read_all()``,
``release()``. With ``first_byte`` (streaming), the first body byte must arrive within
``server.timeouts.first_byte_s`` of sending (the lean client arms a timer on the loop for it).
Every failure of either client — connect errors, resets, malformed or cut responses, the
first-byte limit, the ``server.timeouts.total_s`` limit on the whole exchange — leaves as a
``gateway.failures`` ``ConnectFailed`` or ``FirstByteTimeout`` naming the pod, translated by
``_failure`` below.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import asyncio

import aiohttp

from gateway.config import ServerConfig
from gateway.failures import ConnectFailed, FirstByteTimeout, UpstreamFailure
from gateway.h1client import Pool, build_head, split_url

_JSON_HEADERS = {"Content-Type": "application/json", "Accept": "*/*"}
#: what the two clients raise: OSError (h1client's UpstreamError included), TimeoutError, aiohttp's own
_CLIENT_ERRORS = (OSError, TimeoutError, aiohttp.ClientError)


def _failure(pod_id: str, exc: BaseException, total_s: float, first_byte_s: float | None) -> UpstreamFailure:
    """The typed failure for one client error (the one translation of both clients' errors)."""
    if isinstance(exc, TimeoutError):  # a stream's limit is the first byte's; the others' the total
        return FirstByteTimeout(pod_id, first_byte_s if first_byte_s is not None else total_s)
    if isinstance(exc, aiohttp.ClientError):
        return ConnectFailed(pod_id, type(exc).__name__)
    return ConnectFailed(pod_id, str(exc) or type(exc).__name__)


class _ClientResponse(Protocol):
    status: int
    headers: Mapping[str, str]

    async def read_chunk(self) -> bytes: ...

    async def read_all(self) -> bytes: ...

    def release(self) -> None: ...


class _AiohttpResponse:
    """aiohttp's response behind the lean client's small interface."""

    __slots__ = ("_resp", "status", "headers")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers = {k.lower(): v for k, v in resp.headers.items()}

    async def read_chunk(self) -> bytes:
        return await self._resp.content.readany()

    async def read_all(self) -> bytes:
        return await self._resp.content.read()

    def release(self) -> None:
        if self._resp.content.at_eof():
            self._resp.release()
        else:
            self._resp.close()


class Reply:
    """A pod's answer, whichever client carried it; reads raise only ``UpstreamFailure``.
    ``first_by``: the loop time by which the first body byte must be in (aiohttp only; the lean
    client keeps that timer itself)."""

    __slots__ = ("pod_id", "status", "headers", "_resp", "_total_s", "_first_byte_s", "_first_by")

    def __init__(self, pod_id: str, resp: _ClientResponse, total_s: float, first_byte_s: float | None,
                 first_by: float | None = None) -> None:
        self.pod_id = pod_id
        self.status = resp.status
        self.headers = resp.headers
        self._resp = resp
        self._total_s = total_s
        self._first_byte_s = first_byte_s
        self._first_by = first_by

    async def read_chunk(self) -> bytes:
        try:
            if self._first_by is None:
                return await self._resp.read_chunk()
            async with asyncio.timeout_at(self._first_by):
                self._first_by = None
                return await self._resp.read_chunk()
        except _CLIENT_ERRORS as e:
            raise _failure(self.pod_id, e, self._total_s, self._first_byte_s) from None

    async def read_all(self) -> bytes:
        try:
            return await self._resp.read_all()
        except _CLIENT_ERRORS as e:
            raise _failure(self.pod_id, e, self._total_s, self._first_byte_s) from None

    def release(self) -> None:
        """Back to the pool when fully read (keep-alive), else the connection is closed."""
        self._resp.release()


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

    async def open(
        self, pod_id: str, base_url: str, path: str, body: bytes, request_id: str | None = None, first_byte: bool = False,
    ) -> Reply:
        """POST ``body`` (JSON) to ``base_url + path``; returns once the status and headers are in.
        ``request_id`` goes out as ``X-Request-Id`` (vLLM builds its response ids from it)."""
        headers = _JSON_HEADERS if not request_id else {**_JSON_HEADERS, "X-Request-Id": request_id}
        target = self._target(base_url)
        first_s = self.first_byte_s if first_byte else None
        try:
            if target is not None:
                host, port, prefix = target
                head = build_head("POST", prefix + path, host, port, headers, len(body))
                return Reply(pod_id, await self.pool.request(host, port, head, body, self.total_s, first_s),
                             self.total_s, first_s)
            assert self.session is not None, "Upstream.start() was not awaited"
            first_by = asyncio.get_running_loop().time() + first_s if first_s is not None else None
            async with asyncio.timeout_at(first_by):
                resp = await self.session.post(base_url + path, data=body, headers=headers, timeout=self.timeout)
            return Reply(pod_id, _AiohttpResponse(resp), self.total_s, first_s, first_by)
        except _CLIENT_ERRORS as e:
            raise _failure(pod_id, e, self.total_s, first_s) from None
