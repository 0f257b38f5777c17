"""Kubernetes discovery against API payloads in the API server's wire format.

Pure processing is fed the fixture events one by one; the client wiring is exercised with the
real ``kubernetes`` client talking to a small replay server on 127.0.0.1 that answers the pod
LIST and WATCH requests with the fixture payloads (chunked, newline-delimited, as the API
server streams them) and records what the client asked for.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from gateway.discovery import Discovery, Endpoint
from gateway.discovery_k8s import (
    KubernetesDiscovery,
    PodEndpointRule,
    PodWatchState,
    WatchError,
    WatchOutcome,
    backoff_delay,
    iter_json_lines,
    pod_is_routable,
)

FIX = Path(__file__).parent / "fixtures" / "k8s"
A = "loraroute-vllm-6d5f8c7b9d-4xk2p"
B = "loraroute-vllm-6d5f8c7b9d-h7wqz"
C = "loraroute-vllm-6d5f8c7b9d-zp9mv"
D = "loraroute-vllm-6d5f8c7b9d-r2d6n"
SELECTOR = "app.kubernetes.io/instance=loraroute,app.kubernetes.io/component=vllm"


def go_bool(value: str | None) -> bool:
    """How the API server parses boolean query parameters (Go's strconv.ParseBool)."""
    return value in ("1", "t", "T", "TRUE", "true", "True")


def load(name: str) -> Any:
    return json.loads((FIX / name).read_text())


def rule() -> PodEndpointRule:
    return PodEndpointRule(port=8000, sidecar_port=8081)


# --------------------------------------------------------------------------------------------
# the fixtures are real Kubernetes objects
# --------------------------------------------------------------------------------------------
def test_fixture_pods_validate_against_the_kubernetes_pod_schema() -> None:
    import kubernetes_validate

    pods = load("pod-list.json")["items"] + load("pod-list-relisted.json")["items"]
    pods += [e["object"] for e in load("watch-lifecycle.json") + load("watch-expired.json") if e["object"]["kind"] == "Pod" and e["type"] != "BOOKMARK"]
    assert len(pods) >= 12
    for pod in pods:
        kubernetes_validate.validate(pod, "1.30.0", strict=True)
    bad = json.loads(json.dumps(pods[0]))
    bad["status"]["podIp"] = "typo"  # the validator does catch a misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.30.0", strict=True)


# --------------------------------------------------------------------------------------------
# pure processing
# --------------------------------------------------------------------------------------------
def test_list_keeps_only_ready_running_pods() -> None:
    st = PodWatchState(rule())
    assert st.reset(load("pod-list.json")) is True
    assert st.endpoints() == {A: Endpoint("http://10.128.2.41:8000", "http://10.128.2.41:8081")}
    assert st.resource_version == load("pod-list.json")["metadata"]["resourceVersion"]
    assert st.reset(load("pod-list.json")) is False  # same list: no change


def test_watch_lifecycle_step_by_step() -> None:
    st = PodWatchState(rule())
    st.reset(load("pod-list.json"))
    events = load("watch-lifecycle.json")
    expected_sets = [
        {A, B},  # B became Ready
        {A, B},  # C running, not Ready yet
        {A, B, C},  # C Ready
        {A, B, C},  # BOOKMARK
        {B, C},  # A failed readiness: gone at once
        {A, B, C},  # A recovered
        {A, C},  # B terminating (deletionTimestamp) though still Ready: gone at once
        {A, C},  # B not ready while terminating
        {A, C},  # B deleted
        {A, C, D},  # IPv6 pod added Ready
    ]
    expected_outcomes = [
        WatchOutcome.CHANGED, WatchOutcome.UNCHANGED, WatchOutcome.CHANGED, WatchOutcome.UNCHANGED,
        WatchOutcome.CHANGED, WatchOutcome.CHANGED, WatchOutcome.CHANGED, WatchOutcome.UNCHANGED,
        WatchOutcome.UNCHANGED, WatchOutcome.CHANGED,
    ]
    assert len(events) == len(expected_sets)
    for ev, want, outcome in zip(events, expected_sets, expected_outcomes, strict=True):
        got = st.apply(ev)
        assert set(st.endpoints()) == want, ev["type"]
        assert got is outcome, ev["type"]
        assert st.resource_version == ev["object"]["metadata"]["resourceVersion"]
    assert st.endpoints()[D] == Endpoint("http://[fd00:10:244::1c]:8000", "http://[fd00:10:244::1c]:8081")


def test_410_expired_asks_for_relist_and_relist_replaces() -> None:
    st = PodWatchState(rule())
    st.reset(load("pod-list.json"))
    st.apply_all(load("watch-lifecycle.json"))
    outcomes = st.apply_all(load("watch-expired.json"))
    assert outcomes == [WatchOutcome.UNCHANGED, WatchOutcome.RELIST]  # C still Ready, then 410
    assert set(st.endpoints()) == {A, C, D}  # a 410 alone drops nothing
    assert st.resource_version is None and "Expired (410)" in (st.last_error or "")
    assert st.reset(load("pod-list-relisted.json")) is True
    assert set(st.endpoints()) == {A, D}  # C vanished while the watch was down


def test_other_error_events_and_unknown_types() -> None:
    st = PodWatchState(rule())
    st.reset(load("pod-list.json"))
    forbidden = {"type": "ERROR", "object": load("status-forbidden.json")}
    assert st.apply(forbidden) is WatchOutcome.ERROR and "Forbidden (403)" in (st.last_error or "")
    assert st.apply({"type": "WEIRD", "object": {}}) is WatchOutcome.ERROR
    assert set(st.endpoints()) == {A}  # errors never drop known pods


def test_pod_is_routable_rules() -> None:
    pod = load("pod-list.json")["items"][0]
    assert pod_is_routable(pod)
    no_ip = json.loads(json.dumps(pod))
    del no_ip["status"]["podIP"]
    assert not pod_is_routable(no_ip)
    no_cond = json.loads(json.dumps(pod))
    no_cond["status"]["conditions"] = []
    assert not pod_is_routable(no_cond)


def test_backoff_is_exponential_and_bounded() -> None:
    delays = [backoff_delay(n, 0.5, 30.0) for n in range(0, 12)]
    assert delays[0] == 0.0 and delays[1] == 0.5 and delays[2] == 1.0 and delays[3] == 2.0
    assert max(delays) == 30.0 and delays == sorted(delays)
    assert backoff_delay(10_000, 0.5, 30.0) == 30.0


def test_iter_json_lines_handles_arbitrary_chunking() -> None:
    events = load("watch-lifecycle.json")
    body = b"".join(json.dumps(e).encode() + b"\n" for e in events)
    chunks = [body[i : i + 97] for i in range(0, len(body), 97)]
    assert list(iter_json_lines(chunks)) == events
    with pytest.raises(WatchError):
        list(iter_json_lines([b'{"type": "ADDED"}\nnot json\n']))


# --------------------------------------------------------------------------------------------
# the real kubernetes client against a replay server
# --------------------------------------------------------------------------------------------
class ReplayApiServer:
    """A scripted stand-in for the pod endpoints of an API server, on 127.0.0.1.

    ``lists`` are served in order for LIST requests (the last repeats); ``watches`` in order
    for watch requests: each is a list of events, an int (answer with that HTTP status and a
    Status body), ``"hold"`` (send nothing and keep the stream open until closed or 20 s) or
    ``"queue"`` (stream whatever ``push()`` is given, until closed or 60 s).
    """

    def __init__(self, lists: list[Any], watches: list[Any], token: str = "t0ken") -> None:
        self.lists = list(lists)
        self.watches = list(watches)
        self.token = token
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                return None

            def _json(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                url = urlparse(self.path)
                q = {k: v[0] for k, v in parse_qs(url.query).items()}
                with server.lock:
                    server.requests.append({"path": url.path, "query": q, "auth": self.headers.get("Authorization")})
                if self.headers.get("Authorization") != f"Bearer {server.token}":
                    self._json(401, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Unauthorized", "code": 401})
                    return
                if url.path != "/api/v1/namespaces/llm/pods":
                    self._json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})
                    return
                if not go_bool(q.get("watch")):
                    with server.lock:
                        item = server.lists.pop(0) if len(server.lists) > 1 else server.lists[0]
                    if isinstance(item, int):
                        self._json(item, load("status-forbidden.json") | {"code": item})
                    else:
                        self._json(200, item)
                    return
                with server.lock:
                    script = server.watches.pop(0) if server.watches else "hold"
                if isinstance(script, int):
                    self._json(script, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "InternalError", "code": script})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()

                def chunk(data: bytes) -> None:
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    self.wfile.flush()

                try:
                    if script == "hold":
                        deadline = time.monotonic() + 20
                        while time.monotonic() < deadline and not server.closing.is_set():
                            time.sleep(0.05)
                    elif script == "queue":
                        deadline = time.monotonic() + 60
                        while time.monotonic() < deadline and not server.closing.is_set():
                            try:
                                ev = server.pushed.get(timeout=0.05)
                            except queue.Empty:
                                continue
                            chunk(json.dumps(ev).encode() + b"\n")
                    else:
                        for ev in script:
                            line = json.dumps(ev).encode() + b"\n"
                            half = len(line) // 2  # split lines across chunks, as proxies do
                            chunk(line[:half])
                            chunk(line[half:])
                            time.sleep(0.01)
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    pass

        self.closing = threading.Event()
        self.pushed: queue.Queue[dict[str, Any]] = queue.Queue()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ReplayApiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def api_factory(self, token: str | None = None) -> Any:
        from kubernetes import client

        def make() -> Any:
            cfg = client.Configuration()
            cfg.host = f"http://127.0.0.1:{self.port}"
            cfg.api_key = {"BearerToken": token or self.token}
            cfg.api_key_prefix = {"BearerToken": "Bearer"}
            return client.CoreV1Api(client.ApiClient(cfg))

        return make

    def push(self, event: dict[str, Any]) -> None:
        """Send one event on the open ``"queue"`` watch."""
        self.pushed.put(event)

    def watch_requests(self) -> list[dict[str, str]]:
        with self.lock:
            return [r["query"] for r in self.requests if go_bool(r["query"].get("watch"))]

    def list_count(self) -> int:
        with self.lock:
            return sum(1 for r in self.requests if not go_bool(r["query"].get("watch")))


