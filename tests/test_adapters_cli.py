"""`loraroute adapters` against moto's S3 over HTTP and over TLS (a trustme CA): validation that
reports what a sidecar reports, versioned idempotent pushes, the delete safeguards, and a publish
that a fetch running at the same time never sees half of."""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time
from pathlib import Path

import boto3
import pytest
import yaml

from loraroute import adapters_cli, peft
from loraroute.bucket import AdapterBucket, S3Url
from loraroute.procs import Proc, loraroute_cmd
from vllm_sidecar import manifest
from vllm_sidecar.adapter_store import AdapterStore
from vllm_sidecar.errors import AdapterInvalid
from vllm_sidecar.settings import S3Settings
from vllm_sidecar.sources import S3Source
from vllm_sidecar.validation import validate_dir

BASE = "meta-llama/Llama-3.1-8B-Instruct"
_buckets = iter(range(1, 10_000))


@pytest.fixture
def bucket(s3_server: Proc) -> str:
    name = f"cli-{next(_buckets)}-{int(time.time() * 1000) % 100000}"
    boto3.client("s3", endpoint_url=str(s3_server.extra["endpoint_url"]), region_name="us-east-1").create_bucket(Bucket=name)
    return name


def keys(s3_server: Proc, bucket: str) -> dict[str, float]:
    client = boto3.client("s3", endpoint_url=str(s3_server.extra["endpoint_url"]), region_name="us-east-1")
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            out[o["Key"]] = o["LastModified"].timestamp()
    return out


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The CLI's own main() in this process (fast); ``run`` starts the real command."""
    rc = adapters_cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(loraroute_cmd("adapters", *args), capture_output=True, text=True, timeout=120, check=False)


