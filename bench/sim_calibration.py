"""The simulator's cost profiles beside the real vLLM 0.25.1 measurement on an H200.

    python -m bench.sim_calibration [--profile 8b|8b-eager|all]

Drives one ``loraroute sim`` pod shaped like the measured server (``--max-loras 2
--max-cpu-loras 4 --max-lora-rank 64``, static ``ta`` / ``x0``, rank-8 ``fill-0..3``) through
the measuring client's sequences and prints the simulator's ground truth (simulated ms) next to
the real medians, which it reads from the committed payloads in ``tests/fixtures/vllm-0.25-real/``:

- tiers (``tier_sequence``): per rank and trial (5), ``load_lora_adapter`` -> first use -> GPU
  hit -> two touches (the adapter leaves its GPU slot) -> CPU tier -> four touches (it leaves the
  CPU cache) -> disk tier, 1004-token fresh prompts, ``max_tokens`` 1;
- prefill (``prefill_points``): TTFT of lone requests of 64-2052 tokens, base and adapter ``ta``;
  batch-1 decode step of a 257-token stream (``decode_step_ms``);
- a load stalls a stream (``stall_trial``): stream ``x0`` runs; after its 100th token a request
  for a disk-tier rank-64 adapter arrives; the stream's longest gap.

``tests/test_sim_calibration.py`` runs the same functions and asserts the tolerances.
"""

from __future__ import annotations

import argparse
import itertools
import re
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx

from loraroute import peft
from loraroute.procs import Proc, free_port, loraroute_cmd, start_process
from vllm_sim.costs import PROFILES, CostProfile, get_profile

REAL = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "vllm-0.25-real"
SUMMARY = {"8b": "summary-compiled.md", "8b-eager": "summary-single-server.md"}
DECODE = {"8b": "decode-and-prefill-boundary-compiled.txt", "8b-eager": "decode-itl.txt"}
BASE = "meta-llama/Llama-3.1-8B-Instruct"
RANKS = (8, 16, 32, 64)
TRIALS = 5


# -- the measurement, read from the committed files ------------------------------------------------
def _rows(profile: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in (REAL / SUMMARY[profile]).read_text().splitlines() if line.startswith("|")]


def medians(profile: str) -> dict[str, float]:
    """label -> median ms, from both tables of a summary (requests and load calls)."""
    return {cells[0]: float(cells[2]) for cells in _rows(profile) if len(cells) >= 4 and cells[1].isdigit()}


def stall_trials(profile: str, kind: str = "disk") -> list[tuple[float, float]]:
    """(median gap, max gap while the trigger was in flight) of each ``stall_<kind>`` trial, ms."""
    return [(float(c[2]), float(c[3])) for c in _rows(profile) if c and c[0] == f"stall_{kind}"]


def boundary() -> dict[tuple[int, str], float]:
    """(prompt tokens, model) -> median TTFT ms around the CUDA-graph limit, compiled server."""
    out = {}
    for line in (REAL / DECODE["8b"]).read_text().splitlines():
        m = re.fullmatch(r"(\d+) (\S+) median ([\d.]+) .*", line)
        if m:
            out[(int(m.group(1)), m.group(2))] = float(m.group(3))
    return out


def real_decode_steps(profile: str) -> dict[str, float]:
    """model -> median batch-1 decode step (one gap = one step), ms; a server alone on its GPU."""
    text = (REAL / DECODE[profile]).read_text().split("## s1")[0]
    steps: dict[str, list[float]] = defaultdict(list)
    for m in re.finditer(r"^(\S+) chunks \d+ median gap ms ([\d.]+)", text, re.M):
        steps[m.group(1)].append(float(m.group(2)))
    return {k: statistics.median(v) for k, v in steps.items()}


def real_prefill(profile: str) -> dict[tuple[int, str], float]:
    """(prompt tokens, base|ta) -> median TTFT ms of a lone request.

    Compiled: the run that measured both sides of the 512-token limit, plus the other run's
    rows above it (its 132-token rows disagree with the first run by ~5 ms, so they are left
    out); eager: the prefill rows of its one run."""
    summary = medians(profile)
    sizes = ((516, 512), (1028, 1024), (2052, 2048)) if profile == "8b" else (
        (132, 128), (516, 512), (1028, 1024), (2052, 2048))
    out = {(n, m): summary[f"prefill_{m}_{label}"] for n, label in sizes for m in ("base", "ta")}
    if profile == "8b":
        out.update({key: v for key, v in boundary().items() if key[1] in ("base", "ta")})
    return dict(sorted(out.items()))


