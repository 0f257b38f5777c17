"""Every plugin's formula on crafted PodStates (pure, no processes)."""

from __future__ import annotations

from collections import Counter

import pytest

from scorer.errors import ConfigError
from scorer.model import T_GPU, T_REMOTE, AdapterRef, PodState, RoutingRequest
from scorer.build import build_pipeline
from scorer.pipeline import STATE_PARAMS, Pipeline
from scorer.plugins.adapter_residency import AdapterResidency
from scorer.plugins.estimated_ttft import EstimatedTTFT, interpolate_load
from scorer.prefix import prompt_block_hashes

NOW = 1_800_000_000.0
BASE = "llama"


def pod(pid: str, **kw: object) -> PodState:
    kw.setdefault("base_models", (BASE,))
    kw.setdefault("observed_at", NOW)
    kw.setdefault("max_loras", 4)
    return PodState(pod_id=pid, url=f"http://{pid}", **kw)  # type: ignore[arg-type]


def req(adapter: str | None = "a", rank: int | None = 16, **kw: object) -> RoutingRequest:
    return RoutingRequest(AdapterRef(BASE, adapter, rank), **kw)  # type: ignore[arg-type]


def one(scorer: dict, pods: list[PodState], request: RoutingRequest, **spec: object) -> dict[str, float]:
    """Scores of a single scorer for every pod (no filters)."""
    pl = build_pipeline({"filters": [], "scorers": [scorer], **spec})
    return scores_of(pl, pods, request)


def scores_of(pl: Pipeline, pods: list[PodState], request: RoutingRequest, now: float = NOW) -> dict[str, float]:
    d = pl.pick(request, {p.pod_id: p for p in pods}, now)
    name = pl.scorers[0][0]
    return {c.pod_id: c.scores[name] for c in d.ranked}


# --- filters ---------------------------------------------------------------------------------
def filtered(spec: object, pods: list[PodState], request: RoutingRequest, now: float = NOW) -> dict[str, str]:
    pl = build_pipeline({"filters": [spec], "scorers": []})
    return pl.pick(request, {p.pod_id: p for p in pods}, now).filtered


def test_healthy_fresh_drops_unhealthy_and_stale() -> None:
    pods = [pod("ok"), pod("sick", healthy=False), pod("stale", observed_at=NOW - 2.5), pod("edge", observed_at=NOW - 1.9)]
    assert filtered("healthy-fresh", pods, req()) == {"sick": "healthy-fresh", "stale": "healthy-fresh"}
    spec = {"type": "healthy-fresh", "parameters": {"max_age_s": 1.0}}
    assert set(filtered(spec, pods, req())) == {"sick", "stale", "edge"}


def test_serves_base() -> None:
    pods = [pod("yes"), pod("no", base_models=("other",)), pod("unknown", base_models=())]
    assert set(filtered("serves-base", pods, req())) == {"no", "unknown"}
    spec = {"type": "serves-base", "parameters": {"allow_unknown": True}}
    assert set(filtered(spec, pods, req())) == {"no"}


def test_rank_fits() -> None:
    pods = [pod("small", max_lora_rank=16), pod("big", max_lora_rank=64)]
    assert filtered("rank-fits", pods, req(rank=32)) == {"small": "rank-fits"}
    assert filtered("rank-fits", pods, req(rank=16)) == {}
    assert filtered("rank-fits", pods, req(adapter=None, rank=None)) == {}
    # rank unknown to the request: the pod's own record of the adapter's rank decides
    pods = [pod("small", max_lora_rank=16, adapter_ranks={"a": 32}), pod("big", max_lora_rank=64, adapter_ranks={"a": 32})]
    assert filtered("rank-fits", pods, req(rank=None)) == {"small": "rank-fits"}
    assert filtered("rank-fits", [pod("x", max_lora_rank=8)], req(rank=None)) == {}


