"""One checklist line of ``loraroute doctor`` and how a list of them is printed."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Status = Literal["PASS", "WARN", "FAIL", "SKIP"]


@dataclass(frozen=True, slots=True)
class Check:
    section: str
    name: str
    status: Status
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summary(checks: list[Check]) -> dict[str, int]:
    return {s: sum(1 for c in checks if c.status == s) for s in ("PASS", "WARN", "FAIL", "SKIP")}


def lines(title: str, checks: list[Check]) -> list[str]:
    out = [title]
    section = None
    for c in checks:
        if c.section != section:
            section = c.section
            out.append(section)
        out.append(f"  {c.status:<4}  {c.name:<42} {c.detail}")
        if c.fix and c.status in ("WARN", "FAIL"):
            out.append(f"        fix: {c.fix}")
    counts = summary(checks)
    out.append(f"{len(checks)} checks: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return out
