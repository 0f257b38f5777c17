"""Pods that just refused a connection or timed out: tried after every other candidate for a while.

The state plane marks a dead pod unhealthy within about a second; ``Suspects`` covers that
second, so only one request pays the failed connect. One instance per gateway (``Gateway.suspects``),
fed by the attempt loop (``gateway.forward``) with the failures whose policy says ``suspect``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

SUSPECT_S = 2.0
"""Seconds a pod that refused a connection or timed out is tried only after every other candidate."""


class Suspects:
    def __init__(self, hold_s: float = SUSPECT_S) -> None:
        self.hold_s = hold_s
        self._until: dict[str, float] = {}  # pod id -> monotonic time it stops being suspect

    def mark(self, pod_id: str, hold_s: float | None = None) -> None:
        """``pod_id`` is tried last for ``hold_s`` seconds (default ``self.hold_s``)."""
        self._until[pod_id] = time.monotonic() + (self.hold_s if hold_s is None else hold_s)

    def order(self, pod_ids: Iterable[str]) -> Iterator[str]:
        """``pod_ids`` in their order, suspects moved to the end (and expired ones forgotten)."""
        until = self._until
        if not until:
            yield from pod_ids
            return
        now = time.monotonic()
        for pod_id in [p for p, t in until.items() if t <= now]:
            del until[pod_id]
        later = []
        for pod_id in pod_ids:
            if pod_id in until:
                later.append(pod_id)
            else:
                yield pod_id
        yield from later