# --- adapter-residency -------------------------------------------------------------------------
def residency_pods() -> list[PodState]:
    return [
        pod("gpu", gpu_adapters=("a", "b")),
        pod("running", running_adapters=("a",)),  # running implies on GPU
        pod("loading", loading_adapters=("a",)),
        pod("cpu", cpu_adapters=("a",), gpu_adapters=("b",)),
        pod("disk", disk_adapters=("a",)),
        pod("free", gpu_adapters=("b", "c")),
        pod("freeable", gpu_adapters=("b", "c", "d", "e"), running_adapters=("b",)),
        pod("saturated", gpu_adapters=("b", "c", "d", "e"), running_adapters=("b", "c", "d", "e")),
        pod("cpu-saturated", cpu_adapters=("a",), running_adapters=("b", "c", "d", "e")),
    ]


RESIDENCY = {k: p.default for k, p in AdapterResidency.PARAMS.items()}
INCOMING_TTL_S = STATE_PARAMS["incoming_ttl_s"].default


def test_adapter_residency_tiers() -> None:
    s = one({"type": "adapter-residency"}, residency_pods(), req())
    d = RESIDENCY
    assert s == {
        "gpu": d["gpu"], "running": d["gpu"], "loading": d["loading"], "cpu": d["cpu"], "disk": d["disk"],
        "free": d["free_slot"], "freeable": d["slot_freeable"], "saturated": d["saturated"],
        "cpu-saturated": d["saturated"],
    }
    assert len(set(s.values())) == 7  # every tier of the table is told apart
    custom = {"type": "adapter-residency", "parameters": {"cpu": 0.95, "disk": 0.1, "saturated": 0.05}}
    s = one(custom, residency_pods(), req())
    assert (s["cpu"], s["disk"], s["saturated"], s["cpu-saturated"]) == (0.95, 0.1, 0.05, 0.05)
    assert set(one({"type": "adapter-residency"}, residency_pods(), req(adapter=None)).values()) == {1.0}


def test_adapter_residency_counts_optimistic_incoming() -> None:
    pl = build_pipeline({"filters": [], "scorers": ["adapter-residency"]})
    pods = [pod("p1"), pod("p2")]
    free, incoming = RESIDENCY["free_slot"], RESIDENCY["incoming"]
    assert set(scores_of(pl, pods, req()).values()) == {free}
    pl.on_dispatch("p1", req(), NOW)
    assert scores_of(pl, pods, req(), NOW + 0.1) == {"p1": incoming, "p2": free}
    # incoming adapters take slots: three other new adapters on a 4-slot pod + this one = full
    for name in ("x", "y", "z"):
        pl.on_dispatch("p2", req(adapter=name), NOW)
    pods2 = [pod("p1"), pod("p2", gpu_adapters=("w",), running_adapters=("w",))]
    assert scores_of(pl, pods2, req(adapter="q"), NOW + 0.1)["p2"] == RESIDENCY["saturated"]  # by incoming
    # the belief expires after state.incoming_ttl_s
    assert scores_of(pl, pods, req(), NOW + INCOMING_TTL_S - 0.1)["p1"] == incoming
    assert scores_of(pl, pods, req(), NOW + INCOMING_TTL_S + 0.1) == {"p1": free, "p2": free}


def test_incoming_cleared_when_state_confirms_and_on_failure() -> None:
    pl = build_pipeline({"filters": [], "scorers": ["adapter-residency"]})
    pl.on_dispatch("p1", req(), NOW)
    assert pl.snapshot()["p1"]["incoming_adapters"] == ["a"]
    scores_of(pl, [pod("p1", gpu_adapters=("a",))], req(), NOW + 0.1)
    assert pl.snapshot()["p1"]["incoming_adapters"] == []
    pl.on_dispatch("p1", req(adapter="b"), NOW)
    pl.on_complete("p1", req(adapter="b"), ok=False)
    assert pl.snapshot()["p1"]["incoming_adapters"] == []


