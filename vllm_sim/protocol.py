"""vLLM 0.33 wire formats: error bodies, message sanitising, response bodies and SSE chunks.

All JSON is produced as text templates with ``orjson`` for the variable parts, field order as in
vLLM's pydantic models (``model_dump_json(exclude_unset=True)`` for stream chunks).
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

import orjson

VERSION = "0.33.0"
SYSTEM_FINGERPRINT = "vllm-0.33.0-4ba787ec"

# vLLM's sanitize_message(): absolute paths under well-known roots, and /a/b.ext-shaped paths.
_ROOT_PATH = re.compile(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[^\s'\"`,;()\[\]{}<>]*)?")
_EXT_PATH = re.compile(r"/[\w\-]+(?:/[\w\-]+)+\.[A-Za-z0-9]+")


def sanitize_message(message: str) -> str:
    """Replace filesystem paths by ``<path>`` as vLLM does before sending an error."""
    message = _ROOT_PATH.sub("<path>", message)
    return _EXT_PATH.sub("<path>", message)


def random_id() -> str:
    """16 hex characters (vLLM 0.33 ``random_uuid()``)."""
    return secrets.token_hex(8)


def error_body(message: str, err_type: str, code: int, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": sanitize_message(message), "type": err_type,
                                   "param": param, "code": code}})


def validation_message(errors: list[dict[str, Any]]) -> str:
    """FastAPI's RequestValidationError text as vLLM's handler formats it (``"{exc} {errors}"``)."""
    n = len(errors)
    text = f"{n} validation error{'s' if n != 1 else ''}:\n" + "".join(f"  {e!r}\n" for e in errors)
    return f"{text} {errors!r}"


def unknown_model_message(model: str, aliases: list[str]) -> str:
    return f"The model `{model}` does not exist. Valid aliases: {', '.join(aliases)}."


# -- /v1/models --------------------------------------------------------------------------------
def model_card(model_id: str, root: str, parent: str | None, max_model_len: int | None, created: int) -> dict[str, Any]:
    return {
        "id": model_id, "object": "model", "created": created, "owned_by": "vllm", "root": root,
        "parent": parent, "max_model_len": max_model_len,
        "permission": [{
            "id": f"modelperm-{random_id()}", "object": "model_permission", "created": created,
            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
            "organization": "*", "group": None, "is_blocking": False,
        }],
    }


# -- usage -------------------------------------------------------------------------------------
def usage_json(prompt: int, completion: int, details: bool = False) -> str:
    tail = ',"prompt_tokens_details":null' if details else ""
    return f'{{"prompt_tokens":{prompt},"total_tokens":{prompt + completion},"completion_tokens":{completion}{tail}}}'


def _j(value: Any) -> str:
    return orjson.dumps(value).decode()


_PIECE_JSON: dict[str, str] = {}


def _jp(piece: str) -> str:
    """JSON string of a generated piece (memoised: pieces come from a small vocabulary)."""
    out = _PIECE_JSON.get(piece)
    if out is None:
        out = orjson.dumps(piece).decode()
        if len(_PIECE_JSON) < 4096:
            _PIECE_JSON[piece] = out
    return out


# -- non-streaming bodies ------------------------------------------------------------------------
def chat_body(rid: str, created: int, model: str, text: str, finish: str, stop_reason: str | None,
              prompt: int, completion: int) -> bytes:
    return (
        f'{{"id":{_j(rid)},"object":"chat.completion","created":{created},"model":{_j(model)},'
        f'"choices":[{{"index":0,"message":{{"role":"assistant","content":{_j(text)},"refusal":null,'
        f'"annotations":null,"audio":null,"function_call":null,"tool_calls":[],"reasoning":null}},'
        f'"logprobs":null,"finish_reason":{_j(finish)},"stop_reason":{_j(stop_reason)},"token_ids":null}}],'
        f'"service_tier":null,"system_fingerprint":null,"usage":{usage_json(prompt, completion, True)},'
        f'"prompt_logprobs":null,"prompt_token_ids":null,"kv_transfer_params":null}}'
    ).encode()


def completion_body(rid: str, created: int, model: str, text: str, finish: str, stop_reason: str | None,
                    prompt: int, completion: int) -> bytes:
    return (
        f'{{"id":{_j(rid)},"object":"text_completion","created":{created},"model":{_j(model)},'
        f'"choices":[{{"index":0,"text":{_j(text)},"logprobs":null,"finish_reason":{_j(finish)},'
        f'"stop_reason":{_j(stop_reason)},"prompt_logprobs":null,"prompt_token_ids":null,"token_ids":null}}],'
        f'"service_tier":null,"system_fingerprint":null,"usage":{usage_json(prompt, completion, True)},'
        f'"kv_transfer_params":null}}'
    ).encode()


# -- streaming ---------------------------------------------------------------------------------
class ChunkWriter:
    """Builds the SSE frames of one streamed chat or completion response."""

    __slots__ = ("chat", "_head", "_content_pre", "_content_post")

    def __init__(self, chat: bool, rid: str, created: int, model: str) -> None:
        self.chat = chat
        obj = "chat.completion.chunk" if chat else "text_completion"
        self._head = f'data: {{"id":{_j(rid)},"object":"{obj}","created":{created},"model":{_j(model)},"choices":['
        if chat:
            self._content_pre = self._head + '{"index":0,"delta":{"content":'
            self._content_post = ('},"logprobs":null,"finish_reason":null,"token_ids":null}],'
                                  '"kv_transfer_params":null}\n\n')
        else:
            self._content_pre = self._head + '{"index":0,"text":'
            self._content_post = (',"logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,'
                                  '"token_ids":null,"weight_versions":null}],"kv_transfer_params":null}\n\n')

    def role(self) -> str:
        return (self._head + '{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
                '"finish_reason":null}],"prompt_token_ids":null,"prompt_text":null}\n\n')

    def content(self, piece: str) -> str:
        return self._content_pre + _jp(piece) + self._content_post

    def finish(self, piece: str, reason: str, stop_reason: str | None, fingerprint: bool) -> str:
        fp = f',"system_fingerprint":"{SYSTEM_FINGERPRINT}"' if fingerprint else ""
        if self.chat:
            return (self._head + f'{{"index":0,"delta":{{"content":{_j(piece)}}},"logprobs":null,'
                    f'"finish_reason":{_j(reason)},"stop_reason":{_j(stop_reason)},"token_ids":null,'
                    f'"weight_versions":null}}],"kv_transfer_params":null{fp}}}\n\n')
        return (self._head + f'{{"index":0,"text":{_j(piece)},"logprobs":null,"finish_reason":{_j(reason)},'
                f'"stop_reason":{_j(stop_reason)},"prompt_token_ids":null,"token_ids":null,'
                f'"weight_versions":null}}],"kv_transfer_params":null{fp}}}\n\n')

    def usage(self, prompt: int, completion: int) -> str:
        return (self._head + f'],"usage":{usage_json(prompt, completion)},'
                f'"system_fingerprint":"{SYSTEM_FINGERPRINT}"}}\n\n')

    @staticmethod
    def error(message: str, err_type: str, code: int) -> str:
        return f"data: {error_body(message, err_type, code).decode()}\n\n"


DONE = "data: [DONE]\n\n"


def now_unix() -> int:
    return int(time.time())
