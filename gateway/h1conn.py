"""One keep-alive HTTP/1.1 connection to a pod: ``gateway.h1client``'s ``asyncio.Protocol``.

The ``httptools`` parser's callbacks collect the status, the headers and the body chunks; a read
waits on one future, woken by arriving bytes, the end of the message, a timer or ``abort``. Three
timers (one armed at a time): ``timeout_s`` for the whole exchange, ``first_byte_s`` until the
first body byte, ``idle_s`` for each silence after it (re-armed at the last arrival, not per
chunk). Reading from the socket pauses while more than 1 MiB waits unread. The errors are the
client's: ``UpstreamError`` (an ``OSError``) for failures, resets, malformed or short responses;
``NoFirstByte`` and ``StreamIdle`` (both ``asyncio.TimeoutError``) for their timers. The pool
and the response that use a connection are in ``gateway.h1client``.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Protocol

import httptools

_HIGH_WATER = 1 << 20


class UpstreamError(OSError):
    pass


class NoFirstByte(asyncio.TimeoutError):
    """No body byte (nor the end of a body-less response) within ``first_byte_s``."""


class StreamIdle(asyncio.TimeoutError):
    """No body byte for ``idle_s`` after the first one."""

    def __init__(self, idle_s: float) -> None:
        super().__init__(f"no response body byte for {idle_s:g}s")
        self.idle_s = idle_s


class ConnectionOwner(Protocol):
    """What a connection tells its pool (``gateway.h1client.Pool``)."""

    def put(self, conn: Connection) -> None: ...

    def discard(self, conn: Connection) -> None: ...


class Connection(asyncio.Protocol):
    """One keep-alive connection to ``key`` = (host, port), parsing responses with httptools."""

    __slots__ = (
        "transport", "parser", "pool", "key", "status", "headers", "headers_done", "_chunks", "_buffered",
        "_waiter", "_complete", "closed", "_error", "_paused", "received", "_keep_alive", "_timer", "_loop",
        "_first_timer", "_idle_s", "_idle_timer", "_last_rx",
    )

    def __init__(self, pool: ConnectionOwner, key: tuple[str, int]) -> None:
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
        self._cancel_body_timers()
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
        self._cancel_body_timers()
        self._idle_s = None

    def _cancel_body_timers(self) -> None:
        """The first-byte and idle timers (the body is complete, or the exchange is over)."""
        if self._first_timer is not None:
            self._first_timer.cancel()
            self._first_timer = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

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


__all__ = ["Connection", "ConnectionOwner", "NoFirstByte", "StreamIdle", "UpstreamError"]
