"""The gateway's precise prefix feed: what each pod really holds, into ``pipeline.local.kv``.

``KVFeeds.sync()`` runs on start and after every reload; a feed runs only while the running
pipeline has a scorer that reads KV events (``Pipeline.kv_reader``: ``precise-prefix``):

- ``store.url: redis://`` — one ``KVBlockFeed`` (``podstate.kv_store``) applying the block sets
  the pods' sidecars relay (``kv_events`` in the sidecar's config). While Redis is unreachable the
  index keeps what it knows and the scorer's silence watch falls back to the approximate index
  for pods that keep computing; on reconnect every pod's snapshot is loaded again.
- ``discovery.static[].kv_events`` — the gateway follows that pod's ZMQ events itself
  (``KVEventSubscriber`` into ``IndexSink``: replay of gaps, restarts, all-cleared), the Redis
  feed leaving the pod alone. This is the one-process set-up (``store.url: memory://``, the
  embedded monitors): no sidecar can relay there (a sidecar's ``kv_events`` needs Redis), and a
  single process needs no relay — the index is where the events arrive. With ``memory://`` and
  no ``kv_events`` on a pod, nothing feeds the index: precise-prefix scores that pod by the
  approximate index (logged once).

A feed that starts waits up to ``READY_WAIT_S`` for its first load of every pod's snapshot, so a
replica that starts (or a reload that adds the scorer) routes on the whole cluster's blocks from
its first request when Redis answers, and does not hold the start up when it does not.

When the scorer leaves the pipeline the feeds stop and the index is emptied (nothing reads it,
and a scorer added back later must not read blocks that went stale meanwhile); when it comes
back the feeds start again (snapshots, replays). The index itself lives in the pipeline's
``LocalState``, which a reload hands over, so a reload that keeps the scorer loses nothing.

Series (``KVFeedCollector``): ``loraroute_kv_feed_running{source}``,
``loraroute_kv_feed_connected``, ``loraroute_kv_feed_deltas_total``,
``loraroute_kv_feed_snapshots_total``, ``loraroute_kv_feed_gaps_total``,
``loraroute_kv_feed_malformed_total``, per directly followed pod
``loraroute_kv_events_batches_total{pod}`` / ``_replays_total{pod}`` /
``_unrecoverable_total{pod}`` / ``_restarts_total{pod}``; ``loraroute_kv_blocks{pod}`` (blocks the
index holds) and ``loraroute_kv_live{pod}`` (1 while the scorer counts the pod's events); and the
histograms ``loraroute_kv_feed_delay_seconds`` (pod time stamp → applied) and
``loraroute_kv_feed_apply_seconds`` (time spent applying one delta or batch).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.precise_config import StaticKVEvents
from podstate.kv_events import IndexSink, KVBatch, KVEventSubscriber
from podstate.kv_store import KVBlockFeed
from scorer.kv_index import KVBlockIndex


Gateway = Any  # gateway.service.Gateway: not imported, it imports this module

log = logging.getLogger("loraroute.kv_feed")

READY_WAIT_S = 2.0
_DELAY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_APPLY_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)


class KVFeeds:
    """The Redis feed and the direct subscribers of one gateway (module docstring)."""

    def __init__(self, gw: Gateway, registry: CollectorRegistry | None = None) -> None:
        self._gw = gw
        self.feed: KVBlockFeed | None = None
        self.direct: dict[str, tuple[StaticKVEvents, KVEventSubscriber]] = {}
        self.delay = Histogram("loraroute_kv_feed_delay_seconds", "KV events: pod time stamp to applied in the index",
                               buckets=_DELAY_BUCKETS, registry=registry)
        self.apply_s = Histogram("loraroute_kv_feed_apply_seconds", "KV events: time spent applying one delta or batch",
                                 buckets=_APPLY_BUCKETS, registry=registry)
        self._warned = False
        self._lock = asyncio.Lock()  # reloads in quick succession: one sync at a time

    @property
    def index(self) -> KVBlockIndex:
        return self._gw.runtime.pipeline.local.kv

    @property
    def running(self) -> bool:
        return self.feed is not None or bool(self.direct)

    def _wanted(self) -> dict[str, StaticKVEvents]:
        cfg = self._gw.runtime.config
        return {p.id: p.kv_events for p in cfg.discovery.static if p.kv_events is not None}

    async def sync(self) -> None:
        """Start, restart or stop the feeds for the running config (module docstring)."""
        async with self._lock:
            await self._sync()

    async def _sync(self) -> None:
        gw = self._gw
        cfg = gw.runtime.config
        if gw.runtime.pipeline.kv_reader is None:
            if self.running:
                await self.close()
                index = self.index
                for pod_id in list(index.pods):
                    index.forget(pod_id)
            return
        wanted = self._wanted()
        for pod_id in [p for p, (ev, _) in self.direct.items() if wanted.get(p) != ev]:
            _, sub = self.direct.pop(pod_id)
            await sub.close()
            self.index.forget(pod_id)
        for pod_id, ev in wanted.items():
            if pod_id not in self.direct:
                sub = KVEventSubscriber(pod_id, ev.endpoint, IndexSink(self.index, on_batch=self._on_batch),
                                        replay_endpoint=ev.replay_endpoint, topic=ev.topic)
                self.direct[pod_id] = (ev, sub)
                sub.start()
        redis = cfg.store.url.startswith(("redis://", "rediss://"))
        if redis and self.feed is None:
            self.feed = KVBlockFeed(cfg.store.url, self.index, key_prefix=cfg.store.key_prefix,
                                    on_delta=self._on_delta, skip=lambda pod_id: pod_id in self.direct)
            self.feed.start()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.feed.ready.wait(), READY_WAIT_S)
        if not redis and not self._warned:
            missing = [p.id for p in cfg.discovery.static if p.kv_events is None]
            if missing or not cfg.discovery.static:
                log.warning("precise-prefix with store %s: no sidecar relays KV events here, and %s; those "
                            "pods are scored by the approximate index (set discovery.static[].kv_events)",
                            cfg.store.url, f"pods {', '.join(missing)} have no kv_events" if missing
                            else "no static pod has kv_events")
                self._warned = True

    async def close(self) -> None:
        if self.feed is not None:
            await self.feed.close()
            self.feed = None
        for _, sub in self.direct.values():
            await sub.close()
        self.direct.clear()

    def _on_delta(self, delay_s: float, apply_s: float) -> None:
        self.delay.observe(max(0.0, delay_s))
        self.apply_s.observe(apply_s)

    def _on_batch(self, pod_id: str, batch: KVBatch) -> None:
        self.delay.observe(max(0.0, time.time() - batch.ts))

    # --- what the admin API and the metrics read --------------------------------------------------
    def pod_status(self, pod_id: str, now: float) -> dict[str, Any] | None:
        """The index's view of one pod: source, blocks, batches, age of the last one, and
        whether the scorer counts the pod's events now (``live``); None when no feed runs."""
        if not self.running:
            return None
        pipeline = self._gw.runtime.pipeline
        index = pipeline.local.kv
        rec = index.pods.get(pod_id)
        source = "zmq" if pod_id in self.direct else ("redis" if self.feed is not None else None)
        out: dict[str, Any] = {"source": source, "blocks": rec.blocks if rec else 0,
                               "batches": rec.batches if rec else 0,
                               "last_batch_age_s": round(now - rec.last_batch_at, 3) if rec and rec.batches else None}
        view = pipeline.local.views.get(pod_id)
        reader = pipeline.kv_reader
        out["live"] = bool(reader is not None and view is not None and rec is not None and reader.live(view, index, now))
        return out


