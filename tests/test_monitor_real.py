"""The monitor and the sidecar's loader on what a real vLLM 0.25.1 sent, fed verbatim.

Payloads: ``tests/fixtures/vllm-0.25-real/`` (captured on an H200; ``--max-loras 2
--max-cpu-loras 4``; static adapters ``ta tb tc x0``). A loopback HTTP server replays them to a
real ``PodMonitor``; the loader talks to one that answers the captured error bodies.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from loraroute.procs import free_port
from podstate import MemoryStore
from podstate.monitor import MonitorSettings, PodMonitor
from podstate.vllm_metrics import WANTED, parse_metrics, parse_models, wanted_samples
from scorer.model import PodState
from vllm_sidecar.errors import LoadRefused
from vllm_sidecar.loader import VllmLoader

REAL = Path(__file__).parent / "fixtures" / "vllm-0.25-real"
METRICS = ("metrics-startup.txt", "metrics-during-stream.txt", "metrics-after-lora.txt")


def text(name: str) -> str:
    return (REAL / name).read_text()


def reference_samples(payload: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """prometheus_client's reading of a payload: name -> [(labels, value)]."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(payload):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


@pytest.mark.parametrize("name", METRICS)
def test_real_metrics_parse_as_the_reference_parser_reads_them(name: str) -> None:
    payload = text(name)
    ours = wanted_samples(payload)
    ref = [(n, labels, v) for n, samples in reference_samples(payload).items() if n.startswith(WANTED)
           for labels, v in samples]
    assert sorted(ours, key=repr) == sorted(ref, key=repr) and len(ours) > 10
    m = parse_metrics(payload)
    ref_map = reference_samples(payload)
    assert m.num_running == ref_map["vllm:num_requests_running"][0][1]
    assert m.prefix_cache_queries == ref_map["vllm:prefix_cache_queries_total"][0][1]
    cache = ref_map["vllm:cache_config_info"][0][0]
    assert (m.block_size, m.num_gpu_blocks) == (int(cache["block_size"]), int(cache["num_gpu_blocks"]))
    assert m.model_names == ("base",) and m.process_start_time == ref_map["process_start_time_seconds"][0][1]
    series = ref_map.get("vllm:lora_requests_info", [])
    assert len(m.lora_history) == len(series)
    for info in m.lora_history:  # 0.25: running and waiting always carry the same list
        assert info.running == info.waiting and info.max_lora == 2
    if series:  # the current set is the series with the newest timestamp, not the union
        newest = max(series, key=lambda s: s[1])[0]
        assert m.lora is not None and ",".join(m.lora.running) == newest["running_lora_adapters"]
    else:
        assert m.lora is None  # before the first LoRA request vLLM writes no series at all


def test_real_in_flight_sets() -> None:
    stream = parse_metrics(text("metrics-during-stream.txt"))
    assert stream.num_running == 1 and stream.lora is not None and stream.lora.running == ("x0",)
    after = parse_metrics(text("metrics-after-lora.txt"))
    assert after.num_running == 0 and after.lora is not None and after.lora.running == ()  # idle, 9 stale sets
    assert {a for info in after.lora_history for a in info.running} == {"ta", "tb", "x0", *(f"r64-{i}" for i in range(5))}


def test_real_models_are_a_registry() -> None:
    startup = parse_models(text("models-startup.json"))
    assert startup.base_models == ("base",) and list(startup.adapters) == ["ta", "tb", "tc", "x0"]
    assert all(root.endswith(f"/{name}") for name, root in startup.adapters.items())
    loaded = parse_models(text("models-loaded.json"))
    assert len(loaded.adapters) == 35  # evicted adapters stay listed


class Replay:
    """A loopback server answering ``/metrics`` and ``/v1/models`` with one captured pair."""

    def __init__(self) -> None:
        self.metrics = ""
        self.models = ""
        self.url = ""

    def show(self, metrics: str, models: str) -> None:
        self.metrics, self.models = text(metrics), text(models)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Replay]:
        app = web.Application()
        app.router.add_get("/metrics", lambda _: web.Response(text=self.metrics, content_type="text/plain"))
        app.router.add_get("/v1/models", lambda _: web.Response(text=self.models, content_type="application/json"))
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        try:
            yield self
        finally:
            await runner.cleanup()


