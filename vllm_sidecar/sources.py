"""Where adapters come from: an S3/MinIO bucket or a local folder, behind one small interface.

Both backends speak in *keys*: ``/``-separated paths relative to the bucket (S3) or to the root
folder (local), e.g. ``adapters/sql-lora/adapter_config.json``. Methods are synchronous (boto3
is); the adapter store runs them in a worker thread.

S3 errors become ``StoreUnreachable`` (503) naming the layer that failed — ``tls`` (certificate
not trusted: set ``ca_bundle``), ``connect`` (endpoint down or wrong), ``credentials`` (none
found), ``auth`` (keys refused), ``s3`` (other service errors) — or ``AdapterNotFound`` for a
missing bucket. Messages never contain credentials; exception texts are reduced to the SSL
reason or the S3 error code.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from podstate import redact_url
from vllm_sidecar.errors import AdapterInvalid, AdapterNotFound, StoreUnreachable

if TYPE_CHECKING:
    from vllm_sidecar.settings import S3Settings

_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int


class AdapterSource(Protocol):
    kind: str

    def describe(self, key: str = "") -> str:
        """Human-readable location of ``key`` (``s3://bucket/key`` or the local path)."""

    def list(self, prefix: str, *, limit: int = 1000) -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix`` (recursive), at most ``limit``, sorted."""

    def download(self, key: str, dest: Path, *, max_bytes: int) -> int:
        """Copy one object to ``dest``; refuse (``too_large``) beyond ``max_bytes``. Returns bytes."""


class LocalSource:
    """Adapters in a local folder (the embedded default: no S3 needed)."""

    kind = "local"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def describe(self, key: str = "") -> str:
        return str(self.root / key) if key else str(self.root)

    def list(self, prefix: str, *, limit: int = 1000) -> list[ObjectInfo]:
        if not self.root.is_dir():
            raise StoreUnreachable(f"adapter source folder {self.root} does not exist; set source.local.path",
                                   layer="filesystem")
        # walk from the deepest existing folder of the prefix, filter by string prefix
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return []
        out: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for filename in sorted(filenames):
                full = Path(dirpath) / filename
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    out.append(ObjectInfo(key, full.stat().st_size))
                    if len(out) >= limit:
                        return out
        return out

    def download(self, key: str, dest: Path, *, max_bytes: int) -> int:
        src = self.root / key
        size = src.stat().st_size
        if size > max_bytes:
            raise AdapterInvalid(f"{self.describe(key)} is {size} bytes, above max_adapter_bytes {max_bytes}",
                                 code="too_large")
        shutil.copyfile(src, dest)
        return size


def _ssl_reason(exc: BaseException) -> str:
    text = str(exc)
    match = re.search(r"\[SSL: [A-Z_]+\][^(\]]*", text)
    if match:
        return match.group(0).strip()
    match = re.search(r"certificate verify failed[^(\]]*", text)
    return match.group(0).strip() if match else "TLS handshake failed"


class S3Source:
    """Adapters in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, ...)."""

    kind = "s3"

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.endpoint = redact_url(settings.endpoint_url) if settings.endpoint_url else "the AWS S3 endpoint"
        self._client_obj: Any = None

    @property
    def client(self) -> Any:
        """The boto3 client, built on first use (a missing Secret file is a 503, not a crash).
        ``loraroute adapters`` writes through this same client, so it honours the same endpoint,
        credentials, CA bundle and timeouts as the sidecar."""
        if self._client_obj is None:
            import boto3
            from botocore.config import Config

            settings = self.settings
            credentials: dict[str, str] = {}
            for field_name, arg in (("access_key_id_file", "aws_access_key_id"),
                                    ("secret_access_key_file", "aws_secret_access_key"),
                                    ("session_token_file", "aws_session_token")):
                path = getattr(settings, field_name)
                if path:
                    try:
                        credentials[arg] = Path(path).read_text().strip()
                    except OSError as exc:
                        raise StoreUnreachable(f"cannot read the S3 credential file given as source.s3.{field_name} "
                                               f"({type(exc).__name__}); check the mounted Secret",
                                               layer="credentials", code="s3_credentials") from None
            verify: bool | str = settings.verify_tls
            if settings.ca_bundle and settings.verify_tls:
                if not Path(settings.ca_bundle).is_file():
                    raise StoreUnreachable(f"the CA bundle {settings.ca_bundle} (source.s3.ca_bundle) does not exist; "
                                           "check the mounted ConfigMap/Secret", layer="tls", code="tls_certificate")
                verify = settings.ca_bundle
            self._client_obj = boto3.session.Session().client(
                "s3",
                endpoint_url=settings.endpoint_url or None,
                region_name=settings.region,
                verify=verify,
                config=Config(
                    connect_timeout=settings.connect_timeout_s,
                    read_timeout=settings.read_timeout_s,
                    retries={"max_attempts": settings.max_attempts, "mode": "standard"},
                    s3={"addressing_style": "path"},
                ),
                **credentials,
            )
        return self._client_obj

    def describe(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"

    def translate(self, exc: BaseException) -> Exception:
        """A botocore error as the sidecar's typed error naming the failing layer."""
        from botocore import exceptions as bx

        if isinstance(exc, bx.SSLError) or "CERTIFICATE_VERIFY_FAILED" in str(exc):
            hint = ("set source.s3.ca_bundle to the PEM file of the CA that signed the server's certificate "
                    "(the corporate or self-signed CA)")
            if self.settings.ca_bundle:
                hint = (f"the CA bundle {self.settings.ca_bundle} does not contain the CA that signed it; "
                        "use the right bundle")
            return StoreUnreachable(f"TLS to S3 endpoint {self.endpoint} failed: certificate not trusted "
                                    f"({_ssl_reason(exc)}); {hint}", layer="tls", code="tls_certificate")
        if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ConnectionClosedError)):
            return StoreUnreachable(f"cannot connect to S3 endpoint {self.endpoint} ({type(exc).__name__}); "
                                    "check source.s3.endpoint_url and that the object store is running and "
                                    "reachable from this pod", layer="connect", code="s3_connect")
        if isinstance(exc, bx.ReadTimeoutError):
            return StoreUnreachable(f"S3 endpoint {self.endpoint} accepted the connection but did not answer in "
                                    f"{self.settings.read_timeout_s}s", layer="connect", code="s3_timeout")
        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return StoreUnreachable("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (e.g. from "
                                    "the data-connection Secret) or source.s3.access_key_id_file / "
                                    "secret_access_key_file", layer="credentials", code="s3_credentials")
        if isinstance(exc, bx.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", "Unknown"))
            if code in ("NoSuchBucket",):
                return AdapterNotFound(f"bucket {self.bucket!r} does not exist at {self.endpoint}; check "
                                       "source.s3.bucket", code="bucket_not_found")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden",
                        "ExpiredToken", "InvalidToken"):
                return StoreUnreachable(f"S3 refused the credentials for bucket {self.bucket!r} ({code}); check "
                                        "the access key and secret in the Secret and the bucket policy",
                                        layer="auth", code="s3_auth")
            return StoreUnreachable(f"S3 error {code} from {self.endpoint} for bucket {self.bucket!r}",
                                    layer="s3", code="s3_error")
        if isinstance(exc, bx.BotoCoreError):
            return StoreUnreachable(f"S3 client error talking to {self.endpoint} ({type(exc).__name__})",
                                    layer="s3", code="s3_error")
        return StoreUnreachable(f"S3 request to {self.endpoint} failed ({type(exc).__name__})", layer="s3",
                                code="s3_error")

    def list(self, prefix: str, *, limit: int = 1000) -> list[ObjectInfo]:
        from botocore import exceptions as bx

        out: list[ObjectInfo] = []
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix,
                                           PaginationConfig={"PageSize": min(1000, limit)}):
                for obj in page.get("Contents", []):
                    out.append(ObjectInfo(obj["Key"], int(obj["Size"])))
                    if len(out) >= limit:
                        return out
        except (bx.BotoCoreError, bx.ClientError) as exc:
            raise self.translate(exc) from None
        return out

    def download(self, key: str, dest: Path, *, max_bytes: int) -> int:
        from botocore import exceptions as bx

        total = 0
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=key)
            body = resp["Body"]
            with dest.open("wb") as f:
                while True:
                    chunk = body.read(_CHUNK)
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > max_bytes:
                        raise AdapterInvalid(f"{self.describe(key)} is larger than max_adapter_bytes {max_bytes}",
                                             code="too_large")
                    f.write(chunk)
        except (bx.BotoCoreError, bx.ClientError) as exc:
            raise self.translate(exc) from None
        return total
