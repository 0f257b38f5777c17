"""vllm_sim's engine model against real `loraroute sim` processes, judged on simulated-time ground
truth (`/sim/state`), never on wall time: prefix cache, LoRA slot gate, load stalls, preemption,
abort, cluster mode; plus the pure parts (tokenizer, cost profile, block pool)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraroute.procs import Proc, consecutive_free_ports, free_port, http_ready, loraroute_cmd
from vllm_sim.costs import ProfileError, get_profile, ideal_ttft
from vllm_sim.kvcache import BlockPool, block_hashes, chain_seed
from vllm_sim.tokenizer import apply_chat_template, count_tokens, tokenize

BASE = "meta-llama/Llama-3.1-8B-Instruct"
PROFILE = get_profile()  # the default: 8b, compiled


def start_sim(procs, *args: str) -> Proc:  # type: ignore[no-untyped-def]
    port = free_port()
    return procs.start(f"sim-{port}", loraroute_cmd("sim", "--port", str(port), *args), port=port,
                       ready_url=f"http://127.0.0.1:{port}/health", timeout=30)


def state(sim: Proc | SimpleNamespace) -> dict:  # type: ignore[type-arg]
    return httpx.get(sim.url + "/sim/state", timeout=10).json()


def record(sim: Proc | SimpleNamespace, request_id: str) -> dict:  # type: ignore[type-arg]
    return next(r for r in state(sim)["requests"] if r["request_id"] == request_id)


def metric(sim: Proc, name: str, **labels: str) -> float:
    text = httpx.get(sim.url + "/metrics", timeout=10).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise KeyError(name)


def wait_for(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def send(sim: Proc | SimpleNamespace, model: str, content: str, max_tokens: int, request_id: str, may_be_cut: bool = False) -> threading.Thread:
    """Fire one chat request in a thread (the caller joins it, unless the test ends first:
    ``may_be_cut`` then tolerates the server going away)."""
    messages = [{"role": "user", "content": content}]

    def run() -> None:
        try:
            httpx.post(sim.url + "/v1/chat/completions", headers={"X-Request-Id": request_id}, timeout=60,
                       json={"model": model, "messages": messages, "max_tokens": max_tokens}).raise_for_status()
        except httpx.TransportError:
            if not may_be_cut:
                raise

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


# -- pure parts ---------------------------------------------------------------------------------
def test_tokenizer_and_template() -> None:
    assert count_tokens("") == 0 and count_tokens("abcd") == 1 and count_tokens("abcde") == 2
    assert count_tokens("é" * 4) == 2  # UTF-8 bytes, not characters
    assert len(tokenize("hello world!")) == count_tokens("hello world!") == 3
    assert tokenize("abcdefgh")[:1] == tokenize("abcdxyz")[:1] and tokenize("abc") != tokenize("abd")
    a = apply_chat_template([{"role": "system", "content": "S" * 100}, {"role": "user", "content": "one"}])
    b = apply_chat_template([{"role": "system", "content": "S" * 100}, {"role": "user", "content": "two"}])
    shared = len(apply_chat_template([{"role": "system", "content": "S" * 100}], add_generation_prompt=False))
    assert a[:shared] == b[:shared] and a != b
    assert apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]).count("hi") == 1


def test_cost_profile_and_ideal_ttft() -> None:
    p = PROFILE
    points = dict(p.disk_load_points)
    assert p.disk_load_s(8) == p.disk_load_s(1) == points[8]  # flat below the smallest measured rank
    assert p.disk_load_s(24) == pytest.approx((points[16] + points[32]) / 2)
    assert p.disk_load_s(128) == pytest.approx(points[64] + 2 * (points[64] - points[32]))
    assert get_profile("8b", {"load_scale": 3}).disk_load_s(16) == pytest.approx(3 * points[16])
    assert p.tier_extra_s("disk", 16) == p.disk_load_s(16) + p.cpu_to_gpu_s and p.tier_extra_s("gpu", 16) == 0
    assert p.load_api_s(16) == p.tier_extra_s("disk", 16) + p.load_api_overhead_s
    # three regimes: a decode-only graph step, a prefill step in a graph (<= 512 tokens), none above
    assert p.step_time(0, 1, 0) == pytest.approx(p.decode_step_s + p.decode_seq_s)
    assert p.step_time(0, 1, 0, lora=True) - p.step_time(0, 1, 0) == pytest.approx(p.lora_decode_s)
    assert p.step_time(500, 0, 0) == pytest.approx(p.prefill_step_s + 500 * p.prefill_graph_token_s)
    assert p.step_time(600, 0, 0) == p.eager_prefill_step_s  # launch-bound above the graph limit ...
    assert p.step_time(8192, 0, 0) == pytest.approx(8192 * p.prefill_token_s)  # ... compute-bound far above
    assert p.step_time(500, 20, 0) > p.step_time(500, 0, 0) + 0.02  # 520 tokens: past the graph limit
    assert p.step_time(0, 600, 0) == pytest.approx(p.eager_decode_step_s + 600 * p.decode_seq_s)
    eager = get_profile("8b-eager")
    assert eager.step_time(100, 0, 0) == eager.eager_prefill_step_s and eager.first_lora_jit_s > 3
    assert ideal_ttft(p, 1000, 0) == p.step_time(1000, 0, 0)
    assert ideal_ttft(p, 1000, 0, lora=True) == p.step_time(1000, 0, 0, lora=True)
    assert ideal_ttft(p, 1000, 992) == pytest.approx(p.step_time(8, 0, 0))
    assert ideal_ttft(p, 1000, 1000) == ideal_ttft(p, 1000, 999)  # the last token is always computed
    assert ideal_ttft(p, 20000, 0) == pytest.approx(2 * p.step_time(8192, 0, 0) + p.step_time(20000 - 16384, 0, 0))
    with pytest.raises(ProfileError, match="did you mean '8b-eager'"):
        get_profile("8b-eagre")
    with pytest.raises(ProfileError, match="did you mean 'load_scale'"):
        get_profile("8b", {"load_scal": 2})
    truth = p.truth()
    assert truth.disk_load_s[64] == p.tier_extra_s("disk", 64) and truth.cpu_load_s == p.cpu_to_gpu_s
    assert 1e-5 < truth.prefill_s_per_token < 4e-5 and truth.lora_surcharge_s > 0


def test_block_pool_prefix_cache_and_eviction() -> None:
    pool = BlockPool(num_blocks=4, block_size=16)
    data = b"x" * 64 * 3
    ha = block_hashes(data, 64, chain_seed("a", "/p/a"), 3)
    hb = block_hashes(data, 64, chain_seed("b", "/p/b"), 3)
    assert set(ha).isdisjoint(hb)  # never shared across adapters
    ids = pool.allocate(3)
    assert ids is not None
    for b, h in zip(ids, ha):
        pool.cache_block(b, h)
    pool.free(ids)
    assert pool.free_blocks == 4 and pool.count_hits(ha) == 3 and pool.count_hits(hb) == 0
    assert pool.allocate(2) is not None  # never-used block first, then the LRU head: a's tail block
    assert pool.count_hits(ha) == 2
    assert pool.allocate(5) is None


# -- engine behaviour through real processes --------------------------------------------------------
def test_prefix_cache_hits_per_adapter(procs, make_adapter) -> None:  # type: ignore[no-untyped-def]
    a, b = make_adapter("a-lora", rank=8), make_adapter("b-lora", rank=8)
    sim = start_sim(procs, "--enable-lora", "--max-loras", "2", "--lora-modules", f"a-lora={a}", f"b-lora={b}",
                    "--time-scale", "0.05")
    system = "You answer questions about the sales database. " * 300
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "q"}]
    n = count_tokens(apply_chat_template(msgs))
    expected = (n - 1) // 16 * 16
    c = openai.OpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0)
    hits0 = metric(sim, "vllm:prefix_cache_hits_total")
    c.chat.completions.create(model="a-lora", messages=msgs, max_tokens=2, extra_headers={"X-Request-Id": "p1"})  # type: ignore[arg-type]
    hits1 = metric(sim, "vllm:prefix_cache_hits_total")
    c.chat.completions.create(model="a-lora", messages=msgs, max_tokens=2, extra_headers={"X-Request-Id": "p2"})  # type: ignore[arg-type]
    hits2 = metric(sim, "vllm:prefix_cache_hits_total")
    c.chat.completions.create(model="b-lora", messages=msgs, max_tokens=2, extra_headers={"X-Request-Id": "p3"})  # type: ignore[arg-type]
    hits3 = metric(sim, "vllm:prefix_cache_hits_total")
    r1, r2, r3 = record(sim, "p1"), record(sim, "p2"), record(sim, "p3")
    assert (hits1 - hits0, hits2 - hits1, hits3 - hits2) == (0, expected, 0)
    assert (r1["cached_tokens"], r2["cached_tokens"], r3["cached_tokens"]) == (0, expected, 0)
    assert r2["ttft"] < r1["ttft"] / 4
    assert r1["ttft"] == pytest.approx(ideal_ttft(PROFILE, n, 0, lora=True), rel=1e-6)
    assert r2["ttft"] == pytest.approx(ideal_ttft(PROFILE, n, expected, lora=True), rel=1e-6)
    assert r3["ttft"] == pytest.approx(r1["ttft"], rel=1e-6)
    assert metric(sim, "vllm:prefix_cache_queries_total") == 3 * n


def test_third_adapter_is_deferred_until_a_slot_frees(procs, make_adapter) -> None:  # type: ignore[no-untyped-def]
    paths = {name: make_adapter(name, rank=8) for name in ("a-lora", "b-lora", "c-lora")}
    sim = start_sim(procs, "--enable-lora", "--max-loras", "2", "--max-cpu-loras", "3", "--time-scale", "0.1",
                    "--lora-modules", *[f"{k}={v}" for k, v in paths.items()])
    # A lasts ~21 s simulated (>= 2.1 s wall); B far longer and is not waited for
    threads = [send(sim, "a-lora", "a", 3000, "A")]
    send(sim, "b-lora", "b", 20000, "B", may_be_cut=True)
    wait_for(lambda: state(sim)["running"] == 2, what="A and B running")
    threads.append(send(sim, "c-lora", "c", 5, "C"))
    wait_for(lambda: metric(sim, "vllm:num_requests_waiting_by_reason", reason="deferred") == 1, what="C deferred")
    s = state(sim)
    assert s["deferred"] == 1 and s["waiting"] == 1 and s["running"] == 2
    threads.append(send(sim, "a-lora", "a2", 5, "A2"))  # a later request of a resident adapter passes C
    for t in threads:
        t.join(60)
    a, b, c, a2 = (record(sim, k) for k in ("A", "B", "C", "A2"))
    assert c["finish_reason"] == "length"
    a_end = a["arrival"] + a["e2e"]
    c_start = c["arrival"] + c["queue_wait"]
    assert c_start >= a_end - 1e-9  # admitted only once A's slot had no running request
    assert b["e2e"] is None  # ... without waiting for B, which is still running
    assert a2["arrival"] > c["arrival"] and a2["arrival"] + a2["queue_wait"] < c_start  # A2 passed C
    assert c["adapter_tier"] == "cpu" and c["adapter_load"] == pytest.approx(PROFILE.cpu_to_gpu_s)


def test_cold_load_stalls_every_running_request(procs, make_adapter) -> None:  # type: ignore[no-untyped-def]
    warm, cold = make_adapter("warm-lora", rank=8), make_adapter("cold-lora", rank=16)
    root = cold.parent
    sim = start_sim(procs, "--enable-lora", "--max-loras", "2", "--lora-modules", f"warm-lora={warm}",
                    "--adapter-dir", str(root), "--allow-runtime-lora-updating", "--time-scale", "0.2")
    long_prompt = "word " * 96_000  # 480 kB -> ~120k tokens: 15 chunked-prefill steps, ~4 s simulated
    t_decode = send(sim, "warm-lora", "decode", 1500, "D")  # ~11 s simulated: still decoding when C comes
    wait_for(lambda: state(sim)["running"] == 1, what="D running")
    t_prefill = send(sim, BASE, long_prompt, 2, "P")
    wait_for(lambda: any(r["request_id"] == "P" for r in state(sim)["requests"]), what="P arrived")
    t_cold = send(sim, "cold-lora", "cold", 2, "C")
    for t in (t_decode, t_prefill, t_cold):
        t.join(60)
    d, p, c = record(sim, "D"), record(sim, "P"), record(sim, "C")
    stall = PROFILE.load_api_s(16)  # the resolver loads it: an engine utility call every request waits for
    assert c["adapter_tier"] == "disk" and c["adapter_load"] == pytest.approx(stall)
    assert d["max_itl"] >= stall  # the decoding request felt the whole load
    # the load happened while P was still prefilling: it shows in P's TTFT
    assert c["arrival"] < p["arrival"] + p["ttft"]
    assert p["adapter_load"] == pytest.approx(stall)
    assert p["ttft"] == pytest.approx(p["queue_wait"] + stall + p["prefill"])
    assert p["ttft"] > ideal_ttft(PROFILE, p["prompt_tokens"], 0) + stall - 1e-9
    assert metric(sim, "vllm:inter_token_latency_seconds_bucket", le="0.2") < metric(
        sim, "vllm:inter_token_latency_seconds_count")


def test_preemption_when_kv_blocks_run_out(procs) -> None:  # type: ignore[no-untyped-def]
    # each request needs ~31 blocks by its end; any two together exceed the 48 blocks
    sim = start_sim(procs, "--num-gpu-blocks", "48", "--time-scale", "0.1")
    threads = [send(sim, BASE, f"request {i} " + "x" * 200, 400, f"R{i}") for i in range(3)]
    for t in threads:
        t.join(60)
    s = state(sim)
    recs = [r for r in s["requests"] if r["request_id"].startswith("R")]
    assert len(recs) == 3
    assert all(r["finish_reason"] == "length" and r["output_tokens"] == 400 for r in recs)
    assert s["preemptions"] > 0 and metric(sim, "vllm:num_preemptions_total") == s["preemptions"]
    assert s["free_blocks"] == 48 and metric(sim, "vllm:kv_cache_usage_perc") == 0.0


def test_client_disconnect_aborts(procs) -> None:  # type: ignore[no-untyped-def]
    sim = start_sim(procs, "--time-scale", "0.5")

    async def go() -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            body = {"model": BASE, "messages": [{"role": "user", "content": "x"}], "max_tokens": 5000, "stream": True}
            async with http.stream("POST", sim.url + "/v1/chat/completions", json=body,
                                   headers={"X-Request-Id": "gone"}) as resp:
                async for _ in resp.aiter_lines():
                    break  # first chunk arrived; hang up

    asyncio.run(go())
    wait_for(lambda: record(sim, "gone")["finish_reason"] == "abort", what="abort")
    assert record(sim, "gone")["output_tokens"] < 5000
    assert metric(sim, "vllm:request_success_total", finished_reason="abort") == 1
    # a non-streaming client that gives up is aborted too
    with pytest.raises(httpx.TimeoutException):
        httpx.post(sim.url + "/v1/completions", headers={"X-Request-Id": "impatient"}, timeout=0.5,
                   json={"model": BASE, "prompt": "x", "max_tokens": 5000})
    wait_for(lambda: record(sim, "impatient")["finish_reason"] == "abort", what="non-streaming abort")
    assert metric(sim, "vllm:request_success_total", finished_reason="abort") == 2
    wait_for(lambda: state(sim)["running"] == 0, what="engine idle")


def test_cluster_pods_are_independent(procs, make_adapter) -> None:  # type: ignore[no-untyped-def]
    root = make_adapter("shared-lora", rank=8).parent
    base_port = consecutive_free_ports(3)
    procs.start("cluster", loraroute_cmd("sim", "cluster", "--pods", "3", "--base-port", str(base_port), "--enable-lora",
                                         "--adapter-dir", str(root), "--allow-runtime-lora-updating", "--time-scale", "0"),
                ready=lambda: all(http_ready(f"http://127.0.0.1:{base_port + i}/health") for i in range(3)), timeout=30)
    urls = [f"http://127.0.0.1:{base_port + i}" for i in range(3)]
    r = httpx.post(urls[1] + "/v1/chat/completions", timeout=30, headers={"X-Request-Id": "on-1"},
                   json={"model": "shared-lora", "messages": [{"role": "user", "content": "x"}], "max_tokens": 300})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 300
    states = [httpx.get(u + "/sim/state", timeout=10).json() for u in urls]
    assert len({s["pod"] for s in states}) == 3
    assert [len(s["requests"]) for s in states] == [0, 1, 0]
    assert [s["gpu_adapters"] for s in states] == [[], ["shared-lora"], []]
    assert states[1]["now"] > 300 * PROFILE.decode_step_s  # simulated time advanced with zero delay
    page = httpx.get(urls[1] + "/sim/state", params={"since_request": 1}, timeout=10).json()
    assert page["requests"] == [] and page["last_seq"] == 1


def test_pods_sharing_a_gpu_slow_each_other_by_the_measured_factors(procs, make_adapter, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Pods 0 and 1 share a GPU, pod 2 has its own: the same requests on pod 0 (while pod 1
    decodes) and on pod 2 differ by the share file's factors, in simulated ground truth."""
    root = make_adapter("cold-a", rank=16).parent
    make_adapter("cold-b", rank=16)
    share = tmp_path / "share.json"
    share.write_text('{"factors": {"short": [1, 2.0], "prefill": [1, 2.5], "decode": [1, 3.0], "load": [1, 4.0]},'
                     ' "first_use_extra_ms": [0, 150]}')
    base_port = consecutive_free_ports(3)
    procs.start("cluster", loraroute_cmd("sim", "cluster", "--pods", "3", "--base-port", str(base_port), "--enable-lora",
                                         "--max-lora-rank", "64", "--adapter-dir", str(root),
                                         "--allow-runtime-lora-updating", "--time-scale", "0.1",
                                         "--pods-per-gpu", "2", "--gpu-share", str(share)),
                ready=lambda: all(http_ready(f"http://127.0.0.1:{base_port + i}/health") for i in range(3)), timeout=30)
    p0, p1, p2 = (SimpleNamespace(url=f"http://127.0.0.1:{base_port + i}") for i in range(3))
    busy = send(p1, BASE, "keep decoding", 1500, "busy")
    wait_for(lambda: state(p1)["running"] == 1, what="pod 1 decoding")
    for name, pod in (("cold-a", p0), ("cold-b", p2)):
        send(pod, name, "short prompt", 40, f"L-{name}").join(30)
    for pod in (p0, p2):
        send(pod, BASE, "short prompt", 40, "S").join(30)
    assert state(p1)["running"] == 1, "pod 1 must still be busy for the comparison to hold"
    shared, alone = record(p0, "S"), record(p2, "S")
    assert shared["prefill"] == pytest.approx(2.0 * alone["prefill"], rel=1e-6)
    assert shared["e2e"] - shared["ttft"] == pytest.approx(3.0 * (alone["e2e"] - alone["ttft"]), rel=1e-6)
    la, lb = record(p0, "L-cold-a"), record(p2, "L-cold-b")
    assert la["adapter_tier"] == lb["adapter_tier"] == "disk"
    assert la["adapter_load"] == pytest.approx(4.0 * lb["adapter_load"], rel=1e-6)
    # the first step with a fresh GPU slot: the short-step factor and 150 ms on top
    assert la["prefill"] == pytest.approx(2.0 * lb["prefill"] + 0.150, rel=1e-6)
    busy.join(60)
    # alone again: pod 0 runs at the profile's own speed
    send(p0, BASE, "other prompt", 40, "S2").join(30)
    assert record(p0, "S2")["prefill"] == pytest.approx(alone["prefill"], rel=1e-6)


