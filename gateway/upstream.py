"""HTTP clients to vLLM pods and sidecars, and the one place their errors become typed failures.

- Completions to ``http://`` pods go through ``gateway.h1client.Pool``: keep-alive connections per
  pod (``server.pool_per_pod`` idle ones kept), body bytes handed over as they arrive. Chosen by
  measurement over aiohttp and httpx (docs/gateway.md, "Overhead"): it halves the client's CPU per
  request.
- ``https://`` pods and everything off the hot path (sidecar ensures) use one
  ``aiohttp.ClientSession`` (``limit_per_host`` = ``server.pool_per_pod``).

``await upstream.open(pod_id, base_url, path, body, limits, request_id)`` returns a ``Reply``
once the status and headers are in, whichever client carried it: ``status``, ``headers``
(lower-case names), ``await read_chunk()`` (``b""`` at the end), ``await read_all()``,
``release()``. ``limits`` (``Limits``) are the attempt's own: the whole exchange within
``total_s``, the first body byte within ``first_byte_s`` of sending (streaming; the lean client
arms a timer on the loop for it), then at most ``idle_s`` of silence between body bytes; and
``abort``, an ``AbortSignal`` through which another task ends the attempt at once with a
typed failure of its choosing (the pod went unhealthy, the gateway's drain deadline passed) or
shortens its silence limit. Every failure of either client — connect errors, resets,
malformed or cut responses, the limits — leaves as a ``gateway.failures`` ``ConnectFailed``,
``FirstByteTimeout``, ``StreamStalled`` or the abort's failure, naming the pod, translated by
``_failure`` below. The aiohttp path honours an abort before the headers (its first-byte
timeout is moved to now) and after them (the response is closed), but not ``idle_s``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from gateway.config import ServerConfig
from gateway.failures import ConnectFailed, FirstByteTimeout, StreamStalled, UpstreamFailure
from gateway.h1client import Connection, Pool, StreamIdle, build_head, split_url

_JSON_HEADERS = {"Content-Type": "application/json", "Accept": "*/*"}
#: what the two clients raise: OSError (h1client's UpstreamError included), TimeoutError, aiohttp's own
_CLIENT_ERRORS = (OSError, TimeoutError, aiohttp.ClientError)


class _Aborted(OSError):
    """What an aborted lean-client read raises; ``_failure`` swaps it for the abort's failure."""


class AbortSignal:
    """Ends one attempt from another task: ``abort(failure)`` makes its pending (or next) read
    raise ``failure``; ``set_idle(s)`` shortens the silence it may keep mid-stream. The attempt
    loop creates one per attempt and registers it (``gateway.inflight``); the clients bind to
    it as the request goes out. ``started``: the reply's first body bytes are in (set by the
    attempt loop)."""

    __slots__ = ("pod_id", "failure", "started", "_conn", "_timeout", "_aio")

    def __init__(self, pod_id: str) -> None:
        self.pod_id = pod_id
        self.failure: UpstreamFailure | None = None
        self.started = False
        self._conn: Connection | None = None
        self._timeout: asyncio.Timeout | None = None
        self._aio: aiohttp.ClientResponse | None = None

    def bind(self, conn: Connection) -> None:
        """The lean client's connection carrying the request (``Pool.request(bind=...)``)."""
        self._conn = conn
        if self.failure is not None:
            conn.abort(_Aborted())

    def abort(self, failure: UpstreamFailure) -> None:
        if self.failure is not None:
            return
        self.failure = failure
        if self._conn is not None:
            self._conn.abort(_Aborted())
        elif self._aio is not None:
            self._aio.close()
        elif self._timeout is not None:
            self._timeout.reschedule(asyncio.get_running_loop().time())

    def set_idle(self, idle_s: float) -> None:
        if self._conn is not None:
            self._conn.set_idle(idle_s)

    def bind_timeout(self, scope: asyncio.Timeout | None) -> None:
        """aiohttp, before the headers: an abort moves this first-byte timeout to now."""
        self._timeout = scope
        if scope is not None and self.failure is not None:
            scope.reschedule(asyncio.get_running_loop().time())

    def bind_response(self, resp: aiohttp.ClientResponse) -> None:
        """aiohttp, after the headers: an abort closes the response."""
        self._timeout = None
        self._aio = resp
        if self.failure is not None:
            resp.close()


