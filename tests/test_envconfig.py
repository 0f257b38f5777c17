"""The one environment-override function, and that the gateway config and the sidecar settings both use it."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, load_config
from podstate.envconfig import EnvOverrideError, apply_env_overrides
from vllm_sidecar.settings import SettingsError, load_settings


def test_paths_values_and_order() -> None:
    data = {"server": {"port": 1, "keep": True}, "tenants": [{"name": "a"}]}
    applied = apply_env_overrides(data, {
        "PFX__SERVER__PORT": "9000",
        "pfx__server__host": "0.0.0.0",  # the prefix is matched whatever its case
        "PFX__TENANTS__0__ADAPTERS": "[sql, 'b:*']",
        "PFX__TENANTS__2__NAME": "c",  # missing list items are created
        "PFX__STORE__URL": "redis://h:1/0",
        "PFX__ADMIN__API_KEY_SHA256_FILE": "",  # empty: null
        "PFX__BASES": "[unclosed",  # not YAML: kept as text
        "OTHER__SERVER__PORT": "1",
    }, "PFX__")
    assert data == {
        "server": {"port": 9000, "keep": True, "host": "0.0.0.0"},
        "tenants": [{"name": "a", "adapters": ["sql", "b:*"]}, {}, {"name": "c"}],
        "store": {"url": "redis://h:1/0"},
        "admin": {"api_key_sha256_file": None},
        "bases": "[unclosed",
    }
    assert applied == ["admin.api_key_sha256_file", "bases", "server.port", "store.url", "tenants.0.adapters",
                       "tenants.2.name", "server.host"]  # in the variables' name order
    with pytest.raises(EnvOverrideError, match="tenants is a list; use an index"):
        apply_env_overrides({"tenants": []}, {"PFX__TENANTS__NAME": "x"}, "PFX__")
    deeper = {"server": {"port": 1}}
    apply_env_overrides(deeper, {"PFX__SERVER__PORT__X": "1"}, "PFX__")  # a value becomes a section ...
    assert deeper == {"server": {"port": {"x": 1}}}  # ... which validation then refuses, naming the key


def test_both_processes_read_the_environment_the_same_way() -> None:
    cfg = load_config({"server": {"port": 1}}, env={"LORAROUTE__SERVER__PORT": "8123",
                                                    "LORAROUTE__ADMIN__API_KEY_SHA256_FILE": ""})
    assert cfg.server.port == 8123 and cfg.admin.api_key_sha256_file is None
    s = load_settings({"pod_id": "p", "vllm_url": "http://127.0.0.1:1", "advertise_url": "http://x:1"},
                      env={"LORAROUTE_SIDECAR_MAX_LORA_RANK": "32", "LORAROUTE_SIDECAR_ADVERTISE_URL": "",
                           "LORAROUTE_SIDECAR_SOURCE__S3__BUCKET": "b"})
    assert (s.max_lora_rank, s.advertise_url, s.source.s3.bucket) == (32, None, "b")
    with pytest.raises(ConfigError, match="environment override"):
        load_config({"tenants": []}, env={"LORAROUTE__TENANTS__NAME": "x"})
    with pytest.raises(SettingsError, match="environment override"):
        load_settings({"pod_id": "p", "vllm_url": "http://127.0.0.1:1", "tags": []},
                      env={"LORAROUTE_SIDECAR_TAGS__NAME": "x"})
    with pytest.raises(SettingsError, match="listen.port: Input should be a valid integer"):
        load_settings({"pod_id": "p", "vllm_url": "http://127.0.0.1:1", "listen": {"port": 1}},
                      env={"LORAROUTE_SIDECAR_LISTEN__PORT__X": "1"})
