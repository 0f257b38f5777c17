"""`loraroute sidecar` processes against a local folder, moto S3 (plain and TLS), a simulated vLLM
pod and a real Redis: validation, not-found diagnostics, cached/cold ensure, shared downloads,
disk budget, loading into vLLM, store outages, and a killed sidecar leaving the view."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest

from loraroute import peft
from loraroute.procs import Proc, ProcRegistry, free_port, loraroute_cmd
from loraroute.services import start_s3

BASE = "meta-llama/Llama-3.1-8B-Instruct"
SECRET = os.environ["AWS_SECRET_ACCESS_KEY"]


def sidecar_argv(port: int, *args: str) -> list[str]:
    return loraroute_cmd("sidecar", "--pod-id", f"pod-{port}", "--port", str(port), *args)


def start_sidecar(procs: ProcRegistry, name: str, *args: str, env: dict[str, str] | None = None) -> Proc:
    port = free_port()
    return procs.start(name, sidecar_argv(port, *args), port=port, ready_url=f"http://127.0.0.1:{port}/healthz",
                       timeout=40, env=env)


def start_sim(procs: ProcRegistry, adapter_dir: Path, *args: str) -> Proc:
    port = free_port()
    argv = loraroute_cmd("sim", "--port", str(port), "--enable-lora", "--allow-runtime-lora-updating",
                         "--adapter-dir", str(adapter_dir), "--time-scale", "0.05", *args)
    return procs.start("sim", argv, port=port, ready_url=f"http://127.0.0.1:{port}/health", timeout=40)


def ensure(proc: Proc, name: str, load: bool | None = None, timeout: float = 30) -> httpx.Response:
    body = None if load is None else {"load": load}
    return httpx.post(f"{proc.url}/adapters/{name}/ensure", json=body, timeout=timeout)


def error_of(resp: httpx.Response) -> dict[str, object]:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]  # type: ignore[no-any-return]


def metric(proc: Proc, name: str, labels: str = "") -> float:
    text = httpx.get(f"{proc.url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + (("{" + labels + "}") if labels else " ")) or (
                labels and line.startswith(name + "{") and all(part in line for part in labels.split(","))):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --------------------------------------------------------------------------------------------
# local-folder source: every validation failure, names, diagnostics, cache
# --------------------------------------------------------------------------------------------
def _write_bad_adapters(src: Path) -> None:
    peft.make_adapter(src / "good", rank=8)
    peft.make_adapter(src / "nest" / "deep", rank=8)
    peft.make_adapter(src / "noweights", rank=8)
    (src / "noweights" / "adapter_model.safetensors").unlink()
    peft.make_adapter(src / "binweights", rank=8)
    (src / "binweights" / "adapter_model.safetensors").rename(src / "binweights" / "adapter_model.bin")
    peft.make_adapter(src / "noconfig", rank=8)
    (src / "noconfig" / "adapter_config.json").unlink()
    peft.make_adapter(src / "badjson", rank=8)
    (src / "badjson" / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16,,}')
    peft.make_adapter(src / "nor", rank=8, config_overrides={"-r": None})
    peft.make_adapter(src / "notargets", rank=8, config_overrides={"-target_modules": None, "-lora_alpha": None})
    peft.make_adapter(src / "ia3", rank=8, config_overrides={"peft_type": "IA3"})
    peft.make_adapter(src / "rank32", rank=32)
    peft.make_adapter(src / "otherbase", rank=8, base_model="mistralai/Mistral-7B-v0.1")
    peft.make_adapter(src / "badheader", rank=8)
    (src / "badheader" / "adapter_model.safetensors").write_bytes(b"\xff" * 8 + b"not a header")
    peft.make_adapter(src / "wrongmodules", rank=8, config_overrides={"target_modules": ["k_proj"]})
    peft.make_adapter(src / "rankshape", rank=8, config_overrides={"r": 4})
    peft.make_adapter(src / "huge", rank=8, pad_bytes=400_000)
    peft.make_adapter(src / "dora", rank=8, config_overrides={"use_dora": True})
    peft.make_adapter(src / "extratensor", rank=8, pad_bytes=1000)


@pytest.fixture(scope="module")
def local_sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Path]]:
    root = tmp_path_factory.mktemp("local-sidecar")
    _write_bad_adapters(root / "src")
    reg = ProcRegistry(root / "logs")
    proc = start_sidecar(reg, "sidecar-local", "--vllm-url", f"http://127.0.0.1:{free_port()}",
                         "--adapter-dir", str(root / "adapters"), "--source-path", str(root / "src"),
                         "--base-model", BASE, "--max-adapter-bytes", "300000", "--no-load-on-ensure")
    yield proc, root
    reg.stop_all()


VALIDATION_CASES = {
    "noweights": ("missing_file", "no adapter_model.safetensors"),
    "binweights": ("missing_file", "convert it with safetensors"),
    "noconfig": ("missing_file", "no adapter_config.json"),
    "badjson": ("malformed_json", "not valid JSON"),
    "nor": ("missing_field", "lacks required field(s) r"),
    "notargets": ("missing_field", "lora_alpha, target_modules"),
    "ia3": ("peft_type", "peft_type 'IA3'"),
    "rank32": ("rank_too_large", "--max-lora-rank 32"),
    "otherbase": ("base_model_mismatch", "this pod serves 'meta-llama/Llama-3.1-8B-Instruct'"),
    "badheader": ("safetensors_header", "header length"),
    "wrongmodules": ("tensor_mismatch", "not in target_modules ['k_proj']"),
    "rankshape": ("tensor_mismatch", "has rank 8, config says 4"),
    "huge": ("too_large", "max_adapter_bytes 300000"),
    "dora": ("unsupported", "DoRA"),
    "extratensor": ("tensor_mismatch", "'padding', which is not a LoRA weight"),
}


@pytest.mark.parametrize("name", sorted(VALIDATION_CASES))
def test_every_validation_failure_is_a_422_that_says_what_to_fix(local_sidecar, name: str) -> None:  # type: ignore[no-untyped-def]
    proc, root = local_sidecar
    code, text = VALIDATION_CASES[name]
    resp = ensure(proc, name)
    assert resp.status_code == 422, resp.text
    err = error_of(resp)
    assert err["code"] == code and err["type"] == "UnprocessableEntityError"
    assert text in str(err["message"]), err["message"]
    # nothing half-written reaches the folder vLLM reads
    assert sorted(p.name for p in (root / "adapters").iterdir() if p.name != "good") == []


@pytest.mark.parametrize("raw", ["%2E%2E", "a..b", "a%20b", "x%2Fy", "%2E%2E%2Fetc", "caf%C3%A9", ".hidden"])
def test_bad_names_are_400(local_sidecar, raw: str) -> None:  # type: ignore[no-untyped-def]
    proc, _ = local_sidecar
    resp = httpx.post(f"{proc.url}/adapters/{raw}/ensure", timeout=10)
    assert resp.status_code == 400, (raw, resp.text)
    assert error_of(resp)["code"] == "invalid_adapter_name"


def test_local_cached_ensure_listing_and_not_found_diagnostics(local_sidecar) -> None:  # type: ignore[no-untyped-def]
    proc, root = local_sidecar
    first = ensure(proc, "good")
    assert first.status_code == 200, first.text
    again = ensure(proc, "good").json()
    assert again["source"] == "cached" and again["loaded"] is False and again["rank"] == 8
    assert again["path"] == str((root / "adapters" / "good").resolve())
    listing = httpx.get(f"{proc.url}/adapters", timeout=10).json()
    assert [a["adapter"] for a in listing] == ["good"] and listing[0]["size_bytes"] > 0

    resp = ensure(proc, "Good")
    assert resp.status_code == 404
    msg = str(error_of(resp)["message"])
    assert "looked for" in msg and "Good/adapter_config.json" in msg and "differ only in letter case" in msg
    msg = str(error_of(ensure(proc, "deep"))["message"])
    assert "found adapter_config.json in 'nest/deep/'" in msg and "depth 2" in msg
    msg = str(error_of(ensure(proc, "goood"))["message"])
    assert "close names" in msg and "good" in msg
    assert metric(proc, "loraroute_sidecar_failures_total", 'reason="adapter_not_found"') >= 3
    bad = httpx.post(f"{proc.url}/adapters/good/ensure", content=b'{"load": "yes"}', timeout=10)
    assert bad.status_code == 400 and error_of(bad)["param"] == "load"
    bad = httpx.post(f"{proc.url}/adapters/good/ensure", json={"lod": True}, timeout=10)
    assert bad.status_code == 400 and "unknown field" in str(error_of(bad)["message"])


def test_disk_budget_evicts_least_recently_used(procs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    sizes = [peft.make_adapter(src / f"a{i}", rank=8, seed=i) for i in range(3)]
    one = sum(f.stat().st_size for f in sizes[0].iterdir())
    proc = start_sidecar(procs, "sidecar-budget", "--vllm-url", f"http://127.0.0.1:{free_port()}",
                         "--adapter-dir", str(tmp_path / "adapters"), "--source-path", str(src),
                         "--disk-budget-bytes", str(int(one * 2.5)), "--no-load-on-ensure")
    for name in ("a0", "a1"):
        assert ensure(proc, name).status_code == 200
    assert ensure(proc, "a0").json()["source"] == "cached"  # a0 is now more recent than a1
    assert ensure(proc, "a2").status_code == 200
    on_disk = sorted(p.name for p in (tmp_path / "adapters").iterdir())
    assert on_disk == ["a0", "a2"]
    assert metric(proc, "loraroute_sidecar_evictions_total") == 1


# --------------------------------------------------------------------------------------------
# S3 source with a simulated vLLM pod
# --------------------------------------------------------------------------------------------
def _upload(s3, bucket: str, folder: Path, prefix: str) -> None:  # type: ignore[no-untyped-def]
    for f in sorted(folder.iterdir()):
        s3.upload_file(str(f), bucket, prefix + f.name)


@pytest.fixture(scope="module")
def s3_setup(s3_server, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("s3-sidecar")
    endpoint = s3_server.extra["endpoint_url"]
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    bucket = "sidecar-adapters"
    s3.create_bucket(Bucket=bucket)
    made = root / "made"
    _upload(s3, bucket, peft.make_adapter(made / "sql-lora", rank=8), "adapters/sql-lora/")
    _upload(s3, bucket, peft.make_adapter(made / "chat", rank=8, seed=1), "adapters/Chat-Lora/")
    _upload(s3, bucket, peft.make_adapter(made / "summ", rank=8, seed=2), "adapters/summ/summ/")
    s3.put_object(Bucket=bucket, Key="adapters/flat", Body=b"oops")
    _upload(s3, bucket, peft.make_adapter(made / "big", rank=8, seed=3, hidden=2048, layers=16), "adapters/big/")
    _upload(s3, bucket, peft.make_adapter(made / "r32", rank=32, seed=4), "adapters/r32/")
    _upload(s3, bucket, peft.make_adapter(made / "toolarge", rank=8, seed=5, pad_bytes=6_000_000),
            "adapters/toolarge/")
    adapter_dir = root / "adapters"
    adapter_dir.mkdir()
    reg = ProcRegistry(root / "logs")
    sim = start_sim(reg, adapter_dir, "--max-loras", "2", "--max-lora-rank", "16")
    sidecar = start_sidecar(
        reg, "sidecar-s3", "--vllm-url", sim.url, "--adapter-dir", str(adapter_dir),
        "--source-type", "s3", "--s3-endpoint-url", endpoint, "--s3-bucket", bucket, "--max-lora-rank", "32",
        "--max-adapter-bytes", "5000000", "--base-model", BASE, "--max-loras", "2")
    yield sidecar, sim, root
    reg.stop_all()


def test_s3_cold_then_cached_and_loaded_into_vllm(s3_setup) -> None:  # type: ignore[no-untyped-def]
    sidecar, sim, root = s3_setup
    cold = ensure(sidecar, "sql-lora", load=True)
    assert cold.status_code == 200, cold.text
    body = cold.json()
    assert body["source"] == "downloaded" and body["loaded"] is True
    assert Path(body["path"]) == (root / "adapters" / "sql-lora").resolve()
    models = httpx.get(f"{sim.url}/v1/models", timeout=10).json()
    assert "sql-lora" in [m["id"] for m in models["data"]]
    truth = httpx.get(f"{sim.url}/sim/state", timeout=10).json()
    assert "sql-lora" in truth["gpu_adapters"]
    cached = ensure(sidecar, "sql-lora", load=True).json()
    assert cached["source"] == "cached" and cached["loaded"] is True
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        listing = {a["adapter"]: a for a in httpx.get(f"{sidecar.url}/adapters", timeout=10).json()}
        if listing["sql-lora"]["on_gpu"] and listing["sql-lora"]["registered"]:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"sql-lora never shown on GPU: {listing}")
    assert metric(sidecar, "loraroute_sidecar_load_seconds_count") >= 1


def test_s3_concurrent_ensures_share_one_download(s3_setup) -> None:  # type: ignore[no-untyped-def]
    sidecar, _, root = s3_setup
    downloads_before = metric(sidecar, "loraroute_sidecar_fetch_seconds_count", 'source="s3"')
    bytes_before = metric(sidecar, "loraroute_sidecar_fetched_bytes_total")

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(client.post(f"{sidecar.url}/adapters/big/ensure", json={"load": False})
                                          for _ in range(6)))

    results = asyncio.run(fire())
    assert [r.status_code for r in results] == [200] * 6
    assert metric(sidecar, "loraroute_sidecar_fetch_seconds_count", 'source="s3"') == downloads_before + 1
    fetched = metric(sidecar, "loraroute_sidecar_fetched_bytes_total") - bytes_before
    assert fetched == sum(f.stat().st_size for f in (root / "made" / "big").iterdir())


def test_s3_not_found_diagnostics(s3_setup) -> None:  # type: ignore[no-untyped-def]
    sidecar, _, _ = s3_setup
    msg = str(error_of(ensure(sidecar, "chat-lora"))["message"])
    assert "s3://sidecar-adapters/adapters/chat-lora/adapter_config.json" in msg and "letter case" in msg
    msg = str(error_of(ensure(sidecar, "summ"))["message"])
    assert "'adapters/summ/summ/'" in msg and "one level too deep" in msg
    msg = str(error_of(ensure(sidecar, "flat"))["message"])
    assert "without a trailing slash" in msg
    resp = ensure(sidecar, "sql-lora-v2")
    assert resp.status_code == 404
    msg = str(error_of(resp)["message"])
    assert "close names in 'adapters/': sql-lora" in msg and "'adapters/' holds:" in msg


def test_s3_size_checked_before_download_and_rank_before_vllm(s3_setup) -> None:  # type: ignore[no-untyped-def]
    sidecar, sim, root = s3_setup
    bytes_before = metric(sidecar, "loraroute_sidecar_fetched_bytes_total")
    resp = ensure(sidecar, "toolarge")
    assert resp.status_code == 422 and error_of(resp)["code"] == "too_large"
    assert metric(sidecar, "loraroute_sidecar_fetched_bytes_total") == bytes_before
    # the sidecar allows rank 32 (misconfigured), the pod does not: vLLM's refusal comes back as 502
    resp = ensure(sidecar, "r32", load=True)
    assert resp.status_code == 502, resp.text
    err = error_of(resp)
    assert err["code"] == "vllm_load_failed" and "greater than max_lora_rank 16" in str(err["message"])
    assert SECRET not in resp.text and SECRET not in sidecar.log_tail(100_000)


# --------------------------------------------------------------------------------------------
# TLS with a private CA, and an S3 outage
# --------------------------------------------------------------------------------------------
def test_s3_tls_needs_the_ca_bundle(procs, s3_tls_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    endpoint = s3_tls_server.extra["endpoint_url"]
    ca_file = s3_tls_server.extra["ca_file"]
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", verify=ca_file)
    s3.create_bucket(Bucket="tls-adapters")
    _upload(s3, "tls-adapters", peft.make_adapter(tmp_path / "made" / "sql-lora", rank=8), "adapters/sql-lora/")
    common = ("--vllm-url", f"http://127.0.0.1:{free_port()}", "--source-type", "s3", "--s3-endpoint-url",
              endpoint, "--s3-bucket", "tls-adapters", "--no-load-on-ensure")
    trusted = start_sidecar(procs, "sidecar-tls-ca", *common, "--adapter-dir",
                            str(tmp_path / "a1"), "--ca-bundle", ca_file)
    untrusted = start_sidecar(procs, "sidecar-tls-noca", *common, "--adapter-dir", str(tmp_path / "a2"))
    ok = ensure(trusted, "sql-lora")
    assert ok.status_code == 200 and ok.json()["source"] == "downloaded"
    bad = ensure(untrusted, "sql-lora")
    assert bad.status_code == 503, bad.text
    err = error_of(bad)
    assert err["code"] == "tls_certificate" and err["type"] == "ServiceUnavailableError"
    assert "certificate not trusted" in str(err["message"]) and "ca_bundle" in str(err["message"])
    assert "CERTIFICATE_VERIFY_FAILED" in str(err["message"])
    assert SECRET not in bad.text and SECRET not in untrusted.log_tail(100_000)
    assert httpx.get(f"{untrusted.url}/healthz", timeout=5).status_code == 200


def test_s3_down_is_503_and_the_sidecar_keeps_serving(procs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = procs.adopt(start_s3(log_dir=tmp_path / "logs"))
    endpoint = str(server.extra["endpoint_url"])
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="down-adapters")
    for name in ("one", "two"):
        _upload(s3, "down-adapters", peft.make_adapter(tmp_path / "made" / name, rank=8), f"adapters/{name}/")
    sidecar = start_sidecar(procs, "sidecar-s3down", "--vllm-url", f"http://127.0.0.1:{free_port()}",
                            "--adapter-dir", str(tmp_path / "adapters"), "--source-type", "s3",
                            "--s3-endpoint-url", endpoint, "--s3-bucket", "down-adapters", "--no-load-on-ensure",
                            "--set", "source.s3.connect_timeout_s=1", "--set", "source.s3.max_attempts=1")
    assert ensure(sidecar, "one").status_code == 200
    server.stop()
    resp = ensure(sidecar, "two")
    assert resp.status_code == 503, resp.text
    err = error_of(resp)
    assert err["code"] == "s3_connect" and endpoint in str(err["message"])
    assert ensure(sidecar, "one").json()["source"] == "cached"  # what is on disk still works
    assert httpx.get(f"{sidecar.url}/healthz", timeout=5).status_code == 200
    assert metric(sidecar, "loraroute_sidecar_failures_total", 'reason="s3_connect"') == 1


# --------------------------------------------------------------------------------------------
# publishing through Redis
# --------------------------------------------------------------------------------------------
def test_sidecar_publishes_to_redis_and_a_killed_sidecar_leaves_the_view(procs, redis_url: str,  # type: ignore[no-untyped-def]
                                                                        tmp_path: Path) -> None:
    from podstate.redis_store import RedisStore

    src = tmp_path / "src"
    peft.make_adapter(src / "sql-lora", rank=8)
    adapter_dir = tmp_path / "adapters"
    adapter_dir.mkdir()
    sim = start_sim(procs, adapter_dir, "--max-loras", "2")
    sidecar = start_sidecar(procs, "sidecar-redis", "--vllm-url", sim.url, "--advertise-url",
                            "http://10.0.0.7:8000", "--adapter-dir", str(adapter_dir), "--source-path", str(src),
                            "--store-url", redis_url, "--ttl-s", "1.0", "--heartbeat-s", "0.25")
    pod_id = f"pod-{sidecar.port}"

    async def go() -> None:
        reader = RedisStore(redis_url, resync_interval_s=0.5)
        await reader.start()
        try:
            deadline = time.monotonic() + 10
            while pod_id not in reader.view() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            state = reader.view()[pod_id]
            assert state.url == "http://10.0.0.7:8000" and state.sidecar_url == sidecar.url
            assert state.base_models == (BASE,) and state.healthy and state.num_gpu_blocks > 0
            resp = await asyncio.to_thread(ensure, sidecar, "sql-lora", True)
            assert resp.status_code == 200, resp.text
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                st = reader.view()[pod_id]
                if "sql-lora" in st.gpu_adapters and "sql-lora" in st.disk_adapters:
                    break
                await asyncio.sleep(0.02)
            st = reader.view()[pod_id]
            assert "sql-lora" in st.gpu_adapters and st.adapter_ranks.get("sql-lora") == 8
            sidecar.kill()
            killed = time.monotonic()
            while pod_id in reader.view() and time.monotonic() - killed < 6:
                await asyncio.sleep(0.02)
            gone_after = time.monotonic() - killed
            assert pod_id not in reader.view()
            assert 0.5 <= gone_after <= 4.0, gone_after
        finally:
            await reader.close()

    asyncio.run(go())


def test_sidecar_survives_a_redis_restart_and_the_view_heals(procs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from loraroute.services import restart_redis, start_redis
    from podstate.redis_store import RedisStore

    redis_proc = procs.adopt(start_redis(log_dir=tmp_path / "logs"))
    url = str(redis_proc.extra["url"])
    adapter_dir = tmp_path / "adapters"
    adapter_dir.mkdir()
    sim = start_sim(procs, adapter_dir)
    sidecar = start_sidecar(procs, "sidecar-redis-restart", "--vllm-url", sim.url, "--adapter-dir",
                            str(adapter_dir), "--source-path", str(tmp_path), "--store-url", url,
                            "--ttl-s", "2", "--heartbeat-s", "0.3")
    pod_id = f"pod-{sidecar.port}"

    async def go() -> None:
        nonlocal redis_proc
        reader = RedisStore(url, resync_interval_s=0.3)
        await reader.start()
        try:
            deadline = time.monotonic() + 10
            while pod_id not in reader.view() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert pod_id in reader.view()
            redis_proc = procs.adopt(await asyncio.to_thread(restart_redis, redis_proc, log_dir=tmp_path / "logs"))
            restarted = time.time()
            # the sidecar's next heartbeat re-creates its key; the reader reconnects and resyncs
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                st = reader.view().get(pod_id)
                if st is not None and st.published_at > restarted and reader.connected:
                    break
                await asyncio.sleep(0.05)
            st = reader.view().get(pod_id)
            assert st is not None and st.published_at > restarted, st
            assert sidecar.alive() and httpx.get(f"{sidecar.url}/healthz", timeout=5).status_code == 200
        finally:
            await reader.close()

    asyncio.run(go())


def test_ensure_reloads_in_place_an_adapter_vllm_evicted(procs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """vLLM refuses a second plain load of a registered name, so an adapter its CPU cache evicted
    is brought back with load_inplace (the placer relies on this to pre-load it)."""
    for name in ("one", "two"):
        peft.make_adapter(tmp_path / "src" / name, rank=8, base_model=BASE)
    (tmp_path / "adapters").mkdir()
    sim = start_sim(procs, tmp_path / "adapters", "--model", BASE, "--max-loras", "1", "--max-cpu-loras", "1")
    sidecar = start_sidecar(procs, "sidecar-inplace", "--vllm-url", sim.url, "--adapter-dir", str(tmp_path / "adapters"),
                            "--source-path", str(tmp_path / "src"), "--base-model", BASE,
                            "--max-loras", "1", "--max-cpu-loras", "1",
                            "--set", "warmup.enabled=false")  # the slots' contents are the subject here
    for name in ("one", "two"):
        r = ensure(sidecar, name, load=True)
        assert r.status_code == 200 and r.json()["loaded"] and r.json()["load_seconds"] > 0, r.text
    truth = httpx.get(f"{sim.url}/sim/state?limit=0", timeout=10).json()
    assert truth["gpu_adapters"] == ["two"] and truth["cpu_adapters"] == ["two"]  # "one" is cold, still registered
    again = ensure(sidecar, "one", load=True)
    assert again.status_code == 200 and again.json()["load_seconds"] > 0, again.text
    truth = httpx.get(f"{sim.url}/sim/state?limit=0", timeout=10).json()
    assert truth["gpu_adapters"] == ["one"]
    # resident on GPU: nothing is loaded again
    assert ensure(sidecar, "one", load=True).json()["load_seconds"] == 0.0
