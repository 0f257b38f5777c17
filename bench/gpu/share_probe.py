"""The sharing probe: how much slower is one server's work while other servers on its GPU are busy?

Several vLLM servers on one GPU time-slice it (one CUDA context each): in run 3 a ``max_tokens 1``
request took 249 ms while a second server streamed an answer and 28 ms while it was idle. The
simulator gives each pod a GPU of its own unless told that pods share one
(``loraroute sim cluster --pods-per-gpu N --gpu-share FILE``); this probe measures the slow-down
factors it needs, on the host, before the replays.

For k = 0 … N-1 busy neighbours (servers s1 … sk each answering two streams of back-to-back
base-model requests of ``busy_tokens`` tokens until the measurement ends), on s0:

- ``prefill``: a ``max_tokens 1`` request with a ~1,000-token prompt (a fresh prefix each time: a
  leading nonce word, so no prefix-cache hit), median of ``trials``;
- ``short``: the same with a ~20-token prompt (the chat template's markers and three words);
- ``decode``: ((time of a ``max_tokens`` ``1 + decode_tokens`` request) − (its ``max_tokens 1``
  twin)) / ``decode_tokens``: one decode step;
- ``load``: ``POST /v1/load_lora_adapter`` of a never-used rank-``rank`` adapter (its own file),
  and ``lora_short``: the first request to it right after (a GPU hit: loading is activating).

``factors(rows)`` turns the medians into ratios to k = 0 per kind: the file the simulator reads.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.gpu import model
from bench.gpu.servers import Server, chat, http, unload

KINDS = ("prefill", "short", "decode", "load", "lora_short")


def word(n: int) -> str:
    """A three-letter lowercase word for ``n`` (base 26). The kit's tokenizer knows every piece of
    such words and spaces and maps anything else (digits, brackets) to ``<unk>``: a nonce made of
    digits left every trial's prompt the same token sequence, a prefix-cache hit after the first."""
    n %= 26 ** 3
    return "".join(chr(97 + (n // 26 ** k) % 26) for k in (2, 1, 0))


LONG_PROMPT = " ".join(word(i * 7 + 1) for i in range(1000))   # 4,000 bytes: ≈ 1,000 tokens
SHORT_PROMPT = "say one yes"


class _Neighbours:
    """k servers kept busy with back-to-back requests (two at a time each, so there is no gap
    between one answer and the next) until the block ends."""

    STREAMS = 2

    def __init__(self, servers: list[Server], served: str, tokens: int) -> None:
        self.servers, self.served, self.tokens = servers, served, tokens
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.requests = 0

    def _loop(self, url: str) -> None:
        while not self._stop.is_set():
            chat(url, self.served, max_tokens=self.tokens, content="run the gpu hot", timeout=120)
            self.requests += 1

    def __enter__(self) -> _Neighbours:
        for s in self.servers:
            for _ in range(self.STREAMS):
                t = threading.Thread(target=self._loop, args=(s.url,), daemon=True)
                t.start()
                self._threads.append(t)
        if self.servers:
            time.sleep(0.5)   # their first prefills are done: they decode
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)


class ShareProbe:
    def __init__(self, servers: list[Server], root: Path, *, served: str, model_arg: str, shape: model.ModelShape,
                 rank: int = 64, trials: int = 3, decode_tokens: int = 64, busy_tokens: int = 128,
                 say: Callable[[str], None] = print) -> None:
        if len(servers) < 2:
            raise ValueError("the sharing probe needs two servers")
        self.servers, self.root, self.served, self.model_arg, self.shape = servers, root, served, model_arg, shape
        self.rank, self.trials, self.decode_tokens, self.busy_tokens, self.say = (
            rank, trials, decode_tokens, busy_tokens, say)
        self.rows: list[dict[str, Any]] = []
        self._nonce = 0

    def _timed(self, model_name: str, content: str, max_tokens: int) -> float | None:
        self._nonce += 1
        status, secs = chat(self.servers[0].url, model_name, max_tokens=max_tokens,
                            content=f"{word(self._nonce * 131 + 17)} {content}", timeout=120)
        return secs * 1000 if status == 200 else None

    def _row(self, k: int, kind: str, ms: float | None, note: str = "") -> None:
        self.rows.append({"busy_neighbours": k, "kind": kind, "ms": None if ms is None else round(ms, 2),
                          "note": note})

    def _measure(self, k: int) -> None:
        for _ in range(self.trials):
            self._row(k, "prefill", self._timed(self.served, LONG_PROMPT, 1))
            self._row(k, "short", self._timed(self.served, SHORT_PROMPT, 1))
            one = self._timed(self.served, SHORT_PROMPT, 1)
            many = self._timed(self.served, SHORT_PROMPT, 1 + self.decode_tokens)
            self._row(k, "decode", None if one is None or many is None else (many - one) / self.decode_tokens)
        name = f"share-probe-{k}"
        path = model.write_adapter(self.root / name, base_model=self.model_arg, rank=self.rank, shape=self.shape)
        start = time.monotonic()
        status, body = http("POST", self.servers[0].url + "/v1/load_lora_adapter",
                            {"lora_name": name, "lora_path": str(path)}, timeout=300)
        load_ms = (time.monotonic() - start) * 1000
        if status == 200:
            self._row(k, "load", load_ms)
            self._row(k, "lora_short", self._timed(name, SHORT_PROMPT, 1))
            unload(self.servers[0].url, name)
        else:
            self._row(k, "load", None, f"HTTP {status}: {body[:160].decode('utf-8', 'replace')}")

    def run(self) -> list[dict[str, Any]]:
        for k in range(len(self.servers)):
            with _Neighbours(self.servers[1:1 + k], self.served, self.busy_tokens) as busy:
                self._measure(k)
            med = medians(self.rows, k)
            self.say(f"{k} busy neighbour(s) ({busy.requests} of their requests): "
                     + ", ".join(f"{kind} {med[kind]:.1f} ms" for kind in KINDS if med.get(kind) is not None))
        return self.rows


def medians(rows: list[dict[str, Any]], k: int) -> dict[str, float]:
    out = {}
    for kind in KINDS:
        values = [r["ms"] for r in rows if r["busy_neighbours"] == k and r["kind"] == kind and r["ms"] is not None]
        if values:
            out[kind] = statistics.median(values)
    return out


def factors(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per kind, the median at k busy neighbours over the median at k = 0, for k = 0, 1, …
    (the ``--gpu-share`` file of ``loraroute sim cluster``); a kind with no k = 0 figure is left out,
    a later k with none repeats the previous factor."""
    ks = sorted({r["busy_neighbours"] for r in rows})
    base = medians(rows, 0)
    out: dict[str, list[float]] = {}
    for kind in KINDS:
        if not base.get(kind):
            continue
        seq: list[float] = []
        for k in ks:
            m = medians(rows, k).get(kind)
            seq.append(round(m / base[kind], 3) if m is not None else (seq[-1] if seq else 1.0))
        out[kind] = seq
    return out
