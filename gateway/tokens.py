"""Stage ``tokens``: a request's prompt as the token ids its pods will compute.

The ``precise-prefix`` scorer hashes ``RoutingRequest.prompt_token_ids`` into vLLM's block
hashes (``scorer.vllm_blocks``); they must be the ids the pod itself gets from its tokenizer and
chat template, or no block matches. The edge runs this stage between ``route.resolve`` and
``route.decide`` only when the running pipeline consumes token ids
(``Pipeline.consumes_token_ids``); otherwise it costs nothing. Per base, ``tokenizer.mode``
(``gateway.precise_config``):

- ``none``: no token ids (the scorer routes on the approximate index);
- ``sim``: ``pseudotok`` — the simulator's pseudo-tokenizer over its chat template
  (``apply_chat_template(messages)``, exactly what ``vllm_sim`` computes for a chat completion),
  a completion's ``prompt`` string tokenized as is; the text is cut at
  ``server.prefix_max_chars`` characters first (and the last, possibly partial, token dropped);
- ``pod``: ``POST {pod}/tokenize`` on a healthy pod serving the base, with the request's
  ``messages`` (and ``add_generation_prompt``, ``continue_final_message``,
  ``chat_template_kwargs``, ``tools`` when given: the keys vLLM's chat template reads) or its
  ``prompt``, under ``model`` = the base; the pod applies its own template and tokenizer. Bounded
  by ``timeout_ms``; prompts under ``min_chars`` are skipped; a failed or late call sends that pod
  to the back of the line for ``backoff_s``; answers are cached (``cache_entries``) under the
  XXH3-128 digest of the base and the body sent, so a conversation retried or replayed costs no call;
- ``local``: ``gateway.tokens_local`` (the model's ``tokenizer.json`` and chat template).

A completion prompt given as token ids is used as is, whatever the mode. Any failure leaves
``prompt_token_ids`` empty: the scorer then falls back to the approximate index, never an error
to the client. Counted in ``loraroute_tokenize_total{base,mode,outcome}`` and
``loraroute_tokenize_seconds{mode}``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import orjson
import xxhash
from prometheus_client import CollectorRegistry, Counter, Histogram

import pseudotok
from gateway.parse import Kind
from gateway.precise_config import TokenizerConfig


Exchange = Any  # gateway.exchange.Exchange: not imported, it imports this module
Gateway = Any  # gateway.service.Gateway: not imported, it imports this module

log = logging.getLogger("loraroute.tokens")

#: request keys vLLM's chat template reads, passed on to ``/tokenize``
CHAT_KEYS = ("add_generation_prompt", "continue_final_message", "chat_template_kwargs", "tools")
_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)


def prompt_ids(payload: Mapping[str, Any]) -> tuple[int, ...] | None:
    """A completion prompt given as token ids (one list, or a list holding one list), else None."""
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return tuple(prompt)
    return None


def sim_ids(kind: Kind, payload: Mapping[str, Any], max_chars: int) -> tuple[int, ...]:
    """The simulator's token ids for a chat or completion body (module docstring)."""
    if kind is Kind.CHAT:
        text = pseudotok.apply_chat_template(payload["messages"])
    else:
        prompt = payload.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            return ()
        text = prompt
    if len(text) > max_chars:
        ids = pseudotok.tokenize(text[:max_chars])
        return tuple(ids[:-1])
    return tuple(pseudotok.tokenize(text))


