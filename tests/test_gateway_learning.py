"""The gateway learns its cost constants from the TTFTs it observes, on a real simulated pod whose
adapter loads cost far more than the scorer's defaults say (40× the profile's, at a quarter of
real time): /admin/model, Prometheus and the explanation header show the learned values, and
turning learning off keeps the defaults."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from loraroute import peft
from loraroute.procs import ProcRegistry, consecutive_free_ports, free_port, http_ready, loraroute_cmd

BASE = "tsuzumi-base"
ADAPTERS = [f"a{i}" for i in range(4)]
ADMIN = {"x-loraroute-admin-key": "admin-key"}


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def start(procs: ProcRegistry, root: Path, learn: bool) -> str:
    """One simulated pod (two GPU slots, two CPU entries, four adapters taken in turn: every
    adapter's first request of its pair is a disk load, at 40× the profile's cost) behind a gateway
    with the default preset; the gateway's URL. Two slots, not one: a request that just finished
    is still listed as running for up to a poll, and with one slot that alone would read as
    "every slot busy", which the router does not learn from."""
    adapters = root / "adapters"
    if not adapters.exists():
        peft.make_adapter_set(adapters, [(a, 8) for a in ADAPTERS], base_model=BASE)
    sim_port = consecutive_free_ports(1)
    sim_url = f"http://127.0.0.1:{sim_port}"
    procs.start(f"sim-{learn}", loraroute_cmd(
        "sim", "cluster", "--pods", "1", "--base-port", str(sim_port), "--model", BASE, "--enable-lora",
        "--max-loras", "2", "--max-cpu-loras", "2", "--max-lora-rank", "16", "--adapter-dir", str(adapters),
        "--allow-runtime-lora-updating", "--time-scale", "0.25", "--cost", "load_scale=40",
    ), ready=lambda: http_ready(sim_url + "/health"), timeout=60)
    port = free_port()
    config = {
        "server": {"port": port, "reload_poll_s": 0},
        "bases": [{"name": BASE, "adapters": [{"name": a, "rank": 8} for a in ADAPTERS]}],
        "admin": {"api_key_sha256": [digest("admin-key")]},
        "discovery": {"static": [{"id": "pod-0", "url": sim_url, "max_lora_rank": 16, "max_cpu_loras": 2}],
                      "monitor_timeout_s": 2.0, "monitor_unhealthy_after_s": 3.0, "monitor_ttl_s": 5.0},
        "pipeline": {"preset": "default", "scorers": [
            {"type": "estimated-ttft", "weight": 3.0, "parameters": {"learn": learn}},
        ], "filters": [{"type": "healthy-fresh", "parameters": {"max_age_s": 5.0}}, "serves-base", "rank-fits"]},
    }
    cfg = root / f"gateway-{learn}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{port}"
    procs.start(f"gateway-{learn}", loraroute_cmd("gateway", "--config", str(cfg)), port=port,
                ready=lambda: http_ready(url + "/ready"), timeout=60)
    return url


def stream(client: httpx.Client, url: str, adapter: str | None) -> tuple[dict, float]:
    """One streamed chat request (``adapter`` None: the base model): the decision's explanation
    (the admin key asks for it) and the seconds to the first byte, measured here."""
    body = {"model": f"{BASE}:{adapter}" if adapter else BASE, "stream": True, "max_tokens": 2,
            "messages": [{"role": "user", "content": f"hello {time.monotonic_ns()}"}]}
    t0 = time.perf_counter()
    with client.stream("POST", url + "/v1/chat/completions", json=body,
                       headers={**ADMIN, "x-loraroute-debug": "1"}) as r:
        assert r.status_code == 200
        ttft = None
        for _ in r.iter_bytes():
            ttft = time.perf_counter() - t0 if ttft is None else ttft
        assert ttft is not None
        return json.loads(r.headers["x-loraroute-explain"]), ttft


def remote_s(c: dict, rank: int = 8) -> float:
    """The TTFT the constants ``c`` predict for an adapter of ``rank`` not on an idle pod (short prompt)."""
    return c["base_s"] + c["lora_s"] + c["disk_s_by_rank"][str(rank)] + rank * c["fetch_s_per_rank"]


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcRegistry]:
    registry = ProcRegistry(tmp_path / "logs")
    yield registry
    registry.stop_all()


def test_the_gateway_learns_what_adapter_loads_cost_where_it_runs(procs: ProcRegistry, tmp_path: Path) -> None:
    url = start(procs, tmp_path, learn=True)
    loads: list[float] = []  # client TTFTs of requests whose adapter the pod had to load
    with httpx.Client(timeout=30) as client:
        first, _ = stream(client, url, ADAPTERS[0])
        assert first["costs"]["learned"] is False  # nothing observed yet: the defaults
        # each adapter twice in a row (a load, then a GPU hit), and now and then the base model:
        # the mix that tells the adapter's load apart from the fixed costs
        for i in range(1, 48):
            last, ttft = stream(client, url, ADAPTERS[(i // 2) % len(ADAPTERS)] if i % 6 else None)
            if "remote/" in last["reason"]:
                loads.append(ttft)
        model = client.get(url + "/admin/model", headers=ADMIN).json()
        metrics = client.get(url + "/metrics").text
    assert model["learning"] is True and model["policy"] == "default+custom"
    # the pod's group is the one it is in now (until its first LoRA request vLLM writes no max_lora,
    # so the first observation may have gone to the group of the default slot count)
    (group,) = [g for g, pods in model["pods_by_group"].items() if pods == ["pod-0"]]
    fit = model["groups"][group]
    # streamed, answered requests teach (not those whose adapter the router had just sent and the
    # pod did not show yet: their wait depends on a load under way)
    assert fit["observations"] >= 25
    # without a sidecar the gateway does not know the pod's disk: the adapters are "remote" (a
    # load that may need a fetch first), which is what the loads here teach
    assert fit["recent_by_tier"]["remote"] >= 12 and fit["recent_by_tier"]["gpu"] >= 4
    learned, defaults = fit["constants"], fit["defaults"]
    assert defaults["disk_s_by_rank"] == first["costs"]["disk_s_by_rank"]  # the first decision used the defaults
    # a load costs ≈ 40 × 32 ms of simulated time × 0.25 wall seconds per simulated second; the
    # defaults predict a third of what the client sees, the learned constants what it sees
    observed = sorted(loads)[len(loads) // 2]
    assert remote_s(defaults) < 0.6 * observed
    assert remote_s(learned) == pytest.approx(observed, rel=0.3)
    # what a later decision was scored with is what was learned by then
    assert last["costs"]["learned"] is True and last["costs"]["group"] == group
    assert remote_s(last["costs"]) > 1.3 * remote_s(defaults)
    gauges = {(s.labels.get("group"), s.labels.get("rank")): s.value
              for fam in text_string_to_metric_families(metrics) if fam.name == "loraroute_cost_disk_seconds"
              for s in fam.samples}
    assert gauges[(group, "8")] == pytest.approx(learned["disk_s_by_rank"]["8"], rel=1e-4)
    observed = {s.labels.get("group"): s.value for fam in text_string_to_metric_families(metrics)
                if fam.name == "loraroute_cost_observations" for s in fam.samples}
    assert observed[group] == fit["observations"]


def test_with_learning_off_the_defaults_stay(procs: ProcRegistry, tmp_path: Path) -> None:
    url = start(procs, tmp_path, learn=False)
    with httpx.Client(timeout=30) as client:
        for i in range(8):
            explain, _ = stream(client, url, ADAPTERS[i % len(ADAPTERS)])
        model = client.get(url + "/admin/model", headers=ADMIN).json()
        assert client.get(url + "/admin/model").status_code == 401
    assert model["learning"] is False and model["groups"] == {}
    assert explain["costs"]["learned"] is False