def test_pods_per_gpu_needs_a_valid_share_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    base = ["sim", "cluster", "--pods", "2", "--base-port", "1", "--pods-per-gpu", "2"]
    out = subprocess.run(loraroute_cmd(*base), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "needs --gpu-share" in out.stderr
    bad = tmp_path / "bad.json"
    for doc, error in (('{"factors": {"short": [1, 2], "prefill": [1, 2], "decode": [1, 2]}}', "no factors for 'load'"),
                       ('{"short": [1], "prefill": [1], "decode": [1, 0], "load": [1]}', "'decode' factors must be > 0"),
                       ('[1, 2]', "must hold a JSON object")):
        bad.write_text(doc)
        out = subprocess.run(loraroute_cmd(*base, "--gpu-share", str(bad)), capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and error in out.stderr, out.stderr


def test_gpu_share_reads_the_probe_file_and_derives_the_first_use_extra(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from vllm_sim.gpushare import GpuShare

    rows = [{"busy_neighbours": 0, "kind": "lora_short", "ms": ms} for ms in (20.0, 30.0, 25.0)]
    rows += [{"busy_neighbours": 1, "kind": "lora_short", "ms": 100.0},
             {"busy_neighbours": 3, "kind": "lora_short", "ms": 300.0},
             {"busy_neighbours": 3, "kind": "decode", "ms": 1.0}]
    factors = {"short": [1, 1.5, 2, 2.5], "prefill": [1, 1.2], "decode": [1, 2, 3, 4], "load": [1, 1, 1, 1]}
    share = GpuShare.from_doc({"factors": factors, "rows": rows})
    # medians minus the median alone (25 ms); k = 2 was not measured: it keeps k = 1's
    assert share.first_use_extra_s == pytest.approx((0.0, 0.075, 0.075, 0.275))
    assert share.first_use_s(7) == pytest.approx(0.275) and share.factor("prefill", 3) == 1.2
    assert [share.step_kind(n) for n in (0, 255, 256)] == ["decode", "short", "prefill"]
    # the kit's own file (run 5 of docs/real-gpu.md) loads
    probe = GpuShare.load(Path(__file__).parents[1] / "docs" / "benchmarks" / "gpu-real" / "run5-share.json")
    assert len(probe.factors["decode"]) == 4 and probe.first_use_extra_s[0] == 0.0 and probe.first_use_extra_s[1] > 0.1
