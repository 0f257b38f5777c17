"""Gateway config, model names and the access policy: the pure parts, no processes."""

from __future__ import annotations

import copy

import hashlib
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config
from gateway.errors import APIError
from gateway.naming import parse_model_name
from gateway.policy import AccessPolicy

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "gateway.yaml"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


CONFIG = {
    "bases": [
        {"name": "tsuzumi-base", "served_name": "tsuzumi-8b", "aliases": ["tsuzumi"],
         "adapters": ["sql", {"name": "summarize", "rank": 16, "served_name": "summarize-v2"}, "creative"]},
    ],
    "tenants": [
        {"name": "acme", "api_key_sha256": [digest("acme-key")], "adapters": ["sql", "tsuzumi-base:summ*"],
         "base_models": False},
        {"name": "lab", "api_key_sha256": [digest("lab-key")]},
    ],
    "admin": {"api_key_sha256": digest("admin-key")},
}


def test_example_config_loads() -> None:
    cfg = load_config(EXAMPLE, env={})
    assert cfg.bases[0].name == "tsuzumi-base"
    assert cfg.keys_configured


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"server": {"prot": 1}}, "server.prot"),
        ({"server": {"timeouts": {"connect": 1}}}, "server.timeouts.connect"),
        ({"bases": [{"name": "b", "adapters": ["../etc"]}]}, "bases.0.adapters.0.name"),
        ({"tenants": [{"name": "t", "api_key_sha256": ["not-a-digest"]}]}, "tenants.0.api_key_sha256"),
        ({"discovery": {"static": [{"id": "p", "url": "127.0.0.1:8000"}]}}, "discovery.static.0.url"),
        ({"store": {"url": "mysql://x"}}, "store.url"),
        ({"pipelines": "default"}, "pipelines"),
    ],
)
def test_unknown_or_invalid_key_names_its_path(data: dict, path: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(data, env={})
    assert str(err.value).startswith(path + ":") or f"; {path}:" in str(err.value)


def test_errors_never_echo_secrets() -> None:
    with pytest.raises(ConfigError) as err:
        load_config({"tenants": [{"name": "t", "api_key_sha256": ["sk-very-secret-key"]}]}, env={})
    assert "sk-very-secret-key" not in str(err.value)


def test_env_overrides_are_validated_like_the_file() -> None:
    cfg = load_config(CONFIG, env={
        "LORAROUTE__SERVER__PORT": "9123",
        "LORAROUTE__SERVER__TIMEOUTS__CONNECT_S": "0.5",
        "LORAROUTE__STORE__URL": "redis://127.0.0.1:6379/0",
        "LORAROUTE__DISCOVERY__STATIC": '[{id: p0, url: "http://127.0.0.1:1"}]',
        "LORAROUTE__TENANTS__1__ADAPTERS": "[creative]",
        "UNRELATED": "x",
    })
    assert cfg.server.port == 9123
    assert cfg.server.timeouts.connect_s == 0.5
    assert cfg.store.url.startswith("redis://")
    assert cfg.discovery.static[0].id == "p0"
    assert cfg.tenants[1].adapters == ("creative",)
    with pytest.raises(ConfigError, match="server.bogus"):
        load_config(CONFIG, env={"LORAROUTE__SERVER__BOGUS": "1"})


def test_digest_files_relative_to_config(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "admin.sha256").write_text(f"# admin\n{digest('a')}\n\n{digest('b').upper()}\n")
    (tmp_path / "gw.yaml").write_text("admin:\n  api_key_sha256_file: secrets/admin.sha256\n")
    cfg = load_config(tmp_path / "gw.yaml", env={})
    assert cfg.admin.api_key_sha256 == (digest("a"), digest("b"))
    (tmp_path / "secrets" / "admin.sha256").write_text("plain-key\n")
    with pytest.raises(ConfigError, match="line 1 of digest file") as err:
        load_config(tmp_path / "gw.yaml", env={})
    assert "plain-key" not in str(err.value)


def test_invalid_yaml_and_duplicates() -> None:
    with pytest.raises(ConfigError, match="two bases"):
        load_config({"bases": [{"name": "a"}, {"name": "b", "aliases": ["a"]}]}, env={})
    with pytest.raises(ConfigError, match="two tenants"):
        load_config({"tenants": [{"name": "a", "api_key_sha256": [digest("k")]},
                                 {"name": "b", "api_key_sha256": [digest("k")]}]}, env={})


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("b:..", "'..'"),
        ("b:a/b", "path separator"),
        ("b: sql", "whitespace"),
        ("b:sq\x07l", "control character"),
        ("b:", "empty adapter part"),
        (":sql", "empty base part"),
        ("b:sql:v2", "second colon"),
        ("b:-sql", "not valid"),
        ("", "empty"),
        (42, "must be a string"),
    ],
)
def test_bad_model_names_say_what_is_wrong(name: object, fragment: str) -> None:
    with pytest.raises(APIError) as err:
        parse_model_name(name)
    assert err.value.status == 400 and err.value.param == "model"
    assert fragment in err.value.message