# --- lora-affinity (llm-d's formula) ---------------------------------------------------------
def test_lora_affinity_llmd_formula() -> None:
    pods = [
        pod("running", running_adapters=("a", "b")),
        pod("free-slot", running_adapters=("b",)),
        pod("full", running_adapters=("b", "c", "d", "e")),
        pod("idle-loaded", gpu_adapters=("a",), running_adapters=("b", "c", "d", "e")),  # residency ignored
    ]
    assert one({"type": "lora-affinity"}, pods, req()) == {"running": 1.0, "free-slot": 0.8, "full": 0.0, "idle-loaded": 0.0}


# --- prefix-cache ------------------------------------------------------------------------------
def test_prefix_cache_share_of_leading_blocks() -> None:
    pl = build_pipeline({"filters": [], "scorers": ["prefix-cache"]})
    text = "".join(f"block {i:03d} " + "x" * 246 for i in range(6))  # 6 blocks of 256 chars
    h6 = prompt_block_hashes(BASE, "a", text)
    assert len(h6) == 6
    pl.on_dispatch("p1", req(prefix_hashes=h6[:3], prompt_tokens=192), NOW)
    pods = [pod("p1"), pod("p2")]
    assert scores_of(pl, pods, req(prefix_hashes=h6, prompt_tokens=384)) == {"p1": 0.5, "p2": 0.0}
    # the same text under another adapter shares nothing
    other = prompt_block_hashes(BASE, "b", text)
    assert scores_of(pl, pods, req(adapter="b", prefix_hashes=other)) == {"p1": 0.0, "p2": 0.0}
    # only consecutive leading blocks count
    broken = (h6[0], 12345, h6[2])
    assert scores_of(pl, pods, req(prefix_hashes=broken))["p1"] == pytest.approx(1 / 3)


def test_prefix_index_lru_capacity_from_gpu_blocks() -> None:
    pl = build_pipeline({"filters": [], "scorers": ["prefix-cache"]})
    # 16 GPU blocks x 16 tokens = 256 tokens = 4 blocks of 256 chars (64 pseudo-tokens)
    small = pod("p1", num_gpu_blocks=16, block_size=16)
    scores_of(pl, [small], req())  # the view (and its capacity) is known before dispatch
    first = prompt_block_hashes(BASE, "a", "A" * 1024)
    second = prompt_block_hashes(BASE, "a", "B" * 1024)
    pl.on_dispatch("p1", req(prefix_hashes=first), NOW)
    assert scores_of(pl, [small], req(prefix_hashes=first))["p1"] == 1.0
    pl.on_dispatch("p1", req(prefix_hashes=second), NOW)
    assert pl.snapshot()["p1"]["prefix_blocks"] == 4
    assert scores_of(pl, [small], req(prefix_hashes=first))["p1"] == 0.0
    assert scores_of(pl, [small], req(prefix_hashes=second))["p1"] == 1.0


# --- load scorers ------------------------------------------------------------------------------
def test_kv_usage_and_queue() -> None:
    pods = [pod("p1", kv_cache_usage=0.25, num_waiting=2), pod("p2", kv_cache_usage=0.9, num_waiting=10),
            pod("p3", kv_cache_usage=0.0, num_waiting=6)]
    assert one({"type": "kv-usage"}, pods, req()) == pytest.approx({"p1": 0.75, "p2": 0.1, "p3": 1.0})
    assert one({"type": "queue"}, pods, req()) == pytest.approx({"p1": 1.0, "p2": 0.0, "p3": 0.5})
    same = [pod("p1", num_waiting=3), pod("p2", num_waiting=3)]
    assert one({"type": "queue"}, same, req()) == {"p1": 1.0, "p2": 1.0}


