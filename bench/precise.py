"""``loraroute bench run … --precise-prefix``: the preset with precise prefix routing.

The pods publish KV events (``--kv-events-config``, ``BenchCluster.kv_events``); with sidecars
each relays its pod's block set through Redis, without them (``--no-sidecars``, ``memory://``)
the gateway follows each pod's sockets itself (``gateway.kv_feed``). The base's tokenizer is the
simulator's (``tokenizer.mode: sim``), so the gateway hashes exactly the blocks a pod computes.

The preset's ``prefix-cache`` scorer is **replaced** by ``precise-prefix`` at the same weight,
not joined by it: ``precise-prefix`` already falls back to the approximate index for a pod whose
events are not live, and keeping both would count the prefix twice — a different balance
against the preset's load and adapter scorers, so the comparison would no longer isolate which
index is right. (``estimated-ttft``'s uncached-prefill term follows: it reads the precise match
for a pod whose events are live, ``scorer.kv_match``.)
A preset without ``prefix-cache`` (round-robin, random, least-loaded) has nothing to replace and
is refused.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from scorer.presets import PRESETS


def pipeline(preset: str, adapter_dir: Path) -> dict[str, Any]:
    """The preset's pipeline with ``precise-prefix`` in place of ``prefix-cache`` (same weight);
    ``lora_path`` is the folder the simulated pods load adapters from."""
    spec = copy.deepcopy(PRESETS[preset])
    scorers = spec["scorers"]
    at = [i for i, s in enumerate(scorers) if s["type"] == "prefix-cache"]
    if not at:
        raise ValueError(f"--precise-prefix replaces prefix-cache, which preset {preset!r} does not have")
    for i in at:
        scorers[i] = {"type": "precise-prefix", "weight": scorers[i].get("weight", 1.0),
                      "parameters": {"lora_path": f"{adapter_dir}/{{name}}"}}
    return {"name": f"{preset}+precise", **spec}


#: the gateway series a precise run records per replica, summed (``gateway.kv_feed``, ``gateway.tokens``)
FEED_SERIES = {
    "loraroute_kv_feed_deltas_total": "deltas", "loraroute_kv_feed_snapshots_total": "snapshots",
    "loraroute_kv_feed_gaps_total": "gaps", "loraroute_kv_events_batches_total": "batches",
    "loraroute_kv_events_unrecoverable_total": "unrecoverable",
    "loraroute_kv_feed_delay_seconds_count": "delay_count", "loraroute_kv_feed_delay_seconds_sum": "delay_sum_s",
    "loraroute_tokenize_seconds_count": "tokenized", "loraroute_tokenize_seconds_sum": "tokenize_sum_s",
}


def feed_meta(urls: list[str]) -> dict[str, Any]:
    """The KV feed's and the tokenizer's counters over every replica, from their /metrics, with
    the mean pod → index delay and the mean tokenizing time per request; ``deltas_by_replica``:
    each replica's own delta count (None: its /metrics could not be read)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, Any] = {}
    by_replica: list[float | None] = []
    for url in urls:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=5) as resp:  # noqa: S310 - loopback
                text = resp.read().decode()
        except OSError:
            by_replica.append(None)
            continue
        mine = 0.0
        for fam in text_string_to_metric_families(text):
            for sample in fam.samples:
                key = FEED_SERIES.get(sample.name)
                if key is not None:
                    out[key] = out.get(key, 0.0) + float(sample.value)
                    if key == "deltas":
                        mine += float(sample.value)
        by_replica.append(mine)
    out["deltas_by_replica"] = by_replica
    if out.get("delay_count"):
        out["delay_mean_ms"] = round(1000.0 * out["delay_sum_s"] / out["delay_count"], 3)
    if out.get("tokenized"):
        out["tokenize_mean_us"] = round(1e6 * out["tokenize_sum_s"] / out["tokenized"], 1)
    return out
