"""Adapter day end to end on a production-shaped installation: two simulated vLLM pods with a
sidecar each fetching from moto's S3, Redis, two gateway replicas, named admin keys.

Publish with `loraroute adapters push`, propose and approve with `loraroute changes` on different
replicas, roll to a new version (the pods that hold the adapter swap it in place), roll back in
one command; where adapters are resident; `loraroute doctor` live and `doctor request` on a
healthy installation and on broken adapters."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from ops_stack import BASE, KEYS, OpsStack, gateway_config

from loraroute import changes_cli, doctor, peft
from loraroute.procs import Proc, loraroute_cmd

TWO_PERSON = ["allowlist.add", "adapter.roll"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_server: Proc, s3_server: Proc) -> Iterator[OpsStack]:
    import redis

    client = redis.Redis.from_url(str(redis_server.extra["url"]))
    client.flushall()
    client.close()
    s = OpsStack.start(tmp_path_factory.mktemp("ops"), str(s3_server.extra["endpoint_url"]),
                       str(redis_server.extra["url"]), two_person=TWO_PERSON)
    try:
        yield s
    finally:
        s.stop()


def sidecar_settings(stack: OpsStack) -> Path:
    path = stack.root / "sidecar.yaml"
    path.write_text(yaml.safe_dump({"pod_id": "operator-laptop", "vllm_url": "http://127.0.0.1:1", "base_model": BASE,
                                    "max_lora_rank": 16, "source": {"type": "s3", "s3": {
                                        "endpoint_url": stack.s3_endpoint, "bucket": stack.bucket,
                                        "layout": "adapters/{adapter}/"}}}))
    return path


def push(stack: OpsStack, folder: Path, *extra: str) -> dict[str, str]:
    res = subprocess.run(loraroute_cmd("adapters", "push", str(folder), stack.s3_url, "--sidecar-config",
                                       str(sidecar_settings(stack)), "--json", *extra),
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    return {a["adapter"]: a["version"] for a in json.loads(res.stdout)["adapters"]}


def changes(capsys: pytest.CaptureFixture[str], stack: OpsStack, who: str, *args: str, gateway: int = 0) -> dict:
    rc = changes_cli.main(["--gateway", stack.gateways[gateway].url, "--key", KEYS[who], "--json", *args])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)  # type: ignore[no-any-return]


def chat(stack: OpsStack, model: str, gateway: int = 0) -> httpx.Response:
    return httpx.post(stack.gateways[gateway].url + "/v1/chat/completions", timeout=60, json={
        "model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "SELECT 1"}]})


def local_versions(stack: OpsStack, adapter: str) -> dict[str, str | None]:
    out = {}
    for i, sidecar in enumerate(stack.sidecars):
        held = {a["adapter"]: a for a in httpx.get(sidecar.url + "/adapters", timeout=10).json()}
        out[f"pod-{i}"] = held[adapter]["version"] if adapter in held else None
    return out


def wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_adapter_day_publish_approve_roll_and_roll_back(stack: OpsStack, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    v1 = push(stack, peft.make_adapter(tmp_path / "v1" / "sql", rank=8, base_model=BASE, seed=1).parent)["sql"]

    add = changes(capsys, stack, "alice", "propose", "add", "--base", BASE, "--adapter", "sql", "--reason", "new")
    assert add["status"] == "pending" and add["spec"]["version"] == v1 and add["spec"]["rank"] == 8
    assert set(add["checksums"]) == {"adapter_config.json", "adapter_model.safetensors"}
    assert chat(stack, f"{BASE}:sql").status_code == 404 and chat(stack, f"{BASE}:sql", 1).status_code == 404
    approved = changes(capsys, stack, "bob", "approve", add["id"], "--note", "eval ok", gateway=1)
    assert approved["status"] == "applied"
    wait_for(lambda: chat(stack, f"{BASE}:sql", 0).status_code == 200)  # the other replica, through Redis
    assert chat(stack, f"{BASE}:sql", 1).status_code == 200
    holders = {p: v for p, v in local_versions(stack, "sql").items() if v}
    assert holders and set(holders.values()) == {v1}  # fetched at the pinned version

    # a retrained version is published; nothing changes for the pods until a roll is approved
    v2 = push(stack, peft.make_adapter(tmp_path / "v2" / "sql", rank=16, base_model=BASE, seed=2).parent)["sql"]
    assert v2 != v1 and {v for v in local_versions(stack, "sql").values() if v} == {v1}
    roll = changes(capsys, stack, "alice", "propose", "roll", "--base", BASE, "--adapter", "sql", "--version", v2)
    assert roll["status"] == "pending" and {v for v in local_versions(stack, "sql").values() if v} == {v1}
    sims = {f"pod-{i}": s.url for i, s in enumerate(stack.sims)}
    loads_before = {p: httpx.get(u + "/sim/state?limit=0").json()["disk_loads"] for p, u in sims.items()}
    rolled = changes(capsys, stack, "bob", "approve", roll["id"], gateway=1)
    effects = {e["pod"]: e for e in rolled["effects"]}
    for pod in holders:
        assert (effects[pod]["status"], effects[pod]["previous_version"], effects[pod]["version"]) == ("replaced", v1, v2)
        assert effects[pod]["reloaded"]  # swapped into vLLM in place (same name, no unload)
        state = httpx.get(sims[pod] + "/sim/state?limit=0").json()
        assert state["disk_loads"] == loads_before[pod] + 1
        models = [m["id"] for m in httpx.get(sims[pod] + "/v1/models").json()["data"]]
        assert models.count("sql") == 1
    for pod in set(sims) - set(holders):
        assert effects[pod]["status"] == "absent"
    assert {v for v in local_versions(stack, "sql").values() if v} == {v2}
    assert chat(stack, f"{BASE}:sql", 0).status_code == 200

    undo = changes(capsys, stack, "alice", "rollback", roll["id"])
    assert undo["status"] == "applied" and undo["rollback_of"] == roll["id"]
    assert {e["status"] for e in undo["effects"] if e["pod"] in holders} == {"replaced"}
    assert {v for v in local_versions(stack, "sql").values() if v} == {v1}
    audit = changes(capsys, stack, "carol", "audit", "--limit", "50", gateway=1)
    trail = [(e["event"], e["change_id"], e["by"]) for e in audit]
    assert trail == [("proposed", add["id"], "alice"), ("approved", add["id"], "bob"), ("applied", add["id"], "bob"),
                     ("proposed", roll["id"], "alice"), ("approved", roll["id"], "bob"), ("applied", roll["id"], "bob"),
                     ("proposed", undo["id"], "alice"), ("applied", undo["id"], "alice"),
                     ("rolled_back", roll["id"], "alice")]
    applied_roll = [e for e in audit if e["event"] == "applied" and e["change_id"] == roll["id"]][0]
    assert applied_roll["before"] == {"version": v1} and applied_roll["after"] == {"version": v2}
    assert applied_roll["checksums"]["adapter_model.safetensors"] and applied_roll["detail"]


def test_an_adapter_the_store_cannot_serve_is_refused_at_proposal(stack: OpsStack, tmp_path: Path) -> None:
    # validated against rank 64 pods (the push refuses it against the sidecars' 16)
    push(stack, peft.make_adapter(tmp_path / "wide" / "wide", rank=64, base_model=BASE).parent, "--max-lora-rank", "64")
    with stack.admin("alice") as c:
        r = c.post("/admin/changes", json={"kind": "allowlist.add", "base": BASE, "adapter": "wide"})
        assert r.status_code == 422 and "[rank_too_large]" in r.json()["error"]["message"]
        r = c.post("/admin/changes", json={"kind": "allowlist.add", "base": BASE, "adapter": "sqll"})
        assert r.status_code == 422 and "not found" in r.json()["error"]["message"]
        assert "close names" in r.json()["error"]["message"]


def test_ls_shows_where_each_adapter_is_resident(stack: OpsStack, tmp_path: Path) -> None:
    allowlist(stack, tmp_path, "summarize", rank=16)
    wait_for(lambda: chat(stack, f"{BASE}:summarize").status_code == 200)
    pod = chat(stack, f"{BASE}:summarize").headers["x-loraroute-pod"]
    wait_for(lambda: pod + ":gpu" in _ls(stack)["summarize"]["resident"])
    listed = _ls(stack)
    assert listed["summarize"]["rank"] == 16 and listed["summarize"]["sha256"]["adapter_model.safetensors"]


def _ls(stack: OpsStack) -> dict[str, dict]:
    res = subprocess.run(loraroute_cmd("adapters", "ls", stack.s3_url, "--endpoint-url", stack.s3_endpoint, "--json"),
                         capture_output=True, text=True, timeout=60, check=False, env=stack.env("carol"))
    assert res.returncode == 0, res.stderr
    return {a["adapter"]: a for a in json.loads(res.stdout)["adapters"]}


def allowlist(stack: OpsStack, tmp_path: Path, name: str, rank: int = 8) -> None:
    """Publish ``name`` and add it through an approved change (unless it is allowlisted already)."""
    with stack.admin("carol") as c:
        if any(a["name"] == name for a in c.get("/admin/allowlist").json()["data"][0]["adapters"]):
            return
    push(stack, peft.make_adapter(tmp_path / "pub" / name, rank=rank, base_model=BASE).parent)
    with stack.admin("alice") as alice, stack.admin("bob") as bob:
        chg = alice.post("/admin/changes", json={"kind": "allowlist.add", "base": BASE, "adapter": name}).json()
        assert bob.post(f"/admin/changes/{chg['id']}/approve").json()["status"] == "applied"


def test_doctor_passes_on_a_healthy_installation(stack: OpsStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    allowlist(stack, tmp_path, "sql")
    wait_for(lambda: chat(stack, f"{BASE}:sql").status_code == 200)
    rc = doctor.main(["--gateway", stack.url, "--key", KEYS["alice"], "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0, report
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses["sidecars publishing"] == "PASS" and statuses["store from pod-0"] == "PASS"
    assert statuses[f"{BASE}:sql in the store"] == "PASS"
    assert [s for n, s in statuses.items() if n.endswith(" answered")] == ["PASS"]
    res = subprocess.run(loraroute_cmd("doctor", "request", "--model", f"{BASE}:sql"), capture_output=True, text=True,
                         timeout=120, check=False, env=stack.env("alice"))
    assert res.returncode == 0, res.stdout + res.stderr
    for layer in ("HTTP", "auth", "allowlist", "store fetch", "TLS", "validation", "GPU load", "inference"):
        assert f"PASS  {layer} " in res.stdout


def test_doctor_names_the_layer_that_fails(stack: OpsStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Adapters put in the allowlist through the config file (the Git path, no store check):
    one not in the store, one whose rank no pod accepts."""
    push(stack, peft.make_adapter(tmp_path / "w" / "wide", rank=32, base_model=BASE).parent, "--max-lora-rank", "32")
    plain = push(stack, peft.make_adapter(tmp_path / "p" / "plain", rank=8, base_model=BASE).parent)["plain"]
    path = stack.root / "gateway-0.yaml"
    original = path.read_text()
    cfg = gateway_config(stack.gateways[0].port or 0, stack.redis_url, stack.prefix,
                         ["ghost", {"name": "wide", "rank": 32}, "plain"], TWO_PERSON)
    path.write_text(yaml.safe_dump(cfg))
    with stack.admin("alice") as c:
        assert c.post("/admin/reload").status_code == 200
    try:
        rc = doctor.main(["--gateway", stack.url, "--key", KEYS["alice"], "--json"])
        checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
        assert rc == 1
        assert checks[f"{BASE}:ghost in the store"]["status"] == "FAIL"
        assert "[adapter_not_found]" in checks[f"{BASE}:ghost in the store"]["detail"]
        assert checks[f"{BASE}:wide in the store"]["status"] == "FAIL"
        assert "[rank_too_large]" in checks[f"{BASE}:wide in the store"]["detail"]
        assert checks["a pod fits every adapter's rank"]["status"] == "FAIL"
        unpinned = checks[f"{BASE}:plain in the store"]
        assert unpinned["status"] == "WARN" and "not pinned" in unpinned["detail"]
        assert unpinned["fix"].endswith(f"--adapter plain --version {plain}")

        def trace(model: str) -> dict[str, dict]:
            rc = doctor.main(["request", "--model", model, "--gateway", stack.url, "--key", KEYS["alice"], "--json"])
            checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
            assert rc == 1
            return checks

        ghost = trace(f"{BASE}:ghost")
        assert ghost["store fetch"]["status"] == "FAIL" and "not found" in ghost["store fetch"]["detail"]
        assert [ghost[layer]["status"] for layer in ("validation", "GPU load", "inference")] == ["SKIP"] * 3
        wide = trace(f"{BASE}:wide")
        assert wide["store fetch"]["status"] == "PASS" and wide["validation"]["status"] == "FAIL"
        assert "--max-lora-rank 16" in wide["validation"]["detail"]
        typo = trace(f"{BASE}:ghots")
        assert typo["allowlist"]["status"] == "FAIL" and f"{BASE}:ghost" in typo["allowlist"]["detail"]
    finally:
        path.write_text(original)
        with stack.admin("alice") as c:
            assert c.post("/admin/reload").status_code == 200


