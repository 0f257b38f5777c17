"""CPU time of benchmark processes (and their children), read from Linux ``/proc``.

``CpuMeter({"gateway": pid, ...})`` snapshots user+system CPU seconds of each named process tree
at ``start()`` and ``stop()``; ``stop()`` returns, per name, ``cpu_s`` and ``cpu_pct`` =
100 × cpu_s / wall_s (100 % = one core busy for the whole window). ``machine`` is the whole
machine's busy share over the same window (all processes, everyone's), in % of all cores, with
the core count — the headroom the measurements had.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # fields[0] is state (field 3); utime, stime are fields 14, 15 → indexes 11, 12
    return (int(fields[11]) + int(fields[12])) / _TICK


def tree_cpu_seconds(pid: int, kids: dict[int, list[int]] | None = None) -> float:
    """CPU seconds of ``pid`` and every live descendant."""
    kids = kids if kids is not None else _children_map()
    total, stack, seen = 0.0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        total += _cpu_seconds(p)
        stack.extend(kids.get(p, ()))
    return total


def _machine_times() -> tuple[float, float]:
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    vals = [float(x) for x in parts]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0.0)
    return sum(vals), idle


class CpuMeter:
    def __init__(self, pids: dict[str, int], own_only: set[str] | frozenset[str] = frozenset()) -> None:
        """``own_only``: names measured without their children (e.g. the client, whose children
        are the other measured processes)."""
        self.pids = dict(pids)
        self.own_only = set(own_only)
        self._t0 = 0.0
        self._cpu0: dict[str, float] = {}
        self._m0 = (0.0, 0.0)

    def start(self) -> None:
        kids = _children_map()
        self._cpu0 = {n: self._cpu(n, p, kids) for n, p in self.pids.items()}
        self._m0 = _machine_times()
        self._t0 = time.monotonic()

    def _cpu(self, name: str, pid: int, kids: dict[int, list[int]]) -> float:
        return _cpu_seconds(pid) if name in self.own_only else tree_cpu_seconds(pid, kids)

    def stop(self) -> dict[str, dict[str, float]]:
        wall = max(1e-9, time.monotonic() - self._t0)
        kids = _children_map()
        out: dict[str, dict[str, float]] = {}
        for name, pid in self.pids.items():
            cpu = max(0.0, self._cpu(name, pid, kids) - self._cpu0.get(name, 0.0))
            out[name] = {"cpu_s": round(cpu, 3), "cpu_pct": round(100 * cpu / wall, 1)}
        total1, idle1 = _machine_times()
        dt, di = total1 - self._m0[0], idle1 - self._m0[1]
        out["machine"] = {
            "busy_pct": round(100 * (dt - di) / dt, 1) if dt > 0 else 0.0,
            "cores": float(os.cpu_count() or 1),
            "wall_s": round(wall, 3),
        }
        return out
