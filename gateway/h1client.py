"""A lean HTTP/1.1 client for the hot path: pooled keep-alive connections, bytes passed through.

Why not aiohttp or httpx here: measured at concurrency 1 against a zero-delay pod, the client's
own per-request cost dominated the gateway's added latency (docs/gateway.md, "Overhead"). This
client does only what the proxy needs — POST a ready body, read the status line and headers, hand
the body over as it arrives — on an ``asyncio.Protocol`` with the ``httptools`` parser (the one
uvicorn uses), so a request costs a few dict operations and one ``transport.write``.

- ``Pool(connect_timeout_s, max_idle_per_host)``: idle connections per ``(host, port)``, LIFO.
- ``await pool.request(host, port, head, body)`` -> ``Response`` once the headers are in.
  ``head`` is the request line and headers as bytes (``build_head``). A connection reused from
  the pool that turns out to be closed by the server (nothing received) is retried once on a new
  connection — the usual keep-alive race, invisible to the caller.
- ``Response``: ``status``, ``headers`` (lower-case names -> str), ``await read_chunk()`` (``b""``
  at the end), ``await read_all()``, ``release()`` (back to the pool when fully read and
  keep-alive), ``close()``. Chunked transfer encoding is decoded by the parser; the bytes handed
  over are the body bytes exactly as the server sent them.
- Back-pressure: reading from the socket pauses while more than 1 MiB waits unread.
- Errors: ``UpstreamError`` (an ``OSError``) for connection failures, resets and malformed
  responses; ``asyncio.TimeoutError`` for the connect timeout. Plain ``http://`` only; the
  gateway's aiohttp session is used for anything else (``https://`` pods, sidecars).
"""

from __future__ import annotations

import asyncio
import collections
import httptools

_HIGH_WATER = 1 << 20


class UpstreamError(OSError):
    pass


def build_head(method: str, path: str, host: str, port: int, headers: dict[str, str], body_len: int) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {body_len}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class _Conn(asyncio.Protocol):
    __slots__ = (
        "transport", "parser", "pool", "key", "status", "headers", "_hname", "_headers_done",
        "_chunks", "_buffered", "_waiter", "_complete", "_closed", "_error", "_paused", "received", "keep_alive",
        "_timer",
    )

    def __init__(self, pool: Pool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self._closed = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: dict[str, str] = {}
        self._hname = b""
        self._headers_done = False
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._complete = False
        self._paused = False
        self.received = False
        self.keep_alive = False

    # --- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(UpstreamError(f"malformed response from upstream: {e}"))
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._cancel_timer()
        if not self._complete:
            self._fail(UpstreamError("upstream closed the connection" + (f" ({exc})" if exc else "")))
        self.pool._discard(self)

    # --- httptools callbacks --------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        # read it now: llhttp forgets it once the message is complete
        self.keep_alive = self.parser.should_keep_alive()
        self._headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self._complete = True
        self._wake()

    # --- helpers ----------------------------------------------------------------------------------
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _on_timeout(self) -> None:
        self._timer = None
        self._fail(asyncio.TimeoutError("upstream exchange exceeded its total timeout"))
        if self.transport is not None:
            self.transport.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(exc)

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


class Response:
    __slots__ = ("_conn", "status", "headers", "_done")

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers
        self._done = False

    async def read_chunk(self) -> bytes:
        """The next body bytes as they arrived; ``b""`` once the body is complete."""
        c = self._conn
        while True:
            if c._chunks:
                if len(c._chunks) == 1:
                    data = c._chunks.popleft()
                else:
                    data = b"".join(c._chunks)
                    c._chunks.clear()
                c._buffered = 0
                if c._paused and c.transport is not None:
                    c._paused = False
                    c.transport.resume_reading()
                return data
            if c._complete:
                return b""
            await c._wait()

    async def read_all(self) -> bytes:
        parts = []
        while True:
            chunk = await self.read_chunk()
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)

    @property
    def complete(self) -> bool:
        return self._conn._complete and not self._conn._chunks

    def release(self) -> None:
        """Return the connection to the pool if the body was read completely, else close it."""
        if self._done:
            return
        self._done = True
        c = self._conn
        c._cancel_timer()
        if c._complete and not c._chunks and not c._closed and c.keep_alive:
            self._conn.pool._put(c)
        else:
            self.close()

    def close(self) -> None:
        self._done = True
        c = self._conn
        c._cancel_timer()
        if c.transport is not None and not c._closed:
            c.transport.close()


class Pool:
    def __init__(self, connect_timeout_s: float = 2.0, max_idle_per_host: int = 256) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.max_idle_per_host = max_idle_per_host
        self._idle: dict[tuple[str, int], list[_Conn]] = {}

    async def _connect(self, key: tuple[str, int]) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Conn(self, key), key[0], key[1]), self.connect_timeout_s
            )
        except OSError as e:
            raise UpstreamError(f"cannot connect to {key[0]}:{key[1]} ({e.strerror or type(e).__name__})") from None
        return conn

    def _put(self, conn: _Conn) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self.max_idle_per_host:
            if conn.transport is not None:
                conn.transport.close()
            return
        conn._reset()
        idle.append(conn)

    def _discard(self, conn: _Conn) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    async def request(self, host: str, port: int, head: bytes, body: bytes, timeout_s: float | None = None) -> Response:
        """Send, wait for the headers. ``timeout_s`` bounds the whole exchange, body included:
        when it passes, the pending read raises ``asyncio.TimeoutError`` and the connection closes."""
        key = (host, port)
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn._closed or conn.transport is None or conn.transport.is_closing():
                continue
            try:
                return await self._send(conn, head, body, timeout_s)
            except UpstreamError:
                if conn.received:
                    raise
                # the server closed an idle keep-alive connection: retry once on a fresh one
                break
        return await self._send(await self._connect(key), head, body, timeout_s)

    async def _send(self, conn: _Conn, head: bytes, body: bytes, timeout_s: float | None) -> Response:
        assert conn.transport is not None
        if timeout_s is not None:
            conn._timer = asyncio.get_running_loop().call_later(timeout_s, conn._on_timeout)
        conn.transport.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            conn.transport.write(body)
        try:
            while not conn._headers_done:
                await conn._wait()
        except BaseException:
            conn._cancel_timer()
            if conn.transport is not None:
                conn.transport.close()
            raise
        return Response(conn)

    def close(self) -> None:
        for conns in self._idle.values():
            for c in conns:
                if c.transport is not None:
                    c.transport.close()
        self._idle.clear()

    def idle_count(self) -> dict[tuple[str, int], int]:
        return {k: len(v) for k, v in self._idle.items()}


def split_url(url: str) -> tuple[str, int, str]:
    """``http://host:port/prefix`` -> (host, port, path prefix without trailing slash)."""
    if not url.startswith("http://"):
        raise ValueError("the lean client speaks plain http:// only")
    rest = url[7:]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "80")
    return host.strip("[]"), int(port), ("/" + path).rstrip("/") if path else ""


__all__ = ["Pool", "Response", "UpstreamError", "build_head", "split_url"]
