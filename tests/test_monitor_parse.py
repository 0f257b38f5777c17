"""Parsing vLLM's real payloads (fixtures from vLLM 0.33 and older names) and the residency estimator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from podstate.residency import ResidencyEstimator
from prometheus_client.parser import text_string_to_metric_families

from podstate.vllm_metrics import WANTED, MetricsParseError, parse_metrics, parse_models, wanted_samples

FIXTURES = Path(__file__).parent / "fixtures" / "vllm"

OLD_STYLE = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 2.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.5
# TYPE vllm:gpu_prefix_cache_queries counter
vllm:gpu_prefix_cache_queries_total{model_name="m"} 100.0
# TYPE vllm:gpu_prefix_cache_hits counter
vllm:gpu_prefix_cache_hits_total{model_name="m"} 40.0
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="32",cache_dtype="auto",enable_prefix_caching="True",gpu_memory_utilization="0.9",num_cpu_blocks="None",num_gpu_blocks="1000",swap_space_bytes="4294967296"} 1.0
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="2",running_lora_adapters="b",waiting_lora_adapters=""} 200.0
vllm:lora_requests_info{max_lora="2",running_lora_adapters="a,b",waiting_lora_adapters="c"} 100.0
"""

TWO_ENGINES = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 4.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.2
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.4
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.9
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="deferred"} 2.0
vllm:num_requests_waiting_by_reason{engine="1",model_name="m",reason="deferred"} 1.0
vllm:num_requests_waiting_by_reason{engine="1",model_name="m",reason="capacity"} 5.0
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="None"} 1.0
# TYPE vllm:lora_adapter_loaded gauge
vllm:lora_adapter_loaded{adapter_name="x",level="gpu",rank="16"} 1.0
vllm:lora_adapter_loaded{adapter_name="y",level="cpu",rank="8"} 1.0
vllm:lora_adapter_loaded{adapter_name="z",level="cpu",rank="8"} 0.0
"""


def test_real_033_metrics_fixture() -> None:
    m = parse_metrics((FIXTURES / "metrics-0.33.0.txt").read_text())
    assert (m.num_running, m.num_waiting, m.num_deferred) == (6, 0, 0)
    assert m.kv_cache_usage == pytest.approx(0.3127)
    assert (m.prefix_cache_queries, m.prefix_cache_hits) == (19024.0, 10240.0)
    assert (m.block_size, m.num_gpu_blocks) == (16, 26592)
    # two series: the later timestamp wins
    assert m.lora is not None and m.lora.running == ("sql-lora", "chat-lora") and m.lora.max_lora == 4
    assert m.exact_gpu is None and m.model_names == ("meta-llama/Llama-3.1-8B-Instruct",)


def test_old_names_and_small_cache_config_label_set() -> None:
    m = parse_metrics(OLD_STYLE)
    assert m.kv_cache_usage == 0.5
    assert (m.prefix_cache_queries, m.prefix_cache_hits) == (100.0, 40.0)
    assert (m.block_size, m.num_gpu_blocks) == (32, 1000)
    assert m.lora is not None and m.lora.running == ("b",) and m.lora.waiting == () and m.lora.timestamp == 200.0


def test_lora_since_reads_only_newer_series_and_the_current_one() -> None:
    full = parse_metrics(OLD_STYLE)
    assert [i.timestamp for i in full.lora_history] == [100.0, 200.0]
    for since, expected in ((50.0, [100.0, 200.0]), (150.0, [200.0]), (250.0, [200.0])):
        m = parse_metrics(OLD_STYLE, lora_since=since)
        assert [i.timestamp for i in m.lora_history] == expected
        assert m.lora == full.lora  # the current series is always read
        assert (m.num_running, m.block_size, m.prefix_cache_hits) == (full.num_running, full.block_size, full.prefix_cache_hits)


def test_engines_summed_new_name_preferred_and_exact_residency() -> None:
    m = parse_metrics(TWO_ENGINES)
    assert m.num_running == 7 and m.num_deferred == 3
    assert m.kv_cache_usage == pytest.approx(0.3)  # mean of the new name; the old one ignored
    assert m.num_gpu_blocks is None and m.block_size == 16
    assert m.exact_gpu == ("x",) and m.exact_cpu == ("y",) and m.exact_ranks == {"x": 16, "y": 8, "z": 8}


TRICKY = """\
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="4",running_lora_adapters="a\\\\b,c\\"d",waiting_lora_adapters="x}y\\nz"} 1.7e9
vllm:num_requests_running{engine="0" , model_name="m",} 3 1700000000000
vllm:kv_cache_usage_perc{model_name="m"}\t NaN
vllm:num_requests_waiting +Inf
vllm:e2e_request_latency_seconds_bucket{le="0.3",model_name="m"} 2.0
process_start_time_seconds 1.7e9
"""


@pytest.mark.parametrize("name", ["fixture", "tricky", "two-engines", "old"])
def test_sample_reader_agrees_with_prometheus_client(name: str) -> None:
    """The hand-written reader returns what the reference parser does, for the wanted families."""
    text = {"fixture": (FIXTURES / "metrics-0.33.0.txt").read_text(), "tricky": TRICKY,
            "two-engines": TWO_ENGINES, "old": OLD_STYLE}[name]
    ours = wanted_samples(text)
    ref = [
        (smp.name, dict(smp.labels), float(smp.value))
        for fam in text_string_to_metric_families(text)
        for smp in fam.samples
        if smp.name.startswith(WANTED)
    ]
    assert len(ours) == len(ref) > 2
    for (n1, l1, v1), (n2, l2, v2) in zip(ours, ref):
        assert (n1, l1) == (n2, l2)
        assert v1 == v2 or (v1 != v1 and v2 != v2)  # NaN


def test_bad_payloads_raise() -> None:
    for bad in ('vllm:num_requests_running{engine="0",model_name} 1.0\n', "vllm:num_requests_running 1.0.0\n",
                'vllm:num_requests_running{a="1"b="2"} 1\n'):
        with pytest.raises(MetricsParseError, match="not Prometheus text format"):
            parse_metrics(bad)
    with pytest.raises(MetricsParseError):
        parse_metrics("vllm:num_requests_running{engine=0 1.0\n")
    with pytest.raises(MetricsParseError, match="is this a vLLM server"):
        parse_metrics("<html>not metrics</html>\n")
    with pytest.raises(MetricsParseError):
        parse_models('{"data": 3}')


def test_models_fixture() -> None:
    text = (FIXTURES / "models-0.33.0.out.txt").read_text()
    payload = json.loads(text[: text.index("\n{\"error\"")] if "\n{\"error\"" in text else text)
    models = parse_models(payload)
    assert models.base_models == ("meta-llama/Llama-3.1-8B-Instruct",)
    assert models.adapters == {"sql-lora": "/adapters/sql-lora", "chat-lora": "/adapters/chat-lora"}


def test_estimator_mirrors_two_lru_tiers() -> None:
    est = ResidencyEstimator(max_loras=2, max_cpu_loras=3)
    for name in ("a", "b", "c"):
        est.observe_load(name)
    assert est.gpu == ("b", "c") and est.cpu == ("a",)
    est.observe_load("a")  # CPU hit: back on GPU, b leaves its slot
    assert est.gpu == ("c", "a") and est.cpu == ("b",)
    est.observe_load("d")  # CPU full: least recent (b) leaves entirely
    assert est.gpu == ("a", "d") and est.cpu == ("c",) and "b" not in est.cpu_all
    # more names in flight than slots: keep the resident ones
    est.observe_running(["x", "a", "y"])
    assert set(est.gpu) == {"a", "x"}
    est.observe_unload("a")  # name forgotten, cache entry stays as a ghost taking capacity
    assert "a" not in est.gpu and len(est.cpu_all) == 2
    est.observe_exact(["g"], ["g", "h"])
    assert est.gpu == ("g",) and est.cpu == ("h",) and est.source == "exact"


def test_crowded_in_flight_lists_pick_slot_holders_by_policy() -> None:
    names = ["late", "a", "b"]  # more names in flight than the 2 slots; "a" and "b" resident
    arrival = ResidencyEstimator(max_loras=2, max_cpu_loras=4)
    resident = ResidencyEstimator(max_loras=2, max_cpu_loras=4, crowded="resident")
    for est in (arrival, resident):
        est.observe_load("a")
        est.observe_load("b")
        est.observe_running(names)
    assert set(arrival.gpu) == {"late", "a"}  # first come, first served
    assert set(resident.gpu) == {"a", "b"}  # keep who holds a slot
    with pytest.raises(ValueError, match="crowded must be one of"):
        ResidencyEstimator(crowded="random")
