"""Stage ``edge``: the two completion routes as a raw ASGI handler; the walk of one request.

``CompletionsEndpoint(gw, kind)`` is called by uvicorn for ``POST /v1/chat/completions`` and
``POST /v1/completions`` (no routing table, no middleware, no request object: measured cheaper,
docs/gateway.md). One request, top-down:

1. ``_arrive``: the headers the request path reads (``x-request-id`` kept when it is plain, the
   session header, the debug and admin-key headers) and the runtime snapshot → an ``Exchange``;
2. ``_authenticate``: ``Authorization: Bearer`` against the tenants' digests (401); the admin key
   (as the bearer key, or in ``x-loraroute-admin-key`` beside a tenant key) unlocks the
   explanation header;
3. admission: a draining gateway past its grace refuses (503 ``shutting_down``,
   ``gateway.drain``); the tenant's request rate and concurrency limits (429, ``gateway.limits``);
4. ``read_body``: the body with the size limit (413, checked against ``content-length`` first);
5. ``gateway.parse``, the tenant's prompt-token rate (429) → ``gateway.route.resolve`` →
   ``gateway.tokens`` (only while the pipeline reads KV events: the prompt's token ids) →
   ``gateway.route.decide``;
6. ``gateway.forward`` (which sends through ``gateway.relay``), inside ``ClientWatch``: a client
   that disconnects cancels the request at once (the upstream connection closes, so the pod
   sees it too) and counts as status 499;
7. ``_finish``: the request and end-to-end metrics, the decision record's status; the tenant's
   concurrency slot is given back however the request ended.

A rejection anywhere before 6 is an ``APIError`` sent in OpenAI's shape. An unexpected exception
is logged and answered with a 500 when the response has not started; never a stack trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from types import TracebackType

from gateway import forward, route
from gateway.errors import APIError
from gateway.exchange import Exchange, Receive, Scope, Send
from gateway.parse import Kind, parse_request
from gateway.policy import Tenant
from gateway.relay import send_error
from gateway.service import Gateway

log = logging.getLogger("loraroute.gateway")

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class ClientGone(Exception):
    """The client disconnected while its request body was being read."""


class _Headers:
    __slots__ = ("authorization", "admin_key", "debug", "content_length")

    def __init__(self) -> None:
        self.authorization: str | None = None
        self.admin_key: str | None = None
        self.debug = False
        self.content_length = -1


class CompletionsEndpoint:
    """The ASGI handler of one completion route (``kind``); see the module docstring."""

    def __init__(self, gw: Gateway, kind: Kind) -> None:
        self.gw = gw
        self.kind = kind
        # kept, not looked up per request: asyncio.get_running_loop() costs a getpid() system
        # call, and the session header's name is the same for a whole config generation
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session_header = (0, b"")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self.gw
        gw.active_requests += 1
        admitted: Tenant | None = None
        try:
            ex, headers = self._arrive(scope)
            try:
                if scope["method"] != "POST":
                    raise APIError(405, f"use POST for {self.kind.value}", code="method_not_allowed")
                if gw.refusing:
                    raise _shutting_down()
                self._authenticate(ex, headers)
                admitted = gw.limiter.admit(ex.tenant)
                body = await read_body(receive, ex.runtime.config.server.max_body_bytes, headers.content_length)
                ex.request = parse_request(body, self.kind)
                gw.limiter.admit_tokens(ex.tenant, ex.request.tokens)
                route.resolve(ex)
                if ex.runtime.pipeline.kv_reader is not None:
                    await gw.tokens.fill(gw, ex)
                route.decide(gw, ex)
            except APIError as e:
                await send_error(send, ex, e)
                gw.metrics.request(e.status, ex.base_label, ex.adapter_label, "")
                return
            except ClientGone:
                gw.metrics.request(499, "", "", "")
                return
            except Exception as exc:  # never a stack trace to the client
                await self._internal_error(ex, send, exc)
                return
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            try:
                with ClientWatch(receive, loop) as client:
                    await forward.run(gw, ex, send)
            except Exception as exc:
                await self._internal_error(ex, send, exc)
            if client.gone:
                ex.client_gone = True
                ex.status, ex.pod = 499, ""
            self._finish(ex)
        finally:
            gw.active_requests -= 1
            gw.limiter.release(admitted)

    def _arrive(self, scope: Scope) -> tuple[Exchange, _Headers]:
        rt = self.gw.runtime
        ex = Exchange(self.kind, rt, time.perf_counter())
        h = _Headers()
        generation, session_header = self._session_header
        if generation != rt.generation:
            session_header = rt.config.server.session_header.lower().encode()
            self._session_header = (rt.generation, session_header)
        for k, v in scope["headers"]:
            if k == b"authorization":
                h.authorization = v.decode("latin-1")
            elif k == b"content-length":
                with contextlib.suppress(ValueError):
                    h.content_length = int(v)
            elif k == b"x-loraroute-debug":
                h.debug = v == b"1"
            elif k == b"x-request-id":
                rid = v.decode("latin-1")
                ex.request_id = rid if _SAFE_ID.match(rid) else None  # forwarded upstream: keep it plain
            elif k == session_header:
                ex.session = v.decode("latin-1")[:256]
            elif k == b"x-loraroute-admin-key":
                h.admin_key = "Bearer " + v.decode("latin-1")
        return ex, h

    @staticmethod
    def _authenticate(ex: Exchange, h: _Headers) -> None:
        """``ex.tenant`` (raises 401) and ``ex.explain``."""
        policy = ex.runtime.policy
        bearer_admin = policy.admin_configured and policy.is_admin(h.authorization)
        is_admin = bearer_admin or (h.admin_key is not None and policy.is_admin(h.admin_key))
        ex.tenant = None if bearer_admin else policy.authenticate(h.authorization)
        ex.explain = h.debug and is_admin

    def _finish(self, ex: Exchange) -> None:
        metrics = self.gw.metrics
        ex.record.status = ex.status
        metrics.request(ex.status, ex.base_label, ex.adapter_label, ex.pod)
        metrics.e2e(ex.pod, time.perf_counter() - ex.arrived)

    async def _internal_error(self, ex: Exchange, send: Send, exc: Exception) -> None:
        log.error("unexpected error on %s: %s", self.kind.value, type(exc).__name__, exc_info=exc)
        if not ex.responded:
            await send_error(send, ex, APIError(500, "internal error in the gateway; see its log", code="internal_error"))
        else:
            ex.status = 500


def _shutting_down() -> APIError:
    err = APIError(503, "the gateway is shutting down; retry the request (another replica will take it)",
                   code="shutting_down")
    err.headers = ((b"connection", b"close"),)
    return err


async def read_body(receive: Receive, limit: int, content_length: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit`` bytes."""
    if content_length > limit:
        raise APIError(413, f"request body of {content_length} bytes is over the limit of {limit} bytes",
                       code="request_too_large")
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone()
        chunk = msg.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body is over the limit of {limit} bytes", code="request_too_large")
            chunks.append(chunk)
        if not msg.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _Gone:
    __slots__ = ("gone",)

    def __init__(self) -> None:
        self.gone = False


