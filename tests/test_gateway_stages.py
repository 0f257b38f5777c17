"""The request path in-process: the gateway's ASGI app driven through ``httpx.ASGITransport`` (or
directly, for a disconnect), in front of scripted pods and sidecars on loopback
(``scripted_http``), with the in-memory store. Each test takes milliseconds; the end-to-end
tests with real processes are in test_gateway_e2e.py and test_gateway_faults.py."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from scripted_http import Request, Script, ScriptedServer, json_reply, sse_reply

from gateway.app import create_app
from gateway.config import load_config
from gateway.service import Gateway
from loraroute.procs import free_port
from scorer.model import PodState
from scorer.plugin import Scorer
from scorer.registry import register
from scorer.context import PickContext
from scorer.view import PodView

BASE = "tsuzumi-base"
ADMIN = {"Authorization": "Bearer admin-key"}


def chat(model: str = f"{BASE}:sql", **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, **kw}


def vllm(req: Request) -> Script:
    """A well-behaved pod: vLLM's answer shape, echoing the model it was sent."""
    body = req.json()
    if body.get("stream"):
        events = [b'data: {"id":"c","model":"%s","choices":[{"delta":{"content":"%s"}}]}\n\n'
                  % (body["model"].encode(), w) for w in (b"Hi", b" there")]
        return sse_reply([*events, b"data: [DONE]\n\n"])
    return json_reply({"id": "c", "object": "chat.completion", "model": body["model"],
                       "choices": [{"message": {"role": "assistant", "content": "Hi"}}]})


def state(pod_id: str, url: str, sidecar_url: str | None = None, **kw: Any) -> PodState:
    kw.setdefault("base_models", (BASE,))
    return PodState(pod_id, url, sidecar_url=sidecar_url, max_loras=2, max_lora_rank=16, observed_at=time.time(), **kw)


class Env:
    def __init__(self, gw: Gateway, client: httpx.AsyncClient, spec: dict[str, Any]) -> None:
        self.gw = gw
        self.client = client
        self.spec = spec

    def reload(self, **sections: Any) -> None:
        """Hot-reload the config with ``sections`` replaced (``server={...}``, ``pipeline=...``)."""
        self.gw.reload({**self.spec, **sections})

    async def post(self, body: dict[str, Any], path: str = "/v1/chat/completions", **kw: Any) -> httpx.Response:
        return await self.client.post(path, json=body, **kw)

    async def decisions(self) -> list[dict[str, Any]]:
        return (await self.client.get("/admin/decisions", headers=ADMIN)).json()["data"]

    async def metric(self, name: str, **labels: str) -> float:
        text = (await self.client.get("/metrics")).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@asynccontextmanager
async def gateway(states: list[PodState], **server: Any) -> AsyncIterator[Env]:
    """A started gateway whose static pods are ``states`` (published into its memory store)."""
    pods = [{"id": s.pod_id, "url": s.url, **({"sidecar_url": s.sidecar_url} if s.sidecar_url else {})}
            for s in states]
    spec = {
        "server": {"reload_poll_s": 0, **server},
        "bases": [{"name": BASE, "adapters": [{"name": "sql", "rank": 8}, "chat", "ghost"]}],
        "admin": {"api_key_sha256": [hashlib.sha256(b"admin-key").hexdigest()]},
        "discovery": {"static": pods, "monitor": "never"},
        "pipeline": {"preset": "default", "filters": [{"type": "healthy-fresh", "parameters": {"max_age_s": 60}},
                                                      "serves-base", "rank-fits"]},
    }
    gw = Gateway(load_config(spec, env={}), env={})
    await gw.start()
    for s in states:
        await gw.store.publish(s, ttl_s=60)
    app = create_app(gw, manage_lifecycle=False)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw", timeout=10) as c:
            yield Env(gw, c, spec)
    finally:
        await gw.close()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 30))


