"""Typed upstream failures: what can go wrong between the gateway and a pod, with its policy.

Every failure of one attempt is an ``UpstreamFailure``. Its class says what happened and carries
what the attempt loop (``gateway.forward``) needs to act on it without comparing strings:

==================  ==========  =====  =======  =====================================================
class               ``reason``  retry  suspect  client sees when it is the last one (status, code)
==================  ==========  =====  =======  =====================================================
ConnectFailed       connect     yes    yes      502 ``upstream_unreachable`` (refused, reset, dropped)
FirstByteTimeout    timeout     yes    yes      504 ``upstream_timeout`` (no response in time)
PodUnhealthy        unhealthy   yes    yes      503 ``upstream_unhealthy`` (its monitor gave up on it)
BadStatus           status      yes    no       502 ``upstream_error`` (a 5xx another pod may not
                                                have, [2]; the pod's own message)
EmptyStream         empty       yes    no       502 ``upstream_error`` (a stream closed before any byte)
EnsureFailed        ensure      [1]    no       [1]
StreamStalled       stalled     no     yes      only mid-stream (nothing for ``timeouts.idle_s``)
Draining            draining    no     no       only mid-stream (the gateway is shutting down)
StreamBroken        stream      no     no       an SSE error event, then ``[DONE]`` (already streaming)
==================  ==========  =====  =======  =====================================================

[1] the sidecar could not materialise the adapter: for a reason that holds on every pod (the
adapter is missing or invalid in the store, ``permanent``) no other pod is tried and the client
gets 502 ``adapter_ensure_failed``; otherwise the next pod is tried and the last answer is 503
(``adapter_ensure_failed``, or ``adapter_ensure_timeout``).

[2] only what another pod can fix is retried (``retryable_status``): 429, 502, 503, 504 and a
500 — unless the 500's body shows the pod rejected the request itself (vLLM's "LoRA rank … is
greater than max_lora_rank", a validation error, a ``BadRequestError``): that answer is final and
reaches the client unchanged, like every 4xx, instead of being tried on every pod in turn.

``reason`` is the ``loraroute_retries_total`` label; ``retry`` whether the next-best pod may be
tried (only ever before anything reached the client); ``suspect`` whether the pod goes to the end
of the fallback order for a while (it may be down). The two HTTP clients' own errors become these
in one place, ``gateway.upstream``.
"""

from __future__ import annotations

from gateway.errors import APIError


class UpstreamFailure(Exception):
    """One attempt on one pod failed. ``error()`` is what the client gets if no attempt succeeds."""

    reason = "upstream"
    retry = True
    suspect = False
    status = 502
    code = "upstream_error"

    def __init__(self, pod_id: str, message: str) -> None:
        super().__init__(message)
        self.pod_id = pod_id
        self.message = message

    def error(self, tried: list[str] | None = None) -> APIError:
        """The client-facing error; ``tried`` (more than one pod) is named in the message."""
        message = self.message if not tried or len(tried) < 2 else f"{self.message} (tried {', '.join(tried)})"
        return APIError(self.status, message, code=self.code)


class ConnectFailed(UpstreamFailure):
    """The pod refused the connection, reset it or closed it before the response was complete."""

    reason = "connect"
    suspect = True
    code = "upstream_unreachable"

    def __init__(self, pod_id: str, detail: str) -> None:
        super().__init__(pod_id, f"pod {pod_id!r} is unreachable or dropped the connection ({detail})")


class FirstByteTimeout(UpstreamFailure):
    """No response (streaming: no first body chunk) within the limit."""

    reason = "timeout"
    suspect = True
    status = 504
    code = "upstream_timeout"

    def __init__(self, pod_id: str, limit_s: float) -> None:
        super().__init__(pod_id, f"pod {pod_id!r} sent no response within {limit_s:g}s")


class PodUnhealthy(UpstreamFailure):
    """The pod's monitor marked it unhealthy (or it left the view) while this attempt waited
    for its reply: nothing had reached the client, so the next pod is tried at once."""

    reason = "unhealthy"
    suspect = True
    status = 503
    code = "upstream_unhealthy"

    def __init__(self, pod_id: str) -> None:
        super().__init__(pod_id, f"pod {pod_id!r} stopped answering its health checks while the request waited")