def test_inflight_capacity_minmax_tokens() -> None:
    pods = [pod("p1"), pod("p2"), pod("p3")]
    specs = {
        "cap": {"type": "inflight", "parameters": {"capacity": 4}},
        "mm": {"type": "inflight", "parameters": {"normalize": "minmax"}},
        "tok": {"type": "inflight", "parameters": {"metric": "tokens", "capacity": 1000}},
    }
    for name, spec in specs.items():
        pl = build_pipeline({"filters": [], "scorers": [spec]})
        for _ in range(2):
            pl.on_dispatch("p1", req(prompt_tokens=100, max_tokens=50), NOW)
        for _ in range(6):
            pl.on_dispatch("p2", req(prompt_tokens=100, max_tokens=50), NOW)
        got = scores_of(pl, pods, req())
        expected = {
            "cap": {"p1": 0.5, "p2": 0.0, "p3": 1.0},
            "mm": {"p1": 4 / 6, "p2": 0.0, "p3": 1.0},
            "tok": {"p1": 0.7, "p2": 0.1, "p3": 1.0},
        }[name]
        assert got == pytest.approx(expected), name
        pl.on_complete("p2", req(prompt_tokens=100, max_tokens=50), ok=True)
        assert pl.inflight("p2") == (5, 750)


def test_session_affinity() -> None:
    pl = build_pipeline({"filters": [], "scorers": ["session-affinity"]})
    pods = [pod("p1"), pod("p2")]
    assert scores_of(pl, pods, req(session_key="s1")) == {"p1": 0.0, "p2": 0.0}
    pl.on_dispatch("p2", req(session_key="s1"), NOW)
    assert scores_of(pl, pods, req(session_key="s1")) == {"p1": 0.0, "p2": 1.0}
    assert scores_of(pl, pods, req(session_key="s2")) == {"p1": 0.0, "p2": 0.0}
    pl.forget_pod("p2")
    assert scores_of(pl, pods, req(session_key="s1")) == {"p1": 0.0, "p2": 0.0}


# --- estimated-ttft ----------------------------------------------------------------------------
def test_interpolate_load() -> None:
    table = {8: 0.1, 16: 0.26, 32: 0.51, 64: 1.0}
    assert interpolate_load(table, 8) == 0.1
    assert interpolate_load(table, 4) == 0.1
    assert interpolate_load(table, 24) == pytest.approx(0.385)
    assert interpolate_load(table, 128) == pytest.approx(2.0)


def test_estimated_ttft_prediction_terms() -> None:
    params = {"scale_s": 0.5}
    pl = build_pipeline({"filters": [], "scorers": [{"type": "estimated-ttft", "parameters": params}]})
    plugin = pl.scorers[0][1]
    assert isinstance(plugin, EstimatedTTFT)
    p = plugin.params
    pods = [
        pod("gpu", gpu_adapters=("a",)),
        pod("cpu", cpu_adapters=("a",)),
        pod("disk", disk_adapters=("a",)),
        pod("remote"),
        pod("busy", gpu_adapters=("a",), num_running=10, num_waiting=3),
        pod("sat", cpu_adapters=("a",), running_adapters=("b", "c", "d", "e"), num_running=4, num_deferred=2),
    ]
    r = req(rank=32, prompt_tokens=1000)
    s = scores_of(pl, pods, r)
    t = {k: p["scale_s"] / v - p["scale_s"] for k, v in s.items()}  # back to seconds
    prefill = 1000 * p["prefill_s_per_token"]
    disk = p["model_scale"] * p["disk_load_s"][32]
    # an adapter request whose 1,000 uncached tokens leave the CUDA graph (graph_tokens 512)
    assert t["gpu"] == pytest.approx(p["base_s"] + prefill + p["lora_s"] + p["cliff_s"] + p["cliff_lora_s"])
    assert t["cpu"] - t["gpu"] == pytest.approx(p["cpu_load_s"])
    assert t["disk"] - t["gpu"] == pytest.approx(disk)
    assert t["remote"] - t["disk"] == pytest.approx(32 * p["fetch_s_per_rank"])
    assert t["busy"] - t["gpu"] == pytest.approx(3 * p["per_waiting_s"] + 13 * p["per_running_s"])
    assert t["sat"] - t["cpu"] == pytest.approx(p["deferred_wait_s"] * (1 + 2 / 4) + 4 * p["per_running_s"])
    assert s["gpu"] > s["cpu"] > s["disk"] > s["remote"]


