"""The sidecar's parts wired together: state store, pod monitor (the publisher), adapter store,
vLLM loader and metrics. ``await Sidecar.open(settings)`` builds it complete and started (the
CLI does); the HTTP app (``vllm_sidecar.app``) only calls its methods.

With ``kv_events`` set, the sidecar also follows its pod's KV-cache events (``KVEventSubscriber``)
and relays the pod's block set through Redis (``KVBlockRelay``: compact deltas and snapshots
that each gateway replica's ``KVBlockFeed`` applies to its precise prefix index).

``ensure(name, load, version)``: the adapter is marked ``loading`` in PodState while it is
fetched and loaded, made present on disk (``AdapterStore.ensure``; a ``version`` pins which one),
then — when ``load`` — loaded into vLLM at ``<vllm_adapter_dir>/<name>`` and reported to the
monitor, so the next PodState shows it on GPU without waiting for a scrape. An adapter already
registered in vLLM and estimated on GPU or in the CPU cache is not loaded again; one
registered but evicted from both is read again in place (``load_inplace``): vLLM refuses a
plain second load of a registered name and would leave it cold. When the folder was replaced by
another version while vLLM has the adapter registered, the new weights are swapped in with
vLLM's in-place load (same name, same id, no unload).

``refresh(name, version)``: the same for an adapter this pod already holds on disk (a version
roll): fetched, validated, swapped in place; an adapter the pod does not hold is left alone
(``absent``: it will be fetched at the pinned version when a request needs it).

``inspect_store(names)``: whether the store answers (TLS, credentials, endpoint: the failing
layer is named) and what it holds for each name, checked against this pod's limits.

``warm_up()`` (with ``warmup.enabled``, run by the sidecar whenever its engine is fresh: at start
and after each vLLM restart): one LoRA completion of one token on the engine, the adapter
loaded first if vLLM does not have it; until it completes PodState says ``lora_ready: false``
and the gateways send the pod no adapter request (an eager vLLM compiles its LoRA kernels on the
first one, ≈ 3.7 s on a real vLLM 0.25.1).

``demand`` (a ``DemandView``, with a redis:// store): the gateways' shared adapter demand, read
in the background; the disk budget evicts the least demanded adapters first and, with
``demand.prefetch``, the most demanded ones of the pod's base are fetched to disk ahead of their
first load (``vllm_sidecar.demand``).
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
from podstate.kv_events import KVEventSubscriber
from podstate.kv_store import KVBlockRelay
from podstate.monitor import MonitorSettings, PodMonitor
from podstate.placement_store import open_placement_store
from podstate.store import PodStateStore
from vllm_sidecar.adapter_store import AdapterStore, LocalAdapter
from vllm_sidecar.demand import DemandView
from vllm_sidecar.errors import AdapterNotFound, BadRequest, InvalidName, LoadRefused, SidecarError, StoreUnreachable
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
        self.loader = VllmLoader(s.vllm_url, session, timeout_s=s.load_timeout_s)
        source, layout = build_source(s)
        self.adapter_store = AdapterStore(
            s.adapter_dir, source, layout=layout, base_key=s.base_key, max_lora_rank=s.max_lora_rank,
            base_model=s.base_model, max_adapter_bytes=s.max_adapter_bytes, disk_budget_bytes=s.disk_budget_bytes,
            fetch_timeout_s=s.fetch_timeout_s, in_use=self._in_use, before_evict=self._before_evict, on_download=self._on_download,
            eviction_order=self._eviction_order,
        )
        shared = None if s.store.url.startswith("memory:") else open_placement_store(
            s.store.url, key_prefix=s.store.key_prefix, password=store_password(s))
        self.demand = DemandView(s.demand, shared, self.adapter_store, bases=self._bases, in_use=self._in_use)
        self.monitor = PodMonitor(
            s.pod_id, s.vllm_url, store,
            MonitorSettings(interval_s=s.poll_interval_s, ttl_s=s.ttl_s, heartbeat_s=s.heartbeat_s,
                            max_loras=s.max_loras, max_cpu_loras=s.max_cpu_loras, max_lora_rank=s.max_lora_rank,
                            lora_warmup=s.warmup.enabled),
            advertise_url=s.advertise_url, sidecar_url=s.public_sidecar_url, disk=self.adapter_store,
            session=session,
        )
        self.kv_relay: KVBlockRelay | None = None
        self.kv_subscriber: KVEventSubscriber | None = None
        self._kv_client: Any = None
        self.metrics = SidecarMetrics(self.snapshot)  # last: registering it reads a snapshot
        self._touch_task: asyncio.Task[None] | None = None
        self._warmup_task: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------------------
    @classmethod
    async def open(cls, settings: SidecarSettings, *, store: PodStateStore | None = None) -> Sidecar:
        """A started sidecar: the state store (``store.url`` unless one is given; a given store is
        started and closed by its owner), the pod monitor publishing PodState, the disk-LRU touch,
        and the KV-event relay when ``kv_events`` is set."""
        own_store = store is None
        if store is None:
            store = podstate.open_store(settings.store.url, key_prefix=settings.store.key_prefix, reader=False,
                                        password=store_password(settings))
            await store.start()
        sidecar = cls(settings, store, aiohttp.ClientSession(), own_store=own_store)
        await sidecar.monitor.start()
        sidecar._touch_task = asyncio.create_task(sidecar._touch_forever(), name="sidecar-touch")
        if settings.warmup.enabled:
            sidecar._warmup_task = asyncio.create_task(sidecar._warmup_forever(), name="sidecar-warmup")
        if settings.kv_events is not None:
            sidecar._start_kv_relay()
        sidecar.demand.start()
        log.info("sidecar for pod %s watching %s; adapters in %s from %s", settings.pod_id, settings.vllm_url,
                 settings.adapter_dir, sidecar.adapter_store.source.describe())
        if settings.store.url.startswith("memory:") and own_store:
            log.info("state store is memory://: PodState stays inside this process; use store.url "
                     "redis://host:port/db so gateways see this pod")
        return sidecar

    def _start_kv_relay(self) -> None:
        import redis.asyncio as aioredis

        s = self.settings
        kv = s.kv_events
        assert kv is not None
        password = store_password(s)
        self._kv_client = aioredis.Redis.from_url(s.store.url, socket_connect_timeout=1.0, socket_timeout=2.0,
                                                  **({"password": password} if password else {}))
        self.kv_relay = KVBlockRelay(self._kv_client, s.pod_id, key_prefix=s.store.key_prefix,
                                     flush_interval_s=kv.flush_interval_s, snapshot_interval_s=kv.snapshot_interval_s,
                                     ttl_s=max(10.0, 3 * kv.snapshot_interval_s))
        self.kv_relay.start()
        self.kv_subscriber = KVEventSubscriber(s.pod_id, kv.endpoint, self.kv_relay,
                                               replay_endpoint=kv.replay_endpoint, topic=kv.topic)
        self.kv_subscriber.start()
        log.info("relaying KV-cache events of pod %s from %s (replay %s)", s.pod_id, kv.endpoint,
                 kv.replay_endpoint or "off")

    async def close(self) -> None:
        if self.kv_subscriber is not None:
            await self.kv_subscriber.close()
        if self.kv_relay is not None:
            await self.kv_relay.close()
        if self._kv_client is not None:
            with contextlib.suppress(Exception):
                await self._kv_client.aclose()
        for task in (self._touch_task, self._warmup_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._touch_task = self._warmup_task = None
        await self.demand.close()
        await self.monitor.close()
        await self.session.close()
        if self._own_store:
            await self.store.close()

    async def _touch_forever(self) -> None:
        """Adapters in use on the pod count as used for the disk LRU."""
        while True:
            await asyncio.sleep(1.0)
            self.adapter_store.touch(self._in_use())

    async def _warmup_forever(self) -> None:
        """Warm every fresh engine up (``warm_up``) once it answers; see ``WarmupSettings``."""
        cfg = self.settings.warmup
        failures = 0
        while True:
            await asyncio.sleep(cfg.retry_s if failures else 0.2)
            state = self.monitor.state
            if self.monitor.lora_ready or state is None or not state.healthy:
                failures = 0
                continue
            try:
                await self.warm_up()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - a failed warm-up is retried, never fatal
                failures += 1
                if failures >= cfg.attempts:
                    log.warning("LoRA warm-up of pod %s failed %d times (%s); routing adapter requests to it anyway",
                                self.settings.pod_id, failures, exc)
                    self.monitor.note_lora_ready()
                    failures = 0
                else:
                    log.warning("LoRA warm-up of pod %s failed (%s); trying again in %gs", self.settings.pod_id, exc,
                                cfg.retry_s)

    def warmup_adapter(self) -> str | None:
        """The adapter to warm the engine up with: the configured one, else one vLLM has
        registered, else one on the pod's disk; None when there is none."""
        if self.settings.warmup.adapter:
            return self.settings.warmup.adapter
        models = self.monitor.models
        if models is not None and models.adapters:
            return sorted(models.adapters)[0]
        local = self.adapter_store.local()
        return local[-1].name if local else None

    async def warm_up(self) -> float | None:
        """One LoRA request on the engine (loading the adapter first when vLLM does not have
        it), then ``lora_ready``; returns its seconds (None: no adapter to warm up with). Raises
        when the request fails."""
        name = self.warmup_adapter()
        if name is None:
            log.info("pod %s: no adapter to warm the LoRA kernels up with; adapter requests may come",
                     self.settings.pod_id)
            self.monitor.note_lora_ready()
            return None
        models = self.monitor.models
        if models is None or name not in models.adapters:
            await self.ensure(name, load=True)
        started = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=self.settings.warmup.timeout_s)
        async with self.session.post(f"{self.settings.vllm_url}/v1/completions", timeout=timeout,
                                     json={"model": name, "prompt": "warm-up", "max_tokens": 1}) as resp:
            await resp.read()
            if resp.status != 200:
                raise LoadRefused(f"vLLM answered the warm-up request on adapter {name!r} with HTTP {resp.status}")
        seconds = time.monotonic() - started
        log.info("pod %s: LoRA warm-up on adapter %s took %.2fs; adapter requests may come", self.settings.pod_id,
                 name, seconds)
        self.monitor.note_lora_ready()
        return seconds

    def _in_use(self) -> set[str]:
        state = self.monitor.state
        if state is None:
            return set()
        return set(state.gpu_adapters) | set(state.running_adapters) | set(state.loading_adapters)

    def _bases(self) -> set[str]:
        """The base names the gateways count this pod's demand under: what vLLM serves, and the
        configured names (before vLLM has answered)."""
        state = self.monitor.state
        names = set(state.base_models) if state is not None else set()
        return names | {n for n in (self.settings.served_model_name, self.settings.base_model) if n}

    def _eviction_order(self, local: list[LocalAdapter]) -> list[LocalAdapter]:
        return self.demand.eviction_order(local)

    def _on_download(self, seconds: float, nbytes: int) -> None:
        self.metrics.fetch_seconds.labels(self.adapter_store.source.kind).observe(seconds)
        self.metrics.fetched_bytes.inc(nbytes)

    async def _before_evict(self, name: str) -> None:
        """An adapter leaving the disk must not stay registered in vLLM under a dead path."""
        self.demand.note_evicted(name)
        monitor = self.monitor
        if monitor.models is not None and name in monitor.models.adapters:
            if await self.loader.unload(name):
                monitor.note_unloaded(name)

    # --- operations -----------------------------------------------------------------------------
    def vllm_path(self, name: str) -> str:
        if self.settings.vllm_adapter_dir:
            return str(Path(self.settings.vllm_adapter_dir) / name)
        return str(Path(self.settings.adapter_dir).resolve() / name)

    async def ensure(self, name: str, load: bool | None = None, version: str | None = None, *,
                     latest: bool = False) -> dict[str, Any]:
        """Make ``name`` present (and loaded when ``load``); raises ``SidecarError`` subclasses."""
        load = self.settings.load_on_ensure if load is None else load
        started = time.monotonic()
        monitor = self.monitor
        noted = False
        try:
            validate_name(name)
            monitor.note_loading(name)
            noted = True
            result = await self.adapter_store.ensure(name, version, latest=latest)
            self.metrics.ensure_total.labels(result.source).inc()
            loaded = reloaded = False
            load_seconds = 0.0
            registered = monitor.models is not None and name in monitor.models.adapters
            if result.source == "replaced" and registered:
                t0 = time.monotonic()
                await self.loader.load(name, self.vllm_path(name), inplace=True)
                load_seconds = time.monotonic() - t0
                self.metrics.load_seconds.observe(load_seconds)
                monitor.note_loaded(name, result.info.rank)
                loaded = reloaded = True
                log.info("adapter %s: version %s swapped in place of %s", name, result.version,
                         result.previous_version)
            elif load:
                state = monitor.state
                resident = state is not None and (name in state.gpu_adapters or name in state.cpu_adapters)
                if registered and resident:
                    loaded = True
                else:
                    t0 = time.monotonic()
                    await self.loader.load(name, self.vllm_path(name), inplace=registered)
                    load_seconds = time.monotonic() - t0
                    self.metrics.load_seconds.observe(load_seconds)
                    monitor.note_loaded(name, result.info.rank)
                    loaded = True
            if not loaded:
                monitor.note_not_loading(name)
            return {
                "adapter": name,
                "path": self.vllm_path(name),
                "source": result.source,
                "seconds": round(time.monotonic() - started, 6),
                "load_seconds": round(load_seconds, 6),
                "loaded": loaded,
                "reloaded": reloaded,
                "rank": result.info.rank,
                "size_bytes": result.info.size_bytes,
                "version": result.version,
                "previous_version": result.previous_version,
            }
        except SidecarError as exc:
            if noted:
                monitor.note_not_loading(name)
            self.metrics.ensure_total.labels("failed").inc()
            self.metrics.failures_total.labels(exc.code).inc()
            log.warning("ensure %r failed (%s): %s", name, exc.code, exc.message)
            raise

    async def refresh(self, name: str, version: str | None) -> dict[str, Any]:
        """Bring an adapter this pod holds to ``version`` (None: the store's current one)."""
        assert self.adapter_store is not None
        validate_name(name)
        if name not in self.adapter_store.names():
            return {"adapter": name, "status": "absent", "version": None, "previous_version": None,
                    "reloaded": False}
        result = await self.ensure(name, load=False, version=version, latest=version is None)
        status = "replaced" if result["source"] == "replaced" else "current"
        return {"adapter": name, "status": status, "version": result["version"],
                "previous_version": result["previous_version"] if status == "replaced" else result["version"],
                "reloaded": result["reloaded"]}

    async def inspect_store(self, names: list[str]) -> dict[str, Any]:
        """Whether the store answers, and what it holds for each of ``names`` (``name`` or
        ``name@version``; see the module docstring). Store failures are reported in the answer,
        not raised."""
        store = self.adapter_store
        assert store is not None
        out: dict[str, Any] = {"pod_id": self.settings.pod_id, "source": store.source.describe(store.root()),
                               "max_lora_rank": self.settings.max_lora_rank, "ok": True, "error": None,
                               "adapters": {}}
        try:
            await asyncio.to_thread(store.source.list, store.root(), limit=1)
            for item in names:
                name, _, version = item.partition("@")
                try:
                    remote = await asyncio.to_thread(store.inspect_remote, name, version or None)
                    out["adapters"][item] = remote.to_dict()
                except (InvalidName, BadRequest, AdapterNotFound) as exc:
                    out["adapters"][item] = {"adapter": name, "present": False,
                                             "problems": [{"code": exc.code, "message": exc.message}]}
        except SidecarError as exc:
            layer = exc.layer if isinstance(exc, StoreUnreachable) else None
            out.update(ok=False, error={"code": exc.code, "message": exc.message, "layer": layer})
        return out

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
                "version": a.version,
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
            "demand_evictions": self.demand.demand_evictions,
            "demand_adapters": len(self.demand.top()),
            "demand_age_s": self.demand.age_s(),
            "prefetches": dict(self.demand.prefetches),
            "residency_exact": 1 if state is not None and state.residency_source == "exact" else 0,
            "vllm_healthy": 1 if state is not None and state.healthy else 0,
            "gpu": list(state.gpu_adapters) if state else [],
            "cpu": list(state.cpu_adapters) if state else [],
            "scrapes": self.monitor.scrapes,
            "scrape_failures": self.monitor.scrape_failures,
            "kv_blocks": len(self.kv_relay.blocks) if self.kv_relay else 0,
            "kv_batches": self.kv_subscriber.stats.batches if self.kv_subscriber else 0,
            "kv_resets": (self.kv_subscriber.stats.restarts + self.kv_subscriber.stats.unrecoverable)
            if self.kv_subscriber else 0,
        }
