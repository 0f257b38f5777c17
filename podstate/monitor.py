"""Watch one vLLM pod and publish its PodState: the loop shared by the sidecar and the gateway.

Every ``interval_s`` (default 0.05 s) ``PodMonitor`` fetches ``/metrics`` and ``/v1/models``
concurrently (each with a ``request_timeout_s`` = 0.45 s limit; every knob is a field of
``MonitorSettings``), parses them
(``podstate.vllm_metrics``), feeds the residency estimator (``podstate.residency``) and builds a
``PodState``. It publishes to the store when the content changed (at once) and otherwise as a
heartbeat every ``heartbeat_s`` (default 1 s), always with ``ttl_s`` (default 3 s).

Health: a refused connection marks the pod unhealthy at once; any other failure does when the
last successful scrape is older than ``unhealthy_after_s`` (0.6 s), so one slow scrape of a busy
pod is not an outage. With the defaults a pod that stops answering is published
``healthy=False`` within a second (at once when the connection is refused); ``observed_at`` keeps the
time of the last good scrape.

Residency: when the server exposes ``vllm:lora_adapter_loaded`` the tiers are exact
(``residency_source="exact"``); otherwise they are estimated from adapters newly listed in
``/v1/models`` (a load), names dropped from it (an unload), names in every
``lora_requests_info`` series whose timestamp is newer than the previous scrape's newest (each
was the in-flight set at some moment since then, so requests shorter than the poll interval still
count; on a first scrape only the newest series counts, the others being history of unknown age;
after a scrape that showed no series, every series is news), and the caller's own
``note_loaded`` calls. A change
of ``process_start_time_seconds``, or a cumulative counter going backwards (vLLM restarted),
resets the estimate.

``vllm_url`` is what this process polls; ``advertise_url`` (default: the same) is the URL
published in PodState for the gateway (they differ when the sidecar reaches vLLM over loopback).

Engine limits vLLM does not expose (``max_cpu_loras``, ``max_lora_rank``) come from the
settings; ``max_loras`` falls back to the ``max_lora`` label of ``lora_requests_info``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from podstate.residency import ResidencyEstimator
from podstate.store import PodStateStore
from podstate.vllm_metrics import MetricsParseError, VllmMetrics, VllmModels, parse_metrics, parse_models
from scorer.model import PodState

log = logging.getLogger("loraroute.podstate.monitor")


@dataclass(frozen=True, slots=True)
class MonitorSettings:
    """How a ``PodMonitor`` polls one pod and publishes its state.

    ``interval_s`` between scrapes; ``request_timeout_s`` per scrape of ``/metrics`` or
    ``/v1/models``; ``unhealthy_after_s`` without a good scrape marks the pod unhealthy (a refused
    connection does at once); ``ttl_s`` of each published record and ``heartbeat_s`` between
    unchanged ones; the engine limits vLLM does not expose (``max_loras`` falls back to the
    ``max_lora`` label of ``lora_requests_info``, ``max_cpu_loras`` to ``max_loras``,
    ``max_lora_rank``); ``withdraw_on_close`` removes the pod from the store at once on close;
    ``lora_warmup``: the pod is published ``lora_ready=False`` until ``note_lora_ready()`` (the
    sidecar's warm-up request) and again after every vLLM restart.
    """

    interval_s: float = 0.05
    ttl_s: float = 3.0
    heartbeat_s: float = 1.0
    request_timeout_s: float = 0.45
    unhealthy_after_s: float = 0.6
    max_loras: int | None = None
    max_cpu_loras: int | None = None
    max_lora_rank: int = 16
    withdraw_on_close: bool = True
    lora_warmup: bool = False


class DiskAdapters(Protocol):
    """The adapters on the pod's local disk (the sidecar's adapter store)."""

    def names(self) -> Iterable[str]: ...

    def ranks(self) -> Mapping[str, int]: ...


class PodMonitor:
    """Poll one vLLM pod, estimate its adapter residency, publish PodState to ``store``.

    ``advertise_url`` / ``sidecar_url`` are published for the gateway; ``disk`` lists the pod's
    local adapters (none without one); ``session`` is shared HTTP (one of its own without);
    ``estimator`` replaces the default ``ResidencyEstimator``.
    """

    def __init__(
        self,
        pod_id: str,
        vllm_url: str,
        store: PodStateStore,
        settings: MonitorSettings = MonitorSettings(),
        *,
        advertise_url: str | None = None,
        sidecar_url: str | None = None,
        disk: DiskAdapters | None = None,
        session: aiohttp.ClientSession | None = None,
        estimator: ResidencyEstimator | None = None,
    ) -> None:
        self.pod_id = pod_id
        self.vllm_url = vllm_url.rstrip("/")
        self.advertise_url = (advertise_url or vllm_url).rstrip("/")
        self.store = store
        self.settings = settings
        self.sidecar_url = sidecar_url
        self._disk = disk
        self._session = session
        self._own_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=settings.request_timeout_s)

        self.estimator = estimator or ResidencyEstimator(settings.max_loras or 1, settings.max_cpu_loras)
        self.metrics: VllmMetrics | None = None
        self.models: VllmModels | None = None
        self._known_models: set[str] | None = None
        self._last_lora_ts: float | None = None
        self._start_time: float | None = None
        self._loading: set[str] = set()
        self._noted_ranks: dict[str, int] = {}
        self._healthy = False
        self.lora_ready = not settings.lora_warmup
        self._observed_at = 0.0
        self._last_ok_mono: float | None = None
        self._state: PodState | None = None
        self._published: PodState | None = None
        self._last_publish_mono = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.scrape_failures = 0
        self.scrapes = 0
        self.last_error: str = ""

    # --- public API -----------------------------------------------------------------------------
    @property
    def state(self) -> PodState | None:
        """The last PodState built (published or about to be)."""
        return self._state

    async def start(self) -> None:
        if self._task is not None:
            return
        if self._session is None:
            self._session = aiohttp.ClientSession()
        self._task = asyncio.create_task(self._run(), name=f"pod-monitor-{self.pod_id}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.settings.withdraw_on_close:
            with contextlib.suppress(Exception):
                await self.store.withdraw(self.pod_id)
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def note_loading(self, name: str) -> None:
        """A load of ``name`` into vLLM has started (shown as ``loading_adapters``)."""
        self._loading.add(name)
        self._wake.set()

    def note_loaded(self, name: str, rank: int | None = None) -> None:
        """``/v1/load_lora_adapter`` succeeded: vLLM registered and activated ``name``."""
        self._loading.discard(name)
        if rank is not None:
            self._noted_ranks[name] = rank
        self.estimator.observe_load(name)
        if self._known_models is not None:
            self._known_models.add(name)
        self._wake.set()

    def note_lora_ready(self) -> None:
        """A LoRA request has completed on this engine: adapter requests may come (``lora_ready``)."""
        self.lora_ready = True
        self._wake.set()

    def note_not_loading(self, name: str) -> None:
        """A fetch or load of ``name`` ended without loading it (nothing else changes)."""
        self._loading.discard(name)
        self._wake.set()

    def note_unloaded(self, name: str) -> None:
        """``name`` was unloaded, or a load attempt ended without success."""
        self._loading.discard(name)
        if self._known_models is not None and name in self._known_models:
            self._known_models.discard(name)
            self.estimator.observe_unload(name)
        self._wake.set()

    # --- the loop --------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.poll_once()
                await self._publish_if_needed()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad cycle stop the monitor
                log.exception("pod %s: monitor cycle failed", self.pod_id)
            remaining = self.settings.interval_s - (time.monotonic() - started)
            if remaining > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=remaining)
            self._wake.clear()

    async def _get(self, path: str) -> str:
        assert self._session is not None
        async with self._session.get(self.vllm_url + path, timeout=self._timeout) as resp:
            body = await resp.text()
            if resp.status != 200:
                raise aiohttp.ClientResponseError(
                    resp.request_info, (), status=resp.status, message=f"{path} answered {resp.status}"
                )
            return body

    async def poll_once(self) -> bool:
        """Scrape once and update the estimate. Returns True on success."""
        self.scrapes += 1
        try:
            metrics_text, models_text = await asyncio.gather(self._get("/metrics"), self._get("/v1/models"))
            metrics = parse_metrics(metrics_text, lora_since=self._last_lora_ts)
            models = parse_models(models_text)
        except (aiohttp.ClientError, asyncio.TimeoutError, MetricsParseError, OSError) as exc:
            self._on_failure(exc)
            return False
        self._on_success(metrics, models)
        return True

    def _on_failure(self, exc: BaseException) -> None:
        self.scrape_failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        refused = isinstance(exc, aiohttp.ClientConnectorError)
        stale = (self._last_ok_mono is None
                 or time.monotonic() - self._last_ok_mono >= self.settings.unhealthy_after_s)
        if self._healthy and (refused or stale):
            log.warning("pod %s: vLLM at %s not answering (%s); marking unhealthy", self.pod_id,
                        self.vllm_url, type(exc).__name__)
            self._healthy = False

    def _on_success(self, metrics: VllmMetrics, models: VllmModels) -> None:
        est = self.estimator
        previous = self.metrics
        counters_went_back = previous is not None and (
            metrics.prefix_cache_queries < previous.prefix_cache_queries)
        if counters_went_back or (self._start_time is not None and metrics.process_start_time is not None
                                  and metrics.process_start_time != self._start_time):
            log.info("pod %s: vLLM restarted; resetting the residency estimate", self.pod_id)
            est.reset()
            if self.settings.lora_warmup:
                self.lora_ready = False  # a fresh engine: warm it up again
            self._known_models = None
            self._last_lora_ts = None
        self._start_time = metrics.process_start_time
        limits = self.settings
        max_loras = limits.max_loras or (metrics.lora.max_lora if metrics.lora else None) or est.max_loras
        est.set_limits(max_loras, limits.max_cpu_loras or max(max_loras, est.max_cpu_loras))

        if metrics.exact_gpu is not None:
            est.observe_exact(metrics.exact_gpu, metrics.exact_cpu or ())
        else:
            current = set(models.adapters)
            if self._known_models is None:
                for name in models.adapters:  # listed in registration order
                    est.observe_load(name)
            else:
                for name in models.adapters:
                    if name not in self._known_models:
                        est.observe_load(name)
                for name in self._known_models - current:
                    est.observe_unload(name)
            self._known_models = current
            if metrics.lora is not None and metrics.lora.timestamp != self._last_lora_ts:
                # every series updated since the last scrape was the in-flight set at some moment
                # since then (oldest first), so short requests between two scrapes still count
                since = self._last_lora_ts
                for info in metrics.lora_history:
                    if since is None and info is not metrics.lora:
                        continue  # first scrape: only the current set is known to be recent
                    if since is None or info.timestamp > since:
                        est.observe_running(info.running)
                self._last_lora_ts = metrics.lora.timestamp
            elif metrics.lora is None and self._last_lora_ts is None:
                # no series yet (vLLM writes the first one with the first LoRA request): every
                # series a later scrape shows is news, not history of unknown age
                self._last_lora_ts = 0.0
        self._loading -= set(models.adapters) & set(est.gpu)
        if not self._healthy:
            log.info("pod %s: vLLM at %s answering", self.pod_id, self.vllm_url)
        self._healthy = True
        self.metrics, self.models = metrics, models
        self._observed_at = time.time()
        self._last_ok_mono = time.monotonic()

    def _ranks(self) -> dict[str, int]:
        ranks: dict[str, int] = {}
        if self._disk is not None:
            with contextlib.suppress(Exception):
                ranks.update(self._disk.ranks())
        if self.metrics is not None:
            ranks.update(self.metrics.exact_ranks)
        ranks.update(self._noted_ranks)
        return ranks

    def _build_state(self) -> PodState:
        m, est = self.metrics, self.estimator
        disk: tuple[str, ...] = ()
        if self._disk is not None:
            with contextlib.suppress(Exception):
                disk = tuple(sorted(self._disk.names()))
        bases = self.models.base_models if self.models and self.models.base_models else (m.model_names if m else ())
        state = PodState(
            pod_id=self.pod_id,
            url=self.advertise_url,
            sidecar_url=self.sidecar_url,
            base_models=tuple(bases),
            healthy=self._healthy,
            lora_ready=self.lora_ready,
            max_loras=est.max_loras,
            max_cpu_loras=est.max_cpu_loras,
            max_lora_rank=self.settings.max_lora_rank,
            block_size=(m.block_size if m and m.block_size else 16),
            num_gpu_blocks=(m.num_gpu_blocks if m and m.num_gpu_blocks else 0),
            kv_cache_usage=(m.kv_cache_usage if m and m.kv_cache_usage is not None else 0.0),
            num_running=m.num_running if m else 0,
            num_waiting=m.num_waiting if m else 0,
            num_deferred=m.num_deferred if m else 0,
            gpu_adapters=est.gpu,
            cpu_adapters=est.cpu,
            disk_adapters=disk,
            loading_adapters=tuple(sorted(self._loading)),
            running_adapters=(m.lora.running if m and m.lora else ()),
            adapter_ranks=self._ranks(),
            residency_source=est.source,  # type: ignore[arg-type]
            prefix_cache_queries=m.prefix_cache_queries if m else 0.0,
            prefix_cache_hits=m.prefix_cache_hits if m else 0.0,
            observed_at=self._observed_at,
            published_at=time.time(),
        )
        self._state = state
        return state

    async def _publish_if_needed(self) -> None:
        state = self._build_state()
        now = time.monotonic()
        if state.same_content(self._published) and now - self._last_publish_mono < self.settings.heartbeat_s:
            return
        try:
            await self.store.publish(state, self.settings.ttl_s)
        except Exception as exc:  # a store outage must not stop the monitor
            log.warning("pod %s: publishing state failed (%s)", self.pod_id, type(exc).__name__)
            return
        self._published = state
        self._last_publish_mono = now


class MonitorGroup:
    """Run one ``PodMonitor`` per pod with one shared HTTP session (the gateway's static list)."""

    def __init__(
        self,
        pods: Mapping[str, str] | Iterable[tuple[str, str]],
        store: PodStateStore,
        settings: MonitorSettings = MonitorSettings(),
    ) -> None:
        items = pods.items() if isinstance(pods, Mapping) else pods
        self.store = store
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None
        self._pods = dict(items)
        self.monitors: dict[str, PodMonitor] = {}

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        for pod_id, url in self._pods.items():
            monitor = PodMonitor(pod_id, url, self.store, self.settings, session=self._session)
            self.monitors[pod_id] = monitor
            await monitor.start()

    async def close(self) -> None:
        await asyncio.gather(*(m.close() for m in self.monitors.values()), return_exceptions=True)
        self.monitors.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def __getitem__(self, pod_id: str) -> PodMonitor:
        return self.monitors[pod_id]
