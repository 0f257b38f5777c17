"""bench.cluster.BenchCluster leaves no process behind when its start fails half-way."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.cluster import BenchCluster
from bench.workload import load_spec
from loraroute.procs import port_open

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "bench" / "specs" / "smoke.yaml"


class BadSidecars(BenchCluster):
    """Sidecars that exit at once (an unknown flag), after the pods and Redis are up."""

    def sidecar_model_args(self) -> list[str]:
        return ["--no-such-flag"]


def test_a_start_that_fails_after_redis_and_the_pods_stops_them(tmp_path: Path) -> None:
    cluster = BadSidecars(load_spec(SPEC), tmp_path / "cluster", time_scale=1.0, sidecars=True)
    with pytest.raises(Exception):  # noqa: B017 - whatever the start raises, it must clean up
        with cluster:
            pytest.fail("the start should have failed")
    assert cluster.sim_proc is not None and cluster.redis_url is not None  # both had started
    assert not cluster.sim_proc.alive()
    redis_port = int(cluster.redis_url.rsplit(":", 1)[1].split("/")[0])
    assert not port_open(redis_port), "Redis was left running"
