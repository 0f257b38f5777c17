"""The gateway when things go wrong or change: pods killed before the first byte and mid-stream,
config hot reload (valid, invalid, with requests in flight), adapter materialisation through real
sidecars publishing into a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from openai import OpenAI

from loraroute import peft
from loraroute.procs import Proc, free_port, http_ready, loraroute_cmd
from scorer.model import PodState

BASE = "tsuzumi-base"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


ADMIN = {"Authorization": "Bearer admin-key"}


def wait_until(cond: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start_sim(procs, adapter_dir: Path, *extra: str, name: str = "sim") -> Proc:  # type: ignore[no-untyped-def]
    port = free_port()
    return procs.start(name, loraroute_cmd(
        "sim", "--port", str(port), "--model", BASE, "--enable-lora", "--max-loras", "2", "--max-cpu-loras", "3",
        "--max-lora-rank", "16", "--adapter-dir", str(adapter_dir), "--allow-runtime-lora-updating", *extra,
    ), port=port, ready_url=f"http://127.0.0.1:{port}/health", timeout=60)


def start_gateway(procs, tmp_path: Path, config: dict, name: str = "gateway") -> tuple[Proc, Path]:  # type: ignore[no-untyped-def]
    port = free_port()
    config = {**config, "server": {**config.get("server", {}), "port": port}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{port}"
    proc = procs.start(name, loraroute_cmd("gateway", "--config", str(path)), port=port,
                       ready=lambda: http_ready(url + "/health"), timeout=60)
    wait_until(lambda: httpx.get(url + "/ready").status_code == 200, 30, "gateway ready")
    return proc, path


def finished_decisions(gw: Proc, n: int) -> list[dict]:
    """The last ``n`` decisions once every one has its status: a stream's record is completed
    when the pod's stream has ended, which may be just after the client read ``[DONE]``."""
    def get() -> list[dict]:
        return httpx.get(gw.url + f"/admin/decisions?limit={n}", headers=ADMIN).json()["data"]

    wait_until(lambda: all(d["status"] for d in get()), 5, "the last requests' records")
    return get()


def base_config(pods: list[dict], adapters: list[str]) -> dict:
    return {
        "server": {"reload_poll_s": 0},
        "bases": [{"name": BASE, "adapters": adapters}],
        "admin": {"api_key_sha256": [digest("admin-key")]},
        "discovery": {"static": pods},
    }


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    d = tmp_path / "adapters"
    peft.make_adapter_set(d, [("sql", 8), ("summarize", 16)], base_model=BASE)
    return d


# --- retries before the first byte ------------------------------------------------------------------
class Publisher:
    """Publishes PodState for pods into Redis every 0.2 s, like a sidecar that has not noticed yet."""

    def __init__(self, redis_url: str, states: list[PodState]) -> None:
        self.redis_url = redis_url
        self.states = states
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        from podstate.redis_store import RedisStore

        store = RedisStore(self.redis_url, reader=False)
        await store.start()
        try:
            while not self._stop.is_set():
                now = time.time()
                for s in self.states:
                    await store.publish(s.replace(observed_at=now, published_at=now), ttl_s=3.0)
                await asyncio.sleep(0.2)
        finally:
            await store.close()

    def __enter__(self) -> Publisher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@contextlib.contextmanager
def preferred_pair(procs, tmp_path: Path, adapter_dir: Path, redis_url: str) -> Iterator[tuple[Proc, Proc, Proc, dict]]:  # type: ignore[no-untyped-def]
    """Two sims behind a gateway that reads their state from Redis only; the published state
    says pod-a holds the adapter on GPU, so the pipeline ranks pod-a first whatever happens to it.
    Yields (sim a, sim b, gateway, the gateway's config)."""
    a, b = start_sim(procs, adapter_dir, name="sim-a"), start_sim(procs, adapter_dir, name="sim-b")
    common = {"base_models": (BASE,), "max_loras": 2, "max_lora_rank": 16, "num_gpu_blocks": 26592}
    states = [PodState("pod-a", a.url, gpu_adapters=("sql",), **common), PodState("pod-b", b.url, **common)]
    with Publisher(redis_url, states):
        cfg = base_config([{"id": "pod-a", "url": a.url}, {"id": "pod-b", "url": b.url}], ["sql"])
        cfg["discovery"]["monitor"] = "never"
        cfg["store"] = {"url": redis_url}
        gw, _ = start_gateway(procs, tmp_path, cfg)
        yield a, b, gw, cfg


