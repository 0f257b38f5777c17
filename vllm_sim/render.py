"""Bodies of vLLM 0.33's tokenizer endpoints, on the simulator's pseudo-tokenizer.

Routers that tokenize before they route (vllm-router's cache-aware policy, llm-d's token
producer) call these; the token ids are the ones the engine counts and hashes, so a router that
hashes them sees the same blocks the pod caches.

- ``POST /tokenize`` -> ``TokenizeResponse.model_dump()``:
  ``{"count": N, "max_model_len": L, "tokens": [...], "token_strs": null | [...]}``; the request is
  a completion (``prompt``) or a chat (``messages``, ``add_generation_prompt`` default true,
  ``continue_final_message``, ``return_token_strs``).
- ``POST /detokenize`` ``{"tokens": [...]}`` -> ``{"prompt": text}`` (ids outside the vocabulary
  decode to nothing, as a Hugging Face tokenizer skips unknown ids).
- ``POST /v1/chat/completions/render`` -> one ``GenerateRequest.model_dump()``;
  ``POST /v1/completions/render`` -> a list of them, one per prompt::

      {"request_id": "chatcmpl-<16 hex>", "token_ids": [...], "features": null,
       "sampling_params": {...}, "model": <as sent>, "stream": false, "stream_options": null,
       "cache_salt": null, "priority": 0, "kv_transfer_params": null}

  ``sampling_params`` is abridged to the common sampling fields (vLLM's ``SamplingParams`` has
  more, none of which a router reads); ``max_tokens`` defaults to ``max_model_len`` minus the prompt.

Shapes follow vLLM's ``serve/tokenize/protocol.py``, ``serve/render/serving.py`` and
``serve/disagg/protocol.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from . import protocol as P
from .tokenizer import token_strs

_SAMPLING_DEFAULTS: tuple[tuple[str, Any], ...] = (
    ("n", 1), ("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0),
    ("temperature", 1.0), ("top_p", 1.0), ("top_k", 0), ("min_p", 0.0), ("seed", None), ("stop", []),
    ("stop_token_ids", []), ("ignore_eos", False), ("max_tokens", None), ("min_tokens", 0), ("logprobs", None),
    ("prompt_logprobs", None), ("skip_special_tokens", True), ("spaces_between_special_tokens", True),
    ("include_stop_str_in_output", False),
)


def tokenize_body(ids: list[int], max_model_len: int, with_strs: bool) -> bytes:
    return orjson.dumps({"count": len(ids), "max_model_len": max_model_len, "tokens": ids,
                         "token_strs": token_strs(ids) if with_strs else None})


def detokenize_body(text: str) -> bytes:
    return orjson.dumps({"prompt": text})


def sampling_params(body: Mapping[str, Any], max_tokens: int) -> dict[str, Any]:
    """The request's sampling fields over vLLM's defaults; ``stop`` always a list."""
    out: dict[str, Any] = {}
    for key, default in _SAMPLING_DEFAULTS:
        value = body.get(key, default)
        out[key] = default if value is None and default is not None else value
    stop = body.get("stop")
    out["stop"] = [stop] if isinstance(stop, str) else list(stop or [])
    out["max_tokens"] = max_tokens
    return out


def generate_request(prefix: str, token_ids: list[int], body: Mapping[str, Any], max_tokens: int) -> dict[str, Any]:
    """``GenerateRequest.model_dump()`` for one rendered prompt (``prefix``: chatcmpl / cmpl)."""
    stream = bool(body.get("stream"))
    return {
        "request_id": f"{prefix}-{P.random_id()}", "token_ids": token_ids, "features": None,
        "sampling_params": sampling_params(body, max_tokens), "model": body.get("model"), "stream": stream,
        "stream_options": body.get("stream_options") if stream else None, "cache_salt": body.get("cache_salt"),
        "priority": body.get("priority", 0) or 0, "kv_transfer_params": None,
    }