class KVFeedCollector(Collector):
    """The ``loraroute_kv_*`` counters and gauges (module docstring), read at scrape time."""

    def __init__(self, feeds: Callable[[], KVFeeds | None]) -> None:
        self._feeds = feeds

    def collect(self) -> Iterable[Metric]:
        feeds = self._feeds()
        if feeds is None:
            return []
        running = GaugeMetricFamily("loraroute_kv_feed_running", "1 while a KV feed of this source runs",
                                    labels=["source"])
        running.add_metric(["redis"], 1.0 if feeds.feed is not None else 0.0)
        running.add_metric(["zmq"], 1.0 if feeds.direct else 0.0)
        out: list[Metric] = [running]
        if feeds.feed is not None:
            st = feeds.feed.stats
            conn = GaugeMetricFamily("loraroute_kv_feed_connected", "1 while the KV feed is connected to Redis")
            conn.add_metric([], 1.0 if st.connected else 0.0)
            out.append(conn)
            for name, doc, value in (("deltas", "KV block-set deltas applied", st.deltas),
                                     ("snapshots", "KV block-set snapshots loaded", st.snapshots),
                                     ("gaps", "KV deltas out of sequence (a snapshot reloaded)", st.gaps),
                                     ("malformed", "KV feed messages dropped as malformed", st.malformed)):
                c = CounterMetricFamily(f"loraroute_kv_feed_{name}", doc)
                c.add_metric([], value)
                out.append(c)
        if feeds.direct:
            fams = {k: CounterMetricFamily(f"loraroute_kv_events_{k}", doc, labels=["pod"]) for k, doc in (
                ("batches", "KV event batches applied from a pod followed directly"),
                ("replays", "Replays asked of a pod's replay socket"),
                ("unrecoverable", "Gaps a replay could not fill (the pod's blocks were reset)"),
                ("restarts", "Pod restarts seen in its KV event sequence"))}
            for pod_id, (_, sub) in sorted(feeds.direct.items()):
                for k, fam in fams.items():
                    fam.add_metric([pod_id], getattr(sub.stats, k))
            out.extend(fams.values())
        if feeds.running:
            now = time.time()
            blocks = GaugeMetricFamily("loraroute_kv_blocks", "KV blocks the precise index holds per pod", labels=["pod"])
            live = GaugeMetricFamily("loraroute_kv_live", "1 while the pod's KV events count (not silent)", labels=["pod"])
            for pod_id in sorted(feeds.index.pods):
                status = feeds.pod_status(pod_id, now)
                if status is not None:
                    blocks.add_metric([pod_id], status["blocks"])
                    live.add_metric([pod_id], 1.0 if status["live"] else 0.0)
            out += [blocks, live]
        return out
