"""One simulated pod's HTTP surface (aiohttp), matching vLLM 0.33's OpenAI server.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streaming and not),
``GET /v1/models``, ``GET /metrics``, ``GET /health``, ``GET /version``, the tokenizer endpoints
``POST /tokenize``, ``/detokenize``, ``/v1/chat/completions/render``, ``/v1/completions/render``
(bodies in ``vllm_sim.render``), ``GET /sim/state`` (simulator-only ground truth),
``GET /sim/profile`` (simulator-only: the cost profile and its true constants),
``GET|POST /sim/faults`` (simulator-only: make the next N
generation requests fail with a 5xx, as an engine that died would — for testing routers) and, only with runtime updating enabled,
``POST /v1/load_lora_adapter`` / ``POST /v1/unload_lora_adapter``; with ``VLLM_SERVER_DEV_MODE=1``,
``POST /reset_prefix_cache`` (``{"success": bool}``: it fails while blocks are in use; a success
publishes ``AllBlocksCleared`` when KV events are on). Unknown routes answer
FastAPI's ``404 {"detail":"Not Found"}``.

Model check (``BaseServing._check_model``): base served names, then registered adapters, then,
with runtime updating, the filesystem resolver (``--adapter-dir``); else 404 with vLLM's body.
A client disconnect aborts the request in the engine (finish reason ``abort``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from . import protocol as P
from . import render as R
from .adapters import AdapterInvalid, AdapterNotFound, inspect_adapter, resolve_from_dir
from .engine import Engine, Request
from .kvevents import KVEventPublisher
from .lora_cache import LoraRef
from .metrics import MetricsRenderer
from .sampling import check_ranges, check_types
from .tokenizer import (
    apply_chat_template, count_bytes_tokens, detokenize, token_ids_to_bytes, tokenize, tokenize_bytes,
)

JSON = "application/json"
_log = logging.getLogger("vllm_sim")


@dataclass
class PodConfig:
    """The server-side options of one pod (engine options live in ``EngineConfig``)."""

    model: str = "meta-llama/Llama-3.1-8B-Instruct"
    served_model_names: list[str] = field(default_factory=list)
    enable_lora: bool = True
    runtime_lora_updating: bool = False
    adapter_dir: str | None = None
    emit_residency_metrics: bool = False
    pod_name: str = "pod"
    static_loras: list[tuple[str, str]] = field(default_factory=list)
    dev_mode: bool = False          # VLLM_SERVER_DEV_MODE: /reset_prefix_cache

    @property
    def served(self) -> list[str]:
        return self.served_model_names or [self.model]


# what a failing vLLM answers (500: EngineDeadError's text once the engine core died)
FAULT_MESSAGES = {
    500: "EngineCore encountered an issue. See stack trace (above) for the root cause.",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, err_type: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.err_type, self.param = status, message, err_type, param

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=P.error_body(self.message, self.err_type, self.status, self.param),
                            content_type=JSON)


def _bad_request_validation(errors: list[dict[str, Any]]) -> ApiError:
    """FastAPI's request validation error; ``param`` names the first bad field (``body.lora_path``),
    as a real vLLM 0.25.1 answered (``tests/fixtures/vllm-0.25-real/errors.json``)."""
    loc = errors[0].get("loc", ()) if errors else ()
    param = ".".join(loc) if len(loc) > 1 and all(isinstance(x, str) for x in loc) else None
    return ApiError(400, P.validation_message(errors), "Bad Request", param)


class Pod:
    """A pod: its engine, its adapter names and the HTTP handlers."""

    def __init__(self, config: PodConfig, engine: Engine, kv_events: KVEventPublisher | None = None) -> None:
        self.config = config
        self.engine = engine
        self.kv_events = kv_events
        if kv_events is not None:
            engine.pool.enable_events(kv_events.publish)
        self.loras: dict[str, LoraRef] = {}
        self._next_lora_id = 0
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.metrics = MetricsRenderer(engine, config.served[0], config.emit_residency_metrics)
        self._metrics_cache: tuple[int, int, bytes] | None = None
        # /sim/faults: the next ``fail_next`` generation requests answer ``fail_status``
        self.fail_next = 0
        self.fail_status = 500
        self.failed = 0

    # -- adapters ------------------------------------------------------------------------------
    def _new_lora_id(self) -> int:
        self._next_lora_id += 1
        return self._next_lora_id

    def load_static(self) -> None:
        """``--lora-modules``: validated and loaded at start-up (a failure aborts start-up)."""
        for name, path in self.config.static_loras:
            info = inspect_adapter(name, path, self.engine.config.max_lora_rank)
            ref = LoraRef(self._new_lora_id(), name, path, info.rank)
            self.engine.loras.ensure(ref)
            self.loras[name] = ref

    async def _add_lora(self, name: str, path: str, inplace: bool = False) -> tuple[LoraRef, float]:
        """vLLM's add_lora: validate, then load into CPU + GPU as an engine utility call."""
        if not self.config.enable_lora:
            raise AdapterInvalid("LoRA is not enabled. Use --enable-lora to enable LoRA.")
        info = inspect_adapter(name, path, self.engine.config.max_lora_rank)
        old = self.loras.get(name) if inplace else None
        ref = LoraRef(old.lora_id if old else self._new_lora_id(), name, path, info.rank)
        tiers = self.engine.loras
        overhead = self.engine.profile.load_api_overhead_s  # the utility call itself blocks the engine too
        seconds = await self.engine.run_utility(lambda: tiers.ensure(ref, reload=True) + overhead, loading=name)
        return ref, seconds

    async def _resolve(self, name: str) -> tuple[LoraRef, float] | None:
        """Filesystem resolver under a per-name lock; None if not found; 400 if found, not loaded.

        Returns the adapter and the simulated seconds of its load; a request that found the name
        being resolved by another one waits on the lock, and its load seconds are that wait
        (it paid for the same load)."""
        started = self.engine.wall_now()
        async with self._locks[name]:
            if name in self.loras:
                return self.loras[name], max(0.0, self.engine.now() - started)
            if not self.config.adapter_dir or not self.config.enable_lora:
                return None
            path = resolve_from_dir(self.config.adapter_dir, name, self.config.model)
            if path is None:
                return None
            try:
                ref, seconds = await self._add_lora(name, path)
            except (AdapterInvalid, AdapterNotFound):
                raise ApiError(400, f"LoRA adapter '{name}' was found but could not be loaded.", "BadRequestError") from None
            self.loras[name] = ref
            return ref, seconds

    async def _check_model(self, model: Any) -> tuple[LoraRef | None, float]:
        if model is None or model == "" or model in self.config.served:
            return None, 0.0
        if isinstance(model, str):
            ref = self.loras.get(model)
            if ref is not None:
                return ref, 0.0
            if self.config.runtime_lora_updating:
                found = await self._resolve(model)
                if found is not None:
                    return found
        raise ApiError(404, P.unknown_model_message(str(model), self.config.served), "NotFoundError", "model")

    # -- generation ------------------------------------------------------------------------------
    async def _parse(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise _bad_request_validation([{"type": "json_invalid", "loc": ("body", 0),
                                            "msg": "JSON decode error", "input": {}, "ctx": {"error": str(e)}}]) from None
        if not isinstance(body, dict):
            raise _bad_request_validation([{"type": "model_attributes_type", "loc": ("body",),
                                            "msg": "Input should be a valid dictionary or object to extract fields from",
                                            "input": body}])
        return body

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    @staticmethod
    def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise _bad_request_validation([{"type": "missing" if messages is None else "list_type",
                                            "loc": ("body", "messages"),
                                            "msg": "Field required" if messages is None else "Input should be a valid list",
                                            "input": messages if messages is not None else body}])
        return messages

    def _prompt(self, body: dict[str, Any], chat: bool) -> bytes:
        if chat:
            return apply_chat_template(self._messages(body)).encode("utf-8")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return prompt.encode("utf-8")
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return token_ids_to_bytes(prompt)
        if isinstance(prompt, list) and len(prompt) > 1:
            raise ApiError(400, "The simulator serves one prompt per request (n=1, a single prompt).", "BadRequestError", "prompt")
        raise _bad_request_validation([{"type": "missing" if prompt is None else "string_type", "loc": ("body", "prompt"),
                                        "msg": "Field required" if prompt is None else "Input should be a valid string",
                                        "input": body if prompt is None else prompt}])

    def _max_tokens(self, body: dict[str, Any], chat: bool, num_prompt: int) -> int | None:
        """The request's ``max_tokens`` (chat: ``max_completion_tokens`` first), checked against the
        context length as vLLM checks it; None when not given."""
        max_len = self.engine.config.max_model_len
        max_tokens = body.get("max_completion_tokens") if chat else None
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
            raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}.", "BadRequestError", "max_tokens")
        if num_prompt >= max_len:
            raise ApiError(400, f"This model's maximum context length is {max_len} tokens. However, your request has "
                           f"{num_prompt} input tokens. Please reduce the length of the input messages.",
                           "BadRequestError", "messages" if chat else "prompt")
        if max_tokens is not None and num_prompt + max_tokens > max_len:
            raise ApiError(400, f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's "
                           f"maximum context length is {max_len} tokens and your request has {num_prompt} input "
                           f"tokens ({max_tokens} > {max_len} - {num_prompt}).", "BadRequestError", "max_tokens")
        return max_tokens

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        if self.fail_next > 0:
            self.fail_next -= 1
            self.failed += 1
            return ApiError(self.fail_status, FAULT_MESSAGES[self.fail_status],
                            "InternalServerError" if self.fail_status == 500 else "ServiceUnavailableError").response()
        try:
            arrival = self.engine.wall_now()  # see Engine.add_request
            body = await self._parse(request)
            invalid = check_types(body)  # pydantic's request model, before anything else
            if invalid:
                raise _bad_request_validation(invalid)
            lora, resolved = await self._check_model(body.get("model"))
            prompt = self._prompt(body, chat)
            num_prompt = max(1, count_bytes_tokens(prompt))
            max_tokens = self._max_tokens(body, chat, num_prompt)
            out_of_range = check_ranges(body, max_tokens)  # SamplingParams._verify_args
            if out_of_range is not None:
                raise ApiError(400, out_of_range[0], "BadRequestError", out_of_range[1])
            n = body.get("n", 1)
            if n not in (1, None):
                raise ApiError(400, "The simulator supports n=1 only.", "BadRequestError", "n")
            stop = body.get("stop")
            stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if isinstance(s, str) and s]
        except ApiError as e:
            return e.response()
        model_name = lora.name if lora is not None else (body.get("model") or self.config.served[0])
        base_id = request.headers.get("X-Request-Id") or P.random_id()
        rid = ("chatcmpl-" if chat else "cmpl-") + base_id
        req = Request(base_id, lora, model_name, prompt, num_prompt, max_tokens, stops, self.engine.config.seed)
        stream = bool(body.get("stream"))
        req.stream = stream
        if resolved:
            req.resolved_load = resolved
        self.engine.add_request(req, arrival=arrival if resolved else None)
        if resolved:
            req.tier = "disk"
        created = P.now_unix()
        try:
            if not stream:
                while not req.finished:
                    req.waiter = self.engine.loop.create_future()
                    await req.waiter
                text = req.text if req.stop else "".join(req.pieces) + req.final_piece
                req.pieces, req.text = [], ""  # the ring keeps the record, not the text
                builder = P.chat_body if chat else P.completion_body
                payload = builder(rid, created, model_name, text, req.finish_reason or "stop", req.stop_reason,
                                  num_prompt, req.num_output)
                return web.Response(body=payload, content_type=JSON)
            opts = body.get("stream_options") or {}
            include_usage = bool(opts.get("include_usage")) if isinstance(opts, dict) else False
            return await self._stream(request, req, chat, rid, created, model_name, include_usage)
        except (asyncio.CancelledError, ConnectionResetError):
            self.engine.abort(req)
            raise
        finally:
            req.sink = None  # the ground-truth ring keeps the request, not the connection

    async def _stream(self, request: web.Request, req: Request, chat: bool, rid: str, created: int,
                      model_name: str, include_usage: bool) -> web.StreamResponse:
        """SSE response. Headers go out at once; chunks are written by the engine itself at the
        end of each step (``req.sink``: straight to the transport, in HTTP/1.1 chunked framing),
        so a token costs no task switch. The chat role chunk goes with the first token, as in
        vLLM; this coroutine sends the finish chunk, the usage chunk and ``[DONE]``."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        chunked = resp.headers.get("Transfer-Encoding", "").lower() == "chunked"
        transport = request.transport
        w = P.ChunkWriter(chat, rid, created, model_name)

        def send(text: str) -> None:
            if transport is None or transport.is_closing():
                return
            data = text.encode()
            transport.write(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)

        # vLLM sends the chat role chunk with the first engine output, not before
        role_pending = [chat]

        def sink(r: Request) -> None:
            pieces = r.take_pieces()
            if pieces or (role_pending[0] and r.num_output):
                head = w.role() if role_pending[0] else ""
                role_pending[0] = False
                send(head + (w.content("".join(pieces)) if pieces else ""))

        req.sink = sink
        sink(req)
        while not req.finished:
            req.waiter = self.engine.loop.create_future()
            await req.waiter
        req.sink = None
        out = [w.role()] if role_pending[0] else []
        rest = req.take_pieces()
        if rest:
            out.append(w.content("".join(rest)))
        out.append(w.finish(req.final_piece, req.finish_reason or "stop", req.stop_reason, not include_usage))
        if include_usage:
            out.append(w.usage(req.num_prompt, req.num_output))
        out.append(P.DONE)
        send("".join(out))
        await resp.write_eof()
        return resp

    # -- tokenizer routes (vllm_sim.render) ---------------------------------------------------------
    async def tokenize_route(self, request: web.Request) -> web.Response:
        try:
            body = await self._parse(request)
            await self._check_model(body.get("model"))
            if "messages" in body:
                if body.get("continue_final_message") and body.get("add_generation_prompt"):  # both given
                    raise ApiError(400, "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                                   "BadRequestError")
                messages = self._messages(body)
                text = apply_chat_template(messages, bool(body.get("add_generation_prompt", True)),
                                           bool(body.get("continue_final_message")))
            else:
                prompt = body.get("prompt")
                if not isinstance(prompt, str):
                    raise _bad_request_validation([{
                        "type": "missing" if prompt is None else "string_type", "loc": ("body", "prompt"),
                        "msg": "Field required" if prompt is None else "Input should be a valid string",
                        "input": body if prompt is None else prompt}])
                text = prompt
        except ApiError as e:
            return e.response()
        ids = tokenize(text)
        return web.Response(body=R.tokenize_body(ids, self.engine.config.max_model_len,
                                                 bool(body.get("return_token_strs"))), content_type=JSON)

    async def detokenize_route(self, request: web.Request) -> web.Response:
        try:
            body = await self._parse(request)
            await self._check_model(body.get("model"))
            tokens = body.get("tokens")
            if not isinstance(tokens, list) or not all(
                    isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**63 for t in tokens):
                raise _bad_request_validation([{
                    "type": "missing" if tokens is None else "list_type", "loc": ("body", "tokens"),
                    "msg": "Field required" if tokens is None else "Input should be a valid list of integers in [0, 2**63)",
                    "input": body if tokens is None else tokens}])
        except ApiError as e:
            return e.response()
        return web.Response(body=R.detokenize_body(detokenize(tokens)), content_type=JSON)

    async def render_chat_route(self, request: web.Request) -> web.Response:
        return await self._render(request, chat=True)

    async def render_completion_route(self, request: web.Request) -> web.Response:
        return await self._render(request, chat=False)

    async def _render(self, request: web.Request, chat: bool) -> web.Response:
        """What the engine would receive for a chat / completion request, without running it."""
        try:
            body = await self._parse(request)
            await self._check_model(body.get("model"))
            prompts = body.get("prompt")
            if chat or not (isinstance(prompts, list) and len(prompts) > 1
                            and all(isinstance(p, (str, list)) for p in prompts)):
                prompts = [None]  # one prompt, read by _prompt
            items = []
            for one in prompts:
                single = body if one is None else {**body, "prompt": one}
                ids = self._prompt_ids(single, chat)
                max_tokens = self._max_tokens(single, chat, len(ids))
                left = self.engine.config.max_model_len - len(ids)
                items.append(R.generate_request("chatcmpl" if chat else "cmpl", ids, single,
                                                max_tokens if max_tokens is not None else left))
        except ApiError as e:
            return e.response()
        return web.Response(body=orjson.dumps(items[0] if chat else items), content_type=JSON)

    def _prompt_ids(self, body: dict[str, Any], chat: bool) -> list[int]:
        """The token ids of a request's prompt: as given, or the pseudo-tokenizer's."""
        prompt = body.get("prompt")
        if not chat and isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list):
            prompt = prompt[0]
        if not chat and isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return [int(t) for t in prompt]
        return tokenize_bytes(self._prompt(body, chat))

    # -- other routes ------------------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        created = P.now_unix()
        base = self.config.served[0]
        data = [P.model_card(name, self.config.model, None, self.engine.config.max_model_len, created)
                for name in self.config.served]
        data += [P.model_card(ref.name, ref.path, base, None, created) for ref in self.loras.values()]
        return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type=JSON)

    async def metrics_route(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render().encode(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps({"version": P.VERSION}), content_type=JSON)

    async def sim_state(self, request: web.Request) -> web.Response:
        try:
            since = int(request.query.get("since_request", "0"))
            limit = int(request.query["limit"]) if "limit" in request.query else None
        except ValueError:
            return ApiError(400, "since_request and limit must be integers", "BadRequestError").response()
        state = {"pod": self.config.pod_name, **self.engine.state(since, limit)}
        if self.kv_events is not None:
            state["kv_events"] = {"endpoint": self.kv_events.endpoint, "replay_endpoint": self.kv_events.replay_endpoint,
                                  "next_seq": self.kv_events.next_seq}
        return web.Response(body=orjson.dumps(state), content_type=JSON)

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        """vLLM's dev-mode route: drop every cached prefix block unless some are in use."""
        ok = self.engine.pool.reset()
        self.engine.pool.flush_events()
        return web.Response(body=orjson.dumps({"success": ok}), content_type=JSON)

    async def sim_profile(self, request: web.Request) -> web.Response:
        """The cost profile this pod runs (every constant) and the scorer-facing truths it implies."""
        profile = self.engine.profile
        return web.Response(body=orjson.dumps({"pod": self.config.pod_name, "profile": profile.name,
                                               "constants": profile.to_dict(), "truth": profile.truth().to_dict()},
                                              option=orjson.OPT_NON_STR_KEYS), content_type=JSON)

    async def faults(self, request: web.Request) -> web.Response:
        """``POST /sim/faults {"fail_next": N, "status": 500|502|503|504, "kv_events": bool}``: the
        next N chat or completion requests answer that status with an OpenAI-shaped error (500:
        vLLM's ``EngineDeadError`` text); ``kv_events: false`` stops sending KV events (they are
        still numbered and buffered for replay, as when vLLM's PUB socket drops them), ``true``
        sends them again. ``GET`` shows the pending count, how many failed so far and whether KV
        events are sent."""
        if request.method == "POST":
            try:
                body = await self._parse(request)
                n = body.get("fail_next", 0)
                status = body.get("status", 500)
                kv = body.get("kv_events")
                if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                    raise ApiError(400, "fail_next must be a non-negative integer", "BadRequestError", "fail_next")
                if status not in FAULT_MESSAGES:
                    raise ApiError(400, f"status must be one of {sorted(FAULT_MESSAGES)}", "BadRequestError", "status")
                if kv is not None and (not isinstance(kv, bool) or self.kv_events is None):
                    raise ApiError(400, "kv_events must be true or false, on a pod started with --kv-events-config",
                                   "BadRequestError", "kv_events")
            except ApiError as e:
                return e.response()
            if kv is None or "fail_next" in body or "status" in body:
                self.fail_next, self.fail_status = n, status
            if kv is not None and self.kv_events is not None:
                self.kv_events.sending = kv
        body = {"fail_next": self.fail_next, "status": self.fail_status, "failed": self.failed,
                "kv_events": self.kv_events.sending if self.kv_events is not None else None}
        return web.Response(body=orjson.dumps(body), content_type=JSON)

    async def load_lora(self, request: web.Request) -> web.Response:
        try:
            body = await self._parse(request)
            errors = []
            for key in ("lora_name", "lora_path"):
                if key not in body:
                    errors.append({"type": "missing", "loc": ("body", key), "msg": "Field required", "input": body})
                elif not isinstance(body[key], str):
                    errors.append({"type": "string_type", "loc": ("body", key), "msg": "Input should be a valid string",
                                   "input": body[key]})
            if errors:
                raise _bad_request_validation(errors)
            name, path = body["lora_name"], body["lora_path"]
            inplace = bool(body.get("load_inplace", False))
            if not name or not path:
                raise ApiError(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
            if name in self.config.served or name == self.config.model:
                raise ApiError(400, f"The lora adapter '{name}' conflicts with a served base model.", "InvalidUserInput")
            if name in self.loras and not inplace:
                raise ApiError(400, f"The lora adapter '{name}' has already been loaded. If you want to load the "
                               "adapter in place, set 'load_inplace' to True.", "InvalidUserInput")
            async with self._locks[name]:
                try:
                    ref, _ = await self._add_lora(name, path, inplace)
                except AdapterNotFound as e:
                    raise ApiError(404, str(e), "NotFoundError") from None
                except AdapterInvalid as e:
                    raise ApiError(500, f"Call to add_lora method failed: {e}", "InternalServerError") from None
                self.loras[name] = ref
        except ApiError as e:
            return e.response()
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora(self, request: web.Request) -> web.Response:
        try:
            body = await self._parse(request)
            if "lora_name" not in body or not isinstance(body["lora_name"], str):
                missing = "lora_name" not in body
                raise _bad_request_validation([{
                    "type": "missing" if missing else "string_type", "loc": ("body", "lora_name"),
                    "msg": "Field required" if missing else "Input should be a valid string",
                    "input": body if missing else body["lora_name"]}])
            name = body["lora_name"]
            if not name:
                raise ApiError(400, "'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput")
            if name not in self.loras:
                raise ApiError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
            del self.loras[name]
        except ApiError as e:
            return e.response()
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


@web.middleware
async def _fastapi_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return web.Response(status=404, body=b'{"detail":"Not Found"}', content_type=JSON)
    except web.HTTPMethodNotAllowed:
        return web.Response(status=405, body=b'{"detail":"Method Not Allowed"}', content_type=JSON)
    except web.HTTPException:
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as e:  # noqa: BLE001 - one log line, an OpenAI-shaped 500, no trace
        _log.error("vllm_sim: %s %s failed: %s: %s", request.method, request.path, type(e).__name__,
                   P.sanitize_message(str(e)))
        return web.Response(status=500, body=P.error_body("Internal server error", "InternalServerError", 500),
                            content_type=JSON)


def create_app(pod: Pod) -> web.Application:
    """The aiohttp application of one pod."""
    app = web.Application(middlewares=[_fastapi_errors], client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", pod.chat)
    app.router.add_post("/v1/completions", pod.completions)
    app.router.add_get("/v1/models", pod.models)
    app.router.add_get("/metrics", pod.metrics_route)
    app.router.add_get("/health", pod.health)
    app.router.add_get("/version", pod.version)
    app.router.add_post("/tokenize", pod.tokenize_route)
    app.router.add_post("/detokenize", pod.detokenize_route)
    app.router.add_post("/v1/chat/completions/render", pod.render_chat_route)
    app.router.add_post("/v1/completions/render", pod.render_completion_route)
    app.router.add_get("/sim/state", pod.sim_state)
    app.router.add_get("/sim/profile", pod.sim_profile)
    app.router.add_get("/sim/faults", pod.faults)
    app.router.add_post("/sim/faults", pod.faults)
    if pod.config.runtime_lora_updating:
        app.router.add_post("/v1/load_lora_adapter", pod.load_lora)
        app.router.add_post("/v1/unload_lora_adapter", pod.unload_lora)
    if pod.config.dev_mode:
        app.router.add_post("/reset_prefix_cache", pod.reset_prefix_cache)
    app["pod"] = pod
    return app


def runtime_updating_from_env() -> bool:
    return os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").strip().lower() in ("1", "true")


def dev_mode_from_env() -> bool:
    """``VLLM_SERVER_DEV_MODE`` (vLLM reads it as an integer flag)."""
    return os.environ.get("VLLM_SERVER_DEV_MODE", "").strip().lower() in ("1", "true")
