"""The placement plan (scorer/placement.py) and the ``placement-plan`` scorer: properties on
crafted pods and demand (pure, no processes)."""

from __future__ import annotations

import numpy as np
import pytest

from scorer.demand import DemandTracker, merge_demand
from scorer.errors import ConfigError
from scorer.model import AdapterRef, PodState, RoutingRequest
from scorer.build import build_pipeline
from scorer.placement import HOT, TAIL, WARM, plan_placement, rendezvous_order, validate_plan_params
from scorer.presets import PRESETS

BASE = "llama"
NOW = 1_800_000_000.0
RANKS = (8, 16, 32, 64)


def pods(n: int, **kw: object) -> dict[str, PodState]:
    kw.setdefault("base_models", (BASE,))
    kw.setdefault("max_loras", 4)
    kw.setdefault("max_cpu_loras", 12)
    kw.setdefault("max_lora_rank", 64)
    kw.setdefault("observed_at", NOW)
    return {f"p{i}": PodState(pod_id=f"p{i}", url=f"http://p{i}", **kw) for i in range(n)}  # type: ignore[arg-type]


def zipf_demand(n_adapters: int, exponent: float = 1.0, requests: int = 4000, seed: int = 1, base: str = BASE):  # type: ignore[no-untyped-def]
    w = 1.0 / np.arange(1, n_adapters + 1) ** exponent
    rng = np.random.default_rng(seed)
    tracker = DemandTracker(half_life_s=1e9)
    for i in rng.choice(n_adapters, size=requests, p=w / w.sum()):
        tracker.observe(RoutingRequest(AdapterRef(base, f"a{i:03d}", RANKS[i % 4])), NOW)
    return merge_demand([tracker.snapshot("w", NOW)], NOW)


def ranks(n: int, base: str = BASE) -> dict[tuple[str, str], int]:
    return {(base, f"a{i:03d}"): RANKS[i % 4] for i in range(n)}


def test_slots_roles_and_replicas() -> None:
    demand = zipf_demand(64)
    cluster = pods(8)
    params = validate_plan_params({"gpu_reserve": 1, "cpu_reserve": 2})
    plan = plan_placement(demand, cluster, ranks=ranks(64), params=params)
    shares = {a.adapter: a.share for a in demand.adapters}
    assert set(shares) == {k[1] for k in plan.adapters}  # every adapter with demand has a role
    for pp in plan.pods.values():
        assert len(pp.gpu) <= 4 - 1                       # GPU slots minus the reserve
        assert len(pp.gpu) + len(pp.cpu) <= 12 - 2        # vLLM's CPU cache holds the GPU ones too
        assert len(set(pp.gpu) | set(pp.cpu)) == len(pp.gpu) + len(pp.cpu)
    hot = sorted((a for a in plan.adapters.values() if a.role == HOT), key=lambda a: -a.share)
    warm = [a for a in plan.adapters.values() if a.role == WARM]
    assert hot and warm
    # replicas in proportion to load: never fewer for a more demanded adapter
    assert all(x.share >= y.share and len(x.pods) >= len(y.pods) for x, y in zip(hot, hot[1:]))
    assert len(hot[0].pods) > 1
    # the warm middle: each on one pod's CPU cache, never one another pod caches too
    cpu_lists = [a for pp in plan.pods.values() for a in pp.cpu]
    assert len(cpu_lists) == len(set(cpu_lists)) == len(warm)
    assert not set(cpu_lists) & {a for pp in plan.pods.values() for a in pp.gpu}
    # hot adapters are the most demanded ones (warm ones are ordered by miss cost instead)
    assert {a.adapter for a in hot} == {a.adapter for a in demand.adapters[: len(hot)]}


def test_distinct_capacity_is_used_before_the_tail() -> None:
    """With more adapters than the cluster's CPU entries, hot + warm fill them and the rest is tail."""
    demand = zipf_demand(400, exponent=0.6, requests=20000)
    cluster = pods(8)
    plan = plan_placement(demand, cluster, ranks=ranks(400))
    per_pod_cap = 12 - 2
    held = sum(len(pp.gpu) + len(pp.cpu) for pp in plan.pods.values())
    assert held == 8 * per_pod_cap
    distinct = {a for pp in plan.pods.values() for a in (*pp.gpu, *pp.cpu)}
    roles = plan.role_counts()
    assert len(distinct) == roles[HOT] + roles[WARM]
    assert roles[TAIL] == len(demand.adapters) - len(distinct) > 0
    for a in plan.adapters.values():
        if a.role == TAIL:
            assert a.pods == (plan.home(BASE, a.adapter, a.rank),)


