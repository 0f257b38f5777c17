"""Disk-tier admissions of a run against two references computed from the same trace.

A *disk-tier admission* is a request the simulator admitted while its adapter was in neither the
pod's GPU slots nor its CPU LoRA cache (ground truth ``gt_adapter_tier == "disk"``; a request that
waited for another one's load of the same adapter counts too, as on vLLM). The references:

- **compulsory**: the first use of each adapter in the trace — a cluster that starts cold must
  read each adapter from disk once, whatever the router does;
- **cluster LRU**: the misses of one LRU cache of ``capacity = pods × max_cpu_loras`` entries fed
  the trace's adapter sequence in arrival order, starting empty. In vLLM the CPU LoRA cache also
  holds the GPU-resident adapters (``LRUCacheWorkerLoRAManager``: every adapter in a GPU slot is
  an entry of the CPU cache too), so one pod holds at most ``max_cpu_loras`` distinct adapters
  and the cluster at most ``pods × max_cpu_loras``; the GPU slots add no capacity. This is what a
  perfect partitioning of the cluster's cache entries would do without knowing the future, and
  the yardstick for a router that only reacts: each pod's cache is an LRU, so routing can at best
  make the pods act as one big LRU. It is a reference, not a proof of optimality: a policy that
  weighs frequency (or knows tomorrow's demand, as placement from persisted demand does) can go
  under it on a skewed trace.

Both references assume a cold start. A run that started warm (``--warmup``, or a warm-up from
persisted demand) can go under them; that is the point of placement.

``bound_summary(doc)`` returns the counts; ``admissions_over_time(doc)`` the cumulative curves
for the plot (simulated seconds since the first arrival). Both read only the result document:
its rows are the whole trace, with each request's scheduled time and adapter.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any


def compulsory_misses(adapters: Iterable[str]) -> list[bool]:
    """For each use: True when it is the adapter's first one."""
    seen: set[str] = set()
    out = []
    for a in adapters:
        out.append(a not in seen)
        seen.add(a)
    return out


def lru_misses(adapters: Iterable[str], capacity: int) -> list[bool]:
    """For each use: True when an LRU cache of ``capacity`` entries (starting empty) misses."""
    if capacity < 1:
        raise ValueError("capacity must be >= 1")
    cache: OrderedDict[str, None] = OrderedDict()
    out = []
    for a in adapters:
        if a in cache:
            cache.move_to_end(a)
            out.append(False)
            continue
        out.append(True)
        cache[a] = None
        if len(cache) > capacity:
            cache.popitem(last=False)
    return out


def cluster_capacity(meta: dict[str, Any]) -> int:
    """pods × max_cpu_loras (see the module docstring)."""
    cluster = meta.get("cluster") or {}
    pods = len(meta.get("pods") or ()) or int(cluster.get("pods", 1))
    return pods * int(cluster.get("max_cpu_loras", 1))


def _ordered(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The trace's requests in arrival order (rows carry their scheduled time)."""
    return sorted(doc["requests"], key=lambda r: r.get("scheduled_s") or 0.0)


def bound_summary(doc: dict[str, Any]) -> dict[str, Any]:
    """Measured disk-tier admissions (and disk loads, when recorded) next to the references."""
    meta = doc["meta"]
    rows = doc["requests"]
    capacity = cluster_capacity(meta)
    seq = [r["adapter"] for r in _ordered(doc)]
    lru = sum(lru_misses(seq, capacity))
    compulsory = sum(compulsory_misses(seq))
    with_gt = [r for r in rows if r.get("gt_adapter_tier") is not None]
    disk = sum(1 for r in with_gt if r["gt_adapter_tier"] == "disk")
    loads = meta.get("sim_disk_loads") or {}
    return {
        "requests": len(seq),
        "with_ground_truth": len(with_gt),
        "disk_admissions": disk,
        "compulsory": compulsory,
        "cluster_lru": lru,
        "capacity": capacity,
        "admissions_over_lru": (disk / lru) if lru else None,
        "disk_loads": loads.get("replay"),
        "disk_loads_before": loads.get("before"),
    }


def admissions_over_time(doc: dict[str, Any]) -> dict[str, list[float]]:
    """Cumulative counts at each arrival (simulated seconds): measured, compulsory, cluster LRU."""
    ordered = _ordered(doc)
    out: dict[str, list[float]] = {"t": [], "measured": [], "compulsory": [], "cluster_lru": []}
    if not ordered:
        return out
    scale = float(doc["meta"].get("time_scale", 1.0)) or 1.0
    capacity = cluster_capacity(doc["meta"])
    seq = [r["adapter"] for r in ordered]
    t0 = ordered[0].get("scheduled_s") or 0.0
    m = c = lru = 0
    for row, first, miss in zip(ordered, compulsory_misses(seq), lru_misses(seq, capacity)):
        m += row.get("gt_adapter_tier") == "disk"
        c += first
        lru += miss
        out["t"].append(((row.get("scheduled_s") or 0.0) - t0) / scale)
        out["measured"].append(m)
        out["compulsory"].append(c)
        out["cluster_lru"].append(lru)
    return out
