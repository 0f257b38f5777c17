"""Sidecar settings: one YAML file, environment overrides, command-line flags (in that order).

Strict: an unknown key is an error that names itself. Example (every key, with its default;
``pod_id`` and ``vllm_url`` have none)::

    pod_id: vllm-0                      # the pod's id in PodState
    vllm_url: http://127.0.0.1:8000     # where this sidecar reaches vLLM
    advertise_url: null                 # the vLLM URL the gateway should use (default: vllm_url)
    sidecar_url: null                   # this sidecar's URL for the gateway (default: from listen)
    listen: {host: 127.0.0.1, port: 8081}
    store: {type: null, url: "memory://", key_prefix: loraroute, password_env: null}
    base_model: null                    # vLLM's --model; adapters must name it in base_model_name_or_path
    served_model_name: null             # vLLM's --served-model-name ({base} in layouts, default base_model)
    max_lora_rank: 16                   # vLLM's --max-lora-rank
    max_loras: null                     # vLLM's --max-loras (default: read from lora_requests_info)
    max_cpu_loras: null                 # vLLM's --max-cpu-loras (default: max_loras)
    adapter_dir: adapters               # VLLM_LORA_RESOLVER_CACHE_DIR as this sidecar sees it
    vllm_adapter_dir: null              # the same folder as vLLM sees it (default: adapter_dir)
    disk_budget_bytes: 10737418240      # eviction of unused adapters beyond this (least
                                        # demanded first, then least recently used)
    max_adapter_bytes: 2147483648       # refuse bigger adapters
    poll_interval_s: 0.05
    ttl_s: 3.0
    heartbeat_s: 1.0
    load_on_ensure: true                # POST /adapters/{name}/ensure also loads into vLLM
    fetch_timeout_s: 20.0               # no new store request for one adapter starts after this
    load_timeout_s: 15.0                # one /v1/load_lora_adapter call into vLLM
    control_token_env: null             # NAME of an env var holding the token the control API
                                        # (ensure, refresh, /store, /adapters) requires
    log_level: info
    warmup: {enabled: true, adapter: null, timeout_s: 60.0, retry_s: 5.0, attempts: 3}
                                        # a LoRA request on every fresh engine before adapter
                                        # requests are routed to it (docs/sidecar.md)
    demand: {enabled: true, refresh_s: 30.0, prefetch: 0}
                                        # the gateways' shared adapter demand, read from a
                                        # redis:// store: eviction order and prefetch
    kv_events: null                     # relay the pod's KV-cache events to the store, e.g.
                                        # {endpoint: "tcp://127.0.0.1:5557", replay_endpoint:
                                        #  "tcp://127.0.0.1:5558", topic: "", flush_interval_s: 0.005,
                                        #  snapshot_interval_s: 5.0}; needs a redis:// store
    source:
      type: local                       # local | s3
      local: {path: adapter-source, layout: "{adapter}/"}
      s3:
        endpoint_url: null              # e.g. https://minio.internal:9000
        bucket: adapters
        layout: "adapters/{adapter}/"   # or "adapters/{base}/{adapter}/"
        region: us-east-1
        ca_bundle: null                 # PEM file of a corporate / self-signed CA
        verify_tls: true
        access_key_id_file: null        # else AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the env
        secret_access_key_file: null
        session_token_file: null
        connect_timeout_s: 2.0
        read_timeout_s: 10.0
        max_attempts: 2

An ensure answers within ``ensure_bound_s`` = fetch_timeout_s + max_attempts × (connect_timeout_s +
read_timeout_s) (the store request under way when the fetch deadline passes) + load_timeout_s:
59 s with these defaults, inside the gateway's ``ensure.timeout_s`` of 60 s (docs/config.md has
the whole chain in one table).

Environment: ``LORAROUTE_SIDECAR_<KEY>``, nested keys joined by ``__``
(``LORAROUTE_SIDECAR_SOURCE__S3__BUCKET=adapters``); values are read as YAML, an empty one is
null (``podstate.envconfig``, shared with the gateway).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from podstate import check_store_url, redact_url
from podstate.envconfig import EnvOverrideError, apply_env_overrides, set_path

ENV_PREFIX = "LORAROUTE_SIDECAR_"


class SettingsError(ValueError):
    """Invalid settings; the message names every offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8081, ge=0, le=65535)


class StoreSettings(_Strict):
    type: Literal["memory", "redis"] | None = None
    url: str = "memory://"
    key_prefix: str = "loraroute"
    #: name of an environment variable holding the Redis password (never the password itself)
    password_env: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> StoreSettings:
        try:
            check_store_url(self.url)
        except ValueError as exc:
            raise ValueError(f"store.url: {exc}") from None
        if self.type == "redis" and self.url.startswith("memory:"):
            raise ValueError("store.type is redis but store.url is memory://; set store.url to redis://host:port/db")
        return self


class LocalSourceSettings(_Strict):
    path: str = "adapter-source"
    layout: str = "{adapter}/"


