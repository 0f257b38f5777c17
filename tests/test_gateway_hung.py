"""Hung and failing pods, in-process (the helpers of test_gateway_stages.py, scripted pods on
loopback): each attempt's first-byte limit follows the pod's predicted TTFT — a hung pod is left
quickly, a legitimately long prefill is not cut — attempts waiting on a pod its monitor marks
unhealthy move on at once, a stalled stream ends with the error event, and only what another
pod can fix is retried."""

from __future__ import annotations

import asyncio
import json
import time

from scripted_http import Request, Script, ScriptedServer, json_reply, sse_reply
from test_gateway_stages import BASE, chat, gateway, run, state, vllm

from scorer.model import AdapterRef, RoutingRequest

BASE_VLLM = BASE  # the test gateway serves the base under its own name

# attempt limit = max(floor, factor × predicted TTFT): 0.3 s for a pod that holds the adapter
FAST = {"first_byte_s": 20.0, "first_byte_floor_s": 0.3, "first_byte_factor": 4.0}


def hangs(req: Request) -> Script:
    return Script([30.0])


def test_a_hung_pod_is_left_after_its_predicted_deadline_not_the_first_byte_timeout() -> None:
    async def scenario() -> None:
        async with ScriptedServer(hangs) as a, ScriptedServer(vllm) as b, gateway(
                [state("pod-a", a.url, gpu_adapters=("sql",)), state("pod-b", b.url)], timeouts=FAST) as env:
            env.gw.suspects.hold_s = 0.0  # so that the second request tries pod-a first again
            for stream in (True, False):
                t0 = time.perf_counter()
                r = await env.post(chat(stream=stream))
                took = time.perf_counter() - t0
                assert r.status_code == 200 and r.headers["x-loraroute-pod"] == "pod-b", r.text
                assert 0.25 < took < 2.0, took  # the floor, not first_byte_s (20 s)
                assert (await env.decisions())[0]["attempts"][-1] == "pod-b"
            assert await env.metric("loraroute_retries_total", reason="timeout") >= 1

    run(scenario)


def test_a_long_prefill_is_not_cut_but_the_same_wait_on_a_short_one_is() -> None:
    """The same wait before the first byte — twice what the pipeline predicts for a prompt of
    ~80k tokens — is waited for on that prompt (its limit is 4 × the prediction) and not on a
    4-token one (predicted a few ms: its limit is the 0.3 s floor), which moves to the next pod."""
    wait = {"s": 0.0}

    def slow_first_byte(req: Request) -> Script:
        reply = sse_reply([b'data: {"model":"sql","n":1}\n\n', b"data: [DONE]\n\n"])
        return Script([wait["s"], *reply.pieces])

    async def scenario() -> None:
        async with ScriptedServer(slow_first_byte) as a, ScriptedServer(vllm) as b, gateway(
                [state("pod-a", a.url, gpu_adapters=("sql",)), state("pod-b", b.url)], timeouts=FAST) as env:
            long_prompt = chat(stream=True, messages=[{"role": "user", "content": "x" * 320_000}])
            pipeline = env.gw.runtime.pipeline
            probe = RoutingRequest(AdapterRef(BASE_VLLM, "sql", 8), prompt_tokens=80_001, max_tokens=4,
                                   prefix_hashes=(), session_key=None, request_id="probe")
            decision = pipeline.pick(probe, env.gw.pods, time.time())
            predicted = pipeline.predicted_ttft_s(decision, "pod-a")
            assert predicted is not None and predicted > 0.2, predicted
            wait["s"] = 2 * predicted
            env.gw.suspects.hold_s = 0.0  # the pod left by the short prompt is tried first again
            r = await env.post(chat(stream=True))
            assert r.status_code == 200 and r.headers["x-loraroute-pod"] == "pod-b"
            assert (await env.decisions())[0]["attempts"] == ["pod-a", "pod-b"]
            r = await env.post(long_prompt)
            assert r.status_code == 200 and r.headers["x-loraroute-pod"] == "pod-a", r.text
            assert (await env.decisions())[0]["attempts"] == ["pod-a"]

    run(scenario)


