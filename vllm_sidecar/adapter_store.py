"""The local adapter folder (vLLM's ``VLLM_LORA_RESOLVER_CACHE_DIR``) filled from a source.

``ensure(name, version=None, latest=False)``:

1. the name (and version) are checked (``validate_name``);
2. if ``<adapter_dir>/<name>/adapter_config.json`` exists the folder is re-validated (cheap:
   config + safetensors header) and returned as ``cached`` — unless a ``version`` was asked for
   that differs from the local one, or ``latest`` asks for the store's current version and it
   differs: then the wanted version is fetched as below and replaces the folder (``replaced``);
3. otherwise the expected folder ``layout.format(adapter=name, base=base_key)`` (or, for a
   ``version``, its immutable copy ``manifest.versions_prefix``) is listed in the source:
   nothing there -> ``AdapterNotFound`` with diagnostics; files missing or too large ->
   ``AdapterInvalid`` before any byte is downloaded; then the manifest (when the adapter was
   published by ``loraroute adapters push``), ``adapter_config.json`` (checked at once: rank,
   base model, ... fail fast) and the weights are downloaded into a temporary folder
   ``<adapter_dir>/.tmp-<name>-<random>`` on the same filesystem; every file's checksum must
   match the manifest (a push overlapping the download shows as a mismatch: the fetch is
   repeated, up to three times); the folder is validated in full and renamed into place
   atomically (vLLM never sees half an adapter). The folder keeps the manifest (one is computed
   when the store had none), so the local version is always known;
4. the disk budget is enforced: while the folder's adapters exceed ``disk_budget_bytes``, the
   first adapter in ``eviction_order(local())`` not in use (``in_use()``: on GPU, running,
   loading, being ensured) is removed — after ``before_evict(name)`` (the sidecar unloads it
   from vLLM). Without an ``eviction_order`` that is the least recently used; the sidecar
   passes the cluster's demand (``vllm_sidecar.demand``).

Concurrent ensures of one name with the same arguments share one task (one download;
``on_download(seconds, bytes)`` is called once per download); ensures of one name with
different arguments run one after the other. ``last_used`` is the time of the last ensure or
``touch`` (initially the folder's mtime).

``inspect_remote(name)`` describes what the store holds for an adapter without downloading
the weights (``GET /store`` on the sidecar; ``loraroute doctor``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from vllm_sidecar import manifest
from vllm_sidecar.diagnostics import diagnose
from vllm_sidecar.errors import AdapterInvalid, AdapterNotFound, BadRequest, SidecarError, StoreUnreachable
from vllm_sidecar.manifest import Manifest
from vllm_sidecar.sources import AdapterSource, ObjectInfo
from vllm_sidecar.validation import (
    CONFIG_FILE,
    MANIFEST_FILE,
    REQUIRED_FILES,
    WEIGHTS_FILE,
    AdapterInfo,
    check_sizes,
    in_folder,
    missing_file_error,
    parse_config,
    validate_dir,
    validate_name,
)

log = logging.getLogger("loraroute.sidecar.store")

_DIAG_LIMIT = 5000
#: downloads of one adapter before a checksum mismatch with its manifest is reported
_FETCH_ATTEMPTS = 3
_RETRY_S = 0.2


@dataclass(slots=True)
class LocalAdapter:
    name: str
    path: Path
    size_bytes: int
    rank: int | None
    last_used: float
    version: str | None = None


@dataclass(frozen=True, slots=True)
class EnsureResult:
    adapter: str
    path: Path
    source: str  # "cached" | "downloaded" | "replaced"
    seconds: float
    info: AdapterInfo
    fetched_bytes: int = 0
    version: str | None = None
    previous_version: str | None = None


@dataclass(frozen=True, slots=True)
class RemoteAdapter:
    """What the store holds for one adapter (``inspect_remote``)."""

    adapter: str
    location: str
    present: bool
    version: str | None = None
    versions: tuple[str, ...] = ()
    rank: int | None = None
    size_bytes: int = 0
    problems: tuple[SidecarError, ...] = ()
    sha256: dict[str, str] | None = None

    def to_dict(self) -> dict[str, object]:
        return {"adapter": self.adapter, "location": self.location, "present": self.present,
                "version": self.version, "versions": list(self.versions), "rank": self.rank,
                "size_bytes": self.size_bytes, "sha256": self.sha256,
                "problems": [{"code": p.code, "message": p.message} for p in self.problems]}


def check_version(version: str) -> str:
    if not manifest.VERSION_RE.match(version):
        raise BadRequest(f"version {version!r} is not an adapter version (12 lowercase hex digits, as "
                         "`loraroute adapters push` prints)", param="version", code="invalid_version")
    return version


class AdapterStore:
    """Keep validated adapters in ``adapter_dir``, fetched from ``source`` on demand."""

    def __init__(
        self,
        adapter_dir: str | Path,
        source: AdapterSource,
        *,
        layout: str,
        base_key: str = "",
        max_lora_rank: int = 16,
        base_model: str | None = None,
        max_adapter_bytes: int = 2 * 1024**3,
        disk_budget_bytes: int = 10 * 1024**3,
        fetch_timeout_s: float = 20.0,
        in_use: Callable[[], Iterable[str]] | None = None,
        before_evict: Callable[[str], Awaitable[None]] | None = None,
        on_download: Callable[[float, int], None] | None = None,
        eviction_order: Callable[[list[LocalAdapter]], list[LocalAdapter]] | None = None,
    ) -> None:
        self.dir = Path(adapter_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.source = source
        self.layout = layout
        self.base_key = base_key
        self.max_lora_rank = max_lora_rank
        self.base_model = base_model
        self.max_adapter_bytes = max_adapter_bytes
        self.disk_budget_bytes = disk_budget_bytes
        self.fetch_timeout_s = fetch_timeout_s
        self._in_use = in_use or (lambda: ())
        self._before_evict = before_evict
        self._on_download = on_download
        self._eviction_order = eviction_order
        self.fetched_bytes = 0
        self._inflight: dict[tuple[str, str | None, bool], asyncio.Task[EnsureResult]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._adapters: dict[str, LocalAdapter] = {}
        self.evictions = 0
        self.downloads = 0
        self._scan()

    # --- local folder -----------------------------------------------------------------------
    def _scan(self) -> None:
        for entry in self.dir.iterdir():
            if entry.name.startswith(".tmp-") and entry.is_dir():
                # left over from a crash (an old one: another sidecar may share the folder)
                if time.time() - entry.stat().st_mtime > 600:
                    shutil.rmtree(entry, ignore_errors=True)
                continue
            if entry.is_dir() and (entry / CONFIG_FILE).is_file():
                self._adapters[entry.name] = self._describe(entry, entry.stat().st_mtime)

    @staticmethod
    def _describe(folder: Path, last_used: float) -> LocalAdapter:
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        rank: int | None = None
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            rank = int(json.loads((folder / CONFIG_FILE).read_bytes())["r"])
        local = manifest.read_local(folder)
        return LocalAdapter(folder.name, folder, size, rank, last_used, local.version if local else None)

    def local(self) -> list[LocalAdapter]:
        """Adapters on local disk, least recently used first."""
        return sorted(self._adapters.values(), key=lambda a: a.last_used)

    def names(self) -> list[str]:
        return sorted(self._adapters)

    def ranks(self) -> dict[str, int]:
        return {a.name: a.rank for a in self._adapters.values() if a.rank is not None}

    def disk_bytes(self) -> int:
        return sum(a.size_bytes for a in self._adapters.values())

    def inflight(self) -> list[str]:
        return sorted({key[0] for key in self._inflight})

    def touch(self, names: Iterable[str]) -> None:
        now = time.time()
        for name in names:
            if name in self._adapters:
                self._adapters[name].last_used = now

    # --- ensure ----------------------------------------------------------------------------------
    async def ensure(self, name: str, version: str | None = None, *, latest: bool = False) -> EnsureResult:
        """Make ``name`` present and valid in the adapter folder (see the module docstring)."""
        validate_name(name)
        if version is not None:
            check_version(version)
        key = (name, version, latest)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._one_at_a_time(name, version, latest), name=f"ensure-{name}")
            self._inflight[key] = task
            task.add_done_callback(lambda _t, k=key: self._inflight.pop(k, None))
        return await asyncio.shield(task)

    async def _one_at_a_time(self, name: str, version: str | None, latest: bool) -> EnsureResult:
        lock = self._locks.setdefault(name, asyncio.Lock())
        try:
            async with lock:
                return await self._ensure(name, version, latest)
        finally:
            if not lock.locked() and self._locks.get(name) is lock:
                del self._locks[name]

    async def _ensure(self, name: str, version: str | None, latest: bool) -> EnsureResult:
        started = time.monotonic()
        final = self.dir / name
        present = (final / CONFIG_FILE).is_file()
        local = manifest.read_local(final) if present else None
        if present and not latest and (version is None or (local is not None and local.version == version)):
            info = await asyncio.to_thread(self._validate_local, final, f"local adapter folder {final}")
            self.touch([name])
            if name not in self._adapters:
                self._adapters[name] = self._describe(final, time.time())
            return EnsureResult(name, final, "cached", time.monotonic() - started, info,
                                version=local.version if local else None)
        tmp = self.dir / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        try:
            fetched, info, published = await asyncio.to_thread(self._fetch, name, tmp, version)
            if present and local is not None and local.version == published.version:
                shutil.rmtree(tmp, ignore_errors=True)  # ``latest`` and already the latest
                self.touch([name])
                return EnsureResult(name, final, "cached", time.monotonic() - started, info, fetched,
                                    version=local.version)
            self._place(tmp, final, replace=present)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.downloads += 1
        self.fetched_bytes += fetched
        if self._on_download is not None:
            self._on_download(time.monotonic() - started, fetched)
        self._adapters[name] = self._describe(final, time.time())
        await self.enforce_budget(keep=name)
        return EnsureResult(name, final, "replaced" if present else "downloaded", time.monotonic() - started,
                            info, fetched, version=published.version,
                            previous_version=local.version if local else None)

    def _place(self, tmp: Path, final: Path, *, replace: bool) -> None:
        """Rename the checked folder into place; when replacing, the old one is moved aside first
        (two renames on one filesystem: the folder is never half written; for the instant between
        the renames it is absent, and vLLM only reads it when it loads the adapter, which the
        sidecar does after the swap)."""
        if replace:
            old = self.dir / f".tmp-old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            try:
                os.rename(tmp, final)
            except OSError:
                os.rename(old, final)
                raise
            shutil.rmtree(old, ignore_errors=True)
            return
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / CONFIG_FILE).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # someone else put it there meanwhile

    def _validate_local(self, folder: Path, where: str) -> AdapterInfo:
        return validate_dir(folder, where=where, max_lora_rank=self.max_lora_rank, base_model=self.base_model,
                            max_adapter_bytes=self.max_adapter_bytes)

    def expected_prefix(self, name: str) -> str:
        prefix = self.layout.format(adapter=name, base=self.base_key)
        return prefix if prefix.endswith("/") else prefix + "/"

    def _direct(self, prefix: str) -> dict[str, ObjectInfo]:
        """Objects directly in ``prefix`` (not in sub-folders), by file name."""
        listing = self.source.list(prefix, limit=200)
        return {o.key[len(prefix):]: o for o in listing if "/" not in o.key[len(prefix):]}

    def _fetch(self, name: str, tmp: Path, version: str | None) -> tuple[int, AdapterInfo, Manifest]:
        """Runs in a worker thread: list, check, download manifest and config, check, download
        weights, verify against the manifest (fetching again after a mismatch). No store request
        starts once ``fetch_timeout_s`` has passed (``StoreUnreachable``, 503)."""
        live = self.expected_prefix(name)
        prefix = live if version is None else manifest.versions_prefix(live, name, version)
        where = self.source.describe(prefix)
        deadline = time.monotonic() + self.fetch_timeout_s

        def in_time() -> None:
            if time.monotonic() > deadline:
                raise StoreUnreachable(f"the adapter store did not deliver adapter {name!r} within "
                                       f"{self.fetch_timeout_s:g}s (fetch_timeout_s) from {where}; check that it "
                                       "answers (GET /store on this sidecar)", layer="connect", code="store_timeout")

        for attempt in range(1, _FETCH_ATTEMPTS + 1):
            in_time()
            direct = self._direct(prefix)
            if version is not None and MANIFEST_FILE not in direct:
                raise AdapterNotFound(f"version {version} of adapter {name!r} is not in the store: looked for "
                                      f"{in_folder(where, MANIFEST_FILE)}; `loraroute adapters ls` lists the "
                                      "versions pushed",
                                      param="version", code="version_not_found")
            if CONFIG_FILE not in direct:
                if not direct or not any(k in direct for k in REQUIRED_FILES):
                    raise self.not_found(name, prefix)
                raise missing_file_error(where, CONFIG_FILE, sorted(direct))
            for required in REQUIRED_FILES:
                if required not in direct:
                    raise missing_file_error(where, required, sorted(direct))
            check_sizes(where, {k: direct[k].size for k in REQUIRED_FILES}, self.max_adapter_bytes)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            total = 0
            published: Manifest | None = None
            if MANIFEST_FILE in direct:
                in_time()
                total += self.source.download(prefix + MANIFEST_FILE, tmp / MANIFEST_FILE, max_bytes=1 << 20)
                published = Manifest.parse((tmp / MANIFEST_FILE).read_bytes(), where=where)
            in_time()
            total += self.source.download(prefix + CONFIG_FILE, tmp / CONFIG_FILE, max_bytes=self.max_adapter_bytes)
            parse_config((tmp / CONFIG_FILE).read_bytes(), where=where, max_lora_rank=self.max_lora_rank,
                         base_model=self.base_model)
            in_time()
            total += self.source.download(prefix + WEIGHTS_FILE, tmp / WEIGHTS_FILE, max_bytes=self.max_adapter_bytes)
            if published is not None:
                differs = published.mismatch(tmp)
                if differs:
                    if attempt < _FETCH_ATTEMPTS:
                        log.info("adapter %s changed during its download (%s); fetching again", name, differs)
                        time.sleep(_RETRY_S * attempt)
                        continue
                    raise AdapterInvalid(f"{where}: {differs} (version {published.version}): the files kept "
                                         "changing while they were downloaded, or were changed without "
                                         "`loraroute adapters push`; push the adapter again",
                                         code="checksum_mismatch")
            info = validate_dir(tmp, where=where, max_lora_rank=self.max_lora_rank, base_model=self.base_model,
                                max_adapter_bytes=self.max_adapter_bytes)
            if published is None:
                published = manifest.build(name, tmp, rank=info.rank, base_model=info.base_model, pushed_at="")
                (tmp / MANIFEST_FILE).write_bytes(published.to_json())
            return total, info, published
        raise AssertionError("unreachable")

    def inspect_remote(self, name: str, version: str | None = None) -> RemoteAdapter:
        """Runs in a worker thread: the adapter's live folder (or the folder of ``version``):
        files, manifest, config checked against this pod, and the versions kept, without
        downloading the weights. Store errors (TLS, connect, credentials) propagate."""
        validate_name(name)
        live = self.expected_prefix(name)
        root = manifest.versions_root(live, name)
        versions = tuple(sorted({o.key[len(root):].split("/", 1)[0] for o in self.source.list(root, limit=2000)
                                 if o.key.endswith("/" + MANIFEST_FILE)}))
        prefix = live if version is None else manifest.versions_prefix(live, name, check_version(version))
        where = self.source.describe(prefix)
        direct = self._direct(prefix)
        if version is not None and version not in versions:
            return RemoteAdapter(name, where, False, versions=versions, problems=(AdapterNotFound(
                f"version {version} of adapter {name!r} is not in the store (looked for "
                f"{in_folder(where, MANIFEST_FILE)}); "
                f"versions there: {', '.join(versions) or 'none'}", code="version_not_found"),))
        if not any(k in direct for k in REQUIRED_FILES):
            return RemoteAdapter(name, where, False, versions=versions, problems=(self.not_found(name, prefix),))
        problems: list[SidecarError] = []
        for required in REQUIRED_FILES:
            if required not in direct:
                problems.append(missing_file_error(where, required, sorted(direct)))
        size = sum(direct[k].size for k in REQUIRED_FILES if k in direct)
        try:
            check_sizes(where, {k: direct[k].size for k in REQUIRED_FILES if k in direct}, self.max_adapter_bytes)
        except AdapterInvalid as exc:
            problems.append(exc)
        found_version: str | None = None
        sha256: dict[str, str] | None = None
        rank: int | None = None
        with tempfile.TemporaryDirectory(prefix=".inspect-", dir=self.dir) as scratch:
            folder = Path(scratch)
            try:
                if MANIFEST_FILE in direct:
                    self.source.download(prefix + MANIFEST_FILE, folder / MANIFEST_FILE, max_bytes=1 << 20)
                    published = Manifest.parse((folder / MANIFEST_FILE).read_bytes(), where=where)
                    found_version = published.version
                    sha256 = {n: f.sha256 for n, f in sorted(published.files.items())}
                if CONFIG_FILE in direct:
                    self.source.download(prefix + CONFIG_FILE, folder / CONFIG_FILE, max_bytes=1 << 20)
                    config = parse_config((folder / CONFIG_FILE).read_bytes(), where=where,
                                          max_lora_rank=self.max_lora_rank, base_model=self.base_model)
                    rank = config.top_rank
            except AdapterInvalid as exc:
                problems.append(exc)
        return RemoteAdapter(name, where, True, found_version, versions, rank, size, tuple(problems), sha256)

    def root(self) -> str:
        """The layout's fixed part: ``adapters/`` for ``adapters/{base}/{adapter}/``."""
        fixed = self.layout.split("{", 1)[0]
        return fixed[: fixed.rfind("/") + 1]

    def not_found(self, name: str, prefix: str) -> AdapterNotFound:
        listing = self.source.list(self.root(), limit=_DIAG_LIMIT)
        return AdapterNotFound(diagnose(name, prefix, listing, describe=self.source.describe(prefix)),
                               param="adapter")

    # --- disk budget ---------------------------------------------------------------------------
    async def enforce_budget(self, keep: str | None = None) -> list[str]:
        """Remove adapters not in use, in ``eviction_order`` (default: least recently used
        first), until under ``disk_budget_bytes``."""
        removed: list[str] = []
        if self.disk_bytes() <= self.disk_budget_bytes:
            return removed
        busy = set(self._in_use()) | set(self.inflight()) | ({keep} if keep else set())
        order = self.local() if self._eviction_order is None else self._eviction_order(self.local())
        for adapter in order:
            if self.disk_bytes() <= self.disk_budget_bytes:
                break
            if adapter.name in busy:
                continue
            if self._before_evict is not None:
                with contextlib.suppress(Exception):
                    await self._before_evict(adapter.name)
            shutil.rmtree(adapter.path, ignore_errors=True)
            self._adapters.pop(adapter.name, None)
            self.evictions += 1
            removed.append(adapter.name)
            log.info("evicted adapter %s from local disk (disk budget %d bytes)", adapter.name,
                     self.disk_budget_bytes)
        if self.disk_bytes() > self.disk_budget_bytes:
            log.warning("adapters on disk use %d bytes, above the budget of %d, but all are in use",
                        self.disk_bytes(), self.disk_budget_bytes)
        return removed
