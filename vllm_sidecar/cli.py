"""`loraroute sidecar`: run the sidecar beside one vLLM pod.

Settings come from ``--config FILE`` (YAML, strict), then ``LORAROUTE_SIDECAR_*`` environment
variables, then flags (highest). ``--set dotted.key=value`` reaches any key without a flag.
``--check-config`` validates and prints the effective settings, then exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from typing import Any

import yaml

from vllm_sidecar.settings import SettingsError, SidecarSettings, control_token, load_settings

# flag -> dotted settings key
_FLAGS: dict[str, tuple[str, type, str]] = {
    "--pod-id": ("pod_id", str, "the pod's id in PodState"),
    "--vllm-url": ("vllm_url", str, "where this sidecar reaches vLLM"),
    "--advertise-url": ("advertise_url", str, "the vLLM URL published for the gateway"),
    "--sidecar-url": ("sidecar_url", str, "this sidecar's URL published for the gateway"),
    "--host": ("listen.host", str, "listen address (default 127.0.0.1)"),
    "--port": ("listen.port", int, "listen port (default 8081; 0 picks a free one)"),
    "--store-url": ("store.url", str, "memory:// or redis://host:port/db"),
    "--key-prefix": ("store.key_prefix", str, "Redis key prefix (default loraroute)"),
    "--base-model": ("base_model", str, "vLLM's --model (adapters must name it)"),
    "--served-model-name": ("served_model_name", str, "vLLM's --served-model-name"),
    "--max-lora-rank": ("max_lora_rank", int, "vLLM's --max-lora-rank (default 16)"),
    "--max-loras": ("max_loras", int, "vLLM's --max-loras"),
    "--max-cpu-loras": ("max_cpu_loras", int, "vLLM's --max-cpu-loras"),
    "--adapter-dir": ("adapter_dir", str, "local adapter folder (VLLM_LORA_RESOLVER_CACHE_DIR)"),
    "--vllm-adapter-dir": ("vllm_adapter_dir", str, "the same folder as vLLM sees it"),
    "--disk-budget-bytes": ("disk_budget_bytes", int, "LRU-evict unused adapters beyond this"),
    "--max-adapter-bytes": ("max_adapter_bytes", int, "refuse bigger adapters"),
    "--poll-interval-s": ("poll_interval_s", float, "vLLM poll interval (default 0.05)"),
    "--ttl-s": ("ttl_s", float, "PodState TTL in the store (default 3)"),
    "--heartbeat-s": ("heartbeat_s", float, "heartbeat interval (default 1)"),
    "--source-type": ("source.type", str, "local or s3"),
    "--source-path": ("source.local.path", str, "local source folder"),
    "--local-layout": ("source.local.layout", str, "key layout in the local source"),
    "--s3-endpoint-url": ("source.s3.endpoint_url", str, "S3 / MinIO endpoint URL"),
    "--s3-bucket": ("source.s3.bucket", str, "bucket"),
    "--s3-layout": ("source.s3.layout", str, "key layout, e.g. adapters/{adapter}/"),
    "--s3-region": ("source.s3.region", str, "region"),
    "--ca-bundle": ("source.s3.ca_bundle", str, "PEM CA bundle for S3 over TLS"),
    "--log-level": ("log_level", str, "debug, info, warning, error"),
    "--kv-events-endpoint": ("kv_events.endpoint", str, "the pod's KV-event PUB socket, e.g. tcp://127.0.0.1:5557"),
    "--kv-events-replay-endpoint": ("kv_events.replay_endpoint", str, "the pod's KV-event replay socket"),
    "--kv-events-topic": ("kv_events.topic", str, "the pod's KV-event topic (default empty)"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraroute sidecar", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML settings file (see docs/sidecar.md)")
    for flag, (key, typ, help_) in _FLAGS.items():
        p.add_argument(flag, dest=key.replace(".", "__"), type=typ, default=None, help=help_)
    p.add_argument("--no-verify-tls", action="store_true", help="do not verify S3 TLS certificates (testing only)")
    p.add_argument("--load-on-ensure", dest="load_on_ensure", action="store_true", default=None)
    p.add_argument("--no-load-on-ensure", dest="load_on_ensure", action="store_false")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any settings key, dotted (e.g. source.s3.max_attempts=3); value read as YAML")
    p.add_argument("--check-config", action="store_true", help="validate, print the effective settings, exit")
    return p


def settings_from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> SidecarSettings:
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SettingsError(f"--set {item!r}: use KEY=VALUE, e.g. --set source.s3.bucket=adapters")
        overrides[key.strip()] = yaml.safe_load(value) if value else None
    for flag, (key, _typ, _help) in _FLAGS.items():
        value = getattr(args, key.replace(".", "__"))
        if value is not None:
            overrides[key] = value
    if args.no_verify_tls:
        overrides["source.s3.verify_tls"] = False
    if args.load_on_ensure is not None:
        overrides["load_on_ensure"] = args.load_on_ensure
    return load_settings(args.config, env=os.environ if env is None else env, overrides=overrides)


async def serve(settings: SidecarSettings, ready: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT."""
    from aiohttp import web

    from vllm_sidecar.app import create_app
    from vllm_sidecar.service import Sidecar

    token = control_token(settings)
    sidecar = await Sidecar.open(settings)
    runner = web.AppRunner(create_app(sidecar, token), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.listen.host, settings.listen.port)
    await site.start()
    logging.getLogger("loraroute.sidecar").info("sidecar listening on %s:%d", settings.listen.host,
                                                settings.listen.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await sidecar.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        control_token(settings)  # a named but empty token variable is an error now, not an open API
    except SettingsError as exc:
        print(f"loraroute sidecar: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(json.dumps(settings.redacted(), indent=2, sort_keys=True))
        return 0
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        asyncio.run(serve(settings))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
