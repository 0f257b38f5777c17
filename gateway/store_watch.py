"""Serving through a pod-state store outage: route on the last view, for a bounded time.

The store (Redis) is how sidecars tell gateways what each pod holds; it is not on the request
path, so losing it must not stop the serving. What would stop it is freshness: the
``healthy-fresh`` filter drops a pod whose state is older than ``max_age_s`` (2 s), and during an
outage every state ages. So the pipeline judges freshness against the *store's* clock: the time
it last showed a sign of life (``PodStateStore.last_contact``: a message or a successful read),

    reference(now) = now                      while the store is in contact (or in-process)
                   = last contact             while it is not, for at most outage.max_stale_s
                   = now                      after that (the view has become too old to trust)

(precisely ``min(now, last contact)`` within the bound). The clock stays at the last contact
before the outage until ``RECOVERY_S`` after the store is back: a Redis that restarted holds no
state, the view still holds the states of before the outage, and the sidecars republish only
once they have reconnected themselves (their backoff is at most 2 s) — a reference jumping to
``now`` at once would age every pod of the view out together. A sidecar that dies while the store is
up stops publishing while others do, so its pod still ages out; while the store is down nothing
ages, and a pod that really dies is caught by its refused connections (``Suspects``, held for
``outage.suspect_s`` meanwhile) — or, with ``outage.poll_pods``, by polling: the gateway then
runs a ``PodMonitor`` per pod of the last view (what the embedded mode runs), and their states,
fresh and with real health, replace the frozen ones until the store is back.

``StoreWatch`` checks ``store.reachable`` every ``CHECK_S`` and logs entering and leaving the
degraded mode; ``degraded`` / ``note()`` feed ``x-loraroute-explain``, ``/admin/pods`` and the
``loraroute_store_*`` series (its own collector): ``loraroute_store_degraded`` (1 while routing on
the last view), ``loraroute_store_outages_total``, ``loraroute_store_contact_age_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.config import StoreOutageConfig
from podstate.background import Background
from podstate.memory import MemoryStore
from podstate.monitor import MonitorSettings, PodMonitor
from podstate.store import PodStateStore
from scorer.model import PodState

log = logging.getLogger("loraroute.gateway")

CHECK_S = 0.2
"""Seconds between two looks at the store's reachability."""

RECOVERY_S = 3.0
"""Seconds after the store is back during which the view is still judged against the last
contact before the outage (the sidecars' reconnect backoff is at most 2 s; they then republish
at once)."""


