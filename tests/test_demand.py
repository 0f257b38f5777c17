"""The demand estimate (scorer/demand.py) and where it is shared and persisted
(podstate/placement_store.py): a real Redis over TCP and a real file."""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from podstate.placement_store import MemoryPlacementStore, PlacerStatus, RedisPlacementStore, open_placement_store
from scorer.demand import DemandSnapshot, DemandTracker, merge_demand, resume_from
from scorer.model import AdapterRef, RoutingRequest
from scorer.build import build_pipeline

BASE = "llama"


def req(adapter: str | None, base: str = BASE) -> RoutingRequest:
    return RoutingRequest(AdapterRef(base, adapter, 16), prompt_tokens=10)


def poisson_times(rate: float, duration: float, seed: int, start: float = 0.0) -> list[float]:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=int(rate * duration * 2) + 10)
    times = start + np.cumsum(gaps)
    return [float(t) for t in times if t < start + duration]


# --- the estimator ---------------------------------------------------------------------------------
def test_rate_estimates_a_poisson_stream_and_halves_per_half_life() -> None:
    tracker = DemandTracker(half_life_s=60.0)
    rates = {"a": 4.0, "b": 1.0}
    events = sorted((t, name) for i, (name, r) in enumerate(rates.items()) for t in poisson_times(r, 900.0, seed=i))
    for t, name in events:
        tracker.observe(req(name), t)
    now = 900.0
    demand = merge_demand([tracker.snapshot("w", now)], now).by_key()
    for name, true_rate in rates.items():
        assert demand[(BASE, name)].rate_rps == pytest.approx(true_rate, rel=0.25)
    assert demand[(BASE, "a")].share + demand[(BASE, "b")].share == pytest.approx(1.0)
    later = merge_demand([tracker.snapshot("w", now)], now + 60.0).by_key()
    for name in rates:
        assert later[(BASE, name)].rate_rps == pytest.approx(demand[(BASE, name)].rate_rps / 2, rel=1e-6)
        assert later[(BASE, name)].share == pytest.approx(demand[(BASE, name)].share, rel=1e-9)


def test_a_retry_of_the_same_request_counts_once_and_base_requests_not_at_all() -> None:
    tracker = DemandTracker(half_life_s=1e9)
    r = req("a")
    tracker.observe(r, 1.0)
    tracker.observe(r, 1.0)          # the same request dispatched again (a retry on another pod)
    tracker.observe(req("a"), 1.0)   # a new request
    tracker.observe(req(None), 1.0)  # the base model: no adapter to place
    snap = tracker.snapshot("w", 1.0)
    assert [(e.adapter, e.count) for e in snap.entries] == [("a", 2.0)]


def test_pipeline_dispatches_feed_the_demand() -> None:
    pl = build_pipeline("default")
    r = req("sql")
    pl.on_dispatch("p0", r, 10.0)
    pl.on_dispatch("p1", r, 10.1)  # retry elsewhere
    pl.on_dispatch("p0", req("sql"), 10.2)
    entries = pl.demand.snapshot("w", 10.2).entries
    assert len(entries) == 1 and entries[0].count == pytest.approx(2.0, rel=1e-3)
    reloaded = build_pipeline("llm-d")
    reloaded.adopt_state_from(pl)
    assert reloaded.demand is pl.demand


def test_bounded_keeps_the_most_demanded() -> None:
    tracker = DemandTracker(half_life_s=100.0, max_adapters=50)
    for i in range(20):
        tracker.observe(req("popular"), float(i))
    for i in range(1000):
        tracker.observe(req(f"rare-{i}"), 20.0 + i * 0.01)
    assert len(tracker) <= 50
    names = {e.adapter for e in tracker.snapshot("w", 30.0).entries}
    assert "popular" in names