async def wait_for(pred: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


def make_discovery(server: ReplayApiServer, **kw: Any) -> KubernetesDiscovery:
    return KubernetesDiscovery(
        label_selector=SELECTOR, namespace="llm", port=8000, sidecar_port=8081, resync_s=5,
        backoff_base_s=0.05, backoff_max_s=0.2, request_timeout_s=5, api_factory=kw.pop("api_factory", server.api_factory()), **kw,
    )


@pytest.fixture
def lists_and_watches() -> Iterator[tuple[list[Any], list[Any]]]:
    yield [load("pod-list.json"), load("pod-list-relisted.json")], [load("watch-lifecycle.json"), load("watch-expired.json"), "hold"]


def test_client_lists_watches_relists_on_410(lists_and_watches: tuple[list[Any], list[Any]]) -> None:
    lists, watches = lists_and_watches

    async def run() -> None:
        with ReplayApiServer(lists, watches) as server:
            disc = make_discovery(server)
            assert isinstance(disc, Discovery)
            seen: list[set[str]] = []
            disc.add_listener(lambda m: seen.append(set(m)))
            t0 = time.monotonic()
            await disc.start()
            # start() returns with the first LIST applied
            assert set(disc.endpoints()) == {A}
            await wait_for(lambda: set(disc.endpoints()) == {A, D} and disc.stats["lists"] >= 2
                           and len(server.watch_requests()) >= 3)
            # every change reached the listeners, in order, ending with the re-listed set
            assert seen[0] == {A} and seen[1] == {A, B} and seen[-1] == {A, D}
            assert {A, B, C} in seen and {A, C, D} in seen
            # what the client asked for
            reqs = server.watch_requests()
            assert len(reqs) >= 3
            for q in reqs:
                assert q["labelSelector"] == SELECTOR and go_bool(q["allowWatchBookmarks"])
                assert int(q["timeoutSeconds"]) == 5
            assert reqs[0]["resourceVersion"] == load("pod-list.json")["metadata"]["resourceVersion"]
            # the second watch resumes from the last event's version (no re-list in between)
            assert reqs[1]["resourceVersion"] == load("watch-lifecycle.json")[-1]["object"]["metadata"]["resourceVersion"]
            # after the 410: a new LIST, then a watch from the new list's version
            assert reqs[2]["resourceVersion"] == load("pod-list-relisted.json")["metadata"]["resourceVersion"]
            assert server.list_count() == 2
            assert all(r["auth"] == "Bearer t0ken" for r in server.requests)
            # close() interrupts the held-open watch promptly
            t1 = time.monotonic()
            await disc.close()
            assert time.monotonic() - t1 < 5.0
            assert time.monotonic() - t0 < 20.0

    asyncio.run(run())


def test_client_backs_off_and_relists_after_errors() -> None:
    async def run() -> None:
        # watch 1 fails with 500, watch 2 with 503; each failure means backoff + a fresh LIST
        with ReplayApiServer([load("pod-list.json"), load("pod-list.json"), load("pod-list-relisted.json")], [500, 503, "hold"]) as server:
            disc = make_discovery(server)
            await disc.start()
            await wait_for(lambda: set(disc.endpoints()) == {A, D})
            assert disc.stats["failures"] == 2 and server.list_count() == 3
            await disc.close()

    asyncio.run(run())


def test_empty_watches_back_off_instead_of_spinning() -> None:
    async def run() -> None:
        # the server ends every watch at once with no event; the loop must slow down
        with ReplayApiServer([load("pod-list.json")], [[] for _ in range(50)]) as server:
            disc = make_discovery(server)  # backoff 0.05 s doubling to 0.2 s
            await disc.start()
            await asyncio.sleep(1.5)
            watches = len(server.watch_requests())
            await disc.close()
            # without backoff this would be hundreds of requests; with it about 1.5 / 0.2 + 3
            assert 3 <= watches <= 15, watches
            assert disc.stats["empty_watches"] >= 3 and server.list_count() == 1
            assert set(disc.endpoints()) == {A}

    asyncio.run(run())


def test_start_fails_loudly_without_permission() -> None:
    async def run() -> None:
        with ReplayApiServer([403], []) as server:
            disc = make_discovery(server)
            with pytest.raises(Exception) as info:
                await disc.start()
            assert getattr(info.value, "status", None) == 403
            with ReplayApiServer([load("pod-list.json")], []) as server2:
                disc2 = make_discovery(server2, api_factory=server2.api_factory(token="wrong"))
                with pytest.raises(Exception) as info2:
                    await disc2.start()
                assert getattr(info2.value, "status", None) == 401

    asyncio.run(run())


# --------------------------------------------------------------------------------------------
# end to end: a real gateway process discovering a real (simulated) vLLM pod through the API
# --------------------------------------------------------------------------------------------
def local_pod(pod: dict[str, Any], ready: bool, rv: str) -> dict[str, Any]:
    """A fixture pod moved to 127.0.0.1 so the gateway can reach the simulated vLLM behind it."""
    out = json.loads(json.dumps(pod))
    out["status"]["podIP"] = "127.0.0.1"
    out["status"]["podIPs"] = [{"ip": "127.0.0.1"}]
    out["metadata"]["resourceVersion"] = rv
    for cond in out["status"]["conditions"]:
        if cond["type"] in ("Ready", "ContainersReady"):
            cond["status"] = "True" if ready else "False"
    return out


def test_gateway_process_routes_only_to_ready_discovered_pods(procs: Any, tmp_path: Path, make_adapter: Any, redis_url: str) -> None:
    """kubeconfig -> real client -> KubernetesDiscovery inside `loraroute gateway`; the pod needs
    both its Kubernetes readiness and its sidecar's PodState; a readiness loss removes it at once."""
    import httpx
    import yaml

    from loraroute.procs import free_ports, http_ready, loraroute_cmd

    pod_a = load("pod-list.json")["items"][0]
    name = pod_a["metadata"]["name"]
    sim_port, side_port, gw_port = free_ports(3)
    source, cache = tmp_path / "source", tmp_path / "cache"
    cache.mkdir()
    make_adapter("sql", rank=8, root=source, base_model="base")
    pod_list = {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "5000"},
                "items": [local_pod(pod_a, True, "4999")]}
    with ReplayApiServer([pod_list], ["queue"]) as api:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "replay",
            "clusters": [{"name": "replay", "cluster": {"server": f"http://127.0.0.1:{api.port}"}}],
            "users": [{"name": "gw", "user": {"token": api.token}}],
            "contexts": [{"name": "replay", "context": {"cluster": "replay", "user": "gw", "namespace": "llm"}}],
        }))
        procs.start("sim", loraroute_cmd("sim", "--port", str(sim_port), "--model", "base", "--enable-lora", "--max-loras", "2",
                                         "--max-lora-rank", "16", "--adapter-dir", str(cache), "--allow-runtime-lora-updating",
                                         "--time-scale", "0.05"),
                    ready_url=f"http://127.0.0.1:{sim_port}/health", timeout=60)
        procs.start("sidecar", loraroute_cmd("sidecar", "--pod-id", name, "--vllm-url", f"http://127.0.0.1:{sim_port}",
                                             "--advertise-url", f"http://127.0.0.1:{sim_port}", "--port", str(side_port),
                                             "--store-url", redis_url, "--adapter-dir", str(cache), "--source-type", "local",
                                             "--source-path", str(source), "--base-model", "base", "--max-lora-rank", "16"),
                    ready_url=f"http://127.0.0.1:{side_port}/healthz", timeout=60)
        cfg = tmp_path / "gateway.yaml"
        cfg.write_text(yaml.safe_dump({
            "server": {"host": "127.0.0.1", "port": gw_port, "reload_poll_s": 0},
            "bases": [{"name": "base", "adapters": ["sql"]}],
            "discovery": {"kubernetes": {"namespace": "llm", "label_selector": SELECTOR, "port": sim_port,
                                         "sidecar_port": side_port, "resync_s": 30}, "monitor": "never"},
            "store": {"url": redis_url},
        }))
        gw = f"http://127.0.0.1:{gw_port}"
        procs.start("gateway", loraroute_cmd("gateway", "--config", str(cfg)), ready_url=f"{gw}/health", timeout=60,
                    env={"KUBECONFIG": str(kubeconfig), "KUBERNETES_SERVICE_HOST": ""})

        def ask() -> httpx.Response:
            return httpx.post(f"{gw}/v1/chat/completions", timeout=30, json={
                "model": "base:sql", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})

        def poll(pred: Any, what: str, timeout: float = 20.0) -> httpx.Response:
            deadline = time.monotonic() + timeout
            last = None
            while time.monotonic() < deadline:
                last = ask()
                if pred(last):
                    return last
                time.sleep(0.1)
            raise AssertionError(f"{what}: last answer {last.status_code if last else None} {last.text[:200] if last else ''}")

        ok = poll(lambda r: r.status_code == 200, "routed to the discovered pod")
        assert ok.headers["x-loraroute-pod"] == name
        assert http_ready(f"{gw}/ready")
        reqs = api.watch_requests()
        assert reqs and reqs[0]["resourceVersion"] == "5000" and reqs[0]["labelSelector"] == SELECTOR
        # readiness lost (e.g. vLLM's /health failing): out of rotation at once, though the sidecar still publishes
        t0 = time.monotonic()
        api.push({"type": "MODIFIED", "object": local_pod(pod_a, False, "5001")})
        gone = poll(lambda r: r.status_code == 503, "pod removed after readiness loss")
        removal_s = time.monotonic() - t0
        assert gone.json()["error"]["message"]
        # ready again: back in rotation
        api.push({"type": "MODIFIED", "object": local_pod(pod_a, True, "5002")})
        back = poll(lambda r: r.status_code == 200, "pod back after readiness")
        assert back.headers["x-loraroute-pod"] == name
        # deleted: gone for good
        api.push({"type": "DELETED", "object": local_pod(pod_a, False, "5003")})
        poll(lambda r: r.status_code == 503, "pod removed after deletion")
        print(f"readiness loss -> out of rotation in {removal_s * 1000:.0f} ms (polling every 100 ms)")
        assert removal_s < 10.0
