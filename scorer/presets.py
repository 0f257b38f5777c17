"""Named pipeline configurations: ours (``default``) and the baselines the benchmarks compare.

Each preset is plain data in the same shape as the YAML ``pipeline:`` section, so
``build_pipeline({"preset": "llm-d", "weights": {"prefix-cache": 5}})`` can start from one and
override parts of it.

- ``default`` — ours. Filters healthy-fresh, serves-base, rank-fits, lora-ready; scorers
  estimated-ttft 3 (queue ahead + adapter load by tier and rank + uncached prefill, in seconds),
  adapter-residency 1 (tiers incl. the CPU cache and optimistic incoming adapters),
  prefix-cache 1, inflight 2 (capacity 64: bounded stickiness), kv-usage 1,
  session-affinity 1, recovery 3 (a pod just back, while its load is at most the mean, for up
  to 20 s: it outweighs a missing adapter and prefix, not a queue); picker max-score.
- ``llm-d`` — llm-d's published default: prefix-cache 3, queue 2, kv-usage 2 ("322") plus
  lora-affinity 1; picker max-score.
- ``round-robin`` — cycle through the healthy pods serving the base.
- ``random`` — a uniformly random healthy pod serving the base.
- ``least-loaded`` — fewest requests in flight from this router (min-max, ties at random).

Every preset keeps the four safety filters (healthy-fresh, serves-base, rank-fits, lora-ready):
sending a request to a dead pod, a pod without the base, one that rejects the adapter's rank or
an engine still compiling its LoRA kernels only produces errors or stalls, which would not make
a fair baseline either.
"""

from __future__ import annotations

from typing import Any

SAFETY_FILTERS: list[Any] = ["healthy-fresh", "serves-base", "rank-fits", "lora-ready"]

PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "filters": SAFETY_FILTERS,
        "scorers": [
            {"type": "estimated-ttft", "weight": 3.0},
            {"type": "adapter-residency", "weight": 1.0},
            {"type": "prefix-cache", "weight": 1.0},
            {"type": "inflight", "weight": 2.0, "parameters": {"metric": "requests", "capacity": 64.0}},
            {"type": "kv-usage", "weight": 1.0},
            {"type": "session-affinity", "weight": 1.0},
            {"type": "recovery", "weight": 3.0},
        ],
        "picker": {"type": "max-score"},
    },
    "llm-d": {
        "filters": SAFETY_FILTERS,
        "scorers": [
            {"type": "prefix-cache", "weight": 3.0},
            {"type": "queue", "weight": 2.0},
            {"type": "kv-usage", "weight": 2.0},
            {"type": "lora-affinity", "weight": 1.0},
        ],
        "picker": {"type": "max-score"},
    },
    "round-robin": {"filters": SAFETY_FILTERS, "scorers": [], "picker": {"type": "round-robin"}},
    "random": {"filters": SAFETY_FILTERS, "scorers": [], "picker": {"type": "random"}},
    "least-loaded": {
        "filters": SAFETY_FILTERS,
        "scorers": [{"type": "inflight", "weight": 1.0, "parameters": {"normalize": "minmax"}}],
        "picker": {"type": "max-score"},
    },
}
