"""Smoke run of the benchmark: the real runner on a small variant of the reference workload.

Checks that results and the report are produced and internally consistent, never their numbers:
counts add up, percentiles are ordered, hit rates are fractions, every request has a pod, the
simulator's TTFT never beats the lower bound, plots are PNG files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench.cluster import Target
from bench.report import build_report
from bench.runner import RunOptions, run
from bench.workload import generate, load_spec

SPEC = Path(__file__).resolve().parent.parent / "bench" / "specs" / "smoke.yaml"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("bench-results")
    written: list[Path] = []
    for policy in ("default", "round-robin"):
        written += run(RunOptions(
            spec_path=SPEC, target=Target("policy", policy), loads=[0.6], time_scale=0.25,
            capacity_requests=160, out_dir=out, progress=False,
        ))
    return out, written


def test_results_are_consistent(smoke_results: tuple[Path, list[Path]]) -> None:
    out, written = smoke_results
    spec = load_spec(SPEC)
    assert len(written) == 2
    capacity = json.loads((out / "smoke" / "capacity.json").read_text())
    assert capacity["capacity_rps"] > 0 and capacity["policy"] == "least-loaded"
    trace_ids = [r.id for r in generate(spec, rate=1.0, requests=spec.requests)]
    for path in written:
        doc = json.loads(path.read_text())
        s, meta, rows = doc["summary"], doc["meta"], doc["requests"]
        assert [r["id"] for r in rows] == trace_ids  # the whole trace, in order
        assert s["requests"] == len(rows) == s["ok"] + s["errors"]
        assert s["ok"] >= 0.95 * len(rows), [r["error"] for r in rows if r["error"]][:3]
        assert s["with_pod"] == len(rows)
        assert all(r["pod"] in meta["pods"] for r in rows)
        assert sum(s["pod_counts"].values()) == len(rows)
        assert s["ttft_p50"] <= s["ttft_p90"] <= s["ttft_p99"]
        assert s["e2e_p50"] <= s["e2e_p99"]
        assert s["ttft_p50"] <= s["e2e_p50"]
        for key in ("adapter_gpu_hit", "adapter_gpu_hit_warm", "prefix_hit"):
            assert 0.0 <= s[key] <= 1.0
        assert s["imbalance"] >= 1.0
        assert meta["ground_truth_joined"] == len(rows)
        for r in rows:
            if r["status"] == 200 and r["gt_ttft_s"] is not None:
                # the simulator's own TTFT never beats the lower bound; the client's includes HTTP
                assert r["gt_ttft_s"] >= 0.999 * r["ideal_ttft_s"] - 1e-6, r
                assert r["ttft_s"] / meta["time_scale"] >= 0.999 * r["gt_ttft_s"] - 0.002
                assert r["gt_cached_tokens"] <= r["gt_prompt_tokens"]
                assert r["gt_adapter_tier"] in ("gpu", "cpu", "disk")
        assert s["ideal_ratio_p50"] >= 0.99 and s["sim_ideal_ratio_p50"] >= 0.999
        assert s["sim_ttft_p99"] <= s["ttft_p99"] + 0.002
        assert meta["cpu"]["router"]["cpu_s"] >= 0 and meta["cpu"]["machine"]["cores"] >= 1
        # provenance: the commit the run came from (the tests run from a git checkout)
        assert meta["code_version"] and s["code_version"] == meta["code_version"]
        assert s["finished_at"] == meta["finished_at"]


def test_report_and_plots(smoke_results: tuple[Path, list[Path]], tmp_path: Path) -> None:
    out, written = smoke_results
    report = build_report([out], tmp_path)
    text = report.read_text()
    assert "### Load 60 %" in text
    for target in ("default", "round-robin"):
        assert len(re.findall(rf"^\| {target} \| \d+ / 120 \|", text, re.M)) == 1  # one row in the load table
        assert text.count(f"| {target} |") == 3  # and one in the CPU table, one in the bound table
    # the CPU table says when each point finished and from which code
    for s in (json.loads(p.read_text())["summary"] for p in written):
        when = s["finished_at"].replace("T", " ").removesuffix("Z")
        assert re.search(rf"^\| {s['target']} \|.*\| {re.escape(when)} \| {re.escape(s['code_version'])} \|$", text, re.M)
    pngs = sorted(tmp_path.glob("*.png"))
    assert {p.name for p in pngs} == {"ttft_cdf_load60.png", "p99_vs_load.png", "hit_rates.png",
                                      "disk_admissions_load60.png", "p99_by_workload.png"}
    for p in pngs:
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 5000
        assert f"]({p.name})" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {s["target"] for s in summary} == {"default", "round-robin"}
