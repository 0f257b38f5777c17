"""The local adapter folder (vLLM's ``VLLM_LORA_RESOLVER_CACHE_DIR``) filled from a source.

``ensure(name)``:

1. the name is checked (``validate_name``);
2. if ``<adapter_dir>/<name>/adapter_config.json`` exists the folder is re-validated (cheap:
   config + safetensors header) and returned as ``cached``;
3. otherwise the expected folder ``layout.format(adapter=name, base=base_key)`` is listed in the
   source: nothing there -> ``AdapterNotFound`` with diagnostics; files missing or too large ->
   ``AdapterInvalid`` before any byte is downloaded; then ``adapter_config.json`` is downloaded
   and checked first (rank, base model, ... fail fast), then the weights, into a temporary
   folder ``<adapter_dir>/.tmp-<name>-<random>`` on the same filesystem; the folder is validated
   in full and renamed into place atomically (vLLM never sees half an adapter);
4. the disk budget is enforced: while the folder's adapters exceed ``disk_budget_bytes``, the
   least recently used adapter not in use (``in_use()``: on GPU, running, loading, being
   ensured) is removed — after ``before_evict(name)`` (the sidecar unloads it from vLLM).

Concurrent ensures of one name share one task (one download; ``on_download(seconds, bytes)``
is called once per download). ``last_used`` is the time of the
last ensure or ``touch`` (initially the folder's mtime).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from vllm_sidecar.diagnostics import diagnose
from vllm_sidecar.errors import AdapterNotFound
from vllm_sidecar.sources import AdapterSource
from vllm_sidecar.validation import (
    CONFIG_FILE,
    REQUIRED_FILES,
    AdapterInfo,
    check_sizes,
    missing_file_error,
    parse_config,
    validate_dir,
    validate_name,
)

log = logging.getLogger("loraroute.sidecar.store")

_DIAG_LIMIT = 5000


@dataclass(slots=True)
class LocalAdapter:
    name: str
    path: Path
    size_bytes: int
    rank: int | None
    last_used: float


@dataclass(frozen=True, slots=True)
class EnsureResult:
    adapter: str
    path: Path
    source: str  # "cached" | "downloaded"
    seconds: float
    info: AdapterInfo
    fetched_bytes: int = 0


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
        in_use: Callable[[], Iterable[str]] | None = None,
        before_evict: Callable[[str], Awaitable[None]] | None = None,
        on_download: Callable[[float, int], None] | None = None,
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
        self._in_use = in_use or (lambda: ())
        self._before_evict = before_evict
        self._on_download = on_download
        self.fetched_bytes = 0
        self._inflight: dict[str, asyncio.Task[EnsureResult]] = {}
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
        return LocalAdapter(folder.name, folder, size, rank, last_used)

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
        return sorted(self._inflight)

    def touch(self, names: Iterable[str]) -> None:
        now = time.time()
        for name in names:
            if name in self._adapters:
                self._adapters[name].last_used = now

    # --- ensure ----------------------------------------------------------------------------------
    async def ensure(self, name: str) -> EnsureResult:
        """Make ``name`` present and valid in the adapter folder (see the module docstring)."""
        validate_name(name)
        task = self._inflight.get(name)
        if task is None:
            task = asyncio.create_task(self._ensure(name), name=f"ensure-{name}")
            self._inflight[name] = task
            task.add_done_callback(lambda _t, n=name: self._inflight.pop(n, None))
        return await asyncio.shield(task)

    async def _ensure(self, name: str) -> EnsureResult:
        started = time.monotonic()
        final = self.dir / name
        if (final / CONFIG_FILE).is_file():
            info = await asyncio.to_thread(self._validate_local, final, f"local adapter folder {final}")
            self.touch([name])
            if name not in self._adapters:
                self._adapters[name] = self._describe(final, time.time())
            return EnsureResult(name, final, "cached", time.monotonic() - started, info)
        tmp = self.dir / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        try:
            fetched, info = await asyncio.to_thread(self._fetch, name, tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / CONFIG_FILE).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # someone else put it there meanwhile
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.downloads += 1
        self.fetched_bytes += fetched
        if self._on_download is not None:
            self._on_download(time.monotonic() - started, fetched)
        self._adapters[name] = self._describe(final, time.time())
        await self.enforce_budget(keep=name)
        return EnsureResult(name, final, "downloaded", time.monotonic() - started, info, fetched)

    def _validate_local(self, folder: Path, where: str) -> AdapterInfo:
        return validate_dir(folder, where=where, max_lora_rank=self.max_lora_rank, base_model=self.base_model,
                            max_adapter_bytes=self.max_adapter_bytes)

    def expected_prefix(self, name: str) -> str:
        prefix = self.layout.format(adapter=name, base=self.base_key)
        return prefix if prefix.endswith("/") else prefix + "/"

    def _fetch(self, name: str, tmp: Path) -> tuple[int, AdapterInfo]:
        """Runs in a worker thread: list, check, download config, check, download weights."""
        prefix = self.expected_prefix(name)
        where = self.source.describe(prefix)
        listing = self.source.list(prefix, limit=200)
        direct = {o.key[len(prefix):]: o for o in listing if "/" not in o.key[len(prefix):]}
        if CONFIG_FILE not in direct:
            if not listing or not any(k in direct for k in REQUIRED_FILES):
                raise self.not_found(name, prefix)
            raise missing_file_error(where, CONFIG_FILE, sorted(direct))
        for required in REQUIRED_FILES:
            if required not in direct:
                raise missing_file_error(where, required, sorted(direct))
        check_sizes(where, {k: direct[k].size for k in REQUIRED_FILES}, self.max_adapter_bytes)
        tmp.mkdir(parents=True)
        total = self.source.download(prefix + CONFIG_FILE, tmp / CONFIG_FILE, max_bytes=self.max_adapter_bytes)
        parse_config((tmp / CONFIG_FILE).read_bytes(), where=where, max_lora_rank=self.max_lora_rank,
                     base_model=self.base_model)
        total += self.source.download(prefix + "adapter_model.safetensors", tmp / "adapter_model.safetensors",
                                      max_bytes=self.max_adapter_bytes)
        info = validate_dir(tmp, where=where, max_lora_rank=self.max_lora_rank, base_model=self.base_model,
                            max_adapter_bytes=self.max_adapter_bytes)
        return total, info

    def not_found(self, name: str, prefix: str) -> AdapterNotFound:
        fixed = self.layout.split("{", 1)[0]  # "adapters/" for "adapters/{base}/{adapter}/"
        root = fixed[: fixed.rfind("/") + 1]
        listing = self.source.list(root, limit=_DIAG_LIMIT)
        return AdapterNotFound(diagnose(name, prefix, listing, describe=self.source.describe(prefix)),
                               param="adapter")

    # --- disk budget ---------------------------------------------------------------------------
    async def enforce_budget(self, keep: str | None = None) -> list[str]:
        """Remove least recently used adapters not in use until under ``disk_budget_bytes``."""
        removed: list[str] = []
        if self.disk_bytes() <= self.disk_budget_bytes:
            return removed
        busy = set(self._in_use()) | set(self._inflight) | ({keep} if keep else set())
        for adapter in self.local():
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
