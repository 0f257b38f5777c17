"""PodMonitor against simulated vLLM pods: estimated and exact residency vs the simulator's ground
truth, in-flight adapters, health within a second, and a MonitorGroup over a two-pod cluster."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from loraroute import peft
from loraroute.procs import Proc, consecutive_free_ports, free_port, loraroute_cmd, start_process
from podstate import MemoryStore
from podstate.monitor import MonitorGroup, MonitorSettings, PodMonitor

BASE = "meta-llama/Llama-3.1-8B-Instruct"


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if cond():
            return time.monotonic() - start
        await asyncio.sleep(0.01)
    raise AssertionError(f"condition not met within {timeout}s")


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("monitor-adapters")
    for i, name in enumerate("abcd"):
        peft.make_adapter(root / name, rank=8, seed=i)
    return root


@pytest.fixture(scope="module")
def cluster(adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    base = consecutive_free_ports(2)
    argv = loraroute_cmd("sim", "cluster", "--pods", "2", "--base-port", str(base), "--enable-lora",
                         "--allow-runtime-lora-updating", "--adapter-dir", str(adapter_dir), "--max-loras", "2",
                         "--max-cpu-loras", "3", "--time-scale", "1")
    proc = start_process("sim-cluster", argv, port=base + 1, ready_url=f"http://127.0.0.1:{base + 1}/health",
                         timeout=40, log_dir=tmp_path_factory.mktemp("logs"))
    yield [f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 1}"]
    proc.stop()


def load(url: str, name: str, adapter_dir: Path) -> None:
    resp = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(adapter_dir / name)},
                      timeout=10)
    assert resp.status_code == 200, resp.text


def truth(url: str) -> dict[str, list[str]]:
    return httpx.get(f"{url}/sim/state", timeout=10).json()  # type: ignore[no-any-return]


def test_estimate_follows_loads_and_in_flight_requests(cluster: list[str], adapter_dir: Path) -> None:
    url = cluster[0]

    async def go() -> None:
        store = MemoryStore()
        await store.start()
        monitor = PodMonitor("p0", url, store, MonitorSettings(max_cpu_loras=3))
        await monitor.start()
        try:
            await until(lambda: monitor.state is not None and monitor.state.healthy)
            st = monitor.state
            assert st is not None and st.base_models == (BASE,) and st.block_size == 16 and st.num_gpu_blocks > 0
            for name in "abc":
                await asyncio.to_thread(load, url, name, adapter_dir)
            t = await asyncio.to_thread(truth, url)
            assert t["gpu_adapters"] == ["b", "c"]
            await until(lambda: store.view().get("p0") is not None and store.view()["p0"].gpu_adapters == ("b", "c"))
            assert store.view()["p0"].cpu_adapters == ("a",)
            # a long request on 'a' (from the CPU tier) is seen in flight and moves 'a' to the GPU
            done = threading.Event()

            def chat() -> None:
                httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
                    "model": "a", "max_tokens": 60, "messages": [{"role": "user", "content": "hi " * 50}]})
                done.set()

            threading.Thread(target=chat, daemon=True).start()
            await until(lambda: "a" in store.view()["p0"].running_adapters, timeout=10)
            await until(done.is_set, timeout=30)
            t = await asyncio.to_thread(truth, url)
            await until(lambda: list(store.view()["p0"].gpu_adapters) == t["gpu_adapters"])
            assert store.view()["p0"].max_loras == 2 and store.view()["p0"].residency_source == "estimated"
        finally:
            await monitor.close()
            await store.close()
        assert "p0" not in store.view()  # withdrawn on close

    asyncio.run(go())


def test_monitor_group_watches_every_pod(cluster: list[str]) -> None:
    async def go() -> None:
        store = MemoryStore()
        group = MonitorGroup({"x": cluster[0], "y": cluster[1]}, store, MonitorSettings(heartbeat_s=0.2))
        await group.start()
        try:
            await until(lambda: set(store.view()) == {"x", "y"} and all(s.healthy for s in store.view().values()))
            first = store.view()["y"].published_at
            await until(lambda: store.view()["y"].published_at > first, timeout=2)  # heartbeats
            assert group["x"].pod_id == "x"
        finally:
            await group.close()

    asyncio.run(go())


def test_exact_residency_and_unhealthy_within_a_second_when_hung_or_dead(adapter_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    argv = loraroute_cmd("sim", "--port", str(port), "--enable-lora", "--allow-runtime-lora-updating",
                         "--adapter-dir", str(adapter_dir), "--max-loras", "1", "--max-cpu-loras", "2",
                         "--emit-residency-metrics", "--time-scale", "0.05")
    sim: Proc = start_process("sim-exact", argv, port=port, ready_url=f"http://127.0.0.1:{port}/health",
                              timeout=40, log_dir=tmp_path)
    url = sim.url

    async def go() -> None:
        store = MemoryStore()
        monitor = PodMonitor("e0", url, store)
        await monitor.start()
        try:
            for name in "abc":
                await asyncio.to_thread(load, url, name, adapter_dir)
            t = await asyncio.to_thread(truth, url)
            await until(lambda: store.view().get("e0") is not None
                        and list(store.view()["e0"].gpu_adapters) == t["gpu_adapters"])
            st = store.view()["e0"]
            assert st.residency_source == "exact" and st.adapter_ranks == {"b": 8, "c": 8}
            assert set(st.cpu_adapters) == set(t["cpu_adapters"]) - set(t["gpu_adapters"])
            # a hung pod (accepts connections, never answers) is unhealthy within a second
            sim.popen.send_signal(signal.SIGSTOP)
            try:
                took = await until(lambda: not store.view()["e0"].healthy, timeout=3)
                assert took < 1.5, took  # ~0.9 s by design (two 0.45 s timeouts); margin for a busy machine
            finally:
                sim.popen.send_signal(signal.SIGCONT)
            await until(lambda: store.view()["e0"].healthy, timeout=5)
            # a dead pod (connection refused) at once
            sim.kill()
            killed, killed_wall = time.monotonic(), time.time()
            took = await until(lambda: not store.view()["e0"].healthy, timeout=3)
            assert took < 1.0, took
            assert store.view()["e0"].observed_at <= killed_wall  # the last good scrape is kept
            assert monitor.scrape_failures >= 1 and time.monotonic() - killed < 3
        finally:
            await monitor.close()

    try:
        asyncio.run(go())
    finally:
        sim.stop()
