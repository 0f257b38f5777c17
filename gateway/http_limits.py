"""The gateway's HTTP/1.1 server protocol: uvicorn's httptools protocol with bounded request heads.

uvicorn's httptools protocol accepts request heads of any size and header count (llhttp has no
limit of its own): a 1 MiB header or 2,000 headers were served. ``bounded_protocol(limits)``
returns a subclass that counts the request line and every header as they are parsed and answers
**431** ``request_header_fields_too_large`` (OpenAI's error shape, ``Connection: close``) once a
head exceeds ``server.max_header_bytes`` or carries more than ``server.max_headers`` headers, before
any route sees the request; bytes of an unfinished head are counted as they arrive too, so one
that never ends is cut off at the limit (plus one read). A request the parser cannot read is
answered 400 in the same shape (uvicorn's own answer is plain text). ``limits()`` is read at the
start of each request, so both limits follow a config reload.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.errors import APIError

#: bytes a read may add beyond the head limit before an unfinished head is cut off (the body
#: that arrives in the same read as the end of the head is counted with it)
_READ_SLACK = 1 << 20


def _raw_error(status: int, phrase: bytes, err: APIError) -> bytes:
    body = err.body()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, phrase, len(body))) + body


def bounded_protocol(limits: Callable[[], tuple[int, int]]) -> type[HttpToolsProtocol]:
    """The protocol class for uvicorn's ``http=``; ``limits()`` -> (max head bytes, max headers)."""

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._head_bytes = 0  # counted by the parser callbacks
            self._header_count = 0
            self._unparsed = 0  # received while a head is incomplete
            self._in_head = True
            self._refused = False
            self._max_bytes, self._max_headers = limits()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self._in_head:
                self._unparsed += len(data)
                if self._unparsed > self._max_bytes + _READ_SLACK:
                    self._too_large(f"the request head is over the limit of {self._max_bytes} bytes")
                    return
            super().data_received(data)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._max_bytes, self._max_headers = limits()
            self._head_bytes = 0
            self._header_count = 0
            self._in_head = True

        def on_url(self, url: bytes) -> None:
            self._head_bytes += len(url)
            if self._head_bytes <= self._max_bytes:
                super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._head_bytes += len(name) + len(value) + 4
            self._header_count += 1
            if self._head_bytes <= self._max_bytes and self._header_count <= self._max_headers:
                super().on_header(name, value)  # (beyond a limit: counted, not kept; refused below)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._unparsed = 0
            if self._head_bytes > self._max_bytes:
                self._too_large(f"the request line and headers are {self._head_bytes} bytes, over the limit of "
                                f"{self._max_bytes} bytes")
                return
            if self._header_count > self._max_headers:
                self._too_large(f"the request has more than {self._max_headers} headers")
                return
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._refused:
                super().on_body(body)

        def on_message_complete(self) -> None:
            self._in_head = True
            self._unparsed = 0
            if not self._refused:
                super().on_message_complete()

        def _too_large(self, why: str) -> None:
            self._refused = True
            err = APIError(431, f"{why}; send fewer or smaller headers", code="request_header_fields_too_large")
            self.transport.write(_raw_error(431, b"Request Header Fields Too Large", err))
            self.transport.close()

        def send_400_response(self, msg: str) -> None:
            self._refused = True
            err = APIError(400, "the request is not valid HTTP/1.1", code="invalid_http")
            self.transport.write(_raw_error(400, b"Bad Request", err))
            self.transport.close()

    return BoundedHttpToolsProtocol
