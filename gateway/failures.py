"""Typed upstream failures: what can go wrong between the gateway and a pod, with its policy.

Every failure of one attempt is an ``UpstreamFailure``. Its class says what happened and carries
what the attempt loop (``gateway.forward``) needs to act on it without comparing strings:

==================  =========  =====  =======  ======================================================
class               ``reason``  retry  suspect  client sees when it is the last one (status, code)
==================  =========  =====  =======  ======================================================
ConnectFailed       connect    yes    yes      502 ``upstream_unreachable`` (refused, reset, dropped)
FirstByteTimeout    timeout    yes    yes      504 ``upstream_timeout`` (no response in time)
BadStatus           status     yes    no       502 ``upstream_error`` (a 5xx; the pod's own message)
EmptyStream         empty      yes    no       502 ``upstream_error`` (a stream closed before any byte)
EnsureFailed        ensure     [1]    no       [1]
StreamBroken        stream     no     no       an SSE error event, then ``[DONE]`` (already streaming)
==================  =========  =====  =======  ======================================================

[1] the sidecar could not materialise the adapter: for a reason that holds on every pod (the
adapter is missing or invalid in the store, ``permanent``) no other pod is tried and the client
gets 502 ``adapter_ensure_failed``; otherwise the next pod is tried and the last answer is 503
(``adapter_ensure_failed``, or ``adapter_ensure_timeout``).

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


class BadStatus(UpstreamFailure):
    """The pod answered with a 5xx; ``detail`` is its own error message."""

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


class StreamBroken(UpstreamFailure):
    """The pod failed after the response had started: the stream ends with an error event."""

    reason = "stream"
    retry = False
    code = "upstream_stream_error"

    def __init__(self, pod_id: str, cause: UpstreamFailure) -> None:
        what = "timed out" if isinstance(cause, FirstByteTimeout) else "failed"
        super().__init__(pod_id, f"pod {pod_id!r} {what} mid-stream; the response is incomplete")
        self.cause = cause


__all__ = [
    "BadStatus", "ConnectFailed", "EmptyStream", "EnsureFailed", "FirstByteTimeout", "StreamBroken",
    "UpstreamFailure",
]
