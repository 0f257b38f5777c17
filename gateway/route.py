"""Stage ``route``: the checked model → a routing request → a decision, and the fallback order.

- ``resolve(ex)``: the ``model`` against the allowlist and the tenant (400/403/404, cached per
  tenant and name by the policy); the body for the pod with ``model`` rewritten to the name vLLM
  knows (the request JSON is small and re-encoded with orjson; the response never is; a body
  nested deeper than ``MAX_JSON_DEPTH`` levels cannot be, and is a 400 saying so); the prompt
  text hashed into prefix blocks (the first ``server.prefix_max_chars`` characters).
- ``decide(gw, ex)``: ``pipeline.pick`` among the routable pods (no I/O, no lock, no await between
  reading the view and the decision), their freshness judged against the state store's last
  sign of life (``gateway.store_watch``: during an outage the last view does not age); the
  decision goes into the ring buffer behind ``GET /admin/decisions``, with a note when it was
  made on a degraded view. No candidate: a 503 naming why each pod was filtered (the first 8).
- ``fallback_order(gw, decision)``: the picked pod, then — computed only if a retry needs them —
  the other candidates best first, with the pods that just failed to connect moved to the end.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator, Mapping

import orjson

from gateway.errors import APIError
from gateway.exchange import Exchange
from gateway.parse import MAX_JSON_DEPTH
from gateway.policy import Resolved
from gateway.service import DecisionRecord, Gateway
from scorer.model import Decision, PodState, RoutingRequest


# ids for requests that come without a usable x-request-id: unique per process start (random
# prefix) and per request (a counter); cheaper than asking the kernel for random bytes each time
_ID_PREFIX = os.urandom(5).hex()
_ID_SEQ = itertools.count()


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_SEQ) & 0xFFFFFF:06x}"


def resolve(ex: Exchange) -> None:
    """Fill ``ex.resolved``, the metric labels, ``ex.body`` and ``ex.routing``. Raises ``APIError``."""
    rt = ex.runtime
    req = ex.request
    resolved = rt.policy.resolve(ex.tenant, req.model)
    ex.resolved = resolved
    ex.base_label = resolved.base_label
    ex.adapter_label = resolved.adapter_label if rt.policy.adapter_labels else ""
    payload = req.payload
    payload["model"] = resolved.ref.vllm_model
    try:
        ex.body = orjson.dumps(payload)
    except orjson.JSONEncodeError:  # the one way a decoded body fails to encode: its depth
        raise APIError(400, f"the request body is nested more than {MAX_JSON_DEPTH} levels deep; "
                            "flatten it", code="json_too_deep") from None
    text = req.text
    limit = rt.config.server.prefix_max_chars
    if len(text) > limit:
        text = text[:limit]
    ref = resolved.ref
    ex.routing = RoutingRequest(
        adapter=ref,
        prompt_tokens=req.tokens,
        max_tokens=req.max_tokens,
        prefix_hashes=rt.pipeline.hash_prompt(ref.base, ref.name, text) if text else (),
        session_key=ex.session,
        request_id=ex.request_id or new_request_id(),
    )


def decide(gw: Gateway, ex: Exchange) -> None:
    """Fill ``ex.decision`` and ``ex.record`` (already in the ring buffer). Raises ``APIError(503)``
    (recorded too) when no pod can take the request."""
    pods = gw.pods
    now = time.time()
    watch = gw.store_watch
    d0 = time.perf_counter()
    decision = ex.runtime.pipeline.pick(ex.routing, pods, now, watch.reference(now))
    gw.metrics.decision.observe(time.perf_counter() - d0)
    tenant = ex.tenant.name if ex.tenant is not None else None
    model = ex.resolved.client_name
    note = watch.note(now) if watch.degraded else None
    if decision.pod_id is None:
        gw.record(DecisionRecord(now, ex.routing.request_id, model, tenant, decision, [], 503, note), ex.adapter_label)
        raise no_pod_error(pods, decision, ex.resolved, note)
    gw.metrics.decided(decision.policy, decision.pod_id)
    ex.decision = decision
    ex.record = DecisionRecord(now, ex.routing.request_id, model, tenant, decision, [], state_note=note)
    gw.record(ex.record, ex.adapter_label)


def no_pod_error(pods: Mapping[str, PodState], decision: Decision, resolved: Resolved,
                 note: str | None = None) -> APIError:
    if not pods:
        msg = ("no pod is available: discovery found none, or none has published its state yet; "
               "check GET /admin/pods")
    else:
        why = "; ".join(f"{p}: {r}" for p, r in sorted(decision.filtered.items())[:8])
        msg = f"no pod can serve model {resolved.client_name!r} right now ({why or decision.reason})"
    if note:
        msg = f"{msg}; {note}"
    return APIError(503, msg, code="no_pod_available")


def fallback_order(gw: Gateway, decision: Decision) -> Iterator[str]:
    """See the module docstring."""
    return gw.suspects.order(_ranked(decision))


def _ranked(decision: Decision) -> Iterator[str]:
    picked = decision.pod_id
    if picked is None:
        return
    yield picked
    for pod_id in decision.ranked_ids():  # sorted only when a retry asks for the next one
        if pod_id != picked:
            yield pod_id
