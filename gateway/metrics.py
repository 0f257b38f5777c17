"""Prometheus metrics of one gateway (``loraroute_`` names), in a registry of its own.

Series (labels in braces):

- ``loraroute_requests_total{status,base,adapter,pod}`` — finished requests; ``status`` is the HTTP
  status sent (499 when the client went away); rejected requests have ``pod=""`` and, when the
  name was not accepted, ``base=""``/``adapter=""`` (arbitrary names never become labels).
- ``loraroute_ttft_seconds{pod}`` — gateway-measured time to first token: request arrival to the
  first body chunk sent to the client (streaming requests).
- ``loraroute_adapter_ttft_seconds{base,adapter}`` — the same TTFT split by model (allowlisted
  names only, so the label set stays bounded); ``adapter=""`` for the base model.
- ``loraroute_e2e_seconds{pod}`` — request arrival to the last byte sent.
- ``loraroute_decisions_total{policy,pod}`` — routing decisions by pipeline (preset name) and chosen pod.
- ``loraroute_decision_seconds`` — time inside ``pipeline.pick``.
- ``loraroute_routed_residency_total{pod,tier}`` — for each routed request, where the chosen pod's
  own state held the adapter at pick time (``scorer.view.stored_tier``: ``gpu``, ``loading``,
  ``cpu``, ``disk``, ``remote``; ``base`` for base-model requests): the predicted residency hit rate.
- ``loraroute_adapter_routed_total{base,adapter,tier}`` — per model, where the chosen pod held the
  adapter when it was picked (the scorers' placement: ``gpu``, ``cpu``, ``incoming``, ``loading``,
  ``disk``, ``remote``; ``unscored`` for pipelines whose scorers do not look at adapters): the
  adapter cache hit rate per adapter.
- ``loraroute_audit_events_total{event,kind}`` — audit log entries (gateway/audit.py).
- ``loraroute_prefix_blocks_total{pod}`` / ``loraroute_prefix_matched_blocks_total{pod}`` — prompt
  blocks routed and blocks the prefix index predicted cached on the chosen pod.
- ``loraroute_retries_total{reason}`` — attempts moved to the next-best pod.
- ``loraroute_ensures_total{pod,outcome}`` and ``loraroute_ensure_seconds`` — sidecar ensures.
- ``loraroute_config_reloads_total{outcome}``.
- The learned cost model per pod group, collected at scrape time (``/admin/model`` has the
  evidence): ``loraroute_cost_constant{group,constant}`` (the constants of
  ``scorer.costmodel.NAMES`` in force), ``loraroute_cost_disk_seconds{group,rank}`` and
  ``loraroute_cost_observations{group}``.
- Per-pod gauges collected at scrape time: ``loraroute_pod_inflight{pod}``,
  ``loraroute_pod_adapters{pod,tier}``, ``loraroute_pod_state_age_seconds{pod}``,
  ``loraroute_pod_healthy{pod}``, ``loraroute_pods_routable``.

Label children are cached in dicts, so the hot path pays a dict lookup and an ``inc``/``observe``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from scorer.costmodel import NAMES as COST_NAMES
from scorer.decision import LazyDecision
from scorer.model import Decision, PodState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_DECISION_BUCKETS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 5e-2)
_ENSURE_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _PodCollector(Collector):
    def __init__(self, pods: Callable[[], Mapping[str, PodState]], inflight: Callable[[], Mapping[str, int]]) -> None:
        self._pods = pods
        self._inflight = inflight

    def collect(self) -> Iterable[Metric]:
        pods = self._pods()
        now = time.time()
        inflight = GaugeMetricFamily("loraroute_pod_inflight", "Requests in flight per pod, counted by this gateway", labels=["pod"])
        for pod, n in sorted(self._inflight().items()):
            inflight.add_metric([pod], n)
        adapters = GaugeMetricFamily("loraroute_pod_adapters", "Adapters per pod and tier in the gateway's view", labels=["pod", "tier"])
        age = GaugeMetricFamily("loraroute_pod_state_age_seconds", "Seconds since the pod was last observed", labels=["pod"])
        healthy = GaugeMetricFamily("loraroute_pod_healthy", "1 when the pod's state says healthy", labels=["pod"])
        for pod, s in sorted(pods.items()):
            adapters.add_metric([pod, "gpu"], len(s.gpu_adapters))
            adapters.add_metric([pod, "cpu"], len(s.cpu_adapters))
            adapters.add_metric([pod, "disk"], len(s.disk_adapters))
            adapters.add_metric([pod, "loading"], len(s.loading_adapters))
            age.add_metric([pod], max(0.0, now - s.observed_at))
            healthy.add_metric([pod], 1.0 if s.healthy else 0.0)
        routable = GaugeMetricFamily("loraroute_pods_routable", "Pods with a discovery entry and a PodState")
        routable.add_metric([], len(pods))
        return [inflight, adapters, age, healthy, routable]


class _CostCollector(Collector):
    """The learned cost model (``Pipeline.cost_model``), read at scrape time."""

    def __init__(self, model: Callable[[], Mapping[str, Any] | None]) -> None:
        self._model = model

    def collect(self) -> Iterable[Metric]:
        model = self._model()
        const = GaugeMetricFamily("loraroute_cost_constant", "Cost constant in force per pod group (learned or default)",
                                  labels=["group", "constant"])
        disk = GaugeMetricFamily("loraroute_cost_disk_seconds", "Disk-tier adapter cost in force per pod group and rank",
                                 labels=["group", "rank"])
        obs = GaugeMetricFamily("loraroute_cost_observations", "Requests the group's cost model has learned from",
                                labels=["group"])
        for group, fit in sorted(((model or {}).get("groups") or {}).items()):
            c = fit["constants"]
            for name in COST_NAMES:
                const.add_metric([group, name], float(c[name]))
            for rank, seconds in c["disk_s_by_rank"].items():
                disk.add_metric([group, str(rank)], float(seconds))
            obs.add_metric([group], float(fit["observations"]))
        return [const, disk, obs]


class GatewayMetrics:
    def __init__(
        self,
        latency_buckets: tuple[float, ...],
        pods: Callable[[], Mapping[str, PodState]],
        inflight: Callable[[], Mapping[str, int]],
        cost_model: Callable[[], Mapping[str, Any] | None] = lambda: None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter("loraroute_requests", "Finished requests", ["status", "base", "adapter", "pod"], registry=r)
        self._ttft = Histogram("loraroute_ttft_seconds", "Time to first token measured at the gateway", ["pod"], buckets=latency_buckets, registry=r)
        self._adapter_ttft = Histogram("loraroute_adapter_ttft_seconds", "Time to first token measured at the gateway, per model", ["base", "adapter"], buckets=latency_buckets, registry=r)
        self._decisions = Counter("loraroute_decisions", "Routing decisions", ["policy", "pod"], registry=r)
        self._e2e = Histogram("loraroute_e2e_seconds", "End-to-end latency measured at the gateway", ["pod"], buckets=latency_buckets, registry=r)
        self.decision = Histogram("loraroute_decision_seconds", "Time spent in pipeline.pick", buckets=_DECISION_BUCKETS, registry=r)
        self._residency = Counter("loraroute_routed_residency", "Predicted adapter residency on the chosen pod", ["pod", "tier"], registry=r)
        self._prefix_blocks = Counter("loraroute_prefix_blocks", "Prompt blocks routed", ["pod"], registry=r)
        self._prefix_matched = Counter("loraroute_prefix_matched_blocks", "Prompt blocks predicted cached on the chosen pod", ["pod"], registry=r)
        self._retries = Counter("loraroute_retries", "Attempts moved to the next-best pod", ["reason"], registry=r)
        self._ensures = Counter("loraroute_ensures", "Sidecar ensure calls", ["pod", "outcome"], registry=r)
        self.ensure_seconds = Histogram("loraroute_ensure_seconds", "Sidecar ensure duration", buckets=_ENSURE_BUCKETS, registry=r)
        self._reloads = Counter("loraroute_config_reloads", "Config reloads", ["outcome"], registry=r)
        self._adapter_routed = Counter("loraroute_adapter_routed", "Routed adapter requests by where the chosen pod held the adapter", ["base", "adapter", "tier"], registry=r)
        self._audit = Counter("loraroute_audit_events", "Audit log entries", ["event", "kind"], registry=r)
        r.register(_PodCollector(pods, inflight))
        r.register(_CostCollector(cost_model))
        self._children: dict[tuple[object, ...], object] = {}

    def _child(self, metric: Counter | Histogram, *labels: str) -> object:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*labels)
            self._children[key] = child
        return child

    def request(self, status: int, base: str, adapter: str, pod: str) -> None:
        self._child(self._requests, str(status), base, adapter, pod).inc()  # type: ignore[attr-defined]

    def ttft(self, pod: str, base: str, adapter: str, seconds: float) -> None:
        self._child(self._ttft, pod).observe(seconds)  # type: ignore[attr-defined]
        self._child(self._adapter_ttft, base, adapter).observe(seconds)  # type: ignore[attr-defined]

    def decided(self, policy: str, pod: str) -> None:
        self._child(self._decisions, policy, pod).inc()  # type: ignore[attr-defined]

    def e2e(self, pod: str, seconds: float) -> None:
        self._child(self._e2e, pod).observe(seconds)  # type: ignore[attr-defined]

    def residency(self, pod: str, tier: str) -> None:
        self._child(self._residency, pod, tier).inc()  # type: ignore[attr-defined]

    def prefix(self, pod: str, blocks: int, matched: float) -> None:
        self._child(self._prefix_blocks, pod).inc(blocks)  # type: ignore[attr-defined]
        if matched:
            self._child(self._prefix_matched, pod).inc(matched)  # type: ignore[attr-defined]

    def retry(self, reason: str) -> None:
        self._child(self._retries, reason).inc()  # type: ignore[attr-defined]

    def ensure(self, pod: str, outcome: str) -> None:
        self._child(self._ensures, pod, outcome).inc()  # type: ignore[attr-defined]

    def reload(self, outcome: str) -> None:
        self._child(self._reloads, outcome).inc()  # type: ignore[attr-defined]

    def routed(self, base: str, adapter: str, decision: Decision) -> None:
        """One routed adapter request: the requested adapter's pick-time placement on the chosen pod
        (``adapter``: its label, "" when the series carry no adapter names)."""
        if decision.pod_id is None:
            return
        placement = decision.placement(decision.pod_id) if isinstance(decision, LazyDecision) else None
        tier = placement.split("/", 1)[0] if placement else "unscored"
        self._child(self._adapter_routed, base, adapter, tier).inc()  # type: ignore[attr-defined]

    def audit(self, event: str, kind: str) -> None:
        self._child(self._audit, event, kind).inc()  # type: ignore[attr-defined]

    def render(self) -> bytes:
        return generate_latest(self.registry)
