"""The Grafana dashboard references only metric names (and labels) the code really exports.

A real simulated vLLM pod, a real sidecar and a real gateway are started; one adapter request
goes through the gateway (which asks the sidecar to ensure the adapter) and one is refused, then
the gateway's and the sidecar's /metrics are scraped live. ``loraroute_*`` names in the
dashboard must appear in those scrapes; ``vllm:*`` names must appear in real vLLM 0.33's
/metrics (tests/fixtures/vllm/metrics-0.33.0.txt, produced by vLLM's own metrics code).
Labels used in selectors and ``by (...)`` must exist on the metric (or be a label Prometheus
adds to every target: namespace, pod, container, ...), checked wherever a sample exists.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from loraroute.procs import free_ports, http_ready, loraroute_cmd

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "loraroute"
DASHBOARD = CHART / "dashboards" / "loraroute.json"
VLLM_METRICS = Path(__file__).parent / "fixtures" / "vllm" / "metrics-0.33.0.txt"
# labels the Prometheus Operator attaches to every scraped target
TARGET_LABELS = {"namespace", "pod", "container", "service", "endpoint", "instance", "job"}
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "rate", "irate", "increase", "histogram_quantile", "by", "without",
    "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "label_values", "topk", "bottomk",
    "abs", "clamp_min", "clamp_max", "delta", "deriv", "time", "vector", "scalar", "offset", "bool",
}


# --------------------------------------------------------------------------------------------
# PromQL reading (enough for our own dashboard: selectors, ranges, by-clauses, functions)
# --------------------------------------------------------------------------------------------
def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]
    return exprs


def parse_expr(expr: str) -> tuple[set[str], dict[str, set[str]], set[str]]:
    """(metric names, labels matched per metric, labels grouped by anywhere in the expression)."""
    text = re.sub(r'"[^"]*"', '""', expr.replace("$__rate_interval", "5m"))
    matched: dict[str, set[str]] = {}
    for metric, body in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", text):
        matched.setdefault(metric, set()).update(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", body))
    grouped = {lab.strip() for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", text) for lab in group.split(",") if lab.strip()}
    m = re.match(r"label_values\(([a-zA-Z_:][a-zA-Z0-9_:]*),\s*(\w+)\)", text)
    if m:
        return {m.group(1)}, {m.group(1): {m.group(2)}}, set()
    stripped = re.sub(r"\{[^}]*\}", " ", text)
    stripped = re.sub(r"\[[^\]]*\]", " ", stripped)
    stripped = re.sub(r"\b(?:by|without)\s*\([^)]*\)", " ", stripped)
    names = set()
    for tok in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", stripped):
        word = tok.group(0)
        rest = stripped[tok.end():].lstrip()
        if word in PROMQL_WORDS or rest.startswith("("):
            continue
        names.add(word)
    return names, matched, grouped


def test_promql_reader_finds_names_and_labels() -> None:
    names, matched, grouped = parse_expr(
        'histogram_quantile(0.95, sum by (le, pod) (rate(loraroute_ttft_seconds_bucket{namespace=~"$namespace"}[$__rate_interval])))'
        ' / sum(vllm:num_requests_waiting_by_reason{reason="deferred"})'
    )
    assert names == {"loraroute_ttft_seconds_bucket", "vllm:num_requests_waiting_by_reason"}
    assert matched == {"loraroute_ttft_seconds_bucket": {"namespace"}, "vllm:num_requests_waiting_by_reason": {"reason"}}
    assert grouped == {"le", "pod"}


# --------------------------------------------------------------------------------------------
# exposition reading
# --------------------------------------------------------------------------------------------
def exposed(text: str) -> dict[str, set[str]]:
    """Every series name the exposition declares or carries -> the label names seen on it.
    Families without samples (labelled metrics never touched) still contribute their names."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, set[str]] = {}
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                "summary": ["_sum", "_count", "_created"], "gauge": [""], "info": ["_info"], "unknown": [""]}
    for fam in text_string_to_metric_families(text):
        for suffix in suffixes.get(fam.type, [""]):
            out.setdefault(fam.name + suffix, set())
        for s in fam.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback only
        return resp.read().decode()


