"""Pipeline behaviour: strict config, presets, explanations, optimistic updates, reload (pure)."""

from __future__ import annotations

from collections import Counter

import pytest

from scorer.errors import ConfigError
from scorer.model import AdapterRef, PodState, RoutingRequest
from scorer.build import build_pipeline
from scorer.pipeline import PRESETS, Pipeline
from scorer.plugin import Scorer
from scorer.plugins.max_score import MaxScore
from scorer.prefix import prompt_block_hashes
from scorer.context import PickContext
from scorer.view import PodView

NOW = 1_800_000_000.0
BASE = "llama"


def pod(pid: str, **kw: object) -> PodState:
    kw.setdefault("base_models", (BASE,))
    kw.setdefault("observed_at", NOW)
    kw.setdefault("max_loras", 4)
    kw.setdefault("num_gpu_blocks", 26592)
    return PodState(pod_id=pid, url=f"http://{pid}", **kw)  # type: ignore[arg-type]


def req(adapter: str | None = "a", **kw: object) -> RoutingRequest:
    kw.setdefault("prompt_tokens", 200)
    kw.setdefault("max_tokens", 64)
    return RoutingRequest(AdapterRef(BASE, adapter, 16), **kw)  # type: ignore[arg-type]


def cluster(n: int, **kw: object) -> dict[str, PodState]:
    return {f"p{i}": pod(f"p{i}", **kw) for i in range(n)}


# --- strict configuration ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "path", "words"),
    [
        ({"scorers": ["kv-usage", "queue", {"type": "inflight", "parameters": {"wieght": 2}}]},
         "pipeline.scorers[2].parameters.wieght", "unknown key"),
        ({"scorers": [{"type": "inflight", "wieght": 2}]}, "pipeline.scorers[0].wieght", "did you mean 'weight'"),
        ({"scorer": []}, "pipeline.scorer", "did you mean 'scorers'"),
        ({"scorers": [{"type": "prefix-cach"}]}, "pipeline.scorers[0].type", "did you mean 'prefix-cache'"),
        ({"filters": ["serves-base", {"type": "healthy-fresh", "parameters": {"max_age_s": "2"}}]},
         "pipeline.filters[1].parameters.max_age_s", "expected a number"),
        ({"filters": [{"type": "healthy-fresh", "parameters": {"max_age_s": True}}]},
         "pipeline.filters[0].parameters.max_age_s", "expected a number"),
        ({"scorers": [{"type": "kv-usage", "weight": -1}]}, "pipeline.scorers[0].weight", ">= 0"),
        ({"scorers": [{"type": "inflight", "parameters": {"metric": "bytes"}}]},
         "pipeline.scorers[0].parameters.metric", "must be one of"),
        ({"scorers": [{"type": "estimated-ttft", "parameters": {"disk_load_s": {"eight": 0.1}}}]},
         "pipeline.scorers[0].parameters.disk_load_s", "not an integer"),
        ({"preset": "llmd"}, "pipeline.preset", "unknown preset"),
        ({"preset": "llm-d", "weights": {"prefix": 5}}, "pipeline.weights.prefix", "unknown key"),
        ({"scorers": ["kv-usage", "kv-usage"]}, "pipeline.scorers[1].name", "duplicate"),
        ({"picker": {"type": "max-score", "parameters": {"seed": 1.5}}}, "pipeline.picker.parameters.seed", "integer"),
        ({"picker": "best"}, "pipeline.picker.type", "unknown picker"),
        ({"state": {"block_chars": 8}}, "pipeline.state.block_chars", ">= 16"),
        ({"scorers": [{"weight": 1}]}, "pipeline.scorers[0].type", "missing"),
        ({"preset": "round-robin", "replace": {"prefix-cache": {"type": "precise-prefix"}}},
         "pipeline.replace.prefix-cache", "no scorer named 'prefix-cache'"),
        ({"preset": "llm-d", "replace": {"prefix-cache": {"type": "precise-prefix", "weigth": 1}}},
         "pipeline.replace.prefix-cache.weigth", "unknown key"),
        ({"preset": "llm-d", "replace": ["prefix-cache"]}, "pipeline.replace", "expected a mapping"),
    ],
)
def test_config_errors_name_the_key(spec: dict, path: str, words: str) -> None:
    with pytest.raises(ConfigError) as exc:
        build_pipeline(spec)
    assert exc.value.path == path
    assert str(exc.value).startswith(path + ":")
    assert words in str(exc.value)


