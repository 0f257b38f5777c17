"""Stage ``relay``: everything the gateway sends to the client — a pod's reply, or an error.

- ``send_reply(gw, ex, send, reply, first)``: a non-streamed reply (or any non-200) goes out in one
  piece with its ``content-length``; a 200 stream starts with the pod's first body chunk (already
  read by ``gateway.forward``, so a pod that fails before it could still be retried) and then
  passes every chunk through as it arrives. The ``model`` vLLM echoes is rewritten to the client's
  name (``gateway.echo``) in successful replies; nothing else is touched. A pod failing mid-stream
  ends the stream with ``data: {"error": {...}}`` and ``data: [DONE]`` (vLLM's own mid-stream error
  form; status counted as 502).
- ``send_error(send, ex, err, pod)``: an ``APIError`` in OpenAI's shape.

Headers: ``x-loraroute-pod`` on every routed response, ``x-loraroute-explain`` when asked for
(compact JSON, the 16 best candidates and 16 filtered pods at most, ``state`` when the view was
degraded), the pod's ``x-request-id``.
"""

from __future__ import annotations

import logging
import time

import orjson

from gateway.errors import APIError
from gateway.exchange import Exchange, Send
from gateway.failures import StreamBroken, UpstreamFailure
from gateway.service import Gateway
from gateway.sharing import StateSharing
from gateway.upstream import Reply
from scorer.model import Decision
from scorer.sharing import peer_inflight

log = logging.getLogger("loraroute.gateway")

_JSON = b"application/json"

#: candidates (best first) and filtered pods carried in x-loraroute-explain; the rest are counted
#: (headers must stay small: common clients refuse header blocks above 16-64 KiB). The full
#: explanation is in GET /admin/decisions.
EXPLAIN_HEADER_MAX = 16


def explain_header(decision: Decision, state_note: str | None = None, sharing: StateSharing | None = None) -> bytes:
    """The decision as compact JSON; ``state_note`` (``"state"``) says when it was made on a
    degraded view (the state store unreachable); with shared routing state also ``sharing``: the
    peers that counted (replica -> age in ms) and the requests they have in flight per pod."""
    data = decision.explain()
    if state_note:
        data["state"] = state_note
    if sharing is not None:
        data["sharing"] = {"peers": sharing.describe()["peers"],
                           "peer_inflight": dict(peer_inflight(sharing.local()))}
    cands, filtered = data["candidates"], data["filtered"]
    if len(cands) > EXPLAIN_HEADER_MAX:
        data["candidates"] = cands[:EXPLAIN_HEADER_MAX]
        data["candidates_omitted"] = len(cands) - EXPLAIN_HEADER_MAX
    if len(filtered) > EXPLAIN_HEADER_MAX:
        data["filtered"] = dict(list(filtered.items())[:EXPLAIN_HEADER_MAX])
        data["filtered_omitted"] = len(filtered) - EXPLAIN_HEADER_MAX
    return orjson.dumps(data)


async def send_error(send: Send, ex: Exchange, err: APIError, pod: str | None = None) -> None:
    """``err`` as the whole response; ``ex.status`` records it."""
    body = err.body()
    headers = [(b"content-type", _JSON), (b"content-length", str(len(body)).encode())]
    if pod:
        headers.append((b"x-loraroute-pod", pod.encode("latin-1")))
    if err.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    headers.extend(err.headers)
    ex.status = err.status
    ex.responded = True
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_reply(gw: Gateway, ex: Exchange, send: Send, reply: Reply, first: bytes) -> int:
    """Relay ``reply`` (whose first body bytes are ``first``) to the client; returns the status
    counted for the request."""
    pod = reply.pod_id
    headers = [
        (b"content-type", reply.headers.get("content-type", "application/json").encode("latin-1")),
        (b"x-loraroute-pod", pod.encode("latin-1")),
    ]
    if ex.explain:
        headers.append((b"x-loraroute-explain", explain_header(ex.decision, ex.record.state_note, gw.sharing)))
    rid = reply.headers.get("x-request-id")
    if rid:
        headers.append((b"x-request-id", rid.encode("latin-1")))
    echo = ex.resolved.echo
    if not (ex.request.stream and reply.status == 200):
        if echo is not None and reply.status < 300:
            first = echo.body(first)
        headers.append((b"content-length", str(len(first)).encode()))
        ex.responded = True
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": first, "more_body": False})
        return reply.status

    headers.append((b"cache-control", b"no-cache"))
    held = b""
    if echo is not None:
        first, held = echo.chunk(first)
    ex.responded = True
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": first, "more_body": True})
    ex.first_byte_at = time.perf_counter()
    ex.ttft_s = ex.first_byte_at - ex.arrived
    gw.metrics.ttft(pod, ex.base_label, ex.adapter_label, ex.ttft_s)
    return await _stream_rest(ex, send, reply, first, held)


async def _stream_rest(ex: Exchange, send: Send, reply: Reply, tail: bytes, held: bytes) -> int:
    """Pass the rest of the stream through; ``tail``: the last bytes sent, ``held``: bytes the
    model echo held back."""
    echo = ex.resolved.echo
    status = 200
    read = reply.read_chunk
    try:
        while chunk := await read():
            if echo is not None:
                chunk, held = echo.chunk(held + chunk)
                if not chunk:
                    continue
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            tail = chunk
    except UpstreamFailure as cause:
        broken = StreamBroken(reply.pod_id, cause)
        log.warning("%s", broken.message)
        status = broken.status
        sep = b"" if (held or tail).endswith(b"\n\n") else b"\n\n"
        await send({"type": "http.response.body", "body": held + sep + broken.error().sse_event(), "more_body": True})
        held = b""
    await send({"type": "http.response.body", "body": held, "more_body": False})
    return status
