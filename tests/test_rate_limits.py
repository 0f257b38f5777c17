"""Tenant limits: requests and prompt tokens per minute and requests in flight, answered 429 with
Retry-After in OpenAI's rate_limit_error shape; hot-reloadable; counted per tenant in the
metrics; and shared by two gateway processes through a real Redis."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from scripted_http import Request, Script, ScriptedServer, json_reply

from gateway.app import create_app
from gateway.config import TenantLimits, load_config
from gateway.limits import Limiter, RateLimited
from gateway.policy import Tenant
from gateway.service import Gateway
from loraroute.procs import free_port, http_ready, loraroute_cmd
from scorer.model import PodState

BASE = "tsuzumi-base"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def chat(content: str = "hello") -> dict[str, Any]:
    return {"model": f"{BASE}:sql", "messages": [{"role": "user", "content": content}], "max_tokens": 2}


def reply(req: Request) -> Script:
    return json_reply({"id": "c", "object": "chat.completion", "model": "sql",
                       "choices": [{"message": {"role": "assistant", "content": "ok"}}]})


def spec(pod_url: str, acme_limits: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "server": {"reload_poll_s": 0},
        "bases": [{"name": BASE, "adapters": ["sql"]}],
        "tenants": [{"name": "acme", "api_key_sha256": [digest("acme-key")], "limits": acme_limits},
                    {"name": "free", "api_key_sha256": [digest("free-key")]}],
        "discovery": {"static": [{"id": "pod-0", "url": pod_url}], "monitor": "never"},
        **extra,
    }


@asynccontextmanager
async def gateway(config: dict[str, Any]) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    gw = Gateway(load_config(config, env={}), env={})
    await gw.start()
    url = config["discovery"]["static"][0]["url"]
    await gw.store.publish(PodState("pod-0", url, base_models=(BASE,), observed_at=time.time()), ttl_s=60)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(gw, manage_lifecycle=False)),
                                     base_url="http://gw", timeout=10) as client:
            yield gw, client
    finally:
        await gw.close()


def as_(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def metric(text: str, name: str, **labels: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_requests_per_minute_429_shape_retry_after_reload_and_metrics() -> None:
    async def scenario() -> None:
        async with ScriptedServer(reply) as pod:
            config = spec(pod.url, {"requests_per_minute": 3})
            async with gateway(config) as (gw, client):
                statuses = [(await client.post("/v1/chat/completions", json=chat(), headers=as_("acme-key"))).status_code
                            for _ in range(3)]
                assert statuses == [200, 200, 200]
                r = await client.post("/v1/chat/completions", json=chat(), headers=as_("acme-key"))
                assert r.status_code == 429
                assert 1 <= int(r.headers["retry-after"]) <= 120  # at most: the rest of this minute and the next
                assert r.json() == {"error": {
                    "message": r.json()["error"]["message"], "type": "rate_limit_error",
                    "param": "requests_per_minute", "code": "rate_limit_exceeded"}}
                assert "tenant 'acme'" in r.json()["error"]["message"] and "limit is 3" in r.json()["error"]["message"]
                # the official client sees a RateLimitError
                oa = openai.AsyncOpenAI(base_url="http://gw/v1", api_key="acme-key", max_retries=0,
                                        http_client=httpx.AsyncClient(transport=client._transport))
                with pytest.raises(openai.RateLimitError):
                    await oa.chat.completions.create(**chat())
                # another tenant is not affected
                assert (await client.post("/v1/chat/completions", json=chat(), headers=as_("free-key"))).status_code == 200
                # a reload raises the limit: admitted again at once, counts kept
                config["tenants"][0]["limits"] = {"requests_per_minute": 10}
                gw.reload(config)
                assert (await client.post("/v1/chat/completions", json=chat(), headers=as_("acme-key"))).status_code == 200
                text = (await client.get("/metrics")).text
                assert metric(text, "loraroute_tenant_rejected_total", tenant="acme", limit="requests_per_minute") == 2
                assert metric(text, "loraroute_tenant_requests_total", tenant="acme") == 4
                assert metric(text, "loraroute_requests_total", status="429") == 2

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_concurrent_requests_and_prompt_tokens_per_minute() -> None:
    def slow(req: Request) -> Script:
        return Script([0.5, *reply(req).pieces])

    async def scenario() -> None:
        async with ScriptedServer(slow) as pod:
            limits = {"concurrent_requests": 1, "prompt_tokens_per_minute": 100}
            async with gateway(spec(pod.url, limits)) as (gw, client):
                first = asyncio.create_task(client.post("/v1/chat/completions", json=chat("a" * 40),
                                                        headers=as_("acme-key")))
                await asyncio.sleep(0.2)
                r = await client.post("/v1/chat/completions", json=chat("b" * 40), headers=as_("acme-key"))
                assert r.status_code == 429 and r.json()["error"]["param"] == "concurrent_requests"
                assert r.headers["retry-after"] == "1"
                assert (await first).status_code == 200
                assert gw.limiter.snapshot()[0][3] == 0  # the slot came back
                # "user" + 200 characters ≈ 51 tokens (4 characters a token) after the first 11: one fits, two do not
                assert (await client.post("/v1/chat/completions", json=chat("c" * 200),
                                          headers=as_("acme-key"))).status_code == 200
                r = await client.post("/v1/chat/completions", json=chat("d" * 200), headers=as_("acme-key"))
                assert r.status_code == 429 and r.json()["error"]["param"] == "prompt_tokens_per_minute"
                # a prompt larger than the whole minute's budget can never fit: said so
                r = await client.post("/v1/chat/completions", json=chat("e" * 800), headers=as_("acme-key"))
                assert r.status_code == 429 and "send a shorter one" in r.json()["error"]["message"]

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_the_sliding_window_and_its_retry_after() -> None:
    clock = [1_000_040.0]  # 20 s into a minute
    limiter = Limiter(clock=lambda: clock[0])
    tenant = Tenant("t", frozenset(), TenantLimits(requests_per_minute=10))
    for _ in range(10):
        limiter.admit(tenant)
    with pytest.raises(RateLimited) as full:
        limiter.admit(tenant)
    # the current minute alone holds 10: it fits only once that minute is the older one and its
    # weight has shrunk by one request: 40 s + 60 s × (1 − 9/10)
    assert full.value.headers == ((b"retry-after", b"46"),)
    clock[0] += 46.0
    assert limiter.used("t", "requests") == pytest.approx(9.0, abs=0.01)
    limiter.admit(tenant)
    with pytest.raises(RateLimited):
        limiter.admit(tenant)
    assert json.loads(full.value.body())["error"]["type"] == "rate_limit_error"


def test_a_request_refused_for_its_prompt_tokens_does_not_count_as_a_request() -> None:
    clock = [1_000_010.0]
    limiter = Limiter(clock=lambda: clock[0])
    tenant = Tenant("t", frozenset(), TenantLimits(requests_per_minute=5, prompt_tokens_per_minute=100))
    for _ in range(3):
        admitted = limiter.admit(tenant)
        with pytest.raises(RateLimited) as refused:
            limiter.admit_tokens(admitted, 500)  # more than a minute allows at all
        limiter.release(admitted)
    assert json.loads(refused.value.body())["error"]["param"] == "prompt_tokens_per_minute"
    assert limiter.used("t", "requests") == pytest.approx(0.0)
    assert limiter.used("t", "tokens") == pytest.approx(0.0)
    for _ in range(5):  # the whole request budget is still there
        limiter.admit_tokens(limiter.admit(tenant), 10)
    assert limiter.used("t", "tokens") == pytest.approx(50.0)
    with pytest.raises(RateLimited):
        limiter.admit(tenant)


def start_gateway(procs, tmp_path: Path, config: dict[str, Any], name: str) -> str:  # type: ignore[no-untyped-def]
    port = free_port()
    config = {**config, "server": {**config["server"], "port": port}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{port}"
    procs.start(name, loraroute_cmd("gateway", "--config", str(path)), port=port,
                ready=lambda: http_ready(url + "/ready"), timeout=60)
    return url


def test_two_gateway_replicas_share_one_budget_through_redis(procs, tmp_path: Path, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    sim_port = free_port()
    procs.start("sim", loraroute_cmd("sim", "--port", str(sim_port), "--model", BASE, "--time-scale", "0"),
                port=sim_port, ready_url=f"http://127.0.0.1:{sim_port}/health", timeout=60)
    config = spec(f"http://127.0.0.1:{sim_port}", {"requests_per_minute": 6},
                  store={"url": redis_url}, limits={"sync_s": 0.1})
    config["bases"] = [{"name": BASE}]
    config["discovery"]["monitor"] = "always"
    one, two = (start_gateway(procs, tmp_path, config, name) for name in ("gw-one", "gw-two"))
    body = {"model": BASE, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}

    def send(url: str, n: int) -> list[int]:
        return [httpx.post(url + "/v1/chat/completions", json=body, headers=as_("acme-key"), timeout=10).status_code
                for _ in range(n)]

    assert send(one, 4) == [200] * 4
    time.sleep(0.6)  # a few syncs: replica two now knows replica one's four
    assert send(two, 4) == [200, 200, 429, 429]
    time.sleep(0.6)
    assert send(one, 1) == [429]
