"""Routing state shared between gateway replicas: what one replica publishes, and the merge.

Behind a Service each gateway replica sees a part of the traffic. What the replicas must agree
on to route well is published by each of them as *absolute* figures of its own (never deltas, so
a lost message costs nothing and a newcomer needs only the latest one per peer):

- per pod: requests and tokens in flight (``PodLocal.own_inflight`` / ``own_tokens``), the
  seconds of queued work it sent there that the pod has not worked off yet
  (``own_pending_until − now``), and the adapters it has just sent there that the pod does not
  show yet (its incoming marks, ``PodLocal.sent``) with their age;
- per pod group, less often: the learned cost model's sufficient statistics (``A``, ``b`` of
  ``scorer.costmodel.CostFit``).

The merge, on every replica, in memory (the request path reads the result, never the store)::

    inflight(p)      = own_inflight(p)  + Σ_fresh peers  inflight_peer(p)
    inflight_tok(p)  = own_tokens(p)    + Σ_fresh peers  tokens_peer(p)
    pending_until(p) = max(own_pending_until(p), now) + Σ_fresh peers max(0, pending_peer(p) − age)
    incoming(p)      = own marks ∪ peers' marks (expiry = their send time + incoming_ttl_s),
                       less those the pod's own state already shows on GPU or loading
    cost fit(g)      solves (A_own + Σ_peers A_peer + ρI) θ = b_own + Σ_peers b_peer + ρθ0

A peer is *fresh* while its latest figures are younger than ``stale_s`` (receipt time on this
replica's clock, so the replicas' clocks need not agree); an older one counts for nothing, so a
replica that dies or is cut off stops counting within ``stale_s``. With no fresh peer the merged
figures are the own ones: exactly the local behaviour.

Why the cost model is combined through its statistics rather than by pooling observations: the
statistics are absolute (a replica's latest message replaces its previous one, nothing is
counted twice, a lost message costs nothing), a replica that starts reads every peer's learning
at once from their keys instead of waiting for new observations, and the pooled system is the
same one a single router that had seen every replica's requests would solve (each replica's
Huber weights and decay are its own). A message is 110 floats per pod group.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from scorer.costmodel import D, FEATURES_FORM, CostLearner
from scorer.state import LocalState


@dataclass(frozen=True, slots=True)
class PodFigures:
    """One replica's own figures for one pod."""

    inflight: int
    tokens: int
    pending_s: float                          # queued work left when it was sent, seconds
    incoming: tuple[tuple[str, float], ...]   # (adapter, seconds since it was sent there)


@dataclass(frozen=True, slots=True)
class GroupStats:
    """One replica's own cost-model statistics for one pod group."""

    A: np.ndarray   # (D, D)
    b: np.ndarray   # (D,)
    count: float    # decayed observations behind them


@dataclass(slots=True)
class Peer:
    """What this replica last heard from one other replica (``*_at``: local receipt times)."""

    replica: str
    pods: dict[str, PodFigures] = field(default_factory=dict)
    figures_at: float = float("-inf")
    costs: dict[str, GroupStats] = field(default_factory=dict)
    costs_at: float = float("-inf")


def own_figures(local: LocalState, now: float) -> dict[str, PodFigures]:
    """This replica's own figures per pod (pods with nothing of its own are left out)."""
    out: dict[str, PodFigures] = {}
    ttl = local.incoming_ttl_s
    for pod_id, loc in local.pods.items():
        pending = loc.own_pending_until - now
        inc = loc.incoming
        marks = tuple((n, now - t) for n, t in loc.sent.items() if n in inc and now - t < ttl) if loc.sent else ()
        if loc.own_inflight or pending > 0 or marks:
            out[pod_id] = PodFigures(loc.own_inflight, loc.own_tokens, pending if pending > 0 else 0.0, marks)
    return out


def fingerprint(local: LocalState) -> tuple[object, ...]:
    """Changes exactly when ``own_figures`` would publish something new (pending as its end time)."""
    return tuple(
        (pod_id, loc.own_inflight, loc.own_tokens, loc.own_pending_until, tuple(loc.sent))
        for pod_id, loc in local.pods.items()
        if loc.own_inflight or loc.own_pending_until or loc.sent
    )


