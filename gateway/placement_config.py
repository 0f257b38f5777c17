"""The ``placement:`` section of the gateway config (docs/placement.md has every key).

Strict like the rest of ``gateway.config``: unknown keys are errors naming their path; the
``plan`` parameters are validated by ``scorer.placement.validate_plan_params``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from scorer.demand import DEFAULT_HALF_LIFE_S, DEFAULT_MAX_ADAPTERS
from scorer.errors import ConfigError as ScorerConfigError
from scorer.placement import validate_plan_params


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DemandConfig(_Strict):
    """The per-adapter demand estimate every replica keeps, shares and persists."""

    #: half-life of the decayed request counts, seconds
    half_life_s: float = Field(DEFAULT_HALF_LIFE_S, gt=0)
    #: adapters tracked per replica (the least demanded are dropped beyond it)
    max_adapters: int = Field(DEFAULT_MAX_ADAPTERS, ge=1, le=1_000_000)
    #: seconds between publishes of this replica's counts to the store
    publish_s: float = Field(5.0, gt=0)
    #: how long a replica's published counts outlive it, seconds (7 days)
    retention_s: float = Field(7 * 86400.0, gt=0)
    #: with ``store.url: memory://``: a JSON file that persists the counts across restarts
    #: (relative paths: from the working directory); null keeps them in memory only
    file: str | None = None


class PreloadConfig(_Strict):
    """Loads the placer makes on pods that take traffic."""

    enabled: bool = True
    #: a pod counts as lightly loaded (a load may stall it) with at most this many requests
    #: running or waiting, by its PodState and this gateway's own in-flight count
    max_busy: int = Field(1, ge=0)
    #: engine stall the placer may cause per pod per window (a load stalls every running request)
    stall_budget_s: float = Field(2.0, ge=0)
    budget_window_s: float = Field(60.0, gt=0)
    #: limit for one load call
    timeout_s: float = Field(60.0, gt=0)


class WarmupConfig(_Strict):
    """A pod that appears with nothing loaded is held out of traffic and warmed with its share
    of the (persisted) demand first."""

    enabled: bool = True
    #: a pod is released after this long even if its warm-up is not finished
    timeout_s: float = Field(120.0, gt=0)


class PlacementConfig(_Strict):
    """Demand, plan and placer (``gateway.placer``). Off by default."""

    enabled: bool = False
    #: seconds between placer cycles (read demand, plan, act)
    interval_s: float = Field(1.0, gt=0)
    #: the leader lease's lifetime; the leader renews it every cycle
    lease_ttl_s: float = Field(10.0, gt=0)
    #: this replica's id in the store (leader lease, demand key); default: host name, pid and a
    #: random suffix (a restarted replica is a new writer; the counts of the old one still count
    #: until they decay or expire, which is right: that traffic happened)
    replica_id: str | None = Field(None, min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:-]+$")
    #: where a pod without a sidecar keeps adapters, as seen by its vLLM server
    #: (``lora_path`` of ``/v1/load_lora_adapter`` = adapter_dir/name); null: such pods are not preloaded
    adapter_dir: str | None = None
    #: actions (taken and skipped) kept for GET /admin/placement
    actions_kept: int = Field(500, ge=0, le=100_000)
    demand: DemandConfig = DemandConfig()
    preload: PreloadConfig = PreloadConfig()
    warmup: WarmupConfig = WarmupConfig()
    #: parameters of the plan (scorer/placement.py): gpu_reserve, cpu_reserve, replica_load, ...
    plan: dict[str, Any] = Field(default_factory=dict)

    @field_validator("plan")
    @classmethod
    def _plan(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            validate_plan_params(v, "plan")
        except ScorerConfigError as e:
            raise ValueError(f"{e.path.split('.', 1)[-1]}: {e.detail}") from None
        return v

    def plan_params(self) -> dict[str, Any]:
        return validate_plan_params(self.plan)
