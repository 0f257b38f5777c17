"""Prompts this router has just sent, per pod: the blocks a pod will hold before its events say so.

The precise index (``scorer.kv_index``) learns a prompt's blocks when the pod has computed them
and published the batch — a prefill and a publication after the request left the router. A
follow-up of the same conversation, or another conversation of the same system prompt, that comes
in between finds none of those blocks anywhere and is sent where the load scorers say; the
approximate index, which learns at dispatch, keeps it on the pod that is about to hold them. On
the KV-pressure workload that cost the precise index 2 points of prefix hits (docs/benchmarks.md).

``InFlightPrompts`` bridges that gap: ``add`` keeps each dispatched prompt's token ids on its pod
for ``in_flight_s`` (``precise-prefix``'s parameter), and ``matched_blocks`` is the longest
common prefix, in whole blocks, of a new prompt with any of them (same adapter: a block's hash
includes it). ``KVMatch`` counts a live pod as holding max(what its events say, this). Bounded:
``per_pod`` prompts per pod (the oldest dropped first), expired ones dropped as they are met.
Pure data, no clock of its own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

__all__ = ["InFlightPrompts"]


def common_blocks(a: Sequence[int], b: Sequence[int], block_size: int) -> int:
    """Whole blocks of ``block_size`` tokens ``a`` and ``b`` share from the start (a binary search
    over slice comparisons, which run in C)."""
    lo, hi = 0, min(len(a), len(b)) // block_size
    while lo < hi:
        mid = (lo + hi + 1) // 2
        end = mid * block_size
        if a[:end] == b[:end]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class InFlightPrompts:
    def __init__(self, per_pod: int = 64) -> None:
        self.per_pod = per_pod
        self._by_pod: dict[str, deque[tuple[float, str | None, Sequence[int]]]] = {}

    def add(self, pod_id: str, adapter: str | None, token_ids: Sequence[int], until: float) -> None:
        q = self._by_pod.get(pod_id)
        if q is None:
            q = self._by_pod[pod_id] = deque(maxlen=self.per_pod)
        q.append((until, adapter, token_ids))

    def __contains__(self, pod_id: object) -> bool:
        return bool(self._by_pod.get(pod_id))  # type: ignore[call-overload]

    def matched_blocks(self, pod_id: str, adapter: str | None, token_ids: Sequence[int], block_size: int,
                       now: float) -> int:
        q = self._by_pod.get(pod_id)
        if not q:
            return 0
        while q and q[0][0] <= now:  # entries share one TTL, so the oldest expire first
            q.popleft()
        best = 0
        for _until, ad, tokens in q:
            if ad == adapter:
                best = max(best, common_blocks(token_ids, tokens, block_size))
        return best

    def forget(self, pod_id: str) -> None:
        self._by_pod.pop(pod_id, None)

    def __len__(self) -> int:
        return sum(len(q) for q in self._by_pod.values())