class IdCache:
    """Token ids by digest, least recently used dropped beyond ``size``."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict[bytes, tuple[int, ...]] = OrderedDict()

    def get(self, key: bytes) -> tuple[int, ...] | None:
        ids = self._d.get(key)
        if ids is not None:
            self._d.move_to_end(key)
        return ids

    def put(self, key: bytes, ids: tuple[int, ...]) -> None:
        if self.size <= 0:
            return
        self._d[key] = ids
        self._d.move_to_end(key)
        while len(self._d) > self.size:
            self._d.popitem(last=False)


class PromptTokens:
    """The stage's state across requests and reloads: per base its settings, its cache, the
    pods in back-off, and the metrics (``registry``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._config: dict[str, TokenizerConfig] = {}
        self._caches: dict[str, IdCache] = {}
        self._local: dict[str, Any] = {}
        self._backoff: dict[str, float] = {}
        self._turn = 0
        self._count = Counter("loraroute_tokenize", "Prompts tokenized for precise prefix routing, by outcome",
                              ["base", "mode", "outcome"], registry=registry)
        self._seconds = Histogram("loraroute_tokenize_seconds", "Time spent producing a prompt's token ids",
                                  ["mode"], buckets=_BUCKETS, registry=registry)

    def _setup(self, base: str, cfg: TokenizerConfig) -> None:
        if self._config.get(base) != cfg:
            self._config[base] = cfg
            self._caches[base] = IdCache(cfg.cache_entries)
            self._local.pop(base, None)

    def _outcome(self, base: str, mode: str, outcome: str, t0: float) -> None:
        self._count.labels(base, mode, outcome).inc()
        self._seconds.labels(mode).observe(time.perf_counter() - t0)

    async def fill(self, gw: Gateway, ex: Exchange) -> None:
        """Set ``ex.routing.prompt_token_ids`` when this base's mode can (module docstring)."""
        base = ex.resolved.base
        cfg = base.tokenizer
        payload = ex.request.payload
        given = prompt_ids(payload) if ex.kind is Kind.COMPLETIONS else None
        if given is not None:
            ex.routing.prompt_token_ids = given
            return
        mode = cfg.mode
        if mode == "none":
            return
        t0 = time.perf_counter()
        if mode == "sim":
            ex.routing.prompt_token_ids = sim_ids(ex.kind, payload, ex.runtime.config.server.prefix_max_chars)
            self._outcome(base.name, mode, "ok", t0)
            return
        if len(ex.request.text) < cfg.min_chars:
            self._count.labels(base.name, mode, "short").inc()
            return
        self._setup(base.name, cfg)
        body = self._body(ex, base.vllm_name)
        if body is None:
            self._outcome(base.name, mode, "unsupported", t0)
            return
        key = xxhash.xxh3_128_digest(body)
        cache = self._caches[base.name]
        ids = cache.get(key)
        if ids is not None:
            ex.routing.prompt_token_ids = ids
            self._outcome(base.name, mode, "cached", t0)
            return
        if mode == "local":
            ids, outcome = self._local_ids(base.name, cfg, ex)
        else:
            ids, outcome = await self._ask_pod(gw, ex.resolved.ref.base, cfg, body)
        if ids:
            cache.put(key, ids)
            ex.routing.prompt_token_ids = ids
        self._outcome(base.name, mode, outcome, t0)

    @staticmethod
    def _body(ex: Exchange, model: str) -> bytes | None:
        """The ``/tokenize`` body for this request (also the cache key), None for prompts it cannot take."""
        payload = ex.request.payload
        if ex.kind is Kind.CHAT:
            out: dict[str, Any] = {"model": model, "messages": payload["messages"]}
            for k in CHAT_KEYS:
                if payload.get(k) is not None:
                    out[k] = payload[k]
            return orjson.dumps(out)
        prompt = payload.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        return orjson.dumps({"model": model, "prompt": prompt}) if isinstance(prompt, str) else None

    def _local_ids(self, base: str, cfg: TokenizerConfig, ex: Exchange) -> tuple[tuple[int, ...], str]:
        from gateway.tokens_local import LocalTokenizer, LocalTokenizerError

        tok = self._local.get(base)
        try:
            if tok is None:
                tok = self._local[base] = LocalTokenizer.load(str(cfg.path))
            if isinstance(tok, _Failed):
                return (), "error"
            payload = ex.request.payload
            if ex.kind is Kind.CHAT:
                return tok.chat_ids(payload["messages"], {k: payload[k] for k in CHAT_KEYS if k in payload}), "ok"
            prompt = payload.get("prompt")
            prompt = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 else prompt
            return tok.text_ids(prompt) if isinstance(prompt, str) else (), "ok"
        except LocalTokenizerError as e:
            self._local[base] = _Failed()
            log.warning("tokenizer.mode local for base %s cannot be used: %s", base, e)
            return (), "error"
        except Exception as e:  # noqa: BLE001 - a template error is the template's problem, not the request's
            log.debug("local tokenizer of base %s failed on a request: %s", base, e)
            return (), "error"

    def _pick_pod(self, gw: Gateway, base: str) -> tuple[str, str] | None:
        """A healthy pod serving ``base`` not in back-off (rotating), as (pod id, URL)."""
        now = time.monotonic()
        ids = [p for p, st in gw.pods.items() if st.healthy and base in st.base_models
               and self._backoff.get(p, 0.0) <= now]
        if not ids:
            return None
        self._turn += 1
        pod_id = ids[self._turn % len(ids)]
        ep = gw.endpoint(pod_id)
        return (pod_id, ep.url) if ep is not None else None

    async def _ask_pod(self, gw: Gateway, base: str, cfg: TokenizerConfig, body: bytes) -> tuple[tuple[int, ...], str]:
        target = self._pick_pod(gw, base)
        session = gw.upstream.session
        if target is None or session is None:
            return (), "no_pod"
        pod_id, url = target
        try:
            async with asyncio.timeout(cfg.timeout_ms / 1000.0):
                async with session.post(url + "/tokenize", data=body,
                                        headers={"Content-Type": "application/json"}) as resp:
                    raw = await resp.read()
                    status = resp.status
        except TimeoutError:
            self._backoff[pod_id] = time.monotonic() + cfg.backoff_s
            return (), "timeout"
        except Exception:  # noqa: BLE001 - any transport failure: route without the ids
            self._backoff[pod_id] = time.monotonic() + cfg.backoff_s
            return (), "error"
        ids = _tokens_of(raw) if status == 200 else None
        if ids is None:
            self._backoff[pod_id] = time.monotonic() + cfg.backoff_s
            return (), "error"
        return ids, "ok"


class _Failed:
    """Stands for a local tokenizer that could not be loaded (not retried until a reload)."""


def _tokens_of(raw: bytes) -> tuple[int, ...] | None:
    """``tokens`` of a ``/tokenize`` answer, checked; None when it is not one."""
    try:
        tokens = orjson.loads(raw).get("tokens")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        return None
    return tuple(tokens)
