"""Per-adapter demand: an exponentially decayed request count per (base, adapter), online.

Each router counts what it dispatches (``DemandTracker.observe``, fed by
``Pipeline.on_dispatch``) and publishes its own counts (``snapshot``); anyone merges the
snapshots of every writer (``merge_demand``) into one ``Demand``: the cluster's request rate per
adapter, its share of all adapter requests and when it was last seen. Pure: no I/O, no clock of
its own (every time comes in as ``now``).

Estimator, per key k = (base, adapter), with decay rate κ = ln 2 / half_life_s::

    on a request at time t:   c_k ← c_k · e^(−κ (t − t_k)) + 1,   t_k ← t
    rate_k(now)             = κ · c_k · e^(−κ (now − t_k))        (requests per second)
    share_k(now)            = rate_k(now) / Σ_j rate_j(now)

c_k is the request count seen through an exponential window of mean length 1/κ, so a steady
Poisson stream of rate λ gives E[rate_k] → λ once the window has filled (after a few half-lives).
A merged rate is the sum over writers (each router counts only its own dispatches). Shares are
computed from log-rates (``log c_k + log κ − κ (now − t_k)``), so a snapshot that has been sitting
in a store for days still ranks its adapters correctly even when every rate has decayed below
what a float can hold: a cluster restarted this morning knows yesterday's popular adapters.

A restarted cluster: decay runs on the wall clock, so counts persisted yesterday weigh ~2⁻¹⁴⁴ of
today's after a day with a 10-minute half-life — the first live request would wipe out everything
yesterday said. ``resume_from`` therefore gives a replica that finds no *live* writer in the store
(none published within ``live_window_s``) the persisted counts as its own starting counts, with the
downtime taken out (each snapshot decayed only to the newest one's publication, then dated now).
Yesterday's demand is then a prior that live traffic outweighs over a few half-lives. When another
writer is live, its counts already carry the present and nothing is resumed.

Bounded: a tracker keeps at most ``max_adapters`` keys; past that it drops the 10 % with the
smallest decayed counts in one pass (amortised O(log n) per new key).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from scorer.model import RoutingRequest

DEFAULT_HALF_LIFE_S = 600.0
DEFAULT_MAX_ADAPTERS = 4096
_LN2 = math.log(2.0)

DemandKey = tuple[str, str]  # (served base name, adapter name as vLLM knows it)


@dataclass(frozen=True, slots=True)
class DemandEntry:
    """One adapter's decayed count ``count`` as of time ``at``; ``last_seen``: its last request."""

    base: str
    adapter: str
    count: float
    at: float
    last_seen: float