# --------------------------------------------------------------------------------------------
# validate
# --------------------------------------------------------------------------------------------
def test_validate_reports_every_problem_with_the_sidecars_codes_and_messages(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = tmp_path / "local"
    peft.make_adapter(root / "good", rank=8)
    peft.make_adapter(root / "wide-other", rank=64, base_model="mistralai/Mistral-7B-v0.1")
    peft.make_adapter(root / "ia3-dora", rank=8, config_overrides={"peft_type": "IA3", "use_dora": True})
    peft.make_adapter(root / "truncated", rank=8)
    weights = root / "truncated" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    peft.make_adapter(root / "padded", rank=8)
    (root / "padded" / "adapter_model.safetensors").write_bytes(
        (root / "padded" / "adapter_model.safetensors").read_bytes() + b"\0" * 16)
    peft.make_adapter(root / "deep" / "inner", rank=8)
    peft.make_adapter(root / "pickle", rank=8)
    (root / "pickle" / "adapter_model.safetensors").rename(root / "pickle" / "adapter_model.bin")
    (root / "good" / "README.md").write_text("notes")

    res = run("validate", str(root), "--max-lora-rank", "16", "--base-model", BASE, "--json")
    assert res.returncode == 1, res.stderr
    report = {a["adapter"]: a for a in json.loads(res.stdout)["adapters"]}
    codes = {name: [p["code"] for p in a["problems"]] for name, a in report.items()}
    assert codes == {
        "good": [],
        "wide-other": ["rank_too_large", "base_model_mismatch"],
        "ia3-dora": ["peft_type", "unsupported"],
        "truncated": ["safetensors_header"],
        "padded": ["safetensors_header"],
        "deep": ["adapter_not_found"],
        "pickle": ["missing_file"],
    }
    good = report["good"]
    assert (good["rank"], good["alpha"], good["target_modules"], good["base_model"], good["dtypes"]) == (
        8, 16.0, ["q_proj", "v_proj"], BASE, {"F32": 8})
    assert good["notes"] and "README.md" in good["notes"][0]
    assert "16 bytes follow the last tensor" in report["padded"]["problems"][0]["message"]
    assert "one level too deep" in report["deep"]["problems"][0]["message"]
    assert "convert it with safetensors" in report["pickle"]["problems"][0]["message"]
    assert "--max-lora-rank 64" in report["wide-other"]["problems"][0]["message"]
    # the sidecar's own check (which stops at the first problem) says exactly the same
    for name in ("wide-other", "ia3-dora", "truncated", "padded", "pickle"):
        with pytest.raises(AdapterInvalid) as caught:
            validate_dir(root / name, where=str(root / name), max_lora_rank=16, base_model=BASE,
                         max_adapter_bytes=2 * 1024**3)
        assert (caught.value.code, caught.value.message) == (report[name]["problems"][0]["code"],
                                                             report[name]["problems"][0]["message"])

    rc, out, _ = cli(capsys, "validate", str(root / "good"), str(root / "ia3-dora"))
    assert rc == 1
    assert "OK    good" in out and "FAIL  ia3-dora" in out and "[peft_type]" in out
    assert "checked against vLLM's largest --max-lora-rank 512 only" in out
    assert cli(capsys, "validate", str(root / "good"))[0] == 0


# --------------------------------------------------------------------------------------------
# push, diff, ls
# --------------------------------------------------------------------------------------------
def test_push_publishes_versions_with_checksums_idempotently(
        capsys: pytest.CaptureFixture[str], s3_server: Proc, bucket: str, tmp_path: Path) -> None:
    s3 = ["--endpoint-url", str(s3_server.extra["endpoint_url"])]
    local = tmp_path / "local"
    peft.make_adapter(local / "sql", rank=8, seed=1)
    peft.make_adapter(local / "summarize", rank=16, seed=2)
    dest = f"s3://{bucket}/adapters/"

    res = run("push", str(local), dest, *s3)
    assert res.returncode == 0, res.stderr
    assert "new        sql" in res.stdout and "uploaded sql/adapter_model.safetensors" in res.stderr
    first = keys(s3_server, bucket)
    for name in ("sql", "summarize"):
        m = manifest.Manifest.parse(AdapterBucket(S3Url(bucket, "adapters/"), S3Settings(
            endpoint_url=str(s3_server.extra["endpoint_url"]))).read(f"adapters/{name}/loraroute-manifest.json"),
            where="")
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            assert m.files[f].sha256 == hashlib.sha256((local / name / f).read_bytes()).hexdigest()
        assert {f"adapters/{name}/{f}" for f in (*m.files, "loraroute-manifest.json")} <= set(first)
        assert {f"adapters/.versions/{name}/{m.version}/{f}" for f in (*m.files, "loraroute-manifest.json")} <= set(first)

    rc, out, _ = cli(capsys, "push", str(local), dest, *s3, "--json")
    assert rc == 0 and {a["status"] for a in json.loads(out)["adapters"]} == {"unchanged"}
    assert keys(s3_server, bucket) == first  # nothing rewritten

    v1 = json.loads(cli(capsys, "ls", dest, *s3, "--json")[1])["adapters"][0]["version"]
    peft.make_adapter(local / "sql", rank=16, seed=3)  # retrained
    rc, out, _ = cli(capsys, "diff", str(local), dest, *s3)
    assert rc == 0 and "changed        sql" in out and f"{v1} ->" in out and "unchanged      summarize" in out
    (local / "summarize").rename(tmp_path / "summarize-elsewhere")
    rc, out, _ = cli(capsys, "push", str(local), dest, *s3)
    assert rc == 0 and "changed    sql" in out
    rc, out, _ = cli(capsys, "ls", dest, *s3, "--json")
    listed = {a["adapter"]: a for a in json.loads(out)["adapters"]}
    assert set(listed) == {"sql", "summarize"}  # a push without --delete deletes nothing
    assert listed["sql"]["rank"] == 16 and listed["sql"]["versions"] == sorted([v1, listed["sql"]["version"]])
    rc, out, _ = cli(capsys, "ls", dest, *s3)
    assert "summarize" in out and "VERSIONS" in out


def test_a_push_with_an_invalid_adapter_uploads_nothing(
        capsys: pytest.CaptureFixture[str], s3_server: Proc, bucket: str, tmp_path: Path) -> None:
    peft.make_adapter(tmp_path / "local" / "good", rank=8)
    peft.make_adapter(tmp_path / "local" / "wide", rank=64)
    rc, _, err = cli(capsys, "push", str(tmp_path / "local"), f"s3://{bucket}/adapters/",
                     "--endpoint-url", str(s3_server.extra["endpoint_url"]), "--max-lora-rank", "16")
    assert rc == 1 and "nothing was changed in the store" in err and "[rank_too_large]" in err
    assert keys(s3_server, bucket) == {}


def test_delete_needs_a_plan_and_spares_allowlisted_adapters(
        capsys: pytest.CaptureFixture[str], s3_server: Proc, bucket: str, tmp_path: Path) -> None:
    s3 = ["--endpoint-url", str(s3_server.extra["endpoint_url"])]
    dest = f"s3://{bucket}/adapters/"
    for name in ("a", "b", "c"):
        peft.make_adapter(tmp_path / "all" / name, rank=8, seed=ord(name))
    assert cli(capsys, "push", str(tmp_path / "all"), dest, *s3)[0] == 0
    keep = tmp_path / "keep"
    keep.mkdir()
    (tmp_path / "all" / "a").rename(keep / "a")
    before = keys(s3_server, bucket)

    rc, _, err = cli(capsys, "push", str(keep), dest, *s3, "--delete")
    assert rc == 1 and "would delete 2 adapter(s)" in err and "(b, c)" in err and "--plan plan.json" in err
    plan = tmp_path / "plan.json"
    rc, out, _ = cli(capsys, "diff", str(keep), dest, *s3, "--plan", str(plan))
    assert rc == 0 and "only in store  b" in out and json.loads(plan.read_text())["delete"] == ["b", "c"]

    peft.make_adapter(tmp_path / "late" / "d", rank=8)  # someone pushes meanwhile
    assert cli(capsys, "push", str(tmp_path / "late"), dest, *s3)[0] == 0
    rc, _, err = cli(capsys, "push", str(keep), dest, *s3, "--delete", "--plan", str(plan))
    assert rc == 1 and "the store changed since the plan was made (new only in the store: d)" in err

    assert cli(capsys, "diff", str(keep), dest, *s3, "--plan", str(plan))[0] == 0
    rc, _, err = cli(capsys, "push", str(keep), dest, *s3, "--delete", "--plan", str(plan))
    assert rc == 1 and "needs to know which adapters are still allowlisted" in err
    gw_config = tmp_path / "gateway.yaml"
    gw_config.write_text(yaml.safe_dump({"bases": [{"name": "base", "adapters": ["a", {"name": "bee", "served_name": "b"}]}]}))
    rc, _, err = cli(capsys, "push", str(keep), dest, *s3, "--delete", "--plan", str(plan), "--gateway-config", str(gw_config))
    assert rc == 1 and "refusing to delete b: still in an allowlist" in err
    assert set(keys(s3_server, bucket)) >= set(before)  # nothing was deleted by any refused run

    gw_config.write_text(yaml.safe_dump({"bases": [{"name": "base", "adapters": ["a"]}]}))
    rc, out, _ = cli(capsys, "push", str(keep), dest, *s3, "--delete", "--plan", str(plan), "--gateway-config", str(gw_config))
    assert rc == 0 and "deleting from" in out and "deleted    b, c, d" in out
    left = keys(s3_server, bucket)
    assert not any(k.startswith(("adapters/b/", "adapters/c/", "adapters/d/")) for k in left)
    assert any(k.startswith("adapters/.versions/b/") for k in left)  # history stays
    assert any(k.startswith("adapters/a/") for k in left)


def test_push_and_ls_over_tls_trust_the_ca_bundle_the_sidecar_uses(
        capsys: pytest.CaptureFixture[str], s3_tls_server: Proc, tmp_path: Path) -> None:
    endpoint, ca = str(s3_tls_server.extra["endpoint_url"]), str(s3_tls_server.extra["ca_file"])
    name = f"tls-{int(time.time() * 1000) % 100000}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", verify=ca).create_bucket(Bucket=name)
    peft.make_adapter(tmp_path / "local" / "sql", rank=8, base_model=BASE)
    settings = tmp_path / "sidecar.yaml"
    settings.write_text(yaml.safe_dump({"pod_id": "p", "vllm_url": "http://127.0.0.1:1", "base_model": BASE,
                                        "max_lora_rank": 16, "source": {"type": "s3", "s3": {
                                            "endpoint_url": endpoint, "bucket": name, "ca_bundle": ca,
                                            "layout": "adapters/{adapter}/"}}}))

    rc, _, err = cli(capsys, "push", str(tmp_path / "local"), f"s3://{name}/adapters/", "--endpoint-url", endpoint)
    assert rc == 1
    assert "[tls_certificate] TLS to S3 endpoint" in err and "certificate not trusted" in err
    assert "set source.s3.ca_bundle" in err
    res = run("push", str(tmp_path / "local"), f"s3://{name}/adapters/", "--sidecar-config", str(settings))
    assert res.returncode == 0, res.stderr
    rc, out, _ = cli(capsys, "ls", f"s3://{name}/adapters/", "--endpoint-url", endpoint, "--ca-bundle", ca, "--json")
    assert rc == 0 and [a["adapter"] for a in json.loads(out)["adapters"]] == ["sql"]
    # the sidecar's layout is checked: a push where no sidecar looks is the "Adapter Not Found" accident
    rc, _, err = cli(capsys, "push", str(tmp_path / "local"), f"s3://{name}/models/", "--sidecar-config", str(settings))
    assert rc == 1 and "they would answer Adapter Not Found" in err and f"s3://{name}/adapters/" in err


