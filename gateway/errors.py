"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with a status.

Every rejection the gateway makes is an ``APIError``; the ASGI edge turns it into a JSON response.
Messages say what is wrong and what to do next; they never carry a stack trace or a secret.
"""

from __future__ import annotations

from typing import Any

import orjson

# OpenAI error ``type`` values by status (the ones clients switch on).
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "internal_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    """A client-visible error. ``code`` is a short machine-readable string (e.g. ``model_not_found``)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or _TYPES.get(status, "invalid_request_error")
        self.param = param
        self.code = code
        #: extra response headers (lower-case names), e.g. ``Retry-After`` on a 429
        self.headers: tuple[tuple[bytes, bytes], ...] = ()

    def copy(self) -> APIError:
        """The same error as a new exception (a stored error is raised as a copy: raising one
        instance again and again would chain every raise's frames onto its traceback)."""
        return APIError(self.status, self.message, type_=self.type, param=self.param, code=self.code)

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body(self) -> bytes:
        return orjson.dumps(self.to_dict())

    def sse_event(self) -> bytes:
        """The same error as one SSE event followed by ``[DONE]`` (vLLM's mid-stream error form)."""
        return b"data: " + self.body() + b"\n\ndata: [DONE]\n\n"


#: characters of another service's error message a gateway answer carries at most
MESSAGE_LIMIT = 2000


def error_info(body: bytes, limit: int = 300) -> tuple[str, str | None]:
    """(message, type) of an error body another service sent: OpenAI's ``{"error": {"message",
    "type"}}``, FastAPI's ``{"detail": "..."}`` (no type), else the body's first ``limit``
    characters. A structured message is cut at ``MESSAGE_LIMIT`` characters: a pod's error
    text never grows a gateway answer without bound."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            kind = err.get("type")
            return str(err["message"])[:MESSAGE_LIMIT], kind if isinstance(kind, str) else None
        if isinstance(data.get("detail"), str):
            return str(data["detail"])[:MESSAGE_LIMIT], None
    return body[:limit].decode("utf-8", "replace"), None


def error_message(body: bytes, limit: int = 300) -> str:
    """The message of an error body another service sent (``error_info`` without the type)."""
    return error_info(body, limit)[0]