def test_presets_build_and_pick() -> None:
    assert set(PRESETS) >= {"default", "llm-d", "round-robin", "random", "least-loaded"}
    pods = cluster(3)
    for name in PRESETS:
        pl = build_pipeline(name)
        assert pl.name == name
        d = pl.pick(req(), pods, NOW)
        assert d.pod_id in pods and d.policy == name
    llmd = {n: w for n, _, w in build_pipeline("llm-d").scorers}
    assert llmd == {"prefix-cache": 3.0, "queue": 2.0, "kv-usage": 2.0, "lora-affinity": 1.0}


def test_preset_overrides_and_describe() -> None:
    pl = build_pipeline({"preset": "llm-d", "weights": {"prefix-cache": 5}, "state": {"block_chars": 128}})
    assert pl.name == "llm-d+custom"
    assert {n: w for n, _, w in pl.scorers}["prefix-cache"] == 5.0
    assert pl.block_chars == 128
    desc = pl.describe()
    assert desc["scorers"][0]["parameters"] == {"min_blocks": 1}
    assert build_pipeline({"preset": "default", "name": "ours"}).name == "ours"
    assert len(pl.hash_prompt(BASE, "a", "x" * 300)) == 2


def test_replace_swaps_a_scorer_in_place_keeping_its_weight() -> None:
    pl = build_pipeline({"preset": "default", "replace": {"prefix-cache": {
        "type": "precise-prefix", "parameters": {"lora_path": "/a/{name}"}}}})
    names = [n for n, _, _ in pl.scorers]
    default = [n for n, _, _ in build_pipeline("default").scorers]
    assert names == [("precise-prefix" if n == "prefix-cache" else n) for n in default]
    assert pl.name == "default+custom" and pl.kv_reader is not None
    assert {n: w for n, _, w in pl.scorers}["precise-prefix"] == 1.0
    llmd = build_pipeline({"preset": "llm-d", "replace": {"prefix-cache": {"type": "precise-prefix"}}})
    assert [(n, w) for n, _, w in llmd.scorers][0] == ("precise-prefix", 3.0)
    given = build_pipeline({"preset": "llm-d", "replace": {"prefix-cache": {"type": "precise-prefix", "weight": 5}},
                            "weights": {"queue": 4}})
    assert {n: w for n, _, w in given.scorers} == {"precise-prefix": 5.0, "queue": 4.0, "kv-usage": 2.0,
                                                   "lora-affinity": 1.0}


# --- explanations ------------------------------------------------------------------------------
def test_explanation_matches_the_decision() -> None:
    pods = {
        "hot": pod("hot", gpu_adapters=("a",), kv_cache_usage=0.4, num_waiting=1, num_running=8),
        "cold": pod("cold", kv_cache_usage=0.1),
        "cpu": pod("cpu", cpu_adapters=("a",), kv_cache_usage=0.3, num_waiting=1),
        "dead": pod("dead", healthy=False),
        "other": pod("other", base_models=("mistral",)),
    }
    for preset in ("default", "llm-d", "least-loaded"):
        pl = build_pipeline(preset)
        weights = {n: w for n, _, w in pl.scorers}
        d = pl.pick(req(prefix_hashes=prompt_block_hashes(BASE, "a", "z" * 1000)), pods, NOW)
        ex = d.explain()
        assert ex["picked"] == d.pod_id == ex["candidates"][0]["pod"]
        assert ex["filtered"] == {"dead": "healthy-fresh", "other": "serves-base"}
        totals = [c["total"] for c in ex["candidates"]]
        assert totals[0] == max(totals)
        assert totals[1:] == sorted(totals[1:], reverse=True)
        for c in ex["candidates"]:
            assert set(c["scores"]) == set(weights)
            assert c["total"] == pytest.approx(sum(weights[n] * s for n, s in c["scores"].items()), abs=1e-5)
            assert all(0.0 <= s <= 1.0 for s in c["scores"].values())
        assert d.ranked_ids() == [c["pod"] for c in ex["candidates"]]
        assert d.reason and d.elapsed_us > 0
    assert build_pipeline("default").pick(req(), pods, NOW).pod_id == "hot"  # GPU-resident wins


class Wild(Scorer):
    """A third-party scorer that leaves [0, 1]: the pipeline must clamp it."""

    TYPE = "wild"
    PARAMS = {}

    def score(self, views: list[PodView], ctx: PickContext) -> list[float]:
        return [1.7 if v.pod_id == "p0" else -0.3 for v in views]


def test_scores_are_clamped_and_weights_applied() -> None:
    pl = Pipeline("t", [], [("wild", Wild(), 2.0), ("kv", build_pipeline({"scorers": ["kv-usage"]}).scorers[0][1], 0.5)],
                  MaxScore({"seed": 1}))
    pods = {"p0": pod("p0", kv_cache_usage=0.5), "p1": pod("p1")}
    ex = pl.pick(req(), pods, NOW).explain()
    by = {c["pod"]: c for c in ex["candidates"]}
    assert by["p0"]["scores"]["wild"] == 1.0 and by["p1"]["scores"]["wild"] == 0.0
    assert by["p0"]["total"] == pytest.approx(2.0 + 0.25)
    assert by["p1"]["total"] == pytest.approx(0.5)


