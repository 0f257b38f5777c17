"""bench/locustfile.py runs headless against real processes and reports TTFT as its own metric."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cluster import BenchCluster
from bench.workload import load_spec

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "bench" / "specs" / "smoke.yaml"


def _locust() -> str:
    exe = shutil.which("locust") or str(Path(sys.executable).with_name("locust"))
    if not Path(exe).exists():
        pytest.skip("locust is not installed (it is in the test extra)")
    return exe


def _run_locust(host: str, tmp_path: Path, env_extra: dict[str, str]) -> dict[str, dict[str, str]]:
    env = dict(os.environ, LORAROUTE_BENCH_SPEC=str(SPEC), LORAROUTE_BENCH_REQUESTS="200",
               PYTHONPATH=str(ROOT), **env_extra)
    prefix = tmp_path / "locust"
    proc = subprocess.run(
        [_locust(), "-f", str(ROOT / "bench" / "locustfile.py"), "--headless", "-u", "4", "-r", "4",
         "-t", "4s", "--host", host, "--csv", str(prefix), "--only-summary", "--stop-timeout", "10"],
        env=env, capture_output=True, text=True, timeout=90, cwd=str(tmp_path),
    )
    stats_file = Path(f"{prefix}_stats.csv")
    assert stats_file.exists(), proc.stderr[-3000:]
    with open(stats_file, newline="") as f:
        return {f"{row['Type']} {row['Name']}": row for row in csv.DictReader(f)}


def test_locust_headless_reports_ttft(tmp_path: Path) -> None:
    spec = load_spec(SPEC)
    with BenchCluster(spec, tmp_path / "cluster", time_scale=0.05, sidecars=False, pods_override=2) as cl:
        gw = cl.start_gateway("default")
        rows = _run_locust(gw.url, tmp_path, {})
    ttft, e2e, post = rows["TTFT chat"], rows["E2E chat"], rows["POST chat"]
    assert int(ttft["Request Count"]) > 5
    assert int(e2e["Failure Count"]) == 0 and int(post["Failure Count"]) == 0
    assert int(e2e["Request Count"]) >= int(ttft["Request Count"])
    # time to the first content byte comes before the end of the stream
    assert float(ttft["Median Response Time"]) <= float(e2e["Median Response Time"])


def test_locust_against_a_pod_with_plain_adapter_names(tmp_path: Path) -> None:
    spec = load_spec(SPEC)
    with BenchCluster(spec, tmp_path / "cluster", time_scale=0.05, sidecars=False, pods_override=1) as cl:
        rows = _run_locust(cl.pods[0].url, tmp_path, {"LORAROUTE_BENCH_MODEL_FORMAT": "{adapter}",
                                                      "LORAROUTE_BENCH_MAX_TOKENS": "4"})
    assert int(rows["TTFT chat"]["Request Count"]) > 5
    assert int(rows["E2E chat"]["Failure Count"]) == 0
