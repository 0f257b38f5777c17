"""In-process store: the embedded default (one process holds writers and readers)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from types import MappingProxyType

from podstate.store import PodStateStore
from scorer.model import PodState


class MemoryStore(PodStateStore):
    """A dict with expiry times. Expired records leave the view within ``sweep_interval_s``."""

    def __init__(self, sweep_interval_s: float = 0.25) -> None:
        super().__init__()
        self._states: dict[str, PodState] = {}
        self._expires: dict[str, float] = {}
        self._sweep_interval_s = sweep_interval_s
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="memory-store-sweep")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    async def publish(self, state: PodState, ttl_s: float) -> None:
        self._states[state.pod_id] = state
        self._expires[state.pod_id] = time.monotonic() + ttl_s
        self._notify(state.pod_id, state)

    async def withdraw(self, pod_id: str) -> None:
        self._expires.pop(pod_id, None)
        if self._states.pop(pod_id, None) is not None:
            self._notify(pod_id, None)

    def view(self) -> Mapping[str, PodState]:
        return MappingProxyType(self._states)

    def sweep(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for pod_id in [p for p, t in self._expires.items() if t <= now]:
            self._expires.pop(pod_id, None)
            self._states.pop(pod_id, None)
            self._notify(pod_id, None)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval_s)
            self.sweep()
