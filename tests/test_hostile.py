"""Hostile and malformed input against a real gateway process in front of a simulated pod: every
hand-written case of ``bench.hostile`` and a bounded number of ``hypothesis``-generated bodies.
Every answer must come (no dropped connection), be below 500, be in OpenAI's error shape when it
is an error, carry no stack trace and no secret; the gateway's log must hold no traceback; an
adapter a tenant may not use must answer exactly like one that does not exist; and a thousand
megabytes of model names must not grow the gateway's memory."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.hostile import MIB, chat, raw_cases, request, send_raw, violations
from loraroute import peft
from loraroute.procs import Proc, ProcRegistry, free_port, http_ready, loraroute_cmd

BASE = "tsuzumi-base"
KEYS = {"acme": "sk-acme-7c1f", "lab": "sk-lab-93ad", "admin": "sk-admin-55e2", "scrape": "sk-scrape-0b8d"}


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class Stack:
    gateway: Proc
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def raw(self, data: bytes) -> object:
        return send_raw("127.0.0.1", self.port, data)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.gateway.popen.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("hostile")
    procs = ProcRegistry(tmp / "logs")
    adapters = tmp / "adapters"
    peft.make_adapter_set(adapters, [("sql", 8), ("secret-model", 8)], base_model=BASE)
    sim_port = free_port()
    procs.start("sim", loraroute_cmd("sim", "--port", str(sim_port), "--model", BASE, "--enable-lora",
                                     "--max-loras", "2", "--max-lora-rank", "16", "--adapter-dir", str(adapters),
                                     "--allow-runtime-lora-updating", "--time-scale", "0"),
                port=sim_port, ready_url=f"http://127.0.0.1:{sim_port}/health", timeout=60)
    port = free_port()
    cfg = {
        "server": {"port": port, "reload_poll_s": 0},
        "bases": [{"name": BASE, "adapters": ["sql", "secret-model"]}],
        "tenants": [{"name": "acme", "api_key_sha256": [digest(KEYS["acme"])], "adapters": ["sql"]},
                    {"name": "lab", "api_key_sha256": [digest(KEYS["lab"])]}],
        "admin": {"api_key_sha256": [digest(KEYS["admin"])]},
        "metrics": {"auth": {"required": True, "api_key_sha256": [digest(KEYS["scrape"])]}},
        "discovery": {"static": [{"id": "pod-0", "url": f"http://127.0.0.1:{sim_port}"}]},
    }
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    url = f"http://127.0.0.1:{port}"
    gw = procs.start("gateway", loraroute_cmd("gateway", "--config", str(path)), port=port,
                     ready=lambda: http_ready(url + "/ready") and httpx.get(url + "/ready").status_code == 200,
                     timeout=60)
    try:
        yield Stack(gw, port)
        log = gw.log_tail(200_000)
        assert "Traceback" not in log, log[-3000:]
    finally:
        procs.stop_all()


SECRETS = list(KEYS.values())


def test_every_hand_written_case_is_answered_below_500_in_openai_shape(stack: Stack) -> None:
    seen: dict[str, int] = {}
    codes: dict[str, str] = {}
    for name, data in raw_cases(f"{BASE}:sql", KEYS["acme"]):
        answer = stack.raw(data)
        assert not violations(answer, SECRETS), (name, violations(answer, SECRETS), answer)
        seen[name] = answer.status
        if answer.status >= 400:
            codes[name] = json.loads(answer.body)["error"]["code"]
    assert seen["1 MiB header"] == seen["2,000 headers"] == 431
    assert seen["JSON 300 levels deep"] == seen["JSON 2,000 levels deep"] == 400
    assert codes["JSON 300 levels deep"] == "json_too_deep" and codes["JSON 2,000 levels deep"] == "invalid_json"
    assert seen["1 MB model name"] == 400 and seen["body over the limit"] == 413
    assert seen["stop is a number"] == seen["temperature negative"] == 400  # the pod's own 400, passed on
    assert seen["no key"] == seen["wrong key"] == seen["metrics without a key"] == 401
    assert seen["garbage instead of HTTP"] == 400


def test_a_forbidden_adapter_answers_exactly_like_an_unknown_one(stack: Stack) -> None:
    def ask(model: str) -> httpx.Response:
        return httpx.post(stack.url + "/v1/chat/completions", json=chat(model),
                          headers={"Authorization": f"Bearer {KEYS['acme']}"})

    forbidden = ask(f"{BASE}:secret-model")  # exists; acme may not use it
    unknown = ask(f"{BASE}:secret-modem")  # does not exist
    assert forbidden.status_code == unknown.status_code == 404
    assert forbidden.json()["error"]["code"] == unknown.json()["error"]["code"] == "adapter_not_found"
    assert "secret-model" not in forbidden.json()["error"]["message"].split(";", 1)[1]  # only acme's own names
    assert "secret-model" not in unknown.json()["error"]["message"]
    assert forbidden.headers.keys() == unknown.headers.keys()
    lab = httpx.post(stack.url + "/v1/chat/completions", json=chat(f"{BASE}:secret-model"),
                     headers={"Authorization": f"Bearer {KEYS['lab']}"})
    assert lab.status_code == 200


def test_metrics_need_a_key_and_name_only_allowlisted_adapters(stack: Stack) -> None:
    assert httpx.get(stack.url + "/metrics").status_code == 401
    for who in ("scrape", "admin"):
        r = httpx.get(stack.url + "/metrics", headers={"Authorization": f"Bearer {KEYS[who]}"})
        assert r.status_code == 200 and "loraroute_requests_total" in r.text
        assert "secret-modem" not in r.text and "m" * 100 not in r.text


BODY_FIELDS = st.fixed_dictionaries({}, optional={
    "model": st.one_of(st.just(f"{BASE}:sql"), st.text(max_size=40), st.integers(), st.none(),
                       st.lists(st.text(max_size=5), max_size=3)),
    "messages": st.one_of(st.lists(st.fixed_dictionaries({}, optional={
        "role": st.one_of(st.sampled_from(["user", "system", "assistant"]), st.none(), st.integers()),
        "content": st.one_of(st.text(max_size=60), st.none(), st.integers(), st.lists(st.dictionaries(
            st.sampled_from(["type", "text"]), st.text(max_size=10), max_size=2), max_size=2))}), max_size=3),
        st.text(max_size=10), st.none()),
    "prompt": st.one_of(st.text(max_size=60), st.lists(st.integers(min_value=-5, max_value=2 ** 40), max_size=5),
                        st.lists(st.text(max_size=5), max_size=3), st.none()),
    "stream": st.one_of(st.booleans(), st.none(), st.integers(), st.text(max_size=4)),
    "max_tokens": st.one_of(st.integers(min_value=-3, max_value=2 ** 70), st.floats(allow_nan=False), st.none(),
                            st.text(max_size=3), st.booleans()),
    "temperature": st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=4), st.none()),
    "top_p": st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers()),
    "stop": st.one_of(st.text(max_size=5), st.integers(), st.lists(st.one_of(st.text(max_size=3), st.integers()),
                                                                   max_size=3), st.none()),
    "n": st.one_of(st.integers(min_value=-2, max_value=5), st.text(max_size=2)),
    "extra": st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                      max_size=3), max_leaves=10),
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(body=BODY_FIELDS, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_generated_bodies_never_get_a_5xx_or_a_malformed_error(stack: Stack, body: dict, path: str) -> None:
    answer = stack.raw(request(path, json.dumps(body).encode(), KEYS["lab"]))
    assert not violations(answer, SECRETS), (body, violations(answer, SECRETS), answer)


def test_megabyte_model_names_do_not_grow_the_gateway(stack: Stack) -> None:
    """Each distinct 1 MB name is refused before any lookup and never cached (the benchmark
    sends a thousand; RSS figures in docs/reliability.md)."""
    for i in range(5):  # warm the allocator up
        stack.raw(request("/v1/chat/completions", json.dumps(chat(f"{i}" + "m" * MIB)).encode(), KEYS["lab"]))
    before = stack.rss_kib()
    for i in range(60):
        answer = stack.raw(request("/v1/chat/completions", json.dumps(chat(f"{i}-" + "n" * MIB)).encode(),
                                   KEYS["lab"]))
        assert answer.status == 400 and len(answer.body) < 1000
    grown_mib = (stack.rss_kib() - before) / 1024
    assert grown_mib < 30, grown_mib