class S3Settings(_Strict):
    endpoint_url: str | None = None
    bucket: str = "adapters"
    layout: str = "adapters/{adapter}/"
    region: str = "us-east-1"
    ca_bundle: str | None = None
    verify_tls: bool = True
    access_key_id_file: str | None = None
    secret_access_key_file: str | None = None
    session_token_file: str | None = None
    connect_timeout_s: float = Field(2.0, gt=0)
    read_timeout_s: float = Field(10.0, gt=0)
    max_attempts: int = Field(2, ge=1, le=10)

    @property
    def call_bound_s(self) -> float:
        """The longest one S3 request can take, its retries included."""
        return self.max_attempts * (self.connect_timeout_s + self.read_timeout_s)


class KVEventsSettings(_Strict):
    """The pod's vLLM ``--kv-events-config`` as this sidecar reaches it (``podstate.kv_store``)."""

    endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""
    flush_interval_s: float = Field(0.005, gt=0, le=1.0)
    snapshot_interval_s: float = Field(5.0, gt=0)

    @field_validator("endpoint", "replay_endpoint")
    @classmethod
    def _zmq(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError("must be a ZMQ endpoint: tcp://host:port or ipc://path")
        if v is not None and "*" in v:
            raise ValueError("connect to the pod's address (tcp://127.0.0.1:5557), not a bind wildcard")
        return v


class WarmupSettings(_Strict):
    """The LoRA warm-up request sent to every fresh engine (``Sidecar.warm_up``): until it has
    completed the pod is published ``lora_ready: false`` and gets no adapter request (an eager
    vLLM compiles its LoRA kernels on the first one, ≈ 3.7 s). ``adapter``: the one to warm up
    with (default: one vLLM has registered, else one on the pod's disk; with none at all there
    is nothing to warm up and the pod is ready at once). A warm-up that fails is tried again
    every ``retry_s``; after ``attempts`` failures the pod is made ready anyway (logged), so a
    broken warm-up never keeps a serving pod out of traffic for good."""

    enabled: bool = True
    adapter: str | None = None
    timeout_s: float = Field(60.0, gt=0)
    retry_s: float = Field(5.0, gt=0)
    attempts: int = Field(3, ge=1)


class DemandSettings(_Strict):
    """The cluster's adapter demand, as the gateways share it through a redis:// store
    (``vllm_sidecar.demand``). Read every ``refresh_s`` (off the request path); the disk budget
    then evicts the least demanded adapters first. ``prefetch``: the N most demanded adapters of
    the pod's base are kept on local disk (fetched and validated, not loaded into vLLM), so a
    first load does not wait for the source; 0 = off. Without a shared store, or with nothing
    read, eviction is least recently used as without it."""

    enabled: bool = True
    refresh_s: float = Field(30.0, gt=0)
    prefetch: int = Field(0, ge=0, le=10000)


class SourceSettings(_Strict):
    type: Literal["local", "s3"] = "local"
    local: LocalSourceSettings = LocalSourceSettings()
    s3: S3Settings = S3Settings()


def _check_layout(layout: str, where: str) -> str:
    if "{adapter}" not in layout:
        raise ValueError(f"{where}: layout {layout!r} must contain {{adapter}}")
    try:
        layout.format(adapter="a", base="b")
    except (KeyError, IndexError, ValueError):
        raise ValueError(f"{where}: layout {layout!r} may only use {{adapter}} and {{base}}") from None
    if layout.startswith("/") or ".." in layout:
        raise ValueError(f"{where}: layout {layout!r} must be relative and must not contain '..'")
    return layout


class SidecarSettings(_Strict):
    pod_id: str = Field(min_length=1)
    vllm_url: str = Field(min_length=1)
    advertise_url: str | None = None
    sidecar_url: str | None = None
    listen: ListenSettings = ListenSettings()
    store: StoreSettings = StoreSettings()
    base_model: str | None = None
    served_model_name: str | None = None
    max_lora_rank: int = Field(16, ge=1)
    max_loras: int | None = Field(None, ge=1)
    max_cpu_loras: int | None = Field(None, ge=1)
    adapter_dir: str = "adapters"
    vllm_adapter_dir: str | None = None
    disk_budget_bytes: int = Field(10 * 1024**3, gt=0)
    max_adapter_bytes: int = Field(2 * 1024**3, gt=0)
    poll_interval_s: float = Field(0.05, gt=0)
    ttl_s: float = Field(3.0, gt=0)
    heartbeat_s: float = Field(1.0, gt=0)
    load_on_ensure: bool = True
    #: seconds after which no new store request for one adapter's fetch starts (the one under way
    #: is bounded by the S3 client's own timeouts): a stalled store fails the ensure, not the client
    fetch_timeout_s: float = Field(20.0, gt=0)
    #: limit for one ``/v1/load_lora_adapter`` call
    load_timeout_s: float = Field(15.0, gt=0)
    #: name of an environment variable holding the token the control API requires (``Authorization:
    #: Bearer``); never the token itself. Unset: the control API is open (loopback set-ups)
    control_token_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    source: SourceSettings = SourceSettings()
    warmup: WarmupSettings = WarmupSettings()
    demand: DemandSettings = DemandSettings()
    kv_events: KVEventsSettings | None = None

    @field_validator("vllm_url", "advertise_url", "sidecar_url")
    @classmethod
    def _http(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/") if v else v

    @model_validator(mode="after")
    def _checks(self) -> SidecarSettings:
        _check_layout(self.source.local.layout, "source.local.layout")
        _check_layout(self.source.s3.layout, "source.s3.layout")
        if self.max_loras and self.max_cpu_loras and self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be >= max_loras (as vLLM requires)")
        layout = self.source.s3.layout if self.source.type == "s3" else self.source.local.layout
        if "{base}" in layout and not (self.served_model_name or self.base_model):
            raise ValueError("the source layout uses {base}: set served_model_name or base_model")
        if self.heartbeat_s >= self.ttl_s:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s}) must be shorter than ttl_s ({self.ttl_s})")
        if self.kv_events is not None and self.store.url.startswith("memory:"):
            raise ValueError("kv_events relays the pod's KV blocks through the store: set store.url to "
                             "redis://host:port/db")
        return self

    # --- derived values -------------------------------------------------------------------------
    @property
    def base_key(self) -> str:
        """What ``{base}`` means in a layout: the served name (or --model), last path segment."""
        base = self.served_model_name or self.base_model or ""
        return base.rstrip("/").rsplit("/", 1)[-1]

    @property
    def ensure_bound_s(self) -> float:
        """The longest an ensure can take: the fetch deadline, the store request under way then,
        the load into vLLM (compare the gateway's ``ensure.timeout_s``)."""
        call = self.source.s3.call_bound_s if self.source.type == "s3" else 0.0
        return self.fetch_timeout_s + call + self.load_timeout_s

    @property
    def public_sidecar_url(self) -> str:
        if self.sidecar_url:
            return self.sidecar_url
        host = self.listen.host if self.listen.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return f"http://{host}:{self.listen.port}"

    def redacted(self) -> dict[str, Any]:
        """Settings for logs and ``--check-config``: every URL without its user name and password
        (``store.url`` may carry the Redis password); credentials are only ever named by file or
        environment variable, never held here."""
        out = self.model_dump(mode="json")
        out["store"]["url"] = redact_url(self.store.url)
        s3 = out["source"]["s3"]
        if s3.get("endpoint_url"):
            s3["endpoint_url"] = redact_url(s3["endpoint_url"])
        for key in ("vllm_url", "advertise_url", "sidecar_url"):
            if out.get(key):
                out[key] = redact_url(out[key])
        return out


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key")
        elif err["type"] == "missing":
            lines.append(f"{loc}: required (set it in the file, LORAROUTE_SIDECAR_{loc.upper().replace('.', '__')} "
                         f"or --{loc.replace('_', '-').replace('.', '-')})")
        else:
            lines.append(f"{loc}: {err['msg']}")
    return "invalid sidecar settings:\n  " + "\n  ".join(lines)


