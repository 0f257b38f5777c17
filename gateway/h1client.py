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
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from gateway.h1conn import Connection, NoFirstByte, StreamIdle, UpstreamError

_FORBIDDEN = frozenset("\r\n\x00")


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
