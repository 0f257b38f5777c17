"""A small production-shaped installation on loopback for the adapter-operations tests: simulated
vLLM pods, one sidecar each (adapters from a moto S3 bucket, state through Redis), gateway
replicas sharing that Redis, and named admin keys with roles.

``OpsStack.start(root, s3_endpoint, redis_url, ...)`` starts everything and waits until every
replica routes to every pod; ``stop()`` stops it. Keys: ``admin-key`` (every role), ``alice-key``
(operator), ``bob-key`` (approver), ``carol-key`` (viewer).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import httpx
import yaml

from loraroute.procs import Proc, ProcRegistry, free_port, http_ready, loraroute_cmd

BASE = "tsuzumi-base"
KEYS = {"admin": "admin-key", "alice": "alice-key", "bob": "bob-key", "carol": "carol-key"}


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def gateway_config(port: int, redis_url: str, prefix: str, adapters: list[Any], two_person: list[str]) -> dict[str, Any]:
    return {
        "server": {"port": port, "reload_poll_s": 0},
        "bases": [{"name": BASE, "adapters": adapters}],
        "admin": {"api_key_sha256": [digest(KEYS["admin"])], "keys": [
            {"name": "alice", "roles": ["operator"], "api_key_sha256": [digest(KEYS["alice"])]},
            {"name": "bob", "roles": ["approver"], "api_key_sha256": [digest(KEYS["bob"])]},
            {"name": "carol", "roles": ["viewer"], "api_key_sha256": [digest(KEYS["carol"])]},
        ]},
        "store": {"url": redis_url, "key_prefix": prefix},
        "discovery": {"monitor": "never"},
        "changes": {"two_person": two_person, "sync_s": 0.2, "sidecar_timeout_s": 30},
        "pipeline": {"preset": "default", "filters": [{"type": "healthy-fresh", "parameters": {"max_age_s": 5.0}},
                                                      "serves-base", "rank-fits"]},
    }


@dataclass
class OpsStack:
    root: Path
    s3_endpoint: str
    bucket: str
    redis_url: str
    prefix: str
    procs: ProcRegistry
    sims: list[Proc] = field(default_factory=list)
    sidecars: list[Proc] = field(default_factory=list)
    gateways: list[Proc] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.gateways[0].url

    @property
    def s3_url(self) -> str:
        return f"s3://{self.bucket}/adapters/"

    def adapter_dir(self, i: int) -> Path:
        return self.root / f"pod-{i}" / "adapters"

    @classmethod
    def start(cls, root: Path, s3_endpoint: str, redis_url: str, *, pods: int = 2, replicas: int = 2,
              adapters: list[Any] | None = None, two_person: list[str] | None = None,
              prefix: str = "ops") -> OpsStack:
        bucket = f"ops-{os.getpid()}-{int(time.time() * 1000) % 100000}"
        boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
        stack = cls(root, s3_endpoint, bucket, redis_url, prefix, ProcRegistry(root / "logs"))
        try:
            for i in range(pods):
                stack.adapter_dir(i).mkdir(parents=True)
                port = free_port()
                stack.sims.append(stack.procs.start(f"sim-{i}", loraroute_cmd(
                    "sim", "--port", str(port), "--pod-name", f"pod-{i}", "--model", BASE, "--enable-lora",
                    "--max-loras", "2", "--max-cpu-loras", "3", "--max-lora-rank", "16",
                    "--allow-runtime-lora-updating", "--adapter-dir", str(stack.adapter_dir(i)),
                    "--time-scale", "0.05"), port=port, ready_url=f"http://127.0.0.1:{port}/health", timeout=60))
            for i, sim in enumerate(stack.sims):
                port = free_port()
                stack.sidecars.append(stack.procs.start(f"sidecar-{i}", loraroute_cmd(
                    "sidecar", "--pod-id", f"pod-{i}", "--port", str(port), "--vllm-url", sim.url,
                    "--adapter-dir", str(stack.adapter_dir(i)), "--source-type", "s3",
                    "--s3-endpoint-url", s3_endpoint, "--s3-bucket", bucket, "--s3-layout", "adapters/{adapter}/",
                    "--store-url", redis_url, "--key-prefix", prefix, "--base-model", BASE,
                    "--served-model-name", BASE, "--max-lora-rank", "16", "--max-loras", "2",
                    "--max-cpu-loras", "3", "--ttl-s", "5", "--heartbeat-s", "0.5"),
                    port=port, ready_url=f"http://127.0.0.1:{port}/healthz", timeout=60))
            for i in range(replicas):
                port = free_port()
                cfg = gateway_config(port, redis_url, prefix, adapters or [], two_person or [])
                path = root / f"gateway-{i}.yaml"
                path.write_text(yaml.safe_dump(cfg))
                stack.gateways.append(stack.procs.start(f"gateway-{i}", loraroute_cmd("gateway", "--config", str(path)),
                                                        port=port, ready=lambda p=port: http_ready(
                                                            f"http://127.0.0.1:{p}/ready"), timeout=60))
            stack.wait_routable(pods)
        except BaseException:
            stack.stop()
            raise
        return stack

    def wait_routable(self, pods: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for gw in self.gateways:
            while True:
                r = httpx.get(gw.url + "/ready", timeout=5)
                if r.status_code == 200 and r.json()["healthy_pods"] == pods:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{gw.name} routes to {r.text} after {timeout}s")
                time.sleep(0.1)

    def stop(self) -> None:
        self.procs.stop_all()

    def env(self, key: str = "admin", gateway: int = 0) -> dict[str, str]:
        """Environment for a `loraroute adapters|changes|doctor` run against this stack."""
        return {**os.environ, "LORAROUTE_GATEWAY": self.gateways[gateway].url, "LORAROUTE_ADMIN_KEY": KEYS[key]}

    def admin(self, key: str = "admin", gateway: int = 0) -> httpx.Client:
        return httpx.Client(base_url=self.gateways[gateway].url, timeout=60,
                            headers={"Authorization": f"Bearer {KEYS[key]}"})