@dataclass(frozen=True, slots=True)
class DemandSnapshot:
    """What one writer (a router replica) publishes: its own decayed counts."""

    writer: str
    published_at: float
    half_life_s: float
    entries: tuple[DemandEntry, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "writer": self.writer,
            "published_at": self.published_at,
            "half_life_s": self.half_life_s,
            "entries": [[e.base, e.adapter, e.count, e.at, e.last_seen] for e in self.entries],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DemandSnapshot:
        """Strict: a malformed record raises ``ValueError`` naming what is wrong."""
        try:
            writer = str(data["writer"])
            published_at = float(data["published_at"])
            half_life = float(data["half_life_s"])
            raw = data["entries"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"demand snapshot needs writer, published_at, half_life_s, entries ({e})") from None
        if not half_life > 0 or not isinstance(raw, list):
            raise ValueError("demand snapshot: half_life_s must be > 0 and entries a list")
        entries = []
        for i, item in enumerate(raw):
            if not isinstance(item, list | tuple) or len(item) != 5:
                raise ValueError(f"demand snapshot entry {i}: expected [base, adapter, count, at, last_seen]")
            base, adapter, count, at, last = item
            if not isinstance(base, str) or not isinstance(adapter, str):
                raise ValueError(f"demand snapshot entry {i}: base and adapter must be strings")
            count_f = float(count)
            if not count_f > 0 or not math.isfinite(count_f):
                raise ValueError(f"demand snapshot entry {i}: count must be a positive number")
            entries.append(DemandEntry(base, adapter, count_f, float(at), float(last)))
        return cls(writer, published_at, half_life, tuple(entries))


class DemandTracker:
    """One writer's decayed counts; ``observe`` is on the request path (a dict lookup, an exp)."""

    __slots__ = ("half_life_s", "max_adapters", "_k", "_counts", "_last_request")

    def __init__(self, half_life_s: float = DEFAULT_HALF_LIFE_S, max_adapters: int = DEFAULT_MAX_ADAPTERS) -> None:
        self.half_life_s = half_life_s
        self.max_adapters = max_adapters
        self._k = _LN2 / half_life_s
        # key -> [count, at, last_seen]
        self._counts: dict[DemandKey, list[float]] = {}
        self._last_request: RoutingRequest | None = None

    def configure(self, half_life_s: float, max_adapters: int) -> None:
        """New settings; counts kept (they were decayed with the old half-life until now)."""
        if not half_life_s > 0 or max_adapters < 1:
            raise ValueError("half_life_s must be > 0 and max_adapters >= 1")
        self.half_life_s = half_life_s
        self.max_adapters = max_adapters
        self._k = _LN2 / half_life_s
        if len(self._counts) > max_adapters:
            self._prune(now=max((v[1] for v in self._counts.values()), default=0.0))

    def __len__(self) -> int:
        return len(self._counts)

    def observe(self, request: RoutingRequest, now: float) -> None:
        """Count one dispatched request (a retry of the same request object counts once)."""
        if request is self._last_request:
            return
        self._last_request = request
        ref = request.adapter
        if ref.name is None:
            return
        key = (ref.base, ref.name)
        entry = self._counts.get(key)
        if entry is None:
            self._counts[key] = [1.0, now, now]
            if len(self._counts) > self.max_adapters:
                self._prune(now)
            return
        dt = now - entry[1]
        entry[0] = entry[0] * math.exp(-self._k * dt) + 1.0 if dt > 0 else entry[0] + 1.0
        if dt > 0:
            entry[1] = now
        entry[2] = now

    def _prune(self, now: float) -> None:
        keep = int(self.max_adapters * 0.9) or 1
        k = self._k
        ranked = sorted(self._counts.items(), key=lambda kv: math.log(kv[1][0]) - k * (now - kv[1][1]), reverse=True)
        self._counts = dict(ranked[:keep])

    def snapshot(self, writer: str, now: float) -> DemandSnapshot:
        entries = tuple(
            DemandEntry(base, adapter, v[0], v[1], v[2]) for (base, adapter), v in self._counts.items()
        )
        return DemandSnapshot(writer, now, self.half_life_s, entries)

    def load(self, snapshot: DemandSnapshot) -> None:
        """Continue from a snapshot this writer published earlier (its counts replace ours)."""
        self._counts = {(e.base, e.adapter): [e.count, e.at, e.last_seen] for e in snapshot.entries}
        if len(self._counts) > self.max_adapters:
            self._prune(snapshot.published_at)


@dataclass(frozen=True, slots=True)
class AdapterDemand:
    base: str
    adapter: str
    rate_rps: float
    share: float
    last_seen: float
    log_rate: float


@dataclass(frozen=True, slots=True)
class Demand:
    """The merged demand at time ``at``: adapters by share, most demanded first."""

    at: float
    adapters: tuple[AdapterDemand, ...]
    writers: tuple[str, ...]

    @property
    def total_rps(self) -> float:
        return sum(a.rate_rps for a in self.adapters)

    def by_key(self) -> dict[DemandKey, AdapterDemand]:
        return {(a.base, a.adapter): a for a in self.adapters}

    def to_dict(self, limit: int | None = None) -> dict[str, Any]:
        items = self.adapters if limit is None else self.adapters[:limit]
        return {
            "at": round(self.at, 3),
            "writers": list(self.writers),
            "adapters_tracked": len(self.adapters),
            "total_rps": round(self.total_rps, 6),
            "adapters": [
                {"base": a.base, "adapter": a.adapter, "rate_rps": round(a.rate_rps, 6), "share": round(a.share, 6),
                 "last_seen": round(a.last_seen, 3)}
                for a in items
            ],
        }


def merge_demand(snapshots: Iterable[DemandSnapshot], now: float) -> Demand:
    """Sum every writer's decayed rates at ``now``; shares from log-rates (see module docstring)."""
    logs: dict[DemandKey, list[float]] = {}
    last: dict[DemandKey, float] = {}
    writers: list[str] = []
    for snap in snapshots:
        writers.append(snap.writer)
        k = _LN2 / snap.half_life_s
        log_k = math.log(k)
        for e in snap.entries:
            key = (e.base, e.adapter)
            logs.setdefault(key, []).append(math.log(e.count) + log_k - k * max(0.0, now - e.at))
            if e.last_seen > last.get(key, float("-inf")):
                last[key] = e.last_seen
    if not logs:
        return Demand(now, (), tuple(writers))
    merged = {key: _logsumexp(values) for key, values in logs.items()}
    total = _logsumexp(list(merged.values()))
    out = [
        AdapterDemand(base, adapter, math.exp(lr), math.exp(lr - total), last[(base, adapter)], lr)
        for (base, adapter), lr in merged.items()
    ]
    out.sort(key=lambda a: (-a.log_rate, a.base, a.adapter))
    return Demand(now, tuple(out), tuple(sorted(set(writers))))


def resume_from(snapshots: Iterable[DemandSnapshot], writer: str, now: float, live_window_s: float) -> DemandSnapshot | None:
    """The persisted demand as ``writer``'s starting counts (see the module docstring); None
    when there is nothing persisted or another writer is live."""
    snaps = [s for s in snapshots if s.writer != writer]
    if not snaps or any(now - s.published_at <= live_window_s for s in snaps):
        return None
    end = max(s.published_at for s in snaps)
    counts: dict[DemandKey, float] = {}
    last: dict[DemandKey, float] = {}
    for snap in snaps:
        k = _LN2 / snap.half_life_s
        for e in snap.entries:
            key = (e.base, e.adapter)
            counts[key] = counts.get(key, 0.0) + e.count * math.exp(-k * max(0.0, end - e.at))
            last[key] = max(last.get(key, float("-inf")), e.last_seen)
    entries = tuple(DemandEntry(b, a, c, now, last[(b, a)]) for (b, a), c in counts.items() if c > 0)
    return DemandSnapshot(writer, now, snaps[0].half_life_s, entries)


def _logsumexp(values: list[float]) -> float:
    m = max(values)
    if len(values) == 1:
        return m
    return m + math.log(sum(math.exp(v - m) for v in values))