def merge_figures(local: LocalState, peers: Iterable[Peer], now: float, stale_s: float) -> int:
    """Lay the fresh peers' figures over ``local`` (see the module docstring); returns how many
    peers were fresh. Pods the peers name that this replica does not know are ignored."""
    inflight: dict[str, int] = {}
    tokens: dict[str, int] = {}
    pending: dict[str, float] = {}
    marks: list[tuple[str, str, float]] = []
    ttl = local.incoming_ttl_s
    fresh = 0
    for peer in peers:
        age = now - peer.figures_at
        if age > stale_s:
            continue
        fresh += 1
        for pod_id, f in peer.pods.items():
            inflight[pod_id] = inflight.get(pod_id, 0) + f.inflight
            tokens[pod_id] = tokens.get(pod_id, 0) + f.tokens
            left = f.pending_s - age
            if left > 0:
                pending[pod_id] = pending.get(pod_id, 0.0) + left
            for name, sent_age in f.incoming:
                until = now - age - sent_age + ttl
                if until > now:
                    marks.append((pod_id, name, until))
    pods = local.pods
    for pod_id in list(local.peer_pods):  # pods the peers counted before and no longer do
        if pod_id not in inflight and pod_id not in pending:
            loc = pods.get(pod_id)
            if loc is not None:
                loc.peer_inflight = loc.peer_tokens = 0
                loc.inflight, loc.inflight_tokens = loc.own_inflight, loc.own_tokens
                loc.pending_until = loc.own_pending_until
            local.peer_pods.discard(pod_id)
    for pod_id in inflight.keys() | pending.keys():
        if pod_id not in local.views:
            continue
        loc = local.pod(pod_id)
        loc.peer_inflight = inflight.get(pod_id, 0)
        loc.peer_tokens = tokens.get(pod_id, 0)
        loc.inflight = loc.own_inflight + loc.peer_inflight
        loc.inflight_tokens = loc.own_tokens + loc.peer_tokens
        own_end = loc.own_pending_until if loc.own_pending_until > now else now
        loc.pending_until = own_end + pending.get(pod_id, 0.0)
        local.peer_pods.add(pod_id)
    for pod_id, name, until in marks:
        local.note_incoming(pod_id, name, until)
    return fresh


_FORM = f"#form{FEATURES_FORM}"   # suffix of the published group keys


def own_cost_stats(costs: CostLearner | None) -> dict[str, GroupStats]:
    """This replica's own statistics per pod group (groups without observations left out)."""
    if costs is None:
        return {}
    out: dict[str, GroupStats] = {}
    for group, fit in costs.fits.items():
        A, b, count = fit.own_stats()
        if count > 0:
            out[f"{group}{_FORM}"] = GroupStats(A, b, count)
    return out


def merge_costs(costs: CostLearner | None, peers: Iterable[Peer], now: float, stale_s: float) -> int:
    """Install the sum of the peers' statistics (those heard within ``stale_s``) in every fit;
    returns how many groups got peer statistics."""
    if costs is None or not costs.settings.enabled:
        return 0
    sums: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for peer in peers:
        if now - peer.costs_at > stale_s:
            continue
        for key, st in peer.costs.items():
            if not key.endswith(_FORM):
                continue   # another version's features: not summable with ours
            group = key[: -len(_FORM)]
            acc = sums.get(group)
            if acc is None:
                sums[group] = (st.A.copy(), st.b.copy())
            else:
                acc[0][...] += st.A
                acc[1][...] += st.b
    zero_A, zero_b = np.zeros((D, D)), np.zeros(D)
    for group, fit in list(costs.fits.items()):
        if group not in sums and fit.has_peer_stats:
            fit.set_peer_stats(zero_A, zero_b)
    for group, (A, b) in sums.items():
        costs.fit_for(group).set_peer_stats(A, b)
    return len(sums)


def peer_inflight(local: LocalState) -> Mapping[str, int]:
    """Requests the fresh peers have in flight, per pod (explanations, admin API)."""
    return {p: loc.peer_inflight for p, loc in local.pods.items() if loc.peer_inflight}
