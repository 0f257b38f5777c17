"""The attempts waiting on pods, so that news about a pod (or the gateway) reaches them at once.

``Inflight`` holds one ``AbortSignal`` per attempt in progress, by pod (``gateway.forward``
registers and removes them). Two kinds of news end or shorten them:

- ``pod_unhealthy(pod_id, idle_s)``: the pod's monitor marked it unhealthy, or it left the view.
  An attempt that has not received its first byte fails with ``PodUnhealthy`` — nothing reached
  the client, so the attempt loop moves it to the next pod at once instead of letting it wait
  out its first-byte limit; a stream already under way may stay silent for at most ``idle_s``
  more (``timeouts.idle_unhealthy_s``) before it ends with the error event (a monitor may mark
  a busy pod unhealthy for a moment; a stream that keeps flowing is left alone).
- ``abort_all(failure)``: every attempt ends with ``failure(pod_id)`` (the drain deadline).

Registering costs a set insertion per attempt; the news walks only the attempts of one pod.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.failures import PodUnhealthy, UpstreamFailure
from gateway.upstream import AbortSignal


class Inflight:
    def __init__(self) -> None:
        self._by_pod: dict[str, set[AbortSignal]] = {}

    def add(self, signal: AbortSignal) -> None:
        pod = self._by_pod.get(signal.pod_id)
        if pod is None:
            pod = self._by_pod[signal.pod_id] = set()
        pod.add(signal)

    def discard(self, signal: AbortSignal) -> None:
        pod = self._by_pod.get(signal.pod_id)
        if pod is not None:
            pod.discard(signal)
            if not pod:
                del self._by_pod[signal.pod_id]

    def __len__(self) -> int:
        return sum(len(s) for s in self._by_pod.values())

    def pod_unhealthy(self, pod_id: str, idle_s: float) -> int:
        """See the module docstring; returns how many attempts were moved to another pod."""
        moved = 0
        for signal in list(self._by_pod.get(pod_id, ())):
            if signal.started:
                signal.set_idle(idle_s)
            else:
                signal.abort(PodUnhealthy(pod_id))
                moved += 1
        return moved

    def abort_all(self, failure: Callable[[str], UpstreamFailure]) -> int:
        """End every attempt with ``failure(pod_id)``; returns how many there were."""
        signals = [s for pod in self._by_pod.values() for s in pod]
        for signal in signals:
            signal.abort(failure(signal.pod_id))
        return len(signals)