async def call_app(app: Any, body: dict[str, Any], gone_after: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """One request straight through the ASGI app, as uvicorn would pass it; the client
    disconnects once ``gone_after`` holds for a message the app sent. Returns what it sent."""
    sent: list[dict[str, Any]] = []
    gone = asyncio.Event()
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)
        if gone_after(msg):
            gone.set()

    await app({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}, receive, send)
    return sent


# --- route --------------------------------------------------------------------------------------------
def test_answers_carry_the_pod_the_explanation_and_the_clients_model_name() -> None:
    async def scenario() -> None:
        async with ScriptedServer(vllm) as pod, gateway([state("pod-a", pod.url, gpu_adapters=("sql",))]) as env:
            r = await env.post(chat(), headers={"x-loraroute-debug": "1", "x-loraroute-admin-key": "admin-key",
                                                "x-request-id": "req-1"})
            assert r.status_code == 200 and r.headers["x-loraroute-pod"] == "pod-a"
            assert r.json()["model"] == f"{BASE}:sql"  # vLLM said "sql"
            assert pod.requests[0].json()["model"] == "sql"  # ... because it was sent the name it knows
            assert pod.requests[0].headers["x-request-id"] == "req-1"
            assert json.loads(r.headers["x-loraroute-explain"])["picked"] == "pod-a"
            r = await env.post(chat(stream=True), headers={"x-loraroute-debug": "1"})  # no admin key
            assert "x-loraroute-explain" not in r.headers
            events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
            assert [e["model"] for e in events] == [f"{BASE}:sql"] * 2 and r.text.endswith("data: [DONE]\n\n")
            assert env.gw.runtime.pipeline.inflight("pod-a") == (0, 0)  # the books are closed

    run(scenario)


def test_no_pod_is_a_503_with_the_reasons_and_is_recorded() -> None:
    async def scenario() -> None:
        async with ScriptedServer(vllm) as pod, gateway([state("pod-a", pod.url, healthy=False),
                                                         state("pod-b", pod.url, base_models=("other",))]) as env:
            r = await env.post(chat())
            err = r.json()["error"]
            assert r.status_code == 503 and err["code"] == "no_pod_available"
            assert "pod-a: healthy-fresh" in err["message"] and "pod-b: serves-base" in err["message"]
            assert (await env.decisions())[0]["status"] == 503 and not pod.requests
            assert await env.metric("loraroute_requests_total", status="503", adapter="sql", pod="") == 1

    run(scenario)


# --- forward: retries and their policy ----------------------------------------------------------------
def failing_then(status: int) -> Callable[[Request], Script]:
    return lambda req: json_reply({"error": {"message": f"engine failed ({status})"}}, status=status)


def test_a_5xx_is_retried_on_the_next_pod_without_making_the_first_suspect() -> None:
    async def scenario() -> None:
        async with ScriptedServer(failing_then(503)) as a, ScriptedServer(vllm) as b, gateway(
                [state("pod-a", a.url, gpu_adapters=("sql",)), state("pod-b", b.url)]) as env:
            for stream in (False, True):
                r = await env.post(chat(stream=stream))
                assert r.status_code == 200 and r.headers["x-loraroute-pod"] == "pod-b"
            assert [d["attempts"] for d in await env.decisions()] == [["pod-a", "pod-b"]] * 2
            assert await env.metric("loraroute_retries_total", reason="status") == 2
            # with retries off the pod's own message reaches the client, naming the pod
            env.reload(server={"reload_poll_s": 0, "retries": 0})
            r = await env.post(chat())
            err = r.json()["error"]
            assert r.status_code == 502 and r.headers["x-loraroute-pod"] == "pod-a"
            assert err["code"] == "upstream_error" and err["message"] == "pod 'pod-a' failed: engine failed (503)"

    run(scenario)