def test_doctor_names_an_untrusted_store_certificate(procs, s3_tls_server: Proc, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A sidecar whose S3 endpoint presents a certificate from a CA it does not trust (the
    corporate-CA accident): the live checklist and the request trace both say TLS, and how to fix it."""
    from loraroute.procs import free_port, http_ready
    from ops_stack import digest

    adapters = tmp_path / "adapters"
    adapters.mkdir()
    sim_port, sidecar_port, gw_port = free_port(), free_port(), free_port()
    sim = procs.start("sim", loraroute_cmd("sim", "--port", str(sim_port), "--model", BASE, "--enable-lora",
                                           "--allow-runtime-lora-updating", "--adapter-dir", str(adapters),
                                           "--time-scale", "0.05"),
                      port=sim_port, ready_url=f"http://127.0.0.1:{sim_port}/health", timeout=60)
    sidecar = procs.start("sidecar", loraroute_cmd(
        "sidecar", "--pod-id", "pod-0", "--port", str(sidecar_port), "--vllm-url", sim.url, "--adapter-dir",
        str(adapters), "--source-type", "s3", "--s3-endpoint-url", str(s3_tls_server.extra["endpoint_url"]),
        "--s3-bucket", "adapters", "--base-model", BASE),
        port=sidecar_port, ready_url=f"http://127.0.0.1:{sidecar_port}/healthz", timeout=60)
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(yaml.safe_dump({
        "server": {"port": gw_port, "reload_poll_s": 0}, "bases": [{"name": BASE, "adapters": ["sql"]}],
        "admin": {"api_key_sha256": [digest("admin-key")]},
        "discovery": {"static": [{"id": "pod-0", "url": sim.url, "sidecar_url": sidecar.url}], "monitor": "always"},
        "changes": {"state_dir": str(tmp_path / "state")}}))
    gw = procs.start("gateway", loraroute_cmd("gateway", "--config", str(cfg)), port=gw_port,
                     ready=lambda: http_ready(f"http://127.0.0.1:{gw_port}/ready"), timeout=60)
    wait_for(lambda: httpx.get(gw.url + "/ready").status_code == 200, 30)

    rc = doctor.main(["--gateway", gw.url, "--key", "admin-key"])
    out = capsys.readouterr().out
    assert rc == 1
    line = next(x for x in out.splitlines() if "store from pod-0" in x)
    assert "FAIL" in line and "TLS: TLS to S3 endpoint" in line and "certificate not trusted" in line
    assert "fix: mount the CA that signed the S3 endpoint's certificate: sidecar.caBundle" in out
    rc = doctor.main(["request", "--model", f"{BASE}:sql", "--gateway", gw.url, "--key", "admin-key", "--json"])
    layers = {c["name"]: c["status"] for c in json.loads(capsys.readouterr().out)["checks"]}
    assert rc == 1 and layers["TLS"] == "FAIL" and layers["validation"] == "SKIP" and layers["inference"] == "SKIP"
