"""Who may call which model: API keys (SHA-256 digests), bases, allowed adapters, tenants.

Built once per config (``AccessPolicy(config)``) and swapped whole on reload. Checks, in order:

1. ``authenticate(authorization_header)``: when any tenant has a key digest, a request needs
   ``Authorization: Bearer <key>`` whose SHA-256 is one of them (401 otherwise). Without key
   digests the gateway is open and every configured model is allowed.
2. ``resolve(tenant, model)``: the name's syntax (400, ``gateway.naming``), the base (404 with the
   nearest names), the adapter in the base's allowlist (404 with the nearest names the caller may
   use, ``difflib``), the tenant's glob patterns: with ``security.conceal_forbidden`` (the
   default) an adapter the tenant may not use, or a base it may use nothing of, answers exactly
   as an unknown one (404, the nearest of the tenant's own names); without it, a 403 listing
   what the tenant may use.

Results of ``resolve`` are cached per (tenant, model string): the hot path pays a dict lookup.
The cache is bounded in entries and in bytes (names and error messages counted); a name that
is not a string or is longer than any valid name is refused before the cache sees it.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import hmac
from dataclasses import dataclass

from gateway.config import AdapterConfig, BaseConfig, GatewayConfig, TenantConfig, TenantLimits
from gateway.echo import ModelEcho
from gateway.errors import APIError
from gateway.naming import ModelName, check_length, not_a_string, parse_model_name
from scorer.model import AdapterRef

_CACHE_MAX = 20_000
_CACHE_MAX_BYTES = 4 * 1024 * 1024  # names and error messages held by the resolution cache


@dataclass(frozen=True, slots=True)
class Resolved:
    """A request's model, checked: the client name, the base, the adapter, and what vLLM calls it.
    ``echo`` rewrites vLLM's name back to the client's in the response (None when they agree)."""

    client_name: str
    base: BaseConfig
    adapter: AdapterConfig | None
    ref: AdapterRef
    echo: ModelEcho | None = None

    @classmethod
    def of(cls, client_name: str, base: BaseConfig, adapter: AdapterConfig | None, ref: AdapterRef) -> Resolved:
        served = ref.vllm_model
        return cls(client_name, base, adapter, ref, ModelEcho(served, client_name) if served != client_name else None)

    @property
    def base_label(self) -> str:
        return self.base.name

    @property
    def adapter_label(self) -> str:
        return self.adapter.name if self.adapter is not None else ""


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    allowed: frozenset[tuple[str, str | None]]  # (base.name, adapter name or None for the base)
    limits: TenantLimits | None = None  # None: no limit applies (gateway/limits.py)

    @property
    def bases(self) -> frozenset[str]:
        """The bases of which the tenant may call anything (the base itself or an adapter)."""
        return frozenset(b for b, _ in self.allowed)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def bearer_token(authorization: str | None) -> str | None:
    """The key in ``Authorization: Bearer <key>`` (or the raw header when there is no scheme)."""
    if not authorization:
        return None
    scheme, _, rest = authorization.strip().partition(" ")
    if rest and scheme.lower() == "bearer":
        return rest.strip() or None
    return None if rest else authorization.strip() or None


class AccessPolicy:
    def __init__(self, config: GatewayConfig) -> None:
        self.bases: dict[str, BaseConfig] = {}
        for b in config.bases:
            for n in (b.name, *b.aliases):
                self.bases[n] = b
        self._adapters: dict[str, dict[str, AdapterConfig]] = {
            b.name: {a.name: a for a in b.adapters} for b in config.bases
        }
        self._all: frozenset[tuple[str, str | None]] = frozenset(
            [(b.name, None) for b in config.bases] + [(b.name, a.name) for b in config.bases for a in b.adapters]
        )
        self.keys_required = config.keys_configured
        #: a forbidden adapter (or base) answers as an unknown one (``security.conceal_forbidden``)
        self.conceal = config.security.conceal_forbidden
        #: metric series name adapters (``metrics.adapter_labels``: ``allowlist``) or not (``none``)
        self.adapter_labels = config.metrics.adapter_labels != "none"
        #: (base, adapter) as vLLM serves them, for every allowlisted adapter
        self.served_adapters: frozenset[tuple[str, str]] = frozenset(
            (b.vllm_name, a.vllm_name) for b in config.bases for a in b.adapters)
        self._tenants_by_digest: dict[str, Tenant] = {}
        self.tenants: dict[str, Tenant] = {}
        for t in config.tenants:
            limits = t.limits if t.limits is not None else config.limits.default
            tenant = Tenant(t.name, frozenset(self._allowed_for(t, config.bases)), limits if limits.any else None)
            self.tenants[t.name] = tenant
            for d in t.api_key_sha256:
                self._tenants_by_digest[d] = tenant
        self._admin_digests = tuple(config.admin.api_key_sha256)
        #: adapter name as vLLM knows it -> pinned version (the sidecars fetch exactly that one)
        self.adapter_versions: dict[str, str] = {
            a.vllm_name: a.version for b in config.bases for a in b.adapters if a.version is not None
        }
        self._cache: dict[tuple[str | None, str], Resolved | APIError] = {}
        self._cache_bytes = 0

    @staticmethod
    def _allowed_for(t: TenantConfig, bases: tuple[BaseConfig, ...]) -> set[tuple[str, str | None]]:
        out: set[tuple[str, str | None]] = set()
        for b in bases:
            if t.base_models:
                out.add((b.name, None))
            for a in b.adapters:
                full_names = [f"{n}:{a.name}" for n in (b.name, *b.aliases)]
                for pattern in t.adapters:
                    if ":" in pattern:
                        if any(fnmatch.fnmatchcase(fn, pattern) for fn in full_names):
                            out.add((b.name, a.name))
                            break
                    elif fnmatch.fnmatchcase(a.name, pattern):
                        out.add((b.name, a.name))
                        break
        return out

    # --- keys ---------------------------------------------------------------------------------
    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The caller's tenant; ``None`` when the gateway is open. Raises 401."""
        if not self.keys_required:
            return None
        key = bearer_token(authorization)
        if key is None:
            raise APIError(
                401,
                "missing API key: send 'Authorization: Bearer <key>' (the OpenAI client's api_key)",
                code="missing_api_key",
            )
        tenant = self._tenants_by_digest.get(sha256_hex(key))
        if tenant is None:
            raise APIError(401, "invalid API key: it matches no tenant of this gateway", code="invalid_api_key")
        return tenant

    def is_admin(self, authorization: str | None) -> bool:
        key = bearer_token(authorization)
        if key is None or not self._admin_digests:
            return False
        digest = sha256_hex(key)
        return any(hmac.compare_digest(digest, d) for d in self._admin_digests)

    @property
    def admin_configured(self) -> bool:
        return bool(self._admin_digests)

    # --- models -------------------------------------------------------------------------------
    def allowed(self, tenant: Tenant | None) -> frozenset[tuple[str, str | None]]:
        return self._all if tenant is None else tenant.allowed

    def visible_models(self, tenant: Tenant | None) -> list[str]:
        """Client names the caller may use: each base, then ``<base>:<adapter>``, sorted."""
        allowed = self.allowed(tenant)
        bases = sorted(b for b, a in allowed if a is None)
        adapters = sorted(f"{b}:{a}" for b, a in allowed if a is not None)
        return bases + adapters

    def resolve(self, tenant: Tenant | None, model: object) -> Resolved:
        """Check ``model`` for ``tenant``. Raises ``APIError`` (400/403/404)."""
        if not isinstance(model, str):
            raise not_a_string()  # never cached: a key built from it could be any size
        key = (tenant.name if tenant else None, model)
        hit = self._cache.get(key)
        if hit is None:
            check_length(model)
            try:
                hit = self._resolve(tenant, model)
            except APIError as e:
                hit = e.copy()  # kept without the traceback (its frames hold the request)
            size = len(model) + (len(hit.message) if isinstance(hit, APIError) else 0)
            if len(self._cache) >= _CACHE_MAX or self._cache_bytes + size > _CACHE_MAX_BYTES:
                self._cache.clear()
                self._cache_bytes = 0
            self._cache[key] = hit
            self._cache_bytes += size
        if isinstance(hit, APIError):
            raise hit.copy()
        return hit

    def _nearest(self, wanted: str, tenant: Tenant | None) -> str:
        names = self.visible_models(tenant)
        near = difflib.get_close_matches(wanted, names, n=3, cutoff=0.5)
        if near:
            return "did you mean: " + ", ".join(near) + "?"
        if not names:
            return "this caller may use no model"
        shown = ", ".join(names[:10]) + (f" (and {len(names) - 10} more)" if len(names) > 10 else "")
        return f"available: {shown}"

    def _unknown_base(self, name: ModelName, tenant: Tenant | None) -> APIError:
        return APIError(
            404,
            f"model {str(name)!r} does not exist: unknown base {name.base!r}; {self._nearest(str(name), tenant)}",
            param="model",
            code="model_not_found",
        )

    def _unknown_adapter(self, name: ModelName, base: BaseConfig, tenant: Tenant | None) -> APIError:
        return APIError(
            404,
            f"adapter {name.adapter!r} is not in the allowlist of base {base.name!r}; "
            f"{self._nearest(f'{base.name}:{name.adapter}', tenant)}",
            param="model",
            code="adapter_not_found",
        )

    def _resolve(self, tenant: Tenant | None, model: object) -> Resolved:
        name = parse_model_name(model)
        base = self.bases.get(name.base)
        if base is None:
            raise self._unknown_base(name, tenant)
        allowed = self.allowed(tenant)
        if self.conceal and tenant is not None and base.name not in tenant.bases:
            raise self._unknown_base(name, tenant)  # nothing of this base is the tenant's: as if unknown
        if name.adapter is None:
            if (base.name, None) not in allowed:
                raise APIError(
                    403,
                    f"tenant {tenant.name if tenant else ''!r} may not call the base model {base.name!r} "
                    f"without an adapter; allowed: {', '.join(self.visible_models(tenant)) or 'nothing'}",
                    param="model",
                    code="model_not_allowed",
                )
            return Resolved.of(str(name), base, None, AdapterRef(base.vllm_name, None))
        adapter = self._adapters[base.name].get(name.adapter)
        if adapter is None:
            raise self._unknown_adapter(name, base, tenant)
        if (base.name, adapter.name) not in allowed:
            assert tenant is not None
            if self.conceal:
                raise self._unknown_adapter(name, base, tenant)
            allowed_names = [n for n in self.visible_models(tenant)]
            shown = ", ".join(allowed_names[:20]) + (" ..." if len(allowed_names) > 20 else "")
            raise APIError(
                403,
                f"adapter {adapter.name!r} is not in the allowlist for tenant {tenant.name!r}; "
                f"allowed: {shown or 'nothing'}",
                param="model",
                code="adapter_not_allowed",
            )
        return Resolved.of(str(name), base, adapter, AdapterRef(base.vllm_name, adapter.vllm_name, adapter.rank))
