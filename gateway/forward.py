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
   first body chunk has arrived, or — not streaming — its whole body, within the attempt's own
   limit (``gateway.deadlines``: a multiple of p's predicted TTFT, bounded, never beyond the
   request's budget ``timeouts.first_byte_s`` / ``total_s`` from its arrival). A status another
   pod may answer better (``failures.retryable_status``: 429, 502-504, a 500 that is not about
   the request itself) is a failure here; any other status is a reply, passed on unchanged;
4. ``gateway.relay`` sends it to the client;
5. ``pipeline.on_complete(p, ok, ticket, ttft)`` closes the books, whatever happened
   (``_finish``); a streamed answer's time from dispatch to first byte, with the ticket the
   dispatch returned, is one observation for the learned cost model (``scorer.costmodel``).

A failure in 2 or 3 is a typed ``UpstreamFailure`` whose policy decides: ``retry`` moves on to
the next pod (counted in ``loraroute_retries_total{reason}``), ``suspect`` also moves p to the end
of the fallback order for a while. Nothing has reached the client at that point, so a retry is
invisible to it. When no attempt is left, or the request's budget is spent, the last failure is
the answer (naming every pod tried).

Each attempt registers an ``AbortSignal`` in ``gw.inflight`` while it runs: when p's monitor
marks it unhealthy the attempt fails with ``PodUnhealthy`` at once if nothing was received yet
(and is retried), and the gateway's drain ends it with ``Draining``.

Other observers of finished attempts (shared routing state) hook into ``_finish`` beside the
cost model, where the attempt's pod, outcome and first-byte time are known; an admission check
sits before this loop in ``gateway.edge``.
"""

from __future__ import annotations

import asyncio
import time

from gateway import relay
from gateway.deadlines import attempt_limits, request_budget_s
from gateway.discovery import Endpoint
from gateway.errors import APIError, error_info
from gateway.exchange import Exchange, Send
from gateway.failures import BadStatus, EmptyStream, EnsureFailed, UpstreamFailure, retryable_status
from gateway.route import fallback_order
from gateway.service import Gateway
from gateway.upstream import AbortSignal, Limits, Reply
from scorer.costmodel import Ticket
from scorer.model import T_REMOTE, TIER_NAMES

_STATUS_BODY_S = 2.0  # how long a failing pod's error body is waited for


async def run(gw: Gateway, ex: Exchange, send: Send) -> None:
    """Try the candidates until one answers; the client gets that answer or the last failure."""
    attempts = ex.record.attempts
    server = ex.runtime.config.server
    limit = 1 + server.retries
    last: UpstreamFailure | None = None
    for pod_id in fallback_order(gw, ex.decision):
        if len(attempts) >= limit:
            break
        endpoint = gw.endpoint(pod_id)
        if endpoint is None:
            continue
        budget_s = request_budget_s(server.timeouts, ex.request.stream, ex.arrived)
        if budget_s <= 0 and last is not None:
            break
        attempts.append(pod_id)
        try:
            await _attempt(gw, ex, send, pod_id, endpoint, budget_s)
            return
        except UpstreamFailure as failure:
            last = failure
            if failure.suspect:
                gw.suspects.mark(pod_id, gw.suspect_hold_s())
            if not failure.retry:
                break
            gw.metrics.retry(failure.reason)
    if last is None:
        err = APIError(503, "no reachable pod for this request", code="no_pod_available")
    else:
        err = last.error(attempts)
    ex.pod = attempts[-1] if attempts else ""
    await relay.send_error(send, ex, err, pod=ex.pod or None)


async def _attempt(gw: Gateway, ex: Exchange, send: Send, pod_id: str, endpoint: Endpoint, budget_s: float) -> None:
    """One attempt (see the module docstring); raises ``UpstreamFailure`` before any byte is sent."""
    pipeline = ex.runtime.pipeline
    timeouts = ex.runtime.config.server.timeouts
    tier = ex.decision.stored_tier(pod_id)
    predicted = pipeline.predicted_ttft_s(ex.decision, pod_id)  # before the dispatch counts this request
    ticket = pipeline.on_dispatch(pod_id, ex.routing, time.time(), ex.decision)
    dispatched = time.perf_counter()
    ok = False
    abort = AbortSignal(pod_id)
    gw.inflight.add(abort)
    try:
        if _needs_ensure(gw, ex, pod_id, endpoint, tier):
            await _ensure(gw, ex, pod_id, endpoint, budget_s)
            budget_s = request_budget_s(timeouts, ex.request.stream, ex.arrived)
        if len(ex.record.attempts) == 1:
            _count_placement(gw, ex, pod_id, tier)
        limits = attempt_limits(timeouts, ex.request.stream, ex.request.max_tokens, predicted, budget_s, abort)
        reply, first = await _open(gw, ex, pod_id, endpoint.url, limits)
        abort.started = True
        try:
            ex.status = await relay.send_reply(gw, ex, send, reply, first)
        finally:
            reply.release()
        ex.pod = pod_id
        ok = ex.status < 400
    finally:
        gw.inflight.discard(abort)
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


async def _ensure(gw: Gateway, ex: Exchange, pod_id: str, endpoint: Endpoint, budget_s: float) -> None:
    adapter = ex.routing.adapter.name
    cfg = ex.runtime.config.ensure
    assert adapter is not None and endpoint.sidecar_url is not None  # _needs_ensure said so
    wait_s = max(0.0, min(cfg.timeout_s, budget_s))
    try:
        await asyncio.wait_for(gw.ensurer.ensure(pod_id, endpoint.sidecar_url, adapter), wait_s)
    except TimeoutError:
        raise EnsureFailed(pod_id, f"pod {pod_id!r} did not materialise adapter {adapter!r} within "
                                   f"{wait_s:g}s", permanent=False, timed_out=True) from None


async def _open(gw: Gateway, ex: Exchange, pod_id: str, url: str, limits: Limits) -> tuple[Reply, bytes]:
    """The pod's reply and its first body bytes (the whole body when not streaming), within
    ``limits`` (the upstream client keeps those timers)."""
    reply = await gw.upstream.open(pod_id, url, ex.kind.value, ex.body, limits, ex.routing.request_id)
    return reply, await _first(reply, whole=not ex.request.stream or reply.status != 200)


async def _first(reply: Reply, whole: bool) -> bytes:
    """Read the first chunk (or the whole body); a status another pod may answer better or an
    empty stream fails the attempt (any other error status is returned as the reply: final).
    The reply is released when it fails."""
    try:
        status = reply.status
        if status >= 500 or status == 429:
            try:
                body = await asyncio.wait_for(reply.read_all(), _STATUS_BODY_S)
            except (UpstreamFailure, TimeoutError):
                raise BadStatus(reply.pod_id, status, f"status {status}") from None
            detail, kind = error_info(body)
            if retryable_status(status, detail, kind):
                raise BadStatus(reply.pod_id, status, detail or f"status {status}")
            return body
        data = await reply.read_all() if whole else await reply.read_chunk()
        if not data and not whole:
            raise EmptyStream(reply.pod_id)
        return data
    except BaseException:
        reply.release()
        raise
