"""Adapter materialisation through a pod's sidecar: ``POST {sidecar}/adapters/{name}/ensure``.

Concurrent requests for the same (pod, adapter) share one call: the first creates a task, the
others await it (shielded, so one client going away does not cancel it for the rest). A success is
remembered for ``ensure.remember_s`` seconds, enough for the pod's PodState to show the adapter.

When the allowlist pins the adapter's version (``bases[].adapters[].version``, set by a roll),
the ensure asks for exactly that version (``{"version": ...}``), so a pod fetching the adapter
for the first time gets the same version as the pods that already hold it.

Outcome -> what the request sees:

- 200 -> forward to the pod.
- 400 / 404 / 422 from the sidecar (the adapter is missing from the store or invalid — the same on
  every pod) -> ``EnsureFailed(permanent=True)``: a 502 carrying the sidecar's message, no other
  pod tried.
- 502 / 503 / connection error / timeout (this pod's trouble) -> ``EnsureFailed(permanent=False)``:
  the next-best pod is tried; when none is left, a 503 with the reason.

``EnsureFailed`` is one of the typed upstream failures (``gateway.failures``).
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import Callable, Mapping

import aiohttp

from gateway.errors import error_message
from gateway.failures import EnsureFailed
from gateway.metrics import GatewayMetrics
from gateway.upstream import Upstream


class Ensurer:
    """``versions()``: adapter -> pinned version; ``headers()``: what each call carries (the
    sidecars' control token, ``gateway.sidecars.sidecar_auth``)."""

    def __init__(self, upstream: Upstream, metrics: GatewayMetrics,
                 versions: Callable[[], Mapping[str, str]] = dict,
                 headers: Callable[[], Mapping[str, str]] = dict) -> None:
        self._upstream = upstream
        self._metrics = metrics
        self._versions = versions
        self._headers = headers
        self._pending: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._done: dict[tuple[str, str], float] = {}

    def recently_ensured(self, pod_id: str, adapter: str, remember_s: float) -> bool:
        at = self._done.get((pod_id, adapter))
        return at is not None and time.monotonic() - at < remember_s

    async def ensure(self, pod_id: str, sidecar_url: str, adapter: str) -> None:
        """Make sure ``adapter`` is on ``pod_id``'s disk. Raises ``EnsureFailed``."""
        key = (pod_id, adapter)
        task = self._pending.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._call(pod_id, sidecar_url, adapter))
            self._pending[key] = task
            task.add_done_callback(lambda _t, k=key: self._pending.pop(k, None))
        await asyncio.shield(task)

    async def _call(self, pod_id: str, sidecar_url: str, adapter: str) -> None:
        session = self._upstream.session
        assert session is not None, "Upstream.start() was not awaited"
        url = f"{sidecar_url}/adapters/{urllib.parse.quote(adapter, safe='')}/ensure"
        version = self._versions().get(adapter)
        started = time.perf_counter()
        try:
            async with session.post(url, json={"version": version} if version else None,
                                    timeout=self._upstream.ensure_timeout, headers=self._headers()) as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            self._metrics.ensure(pod_id, "unreachable")
            raise EnsureFailed(
                pod_id,
                f"the sidecar of pod {pod_id!r} did not answer the ensure of adapter {adapter!r} "
                f"({type(e).__name__})",
                permanent=False,
            ) from None
        finally:
            self._metrics.ensure_seconds.observe(time.perf_counter() - started)
        if status == 200:
            self._metrics.ensure(pod_id, "ok")
            self._done[(pod_id, adapter)] = time.monotonic()
            if len(self._done) > 50_000:
                self._done.clear()
            return
        message = error_message(body)
        if status in (404, 422, 400):
            self._metrics.ensure(pod_id, "rejected")
            raise EnsureFailed(pod_id, f"adapter {adapter!r} cannot be materialised: {message}", permanent=True)
        self._metrics.ensure(pod_id, "failed")
        raise EnsureFailed(
            pod_id,
            f"pod {pod_id!r} could not materialise adapter {adapter!r} (sidecar status {status}): {message}",
            permanent=False,
        )