def test_retry_on_the_next_pod_when_the_chosen_one_was_killed(procs, tmp_path: Path, adapter_dir: Path,  # type: ignore[no-untyped-def]
                                                              redis_url: str) -> None:
    with preferred_pair(procs, tmp_path, adapter_dir, redis_url) as (a, _b, gw, cfg):
        client = OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
        first = client.chat.completions.with_raw_response.create(
            model=f"{BASE}:sql", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert first.headers["x-loraroute-pod"] == "pod-a"
        a.kill()  # the state in Redis still says pod-a is healthy and holds the adapter
        for i in range(4):
            stream = i % 2 == 1
            raw = client.chat.completions.with_raw_response.create(
                model=f"{BASE}:sql", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=3, stream=stream)
            assert raw.status_code == 200 and raw.headers["x-loraroute-pod"] == "pod-b"
            parsed = raw.parse()
            if stream:
                assert "".join(c.choices[0].delta.content or "" for c in parsed if c.choices)
            else:
                assert parsed.choices[0].message.content
        decisions = finished_decisions(gw, 4)
        seen = [(d["status"], d["attempts"]) for d in decisions]
        assert all(status == 200 and attempts[-1] == "pod-b" for status, attempts in seen), seen
        # the first request after the kill went to pod-a first; pod-a then refused a connection, so
        # for the next seconds it is tried last: no later request pays the failed connect again
        assert decisions[-1]["picked"] == "pod-a" and decisions[-1]["attempts"] == ["pod-a", "pod-b"]
        retried = sum(d["attempts"] == ["pod-a", "pod-b"] for d in decisions)
        assert retried == 1, [d["attempts"] for d in decisions]
        assert f'loraroute_retries_total{{reason="connect"}} {float(retried)}' in httpx.get(gw.url + "/metrics").text

        # with retries off the same failure is a clear 502 naming the pod
        cfg["server"] = {"reload_poll_s": 0, "retries": 0}
        gw2, _ = start_gateway(procs, tmp_path, cfg, name="gateway-noretry")
        r = httpx.post(gw2.url + "/v1/chat/completions", json={
            "model": f"{BASE}:sql", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
        assert r.status_code == 502 and "pod-a" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "upstream_unreachable"


def test_a_5xx_before_the_first_byte_is_retried_on_the_next_pod(procs, tmp_path: Path, adapter_dir: Path,  # type: ignore[no-untyped-def]
                                                                redis_url: str) -> None:
    with preferred_pair(procs, tmp_path, adapter_dir, redis_url) as (a, _b, gw, cfg):
        # pod-a answers, but its engine is failing: every generation request gets vLLM's 500
        assert httpx.post(a.url + "/sim/faults", json={"fail_next": 100, "status": 500}).status_code == 200
        assert httpx.post(a.url + "/sim/faults", json={"fail_next": -1}).status_code == 400
        assert httpx.post(a.url + "/sim/faults", json={"fail_next": 1, "status": 418}).status_code == 400
        client = OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
        for i, status in enumerate((500, 503, 500, 503)):
            httpx.post(a.url + "/sim/faults", json={"fail_next": 100, "status": status})
            stream = i % 2 == 1
            raw = client.chat.completions.with_raw_response.create(
                model=f"{BASE}:sql", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=3, stream=stream)
            assert raw.status_code == 200 and raw.headers["x-loraroute-pod"] == "pod-b"
            parsed = raw.parse()
            text = ("".join(c.choices[0].delta.content or "" for c in parsed if c.choices) if stream
                    else parsed.choices[0].message.content)
            assert text
        failed = httpx.get(a.url + "/sim/faults").json()["failed"]
        decisions = finished_decisions(gw, 4)
        # a 5xx does not make the pod suspect (it answered): each request tried pod-a, then pod-b
        assert [d["attempts"] for d in decisions] == [["pod-a", "pod-b"]] * 4
        assert failed == 4
        assert 'loraroute_retries_total{reason="status"} 4.0' in httpx.get(gw.url + "/metrics").text

        # with retries off, the pod's failure reaches the client as a 502 naming the pod, no trace
        cfg["server"] = {"reload_poll_s": 0, "retries": 0}
        gw2, _ = start_gateway(procs, tmp_path, cfg, name="gateway-noretry")
        r = httpx.post(gw2.url + "/v1/chat/completions", json={
            "model": f"{BASE}:sql", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
        err = r.json()["error"]
        assert r.status_code == 502 and r.headers["x-loraroute-pod"] == "pod-a"
        assert err["code"] == "upstream_error" and "pod-a" in err["message"] and "Service Unavailable" in err["message"]
        assert "Traceback" not in r.text


# --- failure mid-stream -----------------------------------------------------------------------------
def test_pod_killed_mid_stream_ends_with_an_error_event_and_done(procs, tmp_path: Path, adapter_dir: Path) -> None:  # type: ignore[no-untyped-def]
    sim = start_sim(procs, adapter_dir, "--time-scale", "1")
    gw, _ = start_gateway(procs, tmp_path, base_config([{"id": "pod-0", "url": sim.url}], ["sql"]))
    events: list[str] = []
    with httpx.Client(timeout=30) as c, c.stream("POST", gw.url + "/v1/chat/completions", json={
        "model": f"{BASE}:sql", "stream": True, "max_tokens": 2000,
        "messages": [{"role": "user", "content": "write a long story"}],
    }) as resp:
        assert resp.status_code == 200 and resp.headers["x-loraroute-pod"] == "pod-0"
        for line in resp.iter_lines():
            if not line:
                continue
            events.append(line)
            if len(events) == 3:
                sim.kill()
    assert len(events) >= 5
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][len("data: "):])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "pod-0" in error["message"] and error["code"] == "upstream_stream_error"
    for e in events[1:-2]:
        json.loads(e[len("data: "):])  # every event before the error is intact JSON


# --- hot reload -------------------------------------------------------------------------------------
def test_hot_reload_valid_invalid_and_in_flight(procs, tmp_path: Path, adapter_dir: Path) -> None:  # type: ignore[no-untyped-def]
    sim = start_sim(procs, adapter_dir, "--time-scale", "0.5")
    cfg = base_config([{"id": "pod-0", "url": sim.url}], ["sql"])
    cfg["server"] = {"reload_poll_s": 0.2}
    gw, path = start_gateway(procs, tmp_path, cfg)

    def models() -> list[str]:
        return [m["id"] for m in httpx.get(gw.url + "/v1/models").json()["data"]]

    assert f"{BASE}:summarize" not in models()
    r = httpx.post(gw.url + "/v1/completions", json={"model": f"{BASE}:summarize", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 404

    # a long stream in flight while the config changes twice
    done: dict[str, object] = {}

    def stream_long() -> None:
        with httpx.Client(timeout=60) as c, c.stream("POST", gw.url + "/v1/completions", json={
            "model": f"{BASE}:sql", "prompt": "tell me", "max_tokens": 250, "stream": True,
        }) as resp:
            done["lines"] = [line for line in resp.iter_lines() if line]

    t = threading.Thread(target=stream_long)
    t.start()
    time.sleep(0.3)

    # 1. a valid change on disk is picked up by the file watcher
    cfg["bases"][0]["adapters"] = ["sql", "summarize"]
    path.write_text(yaml.safe_dump(cfg))
    wait_until(lambda: f"{BASE}:summarize" in models(), 10, "file reload")
    r = httpx.post(gw.url + "/v1/completions", json={"model": f"{BASE}:summarize", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 200

    # 2. an invalid file is refused by POST /admin/reload (and by the watcher); the old config serves on
    bad = yaml.safe_dump({**cfg, "server": {"reload_poll_s": 0.2, "prot": 1}})
    path.write_text(bad)
    r = httpx.post(gw.url + "/admin/reload", headers=ADMIN)
    assert r.status_code == 400
    assert "server.prot" in r.json()["error"]["message"] and r.json()["error"]["code"] == "invalid_config"
    time.sleep(0.5)
    assert f"{BASE}:summarize" in models()
    assert httpx.post(gw.url + "/v1/completions", json={"model": f"{BASE}:sql", "prompt": "x", "max_tokens": 2}).status_code == 200

    # 3. a valid config again through the admin endpoint
    cfg["bases"][0]["adapters"] = ["summarize"]
    path.write_text(yaml.safe_dump(cfg))
    r = httpx.post(gw.url + "/admin/reload", headers=ADMIN)
    assert r.status_code == 200 and r.json()["status"] == "reloaded"
    assert f"{BASE}:sql" not in models()

    t.join(60)
    lines = done["lines"]
    assert isinstance(lines, list) and lines[-1] == "data: [DONE]"
    assert not any('"error"' in line for line in lines)  # the request in flight finished untouched
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'loraroute_config_reloads_total{outcome="ok"}' in metrics
    assert 'loraroute_config_reloads_total{outcome="invalid"}' in metrics


# --- adapter materialisation through sidecars + Redis ------------------------------------------------
@pytest.fixture
def sidecar_cluster(procs, tmp_path: Path, redis_url: str) -> Iterator[tuple[list[Proc], list[Proc]]]:  # type: ignore[no-untyped-def]
    source = tmp_path / "source"
    peft.make_adapter_set(source, [("sql", 8), ("summarize", 16), ("creative", 8)], base_model=BASE)
    peft.make_adapter(source / "too-big", base_model=BASE, rank=64)  # above the pods' max rank 16
    sims, sidecars = [], []
    for i in range(2):
        cache = tmp_path / f"cache-{i}"
        cache.mkdir()
        sim = start_sim(procs, cache, "--time-scale", "0.05", name=f"sim-{i}")
        port = free_port()
        sidecars.append(procs.start(f"sidecar-{i}", loraroute_cmd(
            "sidecar", "--pod-id", f"pod-{i}", "--vllm-url", sim.url, "--port", str(port),
            "--sidecar-url", f"http://127.0.0.1:{port}", "--store-url", redis_url,
            "--adapter-dir", str(cache), "--source-type", "local", "--source-path", str(source),
            "--base-model", BASE, "--served-model-name", BASE, "--max-lora-rank", "16", "--max-loras", "2",
            "--max-cpu-loras", "3",
        ), port=port, ready_url=f"http://127.0.0.1:{port}/healthz", timeout=60))
        sims.append(sim)
    yield sims, sidecars


def test_ensure_through_sidecars_before_forwarding(procs, tmp_path: Path, redis_url: str,  # type: ignore[no-untyped-def]
                                                   sidecar_cluster: tuple[list[Proc], list[Proc]]) -> None:
    cfg = {
        "server": {"reload_poll_s": 0},
        "bases": [{"name": BASE, "adapters": ["sql", "summarize", "creative", "too-big", "ghost"]}],
        "admin": {"api_key_sha256": [digest("admin-key")]},
        "store": {"url": redis_url},  # no list: the pods are whatever the sidecars registered
    }
    gw, _ = start_gateway(procs, tmp_path, cfg)
    wait_until(lambda: httpx.get(gw.url + "/ready").json().get("healthy_pods") == 2, 20, "both pods registered")
    pods = httpx.get(gw.url + "/admin/pods", headers=ADMIN).json()["data"]
    assert {p["pod_id"] for p in pods} == {"pod-0", "pod-1"} and all(p["sidecar_url"] for p in pods)

    # concurrent first requests for an adapter on no pod's disk share one ensure per pod
    results: list[int] = []

    def one(i: int) -> None:
        r = httpx.post(gw.url + "/v1/chat/completions", timeout=60, json={
            "model": f"{BASE}:summarize", "max_tokens": 2, "messages": [{"role": "user", "content": f"c{i}"}]})
        results.append(r.status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200] * 6
    text = httpx.get(gw.url + "/metrics").text
    ok = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line.startswith("loraroute_ensures_total{") and 'outcome="ok"' in line)
    assert 1 <= ok <= 2, text  # one per pod that got the adapter, never one per request

    # an adapter the store does not have / cannot validate: a clear 502 with the sidecar's reason
    r = httpx.post(gw.url + "/v1/chat/completions", json={
        "model": f"{BASE}:ghost", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 502 and r.json()["error"]["code"] == "adapter_ensure_failed"
    assert "ghost" in r.json()["error"]["message"]
    r = httpx.post(gw.url + "/v1/chat/completions", json={
        "model": f"{BASE}:too-big", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code in (502, 503), r.text
    assert "rank" in r.json()["error"]["message"]
