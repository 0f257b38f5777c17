"""`loraroute sidecar` processes reading the cluster's adapter demand from a real Redis, published
the way a gateway replica publishes it (``DemandTracker`` counts, ``RedisPlacementStore``), with
adapters in the moto S3 server: the disk budget evicts the least demanded adapter first, prefetch
keeps the most demanded ones on disk within the budget, and without the store it is LRU again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import boto3
import httpx
import pytest

from loraroute import peft
from loraroute.procs import Proc, ProcRegistry, free_port
from loraroute.services import start_redis
from podstate.placement_store import RedisPlacementStore
from scorer.demand import DemandTracker
from scorer.model import AdapterRef, RoutingRequest
from test_sidecar import ensure, metric, start_sidecar, start_sim

SERVED = "llama-8b"
SIM_BASE = "meta-llama/Llama-3.1-8B-Instruct"  # what the simulated vLLM serves by default


def publish(redis_url: str, counts: Mapping[tuple[str, str], int], writer: str = "gw-a") -> None:
    """Count ``counts`` requests per (base, adapter) as a gateway's pipeline does, and publish the
    replica's snapshot through the placement store as its placer does."""
    tracker = DemandTracker(half_life_s=600.0)
    now = time.time()
    for (base, adapter), n in counts.items():
        for _ in range(n):
            tracker.observe(RoutingRequest(AdapterRef(base, adapter)), now)

    async def go() -> None:
        store = RedisPlacementStore(redis_url)
        await store.start()
        await store.publish_demand(tracker.snapshot(writer, now), 3600.0)
        await store.close()

    asyncio.run(go())


def demand_of(proc: Proc) -> dict[str, object]:
    resp = httpx.get(f"{proc.url}/demand", timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def wait_for(proc: Proc, check: Callable[[dict[str, object]], bool], what: str, timeout: float = 15) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        view = demand_of(proc)
        if check(view):
            return view
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} never happened: {view}")
        time.sleep(0.1)