def test_merge_sums_writers_and_survives_a_long_downtime() -> None:
    one, two = DemandTracker(half_life_s=300.0), DemandTracker(half_life_s=300.0)
    for t in range(30):
        one.observe(req("a"), float(t))
        two.observe(req("a"), float(t) + 0.5)
        if t % 3 == 0:
            two.observe(req("b"), float(t) + 0.7)
    now = 30.0
    merged = merge_demand([one.snapshot("one", now), two.snapshot("two", now)], now).by_key()
    alone = {w: merge_demand([s], now).by_key() for w, s in
             (("one", one.snapshot("one", now)), ("two", two.snapshot("two", now)))}
    assert merged[(BASE, "a")].rate_rps == pytest.approx(
        alone["one"][(BASE, "a")].rate_rps + alone["two"][(BASE, "a")].rate_rps, rel=1e-9)
    # 30 days later every rate has decayed far below what a float holds, the ranking has not
    month = now + 30 * 86400.0
    late = merge_demand([one.snapshot("one", now), two.snapshot("two", now)], month)
    assert [a.adapter for a in late.adapters] == ["a", "b"]
    assert late.adapters[0].rate_rps == 0.0
    assert late.adapters[0].share == pytest.approx(merged[(BASE, "a")].share, rel=1e-9)


def test_a_restarted_cluster_resumes_yesterday_and_live_traffic_takes_over() -> None:
    day = 86400.0
    old1, old2 = DemandTracker(half_life_s=600.0), DemandTracker(half_life_s=600.0)
    for t in range(90):
        old1.observe(req("favourite"), float(t))
        if t % 9 == 0:
            old2.observe(req("rare"), float(t) + 0.5)
    persisted = [old1.snapshot("old-1", 90.0), old2.snapshot("old-2", 60.0)]
    now = 90.0 + day
    # a live writer in the store: its counts carry the present, nothing is resumed
    live = DemandTracker().snapshot("other", now - 1.0)
    assert resume_from([*persisted, live], "me", now, live_window_s=15.0) is None
    assert resume_from([], "me", now, live_window_s=15.0) is None
    prior = resume_from(persisted, "me", now, live_window_s=15.0)
    assert prior is not None and prior.writer == "me" and all(e.at == now for e in prior.entries)
    counts = {e.adapter: e.count for e in prior.entries}
    # the downtime is gone: each count is its writer's, decayed only to the newest publication (90 s)
    for snap, name in ((persisted[0], "favourite"), (persisted[1], "rare")):
        e = snap.entries[0]
        assert counts[name] == pytest.approx(e.count * 2 ** (-(90.0 - e.at) / 600.0))
    me = DemandTracker(half_life_s=600.0)
    me.load(prior)
    for i in range(3):  # the first live requests are for the rare adapter
        me.observe(req("rare"), now + i)
    merged = merge_demand([*persisted, me.snapshot("me", now + 3)], now + 3).by_key()
    assert merged[(BASE, "favourite")].share > 0.8
    # without resuming, three requests would have outweighed the whole of yesterday
    fresh = DemandTracker(half_life_s=600.0)
    for i in range(3):
        fresh.observe(req("rare"), now + i)
    naive = merge_demand([*persisted, fresh.snapshot("me", now + 3)], now + 3).by_key()
    assert naive[(BASE, "favourite")].share < 1e-30


def test_snapshot_round_trip_and_strict_reading() -> None:
    tracker = DemandTracker()
    tracker.observe(req("a"), 5.0)
    tracker.observe(req("b", base="other"), 6.0)
    snap = tracker.snapshot("w1", 7.0)
    assert DemandSnapshot.from_dict(json.loads(json.dumps(snap.to_dict()))) == snap
    for bad in ({}, {"writer": "w", "published_at": 1, "half_life_s": 0, "entries": []},
                {"writer": "w", "published_at": 1, "half_life_s": 5, "entries": [["b", "a", -1, 0, 0]]},
                {"writer": "w", "published_at": 1, "half_life_s": 5, "entries": [["b", 3, 1, 0, 0]]},
                {"writer": "w", "published_at": 1, "half_life_s": 5, "entries": "x"}):
        with pytest.raises(ValueError):
            DemandSnapshot.from_dict(bad)