def wait_until(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached within {timeout}s")


@pytest.fixture
def live_metrics(procs: Any, tmp_path: Path, make_adapter: Any) -> Iterator[dict[str, dict[str, set[str]]]]:
    """Start sim + sidecar + gateway, push one request through, scrape all three."""
    import openai

    sim_port, side_port, gw_port = free_ports(3)
    source, cache = tmp_path / "source", tmp_path / "cache"
    cache.mkdir()
    make_adapter("sql", rank=8, root=source, base_model="base")
    procs.start("sim", loraroute_cmd("sim", "--port", str(sim_port), "--model", "base", "--enable-lora", "--max-loras", "2",
                                     "--max-cpu-loras", "4", "--max-lora-rank", "16", "--adapter-dir", str(cache),
                                     "--allow-runtime-lora-updating", "--time-scale", "0.05"),
                ready_url=f"http://127.0.0.1:{sim_port}/health", timeout=60)
    procs.start("sidecar", loraroute_cmd("sidecar", "--pod-id", "pod-0", "--vllm-url", f"http://127.0.0.1:{sim_port}",
                                         "--port", str(side_port), "--adapter-dir", str(cache), "--source-type", "local",
                                         "--source-path", str(source), "--base-model", "base", "--served-model-name", "base",
                                         "--max-lora-rank", "16"),
                ready_url=f"http://127.0.0.1:{side_port}/healthz", timeout=60)
    cfg = {
        "server": {"host": "127.0.0.1", "port": gw_port, "reload_poll_s": 0},
        "bases": [{"name": "base", "served_name": "base", "adapters": ["sql"]}],
        "discovery": {"static": [{"id": "pod-0", "url": f"http://127.0.0.1:{sim_port}",
                                  "sidecar_url": f"http://127.0.0.1:{side_port}"}], "monitor": "always"},
        "store": {"url": "memory://"},
    }
    cfg_path = tmp_path / "gateway.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    gw_url = f"http://127.0.0.1:{gw_port}"
    procs.start("gateway", loraroute_cmd("gateway", "--config", str(cfg_path)), ready_url=f"{gw_url}/health", timeout=60)
    wait_until(lambda: http_ready(f"{gw_url}/ready") and urllib.request.urlopen(f"{gw_url}/ready", timeout=2).status == 200,  # noqa: S310
               30, "gateway /ready")
    client = openai.OpenAI(base_url=f"{gw_url}/v1", api_key="unused", max_retries=0, timeout=60)
    chunks = list(client.chat.completions.create(model="base:sql", messages=[{"role": "user", "content": "hello"}],
                                                 max_tokens=4, stream=True))
    assert chunks, "no streamed chunks"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="base:nope", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    yield {
        "gateway": exposed(scrape(f"{gw_url}/metrics")),
        "sidecar": exposed(scrape(f"http://127.0.0.1:{side_port}/metrics")),
        "vllm": exposed(VLLM_METRICS.read_text()),
    }


def test_dashboard_uses_only_exported_metrics(live_metrics: dict[str, dict[str, set[str]]]) -> None:
    gateway, sidecar, vllm = live_metrics["gateway"], live_metrics["sidecar"], live_metrics["vllm"]
    # the live scrapes are real: the request we sent shows up
    assert "loraroute_requests_total" in gateway and {"status", "adapter", "pod"} <= gateway["loraroute_requests_total"]
    assert any(n.startswith("loraroute_sidecar_") for n in sidecar)
    known = {**vllm, **sidecar, **gateway}
    used: set[str] = set()
    problems: list[str] = []
    label_checks = 0
    for expr in dashboard_exprs():
        names, matched, grouped = parse_expr(expr)
        assert names, f"no metric in {expr!r}"
        for name in names:
            used.add(name)
            if name.startswith("vllm:"):
                source = vllm
            elif name.startswith("loraroute_sidecar_"):
                source = sidecar
            elif name.startswith("loraroute_"):
                source = gateway
            else:
                problems.append(f"{name}: not a loraroute_* or vllm:* metric")
                continue
            if name not in source:
                problems.append(f"{name}: not exported")
                continue
            labels = source[name]
            if not labels:
                continue  # no sample to read labels from
            wanted = (matched.get(name, set()) | grouped) - {"le"} - TARGET_LABELS
            if name.endswith("_bucket"):
                labels = labels | {"le"}
            label_checks += 1
            missing = wanted - labels
            if missing:
                problems.append(f"{name}: labels {sorted(missing)} not on the metric (has {sorted(labels)})")
    assert not problems, "\n".join(problems)
    assert known and len(used) >= 20 and label_checks >= 15
    # the panels are all there
    text = DASHBOARD.read_text()
    for needle in ("loraroute_ttft_seconds_bucket", "loraroute_routed_residency_total", "vllm:kv_cache_usage_perc",
                   "loraroute_pod_adapters", "loraroute_ensures_total", "loraroute_sidecar_failures_total",
                   "loraroute_retries_total"):
        assert needle in text


def test_dashboard_configmap_carries_the_json() -> None:
    from test_helm import by_kind, rendered  # same folder (pytest puts it on sys.path)

    cms = [d for d in by_kind(rendered("minimal"), "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert len(cms) == 1 and cms[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cms[0]["data"]["loraroute.json"]) == json.loads(DASHBOARD.read_text())


def test_dashboard_layout_is_sound() -> None:
    """Unique panel ids, a datasource on every panel, no two panels on the same grid cell."""
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, (p["title"], cells[(x, y)])
                cells[(x, y)] = p["title"]
