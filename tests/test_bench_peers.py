"""Peer routers: a missing venv is a clear skip, never a crash; LiteLLM's generated config."""

from __future__ import annotations

import io
from pathlib import Path

import yaml

from bench import peers
from bench.cli import main


def test_missing_peers_are_skipped_with_a_reason(tmp_path: Path) -> None:
    for name in peers.PEERS:
        ok, reason = peers.peer_available(name, root=tmp_path)
        assert not ok
        assert "setup" in reason or "Python >= 3.12" in reason
    assert peers.installed_peers(root=tmp_path) == []
    out = io.StringIO()
    result = peers.setup(["production-stack"], root=tmp_path, out=out)
    assert "Python >= 3.12" in result["production-stack"] and "production-stack" in out.getvalue()
    assert "unknown peer" in peers.setup(["nope"], root=tmp_path)["nope"]


def test_litellm_config_maps_every_model_to_every_pod(tmp_path: Path) -> None:
    path = peers._litellm_config(["http://127.0.0.1:1", "http://127.0.0.1:2"], ["ad000", "ad001"],
                                 tmp_path / "c.yaml")
    cfg = yaml.safe_load(path.read_text())
    assert cfg["router_settings"]["routing_strategy"] == "least-busy"
    pairs = {(m["model_name"], m["litellm_params"]["api_base"]) for m in cfg["model_list"]}
    assert pairs == {(a, f"http://127.0.0.1:{p}/v1") for a in ("ad000", "ad001") for p in (1, 2)}


def test_bench_cli_lists_peers_and_writes_a_trace(tmp_path: Path, capsys) -> None:
    assert main(["peers", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in peers.PEERS)
    spec = Path(__file__).resolve().parent.parent / "bench" / "specs" / "smoke.yaml"
    out = tmp_path / "t.jsonl"
    assert main(["workload", str(spec), "--rate", "5", "--requests", "30", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 31