@dataclass(frozen=True, slots=True)
class Limits:
    """One attempt's time limits (seconds; ``first_byte_s`` None: not a stream) and its abort."""

    total_s: float
    first_byte_s: float | None
    idle_s: float | None
    abort: AbortSignal


def _failure(pod_id: str, exc: BaseException, limits: Limits) -> UpstreamFailure:
    """The typed failure for one client error (the one translation of both clients' errors)."""
    aborted = limits.abort.failure
    if aborted is not None:
        return aborted
    if isinstance(exc, StreamIdle):
        return StreamStalled(pod_id, exc.idle_s)
    if isinstance(exc, TimeoutError):  # a stream's limit is the first byte's; the others' the total
        first = limits.first_byte_s
        return FirstByteTimeout(pod_id, first if first is not None else limits.total_s)
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

    __slots__ = ("pod_id", "status", "headers", "_resp", "_limits", "_first_by")

    def __init__(self, pod_id: str, resp: _ClientResponse, limits: Limits, first_by: float | None = None) -> None:
        self.pod_id = pod_id
        self.status = resp.status
        self.headers = resp.headers
        self._resp = resp
        self._limits = limits
        self._first_by = first_by

    async def read_chunk(self) -> bytes:
        try:
            if self._first_by is None:
                return await self._resp.read_chunk()
            async with asyncio.timeout_at(self._first_by):
                self._first_by = None
                return await self._resp.read_chunk()
        except _CLIENT_ERRORS as e:
            raise _failure(self.pod_id, e, self._limits) from None

    async def read_all(self) -> bytes:
        try:
            return await self._resp.read_all()
        except _CLIENT_ERRORS as e:
            raise _failure(self.pod_id, e, self._limits) from None

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
        self.ensure_timeout = aiohttp.ClientTimeout(total=t.ensure_s, sock_connect=t.connect_s)
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
        self, pod_id: str, base_url: str, path: str, body: bytes, limits: Limits, request_id: str | None = None,
    ) -> Reply:
        """POST ``body`` (JSON) to ``base_url + path``; returns once the status and headers are in.
        ``request_id`` goes out as ``X-Request-Id`` (vLLM builds its response ids from it)."""
        headers = _JSON_HEADERS if not request_id else {**_JSON_HEADERS, "X-Request-Id": request_id}
        target = self._target(base_url)
        first_s = limits.first_byte_s
        abort = limits.abort
        try:
            if target is not None:
                host, port, prefix = target
                head = build_head("POST", prefix + path, host, port, headers, len(body))
                resp = await self.pool.request(host, port, head, body, limits.total_s, first_s, limits.idle_s,
                                               abort.bind)
                return Reply(pod_id, resp, limits)
            assert self.session is not None, "Upstream.start() was not awaited"
            loop = asyncio.get_running_loop()
            first_by = loop.time() + (first_s if first_s is not None else limits.total_s)
            async with asyncio.timeout_at(first_by) as scope:
                abort.bind_timeout(scope)
                resp = await self.session.post(base_url + path, data=body, headers=headers,
                                               timeout=aiohttp.ClientTimeout(total=limits.total_s, connect=None,
                                                                             sock_connect=self.pool.connect_timeout_s))
            abort.bind_response(resp)
            return Reply(pod_id, _AiohttpResponse(resp), limits, first_by if first_s is not None else None)
        except _CLIENT_ERRORS as e:
            raise _failure(pod_id, e, limits) from None
