"""Run-time changes as data: what an operator may propose, the record of one change, and the
overlay of approved changes laid over the config file.

Kinds (``POST /admin/changes`` bodies; every key checked strictly):

=====================  ==============================================================================
``allowlist.add``      ``{base, adapter, rank?, served_name?, version?}``: the adapter becomes callable as
                       ``<base>:<adapter>``; ``version`` (default: the store's current one) is pinned
``allowlist.retire``   ``{base, adapter}``: no longer callable (404 with the nearest names)
``adapter.roll``       ``{base, adapter, version}``: every pod fetches that version; pods that hold the
                       adapter swap it in place (vLLM's in-place load)
``pipeline.weights``   ``{weights: {scorer name: weight}}``: re-weights the routing pipeline's scorers
=====================  ==============================================================================

Each body may carry ``reason`` (shown in the audit log).

The ``Overlay`` is the sum of applied changes: adapters added (with their pinned version),
adapters retired, version pins, weights. ``Overlay.apply(config)`` lays it over the config file
on every (re)load, so a file change keeps approved changes, and an approved change survives a
restart (the overlay is stored). ``Overlay.after(spec, config)`` is the overlay with one more
change; ``describe(spec, config)`` its before/after values, which a rollback restores.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from gateway.config import ADAPTER_NAME_RE, AdapterConfig, BaseConfig, ConfigError, GatewayConfig

VERSION_PATTERN = r"^[0-9a-f]{12}$"
Status = Literal["pending", "applied", "failed", "rejected", "expired", "rolled_back"]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    reason: str = Field("", max_length=1000)


def _adapter_name(v: str) -> str:
    if not ADAPTER_NAME_RE.match(v) or ".." in v:
        raise ValueError("not a valid adapter name: letters, digits, '.', '_', '-', starting with a letter or digit")
    return v


class AddAdapter(_Spec):
    kind: Literal["allowlist.add"]
    base: str = Field(min_length=1, max_length=256)
    adapter: str
    rank: int | None = Field(None, ge=1, le=1024)
    served_name: str | None = None
    version: str | None = Field(None, pattern=VERSION_PATTERN)

    _name = field_validator("adapter", "served_name")(lambda v: v if v is None else _adapter_name(v))

    def summary(self) -> str:
        pinned = f" at version {self.version}" if self.version else ""
        return f"add {self.base}:{self.adapter} to the allowlist{pinned}"


class RetireAdapter(_Spec):
    kind: Literal["allowlist.retire"]
    base: str = Field(min_length=1, max_length=256)
    adapter: str

    _name = field_validator("adapter")(lambda v: _adapter_name(v))

    def summary(self) -> str:
        return f"retire {self.base}:{self.adapter} from the allowlist"


class RollAdapter(_Spec):
    kind: Literal["adapter.roll"]
    base: str = Field(min_length=1, max_length=256)
    adapter: str
    version: str | None = Field(pattern=VERSION_PATTERN)

    _name = field_validator("adapter")(lambda v: _adapter_name(v))

    def summary(self) -> str:
        return f"roll {self.base}:{self.adapter} to version {self.version or '(the store current one)'}"


class SetWeights(_Spec):
    kind: Literal["pipeline.weights"]
    weights: dict[str, float] = Field(min_length=1, max_length=64)

    @field_validator("weights")
    @classmethod
    def _finite(cls, v: dict[str, float]) -> dict[str, float]:
        for name, w in v.items():
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"weight of {name!r} must be a finite number >= 0")
        return v

    def summary(self) -> str:
        return "set pipeline weights " + ", ".join(f"{k}={v:g}" for k, v in sorted(self.weights.items()))


ChangeSpec = Annotated[AddAdapter | RetireAdapter | RollAdapter | SetWeights, Field(discriminator="kind")]
SPEC: TypeAdapter[ChangeSpec] = TypeAdapter(ChangeSpec)  # type: ignore[type-arg]


class Effect(BaseModel):
    """What one pod did for a change (a roll's refresh)."""

    pod: str
    status: Literal["replaced", "current", "absent", "no_sidecar", "failed"]
    version: str | None = None
    previous_version: str | None = None
    reloaded: bool = False
    error: str | None = None


class Change(BaseModel):
    id: str
    spec: ChangeSpec
    status: Status
    needs_approval: bool
    proposed_by: str
    proposed_at: float
    decided_by: str | None = None
    decided_at: float | None = None
    decision_note: str = ""
    applied_at: float | None = None
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    checksums: dict[str, str] = Field(default_factory=dict)
    effects: list[Effect] = Field(default_factory=list)
    error: str | None = None
    rollback_of: str | None = None
    rolled_back_by: str | None = None
    note: str = ""

    @property
    def what(self) -> str:
        text = self.spec.summary()
        return f"{text} (rollback of {self.rollback_of})" if self.rollback_of else text

    def to_api(self) -> dict[str, Any]:
        out = self.model_dump(mode="json")
        out["what"] = self.what
        out["kind"] = self.spec.kind
        for key in ("proposed_at", "decided_at", "applied_at"):
            if out[key] is not None:
                out[key.replace("_at", "_time")] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(out[key]))
        return out


# --------------------------------------------------------------------------------------------
# the overlay
# --------------------------------------------------------------------------------------------
def find_base(config: GatewayConfig, name: str) -> BaseConfig:
    for b in config.bases:
        if name == b.name or name in b.aliases:
            return b
    known = ", ".join(b.name for b in config.bases) or "none"
    raise ConfigError(f"no base named {name!r} (bases: {known})")


def find_adapter(base: BaseConfig, name: str) -> AdapterConfig | None:
    return next((a for a in base.adapters if a.name == name), None)


