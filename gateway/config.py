"""The gateway's one YAML config: strict pydantic models, environment overrides, secret files.

``load_config(path_or_dict, env=os.environ) -> GatewayConfig`` is the only entry point. Every
section forbids unknown keys; a validation error names the key path that is wrong
(``tenants.0.api_key_sha256.1: ...``) and never echoes the offending value (it may be a secret).

Environment overrides: a variable ``LORAROUTE__<SECTION>__<KEY>[__<KEY>...]`` sets the key at that
path (case-insensitive, ``__`` separates levels, list items by index: ``LORAROUTE__TENANTS__0__NAME``).
The value is parsed as YAML, so ``8080``, ``true``, ``[a, b]`` and ``{id: p0, url: "http://..."}``
work; an empty value is null. Overrides are applied before validation, so they are checked
exactly like the file (``podstate.envconfig``, shared with the sidecar).

Secrets: API keys are never stored in clear. ``api_key_sha256`` holds lowercase hex SHA-256 digests
(``printf %s "$KEY" | sha256sum``); ``api_key_sha256_file`` names a file (a mounted Kubernetes Secret)
with one digest per line (blank lines and ``#`` comments ignored). Relative file paths are resolved
against the config file's folder. Digests are read at load time and on every reload.

See docs/config.md for every key with its default.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from gateway.placement_config import PlacementConfig
from gateway.precise_config import StaticKVEvents, TokenizerConfig
from podstate import check_store_url
from podstate.envconfig import EnvOverrideError, apply_env_overrides

ENV_PREFIX = "LORAROUTE__"

#: Adapter names clients may use: a letter or digit first, then letters, digits, ``.``, ``_``, ``-``;
#: at most 128 characters; never ``..``. The same rule as the sidecar's store layout.
ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: Base names clients use: like adapter names, plus ``/`` (``meta-llama/Llama-3.1-8B``); no colon.
BASE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,255}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class ConfigError(ValueError):
    """The config is invalid; ``str(e)`` lists each problem with its key path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_adapter_name(name: str) -> str:
    if not ADAPTER_NAME_RE.match(name) or ".." in name:
        raise ValueError(
            f"adapter name {name!r} is not safe: use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, at most 128 characters, no '..'"
        )
    return name


def _read_digest_file(path_text: str, base_dir: Path | None) -> tuple[str, ...]:
    path = Path(path_text)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read digest file {path_text!r}: {e.strerror or e}") from None
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if not _SHA256_RE.match(line.lower()):
            raise ValueError(f"line {lineno} of digest file {path_text!r} is not a 64-hex-digit SHA-256 digest")
        out.append(line.lower())
    return tuple(out)


def _check_digests(values: list[str]) -> list[str]:
    out = []
    for i, value in enumerate(values):
        v = value.strip().lower()
        if not _SHA256_RE.match(v):
            raise ValueError(
                f"item {i} is not a SHA-256 hex digest (64 hex digits); store digests, never keys: "
                'printf %s "$KEY" | sha256sum'
            )
        out.append(v)
    return out


# --------------------------------------------------------------------------------------------
# server
# --------------------------------------------------------------------------------------------
class Timeouts(_Strict):
    """Upstream timeouts in seconds (gateway/deadlines.py; docs/config.md has them with the
    sidecar's in one table). ``first_byte_s`` is a streaming request's whole budget before its
    first body byte — every attempt, sidecar ensures included (the window in which a retry on
    another pod is still possible); each attempt's own limit is ``first_byte_factor`` × the
    pod's predicted TTFT, at least ``first_byte_floor_s`` (and at most the budget left). ``total_s`` bounds a whole upstream
    exchange (a non-streamed request's budget; its attempts get their first-byte limit plus
    ``token_s`` per ``max_tokens``); ``idle_s`` each silence mid-stream, ``idle_unhealthy_s``
    once the pod's monitor marks it unhealthy; ``ensure_s`` one HTTP call to a sidecar."""

    connect_s: float = Field(2.0, gt=0)
    first_byte_s: float = Field(120.0, gt=0)
    first_byte_floor_s: float = Field(10.0, gt=0)
    first_byte_factor: float = Field(4.0, ge=0)
    token_s: float = Field(0.25, ge=0)
    idle_s: float = Field(60.0, gt=0)
    idle_unhealthy_s: float = Field(5.0, gt=0)
    total_s: float = Field(900.0, gt=0)
    ensure_s: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Timeouts:
        if self.first_byte_s > self.total_s:
            raise ValueError(f"first_byte_s ({self.first_byte_s:g}) must not exceed total_s ({self.total_s:g})")
        if self.idle_unhealthy_s > self.idle_s:
            raise ValueError(f"idle_unhealthy_s ({self.idle_unhealthy_s:g}) must not exceed idle_s ({self.idle_s:g})")
        return self


