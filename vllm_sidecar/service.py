"""The sidecar's parts wired together: state store, pod monitor (the publisher), adapter store,
vLLM loader and metrics. ``await Sidecar.open(settings)`` builds it complete and started (the
CLI does); the HTTP app (``vllm_sidecar.app``) only calls its methods.

``ensure(name, load)``: the adapter is marked ``loading`` in PodState while it is fetched and
loaded, made present on disk (``AdapterStore.ensure``), then — when ``load`` — loaded into
vLLM at ``<vllm_adapter_dir>/<name>`` and reported to the monitor, so the next PodState shows it
on GPU without waiting for a scrape. An adapter already registered in vLLM and estimated on GPU
is not loaded again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp

import podstate
from podstate.monitor import MonitorSettings, PodMonitor
from podstate.store import PodStateStore
from vllm_sidecar.adapter_store import AdapterStore
from vllm_sidecar.errors import SidecarError
from vllm_sidecar.loader import VllmLoader
from vllm_sidecar.metrics import SidecarMetrics
from vllm_sidecar.settings import SidecarSettings, store_password
from vllm_sidecar.sources import AdapterSource, LocalSource, S3Source
from vllm_sidecar.validation import validate_name

log = logging.getLogger("loraroute.sidecar")


def build_source(settings: SidecarSettings) -> tuple[AdapterSource, str]:
    """The configured adapter source and its layout."""
    if settings.source.type == "s3":
        return S3Source(settings.source.s3), settings.source.s3.layout
    return LocalSource(settings.source.local.path), settings.source.local.layout


class Sidecar:
    """One sidecar beside one vLLM pod: ``await Sidecar.open(settings)`` builds every part and
    starts it; ``close()``; ``ensure()``; ``adapters()``; ``snapshot()``."""

    def __init__(
        self, settings: SidecarSettings, store: PodStateStore, session: aiohttp.ClientSession, *, own_store: bool
    ) -> None:
        """Wire the parts around a store and an HTTP session (nothing is started here)."""
        self.settings = s = settings
        self.store = store
        self._own_store = own_store
        self.session = session
        self.started_at = time.time()
        self.loader = VllmLoader(s.vllm_url, session)
        source, layout = build_source(s)
        self.adapter_store = AdapterStore(
            s.adapter_dir, source, layout=layout, base_key=s.base_key, max_lora_rank=s.max_lora_rank,
            base_model=s.base_model, max_adapter_bytes=s.max_adapter_bytes, disk_budget_bytes=s.disk_budget_bytes,
            in_use=self._in_use, before_evict=self._before_evict, on_download=self._on_download,
        )
        self.monitor = PodMonitor(
            s.pod_id, s.vllm_url, store,
            MonitorSettings(interval_s=s.poll_interval_s, ttl_s=s.ttl_s, heartbeat_s=s.heartbeat_s,
                            max_loras=s.max_loras, max_cpu_loras=s.max_cpu_loras, max_lora_rank=s.max_lora_rank),
            advertise_url=s.advertise_url, sidecar_url=s.public_sidecar_url, disk=self.adapter_store,
            session=session,
        )
        self.metrics = SidecarMetrics(self.snapshot)  # last: registering it reads a snapshot
        self._touch_task: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------------------
    @classmethod
    async def open(cls, settings: SidecarSettings, *, store: PodStateStore | None = None) -> Sidecar:
        """A started sidecar: the state store (``store.url`` unless one is given; a given store is
        started and closed by its owner), the pod monitor publishing PodState, the disk-LRU touch."""
        own_store = store is None
        if store is None:
            store = podstate.open_store(settings.store.url, key_prefix=settings.store.key_prefix, reader=False,
                                        password=store_password(settings))
            await store.start()
        sidecar = cls(settings, store, aiohttp.ClientSession(), own_store=own_store)
        await sidecar.monitor.start()
        sidecar._touch_task = asyncio.create_task(sidecar._touch_forever(), name="sidecar-touch")
        log.info("sidecar for pod %s watching %s; adapters in %s from %s", settings.pod_id, settings.vllm_url,
                 settings.adapter_dir, sidecar.adapter_store.source.describe())
        if settings.store.url.startswith("memory:") and own_store:
            log.info("state store is memory://: PodState stays inside this process; use store.url "
                     "redis://host:port/db so gateways see this pod")
        return sidecar

    async def close(self) -> None:
        if self._touch_task is not None:
            self._touch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._touch_task
            self._touch_task = None
        await self.monitor.close()
        await self.session.close()
        if self._own_store:
            await self.store.close()

    async def _touch_forever(self) -> None:
        """Adapters in use on the pod count as used for the disk LRU."""
        while True:
            await asyncio.sleep(1.0)
            self.adapter_store.touch(self._in_use())

    def _in_use(self) -> set[str]:
        state = self.monitor.state
        if state is None:
            return set()
        return set(state.gpu_adapters) | set(state.running_adapters) | set(state.loading_adapters)

    def _on_download(self, seconds: float, nbytes: int) -> None:
        self.metrics.fetch_seconds.labels(self.adapter_store.source.kind).observe(seconds)
        self.metrics.fetched_bytes.inc(nbytes)

    async def _before_evict(self, name: str) -> None:
        """An adapter leaving the disk must not stay registered in vLLM under a dead path."""
        monitor = self.monitor
        if monitor.models is not None and name in monitor.models.adapters:
            if await self.loader.unload(name):
                monitor.note_unloaded(name)

    # --- operations -----------------------------------------------------------------------------
    def vllm_path(self, name: str) -> str:
        if self.settings.vllm_adapter_dir:
            return str(Path(self.settings.vllm_adapter_dir) / name)
        return str(Path(self.settings.adapter_dir).resolve() / name)

    async def ensure(self, name: str, load: bool | None = None) -> dict[str, Any]:
        """Make ``name`` present (and loaded when ``load``); raises ``SidecarError`` subclasses."""
        load = self.settings.load_on_ensure if load is None else load
        started = time.monotonic()
        monitor = self.monitor
        noted = False
        try:
            validate_name(name)
            monitor.note_loading(name)
            noted = True
            result = await self.adapter_store.ensure(name)
            self.metrics.ensure_total.labels(result.source).inc()
            loaded = False
            if load:
                registered = monitor.models is not None and name in monitor.models.adapters
                state = monitor.state
                if registered and state is not None and name in state.gpu_adapters:
                    loaded = True
                else:
                    t0 = time.monotonic()
                    await self.loader.load(name, self.vllm_path(name))
                    self.metrics.load_seconds.observe(time.monotonic() - t0)
                    monitor.note_loaded(name, result.info.rank)
                    loaded = True
            if not loaded:
                monitor.note_not_loading(name)
            return {
                "adapter": name,
                "path": self.vllm_path(name),
                "source": result.source,
                "seconds": round(time.monotonic() - started, 6),
                "loaded": loaded,
                "rank": result.info.rank,
                "size_bytes": result.info.size_bytes,
            }
        except SidecarError as exc:
            if noted:
                monitor.note_not_loading(name)
            self.metrics.ensure_total.labels("failed").inc()
            self.metrics.failures_total.labels(exc.code).inc()
            log.warning("ensure %r failed (%s): %s", name, exc.code, exc.message)
            raise

    def adapters(self) -> list[dict[str, Any]]:
        """Local adapters with size, rank, last use and where the estimator thinks they are."""
        state = self.monitor.state
        gpu = set(state.gpu_adapters) if state else set()
        cpu = set(state.cpu_adapters) if state else set()
        registered = set(self.monitor.models.adapters) if self.monitor.models else set()
        return [
            {
                "adapter": a.name,
                "path": self.vllm_path(a.name),
                "size_bytes": a.size_bytes,
                "rank": a.rank,
                "last_used": round(a.last_used, 3),
                "on_gpu": a.name in gpu,
                "in_cpu": a.name in cpu,
                "registered": a.name in registered,
            }
            for a in self.adapter_store.local()
        ]

    def snapshot(self) -> dict[str, Any]:
        """Numbers for /metrics and /healthz."""
        state = self.monitor.state
        store = self.adapter_store
        return {
            "disk_bytes": store.disk_bytes(),
            "disk_budget_bytes": self.settings.disk_budget_bytes,
            "disk_adapters": len(store.names()),
            "evictions": store.evictions,
            "residency_exact": 1 if state is not None and state.residency_source == "exact" else 0,
            "vllm_healthy": 1 if state is not None and state.healthy else 0,
            "gpu": list(state.gpu_adapters) if state else [],
            "cpu": list(state.cpu_adapters) if state else [],
            "scrapes": self.monitor.scrapes,
            "scrape_failures": self.monitor.scrape_failures,
        }
