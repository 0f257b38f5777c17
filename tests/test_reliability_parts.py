"""The parts behind the reliability behaviours, each on its own: attempt deadlines, freshness
judged against the store's clock, the store watch and its polling fallback (a real simulated
pod), the recovery bonus, the lora-ready filter and the sidecar's warm-up of an eager engine,
the sidecar's control token and redacted settings, bounded caches, one slash in S3 keys, the
simulator's sampling-parameter 400s."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from gateway import store_watch
from gateway.config import StoreOutageConfig, Timeouts, load_config
from gateway.deadlines import attempt_limits, first_byte_s, request_budget_s
from gateway.errors import APIError
from gateway.policy import AccessPolicy
from gateway.service import Gateway
from gateway.store_watch import StoreWatch
from gateway.upstream import AbortSignal
from loraroute import peft
from loraroute.procs import free_port, loraroute_cmd
from podstate import MemoryStore, redact_url
from podstate.monitor import MonitorSettings
from scorer.model import AdapterRef, PodState, RoutingRequest
from scorer.build import build_pipeline
from vllm_sidecar.validation import validate_dir
from vllm_sim.sampling import check_ranges, check_types

BASE = "tsuzumi-base"


def routing(adapter: str | None = "sql", tokens: int = 40) -> RoutingRequest:
    return RoutingRequest(AdapterRef(BASE, adapter, 8 if adapter else None), prompt_tokens=tokens, max_tokens=8,
                          prefix_hashes=(), session_key=None, request_id="r")


def pod(pod_id: str, **kw: object) -> PodState:
    kw.setdefault("observed_at", time.time())
    return PodState(pod_id, f"http://{pod_id}", base_models=(BASE,), max_loras=2, max_lora_rank=16, **kw)  # type: ignore[arg-type]


# --- attempt deadlines ------------------------------------------------------------------------------
def test_attempt_limits_follow_the_prediction_within_the_budget() -> None:
    t = Timeouts(first_byte_s=120, first_byte_floor_s=10, first_byte_factor=4, token_s=0.25)
    assert first_byte_s(t, 0.05, 120) == 10  # the floor
    assert first_byte_s(t, 5.0, 120) == 20  # 4 × the prediction
    assert first_byte_s(t, 60.0, 120) == 120 and first_byte_s(t, 60.0, 33) == 33  # never past the budget
    assert first_byte_s(t, None, 120) == 120  # no prediction: the whole budget
    assert first_byte_s(Timeouts(first_byte_factor=0), 0.05, 120) == 120
    stream = attempt_limits(t, True, 64, 0.05, 120, AbortSignal("p"))
    assert (stream.first_byte_s, stream.idle_s, stream.total_s) == (10, t.idle_s, t.total_s)
    whole = attempt_limits(t, False, 64, 0.05, 900, AbortSignal("p"))
    assert whole.first_byte_s is None and whole.total_s == 10 + 64 * 0.25
    assert attempt_limits(t, False, 0, 0.05, 900, AbortSignal("p")).total_s == 900  # max_tokens unknown
    arrived = time.perf_counter() - 30
    assert request_budget_s(t, True, arrived) == pytest.approx(90, abs=0.5)


# --- freshness against the store's clock -------------------------------------------------------------
def test_a_stale_view_passes_when_judged_against_the_time_it_was_last_refreshed() -> None:
    pipeline = build_pipeline("default")
    now = time.time()
    pods = {"a": pod("a", observed_at=now - 30), "b": pod("b", observed_at=now - 30)}
    assert pipeline.pick(routing(), pods, now).pod_id is None  # 30 s old: healthy-fresh drops both
    d = pipeline.pick(routing(), pods, now, state_as_of=now - 29.5)  # the store went quiet then
    assert d.pod_id in pods and not d.filtered


# --- the store watch and its polling fallback ------------------------------------------------------
class CutOffStore(MemoryStore):
    """An in-process store that can be told it lost contact (as a RedisStore does in an outage)."""

    def __init__(self) -> None:
        super().__init__()
        self.contact: float | None = None

    def last_contact(self) -> float | None:
        return self.contact

    @property
    def reachable(self) -> bool:
        return self.contact is None


class RestartingStore(MemoryStore):
    """An in-process store whose reachability and last contact a test sets (a Redis restarting)."""

    def __init__(self) -> None:
        super().__init__()
        self.contact = time.time()
        self.up = True

    def last_contact(self) -> float | None:
        return self.contact

    @property
    def reachable(self) -> bool:
        return self.up


def test_the_last_view_does_not_age_out_at_once_when_the_store_comes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_watch, "RECOVERY_S", 0.3)
    store = RestartingStore()

    def no_polling(state: PodState) -> MonitorSettings:
        raise AssertionError("poll_pods is off")

    watch = StoreWatch(store, StoreOutageConfig, dict, lambda pod_id, state: None, no_polling)
    pipeline = build_pipeline("default")
    before = time.time() - 5  # the last contact and the last states: 5 s before Redis is back
    pods = {"a": pod("a", observed_at=before - 0.2)}
    store.contact, store.up = before, False
    asyncio.run(watch.check())
    assert watch.degraded and watch.reference(time.time()) == before
    # Redis is back, restarted and empty: the subscriber's contact is fresh, the sidecars have not republished yet
    store.contact, store.up = time.time(), True
    assert watch.reference(time.time()) == before  # before the watch has looked
    asyncio.run(watch.check())
    now = time.time()
    assert not watch.degraded and watch.reference(now) == before
    assert pipeline.pick(routing(), pods, now, watch.reference(now)).pod_id == "a"
    time.sleep(0.35)
    asyncio.run(watch.check())
    now = time.time()
    store.contact = now
    assert watch.reference(now) == now  # past the recovery window: a pod whose sidecar never came back ages out
    assert pipeline.pick(routing(), pods, now, watch.reference(now)).pod_id is None


def test_the_last_view_serves_through_an_outage_and_polling_replaces_it(procs, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    adapters = tmp_path / "adapters"
    peft.make_adapter_set(adapters, [("sql", 8)], base_model=BASE)
    port = free_port()
    sim = procs.start("sim", loraroute_cmd("sim", "--port", str(port), "--model", BASE, "--enable-lora",
                                           "--adapter-dir", str(adapters), "--allow-runtime-lora-updating",
                                           "--time-scale", "0"),
                      port=port, ready_url=f"http://127.0.0.1:{port}/health", timeout=60)
    url = f"http://127.0.0.1:{port}"

    async def scenario() -> None:
        store = CutOffStore()
        await store.start()
        config = load_config({"bases": [{"name": BASE, "adapters": ["sql"]}], "server": {"reload_poll_s": 0},
                              "store": {"outage": {"max_stale_s": 60, "poll_pods": True, "suspect_s": 7}}}, env={})
        gw = Gateway(config, store=store, env={})
        await gw.start()
        try:
            stale = time.time() - 20
            await store.publish(PodState("pod-0", url, base_models=(BASE,), observed_at=stale,
                                         disk_adapters=("sql",), max_lora_rank=16), ttl_s=300)
            now = time.time()
            assert gw.store_watch.reference(now) == now  # in contact: the clock
            store.contact = stale + 0.5  # the store's last sign of life, 19.5 s ago
            assert gw.store_watch.reference(now) == stale + 0.5
            assert gw.runtime.pipeline.pick(routing(), gw.pods, now, gw.store_watch.reference(now)).pod_id == "pod-0"
            await gw.store_watch.check()
            assert gw.store_watch.degraded and gw.store_watch.polling
            assert "unreachable for 19" in (gw.store_watch.note(time.time()) or "")
            assert gw.suspect_hold_s() == 2.0  # polling: the pods' own health is known
            # the poller's states replace the frozen one: fresh, healthy, the sidecar's disk kept
            deadline = time.monotonic() + 10
            while gw.pods["pod-0"].observed_at <= stale and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            polled = gw.pods["pod-0"]
            assert polled.observed_at > stale and polled.healthy and polled.disk_adapters == ("sql",)
            sim.kill()  # a pod that dies during the outage is seen dying
            while gw.pods["pod-0"].healthy and time.monotonic() < deadline + 5:
                await asyncio.sleep(0.05)
            assert not gw.pods["pod-0"].healthy
            store.contact = None  # the store is back: polling stops, its view applies again
            await gw.store_watch.check()
            assert not gw.store_watch.degraded and not gw.store_watch.polling
            assert gw.pods["pod-0"].observed_at == stale
            store.contact = time.time() - 100  # beyond max_stale_s the view counts as too old
            assert gw.store_watch.reference(time.time()) == pytest.approx(time.time(), abs=1)
            text = gw.metrics.render().decode()
            assert "loraroute_store_outages_total 1.0" in text and "loraroute_store_degraded" in text
        finally:
            await gw.close()
            await store.close()

    with caplog.at_level("INFO", logger="loraroute.gateway"):
        asyncio.run(asyncio.wait_for(scenario(), 40))
    messages = [r.getMessage() for r in caplog.records]
    assert any("state store unreachable" in m for m in messages)
    assert any("state store reachable again" in m for m in messages)


# --- the recovery bonus and the lora-ready filter ---------------------------------------------------------
def test_a_pod_just_back_gets_the_bonus_while_its_load_is_at_most_the_mean() -> None:
    pipeline = build_pipeline("default")
    now = time.time()
    old = now - 600
    pods = {"a": pod("a", observed_at=old, gpu_adapters=("sql",), num_running=3),
            "b": pod("b", observed_at=old, gpu_adapters=("sql",), num_running=3)}
    pipeline.pick(routing(), pods, old, state_as_of=old)  # the router has known a and b for ten minutes
    pods["a"] = pods["a"].replace(observed_at=now)
    pods["b"] = pods["b"].replace(observed_at=now)
    pods["c"] = pod("c", observed_at=now)  # back from a restart: no adapter, no prefix, idle
    d = pipeline.pick(routing(), pods, now)
    assert d.pod_id == "c" and "recovery bonus" in d.reason, d.reason
    busy = dict(pods, c=pods["c"].replace(num_running=9, observed_at=now + 0.1))  # now above the mean load
    assert pipeline.pick(routing(), busy, now + 0.1).pod_id != "c"
    later = {k: v.replace(observed_at=now + 30) for k, v in pods.items()}
    assert pipeline.pick(routing(), later, now + 30).pod_id != "c"  # faded out after 20 s
    fresh = build_pipeline("default")  # every pod equally new (a gateway that just started): no bonus
    d = fresh.pick(routing(), pods, now)
    assert d.explain()["candidates"][0]["scores"]["recovery"] == 0.0 and "recovery" not in d.reason


def test_adapter_requests_skip_a_pod_that_has_not_warmed_its_lora_kernels_up() -> None:
    pipeline = build_pipeline("default")
    pods = {"cold": pod("cold", lora_ready=False), "warm": pod("warm", num_running=20)}
    d = pipeline.pick(routing("sql"), pods, time.time())
    assert d.pod_id == "warm" and d.filtered == {"cold": "lora-ready"}
    assert not pipeline.pick(routing(None), pods, time.time()).filtered  # base requests go anywhere


def test_the_sidecar_warms_an_eager_engine_up_before_it_takes_adapter_requests(procs, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                               redis_url: str) -> None:
    """The eager profile compiles the LoRA kernels on the first LoRA request (3.65 s, × 0.3 here):
    the pod is published lora_ready false until the sidecar's warm-up request has paid it."""
    import redis

    cache = tmp_path / "cache"
    peft.make_adapter_set(cache, [("sql", 8)], base_model=BASE)
    port = free_port()
    procs.start("sim", loraroute_cmd("sim", "--port", str(port), "--model", BASE, "--enable-lora",
                                     "--adapter-dir", str(cache), "--allow-runtime-lora-updating",
                                     "--profile", "8b-eager", "--time-scale", "0.3"),
                port=port, ready_url=f"http://127.0.0.1:{port}/health", timeout=60)
    sidecar_port = free_port()
    seen: list[bool] = []
    client = redis.Redis.from_url(redis_url)
    started = time.monotonic()
    sidecar = procs.start("sidecar", loraroute_cmd(
        "sidecar", "--pod-id", "pod-w", "--vllm-url", f"http://127.0.0.1:{port}", "--port", str(sidecar_port),
        "--store-url", redis_url, "--adapter-dir", str(cache), "--base-model", BASE, "--source-path",
        str(tmp_path / "empty-source")), port=sidecar_port)
    while time.monotonic() - started < 30 and not (seen and seen[-1]):
        raw = client.get("loraroute:pod:pod-w")
        if raw:
            seen.append(json.loads(raw)["lora_ready"])
        time.sleep(0.05)
    client.close()
    assert seen and seen[0] is False and seen[-1] is True, seen[:3]
    log = sidecar.log_tail()
    took = float(log.split("LoRA warm-up on adapter sql took ")[1].split("s")[0])
    assert took > 0.9, log  # it paid the compile (3.65 s × 0.3), so no client request will


