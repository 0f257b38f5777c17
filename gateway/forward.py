"""Stage ``forward``: the attempt loop — dispatch, ensure, open the pod's reply, retry, give up.

Attempts = 1 + ``server.retries``, over the decision's candidates in fallback order
(``gateway.route.fallback_order``). One attempt on pod p:

1. ``pipeline.on_dispatch(p)``: the router's own books count the request on p (in flight, prefix
   blocks, the adapter as incoming, the pending work) — before anything can fail, so a burst
   sees it at once;
2. when p's own state does not hold the adapter anywhere (``Decision.stored_tier`` is REMOTE), p
   has a sidecar and ``ensure`` is on, ``POST {sidecar}/adapters/{name}/ensure`` (shared by
   concurrent requests, remembered for ``ensure.remember_s``; at most ``ensure.timeout_s``);
3. the request goes to p; the reply counts as opened once its status is in and — streaming — its
   first body chunk has arrived (all within ``timeouts.first_byte_s``), or — not streaming — its
   whole body (within ``timeouts.total_s``). A 5xx is a failure here, any other status a reply;
4. ``gateway.relay`` sends it to the client;
5. ``pipeline.on_complete(p, ok, ticket, ttft)`` closes the books, whatever happened
   (``_finish``); a streamed answer's time from dispatch to first byte, with the ticket the
   dispatch returned, is one observation for the learned cost model (``scorer.costmodel``).

A failure in 2 or 3 is a typed ``UpstreamFailure`` whose policy decides: ``retry`` moves on to
the next pod (counted in ``loraroute_retries_total{reason}``), ``suspect`` also moves p to the end
of the fallback order for a while. Nothing has reached the client at that point, so a retry is
invisible to it. When no attempt is left, the last failure is the answer (naming every pod tried).

Rooms for what comes next: a per-request deadline bounds this loop (``Exchange.arrived`` is the
start), an admission check sits before it in ``gateway.edge``, and other observers of finished
attempts (shared routing state) hook into ``_finish`` beside the cost model, where the attempt's
pod, outcome and first-byte time are known.
"""

from __future__ import annotations

import asyncio
import time

from gateway import relay
from gateway.discovery import Endpoint
from gateway.errors import APIError, error_message
from gateway.exchange import Exchange, Send
from gateway.failures import BadStatus, EmptyStream, EnsureFailed, UpstreamFailure
from gateway.route import fallback_order
from gateway.service import Gateway
from gateway.upstream import Reply
from scorer.costmodel import Ticket
from scorer.model import T_REMOTE, TIER_NAMES

_STATUS_BODY_S = 2.0  # how long a failing pod's error body is waited for


async def run(gw: Gateway, ex: Exchange, send: Send) -> None:
    """Try the candidates until one answers; the client gets that answer or the last failure."""
    attempts = ex.record.attempts
    limit = 1 + ex.runtime.config.server.retries
    last: UpstreamFailure | None = None
    for pod_id in fallback_order(gw, ex.decision):
        if len(attempts) >= limit:
            break
        endpoint = gw.endpoint(pod_id)
        if endpoint is None:
            continue
        attempts.append(pod_id)
        try:
            await _attempt(gw, ex, send, pod_id, endpoint)
            return
        except UpstreamFailure as failure:
            last = failure
            if not failure.retry:
                break
            gw.metrics.retry(failure.reason)
            if failure.suspect:
                gw.suspects.mark(pod_id)
    if last is None:
        err = APIError(503, "no reachable pod for this request", code="no_pod_available")
    else:
        err = last.error(attempts)
    ex.pod = attempts[-1] if attempts else ""
    await relay.send_error(send, ex, err, pod=ex.pod or None)


