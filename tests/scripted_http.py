"""A tiny HTTP/1.1 server on 127.0.0.1 whose every answer is scripted byte for byte, for tests that
need a pod (or a sidecar) to misbehave in one exact way: a status, a body cut short, a pause before
the first byte, a connection closed mid-stream.

``ScriptedServer(respond)`` calls ``respond(request) -> Script`` for each request it reads
(``Request``: method, path, lower-case headers, body) and writes the script's pieces (bytes, or a
float: seconds to pause), then keeps the connection for the next request unless ``close``.
``async with server:`` binds a free port (``server.url``) and stops it; ``requests`` lists what
arrived, ``connections`` counts accepted connections and ``eofs`` those the client closed while
the server was still writing (a client that went away).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Script:
    pieces: list[bytes | float] = field(default_factory=list)
    close: bool = False


def head(status: int, headers: dict[str, str], reason: str = "X") -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def json_reply(obj: Any, status: int = 200) -> Script:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return Script([head(status, {"Content-Type": "application/json", "Content-Length": str(len(body))}) + body])


def sse_reply(events: list[bytes], pause_s: float = 0.0, cut_after: int | None = None) -> Script:
    """A chunked SSE stream; ``cut_after`` events, the connection closes without the final chunk."""
    pieces: list[bytes | float] = [head(200, {"Content-Type": "text/event-stream", "Transfer-Encoding": "chunked"})]
    for i, event in enumerate(events):
        if cut_after is not None and i == cut_after:
            return Script(pieces, close=True)
        if pause_s and i:
            pieces.append(pause_s)
        pieces.append(b"%x\r\n%s\r\n" % (len(event), event))
    pieces.append(b"0\r\n\r\n")
    return Script(pieces)


class ScriptedServer:
    def __init__(self, respond: Callable[[Request], Script]) -> None:
        self.respond = respond
        self.requests: list[Request] = []
        self.connections = 0
        self.eofs = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> ScriptedServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                raw = await reader.readuntil(b"\r\n\r\n")
                lines = raw.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                request = Request(method, path, headers, body)
                self.requests.append(request)
                script = self.respond(request)
                for piece in script.pieces:
                    if isinstance(piece, float):
                        await asyncio.sleep(piece)
                        if reader.at_eof():
                            self.eofs += 1
                            return
                    else:
                        writer.write(piece)
                        await writer.drain()
                if script.close:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