def test_rank_health_and_base_decide_eligibility() -> None:
    demand = zipf_demand(16)
    cluster = {**pods(3, max_lora_rank=32), **{k.replace("p", "big"): v.replace(pod_id=k.replace("p", "big"))
                                               for k, v in pods(2).items()}}
    cluster["sick"] = next(iter(pods(1).values())).replace(pod_id="sick", healthy=False)
    cluster["other"] = next(iter(pods(1).values())).replace(pod_id="other", base_models=("mistral",))
    plan = plan_placement(demand, cluster, ranks=ranks(16))
    assert "sick" not in plan.pods and not plan.pods["other"].gpu and not plan.pods["other"].cpu
    for a in plan.adapters.values():
        assert "sick" not in a.pods and "other" not in a.pods
        if a.rank > 32:
            assert all(p.startswith("big") for p in a.pods), a
    assert plan.home(BASE, "never-seen", 64) in ("big0", "big1")
    assert plan.home("mistral", "x") == "other"
    assert plan.home("unknown-base", "x") is None


def test_no_rank_fits_anywhere_is_unplaceable() -> None:
    demand = zipf_demand(8)
    plan = plan_placement(demand, pods(2, max_lora_rank=16), ranks=ranks(8))
    assert {k[1] for k in plan.unplaceable} == {f"a{i:03d}" for i in range(8) if RANKS[i % 4] > 16}


def test_recomputing_keeps_adapters_where_they_are() -> None:
    cluster = pods(8)
    first = plan_placement(zipf_demand(64, seed=1), cluster, ranks=ranks(64))
    again = plan_placement(zipf_demand(64, seed=1), cluster, ranks=ranks(64), previous=first)
    assert {k: a.pods for k, a in again.adapters.items()} == {k: a.pods for k, a in first.adapters.items()}
    # a demand sample drawn again (same popularity, other draws): with the previous plan far fewer
    # adapters change pods than without it
    redrawn = zipf_demand(64, seed=2)
    sticky = plan_placement(redrawn, cluster, ranks=ranks(64), previous=first)
    fresh = plan_placement(redrawn, cluster, ranks=ranks(64))

    def moved(plan) -> int:  # type: ignore[no-untyped-def]
        return sum(1 for k, a in plan.adapters.items() if k in first.adapters and
                   not set(a.pods) & set(first.adapters[k].pods))

    assert moved(sticky) <= moved(fresh)
    assert moved(sticky) <= 8


def test_rendezvous_moves_only_what_a_leaving_pod_held() -> None:
    names = [f"t{i}" for i in range(500)]
    all_pods = [(f"p{i}", 1.0) for i in range(8)]
    before = {n: rendezvous_order(BASE, n, all_pods)[0] for n in names}
    after = {n: rendezvous_order(BASE, n, all_pods[:-1])[0] for n in names}
    for n in names:
        if before[n] != "p7":
            assert after[n] == before[n]
    counts = np.bincount([int(before[n][1:]) for n in names], minlength=8)
    assert counts.min() > 0.5 * 500 / 8  # spread over every pod


def test_load_stays_within_the_bound_when_it_can() -> None:
    demand = zipf_demand(64)
    params = validate_plan_params({"load_slack": 1.25})
    plan = plan_placement(demand, pods(8), ranks=ranks(64), params=params)
    fair = 1.0 / 8
    planned = sum(pp.load for pp in plan.pods.values())
    hot_warm = sum(a.share for a in plan.adapters.values() if a.role != TAIL)
    assert planned == pytest.approx(hot_warm)
    for pp in plan.pods.values():
        assert pp.load <= 1.25 * fair + 1e-9


def test_plan_params_are_strict() -> None:
    with pytest.raises(ConfigError, match="gpu_reservee"):
        validate_plan_params({"gpu_reservee": 1})
    with pytest.raises(ConfigError, match="replica_load"):
        validate_plan_params({"replica_load": 0})


