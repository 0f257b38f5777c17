"""Pod discovery: which pods exist and where to reach them.

A ``Discovery`` keeps a current mapping ``{pod_id: Endpoint}`` and tells listeners when it
changes. Implementations:

- ``StaticDiscovery``: the ``discovery.static`` list of the config (replaceable on reload).
- ``StoreDiscovery``: every pod that has a PodState in the state store (sidecars registering
  themselves); the endpoint comes from the PodState's ``url`` / ``sidecar_url``.
- ``gateway.discovery_k8s.KubernetesDiscovery``: pods found through the Kubernetes API.

Contract for implementers: ``endpoints()`` is local and cheap (no I/O; it is read when the
routable set is rebuilt); listeners are called on the event loop with the new full mapping,
must not block, and are called only when the mapping actually changed. ``start()`` fills the
first mapping before returning (or raises); ``close()`` is idempotent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol, runtime_checkable

from podstate.store import PodStateStore
from scorer.model import PodState


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where one pod answers: its vLLM (OpenAI) base URL and, if any, its sidecar's base URL.
    URLs carry no trailing slash."""

    url: str
    sidecar_url: str | None = None


EndpointListener = Callable[[Mapping[str, Endpoint]], None]


@runtime_checkable
class Discovery(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def endpoints(self) -> Mapping[str, Endpoint]: ...

    def add_listener(self, listener: EndpointListener) -> None: ...


class _Listeners:
    def __init__(self) -> None:
        self._listeners: list[EndpointListener] = []
        self._current: dict[str, Endpoint] = {}

    def add_listener(self, listener: EndpointListener) -> None:
        self._listeners.append(listener)

    def endpoints(self) -> Mapping[str, Endpoint]:
        return MappingProxyType(self._current)

    def _set(self, new: dict[str, Endpoint]) -> None:
        if new == self._current:
            return
        self._current = new
        view = MappingProxyType(new)
        for listener in list(self._listeners):
            listener(view)


class StaticDiscovery(_Listeners):
    """A fixed list of pods: ``StaticDiscovery([(pod_id, url, sidecar_url | None), ...])``."""

    def __init__(self, pods: Iterable[tuple[str, str, str | None]] = ()) -> None:
        super().__init__()
        self._current = {pid: Endpoint(url.rstrip("/"), sc.rstrip("/") if sc else None) for pid, url, sc in pods}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def update(self, pods: Iterable[tuple[str, str, str | None]]) -> None:
        """Replace the list (config reload); listeners hear about it if anything changed."""
        self._set({pid: Endpoint(url.rstrip("/"), sc.rstrip("/") if sc else None) for pid, url, sc in pods})


class StoreDiscovery(_Listeners):
    """Pods are whatever has a PodState in ``store`` (which the caller starts and closes)."""

    def __init__(self, store: PodStateStore) -> None:
        super().__init__()
        self._store = store
        self._started = False

    async def start(self) -> None:
        if not self._started:
            self._started = True
            self._store.add_listener(self._on_state)
            self._rebuild()

    async def close(self) -> None:
        return None

    def _on_state(self, pod_id: str, state: PodState | None) -> None:
        if state is None:
            if pod_id in self._current:
                new = dict(self._current)
                del new[pod_id]
                self._set(new)
            return
        ep = self._current.get(pod_id)
        if ep is None or ep.url != state.url or ep.sidecar_url != state.sidecar_url:
            new = dict(self._current)
            new[pod_id] = Endpoint(state.url.rstrip("/"), state.sidecar_url.rstrip("/") if state.sidecar_url else None)
            self._set(new)

    def _rebuild(self) -> None:
        self._set(
            {
                pid: Endpoint(s.url.rstrip("/"), s.sidecar_url.rstrip("/") if s.sidecar_url else None)
                for pid, s in self._store.view().items()
            }
        )
