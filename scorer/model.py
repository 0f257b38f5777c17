"""The data model every part of loraroute shares.

Pure data: no I/O, no asyncio. ``PodState`` is what a sidecar (or the gateway's own poller)
publishes about one vLLM pod and what the scorer reads; ``RoutingRequest`` is what the gateway
builds from one client request; ``Decision`` is what the pipeline returns, with the score each
scorer gave each candidate so that every routing decision can be explained.

PodState travels as JSON (Redis values, pub/sub messages, admin API). ``to_dict`` /
``from_dict`` are the only (de)serialisers; ``from_dict`` ignores keys it does not know so an
older reader survives a newer writer, and refuses a newer *major* schema version.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

SCHEMA_VERSION = 1

# Where a requested adapter sits on a pod, best first (``scorer.view.placement`` decides it):
# the base model itself, on GPU, just sent there by this router, being loaded, in vLLM's CPU
# LoRA cache, on the pod's disk, nowhere on the pod.
T_BASE, T_GPU, T_INCOMING, T_LOADING, T_CPU, T_DISK, T_REMOTE = range(7)
TIER_NAMES = ("base", "gpu", "incoming", "loading", "cpu", "disk", "remote")

ResidencySource = Literal["exact", "estimated", "none"]


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """One LoRA adapter as a request names it.

    ``base`` is the served base-model name vLLM knows, ``name`` the adapter name vLLM knows
    (``None`` means the base model itself), ``rank`` the adapter's LoRA rank when known.
    """

    base: str
    name: str | None
    rank: int | None = None

    @property
    def vllm_model(self) -> str:
        """The ``model`` value to send to vLLM: the adapter name, or the base for no adapter."""
        return self.name if self.name is not None else self.base


@dataclass(frozen=True, slots=True)
class PodState:
    """Everything the router knows about one vLLM pod at one moment.

    Adapter lists are names as vLLM knows them. ``gpu_adapters`` is ordered least recently
    used first (the next eviction victim is ``gpu_adapters[0]``); ``cpu_adapters`` likewise.
    ``running_adapters`` are the adapters with requests in flight (vLLM's
    ``lora_requests_info``), which is activity, not residency.

    Times are Unix seconds (``time.time()``); ``observed_at`` is when the pod itself was last
    scraped successfully, ``published_at`` when this record was written.

    ``lora_ready`` is False while a freshly started engine has not yet served a LoRA request
    (the sidecar sends a warm-up one: an eager vLLM compiles its LoRA kernels on the first,
    ≈ 3.7 s); adapter requests are not routed to it meanwhile (filter ``lora-ready``). Writers
    that do not warm pods up leave it True.
    """

    pod_id: str
    url: str
    sidecar_url: str | None = None
    base_models: tuple[str, ...] = ()
    healthy: bool = True
    lora_ready: bool = True
    # engine limits
    max_loras: int = 1
    max_cpu_loras: int = 1
    max_lora_rank: int = 16
    block_size: int = 16
    num_gpu_blocks: int = 0
    # load
    kv_cache_usage: float = 0.0
    num_running: int = 0
    num_waiting: int = 0
    num_deferred: int = 0
    # adapters
    gpu_adapters: tuple[str, ...] = ()
    cpu_adapters: tuple[str, ...] = ()
    disk_adapters: tuple[str, ...] = ()
    loading_adapters: tuple[str, ...] = ()
    running_adapters: tuple[str, ...] = ()
    adapter_ranks: dict[str, int] = field(default_factory=dict)
    residency_source: ResidencySource = "estimated"
    # prefix cache counters (tokens, cumulative)
    prefix_cache_queries: float = 0.0
    prefix_cache_hits: float = 0.0
    # freshness
    observed_at: float = 0.0
    published_at: float = 0.0
    schema_version: int = SCHEMA_VERSION

    def age(self, now: float | None = None) -> float:
        """Seconds since the pod was last observed."""
        return (time.time() if now is None else now) - self.observed_at

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PodState:
        version = int(data.get("schema_version", SCHEMA_VERSION))
        if version > SCHEMA_VERSION:
            raise ValueError(
                f"PodState schema_version {version} is newer than this reader ({SCHEMA_VERSION}); "
                "upgrade the gateway before the sidecars"
            )
        if "pod_id" not in data or "url" not in data:
            raise ValueError("PodState needs at least 'pod_id' and 'url'")
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if isinstance(value, list):
                value = tuple(value)
            kwargs[f.name] = value
        if "adapter_ranks" in kwargs:
            kwargs["adapter_ranks"] = {str(k): int(v) for k, v in kwargs["adapter_ranks"].items()}
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str | bytes) -> PodState:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> PodState:
        return dataclasses.replace(self, **changes)

    def same_content(self, other: PodState | None) -> bool:
        """True when nothing but the timestamps differ (a heartbeat, not a change)."""
        if other is None:
            return False
        return dataclasses.replace(self, observed_at=0.0, published_at=0.0) == dataclasses.replace(
            other, observed_at=0.0, published_at=0.0
        )


@dataclass(slots=True)
class RoutingRequest:
    """One client request as the scorer sees it.

    ``prefix_hashes`` is the chain of block hashes of the prompt (see ``scorer.prefix``), seeded
    with base and adapter so caches never cross adapters. ``prompt_tokens`` is an estimate.
    ``prompt_token_ids`` are the prompt's tokens as the pods' tokenizer and chat template make
    them, when the caller knows them (empty otherwise): ``precise-prefix`` hashes them as vLLM does.
    """

    adapter: AdapterRef
    prompt_tokens: int = 0
    max_tokens: int = 0
    prefix_hashes: tuple[int, ...] = ()
    session_key: str | None = None
    request_id: str = ""
    prompt_token_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class Candidate:
    """One pod's standing in a decision: total and per-scorer raw scores (each in [0, 1]).

    ``kv``, when the pipeline reads KV events (``precise-prefix``), is the prefix state the pick
    used for this pod: ``live`` (its event stream counted; None: not judged, the request had no
    token ids or no pod was in the index), ``precise`` / ``precise_of`` (leading vLLM blocks it
    held of the prompt's, live pods only) and ``approx`` / ``approx_of`` (the approximate index's
    leading blocks of the prompt's; None when no scorer consulted it for this pick)."""

    pod_id: str
    total: float
    scores: dict[str, float]
    kv: dict[str, Any] | None = None


@dataclass(slots=True)
class Decision:
    """What the pipeline chose and why.

    ``ranked`` holds every candidate that passed the filters, best first, so the gateway can
    fall back to the next one; ``filtered`` names the pods removed and by which filter.

    What the gateway asks of a decision, besides its fields: ``ranked_ids()`` (the fallback
    order), ``matched_blocks(pod)`` and ``stored_tier(pod)``. A decision built from plain data
    (a copy, an unpickled one) answers 0 and None for the last two; the pipeline's own
    decisions (``scorer.decision.LazyDecision``) answer from what it saw at pick time.
    """

    pod_id: str | None
    ranked: list[Candidate]
    filtered: dict[str, str]
    policy: str
    elapsed_us: float = 0.0
    reason: str = ""
    # the learned cost constants the picked pod's group was scored with (None: not learned)
    costs: dict[str, Any] | None = None

    def ranked_ids(self) -> list[str]:
        """Candidate pod ids, best first (the picked pod first): the fallback order."""
        return [c.pod_id for c in self.ranked]

    def matched_blocks(self, pod_id: str) -> int:
        """Leading prompt blocks the prefix index attributed to ``pod_id`` at pick time."""
        return 0

    def stored_tier(self, pod_id: str) -> int | None:
        """Where ``pod_id``'s own state put the requested adapter at pick time (a ``T_*`` tier;
        ``T_BASE`` for a base-model request); None when the pod was not a candidate."""
        return None

    def explain(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "picked": self.pod_id,
            "reason": self.reason,
            "candidates": [
                {"pod": c.pod_id, "total": round(c.total, 6), "scores": {k: round(v, 6) for k, v in c.scores.items()},
                 **({"kv": c.kv} if c.kv is not None else {})}
                for c in self.ranked
            ],
            "filtered": dict(self.filtered),
            "elapsed_us": round(self.elapsed_us, 1),
            **({"costs": self.costs} if self.costs is not None else {}),
        }