def test_a_refused_connection_is_retried_and_the_pod_tried_last_for_a_while() -> None:
    async def scenario() -> None:
        dead = f"http://127.0.0.1:{free_port()}"
        async with ScriptedServer(vllm) as b, gateway(
                [state("pod-a", dead, gpu_adapters=("sql",)), state("pod-b", b.url)]) as env:
            for _ in range(3):
                r = await env.post(chat())
                assert r.status_code == 200 and r.headers["x-loraroute-pod"] == "pod-b"
            attempts = [d["attempts"] for d in reversed(await env.decisions())]
            assert attempts == [["pod-a", "pod-b"], ["pod-b"], ["pod-b"]]  # suspect: pod-a is not tried first
            assert await env.metric("loraroute_retries_total", reason="connect") == 1

    run(scenario)


def test_first_byte_timeout_and_empty_stream_move_on_and_the_last_failure_is_the_answer() -> None:
    def hangs(req: Request) -> Script:
        return Script([3.0])

    def empty(req: Request) -> Script:
        return sse_reply([])

    async def scenario() -> None:
        async with ScriptedServer(hangs) as a, ScriptedServer(empty) as b, ScriptedServer(vllm) as c, gateway(
                [state("pod-a", a.url, gpu_adapters=("sql",)), state("pod-b", b.url, cpu_adapters=("sql",)),
                 state("pod-c", c.url)],
                timeouts={"first_byte_s": 5.0, "first_byte_floor_s": 0.2, "first_byte_factor": 1.0}) as env:
            # each attempt waits max(floor, 1 × its predicted TTFT of ~20 ms): 0.2 s, within the 5 s budget
            r = await env.post(chat(stream=True))
            assert r.status_code == 200 and r.headers["x-loraroute-pod"] == "pod-c"
            assert (await env.decisions())[0]["attempts"] == ["pod-a", "pod-b", "pod-c"]
            assert await env.metric("loraroute_retries_total", reason="timeout") == 1
            assert await env.metric("loraroute_retries_total", reason="empty") == 1
            c.respond = hangs
            r = await env.post(chat(stream=True, max_tokens=5))
            err = r.json()["error"]
            assert r.status_code == 504 and err["code"] == "upstream_timeout"
            tried = (await env.decisions())[0]["attempts"]
            assert sorted(tried) == ["pod-a", "pod-b", "pod-c"] and tried[-1] == "pod-a"  # suspect: tried last
            assert err["message"] == f"pod 'pod-a' sent no response within 0.2s (tried {', '.join(tried)})"
            assert r.headers["x-loraroute-pod"] == "pod-a"

    run(scenario)


def test_a_pod_failing_mid_stream_ends_the_stream_with_an_error_event() -> None:
    async def scenario() -> None:
        def cut(req: Request) -> Script:
            return sse_reply([b'data: {"model":"sql","n":%d}\n\n' % i for i in range(5)], cut_after=2)

        async with ScriptedServer(cut) as pod, gateway([state("pod-a", pod.url)]) as env:
            r = await env.post(chat(stream=True))
            events = [e for e in r.text.split("\n\n") if e]
            assert r.status_code == 200 and events[-1] == "data: [DONE]"
            assert [json.loads(e[6:])["n"] for e in events[:2]] == [0, 1]
            assert json.loads(events[2][6:])["error"]["code"] == "upstream_stream_error"
            assert (await env.decisions())[0]["status"] == 502
            assert await env.metric("loraroute_requests_total", status="502", pod="pod-a") == 1

    run(scenario)


# --- forward: ensure ------------------------------------------------------------------------------------
def sidecar(outcomes: dict[str, int]) -> Callable[[Request], Script]:
    """A sidecar answering ``POST /adapters/{name}/ensure`` with the status given per adapter."""
    def respond(req: Request) -> Script:
        name = req.path.split("/")[2]
        status = outcomes.get(name, 200)
        return json_reply({"adapter": name} if status == 200 else {"error": {"message": f"{name}: no such adapter"}},
                          status=status)
    return respond