def test_no_candidates() -> None:
    pl = build_pipeline("default")
    d = pl.pick(req(), {}, NOW)
    assert d.pod_id is None and d.ranked == [] and d.reason == "no pods in view"
    d = pl.pick(req(), {"x": pod("x", healthy=False)}, NOW)
    assert d.pod_id is None and d.filtered == {"x": "healthy-fresh"} and "filtered out" in d.reason


# --- optimistic update, prefix stickiness, bounded load -------------------------------------
def test_burst_for_a_new_adapter_concentrates() -> None:
    pods = cluster(4)
    pl = build_pipeline({"preset": "default", "picker": {"type": "max-score", "parameters": {"seed": 11}}})
    got = Counter()
    for i in range(12):
        d = pl.pick(req("fresh", request_id=str(i)), pods, NOW + i * 0.001)
        pl.on_dispatch(d.pod_id, req("fresh"), NOW + i * 0.001)  # type: ignore[arg-type]
        got[d.pod_id] += 1
    # one pod loads it and takes the burst, instead of four cold loads; with the calibrated load
    # cost (≈ 0.17 s for a rank-16 fetch and load) the last of a dozen requests queued behind that
    # load may be predicted no slower on a second pod
    assert len(got) <= 2 and max(got.values()) >= 10, got
    # llm-d's published default has no optimistic state: the same burst spreads over the pods
    llmd = build_pipeline({"preset": "llm-d", "picker": {"type": "max-score", "parameters": {"seed": 11}}})
    spread = Counter()
    for i in range(12):
        d = llmd.pick(req("fresh"), pods, NOW)
        llmd.on_dispatch(d.pod_id, req("fresh"), NOW)  # type: ignore[arg-type]
        spread[d.pod_id] += 1
    assert len(spread) > 1


