"""Audited run-time changes on one gateway with the memory store (proposals and the audit log in
files): roles, the two-person rule, an unapproved change having no effect, rejection, expiry,
rollback, persistence across a restart, and the overlay rules themselves."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from openai import NotFoundError, OpenAI

from gateway.change_model import SPEC, AddAdapter, Change, Overlay, RetireAdapter, describe, inverse
from gateway.config import ConfigError, load_config
from loraroute import changes_cli, peft
from loraroute.procs import Proc, ProcRegistry, consecutive_free_ports, free_port, http_ready, loraroute_cmd

BASE = "tsuzumi-base"
KEYS = {"admin": "admin-key", "alice": "alice-key", "bob": "bob-key", "carol": "carol-key", "dave": "dave-key"}


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def config(port: int, pods: list[str], state_dir: Path, **changes: object) -> dict[str, object]:
    return {
        "server": {"port": port, "reload_poll_s": 0},
        "bases": [{"name": BASE, "adapters": [{"name": "sql", "rank": 8}]}],
        "admin": {"api_key_sha256": [digest(KEYS["admin"])], "keys": [
            {"name": "alice", "roles": ["operator"], "api_key_sha256": [digest(KEYS["alice"])]},
            {"name": "bob", "roles": ["approver"], "api_key_sha256": [digest(KEYS["bob"])]},
            {"name": "carol", "roles": ["viewer"], "api_key_sha256": [digest(KEYS["carol"])]},
            {"name": "dave", "roles": ["operator", "approver"], "api_key_sha256": [digest(KEYS["dave"])]},
        ]},
        "discovery": {"static": [{"id": f"pod-{i}", "url": u} for i, u in enumerate(pods)],
                      "monitor_timeout_s": 2.0, "monitor_unhealthy_after_s": 3.0, "monitor_ttl_s": 5.0},
        "changes": {"two_person": ["allowlist.add", "allowlist.retire", "adapter.roll"], "state_dir": str(state_dir),
                    **changes},
    }


class Env:
    def __init__(self, root: Path, procs: ProcRegistry, pods: list[str]) -> None:
        self.root, self.procs, self.pods = root, procs, pods
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.gateway: Proc | None = None

    def start_gateway(self, **changes: object) -> None:
        path = self.root / "gateway.yaml"
        path.write_text(yaml.safe_dump(config(self.port, self.pods, self.root / "state", **changes)))
        self.gateway = self.procs.start("gateway", loraroute_cmd("gateway", "--config", str(path)), port=self.port,
                                        ready=lambda: http_ready(self.url + "/ready"), timeout=60)
        deadline = time.monotonic() + 30
        while httpx.get(self.url + "/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)

    def as_(self, who: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, headers={"Authorization": f"Bearer {KEYS[who]}"})

    def chat(self, model: str) -> str:
        client = OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        # the reply echoes the name the client sent (the gateway rewrites vLLM's adapter name)
        return client.chat.completions.create(model=model, max_tokens=2,
                                              messages=[{"role": "user", "content": "hi"}]).model


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("changes")
    peft.make_adapter_set(root / "adapters", [("sql", 8), ("summarize", 16)], base_model=BASE)
    procs = ProcRegistry(root / "logs")
    base_port = consecutive_free_ports(2)
    pods = [f"http://127.0.0.1:{base_port + i}" for i in range(2)]
    try:
        procs.start("sim", loraroute_cmd(
            "sim", "cluster", "--pods", "2", "--base-port", str(base_port), "--model", BASE, "--enable-lora",
            "--max-loras", "2", "--max-lora-rank", "16", "--adapter-dir", str(root / "adapters"),
            "--allow-runtime-lora-updating", "--time-scale", "0.05"),
            ready=lambda: all(http_ready(u + "/health") for u in pods), timeout=60)
        e = Env(root, procs, pods)
        e.start_gateway()
        yield e
    finally:
        procs.stop_all()


def propose(env: Env, who: str, body: dict[str, object]) -> httpx.Response:
    with env.as_(who) as c:
        return c.post("/admin/changes", json=body)


ADD = {"kind": "allowlist.add", "base": BASE, "adapter": "summarize", "rank": 16, "reason": "summaries for support"}


def test_roles_and_the_two_person_rule(env: Env) -> None:
    assert httpx.get(env.url + "/admin/changes").status_code == 401
    with httpx.Client(base_url=env.url, headers={"Authorization": "Bearer wrong"}) as c:
        r = c.get("/admin/changes")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_key"
    with env.as_("carol") as c:
        assert c.get("/admin/whoami").json() == {"name": "carol", "roles": ["viewer"]}
        assert c.get("/admin/changes").status_code == 200
        r = c.post("/admin/changes", json=ADD)
        assert r.status_code == 403 and r.json()["error"]["code"] == "role_missing"
        assert c.post("/admin/reload").status_code == 403

    r = propose(env, "dave", ADD)
    assert r.status_code == 201, r.text
    change = r.json()
    assert (change["status"], change["proposed_by"], change["needs_approval"]) == ("pending", "dave", True)
    # unapproved: no effect at all
    with pytest.raises(NotFoundError):
        env.chat(f"{BASE}:summarize")
    with env.as_("carol") as c:
        assert [a["name"] for a in c.get("/admin/allowlist").json()["data"][0]["adapters"]] == ["sql"]
    # the proposer cannot approve, even holding the approver role; an operator cannot approve at all
    with env.as_("dave") as c:
        r = c.post(f"/admin/changes/{change['id']}/approve")
        assert r.status_code == 403 and r.json()["error"]["code"] == "self_approval"
    with env.as_("alice") as c:
        assert c.post(f"/admin/changes/{change['id']}/approve").json()["error"]["code"] == "role_missing"
    with pytest.raises(NotFoundError):
        env.chat(f"{BASE}:summarize")

    with env.as_("bob") as c:
        r = c.post(f"/admin/changes/{change['id']}/approve", json={"note": "reviewed the eval"})
        assert r.status_code == 200 and r.json()["status"] == "applied" and r.json()["decided_by"] == "bob"
        again = c.post(f"/admin/changes/{change['id']}/approve")
        assert again.status_code == 409 and again.json()["error"]["code"] == "change_not_pending"
    assert env.chat(f"{BASE}:summarize") == f"{BASE}:summarize"

    with env.as_("carol") as c:
        entries = c.get("/admin/audit", params={"limit": 1000}).json()["data"]
    mine = [(e["event"], e["by"]) for e in entries if e["change_id"] == change["id"]]
    assert mine == [("proposed", "dave"), ("approved", "bob"), ("applied", "bob")]
    assert entries[-1]["after"] == {"adapter": {"name": "summarize", "rank": 16, "served_name": None, "version": None}}
    metrics = httpx.get(env.url + "/metrics").text
    assert 'loraroute_audit_events_total{event="approved",kind="allowlist.add"} 1.0' in metrics


def test_reject_rollback_and_conflicts(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    retire = propose(env, "alice", {"kind": "allowlist.retire", "base": BASE, "adapter": "sql"}).json()
    with env.as_("bob") as c:
        r = c.post(f"/admin/changes/{retire['id']}/reject", json={"note": "sql is still used by analytics"})
        assert r.json()["status"] == "rejected"
    assert env.chat(f"{BASE}:sql") == f"{BASE}:sql"

    # weights need no approval here: applied at once, and a rollback is one command
    r = propose(env, "alice", {"kind": "pipeline.weights", "weights": {"prefix-cache": 0.0, "kv-usage": 4.0}})
    weights = r.json()
    assert r.status_code == 201 and weights["status"] == "applied" and weights["before"] == {
        "weights": {"prefix-cache": 1.0, "kv-usage": 1.0}}
    rc = changes_cli.main(["--gateway", env.url, "--key", KEYS["alice"], "rollback", weights["id"]])
    out = capsys.readouterr().out
    assert rc == 0 and f"(rollback of {weights['id']})" in out and "applied" in out
    with env.as_("carol") as c:
        assert c.get(f"/admin/changes/{weights['id']}").json()["status"] == "rolled_back"
    # a rollback that would undo a later change is refused
    first = propose(env, "alice", {"kind": "pipeline.weights", "weights": {"queue": 1.0}})
    assert first.status_code == 409 and "no scorer named queue" in first.json()["error"]["message"]
    a = propose(env, "alice", {"kind": "pipeline.weights", "weights": {"kv-usage": 2.0}}).json()
    propose(env, "alice", {"kind": "pipeline.weights", "weights": {"kv-usage": 3.0}})
    with env.as_("alice") as c:
        r = c.post(f"/admin/changes/{a['id']}/rollback")
        assert r.status_code == 409 and "roll back the later change first" in r.json()["error"]["message"]
    # bad bodies are 400 with the key that is wrong
    for body, where in (({"kind": "allowlist.add", "base": BASE}, "adapter"),
                        ({"kind": "allowlist.add", "base": BASE, "adapter": "x", "colour": 1}, "colour"),
                        ({"kind": "make-it-fast"}, "kind"),
                        ({"kind": "adapter.roll", "base": BASE, "adapter": "sql", "version": "v2"}, "version")):
        r = propose(env, "alice", body)
        assert r.status_code == 400 and where in r.json()["error"]["message"], r.text
    r = propose(env, "alice", {"kind": "allowlist.add", "base": "no-such-base", "adapter": "x"})
    assert r.status_code == 409 and "no base named 'no-such-base'" in r.json()["error"]["message"]
    with env.as_("alice") as c:
        assert c.post("/admin/changes/chg-999/approve").status_code == 403
        assert c.get("/admin/changes/chg-999").status_code == 404


def test_changes_survive_a_restart_and_the_audit_log_is_json_lines(env: Env) -> None:
    assert env.chat(f"{BASE}:summarize") == f"{BASE}:summarize"
    assert env.gateway is not None
    env.gateway.stop()
    env.procs.started.remove(env.gateway)
    env.start_gateway(proposal_ttl_s=1.0)
    assert env.chat(f"{BASE}:summarize") == f"{BASE}:summarize"  # the approved add is still in effect
    lines = (env.root / "state" / "audit.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    assert all({"at", "time", "event", "change_id", "kind", "by", "what", "before", "after"} <= set(e) for e in entries)
    with env.as_("carol") as c:
        served = c.get("/admin/audit", params={"format": "jsonl", "limit": 10_000}).text
    assert [json.loads(line) for line in served.splitlines()] == entries

    pending = propose(env, "alice", {"kind": "allowlist.retire", "base": BASE, "adapter": "summarize"}).json()
    time.sleep(1.3)
    with env.as_("bob") as c:
        r = c.post(f"/admin/changes/{pending['id']}/approve")
        assert r.status_code == 409 and "expired" in r.json()["error"]["message"]
    with env.as_("carol") as c:
        last = c.get("/admin/audit", params={"limit": 1}).json()["data"][0]
    assert (last["event"], last["change_id"], last["by"]) == ("expired", pending["id"], "gateway")
    assert env.chat(f"{BASE}:summarize") == f"{BASE}:summarize"


# --------------------------------------------------------------------------------------------
# the overlay, without processes
# --------------------------------------------------------------------------------------------
def test_the_overlay_is_laid_over_whatever_the_file_says() -> None:
    cfg = load_config({"bases": [{"name": BASE, "aliases": ["t"], "adapters": ["sql", {"name": "old", "rank": 8}]}],
                       "pipeline": "llm-d"}, env={})
    weights = {"prefix-cache": 3.0, "queue": 2.0, "kv-usage": 2.0, "lora-affinity": 1.0}
    overlay = Overlay()
    for body in ({"kind": "allowlist.add", "base": "t", "adapter": "new", "rank": 16, "version": "0123456789ab"},
                 {"kind": "allowlist.retire", "base": BASE, "adapter": "old"},
                 {"kind": "adapter.roll", "base": BASE, "adapter": "sql", "version": "ba9876543210"},
                 {"kind": "pipeline.weights", "weights": {"queue": 5.0}}):
        spec = SPEC.validate_python(body)
        describe(spec, overlay.apply(cfg), weights)
        overlay = overlay.after(spec, overlay.apply(cfg))
    eff = overlay.apply(cfg)
    assert [(a.name, a.rank, a.version) for a in eff.bases[0].adapters] == [
        ("sql", None, "ba9876543210"), ("new", 16, "0123456789ab")]
    assert eff.pipeline == {"preset": "llm-d", "weights": {"queue": 5.0}} and overlay.generation == 4
    # a file change keeps the overlay: the adapter added in the file later is not duplicated
    later = load_config({"bases": [{"name": BASE, "aliases": ["t"], "adapters": ["sql", "old", "new", "extra"]}]}, env={})
    assert [a.name for a in overlay.apply(later).bases[0].adapters] == ["sql", "new", "extra"]
    # the change that does not fit the state is refused with the reason
    with pytest.raises(ConfigError, match="already in the allowlist"):
        describe(AddAdapter(kind="allowlist.add", base=BASE, adapter="new"), eff, weights)
    with pytest.raises(ConfigError, match="already at version"):
        describe(SPEC.validate_python({"kind": "adapter.roll", "base": BASE, "adapter": "sql",
                                       "version": "ba9876543210"}), eff, weights)
    # the inverse of a retire brings the entry back as it was
    retire = RetireAdapter(kind="allowlist.retire", base=BASE, adapter="new")
    before, after = describe(retire, eff, weights)
    undo = inverse(Change(id="chg-1", spec=retire, status="applied", needs_approval=False, proposed_by="x",
                          proposed_at=0.0, before=before, after=after))
    assert isinstance(undo, AddAdapter) and (undo.adapter, undo.rank, undo.version) == ("new", 16, "0123456789ab")