async def _watch(receive: Receive, task: asyncio.Task[object], flag: _Gone) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            flag.gone = True
            task.cancel()
            return


class ClientWatch:
    """Cancel the current task when the client disconnects: a context manager modelled on
    ``asyncio.timeout``, with ``receive`` watched by one task for the body of the block (its
    enter and exit await nothing, so it is a plain ``with``: two coroutines fewer per request).

    On a disconnect the task is cancelled, and the ``CancelledError`` that unwinds the block is
    absorbed at its end (``gone`` is then True) unless someone else cancelled the task too. A
    disconnect that uvicorn reports after the response is complete cannot be seen: the block
    ends in the same step as the last ``send``, and the watcher is cancelled there. The watcher
    shares only a flag with this object, never a reference back to it: a cancelled watcher keeps
    its frame in the exception's traceback, and a way back here would make every request leave
    a reference cycle for the garbage collector.
    """

    __slots__ = ("_flag", "_task", "_watcher", "_cancelling")

    def __init__(self, receive: Receive, loop: asyncio.AbstractEventLoop) -> None:
        """Call inside the task to protect (``with ClientWatch(receive, loop)``): watching starts here."""
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("ClientWatch needs a running task")
        self._flag = _Gone()
        self._task = task
        self._cancelling = task.cancelling()
        self._watcher = loop.create_task(_watch(receive, task, self._flag))

    @property
    def gone(self) -> bool:
        return self._flag.gone

    def __enter__(self) -> ClientWatch:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        self._watcher.cancel()
        if self._flag.gone and exc_type is asyncio.CancelledError:
            return self._task.uncancel() <= self._cancelling
        return False
