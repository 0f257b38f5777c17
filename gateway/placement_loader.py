"""How the placer loads an adapter onto a pod: through its sidecar, else through vLLM itself.

- A pod with a sidecar: ``POST {sidecar}/adapters/{name}/ensure {"load": true}`` — the sidecar
  fetches the adapter if it is missing, validates it, loads it (reading a registered but evicted
  one again in place) and tells its monitor, so the pod's PodState shows it on GPU at once. The
  stall is the sidecar's ``load_seconds`` (its ``/v1/load_lora_adapter`` call; a fetch from the
  object store stalls nothing).
- A pod without one: ``POST {pod}/v1/load_lora_adapter {"lora_name", "lora_path"}`` with
  ``lora_path = placement.adapter_dir/name``; vLLM's 400 "has already been loaded" is retried
  once with ``"load_inplace": true`` (a registered name the CPU cache may have evicted). The
  stall is the call's duration. Without ``adapter_dir`` such pods are not loaded.

Every call is bounded by ``placement.preload.timeout_s``; failures come back as a
``LoadResult`` (never raised), with a short reason safe to show in the admin API.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp
import orjson

_MESSAGE_MAX = 300


@dataclass(frozen=True, slots=True)
class LoadResult:
    ok: bool
    via: str             # "sidecar" | "vllm" | "none"
    stall_s: float       # engine stall the load caused, seconds (0 when nothing was loaded; a failed
                         # call counts whole: it may have stalled the engine before failing)
    detail: str          # "loaded", "already resident" or what went wrong


def _message(body: bytes) -> str:
    """The ``error.message`` of an OpenAI-shaped body, else the start of the text."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:_MESSAGE_MAX].decode("utf-8", "replace").strip()
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return str(err["message"])[:_MESSAGE_MAX]
    return str(data)[:_MESSAGE_MAX]


class AdapterLoader:
    """``session``: returns the gateway's aiohttp session (it exists once the gateway started)."""

    def __init__(self, session: Callable[[], aiohttp.ClientSession | None], adapter_dir: str | None,
                 timeout_s: float, sidecar_headers: Callable[[], Mapping[str, str]] = dict) -> None:
        self._session = session
        self._sidecar_headers = sidecar_headers
        self.adapter_dir = adapter_dir.rstrip("/") if adapter_dir else None
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    def can_load(self, sidecar_url: str | None) -> bool:
        return bool(sidecar_url) or self.adapter_dir is not None

    async def load(self, pod_url: str, sidecar_url: str | None, adapter: str) -> LoadResult:
        session = self._session()
        if session is None:
            return LoadResult(False, "none", 0.0, "the gateway's HTTP client is not running")
        if sidecar_url:
            return await self._via_sidecar(session, sidecar_url, adapter)
        if self.adapter_dir is None:
            return LoadResult(False, "none", 0.0, "no sidecar and no placement.adapter_dir")
        return await self._via_vllm(session, pod_url, adapter)

    async def _post(self, session: aiohttp.ClientSession, url: str, body: dict[str, object],
                    headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        async with session.post(url, json=body, timeout=self.timeout, headers=headers) as resp:
            return resp.status, await resp.read()

    async def _via_sidecar(self, session: aiohttp.ClientSession, sidecar_url: str, adapter: str) -> LoadResult:
        url = f"{sidecar_url}/adapters/{urllib.parse.quote(adapter, safe='')}/ensure"
        t0 = time.perf_counter()
        try:
            status, body = await self._post(session, url, {"load": True}, self._sidecar_headers())
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            return LoadResult(False, "sidecar", time.perf_counter() - t0, f"sidecar unreachable ({type(e).__name__})")
        if status != 200:  # a refused load may have stalled the engine: count the whole call
            return LoadResult(False, "sidecar", time.perf_counter() - t0, f"sidecar status {status}: {_message(body)}")
        try:
            data = orjson.loads(body)
            stall = float(data.get("load_seconds", data.get("seconds", 0.0)))
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            return LoadResult(True, "sidecar", time.perf_counter() - t0, "loaded (unreadable sidecar answer)")
        return LoadResult(True, "sidecar", stall, "loaded" if stall > 0 else "already resident")

    async def _via_vllm(self, session: aiohttp.ClientSession, pod_url: str, adapter: str) -> LoadResult:
        url = f"{pod_url}/v1/load_lora_adapter"
        body: dict[str, object] = {"lora_name": adapter, "lora_path": f"{self.adapter_dir}/{adapter}"}
        t0 = time.perf_counter()
        try:
            status, raw = await self._post(session, url, body)
            if status == 400 and b"already been loaded" in raw:
                t0 = time.perf_counter()
                status, raw = await self._post(session, url, {**body, "load_inplace": True})
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            return LoadResult(False, "vllm", time.perf_counter() - t0, f"vLLM unreachable ({type(e).__name__})")
        seconds = time.perf_counter() - t0
        if status == 200:
            return LoadResult(True, "vllm", seconds, "loaded")
        return LoadResult(False, "vllm", seconds, f"vLLM status {status}: {_message(raw)}")
