"""Parse what a vLLM pod says about itself: ``/metrics`` text and ``/v1/models`` JSON.

Pure functions from text/JSON to plain dataclasses; no I/O. Tolerant of the differences between
vLLM versions (see the shared vLLM reference):

- KV usage: ``vllm:kv_cache_usage_perc`` (>= 0.9.2) or the older ``vllm:gpu_cache_usage_perc``.
- Prefix cache: ``vllm:prefix_cache_{queries,hits}_total`` or the older
  ``vllm:gpu_prefix_cache_{queries,hits}[_total]``; counted in tokens.
- ``vllm:lora_requests_info``: one series per label combination, stale series stay; the series
  with the **largest value** (a Unix timestamp) is the current one. Its lists are comma-joined
  adapter names; since 0.11 running and waiting carry the same list.
- ``vllm:cache_config_info``: label sets differ between versions, so ``block_size`` and
  ``num_gpu_blocks`` are looked up by name and the string ``"None"`` means unknown.
- ``vllm:lora_adapter_loaded{adapter_name,level="gpu"|"cpu",...}`` (proposed upstream, emitted
  by the simulator on request): exact residency; a value > 0 means loaded. When the value is
  larger than 1 it is read as a last-used timestamp and orders the tier (LRU first).

Gauges summed over engines (``engine`` label): running, waiting, deferred, prefix counters;
``kv_cache_usage`` is the mean over engines.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import orjson


class MetricsParseError(ValueError):
    """The text is not Prometheus exposition format, or the JSON is not a model list."""


@dataclass(frozen=True, slots=True)
class LoraRequestsInfo:
    """The current ``vllm:lora_requests_info`` series (largest timestamp wins)."""

    running: tuple[str, ...]
    waiting: tuple[str, ...]
    max_lora: int | None
    timestamp: float


@dataclass(frozen=True, slots=True)
class VllmMetrics:
    """The parts of vLLM's ``/metrics`` the router uses. ``None`` means "not exposed"."""

    num_running: int = 0
    num_waiting: int = 0
    num_deferred: int = 0
    kv_cache_usage: float | None = None
    prefix_cache_queries: float = 0.0
    prefix_cache_hits: float = 0.0
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    lora: LoraRequestsInfo | None = None
    #: every lora_requests_info series (with ``lora_since``: only the newer ones and the current
    #: one), oldest timestamp first; those newer than the previous scrape's newest are the
    #: in-flight sets seen since then, even short-lived ones
    lora_history: tuple[LoraRequestsInfo, ...] = ()
    # exact residency (lora_adapter_loaded); None when the series is absent
    exact_gpu: tuple[str, ...] | None = None
    exact_cpu: tuple[str, ...] | None = None
    exact_ranks: dict[str, int] = field(default_factory=dict)
    model_names: tuple[str, ...] = ()
    process_start_time: float | None = None


@dataclass(frozen=True, slots=True)
class VllmModels:
    """``/v1/models``: base model ids and adapter id -> root (the path it was loaded from)."""

    base_models: tuple[str, ...]
    adapters: dict[str, str]


def _split_names(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    return tuple(n for n in (part.strip() for part in value.split(",")) if n)


def _int_label(value: str | None) -> int | None:
    if value is None or value in ("", "None", "none", "null"):
        return None
    try:
        return int(float(value))
    except ValueError:
        return None


#: metric-name prefixes this module reads; other lines are skipped without being parsed (vLLM's
#: /metrics is ~700 lines of histograms, and a sidecar scrapes it 20 times a second)
WANTED = (
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc", "vllm:prefix_cache_queries", "vllm:prefix_cache_hits",
    "vllm:gpu_prefix_cache_queries", "vllm:gpu_prefix_cache_hits", "vllm:lora_requests_info",
    "vllm:cache_config_info", "vllm:lora_adapter_loaded", "process_start_time_seconds",
)
LORA_INFO = "vllm:lora_requests_info"
# name, optional {labels}, value, optional integer timestamp (exposition format 0.0.4)
_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?[ \t]+(\S+)(?:[ \t]+-?[0-9]+)?[ \t]*\r?")
_LABEL = re.compile(r'[ \t]*([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\]|\\.)*)"[ \t]*(,|$)')
_ESCAPES = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}
_ESCAPE = re.compile(r'\\[\\"n]')


