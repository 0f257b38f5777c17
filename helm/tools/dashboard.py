"""Generate helm/loraroute/dashboards/loraroute.json (run: python helm/tools/dashboard.py).

Every query names only series the gateway, the sidecars and vLLM export; tests/test_helm_dashboard.py
checks that against live scrapes, and tests/test_helm.py that the committed file equals this
script's output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

NS = 'namespace=~"$namespace"'  # every query is limited to the namespaces picked in the dashboard
R = "$__rate_interval"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


class Layout:
    """Places panels left to right on Grafana's 24-column grid, rows top to bottom."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = 0
        self.y = 0
        self.next_id = 1

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        self.end_row()
        self.panels.append({"type": "row", "title": title, "id": self._id(), "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def end_row(self, h: int = 8) -> None:
        if self.x:
            self.x = 0
            self.y += h

    def panel(self, title: str, targets: list[tuple[str, str]], unit: str = "short", kind: str = "timeseries",
              w: int = 12, h: int = 8, desc: str = "", stack: bool = False, max_: float | None = None) -> None:
        """``targets`` are (PromQL, legend) pairs."""
        if self.x + w > 24:
            self.end_row(h)
        defaults: dict[str, Any] = {"unit": unit}
        if max_ is not None:
            defaults.update({"max": max_, "min": 0})
        if stack:
            defaults["custom"] = {"stacking": {"mode": "normal"}, "fillOpacity": 30}
        options: dict[str, Any] = (
            {"legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull", "max"]}}
            if kind == "timeseries" else {"reduceOptions": {"calcs": ["lastNotNull"]}}
        )
        self.panels.append({
            "type": kind, "title": title, "id": self._id(), "description": desc, "datasource": DATASOURCE,
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": defaults, "overrides": []}, "options": options,
            "targets": [{"refId": chr(65 + i), "expr": e, "legendFormat": legend, "datasource": DATASOURCE}
                        for i, (e, legend) in enumerate(targets)],
        })
        self.x += w
        if self.x >= 24:
            self.end_row(h)


def q(metric: str, quantile: float, by: str) -> str:
    """``histogram_quantile`` of a histogram's rate, grouped by ``by``."""
    return f'histogram_quantile({quantile}, sum by (le, {by}) (rate({metric}_bucket{{{NS}}}[{R}])))'


L = Layout()
row, panel, endrow = L.row, L.panel, L.end_row

row("Overview")
panel("Routable pods", [(f'sum(loraroute_pods_routable{{{NS}}}) / count(loraroute_pods_routable{{{NS}}})', "pods (avg over gateways)")], kind="stat", w=4, h=4,
      desc="Pods with a Kubernetes endpoint AND a fresh PodState from their sidecar (both are needed for traffic).")
panel("Requests/s", [(f'sum(rate(loraroute_requests_total{{{NS}}}[{R}]))', "req/s")], unit="reqps", kind="stat", w=4, h=4)
panel("Error ratio (5xx)", [(f'sum(rate(loraroute_requests_total{{{NS},status=~"5.."}}[{R}])) / sum(rate(loraroute_requests_total{{{NS}}}[{R}]))', "5xx")], unit="percentunit", kind="stat", w=4, h=4)
panel("Adapter GPU hit rate (routed)", [(f'sum(rate(loraroute_routed_residency_total{{{NS},tier="gpu"}}[{R}])) / sum(rate(loraroute_routed_residency_total{{{NS},tier!="base"}}[{R}]))', "on GPU")],
      unit="percentunit", kind="stat", w=4, h=4, desc="Share of adapter requests routed to a pod that held the adapter on GPU, per the gateway's view.")
panel("TTFT p95 (gateway)", [(q("loraroute_ttft_seconds", 0.95, "namespace"), "p95")], unit="s", kind="stat", w=4, h=4)
panel("Retries/s", [(f'sum(rate(loraroute_retries_total{{{NS}}}[{R}]))', "retries/s")], kind="stat", w=4, h=4)
endrow(4)

row("Latency")
panel("TTFT p50 / p95 / p99 (gateway, all requests)", [(q("loraroute_ttft_seconds", 0.5, "namespace"), "p50"),
      (q("loraroute_ttft_seconds", 0.95, "namespace"), "p95"), (q("loraroute_ttft_seconds", 0.99, "namespace"), "p99")], unit="s",
      desc="Time to first token measured at the gateway (request arrival to first byte to the client).")
panel("TTFT per pod, p50 / p95 / p99 (gateway)", [(q("loraroute_ttft_seconds", 0.5, "pod"), "p50 {{pod}}"),
      (q("loraroute_ttft_seconds", 0.95, "pod"), "p95 {{pod}}"), (q("loraroute_ttft_seconds", 0.99, "pod"), "p99 {{pod}}")], unit="s")
