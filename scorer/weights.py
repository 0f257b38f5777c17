"""The pipeline's weighted sum of its scorers' columns, fused into one generated comprehension."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["weighted_sum"]


def weighted_sum(weights: list[float]) -> Callable[[list[list[float]]], list[float]]:
    """A function cols -> [Σ wᵢ·colᵢ[k] for each k], fused into one comprehension.

    Generated once per pipeline from the (validated, finite, float) weights, so a pick walks
    the candidates once instead of once per scorer. Zero weights are left out of the sum.
    """
    if not weights:
        return lambda cols: []
    terms = [f"{w!r}*x{i}" if w != 1.0 else f"x{i}" for i, w in enumerate(weights) if w != 0.0] or ["0.0"]
    if len(weights) == 1:
        src = f"lambda cols: [{terms[0]} for x0 in cols[0]]"
    else:
        xs = ", ".join(f"x{i}" for i in range(len(weights)))
        src = f"lambda cols: [{' + '.join(terms)} for {xs} in zip(*cols)]"
    for w in weights:  # defence in depth: only plain finite floats reach the generated source
        if not isinstance(w, float) or w != w or w in (float("inf"), float("-inf")):
            raise ValueError(f"invalid weight {w!r}")
    return eval(src, {"__builtins__": {"zip": zip}})  # noqa: S307 - numeric literals only