def test_policy_tenants_and_allowlist() -> None:
    policy = AccessPolicy(load_config(CONFIG, env={}))
    with pytest.raises(APIError) as e:
        policy.authenticate(None)
    assert e.value.status == 401
    with pytest.raises(APIError) as e:
        policy.authenticate("Bearer wrong")
    assert e.value.status == 401
    acme = policy.authenticate("Bearer acme-key")
    lab = policy.authenticate("Bearer lab-key")
    assert acme is not None and acme.name == "acme"

    r = policy.resolve(acme, "tsuzumi:summarize")  # alias + served name rewrite
    assert r.ref.base == "tsuzumi-8b" and r.ref.name == "summarize-v2" and r.ref.rank == 16
    assert policy.resolve(lab, "tsuzumi-base").ref.vllm_model == "tsuzumi-8b"

    # an adapter acme may not use answers exactly as it would if it did not exist (the default)
    with pytest.raises(APIError) as forbidden:
        policy.resolve(acme, "tsuzumi-base:creative")
    without = copy.deepcopy(CONFIG)
    without["bases"][0]["adapters"] = without["bases"][0]["adapters"][:2]  # no 'creative' at all
    other = AccessPolicy(load_config(without, env={}))
    with pytest.raises(APIError) as unknown:
        other.resolve(other.authenticate("Bearer acme-key"), "tsuzumi-base:creative")
    assert forbidden.value.status == 404 and forbidden.value.to_dict() == unknown.value.to_dict()
    assert "acme" not in forbidden.value.message and "tsuzumi-base:sql" in forbidden.value.message
    with pytest.raises(APIError) as e:
        policy.resolve(acme, "tsuzumi-base")
    assert e.value.status == 403
    # without concealment: a 403 that says why and lists what acme may use
    open_policy = AccessPolicy(load_config({**CONFIG, "security": {"conceal_forbidden": False}}, env={}))
    with pytest.raises(APIError) as e:
        open_policy.resolve(open_policy.authenticate("Bearer acme-key"), "tsuzumi-base:creative")
    assert e.value.status == 403 and "acme" in e.value.message and "tsuzumi-base:sql" in e.value.message
    with pytest.raises(APIError) as e:
        policy.resolve(lab, "tsuzumi-base:sqll")
    assert e.value.status == 404 and "tsuzumi-base:sql" in e.value.message
    with pytest.raises(APIError) as e:
        policy.resolve(acme, "tsuzumi-base:creativ")  # nearest names come from what acme may use
    assert e.value.status == 404 and "creative" not in e.value.message.split(";", 1)[1]
    with pytest.raises(APIError) as e:
        policy.resolve(lab, "llama:sql")
    assert e.value.status == 404 and "unknown base" in e.value.message

    assert policy.visible_models(acme) == ["tsuzumi-base:sql", "tsuzumi-base:summarize"]
    assert policy.is_admin("Bearer admin-key") and not policy.is_admin("Bearer lab-key")


def test_open_gateway_without_keys() -> None:
    policy = AccessPolicy(load_config({"bases": [{"name": "b", "adapters": ["x"]}]}, env={}))
    assert policy.authenticate(None) is None
    assert policy.resolve(None, "b:x").ref.name == "x"
    assert policy.visible_models(None) == ["b", "b:x"]
