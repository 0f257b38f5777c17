"""Shared fixtures: real services and real processes on free loopback ports.

- ``procs``: start processes (``procs.start(name, argv, ...)``) or ``procs.adopt`` a started one;
  all are stopped at teardown.
- ``redis_server``: a real Redis-protocol server (session-wide); ``redis_server.extra['url']``.
- ``s3_server``: moto's S3 HTTP server (session-wide); ``s3_server.extra['endpoint_url']``.
- ``tls_ca`` / ``s3_tls_server``: a throwaway CA and an S3 server behind TLS signed by it.
- ``make_adapter``: write a tiny real PEFT adapter folder.

Each service fixture checks itself once before handing the service out (a key with a TTL in
Redis, a bucket round trip in S3, TLS that trusts only the throwaway CA), so a broken fixture
fails there, by name, instead of somewhere inside a loraroute test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraroute import peft
from loraroute.procs import Proc, ProcRegistry, start_process
from loraroute.services import start_redis, start_s3

# Test credentials for the throwaway S3 server; never real ones.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing-access-key")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcRegistry]:
    registry = ProcRegistry(tmp_path / "logs")
    yield registry
    registry.stop_all()


@pytest.fixture(scope="session")
def session_log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("service-logs")


@pytest.fixture(scope="session")
def redis_server(session_log_dir: Path) -> Iterator[Proc]:
    import redis

    proc = start_redis(log_dir=session_log_dir)
    client = redis.Redis.from_url(str(proc.extra["url"]))
    client.set("fixture-self-check", "v", px=500)
    assert client.get("fixture-self-check") == b"v", "the Redis fixture does not keep a key"
    client.close()
    yield proc
    proc.stop()


@pytest.fixture
def redis_url(redis_server: Proc) -> Iterator[str]:
    """The shared Redis, flushed before each test that asks for it."""
    import redis

    client = redis.Redis.from_url(str(redis_server.extra["url"]))
    client.flushall()
    client.close()
    yield str(redis_server.extra["url"])


def _s3_self_check(endpoint_url: str, **client_kw: object) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1", **client_kw)
    s3.create_bucket(Bucket="fixture-self-check")
    s3.put_object(Bucket="fixture-self-check", Key="k", Body=b"{}")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="fixture-self-check")["Contents"]]
    assert keys == ["k"], "the S3 fixture does not keep an object"


@pytest.fixture(scope="session")
def s3_server(session_log_dir: Path) -> Iterator[Proc]:
    proc = start_s3(log_dir=session_log_dir)
    _s3_self_check(str(proc.extra["endpoint_url"]))
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def tls_ca():  # type: ignore[no-untyped-def]
    import trustme

    return trustme.CA()


@pytest.fixture(scope="session")
def s3_tls_server(tls_ca, tmp_path_factory: pytest.TempPathFactory, session_log_dir: Path) -> Iterator[Proc]:  # type: ignore[no-untyped-def]
    certdir = tmp_path_factory.mktemp("s3-tls")
    cert = tls_ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file, ca_file = certdir / "cert.pem", certdir / "key.pem", certdir / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_file), append=True)
    cert.private_key_pem.write_to_path(str(key_file))
    tls_ca.cert_pem.write_to_path(str(ca_file))
    proc = start_s3(cert_file=str(cert_file), key_file=str(key_file), log_dir=session_log_dir)
    proc.extra["ca_file"] = str(ca_file)
    import boto3
    import botocore.exceptions

    url = str(proc.extra["endpoint_url"])
    _s3_self_check(url, verify=str(ca_file))
    with pytest.raises(botocore.exceptions.SSLError):  # TLS for real: without the CA it is refused
        boto3.client("s3", endpoint_url=url, region_name="us-east-1").list_buckets()
    yield proc
    proc.stop()


@pytest.fixture
def make_adapter(tmp_path: Path):  # type: ignore[no-untyped-def]
    """``make_adapter(name, rank=8, root=None, **kw) -> Path`` under a per-test folder."""

    def _make(name: str, rank: int = 8, root: Path | None = None, **kwargs: object) -> Path:
        return peft.make_adapter((root or tmp_path / "adapters") / name, rank=rank, **kwargs)  # type: ignore[arg-type]

    return _make
