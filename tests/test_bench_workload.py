"""Workload generator: determinism, distributions, prefix structure, strict specs."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import pytest

from bench.workload import (
    SpecError,
    generate,
    load_spec,
    parse_spec,
    pseudo_text,
    read_trace,
    sim_profile,
    sim_profile_args,
    summarize,
    system_prompt,
    text_tokens,
    write_trace,
)
from vllm_sim.costs import get_profile

SPECS = Path(__file__).resolve().parent.parent / "bench" / "specs"


@pytest.fixture(scope="module")
def reference():
    return load_spec(SPECS / "reference.yaml")


def test_reference_spec_matches_the_issue(reference) -> None:
    c = reference.cluster
    assert (c.pods, c.profile, c.max_loras, c.max_cpu_loras, c.max_lora_rank) == (8, "8b", 4, 12, 64)
    assert reference.adapters.count == 64
    assert [reference.adapters.rank(i) for i in range(8)] == [8, 16, 32, 64, 8, 16, 32, 64]
    assert reference.popularity.kind == "zipf" and reference.popularity.exponent == 1.0
    assert reference.prefix.system_prompts_per_adapter == 2
    assert reference.prefix.followup_fraction == 0.5
    assert reference.loads == (0.3, 0.6, 0.9)
    assert reference.requests >= 2000
    assert reference.arrivals.kind == "poisson"


def test_cluster_profile_selects_the_simulators_costs() -> None:
    """``cluster.profile`` / ``cluster.cost`` reach both the simulator's flags and the runner's
    lower bound (one profile object for both)."""
    default = parse_spec({}).cluster
    assert sim_profile(default) == get_profile("8b") and sim_profile_args(default) == ["--profile", "8b"]
    slow = parse_spec({"cluster": {"profile": "8b-eager", "cost": {"load_scale": 3}}}).cluster
    assert sim_profile(slow) == get_profile("8b-eager", {"load_scale": 3.0})
    assert sim_profile_args(slow) == ["--profile", "8b-eager", "--cost", "load_scale=3"]


def test_same_seed_same_trace_and_other_seed_differs(tmp_path, reference) -> None:
    a = generate(reference, rate=50.0, requests=400)
    b = generate(reference, rate=50.0, requests=400)
    pa, pb = write_trace(tmp_path / "a.jsonl", a), write_trace(tmp_path / "b.jsonl", b)
    assert pa.read_bytes() == pb.read_bytes()
    other = parse_spec({**reference.to_dict(), "seed": 2, "cluster": {"pods": 8},
                        "adapters": {"count": 64}, "popularity": {"kind": "zipf"}, "prefix": {},
                        "lengths": {}, "arrivals": {}, "loads": [0.6]})
    c = generate(other, rate=50.0, requests=400)
    assert [r.messages for r in a] != [r.messages for r in c]


def test_content_does_not_depend_on_rate(reference) -> None:
    slow = generate(reference, rate=10.0, requests=300)
    fast = generate(reference, rate=90.0, requests=300)
    assert [(r.adapter, r.messages, r.max_tokens) for r in slow] == [(r.adapter, r.messages, r.max_tokens) for r in fast]
    assert slow[-1].t > fast[-1].t * 5


def test_roundtrip(tmp_path, reference) -> None:
    trace = generate(reference, rate=20.0, requests=50)
    meta, back = read_trace(write_trace(tmp_path / "t.jsonl", trace, {"rate": 20.0}))
    assert meta == {"rate": 20.0}
    assert [r.to_json() for r in back] == [r.to_json() for r in trace]


def test_zipf_popularity_and_lengths(reference) -> None:
    trace = generate(reference, rate=100.0, requests=6000)
    firsts = [r for r in trace if r.turn == 1]
    counts = np.bincount([int(r.adapter[2:]) for r in firsts], minlength=64)
    p = reference.popularity.probabilities(64)
    share0 = counts[0] / counts.sum()
    assert abs(share0 - p[0]) < 0.03, (share0, p[0])
    # rank-ordered: the most popular decile gets far more than the least popular decile
    assert counts[:6].sum() > 5 * counts[-6:].sum()
    assert all(50 <= text_tokens(r.messages[-1]["content"].split("] ", 1)[1]) <= 400 for r in trace)
    assert all(32 <= r.max_tokens <= 256 for r in trace)
    assert abs(statistics.mean(r.max_tokens for r in trace) - 144) < 8


def test_power_popularity() -> None:
    spec = parse_spec({"popularity": {"kind": "power", "alpha": 0.3}, "adapters": {"count": 100}})
    p = spec.popularity.probabilities(100)
    assert abs(p.sum() - 1) < 1e-9 and p[0] > p[-1] * 10
    uniform = parse_spec({"popularity": {"kind": "power", "alpha": 1.0}}).popularity.probabilities(64)
    assert np.allclose(uniform, 1 / 64)


def test_prefix_structure(reference) -> None:
    trace = generate(reference, rate=50.0, requests=2000)
    follow = [r for r in trace if r.turn > 1]
    assert 0.45 < len(follow) / len(trace) < 0.55
    by_conv: dict[int, list] = {}
    for r in trace:
        by_conv.setdefault(r.conversation, []).append(r)
    grew = 0
    for turns in by_conv.values():
        for prev, nxt in zip(turns, turns[1:]):
            assert nxt.adapter == prev.adapter
            assert nxt.messages[: len(prev.messages)] == prev.messages  # history grows
            assert nxt.shared_prefix_messages == len(prev.messages) + 1
            grew += 1
    assert grew == len(follow)
    # two ~800-token system prompts per adapter, shared by conversations of that adapter
    systems = {(r.adapter, r.messages[0]["content"]) for r in trace}
    per_adapter: dict[str, int] = {}
    for adapter, _ in systems:
        per_adapter[adapter] = per_adapter.get(adapter, 0) + 1
    assert max(per_adapter.values()) == 2
    assert all(abs(text_tokens(s) - 800) <= 8 for _, s in systems)
    assert system_prompt(reference, 3, 1) == system_prompt(reference, 3, 1) != system_prompt(reference, 3, 0)


def test_pseudo_text_is_four_bytes_per_token() -> None:
    from vllm_sim.tokenizer import count_tokens

    text = pseudo_text(np.random.default_rng(0), 123)
    assert len(text.encode()) == 4 * 123
    assert count_tokens(text) == 123


def test_arrivals_poisson_gamma_bursts() -> None:
    base = {"requests": 4000}
    poisson = generate(parse_spec(base), rate=20.0)
    gaps = np.diff([0.0] + [r.t for r in poisson])
    assert abs(gaps.mean() - 0.05) < 0.004
    assert 0.9 < gaps.std() / gaps.mean() < 1.1
    gamma = generate(parse_spec({**base, "arrivals": {"kind": "gamma", "cv": 4}}), rate=20.0)
    ggaps = np.diff([0.0] + [r.t for r in gamma])
    assert ggaps.std() / ggaps.mean() > 2.5
    burst = generate(parse_spec({**base, "arrivals": {"bursts": [{"start_s": 50, "duration_s": 20, "factor": 5}]}}),
                     rate=20.0)
    inside = sum(1 for r in burst if 50 <= r.t < 70)
    before = sum(1 for r in burst if 20 <= r.t < 40)
    assert inside > 3 * before
    timed = generate(parse_spec({"duration_s": 10.0}), rate=30.0)
    assert timed[-1].t <= 10.0 and 200 < len(timed) < 400
    assert summarize(timed)["requests"] == len(timed)


def test_strict_spec_validation(tmp_path) -> None:
    with pytest.raises(SpecError, match=r"prefix\.sytem_prompts: unknown key"):
        parse_spec({"prefix": {"sytem_prompts": 2}})
    with pytest.raises(SpecError, match="popularity.kind"):
        parse_spec({"popularity": {"kind": "pareto"}})
    with pytest.raises(SpecError, match="max_lora_rank"):
        parse_spec({"adapters": {"ranks": [128]}})
    with pytest.raises(SpecError, match="followup_fraction"):
        parse_spec({"prefix": {"followup_fraction": 1.5}})
    with pytest.raises(SpecError, match="unknown cost profile '8b-eagr'.*did you mean '8b-eager'"):
        parse_spec({"cluster": {"profile": "8b-eagr"}})
    with pytest.raises(SpecError, match="unknown cost constant 'load_scal'"):
        parse_spec({"cluster": {"cost": {"load_scal": 3}}})
    with pytest.raises(SpecError, match="non-negative number"):
        parse_spec({"cluster": {"cost": {"load_scale": "fast"}}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nrequets: 10\n")
    with pytest.raises(SpecError, match=r"bad\.yaml: spec\.requets"):
        load_spec(bad)
