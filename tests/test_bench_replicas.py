"""Several gateway replicas in a benchmark run: how the client spreads requests over them
(``bench.client.Spreader``), and a real run with two replicas on one Redis behind the sidecars."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.client import Spreader
from bench.cluster import Target
from bench.runner import RunOptions, run

SPEC = Path(__file__).resolve().parent.parent / "bench" / "specs" / "smoke.yaml"


def test_per_request_is_round_robin() -> None:
    s = Spreader(3, "per-request")
    got = []
    for _ in range(7):
        i = s.acquire()
        got.append(i)
        s.release(i)
    assert got == [0, 1, 2, 0, 1, 2, 0]
    assert s.requests == [3, 2, 2]


def test_per_connection_reuses_idle_connections_before_opening_new_ones() -> None:
    s = Spreader(3, "per-connection")
    # one request at a time: the one keep-alive connection carries everything
    for _ in range(5):
        s.release(s.acquire())
    assert s.requests == [5, 0, 0] and s.connections == [1, 0, 0]
    # four at once: three new connections, round-robin from where the counter stands
    held = [s.acquire() for _ in range(4)]
    assert held == [0, 1, 2, 0]
    assert s.connections == [2, 1, 1]
    # released connections are reused most recent first; no new one is opened
    s.release(held[1])
    s.release(held[2])
    assert s.acquire() == 2 and s.acquire() == 1
    assert s.connections == [2, 1, 1]


def test_bad_spreads_and_targets_are_refused() -> None:
    with pytest.raises(ValueError, match="spread must be one of"):
        Spreader(2, "random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="replicas"):
        Spreader(0, "per-request")
    with pytest.raises(ValueError, match="our gateway only"):
        Target("peer", "sglang", replicas=2)
    assert Target("policy", "default").label == "default"
    assert Target("policy", "default", 4).label == "default-x4"
    assert Target("policy", "default", 2, "per-request").label == "default-x2-req"


def test_two_replicas_share_the_store_and_both_serve(tmp_path: Path) -> None:
    written = run(RunOptions(
        spec_path=SPEC, target=Target("policy", "default", 2, "per-request"), loads=[0.6],
        time_scale=0.25, capacity=40.0, requests=60, out_dir=tmp_path, progress=False,
    ))
    assert [p.name for p in written] == ["default-x2-req-load60.json"]
    doc = json.loads(written[0].read_text())
    meta, rows, s = doc["meta"], doc["requests"], doc["summary"]
    assert meta["replicas"] == 2 and meta["spread"] == "per-request"
    assert meta["state_plane"] == "sidecars+redis"
    assert meta["replica_requests"] == [30, 30]
    assert [r["replica"] for r in rows[:4]] == [0, 1, 0, 1]
    assert s["ok"] == len(rows) == 60, [r["error"] for r in rows if r["error"]][:3]
    assert all(r["pod"] in meta["pods"] for r in rows)  # each replica routed with the shared view
    cpu = meta["cpu"]
    assert cpu["router"]["count"] == 2.0
    assert cpu["router"]["cpu_s"] == pytest.approx(cpu["router:0"]["cpu_s"] + cpu["router:1"]["cpu_s"], abs=0.01)
    assert s["target"] == "default-x2-req"
    # the replicas shared their routing state: each heard the other, at a few store operations
    # per request (one pipelined SET + PUBLISH per publication)
    sh = meta["sharing"]
    assert sh["received"] > 0 and sh["published"] > 0 and 0 < sh["ops_per_request"] < 50, sh


def test_unshared_replicas_label_and_no_sharing_counters() -> None:
    t = Target("policy", "default", 4, sharing=False)
    assert t.label == "default-x4+unshared"
    assert Target.parse(t.label).sharing is False and Target.parse("default").sharing is True
