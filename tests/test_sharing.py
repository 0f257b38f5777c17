"""Routing state shared between gateway replicas: the merge (``scorer.sharing``), the cold-adapter
hash of ``max-score``, and two real gateway processes on one real Redis (``gateway.sharing``)."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from bench.cluster import BenchCluster
from bench.workload import load_spec
from loraroute.services import restart_redis
from scorer.costmodel import C_GPU, Observation
from scorer.model import AdapterRef, PodState, RoutingRequest
from scorer.build import build_pipeline
from scorer.sharing import Peer, PodFigures, merge_costs, merge_figures, own_cost_stats, own_figures

NOW = 1_000_000.0
SPEC = Path(__file__).resolve().parent.parent / "bench" / "specs" / "smoke.yaml"


def pod(pod_id: str, **kw: Any) -> PodState:
    base = dict(pod_id=pod_id, url=f"http://{pod_id}", observed_at=NOW, healthy=True, base_models=("base",),
                max_loras=2, max_cpu_loras=4, max_lora_rank=64, num_gpu_blocks=1000, block_size=16)
    base.update(kw)
    return PodState(**base)  # type: ignore[arg-type]


def req(adapter: str | None = "sql", prompt_tokens: int = 100) -> RoutingRequest:
    return RoutingRequest(AdapterRef("base", adapter, 8), prompt_tokens=prompt_tokens, max_tokens=10)


def test_peers_figures_add_to_own_and_stale_or_silent_peers_count_for_nothing() -> None:
    pl = build_pipeline("default")
    pods = {p: pod(p) for p in ("a", "b")}
    pl.pick(req(), pods, NOW)
    pl.on_dispatch("a", req(), NOW)
    local = pl.local
    a = local.pods["a"]
    own_pending = a.own_pending_until
    peer = Peer("r2", {"a": PodFigures(3, 300, 0.5, ()), "b": PodFigures(1, 50, 0.0, (("code", 0.1),))}, NOW)
    assert merge_figures(local, [peer], NOW + 0.1, stale_s=0.25) == 1
    b = local.pods["b"]
    assert (a.inflight, a.inflight_tokens, a.own_inflight) == (4, 410, 1)
    assert a.pending_until == pytest.approx(own_pending + 0.4)  # the peer's queue drained for 0.1 s
    assert "code" in b.incoming and b.inflight == 1
    assert pl.inflight("a") == (1, 110)  # metrics and /admin/pods keep this replica's own count
    pl.on_complete("a", req(), True)
    assert (a.inflight, a.own_inflight) == (3, 0)
    # 0.3 s after the figures were current the peer is stale: own figures only
    assert merge_figures(local, [peer], NOW + 0.3, stale_s=0.25) == 0
    assert (a.inflight, a.inflight_tokens, b.inflight) == (0, 0, 0)
    assert a.pending_until == a.own_pending_until
    assert local.peer_pods == set()


def test_own_figures_carry_the_marks_this_replica_made_and_drop_confirmed_ones() -> None:
    pl = build_pipeline("default")
    pods = {"a": pod("a")}
    pl.pick(req("sql"), pods, NOW)
    pl.on_dispatch("a", req("sql"), NOW)
    figs = own_figures(pl.local, NOW + 0.05)
    assert figs["a"].inflight == 1 and figs["a"].incoming == (("sql", pytest.approx(0.05)),)
    # the pod's state now shows the adapter on GPU: the mark is confirmed and no longer published
    pl.pick(req("sql"), {"a": pod("a", gpu_adapters=("sql",), observed_at=NOW + 0.1)}, NOW + 0.1)
    assert own_figures(pl.local, NOW + 0.1)["a"].incoming == ()
    # a peer's mark for an adapter the pod already shows on GPU is not taken
    merge_figures(pl.local, [Peer("r2", {"a": PodFigures(0, 0, 0.0, (("sql", 0.0),))}, NOW + 0.1)], NOW + 0.1, 0.25)
    assert "sql" not in pl.local.pods["a"].incoming


def test_cold_adapter_goes_to_one_pod_on_every_replica_while_shared() -> None:
    pods = {f"p{i}": pod(f"p{i}") for i in range(6)}
    adapters = [f"new-{k}" for k in range(40)]
    chosen: list[dict[str, str]] = []
    for seed in (1, 2, 3):
        pl = build_pipeline({"preset": "default", "picker": {"type": "max-score", "parameters": {"seed": seed}}})
        pl.local.shared = True
        chosen.append({ad: pl.pick(req(ad), pods, NOW).pod_id or "" for ad in adapters})
    assert chosen[0] == chosen[1] == chosen[2]
    assert len(set(chosen[0].values())) >= 4  # the hash spreads different adapters over the pods
    # alone (not shared) a tie stays random: the three replicas disagree somewhere
    alone = []
    for seed in (1, 2, 3):
        pl = build_pipeline({"preset": "default", "picker": {"type": "max-score", "parameters": {"seed": seed}}})
        alone.append({ad: pl.pick(req(ad), pods, NOW).pod_id for ad in adapters})
    assert not alone[0] == alone[1] == alone[2]


def test_cost_statistics_pool_every_replicas_observations() -> None:
    """Two replicas that each saw half of the observations learn what one router that saw all
    of them would have learned."""
    def fitted(split: bool) -> dict[str, float]:
        pls = [build_pipeline("default") for _ in range(2)]
        rng = np.random.default_rng(5)
        for i in range(400):
            tokens = float(rng.uniform(50, 2000))
            obs = Observation(0.02 + 0.0001 * tokens, tokens, False, C_GPU, 8, 0.0)
            target = pls[i % 2] if split else pls[0]
            assert target.local.costs is not None
            target.local.costs.observe("g", obs)
        a, b = pls[0].local.costs, pls[1].local.costs
        assert a is not None and b is not None
        if split:
            merge_costs(a, [Peer("r2", costs=own_cost_stats(b), costs_at=NOW)], NOW, 10.0)
        else:
            a.fits["g"].refit()
        c = a.constants("g")
        return {"base_s": c.base_s, "prefill_s_per_token": c.prefill_s_per_token}

    pooled, single = fitted(True), fitted(False)
    assert pooled["prefill_s_per_token"] == pytest.approx(single["prefill_s_per_token"], rel=0.05)
    assert pooled["prefill_s_per_token"] == pytest.approx(0.0001, rel=0.1)
    assert pooled["base_s"] == pytest.approx(single["base_s"], abs=0.003)


def test_statistics_of_another_feature_form_are_not_pooled() -> None:
    """A replica of another version (its group keys without our form suffix) publishes
    statistics of other features: summing them would mix two meanings, so they are ignored."""
    pls = [build_pipeline("default") for _ in range(2)]
    for i in range(200):
        obs = Observation(0.02 + 0.0001 * (50 + i), 50.0 + i, False, C_GPU, 8, 0.0)
        for pl in pls:
            assert pl.local.costs is not None
            pl.local.costs.observe("g", obs)
    a, b = pls[0].local.costs, pls[1].local.costs
    assert a is not None and b is not None
    stats = own_cost_stats(b)
    assert len(stats) == 1
    old_form = {key.split("#", 1)[0]: st for key, st in stats.items()}
    assert merge_costs(a, [Peer("old", costs=old_form, costs_at=NOW)], NOW, 10.0) == 0
    assert not a.fits["g"].has_peer_stats
    assert merge_costs(a, [Peer("new", costs=stats, costs_at=NOW)], NOW, 10.0) == 1
    assert a.fits["g"].has_peer_stats


# --- two real gateway replicas on one real Redis ---------------------------------------------------
ADMIN = {"Authorization": "Bearer admin-key"}


def _extra() -> dict[str, Any]:
    """The admin key, and a freshness bound long enough that the pods stay routable while Redis
    (which also carries their PodState here) is stopped: what is tested is the sharing."""
    return {"admin": {"api_key_sha256": [hashlib.sha256(b"admin-key").hexdigest()]},
            "pipeline": {"preset": "default", "filters": [
                {"type": "healthy-fresh", "parameters": {"max_age_s": 120.0}}, "serves-base", "rank-fits"]}}


def _pods(url: str) -> dict[str, Any]:
    return httpx.get(url + "/admin/pods", headers=ADMIN, timeout=5).json()


def _wait(cond: Any, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.02)
    return cond()


def test_two_replicas_share_routing_state_and_route_alone_when_redis_stops(tmp_path: Path) -> None:
    spec = load_spec(SPEC)
    base = spec.cluster.base_model
    with BenchCluster(spec, tmp_path / "cluster", time_scale=1.0, sidecars=True) as cl:
        gws = cl.start_gateways("default", 2, [_extra(), _extra()])
        urls = [g.url for g in gws]
        clients = [openai.OpenAI(base_url=u + "/v1", api_key="unused", max_retries=0, timeout=30) for u in urls]
        # each replica hears the other (keys at start, then the channel)
        assert _wait(lambda: all(_pods(u).get("sharing", {}).get("peers") for u in urls)), [_pods(u) for u in urls]

        # 1. a burst for a brand-new adapter through both replicas lands on one pod
        served: list[tuple[int, str]] = []  # (replica, pod)
        lock = threading.Lock()

        def one(i: int) -> None:
            raw = clients[i % 2].chat.completions.with_raw_response.create(
                model=f"{base}:ad011", max_tokens=4, messages=[{"role": "user", "content": f"burst {i}"}])
            with lock:
                served.append((i % 2, raw.headers["x-loraroute-pod"]))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        # both replicas send it to the same pod; the last of the burst may still go elsewhere (a pod
        # loading the adapter with three requests queued can lose to an idle one on the load terms)
        pods = [p for _, p in served]
        top = max(set(pods), key=pods.count)
        assert len(served) == 4 and pods.count(top) >= 3, served
        assert {r for r, p in served if p == top} == {0, 1}, served

        # 2. a request in flight on replica 0 is counted in replica 1's view, and leaves it after
        stream = clients[0].chat.completions.create(
            model=f"{base}:ad011", max_tokens=400, stream=True, messages=[{"role": "user", "content": "long"}])
        first = next(iter(stream))
        assert first.choices is not None

        def peer_inflight() -> dict[str, int]:
            return {p["pod_id"]: p["router"]["peer_inflight"] for p in _pods(urls[1])["data"]
                    if p["router"] and p["router"]["peer_inflight"]}

        seen = _wait(peer_inflight)
        assert list(seen.values()) == [1], seen
        r = httpx.post(urls[1] + "/v1/chat/completions", timeout=30, headers={**ADMIN, "x-loraroute-debug": "1"},
                       json={"model": f"{base}:ad000", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 200
        explain = r.json() and httpx.Response(200, content=r.headers["x-loraroute-explain"]).json()
        assert explain["sharing"]["peer_inflight"] == seen and len(explain["sharing"]["peers"]) == 1
        stream.close()
        assert _wait(lambda: not peer_inflight()), peer_inflight()

        # 3. Redis stops: both replicas route on their own state, without errors
        redis = next(p for p in cl.procs if p.name == "redis")
        redis.stop()
        assert _wait(lambda: all(not _pods(u)["sharing"]["connected"] and not _pods(u)["sharing"]["peers"]
                                 for u in urls))
        for i in range(6):
            out = clients[i % 2].chat.completions.create(
                model=f"{base}:ad001", max_tokens=2, messages=[{"role": "user", "content": f"alone {i}"}])
            assert out.choices[0].message.content is not None
        metrics = httpx.get(urls[0] + "/metrics", timeout=5).text
        assert "loraroute_sharing_connected 0.0" in metrics and "loraroute_sharing_peers 0.0" in metrics

        # 4. Redis back (empty, as after a restart): the replicas find each other again
        restart_redis(redis, log_dir=cl.log_dir)
        assert _wait(lambda: all(_pods(u)["sharing"]["connected"] and _pods(u)["sharing"]["peers"] for u in urls),
                     timeout=10), [_pods(u)["sharing"] for u in urls]


def test_messages_are_parsed_strictly_and_this_replicas_own_are_ignored() -> None:
    import msgpack

    from gateway.config import SharingConfig
    from gateway.sharing import StateSharing

    pl = build_pipeline("default")
    pl.pick(req(), {"a": pod("a")}, NOW)
    sh = StateSharing("redis://127.0.0.1:1/0", SharingConfig(replica_id="me"), lambda: pl.local, clock=lambda: NOW)
    good = msgpack.packb(["f", "r2", 1, [["a", 2, 20, 0.0, [["sql", 0.01]]]]])
    assert sh._on_message(good, NOW) and sh.fresh_peers() == {"r2": 0.0}
    sh._merge(NOW)
    assert pl.local.pods["a"].inflight == 2 and "sql" in pl.local.pods["a"].incoming
    for bad in (b"\x00garbage", msgpack.packb(["x", "r3", 1, []]), msgpack.packb(["f", "r3", 1, [["a", "many"]]]),
                msgpack.packb(["c", "r3", 1, [["g", [1.0] * 3, [0.0], 1.0]]])):
        assert not sh._on_message(bad, NOW)
    assert sh.stats.malformed == 4 and set(sh.peers) == {"r2"}
    assert not sh._on_message(msgpack.packb(["f", "me", 1, [["a", 9, 9, 0.0, []]]]), NOW)
    assert pl.local.pods["a"].inflight == 2