# --------------------------------------------------------------------------------------------
# atomic publishing
# --------------------------------------------------------------------------------------------
def _store(s3_server: Proc, bucket: str, folder: Path) -> AdapterStore:
    source = S3Source(S3Settings(endpoint_url=str(s3_server.extra["endpoint_url"]), bucket=bucket))
    return AdapterStore(folder, source, layout="adapters/{adapter}/", max_lora_rank=64)


def test_a_half_published_adapter_is_never_accepted(s3_server: Proc, bucket: str, tmp_path: Path) -> None:
    """The live folder holding the weights of one version and the manifest of another (a publish
    in progress) is refused after three tries; once the manifest lands the fetch succeeds."""
    import asyncio

    v1 = peft.make_adapter(tmp_path / "v1" / "mix", rank=8, seed=1)
    v2 = peft.make_adapter(tmp_path / "v2" / "mix", rank=16, seed=2)
    target = AdapterBucket(S3Url(bucket, "adapters/"), S3Settings(endpoint_url=str(s3_server.extra["endpoint_url"])))
    m1, m2 = (manifest.build("mix", f, rank=r, base_model=None) for f, r in ((v1, 8), (v2, 16)))
    silent = lambda _label, _size: (lambda _n: None)  # noqa: E731
    target.upload_version("mix", v1, m1, silent)
    target.publish("mix", m1, live_had_manifest=False)
    target.upload_version("mix", v2, m2, silent)
    client = target.source.client
    for f in ("adapter_model.safetensors", "adapter_config.json"):  # the first two steps of publishing v2
        client.copy({"Bucket": bucket, "Key": f"adapters/.versions/mix/{m2.version}/{f}"}, bucket, f"adapters/mix/{f}")

    store = _store(s3_server, bucket, tmp_path / "pod")
    started = time.monotonic()
    with pytest.raises(AdapterInvalid) as caught:
        asyncio.run(store.ensure("mix"))
    assert caught.value.code == "checksum_mismatch" and time.monotonic() - started > 0.5
    assert not (tmp_path / "pod" / "mix").exists()
    target.publish("mix", m2, live_had_manifest=True)
    result = asyncio.run(store.ensure("mix"))
    assert (result.source, result.version, result.info.rank) == ("downloaded", m2.version, 16)