def test_ensure_runs_only_where_the_pods_state_lacks_the_adapter_and_a_missing_one_is_final() -> None:
    async def scenario() -> None:
        async with ScriptedServer(vllm) as pod, ScriptedServer(sidecar({"ghost": 404, "chat": 503})) as sc, gateway(
                [state("pod-a", pod.url, sc.url, cpu_adapters=("sql",)),
                 state("pod-b", pod.url, sc.url, disk_adapters=("sql",))]) as env:
            assert (await env.post(chat())).status_code == 200
            assert sc.requests == []  # in CPU on one pod, on disk on the other: nothing to fetch
            r = await env.post(chat(f"{BASE}:ghost"))
            assert r.status_code == 502 and r.json()["error"]["code"] == "adapter_ensure_failed"
            assert "no such adapter" in r.json()["error"]["message"]
            assert [q.path for q in sc.requests] == ["/adapters/ghost/ensure"]  # the same on every pod: no retry
            sc.requests.clear()
            r = await env.post(chat(f"{BASE}:chat"))  # this pod's sidecar trouble: the next pod, then a 503
            assert r.status_code == 503 and r.json()["error"]["code"] == "adapter_ensure_failed"
            assert len(sc.requests) == 2 and await env.metric("loraroute_retries_total", reason="ensure") == 2

    run(scenario)


# --- the client's side ----------------------------------------------------------------------------------
def test_a_client_that_goes_away_cancels_the_upstream_request() -> None:
    async def scenario() -> None:
        def slow(req: Request) -> Script:
            return sse_reply([b'data: {"model":"sql"}\n\n'] * 50, pause_s=0.05)

        async with ScriptedServer(slow) as pod, gateway([state("pod-a", pod.url)]) as env:
            app = create_app(env.gw, manage_lifecycle=False)
            sent = await call_app(app, chat(stream=True),
                                  lambda m: m["type"] == "http.response.body" and bool(m.get("body")))
            assert sent[0]["status"] == 200 and len(sent) < 10  # stopped early
            assert env.gw.runtime.pipeline.inflight("pod-a") == (0, 0)
            assert (await env.decisions())[0]["status"] == 499
            for _ in range(40):  # the pod sees the connection close
                if pod.eofs:
                    break
                await asyncio.sleep(0.05)
            assert pod.eofs == 1

    run(scenario)


@register
class Exploding(Scorer):
    """A scorer with a bug, to reach the gateway's last line of defence."""

    TYPE = "test-exploding"
    PARAMS = {}

    def score(self, views: list[PodView], ctx: PickContext) -> list[float]:
        raise RuntimeError("secret internals")


def test_an_unexpected_error_is_a_500_without_internals(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with ScriptedServer(vllm) as pod, gateway([state("pod-a", pod.url)]) as env:
            env.reload(pipeline={"scorers": ["test-exploding"]})
            r = await env.post(chat())
            assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
            assert "secret" not in r.text and "Traceback" not in r.text

    run(scenario)
    assert "RuntimeError" in caplog.text


def test_a_request_leaves_no_reference_cycles_behind() -> None:
    """Every request's objects are freed by reference counting: no per-request work for the
    garbage collector (whose full passes stall the loop). Through the ASGI app directly, so that
    only the gateway's own objects count."""

    async def scenario() -> None:
        async with ScriptedServer(vllm) as pod, gateway([state("pod-a", pod.url, gpu_adapters=("sql",))]) as env:
            app = create_app(env.gw, manage_lifecycle=False)

            async def one(stream: bool) -> int:  # the client goes once the response is complete
                sent = await call_app(app, chat(stream=stream),
                                      lambda m: m["type"] == "http.response.body" and not m.get("more_body"))
                return int(sent[0]["status"])

            for stream in (False, True):  # warm: pooled connection, metric children, caches
                assert await one(stream) == 200
            gc.collect()
            gc.disable()
            try:
                for i in range(40):
                    assert await one(i % 2 == 1) == 200
                await asyncio.sleep(0.05)  # let cancelled watchers finish
                assert gc.collect() < 40  # fewer than one object in a cycle per request
            finally:
                gc.enable()

    run(scenario)