panel("End-to-end latency p95 per pod (gateway)", [(q("loraroute_e2e_seconds", 0.95, "pod"), "{{pod}}")], unit="s")
panel("TTFT p95 per pod (vLLM's own)", [(q("vllm:time_to_first_token_seconds", 0.95, "pod"), "{{pod}}")], unit="s",
      desc="vLLM's histogram, scraped by the PodMonitor; compare with the gateway's to see network and queueing outside vLLM.")
panel("Routing decision time (pick)", [(q("loraroute_decision_seconds", 0.5, "namespace"), "p50"), (q("loraroute_decision_seconds", 0.99, "namespace"), "p99")], unit="s")
panel("vLLM queue time p95 per pod", [(q("vllm:request_queue_time_seconds", 0.95, "pod"), "{{pod}}")], unit="s")
endrow()

row("Adapters (the live dashboard's per-adapter panel, over time)")
panel("TTFT p50 / p99 per adapter (gateway)", [(q("loraroute_adapter_ttft_seconds", 0.5, "base, adapter"), "p50 {{base}}:{{adapter}}"),
      (q("loraroute_adapter_ttft_seconds", 0.99, "base, adapter"), "p99 {{base}}:{{adapter}}")], unit="s",
      desc="Gateway-measured TTFT of streamed requests, split by model (allowlisted names only); an empty adapter is the base model.")
panel("Adapter cache hit rate per adapter", [
      (f'sum by (base, adapter) (rate(loraroute_adapter_routed_total{{{NS},tier="gpu"}}[{R}])) / sum by (base, adapter) (rate(loraroute_adapter_routed_total{{{NS}}}[{R}]))', "GPU {{base}}:{{adapter}}"),
      (f'sum by (base, adapter) (rate(loraroute_adapter_routed_total{{{NS},tier=~"gpu|cpu"}}[{R}])) / sum by (base, adapter) (rate(loraroute_adapter_routed_total{{{NS}}}[{R}]))', "GPU+CPU {{base}}:{{adapter}}")],
      unit="percentunit", max_=1,
      desc="Share of each adapter's requests routed to a pod that held it on GPU (or in CPU memory) when it was picked; the rest needed a load from disk or a fetch.")
panel("Routed requests per adapter by tier", [(f'sum by (adapter, tier) (rate(loraroute_adapter_routed_total{{{NS}}}[{R}]))', "{{adapter}} {{tier}}")], unit="reqps", stack=True,
      desc="gpu / cpu / incoming / loading / disk / remote (not on the pod at all) per adapter.")
panel("Audit log events (run-time changes)", [(f'sum by (event, kind) (increase(loraroute_audit_events_total{{{NS}}}[{R}]))', "{{event}} {{kind}}")],
      desc="Proposals, approvals, rejections, applied and failed run-time changes (GET /admin/audit has the entries).")
endrow()

row("Routing")
panel("Routing decisions per pod and policy", [(f'sum by (policy, pod) (rate(loraroute_decisions_total{{{NS}}}[{R}]))', "{{policy}} {{pod}}")], unit="reqps", stack=True,
      desc="Decisions of the scoring pipeline (policy = preset name) per chosen vLLM pod; retries are not counted again.")
panel("Routed residency tier (where the chosen pod held the adapter)", [(f'sum by (tier) (rate(loraroute_routed_residency_total{{{NS}}}[{R}]))', "{{tier}}")], unit="reqps", stack=True,
      desc="gpu / cpu / disk / loading / none (a cold load) / base. A good policy keeps 'none' and 'disk' near zero.")
panel("Adapter GPU hit rate per pod", [(f'sum by (pod) (rate(loraroute_routed_residency_total{{{NS},tier="gpu"}}[{R}])) / sum by (pod) (rate(loraroute_routed_residency_total{{{NS},tier!="base"}}[{R}]))', "{{pod}}")], unit="percentunit", max_=1)
panel("Requests by status", [(f'sum by (status) (rate(loraroute_requests_total{{{NS}}}[{R}]))', "{{status}}")], unit="reqps", stack=True)
panel("Requests per adapter", [(f'sum by (base, adapter) (rate(loraroute_requests_total{{{NS},pod!=""}}[{R}]))', "{{base}}:{{adapter}}")], unit="reqps", stack=True)
panel("Prefix blocks predicted cached (gateway index)", [(f'sum by (pod) (rate(loraroute_prefix_matched_blocks_total{{{NS}}}[{R}])) / sum by (pod) (rate(loraroute_prefix_blocks_total{{{NS}}}[{R}]))', "{{pod}}")], unit="percentunit", max_=1)
panel("Retries by reason", [(f'sum by (reason) (rate(loraroute_retries_total{{{NS}}}[{R}]))', "{{reason}}")], unit="reqps")
panel("Config reloads by outcome", [(f'sum by (outcome) (increase(loraroute_config_reloads_total{{{NS}}}[{R}]))', "{{outcome}}")],
      desc="The gateway hot-reloads its ConfigMap; a failed reload keeps the old config serving (check the gateway log for the key path).")
