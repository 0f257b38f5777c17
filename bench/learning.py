"""`loraroute bench learning SPEC`: does the router learn the costs of a cluster it was not set up for?

For each *scenario* — the spec's cluster running a cost profile the scorer's defaults do not
know — and each *mode* of ``estimated-ttft`` in the ``default`` preset, one fresh cluster replays
the same trace at ``load`` × capacity (``bench.runner.run_point``):

- scenarios (``vllm_sim.costs`` constants overridden, as ``cluster.cost``): ``slow-loads`` (adapter
  loads 3× the profile's, prefill 1.5× slower) and ``fast-loads`` (loads ⅓ of the profile's,
  prefill 1.5× slower); the scorer's defaults are the unmodified profile's measured values;
- modes: ``defaults`` (``learn: false``: the configured constants), ``learning`` (``learn: true``,
  the product default) and ``true-values`` (``learn: false`` with the constants set to what the
  scenario's profile really costs, ``CostProfile.truth()``: the best a fixed configuration can do).

While the trace replays, ``GET /admin/model`` is read every ``poll_s`` so the learned constants can
be followed over time. The report (``report.md`` and PNG plots beside the results) has, per
scenario: TTFT p99 per window of ``window`` requests for each mode, the p99 of the whole run and of
its second half, and the learned constants against the true ones after 500, 1,000 and all
requests (relative error). Targets (issue: learn the costs): within 20 % of the true values after
1,000 requests; the p99 with learning within 10 % of ``true-values``.

Times: client TTFTs are wall seconds divided by ``time_scale`` (simulated seconds, as everywhere
in bench/); the gateway learns wall seconds, so its constants are divided by ``time_scale`` too,
and ``true-values`` configures the true constants multiplied by it.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import placement as placement_mod
from bench.cluster import Target
from bench.runner import RunOptions, get_capacity, run_point
from bench.stats import is_ok, percentile
from bench.workload import WorkloadSpec, load_spec, sim_profile

RANKS = (8, 16, 32, 64)
CHECKPOINTS = (500, 1000)
MODES = ("defaults", "learning", "true-values")


@dataclass(frozen=True)
class Scenario:
    name: str
    load_scale: float
    prefill_factor: float

    def cost(self, spec: WorkloadSpec) -> dict[str, float]:
        base = sim_profile(spec.cluster)
        return {"load_scale": base.load_scale * self.load_scale,
                "prefill_graph_token_s": base.prefill_graph_token_s * self.prefill_factor,
                "prefill_token_s": base.prefill_token_s * self.prefill_factor}


SCENARIOS = {s.name: s for s in (Scenario("slow-loads", 3.0, 1.5), Scenario("fast-loads", 1 / 3, 1.5))}


@dataclass
class LearningOptions:
    spec_path: Path
    scenarios: tuple[str, ...] = tuple(SCENARIOS)
    modes: tuple[str, ...] = MODES
    load: float = 0.6
    requests: int = 2000
    time_scale: float = 1.0
    window: int = 200
    poll_s: float = 0.5
    out_dir: Path = Path("bench/results/learning")
    capacity: float | None = None


def scenario_spec(spec: WorkloadSpec, scenario: Scenario) -> WorkloadSpec:
    """The spec's cluster with the scenario's costs (its own name, so its capacity is its own)."""
    cost = dict(spec.cluster.cost) | scenario.cost(spec)
    return replace(spec, name=f"{spec.name}-{scenario.name}", cluster=replace(spec.cluster, cost=tuple(cost.items())))


def true_constants(spec: WorkloadSpec, lo: int = 32, hi: int = 2048) -> dict[str, Any]:
    """What the scenario's pods really cost, in the scorer's terms (simulated seconds).

    The tiers are the profile's own (``CostProfile.truth()``). The prefill is a step model
    (inside / outside the CUDA graph), so its "true" base_s, prefill_s_per_token, lora_s,
    cliff_s and cliff_lora_s are the least-squares fit of the scorer's form to a lone request's
    TTFT (``ideal_ttft``) from ``lo`` to ``hi`` prompt tokens, with and without an adapter: the
    best the model can do, not constants of the simulator. The disk tier is a load through the
    filesystem resolver (``CostProfile.load_api_s``: disk, activation and the load call's own part),
    since every adapter of these clusters is on every pod's disk and first reaches a pod that way;
    ``charged_disk_s`` in the report checks it against what the pods really charged."""
    import numpy as np

    from vllm_sim.costs import ideal_ttft

    profile = sim_profile(spec.cluster)
    t = profile.truth()
    graph = profile.graph_max_tokens
    xs, ys = [], []
    for n in range(lo, hi + 1, 16):
        for lora in (0.0, 1.0):
            cliff = 1.0 if graph and n > graph else 0.0
            xs.append([1.0, n, lora, cliff, cliff * lora])
            ys.append(ideal_ttft(profile, n, 0, lora=bool(lora)))
    fit = np.linalg.lstsq(np.array(xs), np.array(ys), rcond=None)[0]
    return {"base_s": float(fit[0]), "prefill_s_per_token": float(fit[1]), "lora_s": float(fit[2]),
            "cliff_s": float(fit[3]), "cliff_lora_s": float(fit[4]), "graph_tokens": graph,
            "cpu_load_s": t.cpu_load_s, "disk_s_by_rank": {str(r): profile.load_api_s(r) for r in RANKS}}


def pipeline_for(mode: str, truth: dict[str, Any], time_scale: float) -> dict[str, Any]:
    """The ``default`` preset with ``estimated-ttft`` configured for ``mode``."""
    from scorer.presets import PRESETS

    params: dict[str, Any] = {"learn": mode == "learning"}
    if mode == "true-values":
        params.update({k: max(0.0, truth[k]) * time_scale
                       for k in ("base_s", "prefill_s_per_token", "lora_s", "cpu_load_s", "cliff_s", "cliff_lora_s")})
        params["prefill_s_per_token"] = max(params["prefill_s_per_token"], 1e-9)
        params["graph_tokens"] = truth["graph_tokens"]
        params["disk_load_s"] = {int(r): v * time_scale for r, v in truth["disk_s_by_rank"].items()}
        params["model_scale"] = 1.0
    scorers = [dict(s) for s in PRESETS["default"]["scorers"]]
    for s in scorers:
        if s["type"] == "estimated-ttft":
            s["parameters"] = {**s.get("parameters", {}), **params}
    return {"preset": "default", "name": f"default-{mode}", "scorers": scorers}


class ModelPoller:
    """Reads ``/admin/model`` of the first router every ``every_s`` in a thread while entered."""

    def __init__(self, urls: list[str], every_s: float) -> None:
        self.url = urls[0] + "/admin/model"
        self.every_s = every_s
        self.samples: list[dict[str, Any]] = []
        # the observations the fit met, with its prediction at the time (deduplicated across polls)
        self.observations: list[dict[str, Any]] = []
        self._seen: set[tuple[Any, ...]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="model-poller")
        self.t0 = 0.0

    def _get(self) -> dict[str, Any] | None:
        req = urllib.request.Request(self.url, headers={"Authorization": f"Bearer {placement_mod.ADMIN_KEY}"})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - loopback only
                return json.loads(resp.read())
        except OSError:
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            snap = self._get()
            if snap is not None:
                groups = snap.get("groups") or {}
                fit = next(iter(groups.values()), None)  # one pod group in these clusters
                if fit is not None:
                    self.samples.append({"t": round(time.monotonic() - self.t0, 3),
                                         "observations": fit["observations"], "constants": fit["constants"]})
                    seen = self._seen
                    for o in fit.get("recent", ()):
                        key = (o["ttft_s"], o["queue_s"], o["uncached_tokens"], o["tier"])
                        if key not in seen:
                            seen.add(key)
                            self.observations.append(o)
            self._stop.wait(self.every_s)

    def __enter__(self) -> ModelPoller:
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        snap = self._get()  # the final state, after the replay
        if snap is not None and snap.get("groups"):
            fit = next(iter(snap["groups"].values()))
            self.samples.append({"t": round(time.monotonic() - self.t0, 3), "observations": fit["observations"],
                                 "constants": fit["constants"]})


def run_mode(spec: WorkloadSpec, opts: LearningOptions, mode: str, capacity: dict[str, Any],
             work_dir: Path) -> dict[str, Any]:
    truth = true_constants(spec)
    pollers: list[ModelPoller] = []

    def observer(urls: list[str]) -> ModelPoller:
        pollers.append(ModelPoller(urls, opts.poll_s))
        return pollers[-1]

    ropts = RunOptions(
        spec_path=opts.spec_path, target=Target("policy", "default"), requests=opts.requests,
        time_scale=opts.time_scale, out_dir=opts.out_dir,
        gateway_extra={"pipeline": pipeline_for(mode, truth, opts.time_scale),
                       "admin": {"api_key_sha256": [placement_mod.admin_digest()]}},
        observer=observer, extra_meta={"learning_mode": mode},
    )
    doc = run_point(spec, ropts, opts.load, capacity, work_dir)
    doc["learning"] = {"mode": mode, "truth": truth, "samples": pollers[0].samples if pollers else [],
                       "observations": pollers[0].observations if pollers else []}
    return doc


def run(opts: LearningOptions) -> Path:
    """Every scenario × mode; the result files and the report go to ``opts.out_dir``."""
    spec = load_spec(opts.spec_path)
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="loraroute-learning-") as tmp:
        for name in opts.scenarios:
            sspec = scenario_spec(spec, SCENARIOS[name])
            cap_opts = RunOptions(spec_path=opts.spec_path, target=Target("policy", "default"),
                                  time_scale=opts.time_scale, capacity=opts.capacity, out_dir=opts.out_dir)
            capacity = get_capacity(sspec, cap_opts, Path(tmp))
            for mode in opts.modes:
                print(f"learning: {name} / {mode} ...", flush=True)
                doc = run_mode(sspec, opts, mode, capacity, Path(tmp))
                path = opts.out_dir / f"{name}-{mode}.json"
                path.write_text(json.dumps(doc))
                s = doc["summary"]
                print(f"learning: {name} / {mode}: ok {s['ok']}/{s['requests']} p99 {s['ttft_p99']:.3f} s", flush=True)
    return report(opts.out_dir, opts.window)


# --------------------------------------------------------------------------------- analysis
def _ttfts(doc: dict[str, Any]) -> list[float]:
    """Client TTFT of every request in trace order (simulated seconds; failures count as inf)."""
    scale = float(doc["meta"]["time_scale"]) or 1.0
    return [r["ttft_s"] / scale if is_ok(r) and r.get("ttft_s") is not None else float("inf")
            for r in doc["requests"]]


def window_p99(doc: dict[str, Any], window: int) -> list[float]:
    t = _ttfts(doc)
    return [percentile(t[i:i + window], 99) or float("nan") for i in range(0, len(t) - window + 1, window)]


def learned_at(doc: dict[str, Any], observations: int) -> dict[str, Any] | None:
    """The learned constants (simulated seconds) of the first poll with at least ``observations``
    observations (the last poll when there were fewer), or None without any poll."""
    samples = doc.get("learning", {}).get("samples") or []
    if not samples:
        return None
    hit = next((s for s in samples if s["observations"] >= observations), samples[-1])
    scale = float(doc["meta"]["time_scale"]) or 1.0
    c = hit["constants"]
    out = {k: c[k] / scale for k in ("base_s", "lora_s", "cpu_load_s", "cliff_s", "cliff_lora_s")}
    out["prefill_s_per_token"] = c["prefill_s_per_token"] / scale
    out["disk_s_by_rank"] = {r: v / scale for r, v in c["disk_s_by_rank"].items()}
    out["queue_scale"] = c["queue_scale"]
    out["observations"] = hit["observations"]
    return out


#: sums the workload identifies when every request names an adapter (the reference workload has no
#: base-model requests): base_s and lora_s then multiply the same all-ones feature, and so do cliff_s
#: and cliff_lora_s, so the data fixes only their sums and the ridge splits each sum between its parts
SUMS = {"adapter_fixed_s": ("base_s", "lora_s"), "adapter_cliff_s": ("cliff_s", "cliff_lora_s")}


def with_sums(c: dict[str, Any]) -> dict[str, Any]:
    return c | {name: sum(c[k] for k in parts) for name, parts in SUMS.items()}


def errors(learned: dict[str, Any], truth: dict[str, Any]) -> dict[str, float]:
    """Relative error of each learned constant, and of the identifiable sums, against the true one."""
    learned, truth = with_sums(learned), with_sums(truth)
    out = {k: learned[k] / truth[k] - 1.0
           for k in ("prefill_s_per_token", "lora_s", "cpu_load_s", "base_s", "cliff_s", "cliff_lora_s",
                     *SUMS) if truth[k]}
    for r in RANKS:
        out[f"disk_{r}"] = learned["disk_s_by_rank"][str(r)] / truth["disk_s_by_rank"][str(r)] - 1.0
    return out


def charged_disk_s(doc: dict[str, Any]) -> dict[str, float]:
    """Median adapter-load time the simulated pods charged disk-tier admissions, per rank (their
    ground truth, simulated seconds): what a learned disk cost should approach."""
    by: dict[str, list[float]] = {}
    for r in doc["requests"]:
        if r.get("gt_adapter_tier") == "disk" and r.get("gt_load_s") is not None:
            by.setdefault(str(r.get("rank")), []).append(float(r["gt_load_s"]))
    return {k: percentile(v, 50) or 0.0 for k, v in by.items()}


def _ms(x: float) -> str:
    return "–" if x != x or x == float("inf") else f"{1000 * x:.0f}"


def report(out_dir: Path, window: int = 200) -> Path:
    """``report.md`` with the tables and PNG plots beside the result files; returns its path."""
    docs: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted(out_dir.glob("*.json")):
        doc = json.loads(path.read_text())
        if "learning" not in doc:
            continue
        scenario = doc["meta"]["spec"].split("-", 1)[1] if "-" in doc["meta"]["spec"] else doc["meta"]["spec"]
        docs.setdefault(scenario, {})[doc["learning"]["mode"]] = doc
    lines = ["# Learning the costs: TTFT and learned constants", ""]
    for scenario, modes in docs.items():
        any_doc = modes.get("learning") or next(iter(modes.values()))
        truth = any_doc["learning"]["truth"]   # the learning run's: the runs may come from several versions
        meta = any_doc["meta"]
        lines += [f"## {scenario}", "",
                  f"{meta['requests']} requests at {meta['load']:.0%} of capacity ({meta['rate_rps']} req/s), "
                  f"time-scale {meta['time_scale']}. Times in simulated ms.", ""]
        lines += ["| mode | p50 | p99 | p99, second half | machine busy | code | finished |",
                  "|---|---|---|---|---|---|---|"]
        for mode in MODES:
            doc = modes.get(mode)
            if doc is None:
                continue
            t = _ttfts(doc)
            s = doc["summary"]
            half = percentile(t[len(t) // 2:], 99) or float("nan")
            lines.append(f"| {mode} | {_ms(s['ttft_p50'])} | {_ms(s['ttft_p99'])} | {_ms(half)} | "
                         f"{s.get('machine_busy_pct') or 0:.0f} % | {doc['meta'].get('code_version')} | "
                         f"{doc['meta'].get('finished_at')} |")
        lines += ["", f"TTFT p99 per window of {window} requests (ms):", ""]
        per = {m: window_p99(d, window) for m, d in modes.items()}
        n = max((len(v) for v in per.values()), default=0)
        lines += ["| requests | " + " | ".join(m for m in MODES if m in per) + " |",
                  "|---|" + "---|" * len(per)]
        for i in range(n):
            lines.append(f"| {i * window + 1}–{(i + 1) * window} | "
                         + " | ".join(_ms(per[m][i]) if i < len(per[m]) else "–" for m in MODES if m in per) + " |")
        learning = modes.get("learning")
        if learning is not None:
            lines += ["", "Learned constants against the scenario's true values (relative error):", ""]
            lines += ["`adapter_fixed_s` = base_s + lora_s and `adapter_cliff_s` = cliff_s + cliff_lora_s: "
                      "with no base-model request in the trace the data fixes only these sums, not their parts "
                      "(the parts are in the last table).", ""]
            cols = ("adapter_fixed_s", "prefill_s_per_token", "adapter_cliff_s", "cpu_load_s",
                    *(f"disk_{r}" for r in RANKS))
            lines += ["| after | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
            for at in (*CHECKPOINTS, 10**9):
                got = learned_at(learning, at)
                if got is None:
                    continue
                err = errors(got, truth)
                label = f"{got['observations']} observations" if at == 10**9 else f"{at} observations"
                lines.append(f"| {label} | " + " | ".join(f"{100 * err[c]:+.0f} %" if c in err else "–" for c in cols) + " |")
            last = learned_at(learning, 10**9)
            if last is not None:
                lines += ["", "| constant | true | learned (end) | charged by the pods (median) |", "|---|---|---|---|"]
                t_all, l_all = with_sums(truth), with_sums(last)
                for k in ("adapter_fixed_s", "base_s", "lora_s", "prefill_s_per_token", "adapter_cliff_s",
                          "cliff_s", "cliff_lora_s", "cpu_load_s"):
                    lines.append(f"| {k} | {t_all[k]:.6g} | {l_all[k]:.6g} | |")
                charged = charged_disk_s(learning)
                for r in RANKS:
                    c = f"{charged[str(r)]:.4f}" if str(r) in charged else "–"
                    lines.append(f"| disk tier, rank {r} | {truth['disk_s_by_rank'][str(r)]:.4f} | "
                                 f"{last['disk_s_by_rank'][str(r)]:.4f} | {c} |")
                lines.append(f"| queue_scale | 1 | {last['queue_scale']:.3f} | |")
        png = out_dir / f"{scenario}.png"
        if _plot(scenario, modes, window, png):
            lines += ["", f"![{scenario}]({png.name})"]
        lines.append("")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _plot(scenario: str, modes: dict[str, dict[str, Any]], window: int, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, doc in modes.items():
        p = window_p99(doc, window)
        ax1.plot([(i + 1) * window for i in range(len(p))], [1000 * x for x in p], marker="o", label=mode)
    ax1.set_xlabel("requests")
    ax1.set_ylabel(f"TTFT p99 per {window} requests (ms)")
    ax1.set_title(f"{scenario}: p99 over time")
    ax1.legend()
    learning = modes.get("learning")
    if learning is not None:
        truth = learning["learning"]["truth"]
        samples = learning["learning"]["samples"]
        scale = float(learning["meta"]["time_scale"]) or 1.0
        for r, color in zip((16, 64), ("tab:blue", "tab:red")):
            xs = [s["observations"] for s in samples]
            ys = [1000 * s["constants"]["disk_s_by_rank"][str(r)] / scale for s in samples]
            ax2.plot(xs, ys, color=color, label=f"learned disk tier, rank {r}")
            ax2.axhline(1000 * truth["disk_s_by_rank"][str(r)], color=color, linestyle="--", label=f"true, rank {r}")
        ax2.set_xlabel("observations")
        ax2.set_ylabel("ms")
        ax2.set_title("learned vs true disk-tier cost")
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