async def _attempt(gw: Gateway, ex: Exchange, send: Send, pod_id: str, endpoint: Endpoint) -> None:
    """One attempt (see the module docstring); raises ``UpstreamFailure`` before any byte is sent."""
    pipeline = ex.runtime.pipeline
    tier = ex.decision.stored_tier(pod_id)
    ticket = pipeline.on_dispatch(pod_id, ex.routing, time.time())
    dispatched = time.perf_counter()
    ok = False
    try:
        if _needs_ensure(gw, ex, pod_id, endpoint, tier):
            await _ensure(gw, ex, pod_id, endpoint)
        if len(ex.record.attempts) == 1:
            _count_placement(gw, ex, pod_id, tier)
        reply, first = await _open(gw, ex, pod_id, endpoint.url)
        try:
            ex.status = await relay.send_reply(gw, ex, send, reply, first)
        finally:
            reply.release()
        ex.pod = pod_id
        ok = ex.status < 400
    finally:
        _finish(ex, pod_id, ok, ticket, dispatched)


def _finish(ex: Exchange, pod_id: str, ok: bool, ticket: Ticket | None, dispatched: float) -> None:
    """The attempt on ``pod_id`` is over (``ok`` False: failed, retried or cancelled). A streamed
    answer's time from this attempt's dispatch to its first byte (the pod's TTFT as the router
    sees it: sidecar ensure, network and engine) is what the pipeline's cost model learns from."""
    first = ex.first_byte_at
    ttft = first - dispatched if ok and first is not None and first >= dispatched else None
    ex.runtime.pipeline.on_complete(pod_id, ex.routing, ok, ticket, ttft)


def _count_placement(gw: Gateway, ex: Exchange, pod_id: str, tier: int | None) -> None:
    """Where the routed-to pod held the adapter, and how much of the prompt it was believed to cache."""
    gw.metrics.residency(pod_id, TIER_NAMES[tier] if tier is not None else "remote")
    blocks = len(ex.routing.prefix_hashes)
    if blocks:
        gw.metrics.prefix(pod_id, blocks, ex.decision.matched_blocks(pod_id))


def _needs_ensure(gw: Gateway, ex: Exchange, pod_id: str, endpoint: Endpoint, tier: int | None) -> bool:
    """The pod's own state does not hold the adapter, it has a sidecar, and no recent ensure did it."""
    adapter = ex.routing.adapter.name
    cfg = ex.runtime.config.ensure
    return not (
        adapter is None or endpoint.sidecar_url is None or not cfg.enabled
        or (tier is not None and tier != T_REMOTE)
        or gw.ensurer.recently_ensured(pod_id, adapter, cfg.remember_s)
    )


async def _ensure(gw: Gateway, ex: Exchange, pod_id: str, endpoint: Endpoint) -> None:
    adapter = ex.routing.adapter.name
    cfg = ex.runtime.config.ensure
    assert adapter is not None and endpoint.sidecar_url is not None  # _needs_ensure said so
    try:
        await asyncio.wait_for(gw.ensurer.ensure(pod_id, endpoint.sidecar_url, adapter), cfg.timeout_s)
    except TimeoutError:
        raise EnsureFailed(pod_id, f"pod {pod_id!r} did not materialise adapter {adapter!r} within "
                                   f"{cfg.timeout_s:g}s", permanent=False, timed_out=True) from None


async def _open(gw: Gateway, ex: Exchange, pod_id: str, url: str) -> tuple[Reply, bytes]:
    """The pod's reply and its first body bytes (the whole body when not streaming); a stream's
    first byte is bounded by ``timeouts.first_byte_s`` (the upstream client keeps that timer)."""
    stream = ex.request.stream
    reply = await gw.upstream.open(pod_id, url, ex.kind.value, ex.body, ex.routing.request_id, first_byte=stream)
    return reply, await _first(reply, whole=not stream or reply.status != 200)


async def _first(reply: Reply, whole: bool) -> bytes:
    """Read the first chunk (or the whole body); a 5xx or an empty stream fails the attempt.
    The reply is released when it fails."""
    try:
        if reply.status >= 500:
            try:
                detail = error_message(await asyncio.wait_for(reply.read_all(), _STATUS_BODY_S))
            except (UpstreamFailure, TimeoutError):
                detail = ""
            raise BadStatus(reply.pod_id, reply.status, detail or f"status {reply.status}")
        data = await reply.read_all() if whole else await reply.read_chunk()
        if not data and not whole:
            raise EmptyStream(reply.pod_id)
        return data
    except BaseException:
        reply.release()
        raise
