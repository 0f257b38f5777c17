"""Stage ``parse``: a completion request's body → a ``ParsedRequest``. Pure and synchronous.

``parse_request(body, kind)`` checks what routing needs and nothing more (the pod validates the
rest and its own 400 is passed through unchanged):

- the body is a JSON object (400 ``invalid_json``) with a ``model`` (400 ``missing_model``);
- ``stream`` is true, false or null; ``max_tokens`` (or ``max_completion_tokens``) a non-negative
  integer or absent (400, ``param`` names the field);
- chat: ``messages`` is a non-empty list of objects; the text hashed for prefix routing is each
  message's role and text content, joined by newlines;
- completions: ``prompt`` is a non-empty string, a list of strings or a list of token ids (or of
  token-id lists); token ids are hashed as their decimal form and counted as tokens exactly.

The prompt's token count is estimated at 4 characters a token. The size limit is applied while
the body is read (``gateway.edge``), before this stage sees it. Nesting: orjson decodes up to
1,024 levels (deeper is a 400 ``invalid_json`` saying so) but encodes at most
``MAX_JSON_DEPTH``; the body for the pod is re-encoded in ``gateway.route``, which answers a
deeper one with a 400 ``json_too_deep``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import APIError

#: levels of nesting a request body may have (orjson encodes no deeper)
MAX_JSON_DEPTH = 254

class Kind(enum.Enum):
    """The two completion routes; the value is the path, the same on the gateway and on vLLM."""

    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"


@dataclass(slots=True)
class ParsedRequest:
    """The body as routing sees it. ``payload`` is the decoded JSON; ``route.resolve`` rewrites its
    ``model`` to the name vLLM knows before the body is re-encoded for the pod."""

    payload: dict[str, Any]
    model: object  # the client's ``model`` value, checked by the policy
    stream: bool
    max_tokens: int
    text: str  # prompt text for prefix hashing
    tokens: int  # prompt tokens, estimated


def parse_request(body: bytes, kind: Kind) -> ParsedRequest:
    """See the module docstring. Raises ``APIError`` (400) saying what is wrong."""
    if not body:
        raise APIError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON ({e.msg} at position {e.pos})",
                       code="invalid_json") from None
    if not isinstance(payload, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    if "model" not in payload:
        raise APIError(400, "'model' is required: 'base' or 'base:adapter'", param="model", code="missing_model")
    stream = payload.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise APIError(400, "'stream' must be true or false", param="stream")
    max_tokens = payload.get("max_tokens", payload.get("max_completion_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0):
        raise APIError(400, "'max_tokens' must be a non-negative integer", param="max_tokens")
    if kind is Kind.CHAT:
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
        text = chat_text(messages)
        tokens = len(text) // 4
    else:
        if "prompt" not in payload:
            raise APIError(400, "'prompt' is required", param="prompt")
        text, tokens = completion_text(payload["prompt"])
    return ParsedRequest(payload, payload["model"], bool(stream), max_tokens or 0, text, tokens)


def chat_text(messages: list[Any]) -> str:
    """Each message's role and text content, newline-joined (image parts and the like are skipped)."""
    parts: list[str] = []
    for m in messages:
        if not isinstance(m, dict):
            raise APIError(400, "each item of 'messages' must be an object with 'role' and 'content'", param="messages")
        parts.append(str(m.get("role", "")))
        content = m.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for p in content:
                if isinstance(p, dict) and isinstance(p.get("text"), str):
                    parts.append(p["text"])
    return "\n".join(parts)


def completion_text(prompt: Any) -> tuple[str, int]:
    """(text to hash, token estimate). Token-id prompts are hashed as their decimal form."""
    if isinstance(prompt, str):
        return prompt, len(prompt) // 4
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            text = "\n".join(prompt)
            return text, len(text) // 4
        if all(isinstance(p, int) for p in prompt):
            return " ".join(map(str, prompt)), len(prompt)
        if all(isinstance(p, list) for p in prompt):
            return "", sum(len(p) for p in prompt)
    raise APIError(400, "'prompt' must be a non-empty string, list of strings or list of token ids", param="prompt")
