"""The sidecar's own Prometheus series (``loraroute_sidecar_*``), in a registry per instance.

- ``loraroute_sidecar_fetch_seconds{source}`` histogram: download + validation of a cold adapter
- ``loraroute_sidecar_load_seconds`` histogram: ``/v1/load_lora_adapter`` round trips
- ``loraroute_sidecar_ensure_total{outcome}`` counter: cached | downloaded | failed
- ``loraroute_sidecar_failures_total{reason}`` counter: the error ``code`` (invalid_adapter_name,
  adapter_not_found, rank_too_large, tls_certificate, s3_connect, vllm_load_failed, ...)
- ``loraroute_sidecar_fetched_bytes_total`` counter, ``loraroute_sidecar_evictions_total`` counter
- gauges read at scrape time: ``loraroute_sidecar_disk_bytes``, ``_disk_budget_bytes``,
  ``_disk_adapters``, ``_estimated_adapters{tier="gpu"|"cpu"}``, ``_residency_exact`` (1 when
  vLLM exposes residency), ``_vllm_healthy``, ``_scrapes_total``, ``_scrape_failures_total``,
  ``_adapter_resident{adapter,tier}`` (one series per adapter estimated on GPU or in CPU);
  with ``kv_events``: ``_kv_blocks`` (blocks the pod holds, from its events), counters
  ``_kv_batches_total`` (event batches applied) and ``_kv_resets_total`` (restarts and
  unrecoverable gaps that reset the pod's block set).
- the cluster's demand (``vllm_sidecar.demand``): ``_demand_adapters`` (adapters of the pod's
  bases with demand; 0: eviction is least recently used), ``_demand_age_seconds`` (since the
  last read that found demand; absent without one), counters ``_demand_evictions_total``
  (evictions ordered by demand) and ``_prefetches_total{outcome}`` (downloaded | failed |
  no_room: a pass stopped at an adapter that fits only by evicting more demanded ones, counted
  once until a prefetch succeeds or it stops at another).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _StateCollector:
    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        s = self._snapshot()
        for name, help_, value in (
            ("loraroute_sidecar_disk_bytes", "Bytes of adapters in the local adapter folder", s["disk_bytes"]),
            ("loraroute_sidecar_disk_budget_bytes", "Disk budget for adapters", s["disk_budget_bytes"]),
            ("loraroute_sidecar_disk_adapters", "Adapters in the local adapter folder", s["disk_adapters"]),
            ("loraroute_sidecar_residency_exact", "1 when vLLM exposes residency, 0 when estimated",
             s["residency_exact"]),
            ("loraroute_sidecar_vllm_healthy", "1 when the last scrape of vLLM succeeded", s["vllm_healthy"]),
            ("loraroute_sidecar_kv_blocks", "KV blocks the pod holds, from its KV-cache events", s["kv_blocks"]),
            ("loraroute_sidecar_demand_adapters", "Adapters of the pod's bases with cluster demand",
             s["demand_adapters"]),
        ):
            g = GaugeMetricFamily(name, help_)
            g.add_metric([], float(value))
            yield g
        if s["demand_age_s"] is not None:
            age = GaugeMetricFamily("loraroute_sidecar_demand_age_seconds",
                                    "Seconds since the sidecar last read the cluster's demand")
            age.add_metric([], float(s["demand_age_s"]))
            yield age
        prefetches = CounterMetricFamily("loraroute_sidecar_prefetches",
                                         "Adapters fetched to disk ahead of use for their demand, by outcome",
                                         labels=["outcome"])
        for outcome in ("downloaded", "failed", "no_room"):
            prefetches.add_metric([outcome], float(s["prefetches"].get(outcome, 0)))
        yield prefetches
        tiers = GaugeMetricFamily("loraroute_sidecar_estimated_adapters", "Adapters estimated per tier",
                                  labels=["tier"])
        tiers.add_metric(["gpu"], float(len(s["gpu"])))
        tiers.add_metric(["cpu"], float(len(s["cpu"])))
        yield tiers
        resident = GaugeMetricFamily("loraroute_sidecar_adapter_resident",
                                     "1 per adapter estimated on GPU or in CPU", labels=["adapter", "tier"])
        for tier in ("gpu", "cpu"):
            for name in s[tier]:
                resident.add_metric([name, tier], 1.0)
        yield resident
        for name, help_, value in (
            ("loraroute_sidecar_scrapes", "Scrapes of vLLM /metrics and /v1/models", s["scrapes"]),
            ("loraroute_sidecar_scrape_failures", "Failed scrapes of vLLM", s["scrape_failures"]),
            ("loraroute_sidecar_evictions", "Adapters removed from local disk for the budget", s["evictions"]),
            ("loraroute_sidecar_demand_evictions", "Evictions ordered by the cluster's demand",
             s["demand_evictions"]),
            ("loraroute_sidecar_kv_batches", "KV-cache event batches applied", s["kv_batches"]),
            ("loraroute_sidecar_kv_resets", "Restarts and lost event history that reset the pod's KV blocks",
             s["kv_resets"]),
        ):
            c = CounterMetricFamily(name, help_)
            c.add_metric([], float(value))
            yield c


class SidecarMetrics:
    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.fetch_seconds = Histogram("loraroute_sidecar_fetch_seconds", "Download and validation of a cold "
                                       "adapter", ["source"], buckets=_SECONDS, registry=r)
        self.load_seconds = Histogram("loraroute_sidecar_load_seconds", "vLLM /v1/load_lora_adapter round trip",
                                      buckets=_SECONDS, registry=r)
        self.ensure_total = Counter("loraroute_sidecar_ensure", "Ensure calls by outcome", ["outcome"], registry=r)
        self.failures_total = Counter("loraroute_sidecar_failures", "Failures by reason", ["reason"], registry=r)
        self.fetched_bytes = Counter("loraroute_sidecar_fetched_bytes", "Bytes downloaded from the adapter source",
                                     registry=r)
        r.register(_StateCollector(snapshot))  # type: ignore[arg-type]
