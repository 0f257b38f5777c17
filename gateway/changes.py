"""Audited, approved run-time changes: propose, approve or reject, apply, roll back.

``ChangeManager(gw)`` is started with the app. It keeps the ``Overlay`` of applied changes
(gateway/change_model.py) and lays it over the config through the gateway's own reload
(``gw.config_layer``): an applied change takes effect as a new immutable runtime snapshot,
requests in flight finish on the one they started with, a config file change keeps the
overlay, and so does a restart (the overlay is stored).

Life of a change:

1. ``propose`` (operator role): the body is checked strictly; an added adapter is looked up in
   the store through the sidecars (present, right layout, a rank some pod accepts; its rank and
   current version are filled in and the version pinned); a rolled-to version must exist there;
   the overlay with the change is built and validated (a dry run of the reload) — any problem is
   a 400 / 409 / 422 and nothing is stored. The change is stored ``pending`` and audited
   (``proposed``).
2. Kinds listed in ``changes.two_person`` wait for ``approve`` by a key with the approver role
   that is not the proposer's (``self_approval``: 403); ``reject`` ends them. Other kinds are
   applied at once (still audited, still by a named key).
3. Applying re-checks the change against the current state (something may have changed since
   the proposal), stores the new overlay, reloads, then runs the change's effect: for a roll,
   every sidecar refreshes the adapter to the version (vLLM's in-place load where it is
   loaded). ``applied`` or ``failed`` goes to the audit log with the before/after values, the
   checksums and each pod's result.
4. ``rollback`` (operator role, one call) applies the inverse change at once — it restores
   values that were in effect before — if nothing has changed them since; otherwise 409 names
   what to roll back first.

All decisions on one gateway (file store) or across replicas (Redis) happen under one lock, so
one change is applied once. Replicas poll the overlay's generation every ``changes.sync_s`` and
reload when it moved. Pending proposals expire after ``changes.proposal_ttl_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from redis.asyncio import Redis

from gateway.audit import AuditEntry, AuditLog, FileAuditLog, RedisAuditLog
from gateway.change_model import (
    SPEC,
    AddAdapter,
    Change,
    ChangeSpec,
    Effect,
    Overlay,
    RollAdapter,
    current_weights,
    describe,
    find_adapter,
    find_base,
    inverse,
)
from gateway.change_store import ChangeStore, FileChangeStore, RedisChangeStore
from gateway.config import ConfigError, GatewayConfig
from gateway.errors import APIError
from gateway.roles import Principal
from gateway.service import Gateway, build_pipeline
from gateway.sidecars import Sidecars

log = logging.getLogger("loraroute.gateway.changes")
_EXPIRE_EVERY_S = 30.0


class ChangeManager:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        cfg = gw.runtime.config.changes
        self.enabled = cfg.enabled
        self.store: ChangeStore | None = None
        self.audit: AuditLog | None = None
        self.overlay = Overlay()
        self.sidecars = Sidecars(lambda: {p: gw.endpoint(p) for p in sorted(set(gw.endpoints) | set(gw.pods))},
                                 cfg.sidecar_timeout_s, gw.sidecar_headers)
        self._redis: Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self.where = "off"  # for the admin API: which Redis keys or which folder
        self.backend = "off"  # "redis" | "files" | "off"

    # --- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        await self.sidecars.start()
        if not self.enabled:
            return
        config = self.gw.runtime.config
        keep = config.changes.audit_keep
        if config.store.url.startswith(("redis://", "rediss://", "unix://")):
            self._redis = Redis.from_url(config.store.url, decode_responses=True, socket_timeout=5.0)
            prefix = config.store.key_prefix
            self.store = RedisChangeStore(self._redis, prefix)
            self.audit = RedisAuditLog(self._redis, prefix, keep=keep, on_append=self._count)
            self.where = f"redis ({prefix}:changes, {prefix}:audit)"
            self.backend = "redis"
        else:
            folder = Path(config.changes.state_dir)
            if not folder.is_absolute() and self.gw.config_path is not None:
                folder = self.gw.config_path.resolve().parent / folder
            file_store = FileChangeStore(folder / "changes.json")
            file_store.open()
            audit = FileAuditLog(folder / "audit.jsonl", keep=keep, on_append=self._count)
            audit.open()
            self.store, self.audit = file_store, audit
            self.where = f"files in {folder}"
            self.backend = "files"
        self.gw.config_layer = self.overlay_layer
        try:
            await self._sync()
        except Exception as exc:  # the store is down: serve the file's config, apply the overlay when it is back
            log.error("cannot read the approved changes from %s (%s); serving the config file alone until "
                      "the store answers", self.where, type(exc).__name__)
        self._task = asyncio.create_task(self._sync_forever(), name="changes-sync")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.sidecars.close()
        if self._redis is not None:
            await self._redis.aclose()

    def overlay_layer(self, config: GatewayConfig) -> GatewayConfig:
        return self.overlay.apply(config)

    def _count(self, entry: AuditEntry) -> None:
        self.gw.metrics.audit(entry.event, entry.kind)

    def _reload(self, why: str) -> None:
        try:
            self.gw.reload()
        except ConfigError as exc:
            self.gw.metrics.reload("invalid")
            log.error("reload for %s refused, the previous config keeps serving: %s", why, exc)

    async def _sync(self) -> None:
        """Take the stored overlay when it is newer than ours (another replica applied a change,
        or this one just started); put ours back when the store lost it (a Redis restart
        without persistence)."""
        assert self.store is not None
        stored = await self.store.overlay()
        if stored is None:
            if not self.overlay.empty:
                log.warning("the store lost the approved changes; writing back generation %d",
                            self.overlay.generation)
                await self.store.set_overlay(self.overlay)
            return
        if stored.generation > self.overlay.generation:
            self.overlay = stored
            self._reload(f"approved changes (overlay generation {self.overlay.generation})")

    async def _sync_forever(self) -> None:
        last_expiry = time.monotonic()
        while True:
            await asyncio.sleep(self.gw.runtime.config.changes.sync_s)
            try:
                await self._sync()
                if time.monotonic() - last_expiry > _EXPIRE_EVERY_S:
                    last_expiry = time.monotonic()
                    await self.expire()
            except Exception as exc:  # the store is down: keep serving, try again later
                log.warning("change sync failed (%s); retrying", type(exc).__name__)

    # --- internals ----------------------------------------------------------------------------
    def _require(self) -> tuple[ChangeStore, AuditLog]:
        if self.store is None or self.audit is None:
            raise APIError(503, "run-time changes are off (changes.enabled: false)", code="changes_disabled")
        return self.store, self.audit

    async def _record(self, event: str, change: Change, by: str, detail: Any = None) -> None:
        _store, audit = self._require()
        await audit.append(AuditEntry(0, time.time(), event, change.id, change.spec.kind, by, change.what,
                                      change.before, change.after, dict(change.checksums), detail))

    async def _get(self, change_id: str) -> Change:
        store, _ = self._require()
        change = await store.get(change_id)
        if change is None:
            raise APIError(404, f"no change {change_id!r}; GET /admin/changes lists them", code="change_not_found")
        return change

    async def _put(self, change: Change) -> None:
        store, _ = self._require()
        await store.put(change)

    def _state(self) -> tuple[GatewayConfig, dict[str, float]]:
        rt = self.gw.runtime
        return rt.config, current_weights(rt.pipeline)

    def _dry_run(self, spec: ChangeSpec) -> tuple[Overlay, dict[str, Any], dict[str, Any]]:
        """(overlay with ``spec``, before, after); ``ConfigError`` when it does not fit or the
        resulting config is invalid."""
        config, weights = self._state()
        before, after = describe(spec, config, weights)
        nxt = self.overlay.after(spec, config)
        candidate = nxt.apply(self.gw.base_config)
        build_pipeline(candidate.pipeline)
        return nxt, before, after

    # --- store checks through the sidecars --------------------------------------------------
    async def _complete(self, spec: ChangeSpec) -> tuple[ChangeSpec, dict[str, str], str]:
        """Look an added or rolled adapter up in the store (every pod's sidecar): fill in an
        added adapter's rank and version, check a rolled-to version exists. Returns the spec,
        the checksums of the version, and a note."""
        if not isinstance(spec, AddAdapter | RollAdapter):
            return spec, {}, ""
        config, _ = self._state()
        base = find_base(config, spec.base)
        entry = find_adapter(base, spec.adapter)
        served = spec.served_name if isinstance(spec, AddAdapter) else (entry.vllm_name if entry else spec.adapter)
        served = served or spec.adapter
        if isinstance(spec, RollAdapter) and spec.version is None:
            return spec, {}, ""
        item = f"{served}@{spec.version}" if spec.version else served
        answers = [a for a in await self.sidecars.store([item]) if a.ok and a.body.get("ok")]
        if not answers:
            return spec, {}, "not checked against the store: no sidecar answered"
        reports = [(a.pod, a.body["adapters"].get(item, {})) for a in answers]
        accepted = [(pod, r) for pod, r in reports if r.get("present") and not r.get("problems")]
        if not accepted:
            pod, report = reports[0]
            problems = "; ".join(f"[{p.get('code')}] {p.get('message')}" for p in report.get("problems", []))
            raise APIError(422, f"{served}{'@' + spec.version if spec.version else ''} cannot be served: "
                                f"{problems or 'not in the store'} (checked by the sidecar of {pod})",
                           code="adapter_not_servable")
        refused = [pod for pod, r in reports if (pod, r) not in accepted]
        note = f"pods that cannot load it (routing skips them): {', '.join(refused)}" if refused else ""
        report = accepted[0][1]
        checksums = dict(report.get("sha256") or {})
        if isinstance(spec, AddAdapter):
            spec = spec.model_copy(update={"rank": spec.rank or report.get("rank"),
                                           "version": spec.version or report.get("version")})
        return spec, checksums, note

    # --- the operations ---------------------------------------------------------------------
    async def propose(self, principal: Principal, body: Any) -> Change:
        store, _ = self._require()
        try:
            spec = SPEC.validate_python(body)
        except ValueError as exc:
            raise APIError(400, f"invalid change: {_first_error(exc)}", code="invalid_change") from None
        try:
            spec, checksums, note = await self._complete(spec)
            async with store.lock():
                await self._sync()
                _nxt, before, after = self._dry_run(spec)
                config = self.gw.runtime.config
                change = Change(id=await store.next_id(), spec=spec, status="pending",
                                needs_approval=spec.kind in config.changes.two_person, proposed_by=principal.name,
                                proposed_at=time.time(), before=before, after=after, checksums=checksums, note=note)
                await self._put(change)
                await self._record("proposed", change, principal.name, spec.reason or None)
                if not change.needs_approval:
                    await self._apply(change, principal.name)
        except ConfigError as exc:
            raise APIError(409, f"change refused: {exc}", code="change_conflict") from None
        return change

    async def approve(self, principal: Principal, change_id: str, note: str) -> Change:
        store, _ = self._require()
        async with store.lock():
            await self._sync()
            change = await self._pending(change_id)
            if principal.name == change.proposed_by:
                raise APIError(403, f"{change.id} was proposed by {change.proposed_by!r}: the same key cannot "
                                    "approve it; another key with the approver role must", code="self_approval")
            change.decided_by, change.decided_at, change.decision_note = principal.name, time.time(), note
            await self._put(change)
            await self._record("approved", change, principal.name, note or None)
            await self._apply(change, principal.name)
        return change

    async def reject(self, principal: Principal, change_id: str, note: str) -> Change:
        store, _ = self._require()
        async with store.lock():
            change = await self._pending(change_id)
            change.status = "rejected"
            change.decided_by, change.decided_at, change.decision_note = principal.name, time.time(), note
            await self._put(change)
            await self._record("rejected", change, principal.name, note or None)
        return change

    async def rollback(self, principal: Principal, change_id: str) -> Change:
        store, _ = self._require()
        async with store.lock():
            await self._sync()
            change = await self._get(change_id)
            if change.status != "applied":
                raise APIError(409, f"{change.id} is {change.status}; only an applied change can be rolled back",
                               code="change_not_applied")
            spec = inverse(change)
            config, weights = self._state()
            try:
                now, _ = describe(spec, config, weights)
            except ConfigError as exc:
                raise APIError(409, f"{change.id} cannot be rolled back: {exc}", code="change_conflict") from None
            if now != change.after:
                raise APIError(409, f"{change.id} cannot be rolled back: what it changed has changed since "
                                    f"(now {now}, it set {change.after}); roll back the later change first",
                               code="change_conflict")
            spec, checksums, note = await self._complete(spec)  # a rolled-back-to version must still exist
            undo = Change(id=await store.next_id(), spec=spec, status="pending", needs_approval=False,
                          proposed_by=principal.name, proposed_at=time.time(), before=change.after,
                          after=change.before, checksums=checksums, rollback_of=change.id, note=note)
            await self._put(undo)
            await self._record("proposed", undo, principal.name, f"rollback of {change.id}")
            await self._apply(undo, principal.name)
            if undo.status == "applied":
                change.status, change.rolled_back_by = "rolled_back", undo.id
                await self._put(change)
                await self._record("rolled_back", change, principal.name, f"by {undo.id}")
        return undo

    async def _pending(self, change_id: str) -> Change:
        change = await self._get(change_id)
        if change.status == "pending" and self._expired(change):
            await self._expire(change)
        if change.status != "pending":
            raise APIError(409, f"{change.id} is {change.status}, not pending", code="change_not_pending")
        return change

    def _expired(self, change: Change) -> bool:
        return time.time() - change.proposed_at > self.gw.runtime.config.changes.proposal_ttl_s

    async def _expire(self, change: Change) -> None:
        change.status = "expired"
        await self._put(change)
        await self._record("expired", change, "gateway")

    async def expire(self) -> int:
        """Expire pending proposals older than ``changes.proposal_ttl_s``; returns how many."""
        store, _ = self._require()
        n = 0
        async with store.lock():
            for change in await store.all():
                if change.status == "pending" and self._expired(change):
                    await self._expire(change)
                    n += 1
        return n

    async def _apply(self, change: Change, by: str) -> None:
        """Apply a pending change (the caller holds the lock): re-check, store the overlay,
        reload, run the effect, audit."""
        store, _ = self._require()
        try:
            nxt, before, after = self._dry_run(change.spec)
            if change.rollback_of is None and before != change.before:
                raise ConfigError(f"the state changed since the proposal (it was {change.before}, now {before})")
        except ConfigError as exc:
            change.status, change.error = "failed", str(exc)
            await self._put(change)
            await self._record("failed", change, by, change.error)
            return
        previous = self.overlay
        self.overlay = nxt
        try:
            self.gw.reload()
        except ConfigError as exc:
            self.overlay = previous
            change.status, change.error = "failed", f"the reload refused it: {exc}"
            await self._put(change)
            await self._record("failed", change, by, change.error)
            return
        try:
            await store.set_overlay(nxt)
        except Exception:
            self.overlay = previous  # not stored: not in effect anywhere, here neither
            self._reload("a change that could not be stored")
            raise
        change.status, change.applied_at, change.after = "applied", time.time(), after
        change.effects = await self._effect(change)
        failed = [e for e in change.effects if e.status == "failed"]
        await self._put(change)
        await self._record("applied", change, by, [e.model_dump(mode="json") for e in change.effects] or None)
        if failed:
            change.error = "; ".join(f"{e.pod}: {e.error}" for e in failed)
            await self._put(change)
            await self._record("failed", change, by, f"{len(failed)} pod(s) could not swap: {change.error}; "
                                                     f"roll back with: loraroute changes rollback {change.id}")

    async def _effect(self, change: Change) -> list[Effect]:
        spec = change.spec
        if not isinstance(spec, RollAdapter):
            return []
        config = self.gw.runtime.config
        entry = find_adapter(find_base(config, spec.base), spec.adapter)
        served = entry.vllm_name if entry else spec.adapter
        return await self.sidecars.refresh(served, spec.version)

    # --- reading ----------------------------------------------------------------------------
    async def changes(self, status: str | None = None, limit: int = 100) -> list[Change]:
        store, _ = self._require()
        found = [c for c in await store.all() if status is None or c.status == status]
        found.sort(key=lambda c: c.proposed_at, reverse=True)
        return found[:limit]

    async def change(self, change_id: str) -> Change:
        return await self._get(change_id)

    async def audit_entries(self, limit: int) -> list[AuditEntry]:
        _, audit = self._require()
        return await audit.recent(limit)


def _first_error(exc: ValueError) -> str:
    if not isinstance(exc, ValidationError):
        return str(exc)
    first = exc.errors(include_url=False, include_input=False)[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        msg = "unknown key"
    return f"{loc}: {msg}" if loc else msg