panel("Pods healthy (gateway view)", [(f'min by (pod) (loraroute_pod_healthy{{{NS}}})', "{{pod}}")], max_=1)
panel("In flight per pod (gateway)", [(f'sum by (pod) (loraroute_pod_inflight{{{NS}}})', "{{pod}}")])
endrow()

row("Pods: KV cache and adapters")
panel("KV cache usage per pod", [(f'max by (pod) (vllm:kv_cache_usage_perc{{{NS}}})', "{{pod}}")], unit="percentunit", max_=1)
panel("Resident adapters per pod (gateway view)", [(f'max by (pod, tier) (loraroute_pod_adapters{{{NS},tier=~"gpu|cpu"}})', "{{pod}} {{tier}}")],
      desc="Adapters the gateway believes are on GPU / in CPU on each pod (from the sidecars' PodState).")
panel("Resident adapters per pod (sidecar estimate)", [(f'sum by (pod, tier) (loraroute_sidecar_estimated_adapters{{{NS}}})', "{{pod}} {{tier}}")])
panel("Adapters on GPU, by adapter", [(f'count by (adapter) (loraroute_sidecar_adapter_resident{{{NS},tier="gpu"}})', "{{adapter}}")], stack=True,
      desc="How many pods hold each adapter on GPU right now.")
panel("Requests running / waiting / deferred per pod", [(f'sum by (pod) (vllm:num_requests_running{{{NS}}})', "running {{pod}}"),
      (f'sum by (pod) (vllm:num_requests_waiting{{{NS}}})', "waiting {{pod}}"),
      (f'sum by (pod) (vllm:num_requests_waiting_by_reason{{{NS},reason="deferred"}})', "deferred (no LoRA slot) {{pod}}")])
panel("vLLM prefix cache hit rate per pod", [(f'sum by (pod) (rate(vllm:prefix_cache_hits_total{{{NS}}}[{R}])) / sum by (pod) (rate(vllm:prefix_cache_queries_total{{{NS}}}[{R}]))', "{{pod}}")], unit="percentunit", max_=1)
panel("Pod state age (gateway view)", [(f'max by (pod) (loraroute_pod_state_age_seconds{{{NS}}})', "{{pod}}")], unit="s")
panel("vLLM reachable from its sidecar", [(f'min by (pod) (loraroute_sidecar_vllm_healthy{{{NS}}})', "{{pod}}")], max_=1)
endrow()

row("Adapter ensures and failures")
panel("Ensures by outcome (gateway -> sidecar)", [(f'sum by (outcome) (rate(loraroute_ensures_total{{{NS}}}[{R}]))', "{{outcome}}")], unit="reqps", stack=True)
panel("Ensure duration p50 / p95 (gateway)", [(q("loraroute_ensure_seconds", 0.5, "namespace"), "p50"), (q("loraroute_ensure_seconds", 0.95, "namespace"), "p95")], unit="s")
panel("Sidecar ensures by outcome", [(f'sum by (outcome) (rate(loraroute_sidecar_ensure_total{{{NS}}}[{R}]))', "{{outcome}}")], unit="reqps", stack=True)
panel("Sidecar failures by reason", [(f'sum by (reason) (rate(loraroute_sidecar_failures_total{{{NS}}}[{R}]))', "{{reason}}")], unit="reqps", stack=True,
      desc="adapter_not_found (S3 path mismatch), rank_too_large, tls_certificate, s3_connect, vllm_load_failed, ... - the seed's three classic accidents show up here first.")
panel("Adapter fetch and load time p95 (sidecar)", [(q("loraroute_sidecar_fetch_seconds", 0.95, "pod"), "fetch {{pod}}"), (q("loraroute_sidecar_load_seconds", 0.95, "pod"), "load {{pod}}")], unit="s")
panel("Adapter disk use per pod (sidecar)", [(f'max by (pod) (loraroute_sidecar_disk_bytes{{{NS}}}) / max by (pod) (loraroute_sidecar_disk_budget_bytes{{{NS}}})', "{{pod}}")], unit="percentunit", max_=1)
endrow()

dash = {
    "title": "loraroute: adapter-aware routing",
    "uid": "loraroute-overview",
    "description": "Gateway, sidecars and vLLM pods of one loraroute installation.",
    "tags": ["loraroute", "vllm", "lora"],
    "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 1,
    "time": {"from": "now-1h", "to": "now"}, "refresh": "30s",
    "templating": {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus", "current": {}},
        {"name": "namespace", "label": "Namespace", "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "query": {"query": "label_values(loraroute_pods_routable, namespace)", "refId": "ns"},
         "definition": "label_values(loraroute_pods_routable, namespace)", "refresh": 2, "includeAll": True, "multi": True, "current": {}},
    ]},
    "annotations": {"list": []},
    "panels": L.panels,
}


def render() -> str:
    """The file's exact text."""
    return json.dumps(dash, indent=1) + "\n"


OUTPUT = Path(__file__).resolve().parent.parent / "loraroute/dashboards/loraroute.json"

if __name__ == "__main__":
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")