def read_file(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SettingsError(f"cannot read sidecar settings file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SettingsError(f"sidecar settings file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"sidecar settings file {path} must hold a mapping at the top level")
    return data


def load_settings(
    source: str | Path | Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> SidecarSettings:
    """Validate settings from a YAML file path or a dict, then ``env`` overrides (only when given,
    e.g. ``os.environ``), then ``overrides`` (dotted keys, e.g. from flags). Raises
    ``SettingsError`` naming every bad key."""
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, Mapping):
        data = copy.deepcopy(dict(source))
    else:
        data = read_file(source)
    try:
        if env is not None:
            apply_env_overrides(data, env, ENV_PREFIX)
        for dotted, value in (overrides or {}).items():
            set_path(data, dotted.split("."), value)
    except EnvOverrideError as exc:
        raise SettingsError(str(exc)) from None
    try:
        return SidecarSettings.model_validate(data)
    except ValidationError as exc:
        raise SettingsError(_format_errors(exc)) from None


def control_token(settings: SidecarSettings, env: Mapping[str, str] | None = None) -> str | None:
    """The control API's token from the environment variable ``control_token_env`` names;
    raises ``SettingsError`` when that variable is named but empty (a missing Secret must not
    leave the API open)."""
    if not settings.control_token_env:
        return None
    token = (env if env is not None else os.environ).get(settings.control_token_env, "").strip()
    if not token:
        raise SettingsError(f"control_token_env names {settings.control_token_env}, which is empty or unset; "
                            "set it (the chart mounts it from the sidecar token Secret) or unset control_token_env")
    return token


def store_password(settings: SidecarSettings, env: Mapping[str, str] | None = None) -> str | None:
    """The Redis password from the environment variable ``store.password_env`` names."""
    if not settings.store.password_env:
        return None
    return (env if env is not None else os.environ).get(settings.store.password_env) or None