# -- driving a simulator ------------------------------------------------------------------------------
class Sim:
    """One ``loraroute sim`` pod shaped like the measured server; ``stop()`` when done."""

    _ids = itertools.count()

    def __init__(self, work: Path, profile: str, time_scale: float = 0.0) -> None:
        self.adapters = work / "adapters"
        names = [(f"fill-{i}", 8) for i in range(4)] + [("ta", 16), ("x0", 16)] + [
            (f"r{r}-{i}", r) for r in RANKS for i in range(TRIALS)]
        for i, (name, rank) in enumerate(names):
            if not (self.adapters / name).exists():
                peft.make_adapter(self.adapters / name, base_model=BASE, rank=rank, seed=i)
        port = free_port()
        self.proc: Proc = start_process(f"sim-calibration-{port}", loraroute_cmd(
            "sim", "--port", str(port), "--enable-lora", "--allow-runtime-lora-updating", "--max-loras", "2",
            "--max-cpu-loras", "4", "--max-lora-rank", "64", "--time-scale", repr(time_scale), "--profile", profile,
            "--lora-modules", f"ta={self.adapters / 'ta'}", f"x0={self.adapters / 'x0'}"),
            port=port, ready_url=f"http://127.0.0.1:{port}/health", timeout=30, log_dir=work / "logs")
        self.http = httpx.Client(base_url=self.proc.url, timeout=60)
        self.profile: CostProfile = get_profile(profile)

    def stop(self) -> None:
        self.http.close()
        self.proc.stop()

    def now(self) -> float:
        return float(self.http.get("/sim/state", params={"limit": 0}).json()["now"])

    def load(self, name: str) -> float:
        """Load through the API; the simulated seconds it took (at time-scale 0, on an idle engine)."""
        t0 = self.now()
        r = self.http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(self.adapters / name)})
        if r.status_code != 200:
            raise RuntimeError(f"load {name}: {r.status_code} {r.text}")
        return self.now() - t0

    def ask(self, model: str, tokens: int, max_tokens: int = 1) -> str:
        """A completion with a fresh prompt of exactly ``tokens`` tokens; its request id."""
        rid = f"q{next(self._ids)}"
        head = f"{rid:<16}"  # a unique first block: no prefix-cache hit
        r = self.http.post("/v1/completions", headers={"X-Request-Id": rid}, json={
            "model": model, "prompt": head + "w" * (4 * tokens - len(head)), "max_tokens": max_tokens})
        if r.status_code != 200:
            raise RuntimeError(f"{model}: {r.status_code} {r.text}")
        return rid

    def records(self) -> dict[str, dict[str, Any]]:
        return {r["request_id"]: r for r in self.http.get("/sim/state").json()["requests"]}


def tier_sequence(sim: Sim) -> dict[str, list[float]]:
    """The measuring client's tier tests: label -> TTFTs / load-call times, simulated ms.

    Also ``static_first_use_tc`` (the engine's first LoRA request, as the real run began) and,
    per label, checks that the simulator put the adapter in the tier the label names."""
    out: dict[str, list[float]] = defaultdict(list)
    asked = [("static_first_use_tc", sim.ask("ta", 1004))]
    for i in range(4):
        sim.load(f"fill-{i}")
    for rank in RANKS:
        for i in range(TRIALS):
            name = f"r{rank}-{i}"
            out[f"load_api_r{rank}"].append(1000 * sim.load(name))
            asked += [(f"first_use_after_load_r{rank}", sim.ask(name, 1004)), (f"gpu_hit_r{rank}", sim.ask(name, 1004))]
            for fill in ("fill-0", "fill-1"):
                sim.ask(fill, 20)
            asked.append((f"cpu_tier_r{rank}", sim.ask(name, 1004)))
            for k in range(4):
                sim.ask(f"fill-{k}", 20)
            asked.append((f"disk_tier_r{rank}", sim.ask(name, 1004)))
    recs = sim.records()
    for label, rid in asked:
        tier = label.split("_tier_")[0] if "_tier_" in label else None
        if tier is not None and recs[rid]["adapter_tier"] != tier:
            raise AssertionError(f"{label}: the simulator had the adapter in {recs[rid]['adapter_tier']}")
        out[label].append(1000 * recs[rid]["ttft"])
    return out


def prefill_points(sim: Sim, sizes: list[tuple[int, str]]) -> dict[tuple[int, str], float]:
    """TTFT (ms) of a lone fresh request per (prompt tokens, base|ta)."""
    sim.ask("ta", 20)  # the eager engine's one-off LoRA compile, before measuring
    asked = {key: sim.ask(BASE if key[1] == "base" else "ta", key[0]) for key in sizes}
    recs = sim.records()
    return {key: 1000 * recs[rid]["ttft"] for key, rid in asked.items()}


def decode_step_ms(sim: Sim, model: str) -> float:
    """Batch-1 decode step of a lone 257-token stream: (e2e - TTFT) / (tokens - 1), ms."""
    rid = sim.ask(BASE if model == "base" else model, 20, max_tokens=257)
    rec = sim.records()[rid]
    return float(1000 * (rec["e2e"] - rec["ttft"]) / (rec["output_tokens"] - 1))


