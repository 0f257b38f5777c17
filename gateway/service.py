"""The gateway's wiring: store, discovery, monitors, pipeline, upstream pool, metrics, reload.

``Gateway(config, config_path=None)`` owns every long-lived object; ``await gw.start()`` /
``await gw.close()`` bracket its life (the app's lifespan calls them). Request handlers read
``gw.runtime`` once per request: an immutable snapshot of the config-derived objects (policy,
pipeline, config) that a reload replaces in one assignment, so requests in flight finish on the
snapshot they started with and nothing is locked.

The routable set ``gw.pods`` (pod id -> PodState) holds the pods that have a discovery entry and a
PodState in the store, less those the placer holds back while it warms them up (``placement``).
It is maintained by listeners (store changes, discovery changes), never recomputed per request,
and read without I/O. While the store is unreachable and ``store.outage.poll_pods`` is on, the
states ``StoreWatch`` polls from the pods themselves stand in for the store's
(``gateway.store_watch``). A pod that turns unhealthy or leaves the set has its attempts in
flight told at once (``gw.inflight``, ``gateway.inflight``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import podstate
import scorer.build
import scorer.errors
from gateway.config import ConfigError, GatewayConfig, StaticPod, load_config
from gateway.discovery import Discovery, Endpoint, StaticDiscovery, StoreDiscovery
from gateway.ensure import Ensurer
from gateway.inflight import Inflight
from gateway.kv_feed import KVFeedCollector, KVFeeds
from gateway.limits import LimitsCollector, open_limiter
from gateway.metrics import GatewayMetrics
from gateway.placement_metrics import PlacementCollector
from gateway.placer import Placer
from gateway.policy import AccessPolicy
from gateway.sharing import SharingCollector, StateSharing
from gateway.sidecars import sidecar_auth
from gateway.store_watch import StoreCollector, StoreWatch
from gateway.suspects import Suspects
from gateway.tokens import PromptTokens
from gateway.upstream import Upstream
from podstate.placement_store import open_placement_store
from podstate.monitor import MonitorSettings, PodMonitor
from podstate.store import PodStateStore
from scorer.demand import Demand, DemandKey, merge_demand
from scorer.model import Decision, PodState
from scorer.pipeline import Pipeline

log = logging.getLogger("loraroute.gateway")


def build_pipeline(spec: str | dict[str, Any]) -> Pipeline:
    """``scorer.build.build_pipeline`` with its ConfigError turned into ours (key path kept)."""
    try:
        return scorer.build.build_pipeline(spec)
    except scorer.errors.ConfigError as e:
        raise ConfigError(str(e)) from None


@dataclass(frozen=True, slots=True)
class Runtime:
    """Everything a request needs that a reload may change. Replaced whole, never mutated."""

    config: GatewayConfig
    policy: AccessPolicy
    pipeline: Pipeline
    generation: int


@dataclass(slots=True)
class DecisionRecord:
    at: float
    request_id: str
    model: str
    tenant: str | None
    decision: Decision
    attempts: list[str]
    status: int = 0
    #: set when the decision was made on a degraded view (the state store unreachable)
    state_note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = self.decision.explain()
        if self.state_note:
            out["state"] = self.state_note
        out.update(
            at=round(self.at, 3),
            request_id=self.request_id,
            model=self.model,
            tenant=self.tenant,
            attempts=list(self.attempts),
            status=self.status,
        )
        return out


class Gateway:
    def __init__(
        self,
        config: GatewayConfig,
        config_path: str | os.PathLike[str] | None = None,
        *,
        store: PodStateStore | None = None,
        discovery: Discovery | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``store`` / ``discovery`` may be given (e.g. the demo shares its MemoryStore); otherwise
        they are built from the config. A given store is started and closed by its owner."""
        self.config_path = Path(config_path) if config_path else None
        self._env = env
        self._own_store = store is None
        self.store: PodStateStore = store if store is not None else podstate.open_store(
            config.store.url, key_prefix=config.store.key_prefix)
        self._static: StaticDiscovery | None = None
        if discovery is not None:
            self.discovery: Discovery = discovery
        elif config.discovery.static:
            self._static = StaticDiscovery((p.id, p.url, p.sidecar_url) for p in config.discovery.static)
            self.discovery = self._static
        elif config.discovery.kubernetes is not None:
            from gateway.discovery_k8s import KubernetesDiscovery

            self.discovery = KubernetesDiscovery.from_config(config.discovery.kubernetes)
        else:
            self.discovery = StoreDiscovery(self.store)
        self._store_is_discovery = isinstance(self.discovery, StoreDiscovery)
        self.runtime = Runtime(config, AccessPolicy(config), build_pipeline(config.pipeline), 1)
        self.pods: dict[str, PodState] = {}
        self.endpoints: Mapping[str, Endpoint] = {}
        self.suspects = Suspects()
        self.inflight = Inflight()
        # tenant limits are shared through the store's Redis (a store handed in is in-process: the demo's)
        self.limiter = open_limiter(config.store.url if self._own_store else "memory://", config.store.key_prefix,
                                    lambda: self.runtime.config.limits.sync_s)
        #: completion requests being served (the edge counts them; the drain waits for them)
        self.active_requests = 0
        #: set by the drain (gateway/drain.py): /ready answers 503 from then on
        self.draining_since: float | None = None
        #: set once the drain's grace is over: new completion requests are refused
        self.refusing = False
        self.store_watch = StoreWatch(self.store, lambda: self.runtime.config.store.outage, self.pod_states,
                                      self._on_polled, self._poll_settings)
        self.decisions: collections.deque[DecisionRecord] = collections.deque(maxlen=config.server.decisions_kept)
        # requests in flight are the pipeline's own count (one per dispatch, shared across reloads)
        self.metrics = GatewayMetrics(config.metrics.latency_buckets, lambda: self.pods,
                                      lambda: self.runtime.pipeline.inflight_counts(),
                                      lambda: self.runtime.pipeline.cost_model())
        self.upstream = Upstream(config.server)
        self.ensurer = Ensurer(self.upstream, self.metrics, lambda: self.runtime.policy.adapter_versions,
                               self.sidecar_headers)
        #: the config as read (file or given), before ``config_layer`` (approved run-time changes,
        #: gateway/changes.py) is laid over it on every reload
        self.base_config = config
        self.config_layer: Callable[[GatewayConfig], GatewayConfig] | None = None
        self._monitors: dict[str, PodMonitor] = {}
        self._watch_task: asyncio.Task[None] | None = None
        self._mtime = self._config_mtime()
        self.started_at = 0.0
        self.ready = False
        self.placer: Placer | None = None
        if config.placement.enabled:
            pstore = open_placement_store(config.store.url, key_prefix=config.store.key_prefix,
                                          file=config.placement.demand.file)
            self.placer = Placer(self, config.placement, pstore)
        self._configure_demand(config)
        self.metrics.registry.register(PlacementCollector(self.current_demand, lambda: self.placer,
                                                          label=self._demand_label))
        self.metrics.registry.register(StoreCollector(self.store_watch))
        self.metrics.registry.register(LimitsCollector(self.limiter))
        self.limiter.track(self.runtime.policy.tenants.values())
        #: routing state shared with the other replicas (None: memory:// or ``sharing.enabled`` off)
        self.sharing: StateSharing | None = None
        if config.sharing.enabled and config.store.url.startswith(("redis://", "rediss://")):
            self.sharing = StateSharing(config.store.url, config.sharing, lambda: self.runtime.pipeline.local,
                                        key_prefix=config.store.key_prefix)
        self.metrics.registry.register(SharingCollector(lambda: self.sharing))
        #: precise prefix routing: the prompt's token ids (gateway/tokens.py) and the pods' KV
        #: blocks into the pipeline's index (gateway/kv_feed.py), both idle without precise-prefix
        self.tokens = PromptTokens(self.metrics.registry)
        self.kv_feeds = KVFeeds(self, self.metrics.registry)
        self.metrics.registry.register(KVFeedCollector(lambda: self.kv_feeds))

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self.started_at = time.time()
        token_env = self.runtime.config.security.sidecar_token_env
        if token_env and not sidecar_auth(self.runtime.config):
            # the sidecars refuse to start without their token; a gateway without it gets 401s
            log.warning("security.sidecar_token_env names %s, which is unset or empty: calls to the "
                        "sidecars' control API carry no token and will be refused", token_env)
        if self._own_store:
            await self.store.start()
        self.store.add_listener(self._on_state)
        self.discovery.add_listener(self._on_endpoints)
        await self.discovery.start()
        self._on_endpoints(self.discovery.endpoints())
        await self.upstream.start()
        await self._sync_monitors()
        if self.config_path is not None and self.runtime.config.server.reload_poll_s > 0:
            self._watch_task = asyncio.create_task(self._watch_config(), name="config-watch")
        if self.placer is not None:
            await self.placer.start()
        self.store_watch.start()
        self.limiter.start()
        if self.sharing is not None:
            self.sharing.start()
        await self.kv_feeds.sync()
        self.ready = True

    async def close(self) -> None:
        self.ready = False
        await self.store_watch.close()
        await self.limiter.close()
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
            self._watch_task = None
        if self.placer is not None:
            await self.placer.close()
        if self.sharing is not None:
            await self.sharing.close()
        await self.kv_feeds.close()
        for pod_id in list(self._monitors):
            await self._stop_monitor(pod_id)
        with contextlib.suppress(Exception):
            await self.discovery.close()
        await self.upstream.close()
        if self._own_store:
            await self.store.close()

    # --- the routable set -----------------------------------------------------------------------
    def _on_state(self, pod_id: str, state: PodState | None) -> None:
        if self.store_watch.polling and pod_id in self.pods:
            return  # the pod is polled directly while the store is unreachable
        self._apply_state(pod_id, state)

    def _apply_state(self, pod_id: str, state: PodState | None) -> None:
        before = self.pods.get(pod_id)
        if before is not None and before.healthy and (state is None or not state.healthy):
            self.inflight.pod_unhealthy(pod_id, self.runtime.config.server.timeouts.idle_unhealthy_s)
        if state is None:
            if self.pods.pop(pod_id, None) is not None:
                self.runtime.pipeline.forget_pod(pod_id)
            return
        if self._store_is_discovery or pod_id in self.endpoints:
            if self.placer is not None and not self.placer.admits(pod_id, state):
                self.pods.pop(pod_id, None)  # held while it warms up; back with refresh_routable
                return
            self.pods[pod_id] = state

    def _on_polled(self, pod_id: str, state: PodState | None) -> None:
        """A state ``StoreWatch`` polled from the pod itself (None: polling stopped, the store's
        view applies again). What only the sidecar knows (the pod's disk, the ranks it read, its
        sidecar, whether it warmed the engine up) is kept from the store's last state."""
        stored = self.store.view().get(pod_id)
        if state is not None and stored is not None:
            state = state.replace(disk_adapters=stored.disk_adapters, sidecar_url=stored.sidecar_url,
                                  lora_ready=stored.lora_ready,
                                  adapter_ranks={**stored.adapter_ranks, **state.adapter_ranks})
        self._apply_state(pod_id, state if state is not None else stored)

    def _poll_settings(self, state: PodState) -> MonitorSettings:
        """How ``StoreWatch`` polls a pod: the in-process monitors' timing, the engine limits the
        pod's own sidecar published."""
        cfg = self.runtime.config.discovery
        return MonitorSettings(interval_s=cfg.monitor_interval_s, ttl_s=cfg.monitor_ttl_s,
                               request_timeout_s=cfg.monitor_timeout_s,
                               unhealthy_after_s=cfg.monitor_unhealthy_after_s, max_loras=state.max_loras,
                               max_cpu_loras=state.max_cpu_loras, max_lora_rank=state.max_lora_rank)

    def sidecar_headers(self) -> dict[str, str]:
        """What every call to a sidecar's control API carries (``gateway.sidecars.sidecar_auth``)."""
        return sidecar_auth(self.runtime.config)

    def suspect_hold_s(self) -> float:
        """How long a pod that refused a connection or timed out is tried last."""
        return self.store_watch.suspect_hold_s(self.suspects.hold_s)

    def _on_endpoints(self, endpoints: Mapping[str, Endpoint]) -> None:
        self.endpoints = endpoints
        idle_s = self.runtime.config.server.timeouts.idle_unhealthy_s
        for pod_id in [p for p in self.pods if p not in endpoints]:
            del self.pods[pod_id]
            self.inflight.pod_unhealthy(pod_id, idle_s)
            self.runtime.pipeline.forget_pod(pod_id)
        self.refresh_routable()
        if self.ready:
            asyncio.get_running_loop().create_task(self._sync_monitors())

    def pod_states(self) -> dict[str, PodState]:
        """Every discovered pod with a PodState, routable or held back (what placement plans for)."""
        view = self.store.view()
        if self._store_is_discovery:
            return dict(view)
        return {p: view[p] for p in self.endpoints if p in view}

    def refresh_routable(self) -> None:
        """Recompute ``pods`` from the store view (the placer changed which pods it holds)."""
        placer = self.placer
        for pod_id, state in self.pod_states().items():
            if placer is not None and not placer.admits(pod_id, state):
                self.pods.pop(pod_id, None)
            else:
                self.pods[pod_id] = state

    # --- what the placer reads and tells ---------------------------------------------------------
    def adapter_ranks(self) -> dict[DemandKey, int]:
        """(served base, served adapter) -> rank, from the allowlist (adapters with a rank)."""
        return {(b.vllm_name, a.vllm_name): a.rank for b in self.runtime.config.bases for a in b.adapters
                if a.rank is not None}

    def note_loaded(self, pod_id: str, adapter: str, rank: int | None) -> None:
        """A load this gateway made through vLLM's API: tell the pod's in-process monitor."""
        monitor = self._monitors.get(pod_id)
        if monitor is not None:
            monitor.note_loaded(adapter, rank)

    def current_demand(self) -> Demand:
        """The merged demand the placer last read; with placement off, this replica's own."""
        if self.placer is not None and self.placer.demand is not None:
            return self.placer.demand
        now = time.time()
        return merge_demand([self.runtime.pipeline.demand.snapshot("local", now)], now)

    def _demand_label(self, base: str, adapter: str) -> str | None:
        """An adapter's label in the demand series (names as vLLM serves them; ``metrics.adapter_labels``)."""
        if self.runtime.config.metrics.adapter_labels == "none":
            return None
        return adapter if (base, adapter) in self.runtime.policy.served_adapters else "other"

    def _configure_demand(self, config: GatewayConfig) -> None:
        d = config.placement.demand
        self.runtime.pipeline.demand.configure(d.half_life_s, d.max_adapters)

    def endpoint(self, pod_id: str) -> Endpoint | None:
        """Where to send a request for ``pod_id``: the discovery entry, else the PodState's URLs."""
        ep = self.endpoints.get(pod_id)
        state = self.pods.get(pod_id)
        if ep is not None:
            if ep.sidecar_url is None and state is not None and state.sidecar_url:
                return Endpoint(ep.url, state.sidecar_url)
            return ep
        if state is not None:
            return Endpoint(state.url, state.sidecar_url)
        return None

    # --- embedded monitors ------------------------------------------------------------------------
    def _wanted_monitors(self) -> dict[str, StaticPod]:
        cfg = self.runtime.config.discovery
        if self._static is None or cfg.monitor == "never":
            return {}
        return {p.id: p for p in cfg.static if cfg.monitor == "always" or p.sidecar_url is None}

    async def _sync_monitors(self) -> None:
        wanted = self._wanted_monitors()
        for pod_id in [p for p in self._monitors if p not in wanted]:
            await self._stop_monitor(pod_id)
        for pod_id, pod in wanted.items():
            if pod_id in self._monitors:
                continue
            cfg = self.runtime.config.discovery
            settings = MonitorSettings(
                interval_s=cfg.monitor_interval_s, ttl_s=cfg.monitor_ttl_s, request_timeout_s=cfg.monitor_timeout_s,
                unhealthy_after_s=cfg.monitor_unhealthy_after_s, max_lora_rank=pod.max_lora_rank,
                max_cpu_loras=pod.max_cpu_loras,
            )
            monitor = PodMonitor(pod_id, pod.url, self.store, settings, sidecar_url=pod.sidecar_url)
            self._monitors[pod_id] = monitor
            await monitor.start()

    async def _stop_monitor(self, pod_id: str) -> None:
        monitor = self._monitors.pop(pod_id, None)
        if monitor is not None:
            with contextlib.suppress(Exception):
                await monitor.close()

    # --- reload ---------------------------------------------------------------------------------
    def _config_mtime(self) -> float | None:
        if self.config_path is None:
            return None
        try:
            return self.config_path.stat().st_mtime_ns / 1e9
        except OSError:
            return None

    def reload(self, source: str | os.PathLike[str] | Mapping[str, Any] | None = None) -> list[str]:
        """Load and validate a new config, then swap it in. Raises ``ConfigError`` and keeps the
        old config when the new one is invalid. Returns keys that need a restart to take effect."""
        src = source if source is not None else self.config_path
        if src is None and self.config_layer is None:
            raise ConfigError("this gateway was started without a config file; nothing to reload")
        base = load_config(src, env=self._env) if src is not None else self.base_config
        new = self.config_layer(base) if self.config_layer is not None else base
        old = self.runtime
        pipeline = build_pipeline(new.pipeline)
        pipeline.adopt_state_from(old.pipeline)
        restart = [
            key
            for key, a, b in (
                ("server.host", old.config.server.host, new.server.host),
                ("server.port", old.config.server.port, new.server.port),
                ("store", (old.config.store.url, old.config.store.key_prefix), (new.store.url, new.store.key_prefix)),
                ("sharing", old.config.sharing, new.sharing),
                ("discovery.kubernetes", old.config.discovery.kubernetes, new.discovery.kubernetes),
                ("metrics.latency_buckets", old.config.metrics.latency_buckets, new.metrics.latency_buckets),
                ("server.pool_per_pod", old.config.server.pool_per_pod, new.server.pool_per_pod),
                ("placement", old.config.placement, new.placement),
            )
            if a != b
        ]
        if bool(old.config.discovery.static) != bool(new.discovery.static):
            restart.append("discovery.static (switching discovery kinds)")
        self.runtime = Runtime(new, AccessPolicy(new), pipeline, old.generation + 1)
        self.limiter.track(self.runtime.policy.tenants.values())
        self._configure_demand(new)
        self.base_config = base
        self.upstream.configure(new.server)
        if self.decisions.maxlen != new.server.decisions_kept:
            self.decisions = collections.deque(self.decisions, maxlen=new.server.decisions_kept)
        if self._static is not None and new.discovery.static:
            self._static.update((p.id, p.url, p.sidecar_url) for p in new.discovery.static)
        if self.ready:
            asyncio.get_running_loop().create_task(self._sync_monitors())
            asyncio.get_running_loop().create_task(self.kv_feeds.sync())
        self._mtime = self._config_mtime()
        self.metrics.reload("ok")
        log.info("config reloaded (generation %d)%s", self.runtime.generation,
                 f"; restart needed for: {', '.join(restart)}" if restart else "")
        return restart

    async def _watch_config(self) -> None:
        while True:
            await asyncio.sleep(self.runtime.config.server.reload_poll_s or 1.0)
            mtime = self._config_mtime()
            if mtime is None or mtime == self._mtime:
                continue
            self._mtime = mtime
            try:
                self.reload()
            except ConfigError as e:
                self.metrics.reload("invalid")
                log.error("config file changed but is invalid; still serving the previous config: %s", e)

    # --- bookkeeping used by the request path ---------------------------------------------------
    def record(self, rec: DecisionRecord, adapter_label: str) -> None:
        """Keep ``rec`` for ``GET /admin/decisions`` and count where an adapter request went
        (under ``adapter_label``: ``Exchange.adapter_label``, "" when adapter names are off)."""
        if self.decisions.maxlen:
            self.decisions.append(rec)
        base, _, adapter = rec.model.partition(":")
        if adapter:
            known = self.runtime.policy.bases.get(base)
            self.metrics.routed(known.name if known else base, adapter_label, rec.decision)