async def scraped(monitor: PodMonitor, store: MemoryStore, cond: Callable[[PodState], bool],
                  timeout: float = 5.0) -> PodState:
    """The published state once ``cond`` holds for it (the monitor polls every 20 ms)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        state = store.view().get(monitor.pod_id)
        if state is not None and cond(state):
            return state
        assert asyncio.get_running_loop().time() < deadline, state
        await asyncio.sleep(0.02)


def test_monitor_watching_from_start_up() -> None:
    """Start-up, then the end of ~460 requests over 35 adapters (a monitor that missed the middle)."""
    async def go() -> None:
        replay, store = Replay(), MemoryStore()
        replay.show("metrics-startup.txt", "models-startup.json")
        async with replay.running():
            monitor = PodMonitor("real", replay.url, store, MonitorSettings(interval_s=0.02, max_loras=2, max_cpu_loras=4))
            await monitor.start()
            try:
                st = await scraped(monitor, store, lambda s: s.healthy)
                # --lora-modules load and activate in order: the last two hold the GPU slots
                assert (st.gpu_adapters, st.cpu_adapters, st.running_adapters) == (("tc", "x0"), ("ta", "tb"), ())
                assert (st.base_models, st.block_size, st.num_gpu_blocks) == (("base",), 16, 53041)
                scrapes = monitor.scrapes
                replay.show("metrics-after-lora.txt", "models-loaded.json")
                st = await scraped(monitor, store, lambda s: monitor.scrapes > scrapes + 2)
                registry = set(parse_models(text("models-loaded.json")).adapters)
                # /v1/models is a registry: 35 names listed, but only the caches' worth estimated resident
                assert len(st.gpu_adapters) == 2 and len(st.gpu_adapters) + len(st.cpu_adapters) == 4
                assert set(st.gpu_adapters) | set(st.cpu_adapters) <= registry
                # every series since start-up was an in-flight set at some moment: the last one
                # before the pod went idle (ta, the final stream) holds a slot; nothing runs now
                assert "ta" in st.gpu_adapters and st.running_adapters == () and st.num_running == 0
                assert "tb" not in st.gpu_adapters  # its series is older than every other one
                # the series stay exported: scraping them again changes nothing
                before = (st.gpu_adapters, st.cpu_adapters)
                scrapes = monitor.scrapes
                st = await scraped(monitor, store, lambda s: monitor.scrapes > scrapes + 3)
                assert (st.gpu_adapters, st.cpu_adapters) == before
            finally:
                await monitor.close()

    asyncio.run(go())


def test_monitor_starting_late_ignores_the_stale_series() -> None:
    """First scrape at the end: the newest series (empty) is the in-flight set; the 8 older ones
    are history of unknown age and place nothing; residency is guessed from the registry order."""
    async def go() -> None:
        replay, store = Replay(), MemoryStore()
        replay.show("metrics-after-lora.txt", "models-loaded.json")
        async with replay.running():
            monitor = PodMonitor("late", replay.url, store, MonitorSettings(interval_s=0.02, max_cpu_loras=4))
            await monitor.start()
            try:
                st = await scraped(monitor, store, lambda s: s.healthy)
                listed = list(parse_models(text("models-loaded.json")).adapters)
                assert st.max_loras == 2  # learned from the max_lora label
                assert st.running_adapters == () and st.residency_source == "estimated"
                assert st.gpu_adapters == tuple(listed[-2:]) and st.cpu_adapters == tuple(listed[-4:-2])
                assert not {"ta", "tb", "x0"} & set(st.gpu_adapters)  # old series ignored
            finally:
                await monitor.close()

    asyncio.run(go())


def test_loader_reads_the_real_load_and_unload_answers(tmp_path: Path) -> None:
    """The sidecar's loader against the captured bodies: success texts, 'already loaded' counted as
    success, the 500 for a rank above the maximum and the 404 for a missing path as refusals
    carrying vLLM's message."""
    cases = {(c["path"], c["req"]["lora_name"]): c for c in json.loads(text("errors.json")) if c["path"]}

    async def answer(request: web.Request) -> web.Response:
        body = await request.json()
        case = cases[(request.path, body["lora_name"])]
        kind = "text/plain" if case["status"] == 200 else "application/json"
        return web.Response(status=case["status"], text=case["body"], content_type=kind)

    async def go() -> None:
        app = web.Application()
        app.router.add_post("/v1/load_lora_adapter", answer)
        app.router.add_post("/v1/unload_lora_adapter", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            async with aiohttp.ClientSession() as session:
                loader = VllmLoader(f"http://127.0.0.1:{port}", session, timeout_s=10)
                assert await loader.load("tc", str(tmp_path / "tc")) == "loaded"
                assert await loader.load("ta", str(tmp_path / "ta")) == "already_loaded"
                with pytest.raises(LoadRefused, match=r"HTTP 500.*LoRA rank 128 is greater than max_lora_rank 64"):
                    await loader.load("big128", str(tmp_path / "big128"))
                with pytest.raises(LoadRefused, match=r"HTTP 404.*Loading lora ghost failed: No adapter found"):
                    await loader.load("ghost", str(tmp_path / "ghost"))
                with pytest.raises(LoadRefused, match=r"(?s)HTTP 400.*Field required"):
                    await loader.load("noname-path", str(tmp_path / "x"))
                assert await loader.unload("tc") is True
                assert await loader.unload("nope-adapter") is False
        finally:
            await runner.cleanup()

    asyncio.run(go())
