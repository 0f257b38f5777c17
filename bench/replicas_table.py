"""The "Several replicas" table of docs/benchmarks.md from ``bench run --replicas N`` results.

    python -m bench.replicas_table bench/results/replicas-after/reference-warm/*.json

One row per result file, sorted by sharing (on first) and replicas: client TTFT p50 / p90 / p99,
the simulator's TTFT p50 / p99 (what the pods measured: routing quality, untouched by the client's
and router's CPU), client − simulator p50, adapter GPU hit and prefix hit (ground truth), pod
imbalance, requests per replica, the replicas' CPU (sum), machine busy, the shared state's store
operations per request and the code version. Times in simulated milliseconds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v * 1000:.0f} ms"


def _ms1(v: float | None) -> str:
    return "—" if v is None else f"{v * 1000:.1f} ms"


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v * 100:.1f} %"


def row(doc: dict[str, Any]) -> tuple[tuple[int, int], str]:
    meta, s = doc["meta"], doc["summary"]
    shared = not str(meta.get("target", "")).endswith("+unshared")
    sharing = meta.get("sharing") or {}
    ops = sharing.get("ops_per_request")
    cpu = s.get("router_cpu_pct")
    cells = [
        str(meta.get("replicas", 1)), "on" if shared else "off",
        _ms(s["ttft_p50"]), _ms(s["ttft_p90"]), _ms(s["ttft_p99"]),
        _ms(s["sim_ttft_p50"]), _ms(s["sim_ttft_p99"]), _ms1(s["client_extra_p50"]),
        _pct(s["adapter_gpu_hit"]), _pct(s["prefix_hit"]),
        "—" if s["imbalance"] is None else f"{s['imbalance']:.2f}",
        " / ".join(str(n) for n in meta.get("replica_requests") or []),
        "—" if cpu is None else f"{cpu:.0f} %",
        "—" if s.get("machine_busy_pct") is None else f"{s['machine_busy_pct']:.0f} %",
        "—" if ops is None else f"{ops:.2f}",
        str(meta.get("code_version") or "—"),
    ]
    return (0 if shared else 1, int(meta.get("replicas", 1))), "| " + " | ".join(cells) + " |"


HEADER = ("| replicas | sharing | TTFT p50 | p90 | p99 | sim TTFT p50 | sim TTFT p99 | client − sim p50 | "
          "adapter GPU hit | prefix hit | imbalance | requests per replica | router CPU (sum) | "
          "machine busy | store ops / request | code |\n" + "|---" * 16 + "|")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path)
    args = p.parse_args(argv)
    rows = sorted(row(json.loads(path.read_text())) for path in args.results)
    print(HEADER)
    for _, line in rows:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