def test_estimated_ttft_prefix_pending_and_minmax() -> None:
    pl = build_pipeline({"filters": [], "scorers": ["estimated-ttft"]})
    p = pl.scorers[0][1].params
    h = prompt_block_hashes(BASE, "a", "s" * 2560)  # 10 blocks
    pods = [pod("p1", gpu_adapters=("a",)), pod("p2", gpu_adapters=("a",))]
    pl.on_dispatch("p1", req(prefix_hashes=h[:5], prompt_tokens=1000), NOW)
    # p1 now has 1000 tokens of pending prefill; half of the next prompt is cached there
    r = req(prefix_hashes=h, prompt_tokens=2000)
    s = scores_of(pl, pods, r, NOW)
    t = {k: 0.5 / v - 0.5 for k, v in s.items()}
    pst, drain = p["prefill_s_per_token"], p["drain_s_per_token"]
    # p1: 1000 queued tokens ahead (drained at drain_s_per_token) but 1000 fewer to compute; both
    # pods compute more than graph_tokens, so both pay the cliff
    assert t["p2"] - t["p1"] == pytest.approx(1000 * pst - 1000 * drain - p["per_running_s"], abs=1e-6)  # pending_until is an absolute time: ~2e-7 s resolution
    # the pending queue drains with time
    later = scores_of(pl, pods, r, NOW + 1.0)
    assert 0.5 / later["p2"] - 0.5 / later["p1"] == pytest.approx(1000 * pst - p["per_running_s"], abs=1e-6)  # pending_until is an absolute time: ~2e-7 s resolution
    mm = build_pipeline({"filters": [], "scorers": [{"type": "estimated-ttft", "parameters": {"normalize": "minmax"}}]})
    s = scores_of(mm, [pod("g", gpu_adapters=("a",)), pod("c", cpu_adapters=("a",)), pod("r")], req())
    # min-max over the predictions: the CPU pod sits cpu_load_s above the GPU one, and the remote
    # one a disk load plus a fetch above it (rank 16: the interpolation table's own point)
    mp = mm.scorers[0][1].params
    remote = mp["model_scale"] * mp["disk_load_s"][16] + 16 * mp["fetch_s_per_rank"]
    assert s == {"g": pytest.approx(1.0), "c": pytest.approx(1.0 - mp["cpu_load_s"] / remote), "r": 0.0}


def test_estimated_ttft_counts_the_engine_stall_of_a_load_it_triggers() -> None:
    """A disk load stalls its pod's whole engine: later requests there must see it queued."""
    pl = build_pipeline({"filters": [], "scorers": ["estimated-ttft"]})
    sc = pl.scorers[0][1]
    pods = [pod("p1", gpu_adapters=("b",), disk_adapters=("a",)), pod("p2", gpu_adapters=("b",), disk_adapters=("a",))]
    before = scores_of(pl, pods, req(adapter="b"))
    pl.on_dispatch("p1", req(adapter="a", rank=64, prompt_tokens=0), NOW)
    s = scores_of(pl, pods, req(adapter="b", prompt_tokens=0))
    t = {k: 0.5 / v - 0.5 for k, v in s.items()}
    assert before["p1"] == pytest.approx(before["p2"])
    assert t["p1"] - t["p2"] == pytest.approx(sc.disk_load_s(64) + sc.params["per_running_s"], abs=1e-6)
    # the stall drains with time like queued prefill, and a load already under way adds nothing
    later = scores_of(pl, pods, req(adapter="b", prompt_tokens=0), NOW + sc.disk_load_s(64))
    assert 0.5 / later["p1"] - 0.5 / later["p2"] == pytest.approx(sc.params["per_running_s"], abs=1e-6)
    pl.on_dispatch("p2", req(adapter="b", prompt_tokens=0), NOW)  # on GPU: no stall
    pl.on_dispatch("p1", req(adapter="a", rank=64, prompt_tokens=0), NOW)  # incoming: counted once
    again = {k: 0.5 / v - 0.5 for k, v in scores_of(pl, pods, req(adapter="b", prompt_tokens=0)).items()}
    assert again["p1"] - again["p2"] == pytest.approx(sc.disk_load_s(64) + sc.params["per_running_s"], abs=1e-6)
    # no estimated-ttft scorer: nothing prices the stall, the pending queue holds prefill only
    plain = build_pipeline({"filters": [], "scorers": ["inflight"]})
    plain.pick(req(adapter="a", rank=64), {p.pod_id: p for p in pods}, NOW)
    plain.on_dispatch("p1", req(adapter="a", rank=64, prompt_tokens=0), NOW)
    assert plain.local.pods["p1"].pending_until == NOW


