"""The store interface shared by writers (sidecars, pollers) and readers (gateways)."""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping

from scorer.model import PodState

# Called with (pod_id, new state or None when the pod left the view). Runs on the event loop;
# must not block.
StateListener = Callable[[str, PodState | None], None]


class PodStateStore(abc.ABC):
    """Publish PodState records with a TTL; keep a local, always-readable view of all of them."""

    def __init__(self) -> None:
        self._listeners: list[StateListener] = []

    # --- lifecycle -------------------------------------------------------------------------
    @abc.abstractmethod
    async def start(self) -> None:
        """Connect and fill the local view (readers) / get ready to publish (writers)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop background tasks and release connections. Idempotent."""

    # --- writer side -----------------------------------------------------------------------
    @abc.abstractmethod
    async def publish(self, state: PodState, ttl_s: float) -> None:
        """Store ``state`` for ``ttl_s`` seconds and notify readers."""

    @abc.abstractmethod
    async def withdraw(self, pod_id: str) -> None:
        """Remove a pod at once (clean shutdown of its sidecar)."""

    # --- reader side -----------------------------------------------------------------------
    @abc.abstractmethod
    def view(self) -> Mapping[str, PodState]:
        """The local view, pod id -> state. No I/O; safe to call on every request."""

    def last_contact(self) -> float | None:
        """Unix time the store last showed a sign of life (a message, a successful read); None
        when it cannot be cut off from its writers (in-process memory). A reader judges the
        freshness of the states it holds against this time, not against its own clock: while the
        store is unreachable, the last view does not age (``gateway.store_watch``)."""
        return None

    @property
    def reachable(self) -> bool:
        """False while the store is known to be unreachable (always True in-process)."""
        return True

    def add_listener(self, listener: StateListener) -> None:
        self._listeners.append(listener)

    def _notify(self, pod_id: str, state: PodState | None) -> None:
        for listener in list(self._listeners):
            listener(pod_id, state)
