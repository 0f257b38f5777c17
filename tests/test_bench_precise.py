"""``loraroute bench run … --precise-prefix``: labels, the pipeline it builds, and a short run of
two unshared replicas whose feeds apply the pods' relayed KV events."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.cluster import Target
from bench.precise import pipeline
from bench.runner import RunOptions, run
from scorer.build import build_pipeline

SPEC = Path(__file__).parent.parent / "bench" / "specs" / "smoke.yaml"


def test_labels_and_the_pipeline_that_replaces_prefix_cache() -> None:
    t = Target("policy", "default", 2, precise=True, sharing=False)
    assert t.label == "default-x2+precise+unshared"
    back = Target.parse("default+placement+precise")
    assert back.precise and back.placement and back.name == "default"
    with pytest.raises(ValueError, match="our gateway only"):
        Target("peer", "sglang", precise=True)
    spec = pipeline("default", Path("/adapters"))
    types = [s["type"] for s in spec["scorers"]]
    assert "prefix-cache" not in types and types.count("precise-prefix") == 1
    pp = next(s for s in spec["scorers"] if s["type"] == "precise-prefix")
    assert pp["weight"] == 1.0 and pp["parameters"]["lora_path"] == "/adapters/{name}"
    assert build_pipeline(spec).kv_reader is not None
    with pytest.raises(ValueError, match="does not have"):
        pipeline("round-robin", Path("/adapters"))


@pytest.mark.timeout(240)
def test_precise_replicas_run_with_their_feeds(tmp_path: Path) -> None:
    written = run(RunOptions(
        spec_path=SPEC, target=Target("policy", "default", 2, precise=True, sharing=False), loads=[0.6],
        time_scale=0.25, capacity=40.0, requests=40, out_dir=tmp_path, progress=False,
    ))
    assert [p.name for p in written] == ["default-x2+precise+unshared-load60.json"]
    doc = json.loads(written[0].read_text())
    meta, s = doc["meta"], doc["summary"]
    assert s["ok"] == 40 and meta["state_plane"] == "sidecars+redis"
    feed = meta["precise_prefix"]
    # every request's prompt tokenized once by the replica that routed it; both replicas'
    # feeds applied the sidecars' deltas (how many depends on how the relays coalesced bursts)
    assert feed["tokenized"] == 40 and feed["gaps"] == 0, feed
    assert len(feed["deltas_by_replica"]) == 2 and all(d and d > 0 for d in feed["deltas_by_replica"]), feed
    assert meta["sharing"] is None