class Overlay(BaseModel):
    model_config = ConfigDict(extra="forbid")
    generation: int = 0
    #: base name -> adapter name -> entry
    added: dict[str, dict[str, AdapterConfig]] = Field(default_factory=dict)
    retired: dict[str, list[str]] = Field(default_factory=dict)
    #: base name -> adapter name -> pinned version (None: explicitly unpinned)
    pins: dict[str, dict[str, str | None]] = Field(default_factory=dict)
    weights: dict[str, float] = Field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.added or self.retired or self.pins or self.weights)

    def apply(self, config: GatewayConfig) -> GatewayConfig:
        """``config`` with the overlay laid over it (entries for bases the file no longer has are
        ignored); bases are re-validated, the pipeline is validated when it is built."""
        if self.empty:
            return config
        bases = []
        for b in config.bases:
            retired = set(self.retired.get(b.name, ()))
            adapters = [a for a in b.adapters if a.name not in retired]
            names = {a.name for a in adapters}
            adapters += [a for n, a in self.added.get(b.name, {}).items() if n not in names and n not in retired]
            pins = self.pins.get(b.name, {})
            adapters = [a.model_copy(update={"version": pins[a.name]}) if a.name in pins else a for a in adapters]
            bases.append(BaseConfig.model_validate({**b.model_dump(), "adapters": [a.model_dump() for a in adapters]}))
        pipeline: str | dict[str, Any] = config.pipeline
        if self.weights:
            spec = {"preset": pipeline} if isinstance(pipeline, str) else copy.deepcopy(pipeline)
            spec["weights"] = {**(spec.get("weights") or {}), **self.weights}
            pipeline = spec
        return config.model_copy(update={"bases": tuple(bases), "pipeline": pipeline})

    def after(self, spec: ChangeSpec, config: GatewayConfig) -> Overlay:
        """The overlay with ``spec`` applied (``config`` is the effective config before it)."""
        nxt = self.model_copy(deep=True)
        nxt.generation += 1
        if isinstance(spec, SetWeights):
            nxt.weights.update(spec.weights)
            return nxt
        base = find_base(config, spec.base).name
        if isinstance(spec, AddAdapter):
            if base in nxt.retired and spec.adapter in nxt.retired[base]:
                nxt.retired[base].remove(spec.adapter)
            nxt.added.setdefault(base, {})[spec.adapter] = AdapterConfig(
                name=spec.adapter, rank=spec.rank, served_name=spec.served_name, version=spec.version)
            nxt.pins.get(base, {}).pop(spec.adapter, None)
        elif isinstance(spec, RetireAdapter):
            if spec.adapter in nxt.added.get(base, {}):
                del nxt.added[base][spec.adapter]
            else:
                nxt.retired.setdefault(base, []).append(spec.adapter)
            nxt.pins.get(base, {}).pop(spec.adapter, None)
        else:
            nxt.pins.setdefault(base, {})[spec.adapter] = spec.version
        for table in (nxt.added, nxt.retired, nxt.pins):
            for key in [k for k, v in table.items() if not v]:
                del table[key]
        return nxt


def current_weights(pipeline: Any) -> dict[str, float]:
    """Scorer name -> weight of a built pipeline."""
    return {name: weight for name, _scorer, weight in pipeline.scorers}


def describe(spec: ChangeSpec, config: GatewayConfig, weights: dict[str, float]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(before, after) values of what ``spec`` changes, in ``config`` (the effective config) and
    the current pipeline ``weights``. Raises ``ConfigError`` when the change does not fit the
    current state (an adapter added twice, retired when absent, rolled to its own version)."""
    if isinstance(spec, SetWeights):
        unknown = sorted(set(spec.weights) - set(weights))
        if unknown:
            raise ConfigError(f"pipeline has no scorer named {', '.join(unknown)} (scorers: {', '.join(weights)})")
        return {"weights": {k: weights[k] for k in spec.weights}}, {"weights": dict(spec.weights)}
    base = find_base(config, spec.base)
    entry = find_adapter(base, spec.adapter)
    if isinstance(spec, AddAdapter):
        if entry is not None:
            raise ConfigError(f"{base.name}:{spec.adapter} is already in the allowlist")
        return {"adapter": None}, {"adapter": AdapterConfig(name=spec.adapter, rank=spec.rank,
                                                              served_name=spec.served_name,
                                                              version=spec.version).model_dump()}
    if entry is None:
        raise ConfigError(f"{base.name}:{spec.adapter} is not in the allowlist")
    if isinstance(spec, RetireAdapter):
        return {"adapter": entry.model_dump()}, {"adapter": None}
    if entry.version == spec.version:
        raise ConfigError(f"{base.name}:{spec.adapter} is already at version {spec.version}")
    return {"version": entry.version}, {"version": spec.version}


def inverse(change: Change) -> ChangeSpec:
    """The change that restores ``change.before``."""
    spec = change.spec
    before = change.before or {}
    reason = f"rollback of {change.id}"
    if isinstance(spec, SetWeights):
        return SetWeights(kind="pipeline.weights", weights=before["weights"], reason=reason)
    if isinstance(spec, AddAdapter):
        return RetireAdapter(kind="allowlist.retire", base=spec.base, adapter=spec.adapter, reason=reason)
    if isinstance(spec, RetireAdapter):
        old = AdapterConfig.model_validate(before["adapter"])
        return AddAdapter(kind="allowlist.add", base=spec.base, adapter=old.name, rank=old.rank,
                          served_name=old.served_name, version=old.version, reason=reason)
    return RollAdapter(kind="adapter.roll", base=spec.base, adapter=spec.adapter, version=before["version"],
                       reason=reason)
