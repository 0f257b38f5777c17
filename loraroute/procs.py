"""Run real processes on free loopback ports and wait until they answer.

Used by the tests, the benchmark runner and the demo. Every wait is bounded; a process that
exits or never gets ready raises ``ProcessStartError`` with the tail of its output.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class ProcessStartError(RuntimeError):
    pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (held open together while choosing, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def consecutive_free_ports(n: int, start: int = 20000, stop: int = 60000) -> int:
    """First port of ``n`` consecutive free ports (for ``loraroute sim cluster --base-port``)."""
    port = start + (os.getpid() * 37) % 10000
    while port + n < stop:
        ok = True
        for p in range(port, port + n):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    port = p + 1
                    break
        if ok:
            return port
    raise ProcessStartError(f"no {n} consecutive free ports between {start} and {stop}")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def http_ready(url: str, timeout: float = 0.5) -> bool:
    """True when ``url`` answers with a status below 500."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback only
            return resp.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except (OSError, ValueError):
        return False


@dataclass
class Proc:
    """A child process whose output goes to a log file (read back when it fails)."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    port: int | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, max_bytes: int = 4000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-max_bytes:].decode("utf-8", "replace")

    def stop(self, timeout: float = 5.0, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)

    def kill(self) -> None:
        self.stop(timeout=5.0, sig=signal.SIGKILL)


def start_process(
    name: str,
    argv: Sequence[str],
    *,
    port: int | None = None,
    ready: Callable[[], bool] | None = None,
    ready_url: str | None = None,
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
    log_dir: Path | None = None,
    cwd: str | None = None,
) -> Proc:
    """Start ``argv`` and wait until ``ready()`` (or ``ready_url`` answers, or ``port`` accepts)."""
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="loraroute-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        full_env.update(env)
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(  # noqa: S603 - argv built by our own code
            list(argv), stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=cwd,
            start_new_session=True,
        )
    proc = Proc(name=name, popen=popen, log_path=log_path, port=port)
    if ready is None:
        if ready_url is not None:
            ready = lambda: http_ready(ready_url)  # noqa: E731
        elif port is not None:
            ready = lambda: port_open(port)  # noqa: E731
        else:
            return proc
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise ProcessStartError(f"{name} exited with {popen.returncode}:\n{proc.log_tail()}")
        if ready():
            return proc
        time.sleep(0.05)
    proc.kill()
    raise ProcessStartError(f"{name} not ready after {timeout:.0f}s:\n{proc.log_tail()}")


def python_module(module: str, *args: str) -> list[str]:
    """argv running ``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def loraroute_cmd(*args: str) -> list[str]:
    """argv running ``loraroute args`` with this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "loraroute.cli", *args]


class ProcRegistry:
    """Processes to stop together: ``start`` (``start_process`` with a default log folder) or
    ``adopt`` an already started one; ``stop_all`` stops them newest first."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[Proc] = []

    def start(self, name: str, argv: list[str], **kwargs: object) -> Proc:
        kwargs.setdefault("log_dir", self.log_dir)
        return self.adopt(start_process(name, argv, **kwargs))  # type: ignore[arg-type]

    def adopt(self, proc: Proc) -> Proc:
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.stop()