def test_fetches_during_pushes_get_whole_versions(s3_server: Proc, bucket: str, tmp_path: Path) -> None:
    import asyncio

    folders = [peft.make_adapter(tmp_path / f"v{i}" / "flip", rank=r, seed=i, pad_bytes=0) for i, r in ((1, 8), (2, 16))]
    target = AdapterBucket(S3Url(bucket, "adapters/"), S3Settings(endpoint_url=str(s3_server.extra["endpoint_url"])))
    manifests = [manifest.build("flip", f, rank=r, base_model=None) for f, r in zip(folders, (8, 16))]
    silent = lambda _label, _size: (lambda _n: None)  # noqa: E731
    for f, m in zip(folders, manifests):
        target.upload_version("flip", f, m, silent)
    target.publish("flip", manifests[0], live_had_manifest=False)
    stop = threading.Event()
    published = [0]

    def flip() -> None:  # a publish every 0.3 s: far more often than on adapter day
        while not stop.wait(0.3):
            published[0] += 1
            target.publish("flip", manifests[published[0] % 2], live_had_manifest=True)

    pusher = threading.Thread(target=flip, daemon=True)
    pusher.start()
    store = _store(s3_server, bucket, tmp_path / "pod")
    seen = set()
    deadline = time.monotonic() + 30
    try:
        while published[0] < 3:  # fetch again and again while at least three publishes happen
            assert time.monotonic() < deadline, "the publishes did not happen"
            result = asyncio.run(store.ensure("flip", latest=True))
            local = tmp_path / "pod" / "flip"
            kept = manifest.read_local(local)
            assert kept is not None and kept.mismatch(local) == "" and kept.version == result.version
            assert result.info.rank == (8 if result.version == manifests[0].version else 16)
            seen.add(result.version)
    finally:
        stop.set()
        pusher.join(10)
    assert seen <= {m.version for m in manifests} and seen
