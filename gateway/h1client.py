"""A lean HTTP/1.1 client for the hot path: pooled keep-alive connections, bytes passed through.

Why not aiohttp or httpx here: measured at concurrency 1 against a zero-delay pod, the client's
own per-request cost dominated the gateway's added latency (docs/gateway.md, "Overhead"). This
client does only what the gateway needs — POST a ready body, read the status line and headers,
hand the body over as it arrives — on an ``asyncio.Protocol`` with the ``httptools`` parser (the
one uvicorn uses), so a request costs a few dict operations and one ``transport.write``.

- ``build_head(method, path, host, port, headers, body_len) -> bytes``: the request line and
  headers. A CR, LF or NUL in the path, a header name or a value is refused (``ValueError``): no
  caller can split the request. An IPv6 host is written in brackets.
- ``Pool(connect_timeout_s, max_idle_per_host)``: idle connections per ``(host, port)``, LIFO.
  ``await pool.request(host, port, head, body, timeout_s, first_byte_s)`` -> ``Response`` once the
  headers are in; ``timeout_s`` bounds the whole exchange, body included, ``first_byte_s`` the
  time to the first body byte (a timer on the loop, not a cancel scope), ``idle_s`` the longest
  silence between body bytes once the first has arrived (one timer per stream that re-arms
  itself at the last arrival, not one per chunk); ``bind(conn)`` is told the connection before
  the request goes out, so another task can ``abort`` it. A connection reused from the pool
  that turns out to be closed by the server (nothing received) is retried once on a new
  connection — the usual keep-alive race, invisible to the caller.
- ``Response``: ``status``, ``headers`` (lower-case names -> str), ``await read_chunk()`` (the
  body bytes as they arrived, ``b""`` at the end), ``await read_all()``, ``complete``,
  ``release()`` (back to the pool when fully read and keep-alive, else closed), ``close()``.
  Chunked transfer encoding is decoded by the parser; a 204 and a 304 have no body.
- ``Connection``: one keep-alive connection; its public surface is what ``Pool`` and ``Response``
  use (``send``, ``read``, ``read_all``, ``complete``, ``reusable``, ``received``, ``closed``,
  ``close``, ``done``), plus ``abort(exc)`` (the pending or next read raises ``exc``, the
  connection closes) and ``set_idle(idle_s)`` (a shorter silence limit from now on).
- Back-pressure: reading from the socket pauses while more than 1 MiB waits unread.
- Errors: ``UpstreamError`` (an ``OSError``) for connection failures, resets, malformed responses
  and a response cut short; ``asyncio.TimeoutError`` for the connect timeout and ``timeout_s``,
  ``NoFirstByte`` (one) for ``first_byte_s``, ``StreamIdle`` (one) for ``idle_s``.
  ``gateway.upstream`` turns both into the gateway's typed failures. Plain ``http://`` only.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import httptools

_HIGH_WATER = 1 << 20
_FORBIDDEN = frozenset("\r\n\x00")


class UpstreamError(OSError):
    pass


class NoFirstByte(asyncio.TimeoutError):
    """No body byte (nor the end of a body-less response) within ``first_byte_s``."""


class StreamIdle(asyncio.TimeoutError):
    """No body byte for ``idle_s`` after the first one."""

    def __init__(self, idle_s: float) -> None:
        super().__init__(f"no response body byte for {idle_s:g}s")
        self.idle_s = idle_s


def _check(text: str, what: str) -> str:
    if not _FORBIDDEN.isdisjoint(text):
        raise ValueError(f"{what} contains a CR, LF or NUL character")
    return text


def build_head(method: str, path: str, host: str, port: int, headers: dict[str, str], body_len: int) -> bytes:
    """``METHOD path HTTP/1.1`` with ``Host``, ``Content-Length`` and ``headers``; see the module docstring."""
    _check(path, "the request path")
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"{method} {path} HTTP/1.1", f"Host: {_check(authority, 'the host')}", f"Content-Length: {body_len}"]
    for k, v in headers.items():
        lines.append(f"{_check(k, 'a header name')}: {_check(v, f'header {k!r}')}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def split_url(url: str) -> tuple[str, int, str]:
    """``http://host:port/prefix`` -> (host, port, path prefix without trailing slash); IPv6
    hosts in brackets (``http://[::1]:8000``) come back without them."""
    if not url.startswith("http://"):
        raise ValueError("the lean client speaks plain http:// only")
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    return parts.hostname, parts.port or 80, parts.path.rstrip("/")


class Connection(asyncio.Protocol):
    """One keep-alive connection to ``key`` = (host, port), parsing responses with httptools."""

    __slots__ = (
        "transport", "parser", "pool", "key", "status", "headers", "headers_done", "_chunks", "_buffered",
        "_waiter", "_complete", "closed", "_error", "_paused", "received", "_keep_alive", "_timer", "_loop",
        "_first_timer", "_idle_s", "_idle_timer", "_last_rx",
    )

    def __init__(self, pool: Pool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        # the loop it was created on, kept: asyncio.get_running_loop() costs a getpid() system call
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._first_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_s: float | None = None
        self._last_rx = 0.0
        self.reset()

    def reset(self) -> None:
        """Ready for the next exchange on this connection."""
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: dict[str, str] = {}
        self.headers_done = False
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._complete = False
        self._paused = False
        self.received = False
        self._keep_alive = False

    # --- the public surface -------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """The whole response has arrived and been read."""
        return self._complete and not self._chunks

    @property
    def reusable(self) -> bool:
        """Fully read, still open, and the server allows another request on it."""
        return self.complete and self._keep_alive and not self.closed

    async def send(self, head: bytes, body: bytes, timeout_s: float | None, first_byte_s: float | None = None,
                   idle_s: float | None = None) -> None:
        """Write one request and wait for the response's headers (``status``, ``headers``)."""
        assert self.transport is not None
        if timeout_s is not None:
            self._timer = self._loop.call_later(timeout_s, self._on_timeout)
        if first_byte_s is not None:
            self._first_timer = self._loop.call_later(first_byte_s, self._on_no_first_byte)
        self._idle_s = idle_s
        if len(body) < 65536:
            self.transport.write(head + body)
        else:
            self.transport.write(head)
            self.transport.write(body)
        try:
            while not self.headers_done:
                await self._wait()
        except BaseException:
            self.close()
            raise

    async def read(self) -> bytes:
        """The body bytes that arrived since the last read; ``b""`` once the body is complete."""
        while not self._chunks:
            if self._complete:
                return b""
            await self._wait()
        return self._take()

    async def read_all(self) -> bytes:
        """The rest of the body, once it is complete (no back-pressure: all of it is wanted)."""
        while not self._complete:
            self._resume()
            await self._wait()
        return self._take() if self._chunks else b""

    def _take(self) -> bytes:
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        self._resume()
        return data

    def _resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self._cancel_timer()
        if self.transport is not None and not self.closed:
            self.transport.close()

    def done(self) -> None:
        """The exchange is over (read or abandoned): stop its timer."""
        self._cancel_timer()

    def abort(self, exc: BaseException) -> None:
        """End the exchange now: the pending (or next) read raises ``exc``; the connection closes."""
        self._fail(exc)
        self.close()

    def set_idle(self, idle_s: float) -> None:
        """From now on the stream may be silent for at most ``idle_s`` (never longer than before)."""
        if self._idle_s is not None and self._idle_s <= idle_s:
            return
        self._idle_s = idle_s
        if self._idle_timer is not None:  # the stream has started: re-arm at the new limit
            self._idle_timer.cancel()
            self._idle_timer = self._loop.call_at(self._last_rx + idle_s, self._on_idle)

    # --- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(UpstreamError(f"malformed response from upstream: {e}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        if not self._complete:
            self._fail(UpstreamError("upstream closed the connection" + (f" ({exc})" if exc else "")))
        self.pool.discard(self)

    # --- httptools callbacks --------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        # read it now: llhttp forgets it once the message is complete
        self._keep_alive = self.parser.should_keep_alive()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._first_timer is not None:
            self._first_timer.cancel()
            self._first_timer = None
        if self._idle_s is not None:
            self._last_rx = self._loop.time()
            if self._idle_timer is None:
                self._idle_timer = self._loop.call_at(self._last_rx + self._idle_s, self._on_idle)
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self._complete = True
        if self._first_timer is not None:
            self._first_timer.cancel()
            self._first_timer = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._wake()

    # --- helpers ----------------------------------------------------------------------------------
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _on_timeout(self) -> None:
        self._timer = None
        self._fail(asyncio.TimeoutError("upstream exchange exceeded its total timeout"))
        self.close()

    def _on_no_first_byte(self) -> None:
        self._first_timer = None
        self._fail(NoFirstByte("no response body byte within the first-byte limit"))
        self.close()

    def _on_idle(self) -> None:
        idle_s = self._idle_s
        assert idle_s is not None
        due = self._last_rx + idle_s
        if self._loop.time() < due:  # bytes arrived since the timer was armed: wait for the rest
            self._idle_timer = self._loop.call_at(due, self._on_idle)
            return
        self._idle_timer = None
        self._fail(StreamIdle(idle_s))
        self.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._first_timer is not None:
            self._first_timer.cancel()
            self._first_timer = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._idle_s = None

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(exc)

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


class Response:
    """One response on a pooled ``Connection``; see the module docstring."""

    __slots__ = ("_conn", "status", "headers", "read_chunk", "read_all", "_done")

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers
        #: ``await read_chunk()``: the next body bytes as they arrived; ``b""`` once complete
        self.read_chunk: Callable[[], Awaitable[bytes]] = conn.read
        #: ``await read_all()``: the rest of the body, once complete
        self.read_all: Callable[[], Awaitable[bytes]] = conn.read_all
        self._done = False

    @property
    def complete(self) -> bool:
        return self._conn.complete

    def release(self) -> None:
        """Return the connection to the pool if the body was read completely, else close it."""
        if self._done:
            return
        self._done = True
        conn = self._conn
        conn.done()
        if conn.reusable:
            conn.pool.put(conn)
        else:
            conn.close()

    def close(self) -> None:
        self._done = True
        self._conn.close()


class Pool:
    def __init__(self, connect_timeout_s: float = 2.0, max_idle_per_host: int = 256) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.max_idle_per_host = max_idle_per_host
        self._idle: dict[tuple[str, int], list[Connection]] = {}

    async def _connect(self, key: tuple[str, int]) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: Connection(self, key), key[0], key[1]), self.connect_timeout_s
            )
        except OSError as e:
            raise UpstreamError(f"cannot connect to {key[0]}:{key[1]} ({e.strerror or type(e).__name__})") from None
        return conn

    def put(self, conn: Connection) -> None:
        """Keep a fully read keep-alive connection for the next request to its host."""
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self.max_idle_per_host:
            conn.close()
            return
        conn.reset()
        idle.append(conn)

    def discard(self, conn: Connection) -> None:
        """The connection closed: forget it if it was idle."""
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    async def request(
        self, host: str, port: int, head: bytes, body: bytes, timeout_s: float | None = None,
        first_byte_s: float | None = None, idle_s: float | None = None,
        bind: Callable[[Connection], None] | None = None,
    ) -> Response:
        """Send, wait for the headers. ``timeout_s`` bounds the whole exchange, body included:
        when it passes, the pending read raises ``asyncio.TimeoutError`` and the connection closes;
        ``first_byte_s`` likewise the wait for the first body byte (``NoFirstByte``), ``idle_s``
        each silence after it (``StreamIdle``). ``bind`` is called with the connection before
        each send (a retry on a fresh connection binds that one)."""
        key = (host, port)
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.closed or conn.transport is None or conn.transport.is_closing():
                continue
            if bind is not None:
                bind(conn)
            try:
                await conn.send(head, body, timeout_s, first_byte_s, idle_s)
                return Response(conn)
            except UpstreamError:
                if conn.received:
                    raise
                # the server closed an idle keep-alive connection: retry once on a fresh one
                break
        conn = await self._connect(key)
        if bind is not None:
            bind(conn)
        await conn.send(head, body, timeout_s, first_byte_s, idle_s)
        return Response(conn)

    def close(self) -> None:
        for conns in self._idle.values():
            for c in conns:
                c.close()
        self._idle.clear()

    def idle_count(self) -> dict[tuple[str, int], int]:
        return {k: len(v) for k, v in self._idle.items()}


__all__ = ["Connection", "NoFirstByte", "Pool", "Response", "StreamIdle", "UpstreamError", "build_head", "split_url"]