class StoreWatch(Background):
    """See the module docstring. ``settings()`` returns the current ``store.outage`` section (it
    is hot-reloadable); ``pods()`` the pods to poll (pod id -> last known state), polled with
    ``monitor_settings(last state)``; ``on_polled`` receives each polled state (None when
    polling stops: the store's view applies again)."""

    def __init__(
        self,
        store: PodStateStore,
        settings: Callable[[], StoreOutageConfig],
        pods: Callable[[], Mapping[str, PodState]],
        on_polled: Callable[[str, PodState | None], None],
        monitor_settings: Callable[[PodState], MonitorSettings],
    ) -> None:
        self.store = store
        self._settings = settings
        self._pods = pods
        self._on_polled = on_polled
        self._monitor_settings = monitor_settings
        self.degraded_since: float | None = None  # Unix time the store was found unreachable
        self.outages = 0
        # the last contact before the current (or just ended) outage, and until when it holds
        self._held: float | None = None
        self._held_until = 0.0
        self._poll_store: MemoryStore | None = None
        self._monitors: dict[str, PodMonitor] = {}

    # --- the hot path ------------------------------------------------------------------------
    def reference(self, now: float) -> float:
        """The time pod states are judged fresh against (see the module docstring)."""
        contact = self.store.last_contact()
        held = self._held
        if held is not None and contact is not None and (self.degraded_since is not None or now < self._held_until):
            contact = min(contact, held)
        if contact is None or contact >= now or now - contact > self._settings().max_stale_s:
            return now
        return contact

    @property
    def degraded(self) -> bool:
        return self.degraded_since is not None

    @property
    def polling(self) -> bool:
        return self._poll_store is not None

    def note(self, now: float) -> str | None:
        """One line for a decision made while degraded (None otherwise)."""
        if self.degraded_since is None:
            return None
        contact = self.store.last_contact() or self.degraded_since
        mode = "polling the pods" if self.polling else "on the last view"
        if now - contact > self._settings().max_stale_s:
            return (f"the state store has been unreachable for {now - contact:.1f}s, longer than "
                    f"store.outage.max_stale_s ({self._settings().max_stale_s:g}s): states count as stale")
        return f"the state store has been unreachable for {now - contact:.1f}s: routing {mode}"

    def describe(self, now: float) -> dict[str, object]:
        """For ``GET /admin/pods``."""
        contact = self.store.last_contact()
        return {
            "reachable": self.store.reachable,
            "degraded": self.degraded,
            "degraded_since": round(self.degraded_since, 3) if self.degraded_since else None,
            "contact_age_s": round(now - contact, 3) if contact else None,
            "mode": ("polling" if self.polling else "last-view") if self.degraded else "live",
            "max_stale_s": self._settings().max_stale_s,
            "outages": self.outages,
            "note": self.note(now),
        }

    def suspect_hold_s(self, normal_s: float) -> float:
        """How long a pod that refused a connection is tried last: longer while the store is
        down (no state will say it is back)."""
        return self._settings().suspect_s if self.degraded and not self.polling else normal_s

    # --- the watch (``Background``: ``start()``, ``close()``) ------------------------------------
    task_name = "store-watch"

    async def close(self) -> None:
        await super().close()
        await self._stop_polling()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(CHECK_S)
            try:
                await self.check()
            except Exception:  # the watch must outlive any one bad look
                log.exception("store watch failed")

    async def check(self) -> None:
        """One look at the store: enter or leave the degraded mode, start or stop polling."""
        reachable = self.store.reachable
        now = time.time()
        if not reachable and self.degraded_since is None:
            self.degraded_since = now
            self.outages += 1
            contact = self.store.last_contact()
            self._held = contact
            log.warning("state store unreachable (last contact %.1fs ago): routing on the last view of %d pod(s) "
                        "for at most %gs%s", now - contact if contact else 0.0, len(self._pods()),
                        self._settings().max_stale_s, "; polling the pods meanwhile" if self._settings().poll_pods else "")
        elif reachable and self.degraded_since is not None:
            log.info("state store reachable again after %.1fs; routing on its live view (states of before the "
                     "outage count as fresh for %gs more, until their sidecars republish)", now - self.degraded_since,
                     RECOVERY_S)
            self.degraded_since = None
            self._held_until = now + RECOVERY_S
        elif reachable and self._held is not None and now >= self._held_until:
            self._held = None
        want_polling = self.degraded and self._settings().poll_pods
        if want_polling and not self.polling:
            await self._start_polling()
        elif self.polling and not want_polling:
            await self._stop_polling()

    async def _start_polling(self) -> None:
        store = self._poll_store = MemoryStore()
        await store.start()
        store.add_listener(self._polled)
        for pod_id, state in self._pods().items():
            monitor = PodMonitor(pod_id, state.url, store, self._monitor_settings(state), sidecar_url=state.sidecar_url)
            self._monitors[pod_id] = monitor
            await monitor.start()
        log.info("polling %d pod(s) directly while the state store is unreachable", len(self._monitors))

    def _polled(self, pod_id: str, state: PodState | None) -> None:
        if state is not None and self._poll_store is not None:
            self._on_polled(pod_id, state)

    async def _stop_polling(self) -> None:
        monitors, self._monitors = self._monitors, {}
        for monitor in monitors.values():
            with contextlib.suppress(Exception):
                await monitor.close()
        store, self._poll_store = self._poll_store, None
        if store is not None:
            await store.close()
            for pod_id in monitors:
                self._on_polled(pod_id, None)


class StoreCollector(Collector):
    """The ``loraroute_store_*`` series of one ``StoreWatch``."""

    def __init__(self, watch: StoreWatch) -> None:
        self._watch = watch

    def collect(self) -> Iterable[Metric]:
        watch = self._watch
        degraded = GaugeMetricFamily("loraroute_store_degraded",
                                     "1 while the state store is unreachable and the gateway routes on its last view")
        degraded.add_metric([], 1.0 if watch.degraded else 0.0)
        outages = CounterMetricFamily("loraroute_store_outages", "Times the state store was found unreachable")
        outages.add_metric([], float(watch.outages))
        age = GaugeMetricFamily("loraroute_store_contact_age_seconds",
                                "Seconds since the state store last showed a sign of life (0 in-process)")
        contact = watch.store.last_contact()
        age.add_metric([], max(0.0, time.time() - contact) if contact else 0.0)
        return [degraded, outages, age]