#: statuses another pod may answer better: overload (429, 503), a dead or failing engine (500,
#: see ``retryable_status``), a proxy in front of the pod (502, 504)
RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
#: error ``type`` values that say the pod rejected the request itself
_REJECTION_TYPES = frozenset({"BadRequestError", "InvalidUserInput", "Bad Request", "NotFoundError",
                              "UnprocessableEntityError", "ValidationError"})
#: phrases of vLLM's 500s that are about the request, not the pod (real-vllm-0.25.md: a rank above
#: --max-lora-rank is a 500 "LoRA rank 128 is greater than max_lora_rank 64.")
_REJECTION_PHRASES = ("greater than max_lora_rank", "validation error")


def retryable_status(status: int, message: str, kind: str | None) -> bool:
    """Whether a pod's ``status`` with this error ``message`` and ``type`` is worth another pod."""
    if status not in RETRIED_STATUSES:
        return False
    if status != 500:
        return True
    if kind in _REJECTION_TYPES:
        return False
    lowered = message.lower()
    return not any(phrase in lowered for phrase in _REJECTION_PHRASES)


class BadStatus(UpstreamFailure):
    """The pod answered with a status another pod may not have (``retryable_status``); ``detail``
    is its own error message."""

    reason = "status"

    def __init__(self, pod_id: str, status: int, detail: str) -> None:
        super().__init__(pod_id, f"pod {pod_id!r} failed: {detail}")
        self.upstream_status = status


class EmptyStream(UpstreamFailure):
    """A streaming response that ended before its first body byte."""

    reason = "empty"

    def __init__(self, pod_id: str) -> None:
        super().__init__(pod_id, f"pod {pod_id!r} closed the stream before sending anything")


class EnsureFailed(UpstreamFailure):
    """The pod's sidecar did not materialise the adapter (see the module docstring)."""

    reason = "ensure"
    code = "adapter_ensure_failed"

    def __init__(self, pod_id: str, message: str, *, permanent: bool, timed_out: bool = False) -> None:
        super().__init__(pod_id, message)
        self.retry = not permanent
        self.status = 502 if permanent else 503
        if timed_out:
            self.code = "adapter_ensure_timeout"


class StreamStalled(UpstreamFailure):
    """A stream that had started sent nothing for ``idle_s`` seconds (``timeouts.idle_s``, or
    ``timeouts.idle_unhealthy_s`` once the pod's monitor marked it unhealthy)."""

    reason = "stalled"
    retry = False
    suspect = True
    status = 504
    code = "upstream_timeout"

    def __init__(self, pod_id: str, idle_s: float) -> None:
        super().__init__(pod_id, f"pod {pod_id!r} sent nothing for {idle_s:g}s")


class Draining(UpstreamFailure):
    """The gateway is shutting down and the drain deadline has passed for this stream."""

    reason = "draining"
    retry = False
    status = 503
    code = "shutting_down"

    def __init__(self, pod_id: str) -> None:
        super().__init__(pod_id, "the gateway is shutting down; retry the request")


class StreamBroken(UpstreamFailure):
    """The pod failed after the response had started: the stream ends with an error event."""

    reason = "stream"
    retry = False
    code = "upstream_stream_error"

    def __init__(self, pod_id: str, cause: UpstreamFailure) -> None:
        if isinstance(cause, Draining):
            message = f"{cause.message}; the response from pod {pod_id!r} is incomplete"
        elif isinstance(cause, StreamStalled):
            message = f"{cause.message} mid-stream; the response is incomplete"
        else:
            what = "timed out" if isinstance(cause, FirstByteTimeout) else "failed"
            message = f"pod {pod_id!r} {what} mid-stream; the response is incomplete"
        super().__init__(pod_id, message)
        self.cause = cause
        if isinstance(cause, Draining):
            self.code = cause.code  # the client should retry elsewhere, not suspect the pod


__all__ = [
    "BadStatus", "ConnectFailed", "Draining", "EmptyStream", "EnsureFailed", "FirstByteTimeout", "PodUnhealthy",
    "RETRIED_STATUSES", "StreamBroken", "StreamStalled", "UpstreamFailure", "retryable_status",
]
