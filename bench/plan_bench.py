"""Micro-benchmark of the placement plan and the demand estimate: what the placer and the request
path pay for them.

Per spec (default: the reference and the long-tail workload): yesterday's demand
(``bench.placement.yesterday_snapshot``), the spec's cluster as healthy PodStates, then:

  plan, first       ``plan_placement`` without a previous plan (every rendezvous order computed)
  plan, recomputed  ``plan_placement`` with the previous plan over the same pods (what the placer
                    runs every ``demand.publish_s`` on the gateway's event loop)
  merge             ``merge_demand`` of the snapshot (every publish)
  observe           ``DemandTracker.observe`` of one dispatched request (``Pipeline.on_dispatch``;
                    on the request path)

Milliseconds (µs for observe) per call, median / p99 over ``--n`` calls, GC paused while timing,
with the process's CPU seconds over the whole run and a machine reference (as in
``bench.pick_bench``: numbers from a busy machine scale by its ratio to an idle core's).

Usage:  python -m bench.plan_bench [--specs bench/specs/reference.yaml bench/specs/longtail.yaml] [--n 50]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path

from bench.placement import spec_inputs, yesterday_snapshot
from bench.workload import load_spec
from scorer.demand import DemandTracker, merge_demand
from scorer.model import AdapterRef, RoutingRequest
from scorer.placement import plan_placement

SPECS = ("bench/specs/reference.yaml", "bench/specs/longtail.yaml")


def timed(fn: Callable[[int], object], n: int) -> tuple[float, float]:
    """(median, p99) seconds of ``fn(i)`` over ``n`` calls."""
    out = []
    gc.disable()
    try:
        for i in range(n):
            t0 = time.perf_counter()
            fn(i)
            out.append(time.perf_counter() - t0)
    finally:
        gc.enable()
    out.sort()
    return statistics.median(out), out[min(len(out) - 1, int(0.99 * len(out)))]


def bench(spec_path: str, n: int) -> dict[str, tuple[float, float]]:
    spec = load_spec(spec_path)
    now = time.time()
    demand, pods, ranks = spec_inputs(spec, now)
    snap = yesterday_snapshot(spec, now)
    res = {"adapters": (float(len(demand.adapters)), 0.0)}
    res["plan, first"] = timed(lambda i: plan_placement(demand, pods, ranks=ranks, now=now), max(5, n // 5))
    prev = plan_placement(demand, pods, ranks=ranks, now=now)
    res["plan, recomputed"] = timed(lambda i: plan_placement(demand, pods, ranks=ranks, previous=prev, now=now), n)
    res["merge"] = timed(lambda i: merge_demand([snap], now), n)
    tracker = DemandTracker()
    reqs = [RoutingRequest(AdapterRef(spec.cluster.base_model, name, rank)) for name, rank in spec.adapters.all()]
    m = len(reqs)
    res["observe"] = timed(lambda i: tracker.observe(reqs[i % m], now + i * 0.001), 100 * n)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", nargs="+", default=list(SPECS))
    ap.add_argument("--n", type=int, default=50, help="timed calls per cell (observe: 100x)")
    args = ap.parse_args(argv)
    ref = min(timeit.repeat("[x * 2.0 + 1.0 for x in xs]", "xs = list(range(16))", number=20000, repeat=5))
    print(f"python {sys.version.split()[0]}; median / p99")
    print(f"machine reference: a 16-element list comprehension takes {ref / 20000 * 1e6:.2f} µs here "
          "(typically 0.4-0.6 µs on an idle core; scale the table by the ratio)")
    head = (f"{'spec':<10} {'adapters':>8}  {'plan, first (ms)':>18}  {'plan, recomputed (ms)':>22}  "
            f"{'merge (ms)':>16}  {'observe (µs)':>14}")
    print(head)
    print("-" * len(head))
    cpu0 = time.process_time()
    wall0 = time.perf_counter()
    for path in args.specs:
        r = bench(path, args.n)
        ms = "  ".join(f"{1e3 * r[k][0]:>8.2f} /{1e3 * r[k][1]:>8.2f}".rjust(w)
                       for k, w in (("plan, first", 18), ("plan, recomputed", 22), ("merge", 16)))
        obs = f"{1e6 * r['observe'][0]:>6.2f} /{1e6 * r['observe'][1]:>6.2f}"
        print(f"{Path(path).stem:<10} {int(r['adapters'][0]):>8}  {ms}  {obs:>14}", flush=True)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    print(f"CPU: {cpu:.1f} s over {wall:.1f} s wall ({100 * cpu / wall:.0f} % of one core)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