# --- pickers -----------------------------------------------------------------------------------
def picks(spec: dict, totals_pods: list[PodState], n: int, scorer: dict | None = None) -> Counter[str]:
    pl = build_pipeline({"filters": [], "scorers": [scorer] if scorer else [], "picker": spec})
    pods = {p.pod_id: p for p in totals_pods}
    return Counter(pl.pick(req(), pods, NOW).pod_id for _ in range(n))  # type: ignore[misc]


def test_max_score_breaks_ties_at_random_and_is_seedable() -> None:
    pods = [pod("a", kv_cache_usage=0.5), pod("b", kv_cache_usage=0.5), pod("c", kv_cache_usage=0.9)]
    got = picks({"type": "max-score", "parameters": {"seed": 3}}, pods, 400, {"type": "kv-usage"})
    assert set(got) == {"a", "b"} and min(got.values()) > 120
    again = picks({"type": "max-score", "parameters": {"seed": 3}}, pods, 400, {"type": "kv-usage"})
    assert got == again


def test_weighted_random_follows_totals() -> None:
    pods = [pod("a", kv_cache_usage=0.2), pod("b", kv_cache_usage=0.8)]  # totals 0.8 / 0.2
    got = picks({"type": "weighted-random", "parameters": {"seed": 5}}, pods, 2000, {"type": "kv-usage"})
    assert 1450 < got["a"] < 1750
    sharp = picks({"type": "weighted-random", "parameters": {"seed": 5, "temperature_inv": 4}}, pods, 2000, {"type": "kv-usage"})
    assert sharp["a"] > got["a"]


def test_round_robin_and_random() -> None:
    pods = [pod("c"), pod("a"), pod("b")]
    pl = build_pipeline("round-robin")
    seq = [pl.pick(req(), {p.pod_id: p for p in pods}, NOW).pod_id for _ in range(6)]
    assert seq == ["a", "b", "c", "a", "b", "c"]
    got = picks({"type": "random", "parameters": {"seed": 1}}, pods, 600)
    assert set(got) == {"a", "b", "c"} and min(got.values()) > 120


def test_memoised_filters_follow_time_and_state() -> None:
    pl = build_pipeline("default")
    pods = {"old": pod("old", observed_at=NOW - 1.0), "new": pod("new", observed_at=NOW + 1.0)}
    assert pl.pick(req(), pods, NOW).filtered == {}
    assert pl.pick(req(), pods, NOW + 1.5).filtered == {"old": "healthy-fresh"}  # same mapping, later
    assert pl.pick(req(rank=64), pods, NOW + 1.5).filtered == {"old": "healthy-fresh", "new": "rank-fits"}
    pods["old"] = pod("old", observed_at=NOW + 1.5, kv_cache_usage=0.5)  # a fresh state arrives
    d = pl.pick(req(), pods, NOW + 1.5)
    assert d.filtered == {} and {c.pod_id: c.scores["kv-usage"] for c in d.ranked} == {"old": 0.5, "new": 1.0}
    d = pl.pick(RoutingRequest(AdapterRef("other-base", "a", 16)), pods, NOW + 1.5)
    assert d.pod_id is None and d.filtered == {"old": "serves-base", "new": "serves-base"}