def stall_trial(sim: Sim, timeout_s: float = 30.0) -> dict[str, Any]:
    """Stream ``x0``; after its 100th token a request for a disk-tier rank-64 adapter (36-token
    prompt, 4 tokens); the stream's longest inter-token gap (ms) and the trigger's tier.
    Needs a simulator with a time scale > 0 (the stream must be running when the trigger comes)."""
    sim.ask("ta", 20)  # eager: the one-off LoRA compile happens here, not during the trial
    sim.load("r64-0")
    for k in range(4):  # r64-0 leaves the CPU cache
        sim.load(f"fill-{k}")
    stop = threading.Event()

    def stream_x() -> None:
        body = {"model": "x0", "prompt": "stream x " * 8, "max_tokens": 100_000, "stream": True}
        with httpx.Client(timeout=timeout_s) as c, c.stream("POST", sim.proc.url + "/v1/completions", json=body,
                                                           headers={"X-Request-Id": "X"}) as resp:
            for _ in resp.iter_lines():
                if stop.is_set():
                    return

    thread = threading.Thread(target=stream_x, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    try:
        while (sim.records().get("X") or {}).get("output_tokens", 0) < 100:
            if time.monotonic() > deadline:
                raise TimeoutError("stream X did not start")
            time.sleep(0.01)
        rid = sim.ask("r64-0", 36, max_tokens=4)
        y = sim.records()[rid]
        seen = sim.records()["X"]["output_tokens"]
        while sim.records()["X"]["output_tokens"] < seen + 5:  # X decoded past the stall
            if time.monotonic() > deadline:
                raise TimeoutError("stream X stopped")
            time.sleep(0.01)
        return {"max_gap_ms": 1000 * sim.records()["X"]["max_itl"], "trigger_tier": y["adapter_tier"]}
    finally:
        stop.set()
        thread.join(timeout_s)


# -- the report -------------------------------------------------------------------------------------
def _pct(have: float, want: float) -> str:
    return f"{100 * (have - want) / want:+.0f} %"


def report(profile: str, work: Path) -> None:
    real = medians(profile)
    sim = Sim(work, profile)
    try:
        got = {k: statistics.median(v) for k, v in tier_sequence(sim).items()}
    finally:
        sim.stop()
    print(f"\n## {profile}: adapter tiers, 1004-token prompt (median of {TRIALS}; ms)\n")
    print("| rank | disk - GPU hit real | sim | | CPU - GPU hit real | sim | load API real | sim | |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in RANKS:
        dr, ds = real[f"disk_tier_r{r}"] - real[f"gpu_hit_r{r}"], got[f"disk_tier_r{r}"] - got[f"gpu_hit_r{r}"]
        cr, cs = real[f"cpu_tier_r{r}"] - real[f"gpu_hit_r{r}"], got[f"cpu_tier_r{r}"] - got[f"gpu_hit_r{r}"]
        lr, ls = real[f"load_api_r{r}"], got[f"load_api_r{r}"]
        print(f"| {r} | {dr:+.1f} | {ds:+.1f} | {_pct(ds, dr)} | {cr:+.1f} | {cs:+.1f} | {lr:.1f} | {ls:.1f} | {_pct(ls, lr)} |")
    print(f"\nfirst LoRA request of the engine: real {real['static_first_use_tc']:.1f}, "
          f"sim {got['static_first_use_tc']:.1f} ms")
    sim = Sim(work, profile)
    try:
        want = real_prefill(profile)
        have = prefill_points(sim, list(want))
        steps = {m: decode_step_ms(sim, m) for m in ("base", "x0")}
    finally:
        sim.stop()
    print(f"\n## {profile}: TTFT of a lone request (ms)\n")
    print("| prompt tokens | base real | sim | | adapter real | sim | |")
    print("|---|---|---|---|---|---|---|")
    for n in sorted({k[0] for k in want}):
        b, a = (n, "base"), (n, "ta")
        print(f"| {n} | {want[b]:.1f} | {have[b]:.1f} | {_pct(have[b], want[b])} | "
              f"{want[a]:.1f} | {have[a]:.1f} | {_pct(have[a], want[a])} |")
    real_steps = real_decode_steps(profile)
    print(f"\nbatch-1 decode step: base real {real_steps['base']:.2f} sim {steps['base']:.2f} ms; "
          f"adapter real {real_steps['x0']:.2f} sim {steps['x0']:.2f} ms")
    sim = Sim(work, profile, time_scale=0.05)
    try:
        trial = stall_trial(sim)
    finally:
        sim.stop()
    trials = stall_trials(profile)
    want_gap = statistics.median(mx - gap / 2 for gap, mx in trials)
    print(f"\nstream's longest gap with a disk-tier rank-64 request: real {want_gap:.1f} ms (median max gap "
          f"less one step; the client read 2 tokens a chunk), sim {trial['max_gap_ms']:.1f} ms")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sim_calibration", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="all", choices=["all", *sorted(PROFILES)])
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sim-calibration-") as tmp:
        for name in sorted(PROFILES) if args.profile == "all" else [args.profile]:
            report(name, Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
