"""The gateway end to end: a real `loraroute gateway` process in front of a real simulated cluster
(`loraroute sim cluster`), called with the official `openai` client and raw HTTP.

One cluster and one gateway serve the whole module (start-up dominates the cost); tests that
kill pods or rewrite the config live in test_gateway_faults.py.
"""

from __future__ import annotations

import collections
import hashlib
import json
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import yaml
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from loraroute import peft
from loraroute.procs import Proc, consecutive_free_ports, free_port, http_ready, loraroute_cmd, start_process

BASE = "tsuzumi-base"
PODS = 3
BURST = 12


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Env:
    def __init__(self, url: str, pods: list[str], sim_urls: list[str]) -> None:
        self.url = url
        self.pods = pods
        self.sim_urls = sim_urls

    def client(self, key: str = "lab-key") -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("gw-e2e")
    adapters = root / "adapters"
    peft.make_adapter_set(adapters, [("sql", 8), ("summarize", 16), ("creative", 8), ("chat", 8)], base_model=BASE)
    base_port = consecutive_free_ports(PODS)
    sim_urls = [f"http://127.0.0.1:{base_port + i}" for i in range(PODS)]
    started: list[Proc] = []
    try:
        started.append(start_process(
            "sim", loraroute_cmd(
                "sim", "cluster", "--pods", str(PODS), "--base-port", str(base_port), "--model", BASE,
                "--enable-lora", "--max-loras", "2", "--max-cpu-loras", "3", "--max-lora-rank", "16",
                "--adapter-dir", str(adapters), "--allow-runtime-lora-updating", "--time-scale", "0.05",
            ),
            ready=lambda: all(http_ready(u + "/health") for u in sim_urls), timeout=60, log_dir=root / "logs",
        ))
        port = free_port()
        config = {
            "server": {"port": port, "reload_poll_s": 0, "max_body_bytes": 65536},
            "bases": [{"name": BASE, "aliases": ["tsuzumi"],
                       "adapters": [{"name": "sql", "rank": 8}, {"name": "summarize", "rank": 16}, "creative", "chat"]}],
            "tenants": [
                {"name": "acme", "api_key_sha256": [digest("acme-key")], "adapters": ["sql", "summarize"]},
                {"name": "lab", "api_key_sha256": [digest("lab-key")], "adapters": ["*"]},
            ],
            "admin": {"api_key_sha256": [digest("admin-key")]},
            # generous scrape limits: a busy test machine must not make a pod look dead
            "discovery": {"static": [{"id": f"pod-{i}", "url": u} for i, u in enumerate(sim_urls)],
                          "monitor_timeout_s": 2.0, "monitor_unhealthy_after_s": 3.0, "monitor_ttl_s": 5.0},
            # the default policy, with a small in-flight capacity so "bounded" shows at test scale
            "pipeline": {"preset": "default", "filters": [
                {"type": "healthy-fresh", "parameters": {"max_age_s": 5.0}}, "serves-base", "rank-fits",
            ], "scorers": [
                {"type": "estimated-ttft", "weight": 3.0},
                {"type": "adapter-residency", "weight": 1.0},
                {"type": "prefix-cache", "weight": 1.0},
                {"type": "inflight", "weight": 2.0, "parameters": {"metric": "requests", "capacity": 8.0}},
                {"type": "kv-usage", "weight": 1.0},
            ]},
        }
        cfg_path = root / "gateway.yaml"
        cfg_path.write_text(yaml.safe_dump(config))
        url = f"http://127.0.0.1:{port}"
        started.append(start_process(
            "gateway", loraroute_cmd("gateway", "--config", str(cfg_path)),
            port=port, ready=lambda: http_ready(url + "/ready"), timeout=60, log_dir=root / "logs",
        ))
        # /ready answers 503 until a pod is routable; wait for all of them
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = httpx.get(url + "/ready")
            if r.status_code == 200 and r.json()["healthy_pods"] == PODS:
                break
            time.sleep(0.1)
        yield Env(url, [f"pod-{i}" for i in range(PODS)], sim_urls)
    finally:
        for p in reversed(started):
            p.stop()


