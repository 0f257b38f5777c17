"""Counters and histograms the engine keeps, rendered by ``metrics.py`` (vLLM 0.33 buckets)."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import OrderedDict

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
REQUEST_TIME_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                        120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
                 20000.0, 50000.0, 100000.0)
ITERATION_BUCKETS = (1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
                     16384.0)
N_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0)
PREEMPTION_BUCKETS = (1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0)


def token_buckets(max_model_len: int) -> tuple[float, ...]:
    """vLLM's 1-2-5 series up to max_model_len."""
    out = []
    mant = (1, 2, 5)
    exp = 0
    while True:
        for m in mant:
            v = m * 10**exp
            if v > max_model_len:
                return tuple(float(x) for x in out)
            out.append(v)
        exp += 1


class Histogram:
    __slots__ = ("buckets", "counts", "total", "count", "created")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.count = 0
        self.created = time.time()

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1


FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")


class EngineStats:
    """Everything ``/metrics`` shows besides the live gauges."""

    def __init__(self, max_model_len: int, lora_info_max_series: int = 256) -> None:
        self.created = time.time()
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.preemptions = 0
        self.prompt_tokens = 0
        self.prompt_computed = 0
        self.prompt_cached = 0
        self.generation_tokens = 0
        self.success: dict[str, int] = {r: 0 for r in FINISH_REASONS}
        tb = token_buckets(max_model_len)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.tpot = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(REQUEST_TIME_BUCKETS)
        self.queue = Histogram(REQUEST_TIME_BUCKETS)
        self.inference = Histogram(REQUEST_TIME_BUCKETS)
        self.prefill = Histogram(REQUEST_TIME_BUCKETS)
        self.decode = Histogram(REQUEST_TIME_BUCKETS)
        self.req_prompt = Histogram(tb)
        self.req_generation = Histogram(tb)
        self.req_max_gen = Histogram(tb)
        self.req_max_tokens = Histogram(tb)
        self.req_n = Histogram(N_BUCKETS)
        self.req_preemptions = Histogram(PREEMPTION_BUCKETS)
        self.req_kv_computed = Histogram(tb)
        self.iteration_tokens = Histogram(ITERATION_BUCKETS)
        # lora_requests_info: (running, waiting) label values -> unix timestamp; stale ones kept
        self.lora_info: OrderedDict[tuple[str, str], float] = OrderedDict()
        self.lora_info_max_series = lora_info_max_series
        self._last_key: tuple[str, str] | None = None

    def set_lora_info(self, names: str, now: float) -> None:
        key = (names, names)
        info = self.lora_info
        last = self._last_key
        info[key] = now
        if key == last:
            return
        self._last_key = key
        info.move_to_end(key)
        while len(info) > self.lora_info_max_series:
            info.popitem(last=False)
