"""Each attempt's time limits: from the pod's predicted TTFT, bounded, within the request's budget.

A pod that stops answering must not hold a request for the whole ``timeouts.first_byte_s``; a
pod that is legitimately slow (a long prompt, a deep queue, an adapter to load) must not be cut
off. The prediction knows the difference: ``estimated-ttft`` prices the queue ahead of the
request, the adapter's load by tier and rank and the uncached prefill from the pod's own state
(``Pipeline.predicted_ttft_s``), so the limit follows it::

    budget       = arrival + first_byte_s (streaming) or + total_s (not streaming) − now
    first byte   = min(budget, max(first_byte_floor_s, first_byte_factor × predicted))
    whole reply  = min(budget, first byte + max_tokens × token_s)     (not streaming; max_tokens
                                                                       absent: the budget)

Without a prediction (a pipeline without ``estimated-ttft``, ``first_byte_factor: 0``) the first
byte gets the whole budget, as before. The floor keeps what the prediction cannot see (an eager
engine's first LoRA kernel compile, ≈ 3.7 s on a real vLLM) well inside the limit. Mid-stream,
``idle_s`` bounds each silence (``idle_unhealthy_s`` once the pod's monitor marks it unhealthy).
The budget also bounds the ensure wait (``ensure.timeout_s``) and the attempt loop itself: no
attempt starts once it is spent.
"""

from __future__ import annotations

import time

from gateway.config import Timeouts
from gateway.upstream import AbortSignal, Limits


def request_budget_s(timeouts: Timeouts, stream: bool, arrived: float, now: float | None = None) -> float:
    """Seconds left of the request's budget before its first byte (its whole reply when not
    streaming); ``arrived`` and ``now`` are ``time.perf_counter()`` values."""
    limit = timeouts.first_byte_s if stream else timeouts.total_s
    return limit - ((time.perf_counter() if now is None else now) - arrived)


def first_byte_s(timeouts: Timeouts, predicted_s: float | None, budget_s: float) -> float:
    """The first-byte limit of one attempt (see the module docstring)."""
    if predicted_s is None or timeouts.first_byte_factor <= 0:
        return budget_s
    return min(budget_s, max(timeouts.first_byte_floor_s, timeouts.first_byte_factor * predicted_s))


def attempt_limits(timeouts: Timeouts, stream: bool, max_tokens: int, predicted_s: float | None,
                   budget_s: float, abort: AbortSignal) -> Limits:
    """The limits of one attempt with ``budget_s`` left (see the module docstring)."""
    first = first_byte_s(timeouts, predicted_s, budget_s)
    if stream:
        return Limits(timeouts.total_s, first, timeouts.idle_s, abort)
    whole = min(budget_s, first + max_tokens * timeouts.token_s) if max_tokens > 0 else budget_s
    return Limits(whole, None, None, abort)