# --- persistence: a file with the memory store --------------------------------------------------------
def test_file_persists_demand_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "demand.json"

    async def scenario() -> None:
        tracker = DemandTracker()
        for t in range(10):
            tracker.observe(req("yesterday-favourite"), 100.0 + t)
        first = MemoryPlacementStore(path)
        await first.start()
        await first.publish_demand(tracker.snapshot("gw-1", 110.0))
        await first.publish_demand(DemandTracker().snapshot("short-lived", 110.0), retention_s=0.05)
        restarted = MemoryPlacementStore(path)
        await asyncio.sleep(0.1)
        await restarted.start()
        loaded = await restarted.load_demand()
        assert [s.writer for s in loaded] == ["gw-1"]  # the other one's retention has passed
        assert loaded[0] == tracker.snapshot("gw-1", 110.0)

    asyncio.run(scenario())
    path.write_text("{not json")

    async def corrupt() -> None:
        store = MemoryPlacementStore(path)
        await store.start()
        assert await store.load_demand() == []

    asyncio.run(corrupt())


# --- Redis ----------------------------------------------------------------------------------------------
def test_redis_shares_demand_lease_and_status(redis_url: str) -> None:
    async def scenario() -> None:
        a = open_placement_store(redis_url, key_prefix="t")
        b = open_placement_store(redis_url, key_prefix="t")
        assert isinstance(a, RedisPlacementStore)
        await a.start()
        await b.start()
        ta, tb = DemandTracker(), DemandTracker()
        ta.observe(req("x"), 1.0)
        tb.observe(req("y"), 2.0)
        await a.publish_demand(ta.snapshot("a", 3.0))
        await b.publish_demand(tb.snapshot("b", 3.0))
        seen = {s.writer: s for s in await b.load_demand()}
        assert set(seen) == {"a", "b"} and seen["a"] == ta.snapshot("a", 3.0)
        # the lease: one holder at a time, renewable by its holder only
        assert await a.acquire_lease("a", 0.4)
        assert not await b.acquire_lease("b", 0.4)
        assert await a.acquire_lease("a", 0.4)
        assert await b.lease_holder() == "a"
        await b.release_lease("b")              # not b's to release
        assert await b.lease_holder() == "a"
        await a.release_lease("a")
        assert await b.acquire_lease("b", 0.3)
        await asyncio.sleep(0.45)               # b stops renewing: the lease lapses
        assert await b.lease_holder() is None
        assert await a.acquire_lease("a", 5.0)
        await a.publish_status(PlacerStatus("a", time.time(), ("pod-1",)), 0.3)
        status = await b.load_status()
        assert status is not None and status.leader == "a" and status.warming == ("pod-1",)
        await asyncio.sleep(0.4)
        assert await b.load_status() is None
        await a.close()
        await b.close()

    asyncio.run(scenario())


def test_redis_unreachable_reads_as_nothing() -> None:
    async def scenario() -> None:
        from loraroute.procs import free_port

        store = RedisPlacementStore(f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=0.3)
        await store.start()
        assert await store.load_demand() == []
        assert await store.acquire_lease("a", 1.0) is False
        assert await store.load_status() is None
        await store.publish_demand(DemandTracker().snapshot("a", 1.0))  # logs, does not raise
        await store.close()

    asyncio.run(scenario())


def test_memory_lease_expires() -> None:
    async def scenario() -> None:
        store = MemoryPlacementStore()
        assert await store.acquire_lease("a", 0.1)
        assert not await store.acquire_lease("b", 0.1)
        await asyncio.sleep(0.15)
        assert await store.acquire_lease("b", 0.1)
        assert await store.lease_holder() == "b"

    asyncio.run(scenario())


def test_log_shares_match_counts_exactly() -> None:
    tracker = DemandTracker(half_life_s=10.0)
    for _ in range(3):
        tracker.observe(req("three"), 0.0)
    tracker.observe(req("one"), 0.0)
    d = merge_demand([tracker.snapshot("w", 0.0)], 5000.0).by_key()
    assert d[(BASE, "three")].share == pytest.approx(0.75)
    assert math.isclose(d[(BASE, "one")].share, 0.25)