def test_views_follow_state_changes() -> None:
    pl = build_pipeline({"filters": [], "scorers": ["adapter-residency", "kv-usage"]})
    pods = {"p1": pod("p1", cpu_adapters=("a",), kv_cache_usage=0.2)}
    assert scores_of(pl, list(pods.values()), req()) == {"p1": 0.7}
    first = pl.local.views["p1"]
    pods["p1"] = pods["p1"].replace(kv_cache_usage=0.6)  # counters only: derived sets reused
    d = pl.pick(req(), pods, NOW)
    assert d.ranked[0].scores == {"adapter-residency": 0.7, "kv-usage": pytest.approx(0.4)}
    assert pl.local.views["p1"].cpu is first.cpu
    pods["p1"] = pods["p1"].replace(gpu_adapters=("a",), cpu_adapters=())  # residency moved
    assert scores_of(pl, list(pods.values()), req()) == {"p1": 1.0}


def test_deferred_adapter_is_not_counted_on_gpu() -> None:
    """vLLM lists a deferred request's adapter among the running ones; it holds no GPU slot."""
    from scorer.build import build_pipeline
    from scorer.model import AdapterRef, PodState, RoutingRequest

    pipeline = build_pipeline("default")
    common = dict(base_models=("b",), max_loras=2, max_lora_rank=64, num_gpu_blocks=1000, observed_at=100.0)
    deferred = PodState(pod_id="deferred", url="u", gpu_adapters=("x", "y"), running_adapters=("x", "y", "z"),
                        num_running=2, num_waiting=1, num_deferred=1, **common)
    resident = PodState(pod_id="resident", url="u", gpu_adapters=("z", "x"), running_adapters=("z", "x"),
                        num_running=2, **common)
    req = RoutingRequest(adapter=AdapterRef(base="b", name="z", rank=8), prompt_tokens=100)
    decision = pipeline.pick(req, {"deferred": deferred, "resident": resident}, now=100.0)
    assert decision.pod_id == "resident"
    assert (decision.stored_tier("deferred"), decision.stored_tier("resident")) == (T_REMOTE, T_GPU)
    assert "adapter z: gpu/" in decision.reason


# --- the learned cost model (scorer.costmodel through the pipeline) ---------------------------
def _learning_pipeline(**params: object) -> Pipeline:
    return build_pipeline({"filters": [], "scorers": [{"type": "estimated-ttft", "parameters": params}]})


def test_dispatch_tickets_name_the_tier_the_completion_teaches() -> None:
    from scorer.costmodel import C_CPU, C_DISK, C_GPU, C_REMOTE

    pl = _learning_pipeline()
    pods = [pod("g", gpu_adapters=("a",)), pod("c", cpu_adapters=("a",)), pod("d", disk_adapters=("a",)),
            pod("r"), pod("q", cpu_adapters=("a",), running_adapters=("b", "c", "d", "e"), num_deferred=3)]
    pl.pick(req(), {p.pod_id: p for p in pods}, NOW)  # builds the views
    tiers = {p.pod_id: pl.on_dispatch(p.pod_id, req(prompt_tokens=100), NOW) for p in pods}
    assert {k: t.tier for k, t in tiers.items() if t is not None} == {
        "g": C_GPU, "c": C_CPU, "d": C_DISK, "r": C_REMOTE, "q": None}  # q defers: a wait the model does not see
    assert all(t is not None and t.adapter and t.rank == 16 and t.uncached_tokens == 100 for t in tiers.values())
    again = pl.on_dispatch("r", req(prompt_tokens=100), NOW)  # just sent there: incoming, not an observation
    assert again is not None and again.tier is None
    assert tiers["g"].queue_s == 0.0 and again.queue_s > 0.0  # the first dispatch to r is in r's pending queue


