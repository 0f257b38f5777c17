"""Errors the sidecar returns, each with its HTTP status and OpenAI-shaped body.

Body: ``{"error": {"message", "type", "param", "code"}}``. ``code`` is a stable string the
gateway and dashboards can switch on (and the ``reason`` label of
``loraroute_sidecar_failures_total``). Messages say what was wrong and what to do; they never
carry credentials or stack traces.
"""

from __future__ import annotations

from typing import Any


class SidecarError(Exception):
    """Base class: ``status``, ``type`` and a default ``code``; ``message`` says what to fix."""

    status = 500
    type = "InternalServerError"
    default_code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidName(SidecarError):
    """400: the adapter name could escape the adapter folder or is not a plain name."""

    status = 400
    type = "BadRequestError"
    default_code = "invalid_adapter_name"


class BadRequest(SidecarError):
    status = 400
    type = "BadRequestError"
    default_code = "bad_request"


class AdapterNotFound(SidecarError):
    """404: nothing at the expected place in the adapter store (message carries diagnostics)."""

    status = 404
    type = "NotFoundError"
    default_code = "adapter_not_found"


class AdapterInvalid(SidecarError):
    """422: the adapter exists but vLLM would refuse it (or run out of memory loading it).

    ``code`` names the check: missing_file, malformed_json, missing_field, peft_type,
    rank_too_large, base_model_mismatch, safetensors_header, tensor_mismatch, too_large,
    unsupported.
    """

    status = 422
    type = "UnprocessableEntityError"
    default_code = "invalid_adapter"


class StoreUnreachable(SidecarError):
    """503: the adapter store cannot be used (connection, TLS, credentials); ``layer`` says which."""

    status = 503
    type = "ServiceUnavailableError"
    default_code = "adapter_store_unreachable"

    def __init__(self, message: str, *, layer: str, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.layer = layer


class LoadRefused(SidecarError):
    """502: vLLM refused ``/v1/load_lora_adapter`` (its message is included) or did not answer."""

    status = 502
    type = "BadGatewayError"
    default_code = "vllm_load_failed"