class DrainConfig(_Strict):
    """Graceful shutdown on SIGTERM (gateway/drain.py): ``/ready`` answers 503 at once; new
    requests are still served for ``grace_s`` (while load balancers stop sending any), then
    refused with 503; requests in flight get ``deadline_s`` more to finish, after which their
    streams end with the error event. The chart's ``terminationGracePeriodSeconds`` covers both."""

    grace_s: float = Field(5.0, ge=0)
    deadline_s: float = Field(45.0, ge=0)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    #: the request line and headers together (larger: 431, gateway/http_limits.py)
    max_header_bytes: int = Field(32 * 1024, ge=1024, le=16 * 1024 * 1024)
    #: headers per request (more: 431)
    max_headers: int = Field(100, ge=8, le=10_000)
    timeouts: Timeouts = Timeouts()
    #: extra attempts on the next-best pod after a connect error or a 5xx before the first byte
    retries: int = Field(2, ge=0, le=10)
    #: keep-alive connections kept per pod
    pool_per_pod: int = Field(256, ge=1)
    #: seconds between config-file mtime checks; 0 turns file watching off
    reload_poll_s: float = Field(1.0, ge=0)
    #: request header whose value binds a session to a pod (session-affinity scorer)
    session_header: str = "x-session-id"
    #: recent decisions kept for GET /admin/decisions
    decisions_kept: int = Field(256, ge=0, le=100_000)
    #: prompt characters looked at for prefix hashing (longer prompts are truncated for hashing only;
    #: the block size is the pipeline's ``state.block_chars``)
    prefix_max_chars: int = Field(262_144, ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    drain: DrainConfig = DrainConfig()


# --------------------------------------------------------------------------------------------
# bases and adapters (the allowlist)
# --------------------------------------------------------------------------------------------
class AdapterConfig(_Strict):
    """One adapter a base may use. ``served_name`` is the name vLLM knows (default: ``name``);
    ``version`` pins the version the sidecars fetch (as ``loraroute adapters push`` prints it;
    default: whatever the store's live folder holds)."""

    name: str
    rank: int | None = Field(None, ge=1, le=1024)
    served_name: str | None = None
    version: str | None = Field(None, pattern=r"^[0-9a-f]{12}$")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_adapter_name(v)

    @property
    def vllm_name(self) -> str:
        return self.served_name or self.name


class BaseConfig(_Strict):
    """A base model. ``name`` is what clients write before the colon; ``served_name`` what vLLM
    serves (``--served-model-name``, default ``name``); ``aliases`` other names clients may use.
    ``adapters`` lists the allowed adapters: plain names or ``{name, rank, served_name}``;
    ``tokenizer`` how the gateway computes a prompt's token ids for precise prefix routing
    (``gateway.precise_config``)."""

    name: str
    served_name: str | None = None
    aliases: tuple[str, ...] = ()
    adapters: tuple[AdapterConfig, ...] = ()
    tokenizer: TokenizerConfig = TokenizerConfig()

    @field_validator("name", "aliases")
    @classmethod
    def _names(cls, v: Any) -> Any:
        for n in (v,) if isinstance(v, str) else v:
            if not BASE_NAME_RE.match(n) or ".." in n:
                raise ValueError(f"base name {n!r} is not safe: letters, digits, '.', '_', '-', '/'; no ':' or '..'")
        return v

    @field_validator("adapters", mode="before")
    @classmethod
    def _plain_names(cls, v: Any) -> Any:
        if isinstance(v, list | tuple):
            return [{"name": a} if isinstance(a, str) else a for a in v]
        return v

    @model_validator(mode="after")
    def _unique(self) -> BaseConfig:
        seen: set[str] = set()
        for a in self.adapters:
            if a.name in seen:
                raise ValueError(f"adapter {a.name!r} listed twice")
            seen.add(a.name)
        return self

    @property
    def vllm_name(self) -> str:
        return self.served_name or self.name


# --------------------------------------------------------------------------------------------
# tenants and admin
# --------------------------------------------------------------------------------------------
class _KeyDigests(_Strict):
    """API-key digests given inline (``api_key_sha256``) and/or in a file, one per line
    (``api_key_sha256_file``, typically a mounted Secret, relative to the config file)."""

    api_key_sha256: tuple[str, ...] = ()
    api_key_sha256_file: str | None = None

    @field_validator("api_key_sha256", mode="before")
    @classmethod
    def _digests(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list | tuple):
            return _check_digests([str(x) for x in v])
        return v

    @model_validator(mode="after")
    def _files(self, info: ValidationInfo) -> _KeyDigests:
        if self.api_key_sha256_file:
            base_dir = (info.context or {}).get("base_dir")
            extra = _read_digest_file(self.api_key_sha256_file, base_dir)
            object.__setattr__(self, "api_key_sha256", tuple(dict.fromkeys(self.api_key_sha256 + extra)))
        return self


class TenantLimits(_Strict):
    """A tenant's admission limits (gateway/limits.py); unset ones do not apply. Requests over a
    limit get 429 ``rate_limit_exceeded`` with ``Retry-After``."""

    #: requests admitted per minute (a sliding one-minute window)
    requests_per_minute: int | None = Field(None, ge=1)
    #: prompt tokens (the gateway's estimate, 4 characters a token) admitted per minute
    prompt_tokens_per_minute: int | None = Field(None, ge=1)
    #: requests in flight at once
    concurrent_requests: int | None = Field(None, ge=1)

    @property
    def any(self) -> bool:
        return (self.requests_per_minute is not None or self.prompt_tokens_per_minute is not None
                or self.concurrent_requests is not None)


class TenantConfig(_KeyDigests):
    """A tenant: its API-key digests and the models it may call.

    ``adapters`` are glob patterns (``fnmatch``): a pattern with a colon matches the full client
    name ``<base>:<adapter>``, a pattern without one matches the adapter name under any base.
    ``base_models`` lets the tenant call bare base names (no adapter). ``limits``: its own
    admission limits (default: ``limits.default``).
    """

    name: str = Field(min_length=1, max_length=128)
    adapters: tuple[str, ...] = ("*",)
    base_models: bool = True
    limits: TenantLimits | None = None


class LimitsConfig(_Strict):
    """Tenant limits (gateway/limits.py). ``default`` applies to every tenant without its own
    ``limits``. With a Redis store the counts are shared by every gateway replica (each adds
    its own and reads the others' every ``sync_s``); with ``memory://`` they are this process's."""

    default: TenantLimits = TenantLimits()
    sync_s: float = Field(0.25, gt=0, le=10)

Role = Literal["viewer", "operator", "approver"]
ChangeKind = Literal["allowlist.add", "allowlist.retire", "adapter.roll", "pipeline.weights"]
CHANGE_KINDS: tuple[str, ...] = ("allowlist.add", "allowlist.retire", "adapter.roll", "pipeline.weights")


class AdminKey(_KeyDigests):
    """A named admin key with roles (gateway/roles.py): ``viewer`` reads the admin API and the
    dashboard, ``operator`` also proposes and rolls back changes and reloads, ``approver`` also
    approves or rejects them. The name is what the audit log records."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    roles: tuple[Role, ...] = ("viewer",)


class AdminConfig(_KeyDigests):
    """The admin key (digest) that unlocks /admin/* and the x-loraroute-explain header; it holds
    every role and is named ``admin`` in the audit log. ``keys`` adds named keys with roles.
    Without any, admin endpoints answer 403."""

    keys: tuple[AdminKey, ...] = ()

    @model_validator(mode="after")
    def _distinct(self) -> AdminConfig:
        names = [k.name for k in self.keys]
        if len(set(names)) != len(names) or "admin" in names:
            raise ValueError("admin.keys: names must be unique and not 'admin' (the name of admin.api_key_sha256)")
        seen = set(self.api_key_sha256)
        for k in self.keys:
            if seen & set(k.api_key_sha256):
                raise ValueError(f"admin.keys: a digest of key {k.name!r} is also another admin key's")
            seen |= set(k.api_key_sha256)
        return self


class ChangesConfig(_Strict):
    """Run-time changes through the admin API (gateway/changes.py): proposals, approvals and the
    audit log. They live in the store when it is Redis, else in ``state_dir``."""

    enabled: bool = True
    #: change kinds that take effect only after a second key (role approver, not the proposer)
    #: approves them; ``all`` for every kind
    two_person: tuple[ChangeKind, ...] = ()
    #: folder for proposals and the audit log when the store is memory:// (relative: to the config file)
    state_dir: str = "loraroute-state"
    #: pending proposals older than this expire
    proposal_ttl_s: float = Field(7 * 86400.0, gt=0)
    #: audit entries kept (Redis list length; the file is rotated once beyond this many lines)
    audit_keep: int = Field(100_000, ge=100)
    #: seconds between checks for changes approved on another gateway replica
    sync_s: float = Field(1.0, gt=0)
    #: limit for one sidecar call made by a change (a roll's refresh, a store check)
    sidecar_timeout_s: float = Field(60.0, gt=0)

    @field_validator("two_person", mode="before")
    @classmethod
    def _all(cls, v: Any) -> Any:
        return CHANGE_KINDS if v == "all" or v == ["all"] else v


# --------------------------------------------------------------------------------------------
# discovery and state
# --------------------------------------------------------------------------------------------
class StaticPod(_Strict):
    id: str = Field(min_length=1, max_length=253)
    url: str
    sidecar_url: str | None = None
    #: engine limits vLLM does not expose, used by the in-process monitor (sidecars know their own)
    max_lora_rank: int = Field(16, ge=1, le=1024)
    max_cpu_loras: int | None = Field(None, ge=0)
    #: the pod's KV-event sockets: the gateway follows them itself (gateway/kv_feed.py)
    kv_events: StaticKVEvents | None = None

    @field_validator("url", "sidecar_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/") if v else v


class KubernetesDiscoveryConfig(_Strict):
    """Pods found through the Kubernetes API (``gateway/discovery_k8s.py``)."""

    namespace: str | None = None  # default: the gateway's own namespace
    label_selector: str = "app.kubernetes.io/component=vllm"
    port: int = Field(8000, ge=1, le=65535)
    sidecar_port: int | None = Field(None, ge=1, le=65535)
    scheme: Literal["http", "https"] = "http"
    resync_s: float = Field(30.0, gt=0)


class DiscoveryConfig(_Strict):
    """Where the pod list comes from.

    - ``static``: a fixed list. ``kubernetes``: the Kubernetes API. Neither: every pod that has a
      PodState in the store (sidecars registering themselves).
    - When a list (static or Kubernetes) and the store are both in play, a pod needs both a list
      entry and a fresh PodState to receive traffic.
    - ``monitor``: ``auto`` runs an in-process monitor for each static pod without ``sidecar_url``
      (the embedded default); ``always`` for every static pod; ``never`` relies on sidecars.
    """

    static: tuple[StaticPod, ...] = ()
    kubernetes: KubernetesDiscoveryConfig | None = None
    monitor: Literal["auto", "always", "never"] = "auto"
    monitor_interval_s: float = Field(0.05, gt=0)
    #: seconds a monitor-published PodState lives without a refresh
    monitor_ttl_s: float = Field(2.0, gt=0)
    #: limit for one scrape of /metrics or /v1/models by the in-process monitor
    monitor_timeout_s: float = Field(0.4, gt=0)
    #: a pod whose last good scrape is older than this is published unhealthy (a refused
    #: connection marks it at once)
    monitor_unhealthy_after_s: float = Field(0.4, gt=0)

    @model_validator(mode="after")
    def _check(self) -> DiscoveryConfig:
        if self.static and self.kubernetes is not None:
            raise ValueError("choose one of 'static' and 'kubernetes'")
        ids = [p.id for p in self.static]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"duplicate static pod ids: {sorted(dup)}")
        return self


class StoreOutageConfig(_Strict):
    """What the gateway does while the store is unreachable (gateway/store_watch.py): it keeps
    routing on the last view it holds — freshness judged against the store's last sign of life,
    not the clock — for at most ``max_stale_s``; with ``poll_pods`` it meanwhile polls each pod
    in that view itself (``/metrics`` and ``/v1/models``, as the embedded mode does), so pods
    that die or recover during the outage are seen. A pod that refuses a connection meanwhile is
    tried last for ``suspect_s``."""

    max_stale_s: float = Field(120.0, ge=0)
    poll_pods: bool = False
    suspect_s: float = Field(15.0, gt=0)


class StoreConfig(_Strict):
    """The pod-state store: ``memory://`` (one process) or ``redis://host:port/db``."""

    url: str = "memory://"
    key_prefix: str = "loraroute"
    outage: StoreOutageConfig = StoreOutageConfig()

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        return check_store_url(v)


class SharingConfig(_Strict):
    """Routing state shared between gateway replicas through a ``redis://`` store (in flight,
    pending prefill, adapters just sent, the learned cost model; gateway/sharing.py). Inert with
    ``memory://``; while the store is unreachable every replica routes on its own state."""

    enabled: bool = True
    #: how often this replica publishes its own figures (only when they changed, else a heartbeat
    #: every stale_ms / 3)
    publish_ms: float = Field(15.0, ge=1.0, le=1000.0)
    #: a peer's figures older than this count for nothing
    stale_ms: float = Field(250.0, ge=10.0, le=60_000.0)
    #: how often the cost model's statistics are published
    costs_ms: float = Field(1000.0, ge=50.0, le=600_000.0)
    #: this replica's name among its peers ("" : host name and process id)
    replica_id: str = ""

    @model_validator(mode="after")
    def _order(self) -> SharingConfig:
        if self.stale_ms < 2 * self.publish_ms:
            raise ValueError(f"stale_ms ({self.stale_ms}) must be at least twice publish_ms ({self.publish_ms})")
        return self


class EnsureConfig(_Strict):
    """Ask a pod's sidecar to materialise an adapter before forwarding, when the pod's PodState
    does not list it on GPU, in CPU, on disk or loading."""

    enabled: bool = True
    timeout_s: float = Field(60.0, gt=0)
    #: seconds a successful ensure is trusted before PodState must confirm it
    remember_s: float = Field(10.0, ge=0)


class MetricsAuthConfig(_KeyDigests):
    """Who may read ``GET /metrics``: with ``required``, a request needs ``Authorization: Bearer
    <key>`` whose digest is listed here (a scraper's key, inline or in a mounted Secret file) or
    is an admin key of any role. Off by default: the series then carry no secret, but do name
    the allowlisted adapters (``metrics.adapter_labels``)."""

    required: bool = False


class MetricsConfig(_Strict):
    enabled: bool = True
    #: histogram buckets (seconds) for TTFT and end-to-end latency measured at the gateway
    latency_buckets: tuple[float, ...] = (
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    )
    auth: MetricsAuthConfig = MetricsAuthConfig()
    #: per-adapter label values: ``allowlist`` — names in the current allowlist only (any other,
    #: e.g. demand another replica reports for a retired adapter, shows as ``other``); ``none`` —
    #: no adapter names at all (the series are summed per base, ``adapter=""``)
    adapter_labels: Literal["allowlist", "none"] = "allowlist"


class SecurityConfig(_Strict):
    """Tenant isolation and the sidecars' control API.

    ``conceal_forbidden``: an adapter (or a whole base) a tenant may not use answers exactly as an
    unknown one does — 404 with the nearest of the tenant's own names — so no tenant learns what
    another may call. ``sidecar_token_env``: the name of an environment variable holding the
    token the sidecars' control API requires (sent as ``Authorization: Bearer``; the sidecar's
    ``control_token_env``; in the chart both come from one Secret)."""

    conceal_forbidden: bool = True
    sidecar_token_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")


# --------------------------------------------------------------------------------------------
# the whole file
# --------------------------------------------------------------------------------------------
class GatewayConfig(_Strict):
    server: ServerConfig = ServerConfig()
    bases: tuple[BaseConfig, ...] = ()
    tenants: tuple[TenantConfig, ...] = ()
    admin: AdminConfig = AdminConfig()
    discovery: DiscoveryConfig = DiscoveryConfig()
    store: StoreConfig = StoreConfig()
    sharing: SharingConfig = SharingConfig()
    #: a preset name (``default``, ``llm-d``, ``round-robin``, ``random``, ``least-loaded``) or a
    #: full pipeline dict; passed unchanged to ``scorer.build.build_pipeline``
    pipeline: str | dict[str, Any] = "default"
    ensure: EnsureConfig = EnsureConfig()
    metrics: MetricsConfig = MetricsConfig()
    security: SecurityConfig = SecurityConfig()
    limits: LimitsConfig = LimitsConfig()
    #: demand, placement plan and placer (gateway/placement_config.py, docs/placement.md)
    placement: PlacementConfig = PlacementConfig()
    changes: ChangesConfig = ChangesConfig()

    @model_validator(mode="after")
    def _cross(self) -> GatewayConfig:
        names: dict[str, str] = {}
        for b in self.bases:
            for n in (b.name, *b.aliases):
                if n in names:
                    raise ValueError(f"base name {n!r} is used by two bases ({names[n]!r} and {b.name!r})")
                names[n] = b.name
        tnames = [t.name for t in self.tenants]
        dup = {t for t in tnames if tnames.count(t) > 1}
        if dup:
            raise ValueError(f"duplicate tenant names: {sorted(dup)}")
        digests: dict[str, str] = {}
        for t in self.tenants:
            for d in t.api_key_sha256:
                if d in digests and digests[d] != t.name:
                    raise ValueError(f"one API key digest belongs to two tenants ({digests[d]!r} and {t.name!r})")
                digests[d] = t.name
        return self

    @property
    def keys_configured(self) -> bool:
        return any(t.api_key_sha256 for t in self.tenants)


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def format_validation_error(err: ValidationError) -> str:
    """One line per problem: ``key.path: message``; input values are never echoed."""
    lines = []
    for e in err.errors(include_input=False, include_url=False):
        loc = ".".join(str(p) for p in e.get("loc", ())) or "(top level)"
        msg = e.get("msg", "invalid")
        if e.get("type") == "extra_forbidden":
            msg = "unknown key (not allowed here; check the spelling against docs/config.md)"
        msg = msg.removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}")
    return "; ".join(lines)


def load_config(
    path_or_dict: str | os.PathLike[str] | Mapping[str, Any] | None,
    env: Mapping[str, str] | None = None,
) -> GatewayConfig:
    """Read, override from the environment, validate. Raises ``ConfigError`` naming the key path.

    ``path_or_dict`` may be a YAML file path, an already-parsed mapping or ``None`` (all defaults).
    ``env`` defaults to ``os.environ``; pass ``{}`` to ignore the environment.
    """
    env = os.environ if env is None else env
    base_dir: Path | None = None
    if path_or_dict is None:
        data: Any = {}
    elif isinstance(path_or_dict, Mapping):
        import copy

        data = copy.deepcopy(dict(path_or_dict))
    else:
        path = Path(path_or_dict)
        base_dir = path.resolve().parent
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror or e}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"config file {path.name} is not valid YAML{where}") from None
        if data is None:
            data = {}
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping of sections (server, bases, tenants, ...)")
    try:
        apply_env_overrides(data, env, ENV_PREFIX)
    except EnvOverrideError as e:
        raise ConfigError(str(e)) from None
    try:
        return GatewayConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
