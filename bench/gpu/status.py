"""The driver's status file, its progress lines, and packing a run's results for copying back.

Standard library only (``host status``, ``host wait`` and ``host pack`` run beside a detached
driver with nothing else imported).

``<work>/status.json``::

    {"state": "running" | "done" | "failed" | "stopped", "phase": "replay default",
     "started_at": "...Z", "updated_at": "...Z", "pid": 1234, "budget_s": 900, "error": null,
     "phases": [{"name": "servers", "started_s": 12.0, "ended_s": 240.1, "ok": true, "note": "..."}]}

``<work>/driver.log`` holds every progress line (``[+SSS.Ss] phase: message``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.gpu import parts

STATUS = "status.json"
LOG = "driver.log"
FINAL = ("done", "failed", "stopped")


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class PhaseRecord:
    name: str
    started_s: float
    ended_s: float | None = None
    ok: bool | None = None
    note: str = ""


@dataclass
class Status:
    work: Path
    budget_s: float | None = None
    state: str = "running"
    phase: str = ""
    error: str | None = None
    started_at: str = field(default_factory=utc_now)
    phases: list[PhaseRecord] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def remaining(self) -> float:
        return float("inf") if self.budget_s is None else self.budget_s - self.elapsed()

    def say(self, message: str) -> None:
        """One progress line, on stdout (the log file in detached mode)."""
        print(f"[+{self.elapsed():6.1f}s] {self.phase or 'driver'}: {message}", flush=True)

    def begin(self, name: str) -> None:
        self.phase = name
        self.phases.append(PhaseRecord(name, round(self.elapsed(), 1)))
        self.write()

    def end(self, ok: bool, note: str = "") -> None:
        rec = self.phases[-1]
        rec.ended_s, rec.ok, rec.note = round(self.elapsed(), 1), ok, note
        self.write()

    def finish(self, state: str, error: str | None = None) -> None:
        self.state, self.error, self.phase = state, error, ""
        self.write()

    def write(self) -> None:
        doc = {"state": self.state, "phase": self.phase, "started_at": self.started_at, "updated_at": utc_now(),
               "elapsed_s": round(self.elapsed(), 1), "pid": os.getpid(), "budget_s": self.budget_s,
               "error": self.error, "phases": [asdict(p) for p in self.phases]}
        tmp = self.work / (STATUS + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(self.work / STATUS)


def read_status(work: Path) -> dict[str, Any] | None:
    try:
        return json.loads((work / STATUS).read_text())
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(work: Path, log_lines: int = 12) -> tuple[str, str]:
    """(state, text) of a run: the status and the last lines of its log. A ``running`` status whose
    process is gone reads ``failed`` (the driver was killed)."""
    st = read_status(work)
    if st is None:
        return "missing", f"no {STATUS} in {work} (has the driver started?)"
    state = st.get("state", "?")
    if state == "running" and st.get("pid") and not _pid_alive(int(st["pid"])):
        state = "failed"
        st["error"] = st.get("error") or "the driver process is gone (killed?)"
    lines = [f"state {state}; phase {st.get('phase') or '-'}; {st.get('elapsed_s')}s elapsed"
             + (f" of {st['budget_s']}s" if st.get("budget_s") else "")]
    for p in st.get("phases", []):
        mark = "…" if p.get("ok") is None else ("ok" if p["ok"] else "FAILED")
        dur = "" if p.get("ended_s") is None else f" {p['ended_s'] - p['started_s']:.0f}s"
        lines.append(f"  {p['name']:<22} {mark}{dur} {p.get('note') or ''}".rstrip())
    if st.get("error"):
        lines.append(f"error: {st['error']}")
    try:
        tail = (work / LOG).read_text(errors="replace").splitlines()[-log_lines:]
    except OSError:
        tail = []
    return state, "\n".join(lines + ["--- last log lines ---", *tail])


def wait(work: Path, max_s: float, poll_s: float = 5.0, out: Any = sys.stdout) -> str:
    """Print new log lines until the run ends or ``max_s`` passes; returns the state."""
    deadline = time.monotonic() + max_s
    pos = 0
    state = "missing"
    while True:
        try:
            with open(work / LOG, errors="replace") as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            if chunk:
                out.write(chunk)
                out.flush()
        except OSError:
            pass
        state, _ = describe(work, 0)
        if state in FINAL or time.monotonic() >= deadline:
            return state
        time.sleep(poll_s)


def _tail_copy(src: Path, dst: Path, max_bytes: int) -> None:
    size = src.stat().st_size
    with open(src, "rb") as f, open(dst, "wb") as out:
        if size > max_bytes:
            f.seek(size - max_bytes)
            out.write(f"[... first {size - max_bytes} bytes cut ...]\n".encode())
        shutil.copyfileobj(f, out)


def pack(work: Path, out_dir: Path, max_files: int = 8, max_file_mib: float = 16.0,
         log_bytes: int = 4 * parts.MIB) -> parts.Manifest:
    """``<work>/results`` plus the status, the driver log and the tail of every process log (servers,
    Redis, sidecars, routers), as
    ``results.tar.xz`` split into at most ``max_files - 1`` parts of ``max_file_mib`` with a
    manifest (``max_files`` files in all). Logs are cut to smaller tails until it fits."""
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = work / "pack"
    limit = int(max_file_mib * parts.MIB)
    while True:
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "logs").mkdir(parents=True)
        if (work / "results").is_dir():
            shutil.copytree(work / "results", staging / "results")
        for name in (STATUS, LOG):
            if (work / name).is_file():
                _tail_copy(work / name, staging / name, log_bytes)
        for folder in (work / "logs", work / "stack" / "logs"):   # servers; Redis, sidecars, routers
            for log in sorted(folder.glob("*.log")) if folder.is_dir() else []:
                _tail_copy(log, staging / "logs" / log.name, log_bytes)
        archive = work / "results.tar.xz"
        with tarfile.open(archive, "w:xz", preset=6) as tar:
            for path in sorted(staging.iterdir()):
                tar.add(path, arcname=path.name)
        if archive.stat().st_size <= (max_files - 1) * limit or log_bytes < 64 * 1024:
            break
        log_bytes //= 4
    for old in out_dir.iterdir():
        if old.name.startswith("results.tar.xz.") or old.name == parts.MANIFEST:
            old.unlink()
    manifest = parts.split(archive, out_dir, limit, {"work": str(work), "packed_at": utc_now(),
                                                    "log_tail_bytes": log_bytes})
    if len(manifest.parts) > max_files - 1:
        raise RuntimeError(f"results need {len(manifest.parts)} parts of {max_file_mib} MiB; "
                           f"more than {max_files - 1}: remove something from {work / 'results'}")
    shutil.rmtree(staging, ignore_errors=True)
    return manifest
