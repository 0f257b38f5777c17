"""The load probe: why did adapter disk loads take seconds with two servers on one host?

Each trial loads a never-used rank-R adapter (its own file, so nothing is cached in vLLM) and
times ``POST /v1/load_lora_adapter`` (or, for the resolver rows, the first chat request for an
unregistered name, which makes the filesystem resolver load it), then one ``max_tokens 1``
request for it (a GPU hit: loading is activating), then unloads it. Conditions, on servers s0/s1:

| condition | s0 | s1 at the same time |
|---|---|---|
| ``api-alone`` | load API, own file, page cache warm (just written) | idle |
| ``api-alone-cold`` | the same after ``posix_fadvise(DONTNEED)`` drops the file's pages | idle |
| ``api-both-own`` | load API, own file | load API, its own copy |
| ``api-both-shared`` | load API | load API of the *same* file |
| ``api-while-serving`` | load API | streaming a 256-token answer |
| ``resolver-alone`` | first request of a name in its resolver folder | idle |
| ``resolver-both`` | the same | the same, in its own folder |

One row per (condition, trial, server): start/end offsets, load and first-use milliseconds, status.
Run in eager and compiled mode (``host run --compiled --phases build,servers,warmup,probe``) to
compare the two.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.gpu import model
from bench.gpu.servers import Server, chat, http, unload

CONDITIONS = ("api-alone", "api-alone-cold", "api-both-own", "api-both-shared", "api-while-serving",
              "resolver-alone", "resolver-both")


@dataclass
class ProbeRow:
    condition: str
    trial: int
    server: str
    adapter: str
    start_s: float
    load_ms: float | None
    first_use_ms: float | None
    status: int
    note: str = ""


def _drop_page_cache(folder: Path) -> None:
    for f in folder.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _parallel(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls at the same moment in threads; their results in order."""
    out: list[Any] = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(i: int) -> None:
        barrier.wait()
        out[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return out


class LoadProbe:
    def __init__(self, servers: list[Server], root: Path, *, served: str, model_arg: str, shape: model.ModelShape,
                 rank: int = 64, trials: int = 2, say: Callable[[str], None] = print) -> None:
        if len(servers) < 2:
            raise ValueError("the load probe needs two servers")
        self.s0, self.s1 = servers[0], servers[1]
        self.root, self.served, self.model_arg, self.shape, self.rank, self.trials, self.say = (
            root, served, model_arg, shape, rank, trials, say)
        self.t0 = time.monotonic()
        self.rows: list[ProbeRow] = []

    def _adapter(self, folder: Path, name: str) -> Path:
        return model.write_adapter(folder / name, base_model=self.model_arg, rank=self.rank, shape=self.shape)

    def _load_api(self, server: Server, name: str, path: Path, cond: str, trial: int) -> ProbeRow:
        start = time.monotonic()
        status, body = http("POST", server.url + "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)},
                            timeout=300)
        load_ms = (time.monotonic() - start) * 1000
        first = None
        if status == 200:
            st, secs = chat(server.url, name, max_tokens=1)
            first = secs * 1000 if st == 200 else None
        return ProbeRow(cond, trial, server.id, name, round(start - self.t0, 3), round(load_ms, 1),
                        None if first is None else round(first, 1), status,
                        "" if status == 200 else body[:200].decode("utf-8", "replace"))

    def _resolver(self, server: Server, name: str, cond: str, trial: int) -> ProbeRow:
        start = time.monotonic()
        status, secs = chat(server.url, name, max_tokens=1)
        second = chat(server.url, name, max_tokens=1)[1] if status == 200 else None
        return ProbeRow(cond, trial, server.id, name, round(start - self.t0, 3), round(secs * 1000, 1),
                        None if second is None else round(second * 1000, 1), status, "load = first request")

    def run(self) -> list[dict[str, Any]]:
        own0, own1, shared = self.root / self.s0.id, self.root / self.s1.id, self.root / "shared"
        for trial in range(self.trials):
            for cond in CONDITIONS:
                tag = f"probe-{cond}-{trial}"
                rows: list[ProbeRow]
                if cond in ("api-alone", "api-alone-cold", "api-while-serving"):
                    path = self._adapter(own0, tag)
                    if cond == "api-alone-cold":
                        _drop_page_cache(path)
                    if cond == "api-while-serving":
                        busy = threading.Thread(target=chat, args=(self.s1.url, self.served),
                                                kwargs={"max_tokens": 256}, daemon=True)
                        busy.start()
                        time.sleep(0.5)
                        rows = [self._load_api(self.s0, tag, path, cond, trial)]
                        busy.join(timeout=120)
                    else:
                        rows = [self._load_api(self.s0, tag, path, cond, trial)]
                    cleanup = [(self.s0, tag)]
                elif cond == "api-both-own":
                    p0, p1 = self._adapter(own0, tag), self._adapter(own1, tag)
                    rows = _parallel([lambda: self._load_api(self.s0, tag, p0, cond, trial),
                                      lambda: self._load_api(self.s1, tag, p1, cond, trial)])
                    cleanup = [(self.s0, tag), (self.s1, tag)]
                elif cond == "api-both-shared":
                    p = self._adapter(shared, tag)
                    rows = _parallel([lambda: self._load_api(self.s0, tag, p, cond, trial),
                                      lambda: self._load_api(self.s1, tag, p, cond, trial)])
                    cleanup = [(self.s0, tag), (self.s1, tag)]
                elif cond == "resolver-alone":
                    self._adapter(self.s0.adapter_dir, tag)
                    rows = [self._resolver(self.s0, tag, cond, trial)]
                    cleanup = [(self.s0, tag)]
                else:  # resolver-both
                    self._adapter(self.s0.adapter_dir, tag)
                    self._adapter(self.s1.adapter_dir, tag)
                    rows = _parallel([lambda: self._resolver(self.s0, tag, cond, trial),
                                      lambda: self._resolver(self.s1, tag, cond, trial)])
                    cleanup = [(self.s0, tag), (self.s1, tag)]
                for server, name in cleanup:
                    unload(server.url, name)
                self.rows += rows
                self.say(f"{cond} #{trial}: " + ", ".join(
                    f"{r.server} load {r.load_ms} ms first use {r.first_use_ms} ms"
                    + ("" if r.status == 200 else f" (HTTP {r.status})") for r in rows))
        return [asdict(r) for r in self.rows]


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median load and first-use ms per condition."""
    out = []
    for cond in CONDITIONS:
        loads = sorted(r["load_ms"] for r in rows if r["condition"] == cond and r["status"] == 200
                       and r["load_ms"] is not None)
        firsts = sorted(r["first_use_ms"] for r in rows if r["condition"] == cond and r["first_use_ms"] is not None)
        if loads:
            out.append({"condition": cond, "n": len(loads), "load_ms_median": loads[len(loads) // 2],
                        "load_ms_max": loads[-1],
                        "first_use_ms_median": firsts[len(firsts) // 2] if firsts else None})
    return out
