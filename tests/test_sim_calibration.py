"""The simulator's cost profiles against the real vLLM 0.25.1 measurement on an H200.

Each test drives a real ``loraroute sim`` process through the sequence the measuring client
used (``bench.sim_calibration``; the sequences are in ``tests/fixtures/vllm-0.25-real/README.md``)
and compares the simulator's ground truth (simulated seconds) with the medians the real server
produced, read from the committed summary files -- never restated here. ``8b`` (the default) is
the compiled server, ``8b-eager`` the ``--enforce-eager`` one.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.sim_calibration import (
    RANKS, Sim, decode_step_ms, medians, prefill_points, real_decode_steps, real_prefill, stall_trial, stall_trials,
    tier_sequence,
)
from vllm_sim.costs import PROFILES, get_profile


@pytest.fixture(params=sorted(PROFILES))
def profile_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def sims(tmp_path: Path) -> Iterator[list[Sim]]:
    started: list[Sim] = []
    yield started
    for sim in started:
        sim.stop()


def test_tier_costs_reproduce_the_measurement_within_15_percent(sims: list[Sim], tmp_path: Path,
                                                                profile_name: str) -> None:
    real = medians(profile_name)
    sims.append(Sim(tmp_path, profile_name))
    got = {k: statistics.median(v) for k, v in tier_sequence(sims[0]).items()}
    cpu_real, cpu_sim = [], []
    for rank in RANKS:
        # disk tier over a GPU hit: the figure, within 15 % at every rank
        want = real[f"disk_tier_r{rank}"] - real[f"gpu_hit_r{rank}"]
        have = got[f"disk_tier_r{rank}"] - got[f"gpu_hit_r{rank}"]
        assert have == pytest.approx(want, rel=0.15), (rank, have, want)
        # loading is activating: the first use after a load is a GPU hit, in the simulator as on vLLM
        assert got[f"first_use_after_load_r{rank}"] == pytest.approx(got[f"gpu_hit_r{rank}"], abs=1e-6)
        assert abs(real[f"first_use_after_load_r{rank}"] - real[f"gpu_hit_r{rank}"]) < want / 2
        # /v1/load_lora_adapter (a utility call: disk + activation + the call itself) within 25 %
        assert got[f"load_api_r{rank}"] == pytest.approx(real[f"load_api_r{rank}"], rel=0.25), rank
        cpu_real.append(real[f"cpu_tier_r{rank}"] - real[f"gpu_hit_r{rank}"])
        cpu_sim.append(got[f"cpu_tier_r{rank}"] - got[f"gpu_hit_r{rank}"])
    # the CPU tier is ~ +10 ms (the measured per-rank extras are noisy: -5 ... +18 ms)
    assert statistics.mean(cpu_sim) == pytest.approx(statistics.mean(cpu_real), abs=5.0)
    # the engine's first LoRA request: ~0.1 s compiled, ~3.7 s eager (Triton JIT of the LoRA kernels)
    assert got["static_first_use_tc"] == pytest.approx(real["static_first_use_tc"], rel=0.15)


def test_prefill_and_decode_steps_follow_the_512_token_cliff(sims: list[Sim], tmp_path: Path,
                                                             profile_name: str) -> None:
    sims.append(Sim(tmp_path, profile_name))
    want = real_prefill(profile_name)
    have = prefill_points(sims[0], list(want))
    for key, ms in want.items():
        assert have[key] == pytest.approx(ms, rel=0.15), (key, have[key], ms)
    if profile_name == "8b":  # the cliff itself: crossing 512 tokens costs ~30 ms base, ~75 ms with an adapter
        for model, jump in (("base", 25.0), ("ta", 60.0)):
            assert have[(524, model)] - have[(512, model)] > jump
    real_steps = real_decode_steps(profile_name)
    for model in ("base", "x0"):  # batch-1 decode step; with an adapter ~ +50 %
        assert decode_step_ms(sims[0], model) == pytest.approx(real_steps[model], rel=0.05), model
    # the pod says which profile it runs and what a scorer should learn on it
    shown = sims[0].http.get("/sim/profile").json()
    profile = get_profile(profile_name)
    assert shown["profile"] == profile_name and shown["constants"] == profile.to_dict()
    assert shown["truth"]["disk_load_s"] == {str(r): v for r, v in profile.truth().disk_load_s.items()}


def test_a_disk_load_stalls_a_running_stream_as_measured(sims: list[Sim], tmp_path: Path, profile_name: str) -> None:
    """Stream X (``x0``, rank 16) runs; after its 100th token a request for a disk-tier rank-64
    adapter arrives: X's longest gap is that load, as on the real server."""
    sims.append(Sim(tmp_path, profile_name, time_scale=0.05))
    trial = stall_trial(sims[0])
    assert trial["trigger_tier"] == "disk"
    # the real client read 2 tokens per chunk: its longest gap is the stall step plus one normal step
    want = statistics.median(max_gap - gap / 2 for gap, max_gap in stall_trials(profile_name))
    assert trial["max_gap_ms"] == pytest.approx(want, rel=0.15), (trial, want)
    assert trial["max_gap_ms"] > 1000 * sims[0].profile.tier_extra_s("disk", 64)  # the whole load, felt by X
