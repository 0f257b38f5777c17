"""Chaos under load, all real processes (``bench.reliability.Stack``: a Redis, three simulated
pods with a sidecar each, a gateway): a pod killed and started again, one frozen with SIGSTOP and
thawed, Redis stopped and started again — while closed-loop clients stream and fetch. Counted
from the clients' side: no request fails before its first byte, every stream that breaks ends
with the error event and [DONE], every request gets its first byte in time, nothing fails while
Redis is away, and the pod that came back receives traffic within seconds."""

from __future__ import annotations

import time
from pathlib import Path

from bench.reliability import Load, Stack, summarize


def test_pods_killed_and_frozen_and_redis_restarted_under_load(tmp_path: Path) -> None:
    stack = Stack(tmp_path, pods=3, config={"server": {"timeouts": {"idle_unhealthy_s": 1.0}}}).start()
    try:
        load = Load(stack.url, clients=3).start()
        t0 = time.monotonic()

        def at(t: float) -> None:
            time.sleep(max(0.0, t0 + t - time.monotonic()))

        at(2.0)
        stack.kill_pod(0)
        at(3.0)
        stack.freeze_pod(1)
        at(4.0)
        stack.restart_pod(0)
        back = time.monotonic()
        at(7.0)
        stack.thaw_pod(1)
        at(9.0)
        down = time.monotonic()
        stack.stop_redis()
        at(14.0)
        up = time.monotonic()
        stack.start_redis()
        at(17.0)
        outcomes = load.stop()
        total = summarize(outcomes)
        assert total["requests"] > 60, total
        assert total["failed"] == 0 and total["broken_dirty"] == 0 and total["no_answer"] == 0, total
        assert max(o.ttfb_s or 0.0 for o in outcomes) < 10.0
        during = summarize(outcomes, down, up)
        assert during["requests"] > 10 and during["ok"] == during["requests"], during
        # the restarted pod takes requests again within a few seconds of being healthy
        served = [o.started - back for o in outcomes if o.pod == "pod-0" and o.started > back]
        assert served and min(served) < 6.0, served[:5]
        log = stack.gateway.log_tail(10 ** 6)  # type: ignore[union-attr]
        assert "state store unreachable" in log and "state store reachable again" in log
        assert "Traceback" not in log
    finally:
        stack.close()