# --- the sidecar's control API and its settings -------------------------------------------------------
def test_the_sidecar_control_api_needs_the_token_and_check_config_hides_passwords(procs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    (tmp_path / "s").mkdir()
    env = {"LR_TOKEN": "t0ken-5ecret", "LORAROUTE_SIDECAR_CONTROL_TOKEN_ENV": "LR_TOKEN"}
    procs.start("sidecar", loraroute_cmd("sidecar", "--pod-id", "p", "--vllm-url", "http://127.0.0.1:9",
                                         "--port", str(port), "--adapter-dir", str(tmp_path / "a"),
                                         "--source-path", str(tmp_path / "s")),
                port=port, ready_url=f"http://127.0.0.1:{port}/healthz", timeout=60, env=env)
    url = f"http://127.0.0.1:{port}"
    assert httpx.get(url + "/healthz").status_code == 200 and httpx.get(url + "/metrics").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "t0ken-5ecret"}):
        r = httpx.post(url + "/adapters/sql/ensure", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_control_token"
        assert "t0ken" not in r.text
    r = httpx.post(url + "/adapters/sql/ensure", headers={"Authorization": "Bearer t0ken-5ecret"})
    assert r.status_code == 404  # past the token: the adapter is not in the (empty) store
    assert httpx.get(url + "/adapters").status_code == 401
    check = subprocess.run(loraroute_cmd("sidecar", "--check-config", "--pod-id", "p", "--vllm-url", "http://x:1",
                                         "--store-url", "redis://:hunter2@redis:6379/0"),
                           capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0 and "hunter2" not in check.stdout
    assert json.loads(check.stdout)["store"]["url"] == "redis://redis:6379/0"
    empty = subprocess.run(loraroute_cmd("sidecar", "--check-config", "--pod-id", "p", "--vllm-url", "http://x:1"),
                           capture_output=True, text=True, timeout=60, check=False,
                           env={**__import__("os").environ, "LORAROUTE_SIDECAR_CONTROL_TOKEN_ENV": "UNSET_TOKEN_VAR"})
    assert empty.returncode == 2 and "UNSET_TOKEN_VAR" in empty.stderr  # a missing Secret never opens the API
    assert redact_url("rediss://user:pw@h:6380/1?password=x") == "rediss://h:6380/1"


# --- bounded caches and messages --------------------------------------------------------------------
def test_the_resolution_cache_is_bounded_in_bytes_and_refuses_oversized_names() -> None:
    policy = AccessPolicy(load_config({"bases": [{"name": BASE, "adapters": ["sql"]}]}, env={}))
    with pytest.raises(APIError) as e:
        policy.resolve(None, "m" * 1_000_000)
    assert e.value.status == 400 and len(e.value.message) < 200 and not policy._cache
    for i in range(30_000):  # distinct unknown names of 300 characters
        with pytest.raises(APIError):
            policy.resolve(None, f"{BASE}:{i:0>120}")
    assert policy._cache_bytes <= 4 * 1024 * 1024 and len(policy._cache) <= 20_000
    with pytest.raises(APIError) as e:
        policy.resolve(None, ["a" * 1000])
    assert e.value.status == 400


def test_an_s3_location_and_a_file_name_are_joined_with_one_slash(tmp_path: Path) -> None:
    folder = peft.make_adapter(tmp_path / "sql", rank=8, base_model=BASE)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(Exception) as e:
        validate_dir(folder, where="s3://adapters/adapters/sql/", max_lora_rank=16, base_model=BASE,
                     max_adapter_bytes=1 << 30)
    assert "s3://adapters/adapters/sql/adapter_config.json" in str(e.value) and "sql//" not in str(e.value)


def test_the_simulator_refuses_sampling_parameters_as_vllm_does() -> None:
    errors = check_types({"stop": 5})
    assert [(e["type"], e["loc"]) for e in errors] == [("string_type", ("body", "stop", "str")),
                                                       ("list_type", ("body", "stop", "list[str]"))]
    assert check_types({"temperature": "0.5", "seed": 3.0, "stop": ["a"]}) == []  # lax, as pydantic
    assert check_ranges({"temperature": -1}, None) == (
        "temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0)", "temperature")
    assert check_ranges({"top_p": 0}, None) == ("top_p must be in (0, 1], got 0.0. (parameter=top_p, value=0.0)",
                                                "top_p")
    assert check_ranges({"presence_penalty": 3}, None) == ("presence_penalty must be in [-2, 2], got 3.0.", None)
    assert check_ranges({"min_tokens": 9}, 4) == ("min_tokens must be less than or equal to max_tokens=4, got 9.",
                                                  None)
    assert check_ranges({"temperature": 0.7, "top_p": 0.9, "stop": ["\n"]}, 16) is None
