"""Kubernetes discovery: vLLM pods found by label selector through the Kubernetes API.

Two layers:

- ``PodWatchState`` — pure, no I/O: fed with the raw dicts the API server sends (a pod LIST
  response, then watch events ``{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": {...}}``),
  it keeps the ``{pod_name: Endpoint}`` mapping and the ``resourceVersion`` to resume from.
  Tested against recorded-format payloads (``tests/fixtures/k8s/``).
- ``KubernetesDiscovery`` — the ``gateway.discovery.Discovery`` implementation. It uses the
  official ``kubernetes`` client (optional extra ``k8s``, imported only when this class starts)
  for configuration (in-cluster service-account token and CA, or a kubeconfig), authentication
  and TLS; LISTs pods, then WATCHes from the list's ``resourceVersion`` in a background thread
  (the client is synchronous) and hands each new mapping to the event loop.

A pod is routable (present in the mapping) when all of these hold:

- ``status.phase == "Running"`` and ``metadata.deletionTimestamp`` is unset (a pod being
  deleted leaves at once, at the start of its grace period, not when it is gone);
- its ``Ready`` condition is ``"True"`` (so vLLM's readiness probe, i.e. the model is loaded,
  gates traffic) and it has a ``status.podIP``.

``DELETED`` and any ``MODIFIED`` that breaks one of these remove the pod immediately. The endpoint
is ``<scheme>://<podIP>:<port>`` and, when ``sidecar_port`` is set, ``http://<podIP>:<sidecar_port>``
(IPv6 addresses are bracketed). The key is the pod name — the same id the sidecar publishes its
PodState under (``--pod-id=$(POD_NAME)`` in the chart), so the gateway can require both.

Watch protocol handled (see the Kubernetes API concepts page, "Efficient detection of changes"):

- the LIST's ``metadata.resourceVersion`` starts the watch; every event's object carries a newer
  one; ``BOOKMARK`` events (requested with ``allowWatchBookmarks``) only move it forward;
- an ``ERROR`` event with ``code`` 410 (``Expired``: the version is too old) or an HTTP 410 on the
  watch request means "re-LIST": the mapping is replaced by the new list, not merged;
- the server ends a watch after ``timeoutSeconds`` (``resync_s`` here); we re-watch from the last
  version without re-listing;
- a watch that ends within ``EMPTY_WATCH_S`` (1 s) without any event is treated like an error
  for the backoff (no tight re-watch loop), but without a re-LIST;
- any other error (connection refused, 5xx, 401/403, a malformed line) is retried after a bounded
  exponential backoff: ``min(backoff_max_s, backoff_base_s * 2**(n-1))`` for the n-th consecutive
  failure (defaults 0.5 s and 30 s), followed by a fresh LIST. While the API server is
  unreachable the last known mapping stays in place (pods keep serving; their PodState TTL in
  Redis is the second line of defence).

Example config (``discovery`` section of the gateway YAML)::

    discovery:
      kubernetes:
        namespace: llm            # default: the gateway's own namespace
        label_selector: app.kubernetes.io/component=vllm
        port: 8000                # vLLM's port
        sidecar_port: 8081        # the sidecar's port, or omit
        resync_s: 30
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from gateway.discovery import Endpoint, _Listeners

log = logging.getLogger("loraroute.discovery.k8s")

#: a watch that ends sooner than this without a single event counts as a failure (backoff)
EMPTY_WATCH_S = 1.0

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class WatchOutcome(Enum):
    """What one watch event meant for the caller's loop."""

    CHANGED = "changed"  # the mapping changed
    UNCHANGED = "unchanged"  # nothing routable changed (bookmark, irrelevant pod update)
    RELIST = "relist"  # 410 Gone / Expired: LIST again and replace the mapping
    ERROR = "error"  # another ERROR event: back off, then LIST again


class WatchError(RuntimeError):
    """The API server or the stream failed; the caller backs off and re-lists."""


