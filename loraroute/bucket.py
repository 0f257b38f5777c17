"""An adapter bucket as ``loraroute adapters`` sees it: the adapter folders under one prefix,
their manifests and versions, and the steps of a publish.

Layout (the sidecar's ``source.s3.layout`` ``<prefix>{adapter}/``; ``vllm_sidecar.manifest``)::

    <prefix><adapter>/adapter_config.json, adapter_model.safetensors, loraroute-manifest.json
    <prefix>.versions/<adapter>/<version>/  the same three files, never changed once written

A publish (``upload_version`` then ``publish``): the files go to the version's own folder first
(the slow upload, invisible to sidecars), then server-side copies put them in the live folder:
weights, config, manifest last — or, when the live folder holds files without a manifest
(uploaded by another tool), the manifest first, so that a sidecar never accepts a config and
weights of two versions (it verifies every file against the manifest and fetches again on a
mismatch). Nothing here deletes, except ``delete`` (the live folder only: the versions stay).

Every S3 call goes through the sidecar's own client (``vllm_sidecar.sources.S3Source``: same
endpoint, credentials, CA bundle, timeouts); its errors are the sidecar's typed errors naming
the failing layer (``tls_certificate``, ``s3_connect``, ``s3_auth``, ...).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_sidecar import manifest
from vllm_sidecar.errors import AdapterInvalid, SidecarError
from vllm_sidecar.manifest import Manifest
from vllm_sidecar.settings import S3Settings
from vllm_sidecar.sources import S3Source
from vllm_sidecar.validation import CONFIG_FILE, MANIFEST_FILE, REQUIRED_FILES, WEIGHTS_FILE, validate_name

#: bytes done so far, for one file's transfer
ProgressCallback = Callable[[int], None]
_PARALLEL = 8


@dataclass(frozen=True, slots=True)
class S3Url:
    """``s3://bucket/prefix/`` — the folder holding the adapter folders."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, text: str) -> S3Url:
        if not text.startswith("s3://"):
            raise ValueError(f"{text!r} is not an s3:// URL; write s3://<bucket>/<folder>/")
        bucket, _, prefix = text[5:].partition("/")
        if not bucket:
            raise ValueError(f"{text!r} names no bucket; write s3://<bucket>/<folder>/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"  # a folder: s3://b/adapters means s3://b/adapters/
        if "//" in prefix or prefix.startswith("/") or ".." in prefix.split("/"):
            raise ValueError(f"{text!r}: the folder must be a plain path like adapters/ (no '//', '..')")
        return cls(bucket, prefix)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@dataclass(slots=True)
class RemoteAdapter:
    """One adapter folder in the bucket."""

    name: str
    files: dict[str, int] = field(default_factory=dict)  # live folder: file name -> size
    manifest: Manifest | None = None
    versions: tuple[str, ...] = ()
    rank: int | None = None
    problem: str | None = None  # a damaged manifest, an unreadable config

    @property
    def version(self) -> str | None:
        return self.manifest.version if self.manifest else None

    @property
    def size_bytes(self) -> int:
        return sum(self.files.get(f, 0) for f in REQUIRED_FILES)


class AdapterBucket:
    def __init__(self, url: S3Url, settings: S3Settings) -> None:
        self.url = url
        self.source = S3Source(settings.model_copy(update={"bucket": url.bucket}))

    # --- low level --------------------------------------------------------------------------------
    def _call(self, fn: Callable[..., Any], **kwargs: Any) -> Any:
        from botocore import exceptions as bx

        try:
            return fn(**kwargs)
        except (bx.BotoCoreError, bx.ClientError) as exc:
            raise self.source.translate(exc) from None

    def _list(self, prefix: str, *, delimiter: bool) -> Iterator[dict[str, Any]]:
        client = self.source.client
        kwargs: dict[str, Any] = {"Bucket": self.url.bucket, "Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = "/"
        token: str | None = None
        while True:
            page = self._call(client.list_objects_v2, **kwargs, **({"ContinuationToken": token} if token else {}))
            yield page
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def _folders(self, prefix: str) -> list[str]:
        return sorted(cp["Prefix"][len(prefix):].rstrip("/")
                      for page in self._list(prefix, delimiter=True) for cp in page.get("CommonPrefixes", []))

    def _files(self, prefix: str) -> dict[str, int]:
        return {o["Key"][len(prefix):]: int(o["Size"])
                for page in self._list(prefix, delimiter=True) for o in page.get("Contents", [])}

    def read(self, key: str, *, max_bytes: int = 1 << 20) -> bytes:
        resp = self._call(self.source.client.get_object, Bucket=self.url.bucket, Key=key)
        try:
            data: bytes = resp["Body"].read(max_bytes + 1)
        finally:
            resp["Body"].close()
        if len(data) > max_bytes:
            raise AdapterInvalid(f"{self.source.describe(key)} is larger than {max_bytes} bytes", code="too_large")
        return data

    def live_prefix(self, name: str) -> str:
        return f"{self.url.prefix}{name}/"

    # --- reading ----------------------------------------------------------------------------------
    def check_reachable(self) -> None:
        """One listing call: raises the typed error (TLS, connect, credentials, bucket) if any."""
        next(self._list(self.url.prefix, delimiter=True))

    def holds_adapter_itself(self) -> bool:
        """True when the prefix is an adapter folder (the files are directly in it)."""
        return any(f in REQUIRED_FILES for f in self._files(self.url.prefix))

    def adapter(self, name: str) -> RemoteAdapter | None:
        """The live folder of ``name`` (None when it holds nothing) with its manifest and versions."""
        prefix = self.live_prefix(name)
        files = self._files(prefix)
        versions = tuple(self._folders(manifest.versions_root(prefix, name)))
        if not files:
            inner = self._folders(prefix)
            if inner:
                return RemoteAdapter(name, versions=versions, problem=(
                    f"{self.source.describe(prefix)} holds folder(s) {', '.join(inner[:3])} but no adapter files: "
                    "one level too deep, sidecars answer Adapter Not Found; move the files up"))
            return RemoteAdapter(name, versions=versions) if versions else None
        out = RemoteAdapter(name, files, versions=versions)
        try:
            if MANIFEST_FILE in files:
                out.manifest = Manifest.parse(self.read(prefix + MANIFEST_FILE), where=self.source.describe(prefix))
                out.rank = out.manifest.rank
            if out.rank is None and CONFIG_FILE in files:
                out.rank = int(json.loads(self.read(prefix + CONFIG_FILE))["r"])
        except AdapterInvalid as exc:
            out.problem = exc.message
        except (ValueError, KeyError, TypeError):
            out.problem = f"{self.source.describe(prefix + CONFIG_FILE)} is not a readable adapter config"
        return out

    def adapters(self) -> dict[str, RemoteAdapter]:
        """Every adapter folder under the prefix (sub-folders with a valid adapter name), read in
        parallel."""
        names = []
        for folder in self._folders(self.url.prefix):
            try:
                names.append(validate_name(folder))
            except SidecarError:
                continue  # .versions, and folders no adapter could be named after
        with ThreadPoolExecutor(_PARALLEL) as pool:
            found = list(pool.map(self.adapter, names))
        return {a.name: a for a in found if a is not None and (a.files or a.problem)}

    # --- writing ----------------------------------------------------------------------------------
    def upload_version(self, name: str, folder: Path, published: Manifest,
                       progress: Callable[[str, int], ProgressCallback]) -> int:
        """Upload the files of ``published`` to the version's own folder (skipped when that
        version is there already). Returns the bytes uploaded. ``progress(file, size)`` gives a
        callback that receives bytes transferred."""
        live = self.live_prefix(name)
        vprefix = manifest.versions_prefix(live, name, published.version)
        if MANIFEST_FILE in self._files(vprefix):
            return 0
        client = self.source.client
        total = 0
        for file_name in (WEIGHTS_FILE, CONFIG_FILE):
            size = (folder / file_name).stat().st_size
            self._call(client.upload_file, Filename=str(folder / file_name), Bucket=self.url.bucket,
                       Key=vprefix + file_name, Callback=progress(f"{name}/{file_name}", size))
            total += size
        self._call(client.put_object, Bucket=self.url.bucket, Key=vprefix + MANIFEST_FILE, Body=published.to_json(),
                   ContentType="application/json")
        return total

    def publish(self, name: str, published: Manifest, *, live_had_manifest: bool) -> None:
        """Server-side copies from the version's folder into the live folder, in the order that
        keeps a concurrent fetch from mixing versions (see the module docstring)."""
        live = self.live_prefix(name)
        vprefix = manifest.versions_prefix(live, name, published.version)
        order = [WEIGHTS_FILE, CONFIG_FILE, MANIFEST_FILE]
        if not live_had_manifest and self._files(live):
            order = [MANIFEST_FILE, WEIGHTS_FILE, CONFIG_FILE]
        client = self.source.client
        for file_name in order:
            self._call(client.copy, CopySource={"Bucket": self.url.bucket, "Key": vprefix + file_name},
                       Bucket=self.url.bucket, Key=live + file_name)

    def delete(self, name: str) -> list[str]:
        """Delete the live folder of ``name`` (its versions stay). Returns the keys deleted."""
        prefix = self.live_prefix(name)
        keys = [prefix + f for f in self._files(prefix)]
        client = self.source.client
        for start in range(0, len(keys), 1000):
            batch = keys[start:start + 1000]
            self._call(client.delete_objects, Bucket=self.url.bucket,
                       Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
        return keys
