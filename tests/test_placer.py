"""The placer end to end: real gateway processes, a real simulated cluster, real sidecars and a
real Redis (bench.cluster.BenchCluster starts them), the official ``openai`` client.

- two gateways elect one leader through the store; killing it hands the lease to the other;
- a cold cluster is warmed with yesterday's (persisted) demand before it takes traffic;
- demand counted by one replica is seen by the other;
- without sidecars the placer loads through vLLM's API, and its pre-loads respect the idle-pod
  rule and the stall budget.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from bench.cluster import BenchCluster
from bench.placement import ADMIN_KEY, PlacementOptions, gateway_settings, seed_demand, yesterday_snapshot
from bench.workload import WorkloadSpec, parse_spec
from loraroute.procs import Proc

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def spec(ranks: list[int], name: str) -> WorkloadSpec:
    return parse_spec({
        "name": name, "seed": 5,
        "cluster": {"pods": 2, "max_loras": 2, "max_cpu_loras": 5, "max_lora_rank": 64},
        "adapters": {"count": 8, "ranks": ranks},
        "prefix": {"system_prompt_tokens": 40, "followup_window": 4, "max_turns": 2},
        "lengths": {"user_tokens": {"dist": "fixed", "value": 8}, "output_tokens": {"dist": "fixed", "value": 4}},
        "requests": 200,
    })


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except httpx.HTTPError as e:
            last = e
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def report(gw: Proc) -> dict[str, Any]:
    r = httpx.get(gw.url + "/admin/placement", headers=ADMIN, timeout=10)
    r.raise_for_status()
    return r.json()


def settings(cl: BenchCluster, replica: str, **placement: Any) -> dict[str, Any]:
    placement = {"replica_id": replica, "interval_s": 0.3, "lease_ttl_s": 1.5, **placement}
    demand_file = None if cl.redis_url else cl.work_dir / "demand.json"
    return gateway_settings("default", PlacementOptions(settings=placement), demand_file)


def sim_resident(cl: BenchCluster) -> dict[str, set[str]]:
    out = {}
    for pod in cl.pods:
        st = cl.sim_state(pod, limit=0)
        out[pod.id] = set(st["gpu_adapters"]) | set(st["cpu_adapters"])
    return out


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BenchCluster]:
    s = spec([8, 16], "placer-redis")
    cl = BenchCluster(s, tmp_path_factory.mktemp("placer-redis"), time_scale=0.2, sidecars=True)
    with cl:
        assert cl.redis_url
        seed_demand(yesterday_snapshot(s), cl.redis_url, None)
        yield cl


def test_two_gateways_one_leader_warm_up_shared_demand_and_failover(redis_cluster: BenchCluster) -> None:
    cl = redis_cluster
    a = cl.start_gateway("default", 0, settings(cl, "gw-a"), ready_timeout=60)
    b = cl.start_gateway("default", 1, settings(cl, "gw-b"), ready_timeout=60)
    # one leader, and both replicas agree on who it is
    reports = wait_for("one leader", lambda: (ra := report(a), rb := report(b)) and
                       ra["leader"] == rb["leader"] and ra["is_leader"] != rb["is_leader"] and (ra, rb))
    leader, follower = (a, b) if reports[0]["is_leader"] else (b, a)
    # the cold pods were warmed with yesterday's demand before taking traffic: no request has
    # been sent yet, and every pod already holds what the plan gives it
    on_leader = report(leader)
    warm_loads = [x for x in on_leader["actions"] if x["phase"] == "warmup" and x["outcome"] == "loaded"]
    assert warm_loads and all("via sidecar" in x["reason"] for x in warm_loads)
    resident = sim_resident(cl)
    for pod_id, pod in on_leader["pods"].items():
        planned = set(pod["planned_gpu"]) | set(pod["planned_cpu"])
        assert planned and planned <= resident[pod_id], (pod_id, planned, resident[pod_id])
        assert not pod["held"] and not pod["warming"]
    for gw in (a, b):
        assert httpx.get(gw.url + "/ready", timeout=5).status_code == 200
    # the plan routes: every replica computed the same plan from the same inputs
    assert {x["adapter"]: x["pods"] for x in report(follower)["plan"]["adapters"]} == {
        x["adapter"]: x["pods"] for x in on_leader["plan"]["adapters"]}
    # demand counted by the follower is seen by the leader
    adapter = on_leader["plan"]["adapters"][-1]["adapter"]

    def last_seen_at(gw: Proc) -> float:
        d = httpx.get(gw.url + "/admin/demand?limit=1000", headers=ADMIN, timeout=10).json()
        return float(next((x["last_seen"] for x in d["adapters"] if x["adapter"] == adapter), 0.0))

    sent_at = time.time()
    assert last_seen_at(leader) < sent_at  # only yesterday's counts so far
    client = OpenAI(base_url=follower.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    for _ in range(3):
        client.chat.completions.create(model=f"{cl.spec.cluster.base_model}:{adapter}", max_tokens=2,
                                       messages=[{"role": "user", "content": "hi"}])
    wait_for("the follower's demand at the leader", lambda: last_seen_at(leader) >= sent_at, timeout=20)
    writers = httpx.get(leader.url + "/admin/demand", headers=ADMIN, timeout=10).json()["writers"]
    assert {"gw-a", "gw-b", "yesterday"} <= set(writers)
    # the leader dies without a word: the follower takes the lease once it lapses
    leader.stop(sig=signal.SIGKILL)
    t0 = time.monotonic()
    wait_for("the follower to take the lease", lambda: report(follower)["is_leader"], timeout=15)
    assert time.monotonic() - t0 < 1.5 + 3 * 0.3 + 5.0
    metrics = httpx.get(follower.url + "/metrics", timeout=10).text
    assert "loraroute_placement_leader 1.0" in metrics
    assert 'loraroute_adapter_demand_rps{adapter="' in metrics


def test_admin_placement_needs_the_admin_key(redis_cluster: BenchCluster) -> None:
    gw = redis_cluster.start_gateway("default", 2, settings(redis_cluster, "gw-c"), ready_timeout=60)
    r = httpx.get(gw.url + "/admin/placement", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_key"
    r = httpx.get(gw.url + "/admin/demand", headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert r.status_code == 401


def test_without_sidecars_the_placer_loads_through_vllm_within_its_rules(tmp_path: Path) -> None:
    s = spec([8], "placer-plain")
    with BenchCluster(s, tmp_path, time_scale=1.0, sidecars=False) as cl:
        seed_demand(yesterday_snapshot(s), None, cl.work_dir / "demand.json")
        # keep pod-0 busy with a long request sent to it directly (another client's traffic)
        busy = httpx.Client(timeout=60)
        stream = busy.stream("POST", cl.pods[0].url + "/v1/chat/completions", json={
            "model": "ad007", "messages": [{"role": "user", "content": "x"}], "max_tokens": 6000, "stream": True})
        stream.__enter__()
        try:
            extra = settings(cl, "gw-plain", adapter_dir=str(cl.work_dir / "adapters"),
                             warmup={"enabled": False},
                             preload={"max_busy": 0, "stall_budget_s": 0.2, "budget_window_s": 60.0})
            gw = cl.start_gateway("default", extra=extra, ready_timeout=60)
            rep = wait_for("pre-loads on the idle pod", lambda: (r := report(gw)) and
                           any(x["outcome"] == "loaded" and x["pod"] == "pod-1" for x in r["actions"]) and
                           any(x["outcome"] == "skipped" and x["pod"] == "pod-1" and x["reason"].startswith("budget")
                               for x in r["actions"]) and r)
            skipped0 = [x for x in rep["actions"] if x["pod"] == "pod-0" and x["outcome"] == "skipped"]
            assert skipped0 and skipped0[-1]["reason"].startswith("busy")
            assert not any(x["pod"] == "pod-0" and x["outcome"] == "loaded" for x in rep["actions"])
        finally:
            stream.__exit__(None, None, None)
            busy.close()
        loaded1 = [x for x in rep["actions"] if x["pod"] == "pod-1" and x["outcome"] == "loaded"]
        assert all("via vllm" in x["reason"] and x["phase"] == "preload" for x in loaded1)
        assert sum(x["stall_s"] for x in loaded1) <= 0.2 + 1e-9
        assert rep["pods"]["pod-1"]["stall_budget"]["used_s"] <= 0.2 + 1e-9
        assert {x["adapter"] for x in loaded1} <= sim_resident(cl)["pod-1"]
        # the in-process monitor was told: the gateway's view shows the loaded adapters
        view = httpx.get(gw.url + "/admin/pods", headers=ADMIN, timeout=10).json()["data"]
        pod1 = next(p for p in view if p["pod_id"] == "pod-1")["state"]
        assert {x["adapter"] for x in loaded1} <= set(pod1["gpu_adapters"]) | set(pod1["cpu_adapters"])
        # once pod-0 is idle it gets its pre-load too
        wait_for("a pre-load on pod-0 once idle", lambda: any(
            x["pod"] == "pod-0" and x["outcome"] == "loaded" for x in report(gw)["actions"]), timeout=30)
        metrics = httpx.get(gw.url + "/metrics", timeout=10).text
        assert 'loraroute_placement_skipped_total{reason="busy"}' in metrics
        assert 'loraroute_placement_actions_total{outcome="loaded",phase="preload",pod="pod-1"}' in metrics
