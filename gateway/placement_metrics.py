"""Prometheus series of demand and placement, collected at scrape time.

- ``loraroute_adapter_demand_rps{base,adapter}`` — the merged demand (every replica's decayed
  counts; this replica's own when placement is off), the ``top_k`` (50) most demanded adapters
  only, so the label set stays bounded; ``loraroute_demand_rps`` their total over all adapters,
  ``loraroute_demand_adapters`` how many adapters have demand. ``label(base, adapter)`` says what
  an adapter is called in the series (``metrics.adapter_labels``: a name outside the allowlist
  becomes ``other``; none at all: the series is left out).
- ``loraroute_placement_leader`` — 1 on the replica holding the leader lease.
- ``loraroute_placement_plan_adapters{role}`` — adapters per role in the plan (hot, warm, tail).
- ``loraroute_placement_missing{pod}`` — planned adapters the pod does not hold (plan vs actual).
- ``loraroute_placement_held_pods`` — pods held out of traffic while they warm up.
- ``loraroute_placement_actions_total{pod,phase,outcome}`` — loads (``phase`` warmup | preload,
  ``outcome`` loaded | failed | skipped | released).
- ``loraroute_placement_skipped_total{reason}`` — pre-loads not made, by reason (see gateway.placer).
- ``loraroute_placement_stall_seconds_total{pod,phase}`` — engine stall the placer's loads caused.
- ``loraroute_placement_budget_used_seconds{pod}`` — stall within the current budget window.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.placer import SKIP_REASONS, Placer
from scorer.demand import Demand
from scorer.placement import ROLES

TOP_K = 50


class PlacementCollector(Collector):
    def __init__(self, demand: Callable[[], Demand], placer: Callable[[], Placer | None], top_k: int = TOP_K,
                 label: Callable[[str, str], str | None] = lambda _b, a: a) -> None:
        self._demand = demand
        self._placer = placer
        self.top_k = top_k
        self._label = label

    def collect(self) -> Iterable[Metric]:
        demand = self._demand()
        rps = GaugeMetricFamily("loraroute_adapter_demand_rps", "Decayed request rate per adapter (top adapters)",
                                labels=["base", "adapter"])
        by_label: dict[tuple[str, str], float] = {}
        for a in demand.adapters[: self.top_k]:
            label = self._label(a.base, a.adapter)
            if label is not None:
                by_label[(a.base, label)] = by_label.get((a.base, label), 0.0) + a.rate_rps
        for (base, label), rate in by_label.items():
            rps.add_metric([base, label], rate)
        total = GaugeMetricFamily("loraroute_demand_rps", "Decayed request rate over every adapter")
        total.add_metric([], demand.total_rps)
        tracked = GaugeMetricFamily("loraroute_demand_adapters", "Adapters with demand")
        tracked.add_metric([], len(demand.adapters))
        out: list[Metric] = [rps, total, tracked]
        placer = self._placer()
        if placer is None:
            return out
        leader = GaugeMetricFamily("loraroute_placement_leader", "1 on the replica that leads placement")
        leader.add_metric([], 1.0 if placer.is_leader else 0.0)
        roles = GaugeMetricFamily("loraroute_placement_plan_adapters", "Adapters per role in the plan", labels=["role"])
        counts = placer.plan.role_counts() if placer.plan is not None else dict.fromkeys(ROLES, 0)
        for role in ROLES:
            roles.add_metric([role], counts[role])
        held = GaugeMetricFamily("loraroute_placement_held_pods", "Pods held out of traffic while warming up")
        held.add_metric([], len(placer.held))
        missing = GaugeMetricFamily("loraroute_placement_missing", "Planned adapters a pod does not hold", labels=["pod"])
        budget = GaugeMetricFamily("loraroute_placement_budget_used_seconds",
                                   "Placement stall within the current budget window", labels=["pod"])
        mono = time.monotonic()
        plan = placer.plan
        for pod_id, st in sorted(placer.gw.pod_states().items()):
            pp = plan.pods.get(pod_id) if plan is not None else None
            if pp is not None:
                have = set(st.gpu_adapters) | set(st.cpu_adapters)
                missing.add_metric([pod_id], sum(1 for a in (*pp.gpu, *pp.cpu) if a not in have))
            budget.add_metric([pod_id], placer.budget.used(pod_id, mono))
        actions = CounterMetricFamily("loraroute_placement_actions", "Placement actions",
                                      labels=["pod", "phase", "outcome"])
        for (pod, phase, outcome), n in sorted(placer.counts.items()):
            actions.add_metric([pod, phase, outcome], n)
        skipped = CounterMetricFamily("loraroute_placement_skipped", "Pre-loads not made, by reason", labels=["reason"])
        for reason in SKIP_REASONS:
            skipped.add_metric([reason], placer.skips.get(reason, 0))
        stall = CounterMetricFamily("loraroute_placement_stall_seconds", "Engine stall caused by placement loads",
                                    labels=["pod", "phase"])
        for (pod, phase), s in sorted(placer.stall_total.items()):
            stall.add_metric([pod, phase], s)
        return [*out, leader, roles, held, missing, budget, actions, skipped, stall]
