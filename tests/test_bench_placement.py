"""Smoke run of a benchmark point with placement (``loraroute bench run … --placement``): the
real runner, cluster, sidecars, Redis and gateway on the smoke spec with few requests.

Checks that the run is one command that produces consistent results, never its numbers: the
warm-up from yesterday's demand happened before the replay, the bound and placement sections add
up, the pre-load stall stayed within the budget, the report has the new table and plot.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.cluster import Target
from bench.report import build_report
from bench.runner import RunOptions, run

SPEC = Path(__file__).resolve().parent.parent / "bench" / "specs" / "smoke.yaml"
PNG = b"\x89PNG\r\n\x1a\n"


def test_placement_point_is_one_command_and_consistent(tmp_path: Path) -> None:
    out = tmp_path / "results"
    written = run(RunOptions(
        spec_path=SPEC, target=Target("policy", "default", placement=True), loads=[0.6], requests=60,
        time_scale=0.25, capacity=8.0, out_dir=out, progress=False,
    ))
    assert [p.name for p in written] == ["default+placement-load60.json"]
    doc = json.loads(written[0].read_text())
    meta, s, b, p = doc["meta"], doc["summary"], doc["bounds"], doc["placement"]
    assert meta["target"] == "default+placement" and meta["placement"]["persisted"] is True
    assert s["ok"] >= 0.95 * s["requests"]
    # the cold pods were warmed with yesterday's demand before the first request
    warm = p["by_phase"]["warmup"]
    assert warm["loads"] > 0 and meta["sim_disk_loads"]["before"] >= warm["loads"] - warm["failed"]
    assert p["plan_roles"]["hot"] + p["plan_roles"]["warm"] > 0 and p["leader"] == "bench-gateway"
    # the references are those of the trace: compulsory <= LRU; measured are requests
    assert b["requests"] == len(doc["requests"]) == 60
    assert 0 < b["compulsory"] <= b["cluster_lru"] <= b["requests"]
    assert b["capacity"] == 3 * 4
    assert 0 <= b["disk_admissions"] <= b["with_ground_truth"] == 60
    assert b["disk_loads"] >= p["by_phase"].get("preload", {}).get("loads", 0)
    # pre-load stall within the configured budget on every pod
    assert all(v <= p["budget_s"] + 1e-9 for v in p["max_window_stall_by_pod"].values())
    assert p["requests_sharing_a_load"] <= s["ok"]
    report = build_report([out], tmp_path / "report")
    text = report.read_text()
    assert "Disk-tier admissions against the bounds" in text and "What the placer did" in text
    assert f"| default+placement | {b['disk_admissions']} | {b['compulsory']} | {b['cluster_lru']} (12) |" in text
    for png in ("disk_admissions_load60.png", "p99_by_workload.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == PNG
