"""Pods that share one GPU: each engine's work is slower while the other engines on its GPU are busy.

A production cluster gives every vLLM pod a GPU of its own, and so does the simulator by default.
A benchmark host with one GPU and several vLLM servers does not: the servers' CUDA contexts
time-slice the GPU, so a step takes longer whenever another server is running one (run 3 of
docs/real-gpu.md: a ``max_tokens 1`` request 249 ms while a second server streamed, 28 ms while it
was idle). ``loraroute sim cluster --pods-per-gpu N --gpu-share FILE`` models that: consecutive
groups of N pods share a GPU, and when a pod starts a step (or a load) while k other pods of its
group are busy (running requests or loading an adapter), its duration is multiplied by the
factor measured for k busy neighbours:

- ``short``: a step with prefill tokens, fewer than ``LONG_PREFILL`` of them;
- ``prefill``: a step with ``LONG_PREFILL`` prefill tokens or more;
- ``decode``: a step with decodes only;
- ``load``: an adapter load (a step's load stall, or ``/v1/load_lora_adapter``);

and one added time, not a factor: ``first_use_extra_ms`` (optional), milliseconds added to the
first step that uses an adapter after it got a GPU slot (a load or a CPU-to-GPU activation), per
number of busy neighbours. The probe found that request far slower than any other while
neighbours are busy (23 ms alone, 261 ms with one busy neighbour, on four compiled servers: the
probe's ``lora_short``), so the file's value is the probe's ``lora_short`` median at k minus the
one at 0 (computed from its ``rows`` when the file has no ``first_use_extra_ms``). Added, not
multiplied: the probe timed that request alone on its server, and a factor on a replay's
batched step (every sequence of the batch in it) would multiply much more than that request's
own time. Applying it after an activation from the CPU cache as after a load (the probe measured
a load) is this model's assumption.

The factors come from the GPU kit's sharing probe (``bench.gpu.share_probe``: medians with
0 … N-1 busy neighbours over the median with none), read from its ``share.json``; a file with
just ``{"factors": {...}}`` works too. k beyond the measured range takes the last factor. The
factor is fixed when the step starts: a neighbour that becomes busy mid-step does not slow it.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

KINDS = ("short", "prefill", "decode", "load")
LONG_PREFILL = 256   # prefill tokens from which a step counts as a long prefill (the probe: ~20 vs ~1,000)


class GpuShareError(ValueError):
    pass


@dataclass(frozen=True)
class GpuShare:
    """Slow-down factor per kind of work, indexed by the number of busy neighbours (index 0 = 1.0)."""

    factors: Mapping[str, tuple[float, ...]]
    first_use_extra_s: tuple[float, ...] = ()
    source: str = ""

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any], source: str = "") -> GpuShare:
        where = source or "gpu share"
        raw = doc.get("factors", doc)
        if not isinstance(raw, Mapping):
            raise GpuShareError(f"{where}: 'factors' must be a mapping of kind to a list")
        factors: dict[str, tuple[float, ...]] = {}
        for kind in KINDS:
            if raw.get(kind) is None:
                raise GpuShareError(f"{where}: no factors for {kind!r} (need {', '.join(KINDS)})")
            factors[kind] = _factors(raw[kind], kind, where)
        extra = doc.get("first_use_extra_ms")
        if extra is None:
            extra = _extra_from_rows(doc.get("rows") or [], "lora_short")
        elif not isinstance(extra, list) or not all(isinstance(x, (int, float)) and 0 <= x < 60_000 for x in extra):
            raise GpuShareError(f"{where}: 'first_use_extra_ms' must be a list of milliseconds >= 0")
        return cls(factors, tuple(x / 1000 for x in extra), source)

    @classmethod
    def load(cls, path: str | Path) -> GpuShare:
        try:
            doc = json.loads(Path(path).read_text())
        except OSError as e:
            raise GpuShareError(f"cannot read the gpu share file {path}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise GpuShareError(f"the gpu share file {path} is not JSON: {e}") from None
        if not isinstance(doc, Mapping):
            raise GpuShareError(f"the gpu share file {path} must hold a JSON object")
        return cls.from_doc(doc, str(path))

    def factor(self, kind: str, busy_neighbours: int) -> float:
        return _at(self.factors[kind], busy_neighbours)

    def first_use_s(self, busy_neighbours: int) -> float:
        return _at(self.first_use_extra_s, busy_neighbours) if self.first_use_extra_s else 0.0

    def step_kind(self, prefill_tokens: int) -> str:
        if prefill_tokens <= 0:
            return "decode"
        return "prefill" if prefill_tokens >= LONG_PREFILL else "short"


def _at(seq: tuple[float, ...], busy_neighbours: int) -> float:
    """The entry for ``busy_neighbours``; beyond the measured range, the last one."""
    return seq[min(max(busy_neighbours, 0), len(seq) - 1)]


def _factors(seq: Any, name: str, where: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in seq)
    except (TypeError, ValueError):
        raise GpuShareError(f"{where}: {name!r} must be a list of numbers") from None
    if not values or any(not 0 < v < 1000 for v in values):
        raise GpuShareError(f"{where}: {name!r} factors must be > 0, got {list(values)}")
    return (1.0, *values[1:])   # alone is the calibrated profile itself


def _extra_from_rows(rows: Sequence[Mapping[str, Any]], kind: str) -> list[float]:
    """Per busy-neighbour count, the median ms of ``kind`` minus its median alone (>= 0)."""
    by_k: dict[int, list[float]] = {}
    for r in rows:
        if r.get("kind") == kind and isinstance(r.get("ms"), (int, float)):
            by_k.setdefault(int(r.get("busy_neighbours", 0)), []).append(float(r["ms"]))
    if 0 not in by_k:
        return []
    alone = statistics.median(by_k[0])
    out: list[float] = []
    for k in range(max(by_k) + 1):
        out.append(max(0.0, statistics.median(by_k[k]) - alone) if k in by_k else (out[-1] if out else 0.0))
    return out


class _Busy(Protocol):
    def gpu_busy(self) -> bool: ...


@dataclass
class SharedGpu:
    """The engines on one GPU (set on each engine as ``engine.gpu``)."""

    share: GpuShare
    engines: list[_Busy] = field(default_factory=list)

    def first_use_s(self, engine: object) -> float:
        return self.share.first_use_s(self.busy_neighbours(engine))

    def busy_neighbours(self, engine: object) -> int:
        return sum(1 for e in self.engines if e is not engine and e.gpu_busy())

    def factor(self, engine: object, kind: str) -> float:
        return self.share.factor(kind, self.busy_neighbours(engine))


def group(engines: Sequence[Any], pods_per_gpu: int, share: GpuShare) -> list[SharedGpu]:
    """Consecutive groups of ``pods_per_gpu`` engines on one GPU each; sets ``engine.gpu``."""
    if pods_per_gpu < 1:
        raise GpuShareError("--pods-per-gpu must be >= 1")
    gpus = []
    for start in range(0, len(engines), pods_per_gpu):
        gpu = SharedGpu(share, list(engines[start:start + pods_per_gpu]))
        for e in gpu.engines:
            e.gpu = gpu
        gpus.append(gpu)
    return gpus