@dataclass(frozen=True, slots=True)
class PodEndpointRule:
    """How a Pod object becomes an Endpoint."""

    port: int = 8000
    sidecar_port: int | None = None
    scheme: str = "http"

    def endpoint(self, pod_ip: str) -> Endpoint:
        host = pod_ip
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(pod_ip).version == 6:
                host = f"[{pod_ip}]"
        sidecar = f"http://{host}:{self.sidecar_port}" if self.sidecar_port else None
        return Endpoint(f"{self.scheme}://{host}:{self.port}", sidecar)


def pod_is_routable(pod: Mapping[str, Any]) -> bool:
    """Running, not being deleted, Ready condition "True", and has a pod IP."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    if meta.get("deletionTimestamp"):
        return False
    if status.get("phase") != "Running" or not status.get("podIP"):
        return False
    for cond in status.get("conditions") or ():
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


class PodWatchState:
    """Pure watch-event processing: LIST + events in, ``{pod_name: Endpoint}`` out. No I/O."""

    def __init__(self, rule: PodEndpointRule) -> None:
        self.rule = rule
        self.resource_version: str | None = None
        self._endpoints: dict[str, Endpoint] = {}
        self.last_error: str | None = None

    def endpoints(self) -> dict[str, Endpoint]:
        """A copy of the current mapping."""
        return dict(self._endpoints)

    def _endpoint_of(self, pod: Mapping[str, Any]) -> tuple[str, Endpoint | None]:
        name = str((pod.get("metadata") or {}).get("name") or "")
        if not name or not pod_is_routable(pod):
            return name, None
        return name, self.rule.endpoint(str(pod["status"]["podIP"]))

    def reset(self, pod_list: Mapping[str, Any]) -> bool:
        """Replace everything with a LIST response (``{"kind": "PodList", "items": [...],
        "metadata": {"resourceVersion": ...}}``). Returns True when the mapping changed."""
        new: dict[str, Endpoint] = {}
        for pod in pod_list.get("items") or ():
            name, ep = self._endpoint_of(pod)
            if ep is not None:
                new[name] = ep
        self.resource_version = str((pod_list.get("metadata") or {}).get("resourceVersion") or "") or None
        changed = new != self._endpoints
        self._endpoints = new
        self.last_error = None
        return changed

    def apply(self, event: Mapping[str, Any]) -> WatchOutcome:
        """Apply one watch event as the API server sends it."""
        etype = event.get("type")
        obj = event.get("object") or {}
        if etype == "ERROR":
            code = obj.get("code")
            self.last_error = f"{obj.get('reason') or 'Error'} ({code}): {obj.get('message') or ''}".strip()
            if code == 410 or obj.get("reason") in ("Expired", "Gone"):
                self.resource_version = None
                return WatchOutcome.RELIST
            return WatchOutcome.ERROR
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if rv:
            self.resource_version = str(rv)
        if etype == "BOOKMARK":
            return WatchOutcome.UNCHANGED
        if etype not in ("ADDED", "MODIFIED", "DELETED"):
            self.last_error = f"unknown watch event type {etype!r}"
            return WatchOutcome.ERROR
        name, ep = self._endpoint_of(obj)
        if not name:
            return WatchOutcome.UNCHANGED
        if etype == "DELETED" or ep is None:
            if self._endpoints.pop(name, None) is not None:
                return WatchOutcome.CHANGED
            return WatchOutcome.UNCHANGED
        if self._endpoints.get(name) == ep:
            return WatchOutcome.UNCHANGED
        self._endpoints[name] = ep
        return WatchOutcome.CHANGED

    def apply_all(self, events: Iterable[Mapping[str, Any]]) -> list[WatchOutcome]:
        """Apply events in order (a recorded stream); stops after the first RELIST/ERROR, as the
        live loop does."""
        out = []
        for ev in events:
            outcome = self.apply(ev)
            out.append(outcome)
            if outcome in (WatchOutcome.RELIST, WatchOutcome.ERROR):
                break
        return out


def backoff_delay(failures: int, base_s: float = 0.5, max_s: float = 30.0) -> float:
    """Seconds to wait after ``failures`` consecutive failures: ``min(max_s, base_s * 2**(failures-1))``."""
    if failures <= 0:
        return 0.0
    return min(max_s, base_s * (2 ** min(failures - 1, 30)))


def iter_json_lines(chunks: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """Split a watch response body (newline-delimited JSON, chunked arbitrarily) into dicts.
    A line that is not a JSON object raises ``WatchError``."""
    buf = b""
    for chunk in chunks:
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield _parse_line(line)
    if buf.strip():
        yield _parse_line(buf)


def _parse_line(line: bytes) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError:
        raise WatchError("malformed watch event line (not JSON)") from None
    if not isinstance(value, dict):
        raise WatchError("malformed watch event line (not an object)")
    return value


def own_namespace() -> str:
    """The namespace this process runs in (service-account file, ``POD_NAMESPACE``, ``default``)."""
    with contextlib.suppress(OSError):
        text = SERVICE_ACCOUNT_NAMESPACE.read_text(encoding="utf-8").strip()
        if text:
            return text
    return os.environ.get("POD_NAMESPACE") or "default"


def default_api_factory() -> Any:
    """A ``kubernetes.client.CoreV1Api``: in-cluster config when running in a pod, else the
    kubeconfig (``KUBECONFIG`` / ``~/.kube/config``)."""
    try:
        from kubernetes import client, config  # type: ignore[import-untyped]
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "Kubernetes discovery needs the 'kubernetes' package: pip install 'loraroute[k8s]'"
        ) from e
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CoreV1Api()


class KubernetesDiscovery(_Listeners):
    """``Discovery`` over the Kubernetes API (see the module docstring for the rules).

    ``api_factory`` returns a ``kubernetes.client.CoreV1Api`` (default: in-cluster config or
    kubeconfig); tests pass one configured for a local replay server. ``start()`` does the first
    LIST (raising if it fails, so a gateway without API access fails loudly at start-up), then
    watches in a daemon thread. Listeners are called on the event loop that ran ``start()``.
    """

    def __init__(
        self,
        *,
        label_selector: str,
        namespace: str | None = None,
        port: int = 8000,
        sidecar_port: int | None = None,
        scheme: str = "http",
        resync_s: float = 30.0,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        request_timeout_s: float = 10.0,
        api_factory: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__()
        self.label_selector = label_selector
        self.namespace = namespace or own_namespace()
        self.resync_s = resync_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.request_timeout_s = request_timeout_s
        self._api_factory = api_factory or default_api_factory
        self._state = PodWatchState(PodEndpointRule(port=port, sidecar_port=sidecar_port, scheme=scheme))
        self._api: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._resp: Any = None
        self._resp_lock = threading.Lock()
        #: counters for /metrics and tests: lists done, watch streams opened, failures seen
        self.stats = {"lists": 0, "watches": 0, "failures": 0, "events": 0, "empty_watches": 0}

    @classmethod
    def from_config(cls, cfg: Any, **kwargs: Any) -> KubernetesDiscovery:
        """Build from ``gateway.config.KubernetesDiscoveryConfig``."""
        return cls(
            label_selector=cfg.label_selector,
            namespace=cfg.namespace,
            port=cfg.port,
            sidecar_port=cfg.sidecar_port,
            scheme=cfg.scheme,
            resync_s=cfg.resync_s,
            **kwargs,
        )

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._api = await asyncio.to_thread(self._api_factory)
        await asyncio.to_thread(self._list)
        self._set(self._state.endpoints())
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="k8s-pod-watch", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        self._stop.set()
        self._abort_stream()
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.to_thread(thread.join, self.request_timeout_s + 1.0)

    # --- the thread --------------------------------------------------------------------------
    def _list(self) -> None:
        resp = self._api.list_namespaced_pod(
            self.namespace,
            label_selector=self.label_selector,
            _preload_content=False,
            _request_timeout=self.request_timeout_s,
        )
        try:
            body = json.loads(resp.data)
        finally:
            with contextlib.suppress(Exception):
                resp.release_conn()
        if not isinstance(body, dict) or body.get("kind") not in (None, "PodList"):
            raise WatchError("pod LIST returned something other than a PodList")
        self._state.reset(body)
        self.stats["lists"] += 1

    def _publish(self) -> None:
        snapshot = self._state.endpoints()
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._set, snapshot)

    def _run(self) -> None:
        failures = 0
        need_list = False
        while not self._stop.is_set():
            try:
                if need_list or self._state.resource_version is None:
                    self._list()
                    self._publish()
                    need_list = False
                started = time.monotonic()
                events_before = self.stats["events"]
                outcome = self._watch_once()
                if outcome is WatchOutcome.UNCHANGED and self.stats["events"] == events_before and (
                    time.monotonic() - started < EMPTY_WATCH_S
                ):
                    # a watch that ends at once with nothing in it (a proxy cutting streams, an
                    # overloaded server): back off instead of re-watching in a tight loop
                    failures += 1
                    self.stats["empty_watches"] += 1
                    self._stop.wait(backoff_delay(failures, self.backoff_base_s, self.backoff_max_s))
                    continue
                failures = 0
                if outcome is WatchOutcome.RELIST:
                    log.info("pod watch expired (410); re-listing")
                    need_list = True
                elif outcome is WatchOutcome.ERROR:
                    raise WatchError(self._state.last_error or "watch ERROR event")
            except Exception as e:  # noqa: BLE001 - every failure is retried with backoff
                if self._stop.is_set():
                    break
                status = getattr(e, "status", None)
                if status == 410:
                    need_list = True
                    continue
                failures += 1
                self.stats["failures"] += 1
                need_list = True
                delay = backoff_delay(failures, self.backoff_base_s, self.backoff_max_s)
                log.warning(
                    "pod watch failed (%s%s); retrying in %.1fs",
                    type(e).__name__,
                    f" {status}" if status else "",
                    delay,
                )
                self._stop.wait(delay)

    def _watch_once(self) -> WatchOutcome:
        """One watch request, until the server ends it, an ERROR event or ``close()``."""
        resp = self._api.list_namespaced_pod(
            self.namespace,
            label_selector=self.label_selector,
            watch=True,
            allow_watch_bookmarks=True,
            resource_version=self._state.resource_version,
            timeout_seconds=max(1, int(self.resync_s)),
            _preload_content=False,
            _request_timeout=(self.request_timeout_s, self.resync_s + self.request_timeout_s),
        )
        with self._resp_lock:
            self._resp = resp
        self.stats["watches"] += 1
        try:
            for event in iter_json_lines(resp.stream(amt=None, decode_content=True)):
                self.stats["events"] += 1
                outcome = self._state.apply(event)
                if outcome is WatchOutcome.CHANGED:
                    self._publish()
                elif outcome in (WatchOutcome.RELIST, WatchOutcome.ERROR):
                    return outcome
                if self._stop.is_set():
                    break
        finally:
            with self._resp_lock:
                self._resp = None
            with contextlib.suppress(Exception):
                resp.close()
            with contextlib.suppress(Exception):
                resp.release_conn()
        return WatchOutcome.UNCHANGED

    def _abort_stream(self) -> None:
        """Unblock a thread waiting in the middle of a watch read."""
        import socket

        with self._resp_lock:
            resp = self._resp
        if resp is None:
            return
        with contextlib.suppress(Exception):
            sock = getattr(getattr(resp, "connection", None), "sock", None)
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