# --- the scorer ----------------------------------------------------------------------------------------
def _pipeline(weight: float = 0.5):  # type: ignore[no-untyped-def]
    scorers = [*PRESETS["default"]["scorers"], {"type": "placement-plan", "weight": weight}]
    return build_pipeline({"preset": "default", "scorers": scorers})


def test_scorer_follows_the_plan_and_abstains_without_one() -> None:
    cluster = pods(4)
    demand = zipf_demand(24)
    plan = plan_placement(demand, cluster, ranks=ranks(24))
    pl = _pipeline()
    warm = next(a for a in plan.adapters.values() if a.role == WARM)
    r = RoutingRequest(AdapterRef(BASE, warm.adapter, warm.rank), prompt_tokens=200)
    assert all(c.scores["placement-plan"] == 0.0 for c in pl.pick(r, cluster, NOW).ranked)  # no plan yet
    pl.set_plan(plan)
    d = pl.pick(r, cluster, NOW)
    assert d.pod_id == warm.pods[0]
    assert {c.pod_id: c.scores["placement-plan"] for c in d.ranked} == {
        p: (1.0 if p == warm.pods[0] else 0.0) for p in cluster}
    # an adapter the plan never saw goes to its rendezvous home
    unknown = RoutingRequest(AdapterRef(BASE, "brand-new", 8), prompt_tokens=200)
    assert pl.pick(unknown, cluster, NOW).pod_id == plan.home(BASE, "brand-new", 8)
    # a base-model request: no opinion
    base_req = RoutingRequest(AdapterRef(BASE, None), prompt_tokens=200)
    assert all(c.scores["placement-plan"] == 0.0 for c in pl.pick(base_req, cluster, NOW).ranked)


def test_scorer_is_a_signal_not_a_rule() -> None:
    """A pod holding the adapter on GPU beats the planned pod that would have to load it."""
    cluster = pods(4)
    plan = plan_placement(zipf_demand(24), cluster, ranks=ranks(24))
    pl = _pipeline()
    pl.set_plan(plan)
    warm = next(a for a in plan.adapters.values() if a.role == WARM and a.rank == 64)
    elsewhere = next(p for p in cluster if p not in warm.pods)
    cluster[elsewhere] = cluster[elsewhere].replace(gpu_adapters=(warm.adapter,))
    r = RoutingRequest(AdapterRef(BASE, warm.adapter, warm.rank), prompt_tokens=200)
    assert pl.pick(r, cluster, NOW).pod_id == elsewhere


def test_a_placement_load_joins_the_pods_queue() -> None:
    """A stall the placer starts is priced like one the router triggers: requests go around it."""
    cluster = pods(2)
    pl = _pipeline()
    r = RoutingRequest(AdapterRef(BASE, None), prompt_tokens=200)
    before = {c.pod_id: c.scores["estimated-ttft"] for c in pl.pick(r, cluster, NOW).ranked}
    assert before["p0"] == before["p1"]
    pl.note_stall("p0", 1.0, NOW)
    d = pl.pick(r, cluster, NOW)
    assert d.pod_id == "p1"
    after = {c.pod_id: c.scores["estimated-ttft"] for c in d.ranked}
    k = 0.5  # scale_s: the score reads back as seconds, t = k / score - k
    assert (k / after["p0"] - k) - (k / after["p1"] - k) == pytest.approx(1.0, rel=1e-6)
    assert pl.pick(r, cluster, NOW + 1.5).ranked[0].scores["estimated-ttft"] == pytest.approx(before["p0"])


def test_stall_estimate_is_the_recent_maximum_per_rank_never_below_the_configured_cost() -> None:
    from gateway.placer import StallEstimates

    est = StallEstimates(keep=3)
    assert est.estimate(16, 0.2) == 0.2                      # nothing seen: the configured cost
    for s in (0.25, 0.4, 0.3):
        est.observe(16, s)
    est.observe(64, 0.0)                                     # a load that stalled nothing teaches nothing
    assert est.estimate(16, 0.2) == 0.4 and est.estimate(64, 0.5) == 0.5
    est.observe(16, 0.3)                                     # 0.25 falls out of the last three ...
    assert est.estimate(16, 0.2) == 0.4
    for s in (0.3, 0.3):                                     # ... and then the 0.4 too
        est.observe(16, s)
    assert est.estimate(16, 0.2) == 0.3 and est.estimate(16, 0.35) == 0.35