def test_completions_teach_and_the_predictions_follow() -> None:
    pl = _learning_pipeline()
    pods = {"p": pod("p", disk_adapters=("a",))}
    before = scores_of(pl, list(pods.values()), req())["p"]
    for _ in range(300):  # a disk-tier rank-16 load takes 1 s there, ten times the default
        pl.pick(req(), pods, NOW)
        t = pl.on_dispatch("p", req(prompt_tokens=0), NOW)
        pl.on_complete("p", req(prompt_tokens=0), True, t, 1.0 + 0.054)
        pl.local.pods["p"].pending_until = 0.0
        pl.local.pods["p"].incoming.clear()
    snap = pl.cost_model()
    assert snap is not None
    (fit,) = snap["groups"].values()
    assert fit["observations"] == 300
    after = scores_of(pl, list(pods.values()), req())["p"]
    predicted = 0.5 / after - 0.5
    assert predicted == pytest.approx(1.054, rel=0.1)
    assert after < before
    # failed, unstreamed or ticketless completions teach nothing
    t = pl.on_dispatch("p", req(), NOW)
    pl.on_complete("p", req(), False, t, 5.0)
    pl.on_complete("p", req(), True, t, None)
    pl.on_complete("p", req(), True, None, 5.0)
    assert pl.cost_model()["groups"][next(iter(snap["groups"]))]["observations"] == 300  # type: ignore[index]


def test_pins_learning_off_and_reload_keep_what_they_should() -> None:
    pods = {"p": pod("p", disk_adapters=("a",))}

    def teach(pl: Pipeline, n: int = 200) -> None:
        for _ in range(n):
            pl.pick(req(), pods, NOW)
            t = pl.on_dispatch("p", req(prompt_tokens=0), NOW)
            pl.on_complete("p", req(prompt_tokens=0), True, t, 2.0)
            pl.local.pods["p"].pending_until = 0.0
            pl.local.pods["p"].incoming.clear()

    pinned = _learning_pipeline(pin=["disk", "lora_s"])
    teach(pinned)
    (fit,) = pinned.cost_model()["groups"].values()  # type: ignore[index]
    assert fit["constants"]["disk_s_by_rank"] == fit["defaults"]["disk_s_by_rank"]
    assert fit["constants"]["lora_s"] == fit["defaults"]["lora_s"]
    assert fit["constants"]["base_s"] > 10 * fit["defaults"]["base_s"]  # the rest absorbed the 2 s
    assert sorted(fit["pinned"]) == ["disk_offset_s", "disk_scale", "lora_s"]

    off = _learning_pipeline(learn=False)
    teach(off, 20)
    assert off.cost_model()["groups"] == {}  # type: ignore[index]

    learned = _learning_pipeline()
    teach(learned)
    same = _learning_pipeline()
    same.adopt_state_from(learned)  # a reload with the same scorer: what was learned stays
    assert same.cost_model() == learned.cost_model()
    other = _learning_pipeline(base_s=0.05)
    other.adopt_state_from(learned)  # other defaults: the old fit was against other priors
    assert other.cost_model()["groups"] == {}  # type: ignore[index]
    with pytest.raises(ConfigError, match="unknown constant 'disc'"):
        _learning_pipeline(pin=["disc"])


def test_estimated_ttft_prices_the_cuda_graph_cliff_per_pod() -> None:
    """A pod that holds most of a long prompt's prefix keeps the rest inside the CUDA graph; one
    that holds none pays the cliff. An eager server (graph_tokens 0) has none."""
    h = prompt_block_hashes(BASE, "a", "s" * 2560)  # 10 blocks of a 1,000-token prompt
    pods = [pod("warm", gpu_adapters=("a",)), pod("cold", gpu_adapters=("a",))]
    r = req(prefix_hashes=h, prompt_tokens=1000)
    for graph, expect_cliff in ((512, True), (0, False)):
        pl = _learning_pipeline(graph_tokens=graph)
        p = pl.scorers[0][1].params
        pl.on_dispatch("warm", req(prefix_hashes=h[:8], prompt_tokens=800), NOW)  # 8 blocks cached there
        pl.local.pods["warm"].pending_until = 0.0
        pl.local.pods["warm"].inflight = 0
        t = {k: 0.5 / v - 0.5 for k, v in scores_of(pl, pods, r).items()}
        prefix_gain = 0.8 * 1000 * p["prefill_s_per_token"]
        cliff = p["cliff_s"] + p["cliff_lora_s"]
        assert t["cold"] - t["warm"] == pytest.approx(prefix_gain + (cliff if expect_cliff else 0.0), abs=1e-6)
