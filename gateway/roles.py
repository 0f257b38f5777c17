"""Admin keys and their roles: who may read, change and approve.

=========  =====================================================================================
role       may
=========  =====================================================================================
viewer     read the admin API (decisions, pods, allowlist, changes, audit, store checks) and the
           dashboard (every admin key may)
operator   viewer + propose changes, roll them back, reload the config, ask a sidecar to ensure
approver   viewer + approve or reject a proposal made by another key
=========  =====================================================================================

Keys come from the config: ``admin.api_key_sha256`` (the single admin key of earlier versions:
every role, named ``admin``, or ``admin-2``… when there are several digests) and ``admin.keys``
(``{name, roles, api_key_sha256 | api_key_sha256_file}``). A key is sent as
``Authorization: Bearer <key>``, as ``x-loraroute-admin-key: <key>``, or — for the dashboard in a
browser — as HTTP Basic credentials with the key as the password. Only SHA-256 digests are
compared (in constant time); a key never appears in a message or log line.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hmac
from dataclasses import dataclass

from fastapi import Request

from gateway.config import GatewayConfig
from gateway.errors import APIError
from gateway.policy import bearer_token, sha256_hex


class Role(enum.StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    APPROVER = "approver"


ALL_ROLES = frozenset(Role)


@dataclass(frozen=True, slots=True)
class Principal:
    """The holder of one admin key: its name (as the audit log shows it) and roles."""

    name: str
    roles: frozenset[Role]

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "roles": sorted(self.roles)}


class KeyRing:
    """Digest -> principal for one config (built per admin request: a handful of digests)."""

    def __init__(self, config: GatewayConfig) -> None:
        self._by_digest: list[tuple[str, Principal]] = []
        legacy = config.admin.api_key_sha256
        for i, digest in enumerate(legacy):
            name = "admin" if len(legacy) == 1 else f"admin-{i + 1}"
            self._by_digest.append((digest, Principal(name, ALL_ROLES)))
        for key in config.admin.keys:
            principal = Principal(key.name, frozenset(Role(r) for r in key.roles) | {Role.VIEWER})
            self._by_digest.extend((digest, principal) for digest in key.api_key_sha256)

    @property
    def configured(self) -> bool:
        return bool(self._by_digest)

    def identify(self, key: str | None) -> Principal | None:
        if not key:
            return None
        digest = sha256_hex(key)
        found = None
        for candidate, principal in self._by_digest:  # no early exit: constant time per ring
            if hmac.compare_digest(digest, candidate):
                found = principal
        return found


def key_of(request: Request) -> str | None:
    """The admin key a request carries (Bearer, x-loraroute-admin-key, or Basic's password)."""
    header = request.headers.get("x-loraroute-admin-key")
    if header:
        return header
    authorization = request.headers.get("authorization") or ""
    scheme, _, rest = authorization.strip().partition(" ")
    if scheme.lower() == "basic" and rest:
        try:
            decoded = base64.b64decode(rest.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2] or None
    return bearer_token(authorization)


def require(config: GatewayConfig, request: Request, role: Role, *, basic_realm: str | None = None) -> Principal:
    """The principal of the request's key if it holds ``role``; else 403 (no admin key
    configured, or the role is missing) or 401 (no key or a wrong one; with ``basic_realm``
    the 401 asks a browser for Basic credentials)."""
    ring = KeyRing(config)
    if not ring.configured:
        raise APIError(403, "the admin API is off: set admin.api_key_sha256 (or admin.keys)", code="admin_disabled")
    principal = ring.identify(key_of(request))
    if principal is None:
        raise AdminAuthError(basic_realm)
    if role not in principal.roles:
        raise APIError(403, f"key {principal.name!r} has role(s) {', '.join(sorted(principal.roles))}; this needs "
                            f"the {role} role", code="role_missing")
    return principal


def require_metrics_key(config: GatewayConfig, request: Request) -> None:
    """``GET /metrics`` with ``metrics.auth.required``: the request's key (as for the admin API)
    must be one of ``metrics.auth``'s digests or an admin key of any role; else 401."""
    key = key_of(request)
    if key:
        digest = sha256_hex(key)
        scraper = False
        for candidate in config.metrics.auth.api_key_sha256:  # no early exit: constant time
            scraper |= hmac.compare_digest(digest, candidate)
        if scraper or KeyRing(config).identify(key) is not None:
            return
    raise APIError(401, "GET /metrics needs a key (metrics.auth.required): send 'Authorization: Bearer <key>'",
                   code="invalid_metrics_key")


class AdminAuthError(APIError):
    """401 for a missing or wrong admin key; ``realm`` set: answered with a Basic challenge."""

    def __init__(self, realm: str | None) -> None:
        super().__init__(401, "admin key missing or wrong: send 'Authorization: Bearer <admin key>'",
                         code="invalid_admin_key")
        self.realm = realm
