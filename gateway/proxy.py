"""The hot path: ``POST /v1/chat/completions`` and ``POST /v1/completions`` as a raw ASGI handler.

One request: read the body (``server.max_body_bytes``, 413 above it) → authenticate (401) → parse
the JSON (400) and check the few fields routing needs (400) → resolve the model name against the
allowlist and tenant (400/403/404) → rewrite ``model`` to the vLLM name (the request JSON is small
and re-encoded with orjson; the *response* never is) → block hashes of the prompt → ``pick`` →
forward to the chosen pod, falling back to the next-best candidates:

- attempts = 1 + ``server.retries``, over the decision's ranked candidates, best first;
- an attempt is retried on another pod after a connect error, a 5xx status, a failed sidecar
  ensure (unless the adapter itself is missing or invalid) or a first-byte timeout — only while
  nothing has been sent to the client;
- streaming: the response starts when the pod's first body chunk arrives, then upstream bytes are
  passed through as they arrive; a failure after that ends the stream with
  ``data: {"error": {...}}`` and ``data: [DONE]`` (vLLM's own mid-stream error form);
- a client disconnect cancels the upstream request (a watcher on ``receive`` cancels the handler).

No Redis call, no lock, no await between reading the routable view and ``pick``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

import orjson

from gateway.ensure import EnsureError
from gateway.errors import APIError
from gateway.policy import Resolved, Tenant
from gateway.service import DecisionRecord, Gateway
from gateway.upstream import UpstreamResponse
from scorer.model import Decision, PodState, RoutingRequest

log = logging.getLogger("loraroute.gateway")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_JSON = b"application/json"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_UPSTREAM_HEADERS = {"Content-Type": "application/json", "Accept": "*/*"}


class _ClientGone(Exception):
    pass


class _Retry(Exception):
    """This attempt failed before anything reached the client; try the next pod."""

    def __init__(self, reason: str, error: APIError) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


def _residency_tier(state: PodState | None, adapter: str | None) -> str:
    if adapter is None:
        return "base"
    if state is None:
        return "none"
    if adapter in state.gpu_adapters:
        return "gpu"
    if adapter in state.cpu_adapters:
        return "cpu"
    if adapter in state.loading_adapters:
        return "loading"
    if adapter in state.disk_adapters:
        return "disk"
    return "none"


def _chat_text(messages: list[Any]) -> str:
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


def _completion_text(prompt: Any) -> tuple[str, int]:
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


SUSPECT_S = 2.0
"""Seconds a pod that refused a connection or timed out is tried only after every other candidate."""


def _ranked_ids(decision: Decision) -> Iterator[str]:
    """The picked pod, then (only if a retry needs them) the other candidates, best first."""
    assert decision.pod_id is not None
    yield decision.pod_id
    for pod_id in decision.ranked_ids():  # the pipeline's decisions: without building candidates
        if pod_id != decision.pod_id:
            yield pod_id


def _fallback_order(decision: Decision, suspect_until: dict[str, float]) -> Iterator[str]:
    """``_ranked_ids``, with pods that just failed to connect moved to the end."""
    if not suspect_until:
        yield from _ranked_ids(decision)
        return
    now = time.monotonic()
    for pod_id, until in list(suspect_until.items()):
        if until <= now:
            del suspect_until[pod_id]
    later = []
    for pod_id in _ranked_ids(decision):
        if pod_id in suspect_until:
            later.append(pod_id)
        else:
            yield pod_id
    yield from later


#: candidates (best first) and filtered pods carried in x-loraroute-explain; the rest are counted
#: (headers must stay small: common clients refuse header blocks above 16-64 KiB). The full
#: explanation is in GET /admin/decisions.
EXPLAIN_HEADER_MAX = 16


def _explain_header(decision: Decision) -> bytes:
    data = decision.explain()
    cands, filtered = data["candidates"], data["filtered"]
    if len(cands) > EXPLAIN_HEADER_MAX:
        data["candidates"] = cands[:EXPLAIN_HEADER_MAX]
        data["candidates_omitted"] = len(cands) - EXPLAIN_HEADER_MAX
    if len(filtered) > EXPLAIN_HEADER_MAX:
        data["filtered"] = dict(list(filtered.items())[:EXPLAIN_HEADER_MAX])
        data["filtered_omitted"] = len(filtered) - EXPLAIN_HEADER_MAX
    return orjson.dumps(data)


def _matched_blocks(decision: Decision, pod_id: str) -> float:
    """Prompt blocks the prefix scorer found cached on ``pod_id`` at pick time (0 if it did not run)."""
    return float(decision.matched_blocks(pod_id))


class CompletionsEndpoint:
    """ASGI handler for one of the two OpenAI completion routes (``kind`` = chat | completions)."""

    def __init__(self, gw: Gateway, path: str) -> None:
        self.gw = gw
        self.path = path
        self.chat = path.endswith("/chat/completions")

    # --- entry ----------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        gw = self.gw
        rt = gw.runtime
        cfg = rt.config
        authorization = debug = request_id = session = None
        content_length = -1
        session_header = cfg.server.session_header.lower().encode()
        admin_header: str | None = None
        for k, v in scope["headers"]:
            if k == b"authorization":
                authorization = v.decode("latin-1")
            elif k == b"content-length":
                with contextlib.suppress(ValueError):
                    content_length = int(v)
            elif k == b"x-loraroute-debug":
                debug = v
            elif k == b"x-request-id":
                rid = v.decode("latin-1")
                request_id = rid if _SAFE_ID.match(rid) else None  # forwarded upstream: keep it plain
            elif k == session_header:
                session = v.decode("latin-1")[:256]
            elif k == b"x-loraroute-admin-key":
                admin_header = "Bearer " + v.decode("latin-1")
        labels = ("", "")
        try:
            if scope["method"] != "POST":
                raise APIError(405, f"use POST for {self.path}", code="method_not_allowed")
            # The admin key works as the bearer key (all models allowed) or, next to a tenant key,
            # in x-loraroute-admin-key (to ask for x-loraroute-explain as that tenant).
            bearer_admin = rt.policy.admin_configured and rt.policy.is_admin(authorization)
            is_admin = bearer_admin or (admin_header is not None and rt.policy.is_admin(admin_header))
            tenant: Tenant | None = None if bearer_admin else rt.policy.authenticate(authorization)
            body = await self._read_body(receive, cfg.server.max_body_bytes, content_length)
            payload, resolved, req = self._parse(rt, tenant, body, session, request_id)
            labels = (resolved.base_label, resolved.adapter_label)
        except APIError as e:
            await self._send_error(send, e)
            gw.metrics.request(e.status, labels[0], labels[1], "")
            return
        except _ClientGone:
            gw.metrics.request(499, "", "", "")
            return
        await self._route(scope, receive, send, t0, rt, tenant, payload, resolved, req,
                          debug == b"1" and is_admin)

    # --- request parsing ------------------------------------------------------------------------
    async def _read_body(self, receive: Receive, limit: int, content_length: int) -> bytes:
        if content_length > limit:
            raise APIError(413, f"request body of {content_length} bytes is over the limit of {limit} bytes",
                           code="request_too_large")
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise _ClientGone()
            chunk = msg.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"request body is over the limit of {limit} bytes", code="request_too_large")
                chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _parse(
        self, rt: Any, tenant: Tenant | None, body: bytes, session: str | None, request_id: str | None
    ) -> tuple[dict[str, Any], Resolved, RoutingRequest]:
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
        if self.chat:
            messages = payload.get("messages")
            if not isinstance(messages, list) or not messages:
                raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
            text = _chat_text(messages)
            tokens = len(text) // 4
        else:
            if "prompt" not in payload:
                raise APIError(400, "'prompt' is required", param="prompt")
            text, tokens = _completion_text(payload["prompt"])
        resolved = rt.policy.resolve(tenant, payload["model"])
        payload["model"] = resolved.ref.vllm_model
        cfg = rt.config.server
        if len(text) > cfg.prefix_max_chars:
            text = text[: cfg.prefix_max_chars]
        hashes = rt.pipeline.hash_prompt(resolved.ref.base, resolved.ref.name, text) if text else ()
        req = RoutingRequest(
            adapter=resolved.ref,
            prompt_tokens=tokens,
            max_tokens=max_tokens or 0,
            prefix_hashes=hashes,
            session_key=session,
            request_id=request_id or uuid.uuid4().hex[:16],
        )
        return payload, resolved, req

    # --- routing and forwarding -----------------------------------------------------------------
    async def _route(
        self, scope: Scope, receive: Receive, send: Send, t0: float, rt: Any, tenant: Tenant | None,
        payload: dict[str, Any], resolved: Resolved, req: RoutingRequest, explain: bool,
    ) -> None:
        gw = self.gw
        base_l, adapter_l = resolved.base_label, resolved.adapter_label
        pods = gw.pods
        now = time.time()
        d0 = time.perf_counter()
        decision: Decision = rt.pipeline.pick(req, pods, now)
        gw.metrics.decision.observe(time.perf_counter() - d0)
        if decision.pod_id is None:
            if not pods:
                msg = ("no pod is available: discovery found none, or none has published its state yet; "
                       "check GET /admin/pods")
            else:
                why = "; ".join(f"{p}: {r}" for p, r in sorted(decision.filtered.items())[:8])
                msg = f"no pod can serve model {resolved.client_name!r} right now ({why or decision.reason})"
            err = APIError(503, msg, code="no_pod_available")
            gw.record(DecisionRecord(now, req.request_id, resolved.client_name, tenant.name if tenant else None,
                                     decision, [], 503))
            await self._send_error(send, err)
            gw.metrics.request(503, base_l, adapter_l, "")
            return
        gw.metrics.decided(decision.policy, decision.pod_id)
        record = DecisionRecord(now, req.request_id, resolved.client_name, tenant.name if tenant else None,
                                decision, [])
        gw.record(record)
        stream = bool(payload.get("stream"))
        body = orjson.dumps(payload)
        explain_value = _explain_header(decision) if explain else None

        # watch for the client going away while we wait on the pod
        task = asyncio.current_task()
        state = {"gone": False, "done": False}

        async def watch() -> None:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    if not state["done"]:
                        state["gone"] = True
                        assert task is not None
                        task.cancel()
                    return

        watcher = asyncio.get_running_loop().create_task(watch())
        status = 0
        pod_label = ""
        try:
            status, pod_label = await self._attempts(
                send, t0, rt, decision, req, resolved, body, stream, record, explain_value, state
            )
        except asyncio.CancelledError:
            if not state["gone"]:
                raise
            status = 499
            # the client is gone: swallow the cancellation, nothing more to send
            t = asyncio.current_task()
            if t is not None:
                t.uncancel()
        finally:
            state["done"] = True
            watcher.cancel()
        record.status = status
        gw.metrics.request(status, base_l, adapter_l, pod_label)
        gw.metrics.e2e(pod_label, time.perf_counter() - t0)

    async def _attempts(
        self, send: Send, t0: float, rt: Any, decision: Decision, req: RoutingRequest, resolved: Resolved,
        body: bytes, stream: bool, record: DecisionRecord, explain_value: bytes | None, state: dict[str, bool],
    ) -> tuple[int, str]:
        gw = self.gw
        cfg = rt.config
        max_attempts = 1 + cfg.server.retries
        last: APIError | None = None
        adapter = req.adapter.name
        for pod_id in _fallback_order(decision, gw.suspect_until):
            if len(record.attempts) >= max_attempts:
                break
            ep = gw.endpoint(pod_id)
            if ep is None:
                continue
            record.attempts.append(pod_id)
            pod_state = gw.pods.get(pod_id)
            tier = _residency_tier(pod_state, adapter)
            gw.runtime.pipeline.on_dispatch(pod_id, req, time.time())
            gw.inflight[pod_id] += 1
            ok = False
            try:
                if (
                    tier == "none" and adapter is not None and ep.sidecar_url and cfg.ensure.enabled
                    and not gw.ensurer.recently_ensured(pod_id, adapter, cfg.ensure.remember_s)
                ):
                    try:
                        await asyncio.wait_for(gw.ensurer.ensure(pod_id, ep.sidecar_url, adapter), cfg.ensure.timeout_s)
                    except asyncio.TimeoutError:
                        raise _Retry("ensure", APIError(
                            503, f"pod {pod_id!r} did not materialise adapter {adapter!r} within "
                                 f"{cfg.ensure.timeout_s:g}s", code="adapter_ensure_timeout")) from None
                    except EnsureError as e:
                        err = APIError(e.status, e.message, code="adapter_ensure_failed")
                        if e.permanent:
                            last = err
                            break
                        raise _Retry("ensure", err) from None
                if len(record.attempts) == 1:
                    gw.metrics.residency(pod_id, tier)
                    self._prefix_metric(record.decision, pod_id, len(req.prefix_hashes))
                status = await self._forward(send, t0, pod_id, ep.url, body, stream, explain_value, state,
                                             req.request_id, resolved)
                ok = status < 400
                return status, pod_id
            except _Retry as r:
                last = r.error
                gw.metrics.retry(r.reason)
                if r.reason in ("connect", "timeout"):
                    gw.suspect_until[pod_id] = time.monotonic() + SUSPECT_S
                continue
            finally:
                gw.inflight[pod_id] -= 1
                if gw.inflight[pod_id] <= 0:
                    del gw.inflight[pod_id]
                gw.runtime.pipeline.on_complete(pod_id, req, ok)
        if last is None:
            last = APIError(503, "no reachable pod for this request", code="no_pod_available")
        elif len(record.attempts) > 1:
            last = APIError(last.status, f"{last.message} (tried {', '.join(record.attempts)})",
                            type_=last.type, param=last.param, code=last.code)
        await self._send_error(send, last, pod=record.attempts[-1] if record.attempts else None)
        return last.status, record.attempts[-1] if record.attempts else ""

    def _prefix_metric(self, decision: Decision, pod_id: str, blocks: int) -> None:
        if blocks:
            self.gw.metrics.prefix(pod_id, blocks, _matched_blocks(decision, pod_id))

    async def _forward(
        self, send: Send, t0: float, pod_id: str, base_url: str, body: bytes, stream: bool,
        explain_value: bytes | None, state: dict[str, bool], request_id: str, resolved: Resolved,
    ) -> int:
        upstream = self.gw.upstream
        resp: UpstreamResponse | None = None
        try:
            try:
                if stream:
                    async with asyncio.timeout(upstream.first_byte_s):
                        resp = await upstream.post(base_url, self.path, body, request_id)
                        if resp.status >= 500:
                            raise _Retry("status", await self._status_error(pod_id, resp))
                        first = await resp.read_chunk() if resp.status == 200 else await resp.read_all()
                        if not first and resp.status == 200:
                            raise _Retry("empty", APIError(502, f"pod {pod_id!r} closed the stream before "
                                                                f"sending anything", code="upstream_error"))
                else:
                    resp = await upstream.post(base_url, self.path, body, request_id)
                    if resp.status >= 500:
                        raise _Retry("status", await self._status_error(pod_id, resp))
                    first = await resp.read_all()
            except TimeoutError:
                raise _Retry("timeout", APIError(
                    504, f"pod {pod_id!r} sent no response within "
                         f"{upstream.first_byte_s if stream else upstream.total_s:g}s",
                    code="upstream_timeout")) from None
            except OSError as e:
                raise _Retry("connect", APIError(
                    502, f"pod {pod_id!r} is unreachable or dropped the connection ({e})",
                    code="upstream_unreachable")) from None

            headers = [
                (b"content-type", resp.headers.get("content-type", "application/json").encode("latin-1")),
                (b"x-loraroute-pod", pod_id.encode("latin-1")),
            ]
            if explain_value is not None:
                headers.append((b"x-loraroute-explain", explain_value))
            rid = resp.headers.get("x-request-id")
            if rid:
                headers.append((b"x-request-id", rid.encode("latin-1")))
            if not (stream and resp.status == 200):
                headers.append((b"content-length", str(len(first)).encode()))
                state["done"] = True
                await send({"type": "http.response.start", "status": resp.status, "headers": headers})
                await send({"type": "http.response.body", "body": first, "more_body": False})
                return resp.status

            headers.append((b"cache-control", b"no-cache"))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": first, "more_body": True})
            self.gw.metrics.ttft(pod_id, resolved.base_label, resolved.adapter_label, time.perf_counter() - t0)
            tail = first
            status = 200
            read = resp.read_chunk
            try:
                while True:
                    chunk = await read()
                    if not chunk:
                        break
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    tail = chunk
            except (OSError, TimeoutError) as e:
                status = 502
                what = "timed out" if isinstance(e, TimeoutError) else "failed"
                err = APIError(502, f"pod {pod_id!r} {what} mid-stream; the response is incomplete",
                               code="upstream_stream_error")
                sep = b"" if tail.endswith(b"\n\n") else b"\n\n"
                log.warning("pod %s %s mid-stream", pod_id, what)
                await send({"type": "http.response.body", "body": sep + err.sse_event(), "more_body": True})
            state["done"] = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return status
        finally:
            if resp is not None:
                resp.release()

    async def _status_error(self, pod_id: str, resp: UpstreamResponse) -> APIError:
        try:
            raw = await asyncio.wait_for(resp.read_all(), 2.0)
            data = orjson.loads(raw)
            msg = data["error"]["message"] if isinstance(data.get("error"), dict) else str(data)[:300]
        except Exception:
            msg = f"status {resp.status}"
        return APIError(502, f"pod {pod_id!r} failed: {msg}", code="upstream_error")

    async def _send_error(self, send: Send, err: APIError, pod: str | None = None) -> None:
        body = err.body()
        headers = [(b"content-type", _JSON), (b"content-length", str(len(body)).encode())]
        if pod:
            headers.append((b"x-loraroute-pod", pod.encode("latin-1")))
        if err.status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