def test_requests_waiting_on_a_pod_marked_unhealthy_move_to_the_next_pod_at_once() -> None:
    async def scenario() -> None:
        # the floor is 10 s: only the monitor's verdict can move the request within the second
        async with ScriptedServer(hangs) as a, ScriptedServer(vllm) as b, gateway(
                [state("pod-a", a.url, gpu_adapters=("sql",)), state("pod-b", b.url)]) as env:
            async def mark_unhealthy() -> None:
                await asyncio.sleep(0.3)
                await env.gw.store.publish(state("pod-a", a.url, gpu_adapters=("sql",), healthy=False), ttl_s=60)

            marker = asyncio.create_task(mark_unhealthy())
            t0 = time.perf_counter()
            r = await env.post(chat(stream=True))
            took = time.perf_counter() - t0
            await marker
            assert r.status_code == 200 and r.headers["x-loraroute-pod"] == "pod-b", r.text
            assert took < 1.5, took
            assert (await env.decisions())[0]["attempts"] == ["pod-a", "pod-b"]
            assert await env.metric("loraroute_retries_total", reason="unhealthy") == 1

    run(scenario)


def test_a_stream_that_stalls_mid_way_ends_with_the_error_event_after_the_idle_limit() -> None:
    def stalls(req: Request) -> Script:
        reply = sse_reply([b'data: {"model":"sql","n":%d}\n\n' % i for i in range(3)] + [b"data: [DONE]\n\n"])
        return Script([*reply.pieces[:3], 30.0, *reply.pieces[3:]])  # head, two events, then silence

    async def scenario() -> None:
        async with ScriptedServer(stalls) as a, gateway([state("pod-a", a.url)],
                                                        timeouts={"idle_s": 0.4, "idle_unhealthy_s": 0.2}) as env:
            t0 = time.perf_counter()
            r = await env.post(chat(stream=True))
            took = time.perf_counter() - t0
            events = [e for e in r.text.split("\n\n") if e]
            assert r.status_code == 200 and events[-1] == "data: [DONE]"
            assert [json.loads(e[6:])["n"] for e in events[:2]] == [0, 1]
            err = json.loads(events[2][6:])["error"]
            assert err["code"] == "upstream_stream_error" and "sent nothing for 0.4s" in err["message"]
            assert 0.35 < took < 2.0, took
            assert (await env.decisions())[0]["status"] == 502

    run(scenario)


def test_a_stream_on_a_pod_marked_unhealthy_gets_the_shorter_idle_limit() -> None:
    def stalls(req: Request) -> Script:
        reply = sse_reply([b'data: {"model":"sql","n":0}\n\n', b"data: [DONE]\n\n"])
        return Script([*reply.pieces[:2], 30.0, *reply.pieces[2:]])

    async def scenario() -> None:
        async with ScriptedServer(stalls) as a, gateway([state("pod-a", a.url)],
                                                        timeouts={"idle_s": 30.0, "idle_unhealthy_s": 0.3}) as env:
            async def mark_unhealthy() -> None:
                await asyncio.sleep(0.3)
                await env.gw.store.publish(state("pod-a", a.url, healthy=False), ttl_s=60)

            marker = asyncio.create_task(mark_unhealthy())
            t0 = time.perf_counter()
            r = await env.post(chat(stream=True))
            await marker
            took = time.perf_counter() - t0
            events = [e for e in r.text.split("\n\n") if e]
            assert json.loads(events[1][6:])["error"]["code"] == "upstream_stream_error" and events[-1] == "data: [DONE]"
            assert took < 2.0, took  # not idle_s (30 s): the pod's monitor gave up on it

    run(scenario)


def test_only_what_another_pod_can_fix_is_retried() -> None:
    rank_error = {"error": {"message": "Call to add_lora method failed: LoRA rank 128 is greater than "
                                       "max_lora_rank 64.", "type": "InternalServerError", "param": None, "code": 500}}
    engine_dead = {"error": {"message": "EngineCore encountered an issue.", "type": "InternalServerError",
                             "param": None, "code": 500}}
    answers: dict[str, Script] = {}

    def failing(req: Request) -> Script:
        return answers["now"]

    async def scenario() -> None:
        async with ScriptedServer(failing) as a, ScriptedServer(vllm) as b, gateway(
                [state("pod-a", a.url, gpu_adapters=("sql",)), state("pod-b", b.url)]) as env:
            for status, body, retried in ((500, rank_error, False), (500, engine_dead, True), (503, engine_dead, True),
                                          (429, engine_dead, True), (501, engine_dead, False),
                                          (400, {"error": {"message": "bad", "type": "BadRequestError"}}, False)):
                answers["now"] = json_reply(body, status)
                r = await env.post(chat())
                attempts = (await env.decisions())[0]["attempts"]
                if retried:
                    assert r.status_code == 200 and attempts == ["pod-a", "pod-b"], (status, r.text)
                else:  # final: the pod's own answer, unchanged
                    assert r.status_code == status and r.json() == body and attempts == ["pod-a"], (status, r.text)

    run(scenario)
