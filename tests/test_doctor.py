"""`loraroute doctor -f values.yaml`: the offline checklist on the chart's values (the live checks
and `doctor request` run against real installations in test_adapter_ops.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from loraroute import doctor
from loraroute.procs import loraroute_cmd

CHART = Path(__file__).resolve().parents[1] / "helm" / "loraroute"


def statuses(capsys: pytest.CaptureFixture[str], *files: Path) -> tuple[int, dict[str, dict[str, str]]]:
    rc = doctor.main([*(a for f in files for a in ("-f", str(f))), "--json"])
    report = json.loads(capsys.readouterr().out)
    return rc, {c["name"]: c for c in report["checks"]}


def test_the_production_values_pass(capsys: pytest.CaptureFixture[str]) -> None:
    rc, checks = statuses(capsys, CHART / "ci" / "production-values.yaml")
    assert rc == 0
    assert {n: c["status"] for n, c in checks.items() if c["status"] != "PASS"} == {
        "--max-lora-rank fits the adapters": "WARN"}  # two adapters have no rank in the allowlist
    assert "named keys alice (operator), bob (approver)" in checks["runtime updates only via an audited path"]["detail"]


def test_each_classic_mistake_is_a_fail_with_its_fix(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "gateway": {"config": {"bases": [{"name": "llama", "adapters": [{"name": "sql-pro", "rank": 128}, "chat"]}],
                               "tenants": [{"name": "t", "adapters": ["*"], "colour": "red"}]}},
        "vllm": {"lora": {"maxLoras": 4, "maxCpuLoras": 4, "maxLoraRank": 64}, "gpuMemoryUtilization": 0.95,
                 "extraEnv": [{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "false"}]},
        "sidecar": {"s3": {"endpoint": "https://minio.corp.internal:9000"}},
        "networkPolicy": {"enabled": False},
    }))
    rc, checks = statuses(capsys, bad)
    assert rc == 1
    expect = {
        "--enable-lora, runtime loading": ("FAIL", "VLLM_ALLOW_RUNTIME_LORA_UPDATING=false"),
        "--max-loras / --max-cpu-loras": ("WARN", "no CPU standby"),
        "--max-lora-rank fits the adapters": ("FAIL", "llama:sql-pro (rank 128)"),
        "GPU memory headroom": ("FAIL", "0.95"),
        "trusted CA bundle": ("WARN", "certificate verify failed"),
        "runtime updates only via an audited path": ("FAIL", "any pod in the cluster can call"),
        "gateway config": ("FAIL", "tenants.0.colour: unknown key"),
    }
    for name, (status, text) in expect.items():
        assert checks[name]["status"] == status and text in checks[name]["detail"], checks[name]
        assert checks[name]["fix"]
    assert checks["--max-lora-rank fits the adapters"]["fix"].startswith("vllm.lora.maxLoraRank: 128")


def test_runtime_changes_without_a_second_person_are_a_warning(tmp_path: Path) -> None:
    """The real command, text output: a WARN is not a failure (exit 0), a FAIL is (exit 1)."""
    values = tmp_path / "v.yaml"
    values.write_text(yaml.safe_dump({"gateway": {"auth": {"adminKeyDigests": ["a" * 64]}},
                                      "vllm": {"lora": {"maxLoraRank": 256}},
                                      "gatewayx": None}))
    res = subprocess.run(loraroute_cmd("doctor", "-f", str(values)), capture_output=True, text=True, timeout=60,
                         check=False)
    assert res.returncode == 0, res.stderr
    assert "WARN  runtime updates only via an audited path" in res.stdout
    assert "fix: gateway.config.changes.two_person: all" in res.stdout
    assert "WARN  audit log survives a Redis restart" in res.stdout
    values.write_text(yaml.safe_dump({"vllm": {"gpuMemoryUtilization": 0.97}}))
    res = subprocess.run(loraroute_cmd("doctor", "-f", str(values)), capture_output=True, text=True, timeout=60,
                         check=False)
    assert res.returncode == 1 and "FAIL  GPU memory headroom" in res.stdout
    assert subprocess.run(loraroute_cmd("doctor"), capture_output=True, text=True, timeout=60).returncode == 2
