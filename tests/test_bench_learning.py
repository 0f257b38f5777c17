"""The learning benchmark's comparison with the true constants (bench/learning.py)."""

from __future__ import annotations

import pytest

from bench.learning import RANKS, errors


def _constants(base: float, lora: float, cliff: float, cliff_lora: float) -> dict:
    return {"base_s": base, "lora_s": lora, "cliff_s": cliff, "cliff_lora_s": cliff_lora,
            "prefill_s_per_token": 3e-5, "cpu_load_s": 0.01,
            "disk_s_by_rank": {str(r): 0.02 + 0.001 * r for r in RANKS}}


def test_a_different_split_of_an_unidentified_sum_is_no_error_of_the_sum() -> None:
    truth = _constants(0.0135, 0.0038, 0.0127, 0.0352)
    learned = _constants(0.0100, 0.0073, 0.0300, 0.0179)   # same sums, other parts
    err = errors(learned, truth)
    assert err["adapter_fixed_s"] == pytest.approx(0.0, abs=1e-9)
    assert err["adapter_cliff_s"] == pytest.approx(0.0, abs=1e-9)
    assert err["base_s"] == pytest.approx(0.0100 / 0.0135 - 1)
    assert err["disk_64"] == pytest.approx(0.0)


def test_an_inflated_fixed_cost_shows_in_the_sum() -> None:
    truth = _constants(0.0135, 0.0038, 0.0127, 0.0352)
    learned = _constants(0.0135 + 0.01, 0.0038 + 0.01, 0.0127, 0.0352)
    assert errors(learned, truth)["adapter_fixed_s"] == pytest.approx(0.02 / 0.0173)
