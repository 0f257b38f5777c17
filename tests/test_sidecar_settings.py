"""Sidecar settings (strict YAML, env, flags) and the not-found diagnostics as pure functions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vllm_sidecar import cli
from vllm_sidecar.diagnostics import diagnose
from vllm_sidecar.settings import SettingsError, load_settings
from vllm_sidecar.errors import StoreUnreachable
from vllm_sidecar.settings import S3Settings
from vllm_sidecar.sources import ObjectInfo, S3Source

# the shape the Helm chart renders (pod id and URLs come from flags there)
HELM_LIKE = {
    "listen": {"host": "0.0.0.0", "port": 8081},
    "base_model": "/mnt/models/Llama-3.1-8B-Instruct",
    "served_model_name": "llama-3.1-8b",
    "max_lora_rank": 64,
    "adapter_dir": "/var/lib/loraroute/adapters",
    "disk_budget_bytes": 16000000000,
    "poll_interval_s": 0.05,
    "source": {"type": "s3", "s3": {"bucket": "adapters", "region": "us-east-1", "layout": "adapters/{base}/{adapter}/",
                                    "endpoint_url": "https://minio.internal:9000", "ca_bundle": "/etc/loraroute/ca/ca.crt"}},
    "store": {"type": "redis", "url": "redis://redis:6379/0", "password_env": "LORAROUTE_REDIS_PASSWORD"},
    "demand": {"enabled": True, "refresh_s": 30, "prefetch": 4},
}


def test_helm_rendered_file_validates(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(HELM_LIKE))
    s = load_settings(path, overrides={"pod_id": "vllm-0", "vllm_url": "http://127.0.0.1:8000"})
    assert s.source.s3.ca_bundle == "/etc/loraroute/ca/ca.crt" and s.store.password_env == "LORAROUTE_REDIS_PASSWORD"
    assert s.base_key == "llama-3.1-8b" and s.public_sidecar_url == "http://127.0.0.1:8081"
    assert s.demand.refresh_s == 30.0 and s.demand.prefetch == 4


@pytest.mark.parametrize(("patch", "needle"), [
    ({"bucket_name": "x"}, "bucket_name: unknown key"),
    ({"source": {"s3": {"bukket": "x"}}}, "source.s3.bukket: unknown key"),
    ({"source": {"type": "gcs"}}, "source.type"),
    ({"source": {"s3": {"layout": "adapters/{name}/"}}}, "must contain {adapter}"),
    ({"store": {"url": "postgres://x"}}, "use memory:// or redis://"),
    ({"max_loras": 4, "max_cpu_loras": 2}, "max_cpu_loras must be >= max_loras"),
    ({"ttl_s": 1.0, "heartbeat_s": 2.0}, "heartbeat_s"),
    ({"served_model_name": None, "base_model": None}, "layout uses {base}"),
])
def test_strict_errors_name_the_key(patch: dict[str, object], needle: str) -> None:
    data = json.loads(json.dumps({"pod_id": "p", "vllm_url": "http://v:1", **HELM_LIKE}))
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            for k2, v2 in value.items():
                if isinstance(v2, dict):
                    data[key].setdefault(k2, {}).update(v2)
                else:
                    data[key][k2] = v2
        else:
            data[key] = value
    with pytest.raises(SettingsError, match=None) as info:
        load_settings(data)
    assert needle in str(info.value)


def test_missing_required_keys_say_how_to_set_them() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({})
    text = str(info.value)
    assert "pod_id: required" in text and "LORAROUTE_SIDECAR_POD_ID" in text and "--pod-id" in text


def test_precedence_file_then_env_then_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"pod_id": "from-file", "vllm_url": "http://v:1", "max_lora_rank": 8}))
    env = {"LORAROUTE_SIDECAR_MAX_LORA_RANK": "32", "LORAROUTE_SIDECAR_SOURCE__S3__BUCKET": "env-bucket",
           "LORAROUTE_SIDECAR_POD_ID": "from-env"}
    args = cli.build_parser().parse_args(["--config", str(path), "--pod-id", "from-flag", "--set", "ttl_s=5"])
    s = cli.settings_from_args(args, env=env)
    assert (s.pod_id, s.max_lora_rank, s.source.s3.bucket, s.ttl_s) == ("from-flag", 32, "env-bucket", 5.0)
    with pytest.raises(SettingsError, match="no_such_key: unknown key"):
        cli.settings_from_args(cli.build_parser().parse_args(["--config", str(path)]),
                               env={"LORAROUTE_SIDECAR_NO_SUCH_KEY": "1"})
    assert cli.main(["--config", str(path), "--check-config"]) == 0
    assert json.loads(capsys.readouterr().out)["pod_id"] in ("from-file", "from-env")
    assert cli.main(["--config", str(tmp_path / "missing.yaml")]) == 2


def test_diagnose_covers_each_path_mistake() -> None:
    listing = [ObjectInfo(k, 1) for k in (
        "adapters/adapter_config.json", "adapters/adapter_model.safetensors",  # synced without the folder
        "adapters/sql-lora",                                                    # object, no trailing slash
        "adapters/SQL-LoRA/adapter_config.json",                                # case
        "team/x/sql-lora/adapter_config.json",                                  # other depth
        "adapters/sql-lora2/adapter_config.json",                               # close name
    )]
    msg = diagnose("sql-lora", "adapters/sql-lora/", listing, describe="s3://b/adapters/sql-lora/")
    assert msg.startswith("adapter 'sql-lora' not found: looked for s3://b/adapters/sql-lora/adapter_config.json")
    for needle in ("without a trailing slash", "copied straight into 'adapters/'", "differ only in letter case",
                   "found adapter_config.json in 'team/x/sql-lora/'", "close names in 'adapters/': sql-lora2"):
        assert needle in msg, needle
    empty = diagnose("x", "adapters/x/", [], describe="s3://b/adapters/x/")
    assert "nothing exists under 'adapters/'" in empty


def test_s3_secret_files_and_ca_bundle_problems_are_503_not_crashes(tmp_path: Path) -> None:
    source = S3Source(S3Settings(endpoint_url="https://user:pw@minio.internal:9000/",
                                 access_key_id_file=str(tmp_path / "absent")))
    with pytest.raises(StoreUnreachable) as info:
        source.list("adapters/x/")
    assert info.value.code == "s3_credentials" and "source.s3.access_key_id_file" in info.value.message
    assert source.endpoint == "https://minio.internal:9000/" and "pw" not in source.endpoint
    source = S3Source(S3Settings(ca_bundle=str(tmp_path / "ca.pem")))
    with pytest.raises(StoreUnreachable, match="does not exist") as info:
        source.list("adapters/x/")
    assert info.value.layer == "tls"


def test_s3_credentials_from_mounted_files_or_a_clear_503(s3_server, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    endpoint = s3_server.extra["endpoint_url"]
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="cred-files")
    (tmp_path / "id").write_text("file-access-key\n")
    (tmp_path / "secret").write_text("file-secret-key\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probe off AWS
    with_files = S3Source(S3Settings(endpoint_url=endpoint, bucket="cred-files",
                                     access_key_id_file=str(tmp_path / "id"),
                                     secret_access_key_file=str(tmp_path / "secret")))
    assert with_files.list("adapters/") == []
    without = S3Source(S3Settings(endpoint_url=endpoint, bucket="cred-files"))
    with pytest.raises(StoreUnreachable) as info:
        without.list("adapters/")
    assert info.value.code == "s3_credentials" and "AWS_ACCESS_KEY_ID" in info.value.message