def _labels(body: str, line: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    pos, end = 0, len(body)
    while pos < end:
        m = _LABEL.match(body, pos)
        if m is None:
            if not body[pos:].strip(" \t"):
                break
            raise MetricsParseError(f"not Prometheus text format: bad labels in {line[:120]!r}")
        value = m.group(2)
        if "\\" in value:
            value = _ESCAPE.sub(lambda e: _ESCAPES[e.group(0)], value)
        labels[m.group(1)] = value
        pos = m.end()
        if not m.group(3):
            break
    return labels


def _wanted_lines(text: str) -> list[str]:
    """The lines that start with a ``WANTED`` name, in text order (``str.find`` per name: a few
    memchr-speed scans of the ~70 kB page instead of a per-line or per-character test)."""
    padded = "\n" + text
    find = padded.find
    found: dict[int, str] = {}
    for name in WANTED:
        key = "\n" + name
        i = find(key)
        while i >= 0:
            j = find("\n", i + 1)
            found[i] = padded[i + 1:] if j < 0 else padded[i + 1:j]
            if j < 0:
                break
            i = find(key, j)
    return [found[i] for i in sorted(found)]


def wanted_samples(text: str, lora_since: float | None = None) -> list[tuple[str, dict[str, str], float]]:
    r"""(name, labels, value) of every sample line of the ``WANTED`` families.

    A hand-written reader of the exposition format's sample lines (name, ``{k="v",...}`` with
    ``\\``, ``\"`` and ``\n`` escapes, a float value incl. NaN/±Inf, an optional timestamp):
    ~10× cheaper than a general parser, and only the wanted lines are looked at. Raises
    ``MetricsParseError`` on a wanted line that does not have that shape.

    ``lora_since``: read the labels of only those ``vllm:lora_requests_info`` series whose value
    (a Unix time) is newer, plus the newest one; vLLM keeps every stale label combination, so a
    busy multi-adapter pod lists hundreds of them and all but a few are old news. Samples come in
    text order, except that those series come last when ``lora_since`` is given.
    """
    out: list[tuple[str, dict[str, str], float]] = []
    deferred: list[tuple[str | None, float, str]] = []  # lora_requests_info: (labels text, value, line)
    for line in _wanted_lines(text):
        m = _SAMPLE.fullmatch(line)
        if m is None:
            raise MetricsParseError(f"not Prometheus text format: {line[:120]!r}")
        name, body = m.group(1), m.group(2)
        try:
            value = float(m.group(3))
        except ValueError:
            raise MetricsParseError(f"not Prometheus text format: bad value in {line[:120]!r}") from None
        if lora_since is not None and name == LORA_INFO:
            deferred.append((body, value, line))
            continue
        out.append((name, _labels(body, line) if body else {}, value))
    if deferred:
        newest = max(v for _, v, _ in deferred)
        out.extend((LORA_INFO, _labels(b, ln) if b else {}, v) for b, v, ln in deferred if v > lora_since or v == newest)
    return out


def parse_metrics(text: str, lora_since: float | None = None) -> VllmMetrics:
    """Parse vLLM's Prometheus text into ``VllmMetrics`` (only the ``WANTED`` families are read).

    ``lora_since``: the newest ``lora_requests_info`` timestamp the caller has already seen;
    ``lora_history`` then holds only the series newer than it (and the current one).
    Raises ``MetricsParseError`` when the text holds no vLLM series or a malformed one.
    """
    samples = wanted_samples(text, lora_since)
    if not any(name.startswith("vllm:") for name, _, _ in samples):
        raise MetricsParseError("no vllm:* series in /metrics: is this a vLLM server (and its metrics port)?")

    sums: dict[str, float] = defaultdict(float)
    seen: set[str] = set()
    kv_values: dict[str, list[float]] = defaultdict(list)
    lora_best: LoraRequestsInfo | None = None
    lora_all: list[LoraRequestsInfo] = []
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    exact: dict[str, list[tuple[float, str]]] = {"gpu": [], "cpu": []}
    exact_seen = False
    exact_ranks: dict[str, int] = {}
    model_names: set[str] = set()
    start_time: float | None = None

    for name, labels, value in samples:
        if "model_name" in labels:
            model_names.add(labels["model_name"])
        if name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
            sums[name] += value
            seen.add(name)
        elif name == "vllm:num_requests_waiting_by_reason":
            if labels.get("reason") == "deferred":
                sums["deferred"] += value
        elif name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
            kv_values[name].append(value)
        elif name in (
            "vllm:prefix_cache_queries_total",
            "vllm:prefix_cache_hits_total",
            "vllm:gpu_prefix_cache_queries_total",
            "vllm:gpu_prefix_cache_hits_total",
            "vllm:gpu_prefix_cache_queries",
            "vllm:gpu_prefix_cache_hits",
        ):
            key = name.removesuffix("_total").replace("vllm:gpu_", "vllm:old_")
            sums[key] += value
            seen.add(key)
        elif name == "vllm:lora_requests_info":
            info = LoraRequestsInfo(
                running=_split_names(labels.get("running_lora_adapters")),
                waiting=_split_names(labels.get("waiting_lora_adapters")),
                max_lora=_int_label(labels.get("max_lora")),
                timestamp=value,
            )
            lora_all.append(info)
            if lora_best is None or info.timestamp >= lora_best.timestamp:
                lora_best = info
        elif name == "vllm:cache_config_info":
            block_size = _int_label(labels.get("block_size")) or block_size
            num_gpu_blocks = _int_label(labels.get("num_gpu_blocks")) or num_gpu_blocks
        elif name == "vllm:lora_adapter_loaded":
            exact_seen = True
            adapter = labels.get("adapter_name") or labels.get("lora_name")
            level = (labels.get("level") or "gpu").lower()
            if adapter and value > 0 and level in exact:
                exact[level].append((value, adapter))
            rank = _int_label(labels.get("rank"))
            if adapter and rank:
                exact_ranks[adapter] = rank
        elif name == "process_start_time_seconds":
            start_time = value

    def ordered(entries: list[tuple[float, str]]) -> tuple[str, ...]:
        # value is 1 (plain flag) or a last-used timestamp: sort ascending = LRU first
        return tuple(name for _, name in sorted(entries, key=lambda e: (e[0], e[1])))

    kv_list = kv_values.get("vllm:kv_cache_usage_perc") or kv_values.get("vllm:gpu_cache_usage_perc")
    new_prefix = "vllm:prefix_cache_queries" in seen or "vllm:prefix_cache_hits" in seen
    return VllmMetrics(
        num_running=int(sums["vllm:num_requests_running"]),
        num_waiting=int(sums["vllm:num_requests_waiting"]),
        num_deferred=int(sums["deferred"]),
        kv_cache_usage=(sum(kv_list) / len(kv_list)) if kv_list else None,
        prefix_cache_queries=sums["vllm:prefix_cache_queries" if new_prefix else "vllm:old_prefix_cache_queries"],
        prefix_cache_hits=sums["vllm:prefix_cache_hits" if new_prefix else "vllm:old_prefix_cache_hits"],
        block_size=block_size,
        num_gpu_blocks=num_gpu_blocks,
        lora=lora_best,
        lora_history=tuple(sorted(lora_all, key=lambda i: i.timestamp)),
        exact_gpu=ordered(exact["gpu"]) if exact_seen else None,
        exact_cpu=ordered(exact["cpu"]) if exact_seen else None,
        exact_ranks=exact_ranks,
        model_names=tuple(sorted(model_names)),
        process_start_time=start_time,
    )


def parse_models(payload: str | bytes | dict[str, Any]) -> VllmModels:
    """Parse ``/v1/models``: cards with a ``parent`` are adapters, the others base models.

    Old servers without ``parent``: a card whose ``root`` differs from its ``id`` and that is not
    the first card is still a base model (we cannot tell), so only ``parent`` marks adapters.
    """
    try:
        data = orjson.loads(payload) if isinstance(payload, (str, bytes)) else payload
        cards = data["data"]
        if not isinstance(cards, list):
            raise TypeError("'data' is not a list")
    except (ValueError, KeyError, TypeError) as exc:
        raise MetricsParseError(f"not a /v1/models list: {exc}") from None
    bases: list[str] = []
    adapters: dict[str, str] = {}
    for card in cards:
        if not isinstance(card, dict) or "id" not in card:
            continue
        if card.get("parent"):
            adapters[str(card["id"])] = str(card.get("root") or "")
        else:
            bases.append(str(card["id"]))
    return VllmModels(base_models=tuple(bases), adapters=adapters)
