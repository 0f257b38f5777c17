"""The benchmark's references for disk-tier admissions (bench/bounds.py), checked against
independent computations of the same quantities."""

from __future__ import annotations

import numpy as np
import pytest

from bench.bounds import admissions_over_time, bound_summary, compulsory_misses, lru_misses


def brute_lru(seq: list[str], capacity: int) -> int:
    """LRU misses with a plain list, most recent last (a second, independent implementation)."""
    cache: list[str] = []
    misses = 0
    for a in seq:
        if a in cache:
            cache.remove(a)
        else:
            misses += 1
            if len(cache) == capacity:
                cache.pop(0)
        cache.append(a)
    return misses


@pytest.mark.parametrize("capacity", [1, 3, 7, 20])
def test_lru_matches_a_brute_force_cache(capacity: int) -> None:
    rng = np.random.default_rng(capacity)
    w = 1.0 / np.arange(1, 31) ** 0.8
    seq = [f"a{i}" for i in rng.choice(30, size=600, p=w / w.sum())]
    misses = lru_misses(seq, capacity)
    assert sum(misses) == brute_lru(seq, capacity)
    assert sum(misses) >= sum(compulsory_misses(seq)) == len(set(seq))
    if capacity == 1:  # one entry: every change of adapter misses
        assert sum(misses) == 1 + sum(1 for x, y in zip(seq, seq[1:]) if x != y)


def test_enough_capacity_leaves_only_first_uses() -> None:
    seq = ["a", "b", "a", "c", "b", "a", "d"]
    assert lru_misses(seq, 4) == compulsory_misses(seq) == [True, True, False, True, False, False, True]
    with pytest.raises(ValueError):
        lru_misses(seq, 0)


def test_summary_and_curve_from_a_result_document() -> None:
    rng = np.random.default_rng(3)
    rows = []
    for i, a in enumerate(rng.choice(12, size=200)):
        tier = "disk" if rng.random() < 0.2 else "gpu"
        rows.append({"id": f"r{i}", "adapter": f"ad{a}", "scheduled_s": 0.5 * i, "gt_adapter_tier": tier})
    rng.shuffle(rows)  # the document's order must not matter: arrival order is scheduled_s
    doc = {"meta": {"pods": ["p0", "p1"], "cluster": {"max_cpu_loras": 3}, "time_scale": 0.5,
                    "sim_disk_loads": {"before": 4, "replay": 31}},
           "requests": rows}
    ordered = [r["adapter"] for r in sorted(rows, key=lambda r: r["scheduled_s"])]
    b = bound_summary(doc)
    assert b["capacity"] == 6
    assert b["cluster_lru"] == brute_lru(ordered, 6)
    assert b["compulsory"] == len(set(ordered))
    assert b["disk_admissions"] == sum(r["gt_adapter_tier"] == "disk" for r in rows)
    assert b["disk_loads"] == 31 and b["disk_loads_before"] == 4
    curve = admissions_over_time(doc)
    assert curve["measured"][-1] == b["disk_admissions"]
    assert curve["cluster_lru"][-1] == b["cluster_lru"] and curve["compulsory"][-1] == b["compulsory"]
    assert curve["t"][0] == 0.0 and curve["t"][-1] == pytest.approx(0.5 * 199 / 0.5)
    assert all(x <= y for x, y in zip(curve["measured"], curve["measured"][1:]))