@pytest.fixture
def bucket(s3_server, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A fresh bucket and a function that puts same-sized adapters into it; returns (endpoint,
    bucket name, put(names) -> bytes of one adapter)."""
    endpoint = str(s3_server.extra["endpoint_url"])
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    name = f"demand-{tmp_path.name.lower().replace('_', '-')[-40:]}"
    s3.create_bucket(Bucket=name)

    def put(names: list[str]) -> int:
        size = 0
        for i, adapter in enumerate(names):
            folder = peft.make_adapter(tmp_path / "made" / adapter, rank=8, seed=i)
            for f in sorted(folder.iterdir()):
                s3.upload_file(str(f), name, f"adapters/{adapter}/{f.name}")
            size = max(size, sum(f.stat().st_size for f in folder.iterdir()))
        return size

    return endpoint, name, put


def s3_sidecar(procs: ProcRegistry, tmp_path: Path, endpoint: str, bucket: str, store_url: str, budget: int,
               *args: str, vllm_url: str | None = None) -> Proc:
    return start_sidecar(
        procs, f"sidecar-demand-{free_port()}", "--vllm-url", vllm_url or f"http://127.0.0.1:{free_port()}",
        "--adapter-dir", str(tmp_path / "adapters"), "--source-type", "s3", "--s3-endpoint-url", endpoint,
        "--s3-bucket", bucket, "--store-url", store_url, "--disk-budget-bytes", str(budget),
        "--no-load-on-ensure", "--set", "demand.refresh_s=0.2", *args)


def on_disk(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "adapters").iterdir() if not p.name.startswith("."))


def evicted(view: dict[str, object]) -> list[str]:
    events = view["events"]
    assert isinstance(events, list)
    return [e["adapter"] for e in reversed(events) if e["action"] == "evicted"]


def test_eviction_follows_the_published_demand(procs, redis_url: str, bucket, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    endpoint, name, put = bucket
    one = put(["a0", "a1", "a2", "a3", "a4"])
    # a1's big demand is for another base: it must not count on this pod
    publish(redis_url, {(SERVED, "a0"): 10, (SERVED, "a1"): 1, (SERVED, "a2"): 5, ("other-base", "a1"): 100})
    sidecar = s3_sidecar(procs, tmp_path, endpoint, name, redis_url, int(one * 3.5), "--served-model-name", SERVED)
    view = wait_for(sidecar, lambda v: v["adapters_with_demand"] == 3, "reading the demand")
    assert [t["adapter"] for t in view["top"]] == ["a0", "a2", "a1"]  # type: ignore[union-attr]
    assert view["writers"] == ["gw-a"] and view["bases"] == [SERVED] and view["age_s"] is not None
    for adapter in ("a0", "a3", "a1"):  # a0 least recently used, a3 without demand
        assert ensure(sidecar, adapter).status_code == 200
    assert ensure(sidecar, "a2").status_code == 200  # over the budget: a3 (no demand) goes, not a0 (LRU)
    assert on_disk(tmp_path) == ["a0", "a1", "a2"]
    assert ensure(sidecar, "a4").status_code == 200  # then the least demanded, a1
    assert on_disk(tmp_path) == ["a0", "a2", "a4"]
    view = demand_of(sidecar)
    assert evicted(view) == ["a3", "a1"]
    assert metric(sidecar, "loraroute_sidecar_demand_evictions_total") == 2
    assert metric(sidecar, "loraroute_sidecar_evictions_total") == 2
    assert metric(sidecar, "loraroute_sidecar_demand_adapters") == 3


def test_prefetch_fetches_the_top_adapters_within_the_budget(procs, redis_url: str, bucket,  # type: ignore[no-untyped-def]
                                                              tmp_path: Path) -> None:
    endpoint, name, put = bucket
    one = put(["p0", "p1", "p2", "p3", "p4"])
    # "ghost" is demanded but not in the source: skipped, the pass goes on
    publish(redis_url, {(SIM_BASE, "p0"): 50, (SIM_BASE, "ghost"): 45, (SIM_BASE, "p1"): 40, (SIM_BASE, "p2"): 30,
                        (SIM_BASE, "p3"): 20, (SIM_BASE, "p4"): 10})
    (tmp_path / "adapters").mkdir()
    sim = start_sim(procs, tmp_path / "adapters", "--max-loras", "2")
    # the base comes from what the pod's vLLM serves (no served_model_name configured)
    sidecar = s3_sidecar(procs, tmp_path, endpoint, name, redis_url, int(one * 3.5), "--set", "demand.prefetch=5",
                         vllm_url=sim.url)
    view = wait_for(sidecar, lambda v: v["prefetches"].get("no_room", 0) >= 1, "a prefetch pass ending at the budget")  # type: ignore[union-attr]
    assert on_disk(tmp_path) == ["p0", "p1", "p2"]  # p3 would only fit by evicting a more demanded one
    assert view["prefetches"]["downloaded"] == 3 and view["prefetches"]["failed"] == 1  # type: ignore[index]
    assert view["bases"] == [SIM_BASE]
    actions = [(e["adapter"], e["action"]) for e in reversed(view["events"])]  # type: ignore[union-attr]
    assert actions[:5] == [("p0", "prefetched"), ("ghost", "prefetch_failed"), ("p1", "prefetched"),
                           ("p2", "prefetched"), ("p3", "prefetch_no_room")]
    assert metric(sidecar, "loraroute_sidecar_prefetches_total", 'outcome="downloaded"') == 3
    assert metric(sidecar, "loraroute_sidecar_prefetches_total", 'outcome="failed"') == 1
    # fetched to disk, not loaded into vLLM
    models = httpx.get(f"{sim.url}/v1/models", timeout=10).json()
    assert not {"p0", "p1", "p2"} & {m["id"] for m in models["data"]}
    # the first ensure of a prefetched adapter reads the disk
    assert ensure(sidecar, "p1").json()["source"] == "cached"
    # demand moves: p4 becomes the most demanded; it takes the place of the least demanded (p2)
    publish(redis_url, {(SIM_BASE, "p4"): 1000, (SIM_BASE, "p0"): 50, (SIM_BASE, "p1"): 40, (SIM_BASE, "p2"): 30})
    wait_for(sidecar, lambda v: v["prefetches"].get("downloaded", 0) == 4, "the prefetch of p4")  # type: ignore[union-attr]
    assert on_disk(tmp_path) == ["p0", "p1", "p4"]
    assert evicted(demand_of(sidecar)) == ["p2"]
    time.sleep(0.6)  # more passes: p2 would only fit by evicting more demanded ones, so it stays out
    assert on_disk(tmp_path) == ["p0", "p1", "p4"]
    assert metric(sidecar, "loraroute_sidecar_prefetches_total", 'outcome="downloaded"') == 4
    assert metric(sidecar, "loraroute_sidecar_prefetches_total", 'outcome="no_room"') == 2  # p3, then p2: once each


def test_store_down_evicts_least_recently_used(procs, bucket, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    endpoint, name, put = bucket
    one = put(["a0", "a1", "a2"])
    redis_proc = procs.adopt(start_redis(log_dir=tmp_path / "logs"))
    url = str(redis_proc.extra["url"])
    publish(url, {(SERVED, "a1"): 10, (SERVED, "a0"): 1})
    sidecar = s3_sidecar(procs, tmp_path, endpoint, name, url, int(one * 2.5), "--served-model-name", SERVED)
    wait_for(sidecar, lambda v: v["adapters_with_demand"] == 2, "reading the demand")
    for adapter in ("a1", "a0"):  # a1: least recently used and most demanded
        assert ensure(sidecar, adapter).status_code == 200
    redis_proc.stop()
    wait_for(sidecar, lambda v: v["adapters_with_demand"] == 0 and v["age_s"] is None, "the demand going away")
    assert ensure(sidecar, "a2").status_code == 200
    assert on_disk(tmp_path) == ["a0", "a2"]  # least recently used, as without demand
    view = demand_of(sidecar)
    assert evicted(view) == ["a1"] and view["demand_evictions"] == 0
    assert metric(sidecar, "loraroute_sidecar_demand_evictions_total") == 0
    assert metric(sidecar, "loraroute_sidecar_evictions_total") == 1