def chat_body(model: str, content: str = "hello", **kw: object) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **kw}


# --- the OpenAI surface ---------------------------------------------------------------------------
def test_chat_and_completions_streaming_and_not(env: Env) -> None:
    client = env.client()
    raw = client.chat.completions.with_raw_response.create(
        model=f"{BASE}:sql", messages=[{"role": "user", "content": "List the tables"}], max_tokens=5)
    assert raw.headers["x-loraroute-pod"] in env.pods
    chat = raw.parse()
    assert chat.model == f"{BASE}:sql"  # the name the client sent, not the adapter name vLLM knows
    assert chat.choices[0].message.content and chat.usage.completion_tokens == 5

    with client.chat.completions.with_streaming_response.create(
        model=f"{BASE}:summarize", messages=[{"role": "user", "content": "Summarise"}], max_tokens=6,
        stream=True, stream_options={"include_usage": True},
    ) as resp:
        assert resp.headers["x-loraroute-pod"] in env.pods
        assert resp.headers["content-type"].startswith("text/event-stream")
        chunks = list(resp.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert {c.model for c in chunks} == {f"{BASE}:summarize"}  # every chunk

    comp = client.completions.create(model="tsuzumi:creative", prompt="Once upon a time", max_tokens=4)
    assert comp.model == "tsuzumi:creative" and comp.choices[0].text  # the alias, as sent
    pieces = list(client.completions.create(model=BASE, prompt="SELECT", max_tokens=4, stream=True))
    assert "".join(p.choices[0].text for p in pieces if p.choices)
    assert {p.model for p in pieces} == {BASE}


def test_stream_bytes_pass_through_unchanged(env: Env) -> None:
    """The gateway's SSE bytes equal what the pod sends for the same request (framing, keys, order)."""
    body = chat_body(f"{BASE}:chat", "same prompt", stream=True, max_tokens=3, seed=1)
    via = httpx.post(env.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer lab-key"})
    pod = via.headers["x-loraroute-pod"]
    direct = httpx.post(env.sim_urls[env.pods.index(pod)] + "/v1/chat/completions", json={**body, "model": "chat"})
    assert via.text.endswith("data: [DONE]\n\n")

    def shape(text: str) -> list[object]:
        events = [e for e in text.split("\n\n") if e]
        return [sorted(json.loads(e[6:]).keys()) if e != "data: [DONE]" else e for e in events]

    assert shape(via.text) == shape(direct.text)


def test_models_lists_what_the_caller_may_use(env: Env) -> None:
    acme = [m.id for m in env.client("acme-key").models.list()]
    assert acme == [BASE, f"{BASE}:sql", f"{BASE}:summarize"]
    lab = [m.id for m in env.client("lab-key").models.list()]
    assert lab == [BASE, f"{BASE}:chat", f"{BASE}:creative", f"{BASE}:sql", f"{BASE}:summarize"]
    with pytest.raises(openai.AuthenticationError):
        env.client("nope").models.list()


# --- every rejection, with its status ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "body", "status", "fragment"),
    [
        (None, chat_body(f"{BASE}:sql"), 401, "missing API key"),
        ("wrong-key", chat_body(f"{BASE}:sql"), 401, "invalid API key"),
        ("acme-key", chat_body(f"{BASE}:creative"), 404, "not in the allowlist of base 'tsuzumi-base'; did you"),
        ("lab-key", chat_body(f"{BASE}:sqll"), 404, "did you mean: tsuzumi-base:sql"),
        ("lab-key", chat_body("llama:sql"), 404, "unknown base 'llama'"),
        ("lab-key", b'{"model": "tsuzumi-base:sql", "messages": [', 400, "not valid JSON"),
        ("lab-key", b"[1, 2]", 400, "JSON object"),
        ("lab-key", {"messages": [{"role": "user", "content": "x"}]}, 400, "'model' is required"),
        ("lab-key", {"model": f"{BASE}:sql", "messages": []}, 400, "'messages'"),
        ("lab-key", {"model": f"{BASE}:sql", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "'stream'"),
        ("lab-key", chat_body(f"{BASE}:.."), 400, "'..'"),
        ("lab-key", chat_body(f"{BASE}:a/b"), 400, "path separator"),
        ("lab-key", chat_body(f"{BASE}:s ql"), 400, "whitespace"),
        ("lab-key", chat_body(f"{BASE}:s\u0000ql"), 400, "control character"),
        ("lab-key", chat_body(f"{BASE}:"), 400, "empty adapter part"),
        ("lab-key", chat_body(":sql"), 400, "empty base part"),
        ("lab-key", chat_body(f"{BASE}:sql:v2"), 400, "second colon"),
        ("lab-key", chat_body(f"{BASE}:sql", "x" * 70000), 413, "over the limit"),
    ],
)
def test_rejections(env: Env, key: str | None, body: object, status: int, fragment: str) -> None:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(env.url + "/v1/chat/completions", content=content, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert fragment in err["message"]
    assert "Traceback" not in r.text and "x-loraroute-pod" not in r.headers


def test_rejections_through_the_openai_client(env: Env) -> None:
    with pytest.raises(openai.NotFoundError):  # not acme's: answered as if it did not exist
        env.client("acme-key").chat.completions.create(**chat_body(f"{BASE}:chat"))
    with pytest.raises(openai.NotFoundError):
        env.client().completions.create(model=f"{BASE}:missing", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        env.client().completions.create(model=f"{BASE}:../x", prompt="x", max_tokens=2)


def test_unknown_route_and_method(env: Env) -> None:
    r = httpx.get(env.url + "/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "route_not_found"
    r = httpx.get(env.url + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


# --- explanation and admin --------------------------------------------------------------------------
def test_explanation_matches_the_decision(env: Env) -> None:
    headers = {"Authorization": "Bearer lab-key", "x-loraroute-debug": "1", "x-loraroute-admin-key": "admin-key"}
    for i, model in enumerate([f"{BASE}:sql", f"{BASE}:chat", BASE, f"{BASE}:creative"]):
        r = httpx.post(env.url + "/v1/chat/completions", json=chat_body(model, f"explain {i}"),
                       headers={**headers, "x-request-id": f"explain-{i}"})
        assert r.status_code == 200
        assert r.json()["id"] == f"chatcmpl-explain-{i}"  # the request id travels to the pod
        explain = json.loads(r.headers["x-loraroute-explain"])
        pod = r.headers["x-loraroute-pod"]
        assert explain["picked"] == pod
        totals = {c["pod"]: c["total"] for c in explain["candidates"]}
        assert totals[pod] == max(totals.values())
        for c in explain["candidates"]:
            assert c["scores"] and all(0.0 <= v <= 1.0 for v in c["scores"].values())
    # without the admin key: no explanation
    r = httpx.post(env.url + "/v1/chat/completions", json=chat_body(f"{BASE}:sql"),
                   headers={"Authorization": "Bearer lab-key", "x-loraroute-debug": "1"})
    assert r.status_code == 200 and "x-loraroute-explain" not in r.headers
    # the ring buffer holds the same decisions
    d = httpx.get(env.url + "/admin/decisions?limit=50", headers={"Authorization": "Bearer admin-key"}).json()["data"]
    by_id = {x["request_id"]: x for x in d}
    assert by_id["explain-3"]["model"] == f"{BASE}:creative" and by_id["explain-3"]["status"] == 200
    assert by_id["explain-3"]["picked"] == by_id["explain-3"]["attempts"][0]


def test_admin_needs_the_admin_key(env: Env) -> None:
    for path, method in (("/admin/decisions", "GET"), ("/admin/pods", "GET"), ("/admin/reload", "POST")):
        for headers in ({}, {"Authorization": "Bearer lab-key"}):
            r = httpx.request(method, env.url + path, headers=headers)
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["code"] == "invalid_admin_key"
    pods = httpx.get(env.url + "/admin/pods", headers={"x-loraroute-admin-key": "admin-key"}).json()["data"]
    assert [p["pod_id"] for p in pods] == env.pods
    assert all(p["routable"] and p["state"]["healthy"] for p in pods)


# --- routing quality --------------------------------------------------------------------------------
def _post(env: Env, body: dict) -> str:
    r = httpx.post(env.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer lab-key"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.headers["x-loraroute-pod"]


def test_one_adapter_concentrates_while_load_stays_bounded(env: Env) -> None:
    # sequential: every request for one adapter goes where it already sits
    seq = collections.Counter(_post(env, chat_body(f"{BASE}:summarize", f"s{i}")) for i in range(12))
    assert seq.most_common(1)[0][1] >= 11, seq
    holder = seq.most_common(1)[0][0]
    # a concurrent burst of long requests (more than the in-flight capacity of 8 in this config):
    # the holder takes the most, the overflow goes elsewhere — typically to one more pod, which
    # then holds the adapter too (e.g. 7/5/0)
    results: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        # long enough (about a second each) that the burst really overlaps, even on a busy machine
        pod = _post(env, chat_body(f"{BASE}:summarize", f"burst {i}", max_tokens=2000))
        with lock:
            results.append(pod)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(BURST)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    burst = collections.Counter(results)
    assert sum(burst.values()) == BURST
    assert burst[holder] == max(burst.values()), burst  # concentrated on the holder ...
    assert burst[holder] < BURST, burst  # ... but bounded: the overflow went to other pods
    assert len(burst) < PODS or burst.most_common()[-1][1] < burst[holder], burst


def test_shared_long_prefix_keeps_landing_on_the_pod_that_cached_it(env: Env) -> None:
    prefixes = {
        "a": "You are a meticulous SQL assistant for the finance team. " * 60,
        "b": "Summaries must be short, neutral and cite the section number. " * 60,
    }
    seen: dict[str, collections.Counter[str]] = {k: collections.Counter() for k in prefixes}
    for i in range(8):
        for k, prefix in prefixes.items():  # base model: no adapter residency in play
            seen[k][_post(env, chat_body(BASE, f"{prefix}\nQuestion {i}: what changed?"))] += 1
    for k, counts in seen.items():
        assert counts.most_common(1)[0][1] >= 7, (k, counts)


def test_client_disconnect_cancels_the_upstream_request(env: Env) -> None:
    metrics_url = env.url + "/metrics"

    def inflight() -> float:
        total = 0.0
        for fam in text_string_to_metric_families(httpx.get(metrics_url).text):
            if fam.name == "loraroute_pod_inflight":
                total += sum(s.value for s in fam.samples)
        return total

    with httpx.Client(timeout=30) as c, c.stream(
        "POST", env.url + "/v1/chat/completions", headers={"Authorization": "Bearer lab-key"},
        json=chat_body(f"{BASE}:chat", "long answer please", stream=True, max_tokens=6000),
    ) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
        assert inflight() >= 1
    # the generation would take seconds more; the gateway drops it as soon as the client is gone
    deadline = time.monotonic() + 3
    while inflight() > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert inflight() == 0
    assert 'status="499"' in httpx.get(metrics_url).text


def test_metrics(env: Env) -> None:
    _post(env, chat_body(f"{BASE}:sql", "metrics"))
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(env.url + "/metrics").text)}
    for name in ("loraroute_requests", "loraroute_ttft_seconds", "loraroute_e2e_seconds", "loraroute_decision_seconds",
                 "loraroute_routed_residency", "loraroute_prefix_blocks", "loraroute_pod_adapters",
                 "loraroute_pod_state_age_seconds", "loraroute_pods_routable"):
        assert name in families, name
    ok = [s for s in families["loraroute_requests"].samples
          if s.labels.get("status") == "200" and s.labels.get("adapter") == "sql"]
    assert ok and all(s.labels["pod"] in env.pods for s in ok)
    rejected = [s for s in families["loraroute_requests"].samples if s.labels.get("status") == "401"]
    assert rejected and all(s.labels["pod"] == "" for s in rejected)
    assert families["loraroute_pods_routable"].samples[0].value == PODS


def test_health_and_ready(env: Env) -> None:
    assert httpx.get(env.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(env.url + "/ready").json()
    assert ready["status"] == "ready" and ready["healthy_pods"] == PODS