def test_shared_prefix_sticks_while_load_stays_bounded() -> None:
    pods = cluster(4, gpu_adapters=("a",))
    pl = build_pipeline({"preset": "default", "picker": {"type": "max-score", "parameters": {"seed": 2}}})
    system = "You are the SQL assistant of ACME. " * 200  # ~7 KB shared system prompt
    def prompt(i: int) -> RoutingRequest:
        text = system + f"question {i}: " + "q" * 300
        return req(prefix_hashes=prompt_block_hashes(BASE, "a", text), prompt_tokens=len(text) // 4)

    # sequential traffic (each completes before the next): always the pod that cached it
    first = None
    for i in range(40):
        r = prompt(i)
        t = NOW + i * 0.01
        d = pl.pick(r, pods, t)
        first = first or d.pod_id
        assert d.pod_id == first
        pl.on_dispatch(d.pod_id, r, t)  # type: ignore[arg-type]
        pl.on_complete(d.pod_id, r, ok=True)  # type: ignore[arg-type]
    # a flood that never completes: it sticks first, then spills once the pod is far ahead
    counts = Counter()
    for i in range(300):
        r = prompt(1000 + i)
        t = NOW + 0.5 + i * 0.001
        d = pl.pick(r, pods, t)
        pl.on_dispatch(d.pod_id, r, t)  # type: ignore[arg-type]
        counts[d.pod_id] += 1
        if i == 19:
            assert counts == {first: 20}
    inflight = [pl.inflight(p)[0] for p in pods]
    assert sum(inflight) == 300
    assert max(inflight) - min(inflight) <= 64
    assert counts[first] == max(counts.values())


# --- state lifecycle -----------------------------------------------------------------------------
def test_adopt_state_from_keeps_index_and_counts() -> None:
    pods = cluster(3)
    old = build_pipeline("default")
    h = prompt_block_hashes(BASE, "a", "p" * 4096)
    r = req(prefix_hashes=h, session_key="s")
    old.on_dispatch("p1", r, NOW)
    new = build_pipeline({"preset": "llm-d"})
    new.adopt_state_from(old)
    by = {c.pod_id: c for c in new.pick(req(prefix_hashes=h), pods, NOW).ranked}
    assert by["p1"].scores["prefix-cache"] == 1.0
    assert new.inflight("p1") == (1, 264)
    old.on_complete("p1", r, ok=True)  # a request routed before the reload completes
    assert new.inflight("p1") == (0, 0)
    # a new block size makes old hashes meaningless: the index starts over
    newer = build_pipeline({"preset": "default", "state": {"block_chars": 128}})
    newer.adopt_state_from(new)
    assert newer.snapshot()["p1"]["prefix_blocks"] == 0


def test_forget_pod() -> None:
    pl = build_pipeline("default")
    pl.on_dispatch("p1", req(prefix_hashes=prompt_block_hashes(BASE, "a", "q" * 1024)), NOW)
    assert pl.snapshot()["p1"]["prefix_blocks"] == 4
    pl.forget_pod("p1")
    assert "p1" not in pl.snapshot() and pl.inflight("p1") == (0, 0)
    assert len(pl.local.prefix) == 0


def test_prompt_block_hashes() -> None:
    text = "system prompt " * 100  # 1,400 characters: 5 full blocks of 256, then 120 more
    a1 = prompt_block_hashes(BASE, "a", text + "A" * 600)
    a2 = prompt_block_hashes(BASE, "a", text + "B" * 600)
    b1 = prompt_block_hashes(BASE, "b", text + "A" * 600)
    n0 = prompt_block_hashes(BASE, None, text + "A" * 600)
    assert len(a1) == len(a2) == 7
    assert a1[:5] == a2[:5]  # the shared system prompt shares its blocks …
    assert a1[5] != a2[5] and a1[6] != a2[6]  # … and the chain diverges where the text does
    assert not set(a1) & set(b1) and not set(a1) & set(n0)  # never across adapters
    assert prompt_block_hashes("other-base", "a", text) != prompt_block_hashes(BASE, "a", text)
    assert prompt_block_hashes(BASE, "a", "short") == ()
    assert len(prompt_block_hashes(BASE, "a", "x" * 1000, block_chars=100)) == 10
    assert prompt_block_hashes(BASE, "a", text) == prompt_block_hashes(BASE, "a", text)  # deterministic
    assert all(0 <= h < 2**64 for h in a1)


def test_prefix_index_cap_and_shared_blocks() -> None:
    pl = build_pipeline({"preset": "default", "state": {"max_blocks_per_pod": 3}})
    pl.pick(req(), {"p1": pod("p1"), "p2": pod("p2")}, NOW)
    h = prompt_block_hashes(BASE, "a", "w" * 256 * 5)
    pl.on_dispatch("p1", req(prefix_hashes=h), NOW)
    pl.on_dispatch("p2", req(prefix_hashes=h[:2]), NOW)
    assert pl.snapshot()["p1"]["prefix_blocks"] == 3  # the leading three survive
    assert pl.local.prefix.match(h) == {"p1": 3, "p2": 2}
    assert pl.local.prefix.holders(h[0]) == {"p1", "p2"}
    pl.forget_pod("p1")
    assert pl.local.prefix.match(h) == {"p2": 2} and pl.local.prefix.holders(h[0]) == {"p2"}


def test_decision_copies_and_reason() -> None:
    import copy
    import pickle

    pl = build_pipeline("default")
    d = pl.pick(req(prompt_tokens=1000), {"p0": pod("p0", cpu_adapters=("a",))}, NOW)
    assert "adapter a: cpu/free" in d.reason
    p = pl.scorers[0][1].params  # estimated-ttft: base + CPU activation + LoRA + prefill above the graph
    predicted = (p["base_s"] + p["cpu_load_s"] + p["lora_s"] + 1000 * p["prefill_s_per_token"]
                 + p["cliff_s"] + p["cliff_lora_s"])
    ms = int(d.reason.split("predicted TTFT ")[1].split(" ms")[0])
    assert abs(ms - 1000 * predicted) <= 0.5 + 1e-6  # the hint rounds to whole milliseconds
    for clone in (copy.copy(d), copy.deepcopy(d), pickle.loads(pickle.dumps(d)), d.to_decision()):
        assert clone.explain() == d.explain()


def test_default_prefers_the_cpu_tier_over_a_free_slot() -> None:
    pl = build_pipeline("default")
    pods = {
        "cpu-full": pod("cpu-full", cpu_adapters=("a",), gpu_adapters=("b", "c", "d", "e"), running_adapters=("b",),
                        num_running=6),
        "empty": pod("empty"),
        "disk": pod("disk", disk_adapters=("a",)),
    }
    assert pl.pick(req(), pods, NOW).pod_id == "cpu-full"
    # llm-d's lora-affinity sees neither the CPU tier nor the idle slot: 0.8 only for the free one
    llmd = {c.pod_id: c.scores["lora-affinity"] for c in build_pipeline("llm-d").pick(req(), pods, NOW).ranked}
    assert llmd == {"cpu-full": 0.8, "empty": 0.8, "disk": 0.8}
    # a saturated pod (every slot running) loses even though it holds the adapter in CPU
    pods["cpu-full"] = pod("cpu-full", cpu_adapters=("a",), running_adapters=("b", "c", "d", "e"), num_running=6)
    assert pl.pick(req(), pods, NOW).pod_id == "disk"
