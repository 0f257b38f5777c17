"""Tenant limits: requests per minute, prompt tokens per minute, requests in flight.

Enforced at admission (``gateway.edge``), before anything is routed: the request count and the
concurrency right after authentication (before the body is read), the prompt tokens once the body
is parsed (the gateway's estimate, 4 characters a token). Over a limit: 429
``rate_limit_exceeded`` in OpenAI's shape (``type`` ``rate_limit_error``, ``param`` the limit) with
``Retry-After`` — the seconds until one more request (or these tokens) would fit. Nothing is
counted for a refused request. The limits are read from the request's runtime snapshot
(``Tenant.limits``), so a reload changes them at once; the counts survive it.

Per minute, a sliding window from two fixed ones (the current minute ``w`` and the one before)::

    used(now) = count[w − 1] × (1 − f) + count[w]        f = (now mod 60) / 60

    admitted when used + amount ≤ limit; else Retry-After = the time until the older minute's
    share has shrunk enough (the rest of the minute, and more when the current one is full).

Shared between gateway replicas when the store is Redis: each replica counts locally, at once,
and every ``limits.sync_s`` adds its new counts to ``{prefix}:limit:{tenant}:{metric}:{minute}``
(``INCRBY``, expiring after two minutes), reads the totals back, and publishes its requests in
flight (``{prefix}:limit:{tenant}:inflight``, a hash of replica → ``count:time``; a replica's
entry older than three syncs no longer counts). A decision is then "the others' counts as of the
last sync + everything this replica did since", never a Redis call on the request path; the
budget can be overshot by what the other replicas admit within one ``sync_s``. While Redis is
unreachable each replica goes on with its own counts and the others' last known ones, and adds
its backlog when Redis is back. With ``memory://`` the counts are this process's only.

``LimitsCollector`` exports ``loraroute_tenant_requests_total{tenant}``,
``loraroute_tenant_prompt_tokens_total{tenant}``, ``loraroute_tenant_rejected_total{tenant,limit}``
and ``loraroute_tenant_inflight{tenant}`` (this replica's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.errors import APIError
from gateway.policy import Tenant
from podstate import redact_url
from podstate.background import Background

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("loraroute.gateway")

WINDOW_S = 60.0
REQUESTS, TOKENS = "requests", "tokens"
_LIMIT_NAMES = {REQUESTS: "requests_per_minute", TOKENS: "prompt_tokens_per_minute"}


class RateLimited(APIError):
    """429 for one limit, with ``Retry-After``."""

    def __init__(self, tenant: str, limit: str, message: str, retry_after_s: float) -> None:
        seconds = max(1, math.ceil(retry_after_s))
        super().__init__(429, f"tenant {tenant!r}: {message}; retry in {seconds}s", type_="rate_limit_error",
                         param=limit, code="rate_limit_exceeded")
        self.headers = ((b"retry-after", str(seconds).encode()),)


@dataclass(slots=True)
class _Counts:
    """One tenant's counts on this replica, and the other replicas' as of the last sync."""

    local: dict[tuple[str, int], float]  # (metric, minute) -> admitted here, all of it
    unsynced: dict[tuple[str, int], float]  # the part of ``local`` not yet added to the shared count
    shared: dict[tuple[str, int], float]  # the shared count as last read (every replica, this one included)
    inflight: int = 0
    others_inflight: int = 0
    requests: int = 0
    tokens: int = 0


class Limiter(Background):
    """See the module docstring. ``redis``: a ``redis.asyncio.Redis`` client (None: local only);
    ``start()`` runs the sync with it (``Background``)."""

    task_name = "limits-sync"

    def __init__(self, redis: Redis | None = None, key_prefix: str = "loraroute",
                 sync_s: Callable[[], float] = lambda: 0.25, clock: Callable[[], float] = time.time) -> None:
        self._redis = redis
        self._prefix = f"{key_prefix}:limit"
        self._sync_s = sync_s
        self._clock = clock
        self._tenants: dict[str, _Counts] = {}
        self.rejected: dict[tuple[str, str], int] = {}
        self.replica = f"{socket.gethostname()}-{os.getpid()}"
        self._sync_ok = True

    # --- the request path --------------------------------------------------------------------
    def admit(self, tenant: Tenant | None) -> Tenant | None:
        """Count one request of ``tenant`` in flight and in its per-minute window, or raise
        ``RateLimited``; returns the tenant to ``release`` once the request has finished (None
        when no limit applies: nothing to release)."""
        if tenant is None or tenant.limits is None:
            return None
        limits = tenant.limits
        counts = self._counts(tenant.name)
        if limits.concurrent_requests is not None:
            busy = counts.inflight + counts.others_inflight
            if busy >= limits.concurrent_requests:
                self._refuse(tenant.name, "concurrent_requests", f"{busy} requests in flight, the limit is "
                             f"{limits.concurrent_requests}", 1.0)
        now = self._clock()
        if limits.requests_per_minute is not None:
            self._check(tenant.name, counts, REQUESTS, 1.0, limits.requests_per_minute, now)
        self._add(counts, REQUESTS, 1.0, now)
        counts.inflight += 1
        counts.requests += 1
        return tenant

    def admit_tokens(self, tenant: Tenant | None, tokens: int) -> None:
        """Count ``tokens`` prompt tokens of ``tenant``, or raise ``RateLimited`` — and then take
        back the request ``admit`` counted: a refused request counts for nothing (its in-flight
        slot is the caller's to ``release``)."""
        if tenant is None or tenant.limits is None or tokens <= 0:
            return
        counts = self._counts(tenant.name)
        limit = tenant.limits.prompt_tokens_per_minute
        now = self._clock()
        if limit is not None:
            try:
                if tokens > limit:
                    self._refuse(tenant.name, _LIMIT_NAMES[TOKENS], f"the prompt is about {tokens} tokens, more than "
                                 f"the limit of {limit} per minute allows at all; send a shorter one", WINDOW_S)
                self._check(tenant.name, counts, TOKENS, float(tokens), limit, now)
            except RateLimited:
                self._add(counts, REQUESTS, -1.0, now)
                counts.requests -= 1
                raise
        self._add(counts, TOKENS, float(tokens), now)
        counts.tokens += tokens

    def release(self, tenant: Tenant | None) -> None:
        """The request ``admit`` returned ``tenant`` for has finished."""
        if tenant is not None:
            counts = self._tenants.get(tenant.name)
            if counts is not None and counts.inflight > 0:
                counts.inflight -= 1

    def track(self, tenants: Iterable[Tenant]) -> None:
        """Share these tenants' counts from the start: a replica syncs only the tenants it knows,
        so one that had not yet served a tenant admitted it on its own count alone — up to a
        sync period's worth of requests over the shared budget (every configured tenant with
        limits is known from the start, and again after a reload)."""
        for tenant in tenants:
            if tenant.limits is not None:
                self._counts(tenant.name)

    def _counts(self, name: str) -> _Counts:
        counts = self._tenants.get(name)
        if counts is None:
            counts = self._tenants[name] = _Counts({}, {}, {})
        return counts

    def used(self, name: str, metric: str, now: float | None = None) -> float:
        """The sliding one-minute count of ``metric`` for tenant ``name`` (every replica)."""
        counts = self._tenants.get(name)
        if counts is None:
            return 0.0
        now = self._clock() if now is None else now
        minute = int(now // WINDOW_S)
        f = (now % WINDOW_S) / WINDOW_S
        return self._minute(counts, metric, minute - 1) * (1.0 - f) + self._minute(counts, metric, minute)

    @staticmethod
    def _minute(counts: _Counts, metric: str, minute: int) -> float:
        key = (metric, minute)
        shared = counts.shared.get(key)
        if shared is None:
            return counts.local.get(key, 0.0)
        return shared + counts.unsynced.get(key, 0.0)

    def _check(self, name: str, counts: _Counts, metric: str, amount: float, limit: int, now: float) -> None:
        minute = int(now // WINDOW_S)
        f = (now % WINDOW_S) / WINDOW_S
        prev, cur = self._minute(counts, metric, minute - 1), self._minute(counts, metric, minute)
        used = prev * (1.0 - f) + cur
        if used + amount <= limit:
            return
        room = limit - cur - amount  # what the older minute may still weigh for this to fit
        if room >= 0 and prev > 0:  # it fits once prev × (1 − f') ≤ room, later in this minute
            wait = WINDOW_S * (1.0 - room / prev) - (now % WINDOW_S)
        else:  # the current minute alone is too full: after it, its count becomes the older one
            rest = WINDOW_S - (now % WINDOW_S)
            wait = rest + (WINDOW_S * (1.0 - (limit - amount) / cur) if cur > 0 and limit >= amount else 0.0)
        what = "requests" if metric == REQUESTS else "prompt tokens"
        self._refuse(name, _LIMIT_NAMES[metric], f"{used:.0f} {what} in the last minute, the limit is {limit}",
                     max(wait, 1.0))

    def _add(self, counts: _Counts, metric: str, amount: float, now: float) -> None:
        key = (metric, int(now // WINDOW_S))
        counts.local[key] = counts.local.get(key, 0.0) + amount
        if self._redis is not None:
            counts.unsynced[key] = counts.unsynced.get(key, 0.0) + amount

    def _refuse(self, name: str, limit: str, message: str, retry_after_s: float) -> None:
        key = (name, limit)
        self.rejected[key] = self.rejected.get(key, 0) + 1
        raise RateLimited(name, limit, message, retry_after_s)

    # --- sharing through Redis ------------------------------------------------------------------
    def start(self) -> None:
        if self._redis is not None:
            super().start()

    async def close(self) -> None:
        await super().close()
        if self._redis is not None:
            with contextlib.suppress(Exception):  # this replica's requests in flight no longer count
                pipe = self._redis.pipeline(transaction=False)
                for name in self._tenants:
                    pipe.hdel(f"{self._prefix}:{name}:inflight", self.replica)
                await pipe.execute()
            with contextlib.suppress(Exception):
                await self._redis.aclose()

    def snapshot(self) -> list[tuple[str, int, int, int]]:
        """(tenant, requests admitted, prompt tokens admitted, in flight) per tenant seen here."""
        return [(name, c.requests, c.tokens, c.inflight) for name, c in sorted(self._tenants.items())]

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._sync_s())
            try:
                await self.sync()
                if not self._sync_ok:
                    log.info("tenant limits: Redis reachable again; counts shared again")
                self._sync_ok = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down: keep counting locally
                if self._sync_ok:
                    log.warning("tenant limits: cannot share counts through Redis (%s); each replica counts alone "
                                "until it is back", type(exc).__name__)
                self._sync_ok = False

    async def sync(self) -> None:
        """One exchange with Redis: add this replica's new counts, read every replica's back."""
        redis = self._redis
        assert redis is not None
        now = self._clock()
        minute = int(now // WINDOW_S)
        ttl_ms = int(2 * WINDOW_S * 1000)
        stale_s = 3 * self._sync_s() + 1.0
        names = list(self._tenants)
        pipe = redis.pipeline(transaction=False)
        sent: list[tuple[_Counts, tuple[str, int], float]] = []
        for name in names:
            counts = self._tenants[name]
            for key, amount in list(counts.unsynced.items()):
                if key[1] < minute - 1:
                    del counts.unsynced[key]  # too old to matter any more
                    continue
                pipe.incrbyfloat(f"{self._prefix}:{name}:{key[0]}:{key[1]}", amount)
                pipe.pexpire(f"{self._prefix}:{name}:{key[0]}:{key[1]}", ttl_ms)
                sent.append((counts, key, amount))
            for metric in (REQUESTS, TOKENS):
                for m in (minute - 1, minute):
                    pipe.get(f"{self._prefix}:{name}:{metric}:{m}")
            inflight_key = f"{self._prefix}:{name}:inflight"
            pipe.hset(inflight_key, self.replica, f"{counts.inflight}:{now:.3f}")
            pipe.pexpire(inflight_key, ttl_ms)
            pipe.hgetall(inflight_key)
        results = await pipe.execute()
        for counts, key, amount in sent:  # added: no longer this replica's own backlog
            left = counts.unsynced.get(key, 0.0) - amount
            if left > 1e-9:
                counts.unsynced[key] = left
            else:
                counts.unsynced.pop(key, None)
        i = 2 * len(sent)
        for name in names:
            counts = self._tenants[name]
            for metric in (REQUESTS, TOKENS):
                for m in (minute - 1, minute):
                    raw = results[i]
                    i += 1
                    counts.shared[(metric, m)] = float(raw) if raw is not None else 0.0
            i += 2  # hset, pexpire
            others = 0
            for field, value in (results[i] or {}).items():
                replica = field.decode() if isinstance(field, bytes) else str(field)
                text = value.decode() if isinstance(value, bytes) else str(value)
                n, _, at = text.partition(":")
                with contextlib.suppress(ValueError):
                    if replica != self.replica and now - float(at) < stale_s:
                        others += int(n)
            i += 1
            counts.others_inflight = others
            for key in [k for k in counts.shared if k[1] < minute - 1]:
                del counts.shared[key]
            for key in [k for k in counts.local if k[1] < minute - 1]:
                del counts.local[key]


def open_limiter(store_url: str, key_prefix: str, sync_s: Callable[[], float]) -> Limiter:
    """The limiter for a store: shared through Redis for a ``redis://`` store, else local."""
    if store_url.startswith(("redis://", "rediss://", "unix://")):
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(store_url, socket_connect_timeout=1.0, socket_timeout=1.0)
        log.info("tenant limits shared through Redis at %s", redact_url(store_url))
        return Limiter(client, key_prefix, sync_s)
    return Limiter(None, key_prefix, sync_s)


class LimitsCollector(Collector):
    """The ``loraroute_tenant_*`` series of one ``Limiter``."""

    def __init__(self, limiter: Limiter) -> None:
        self._limiter = limiter

    def collect(self) -> Iterable[Metric]:
        lim = self._limiter
        requests = CounterMetricFamily("loraroute_tenant_requests", "Requests admitted per tenant (with limits)",
                                       labels=["tenant"])
        tokens = CounterMetricFamily("loraroute_tenant_prompt_tokens", "Prompt tokens admitted per tenant (estimated)",
                                     labels=["tenant"])
        inflight = GaugeMetricFamily("loraroute_tenant_inflight", "Requests in flight per tenant on this replica",
                                     labels=["tenant"])
        rejected = CounterMetricFamily("loraroute_tenant_rejected", "Requests refused with 429, per tenant and limit",
                                       labels=["tenant", "limit"])
        for name, n_requests, n_tokens, n_inflight in lim.snapshot():
            requests.add_metric([name], n_requests)
            tokens.add_metric([name], n_tokens)
            inflight.add_metric([name], n_inflight)
        for (name, limit), n in sorted(lim.rejected.items()):
            rejected.add_metric([name, limit], n)
        return [requests, tokens, inflight, rejected]
