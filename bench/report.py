"""`loraroute bench report RESULTS... [--out DIR]`: Markdown tables and PNG plots from result files.

RESULTS are result JSON files or folders holding them (``capacity.json`` is read for the header,
not as a result). Writes ``DIR/report.md`` (default DIR: the common folder of the inputs) and:

- ``ttft_cdf_loadNN.png``: the TTFT CDF of every target at load NN % (log x axis);
- ``p99_vs_load.png``: p99 TTFT against load, one line per target;
- ``hit_rates.png``: adapter GPU hit rate and prefix hit rate per target, one panel per load;
- ``disk_admissions_loadNN.png``: cumulative disk-tier admissions over the replay per target, with
  the two references of ``bench.bounds`` (compulsory first uses, one cluster-wide LRU);
- ``p99_by_workload.png``: p99 TTFT per target, grouped by workload (spec, and "warm" for
  steady-state runs) — with and without placement side by side;
- for overhead results (``meta.kind == "overhead"``): ``overhead.png``, added latency per target.

Columns of the load tables are defined in ``bench.stats`` (simulated seconds); the bound table's
in ``bench.bounds``; the placement table's in ``bench.placement``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.bounds import admissions_over_time, bound_summary
from bench.stats import is_ok, summarize


def collect(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Load result documents from files and folders (recursively), skipping non-results."""
    docs = []
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.rglob("*.json"))
        else:
            files.append(p)
    for f in files:
        if f.name == "capacity.json":
            continue
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and "meta" in doc and ("requests" in doc or "targets" in doc):
            doc["_path"] = str(f)
            docs.append(doc)
    return docs


def _f(v: Any, nd: int = 3, pct: bool = False) -> str:
    if v is None:
        return "–"
    if pct:
        return f"{100 * v:.1f} %"
    return f"{v:.{nd}f}"


def _ms(v: Any) -> str:
    return "–" if v is None else f"{1000 * v:.0f}"


def _ms1(v: Any) -> str:
    return "–" if v is None else f"{1000 * v:.1f}"


TABLE_HEAD = (
    "| target | ok / sent | TTFT p50 | p90 | p99 | p99 w/o first use | e2e p50 | p99 | output tok/s | "
    "adapter GPU hit (w/o first use) | "
    "prefix hit | imbalance | errors | achieved/ideal p50 (client / sim) | sim TTFT p50 | p99 | "
    "client − sim TTFT p50 | router CPU | machine busy |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def load_table(summaries: Sequence[dict[str, Any]]) -> str:
    """A Markdown table, one row per target (TTFT and e2e in ms of simulated time)."""
    rows = [TABLE_HEAD]
    for s in sorted(summaries, key=lambda s: (s["ttft_p99"] is None, s["ttft_p99"] or 0)):
        rows.append(
            f"| {s['target']} | {s['ok']} / {s['requests']} | {_ms(s['ttft_p50'])} ms | {_ms(s['ttft_p90'])} ms | "
            f"{_ms(s['ttft_p99'])} ms | {_ms(s.get('ttft_p99_warm'))} ms | {_ms(s['e2e_p50'])} ms | "
            f"{_ms(s['e2e_p99'])} ms | {_f(s['output_tok_s'], 0)} | {_f(s['adapter_gpu_hit'], pct=True)} "
            f"({_f(s.get('adapter_gpu_hit_warm'), pct=True)}) | {_f(s['prefix_hit'], pct=True)} | "
            f"{_f(s['imbalance'], 2)} | {s['errors']} | {_f(s['ideal_ratio_p50'], 2)} / "
            f"{_f(s.get('sim_ideal_ratio_p50'), 2)} | {_ms(s.get('sim_ttft_p50'))} ms | {_ms(s.get('sim_ttft_p99'))} ms | "
            f"{_ms1(s.get('client_extra_p50'))} ms | "
            f"{_f(s['router_cpu_pct'], 0)} % | {_f(s['machine_busy_pct'], 0)} % |\n"
        )
    return "".join(rows)


def bound_table(docs: Sequence[dict[str, Any]]) -> str:
    """Disk-tier admissions per target against the trace's two references (``bench.bounds``)."""
    rows = ["| target | disk-tier admissions | compulsory first uses | cluster LRU (capacity) | admissions / LRU | "
            "disk loads in the replay (placement's) |\n|---|---|---|---|---|---|\n"]
    for doc in sorted(docs, key=lambda d: d["meta"]["target"]):
        b = bound_summary(doc)
        placed = (doc.get("placement") or {}).get("by_phase", {}).get("preload", {}).get("loads")
        loads = "–" if b["disk_loads"] is None else f"{b['disk_loads']}" + (f" ({placed})" if placed else "")
        rows.append(f"| {doc['meta']['target']} | {b['disk_admissions']} | {b['compulsory']} | "
                    f"{b['cluster_lru']} ({b['capacity']}) | {_f(b['admissions_over_lru'], 2)} | {loads} |\n")
    return "".join(rows)


def placement_table(docs: Sequence[dict[str, Any]]) -> str:
    """What the placer did in each run with placement (stall in wall seconds, as budgeted)."""
    rows = ["| target | warm-up loads (stall) | pre-loads (stall) | pre-loads skipped | worst pod's pre-load stall "
            "in one window / budget | requests sharing a pod with a pre-load | their TTFT p99 |\n"
            "|---|---|---|---|---|---|---|\n"]
    for doc in sorted(docs, key=lambda d: d["meta"]["target"]):
        p = doc.get("placement")
        if not p:
            continue
        phase = p.get("by_phase", {})
        w, pre = phase.get("warmup", {}), phase.get("preload", {})
        skipped = ", ".join(f"{k} {v}" for k, v in sorted((p.get("skipped") or {}).items()) if v) or "none"
        worst = max((p.get("max_window_stall_by_pod") or {}).values(), default=0.0)
        rows.append(f"| {doc['meta']['target']} | {w.get('loads', 0)} ({_f(w.get('stall_s', 0.0), 2)} s) | "
                    f"{pre.get('loads', 0)} ({_f(pre.get('stall_s', 0.0), 2)} s) | {skipped} | "
                    f"{_f(worst, 2)} s / {_f(p.get('budget_s'), 1)} s per {_f(p.get('window_s'), 0)} s | "
                    f"{p.get('requests_sharing_a_load', 0)} | {_ms(p.get('ttft_p99_sharing_a_load'))} ms |\n")
    return "".join(rows) if len(rows) > 1 else ""


def cpu_table(summaries: Sequence[dict[str, Any]]) -> str:
    """CPU share of each process group (100 % = one core) over the replay, and the machine's;
    when the run finished and the code it ran (``git describe``), where recorded."""
    names = ["router", "sim", "sidecars", "redis", "client"]
    rows = ["| target | " + " | ".join(names) + " | machine busy (all cores, everyone) | finished (UTC) | code |\n",
            "|---|" + "---|" * (len(names) + 3) + "\n"]
    for s in sorted(summaries, key=lambda s: s["target"]):
        cpu = s.get("cpu") or {}
        cells = [_f((cpu.get(n) or {}).get("cpu_pct"), 0) + " %" for n in names]
        done = (s.get("finished_at") or "–").replace("T", " ").removesuffix("Z")
        rows.append(f"| {s['target']} | " + " | ".join(cells) + f" | {_f(s['machine_busy_pct'], 0)} % | {done} | "
                    f"{s.get('code_version') or '–'} |\n")
    return "".join(rows)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cdf(docs: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for doc in sorted(docs, key=lambda d: d["meta"]["target"]):
        scale = float(doc["meta"].get("time_scale", 1.0)) or 1.0
        xs = sorted(r["ttft_s"] / scale for r in doc["requests"] if is_ok(r))
        if not xs:
            continue
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.plot(xs, ys, label=doc["meta"]["target"], linewidth=1.4)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (simulated seconds, log scale)")
    ax.set_ylabel("fraction of requests")
    return _finish(plt, fig, ax, path, title)


def _finish(plt: Any, fig: Any, ax: Any, path: Path, title: str) -> Path:
    """Title, grid and legend of a line plot; write it as PNG and free the figure."""
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_p99_vs_load(summaries: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_target: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for s in summaries:
        if s["ttft_p99"] is not None:
            by_target[s["target"]].append((float(s["load"]), s["ttft_p99"]))
    for target, pts in sorted(by_target.items()):
        pts.sort()
        ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], marker="o", label=target)
    ax.set_yscale("log")
    ax.set_xlabel("offered load (% of measured capacity)")
    ax.set_ylabel("p99 TTFT (simulated seconds, log scale)")
    return _finish(plt, fig, ax, path, title)


def plot_hit_rates(summaries: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    plt = _plt()
    loads = sorted({float(s["load"]) for s in summaries})
    fig, axes = plt.subplots(1, len(loads), figsize=(max(6, 4.5 * len(loads)), 4.5), squeeze=False)
    for ax, load in zip(axes[0], loads):
        ss = sorted((s for s in summaries if float(s["load"]) == load), key=lambda s: s["target"])
        xs = list(range(len(ss)))
        ax.bar([x - 0.2 for x in xs], [s["adapter_gpu_hit"] or 0 for s in ss], width=0.4, label="adapter GPU hit")
        ax.bar([x + 0.2 for x in xs], [s["prefix_hit"] or 0 for s in ss], width=0.4, label="prefix hit")
        ax.set_xticks(xs)
        ax.set_xticklabels([s["target"] for s in ss], rotation=40, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"load {int(round(100 * load))} %")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylabel("hit rate")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_admissions(docs: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    refs = None
    for doc in sorted(docs, key=lambda d: d["meta"]["target"]):
        curve = admissions_over_time(doc)
        ax.step(curve["t"], curve["measured"], where="post", label=doc["meta"]["target"], linewidth=1.4)
        refs = refs or curve
    if refs is not None:
        ax.step(refs["t"], refs["cluster_lru"], where="post", label="cluster LRU (reference)", color="black",
                linestyle="--", linewidth=1.2)
        ax.step(refs["t"], refs["compulsory"], where="post", label="compulsory first uses", color="grey",
                linestyle=":", linewidth=1.2)
    ax.set_xlabel("simulated seconds since the first arrival")
    ax.set_ylabel("disk-tier admissions (cumulative)")
    return _finish(plt, fig, ax, path, title)


def workload_label(doc: dict[str, Any]) -> str:
    meta = doc["meta"]
    return f"{meta.get('spec', '?')}{' warm' if meta.get('warmup_requests') else ''} @{int(round(100 * float(meta['load'])))}%"


def plot_p99_by_workload(docs: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    plt = _plt()
    groups = sorted({workload_label(d) for d in docs})
    targets = sorted({d["meta"]["target"] for d in docs})
    p99 = {(workload_label(d), d["meta"]["target"]): summarize(d)["ttft_p99"] for d in docs}
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(groups) * max(1, len(targets)) / 2), 4.5))
    width = 0.8 / max(1, len(targets))
    for j, target in enumerate(targets):
        xs = [i + j * width for i in range(len(groups))]
        ax.bar(xs, [p99.get((g, target)) or 0.0 for g in groups], width=width, label=target)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("p99 TTFT (simulated seconds, log scale)")
    return _finish(plt, fig, ax, path, title)


def overhead_section(doc: dict[str, Any], out: Path, png: str = "overhead.png") -> str:
    """Markdown for one overhead result document (see bench.overhead)."""
    meta = doc["meta"]
    lines = [f"## Gateway overhead ({meta.get('spec', '')}; {Path(doc.get('_path', '')).parent.name})\n\n",
             f"Zero-delay simulated pod; {meta.get('sequential')} sequential requests per mode at concurrency 1; "
             f"throughput: highest offered rate with p99 under {meta.get('p99_bound_ms')} ms. "
             f"Machine: {meta.get('cores')} cores, {_f(meta.get('machine_busy_pct'), 0)} % busy during the latency "
             f"phase{_loadavg(meta)}; {meta.get('rounds', 5)} interleaved rounds.\n\n",
             "| target | mode | p50 | p99 | added p50 | added p50 per round: median (range) | added p99 | router CPU "
             "| CPU / request |\n|---|---|---|---|---|---|---|---|---|\n"]
    for t in doc["targets"]:
        for mode, m in t.get("latency", {}).items():
            per_round = m.get("added_p50_rounds_ms") or []
            spread = (f"{_f(m.get('added_p50_round_median_ms'), 3)} ms ({min(per_round):.3f} – {max(per_round):.3f})"
                      if per_round else "—")
            lines.append(f"| {t['target']} | {mode} | {m['p50_ms']:.3f} ms | {m['p99_ms']:.3f} ms | "
                         f"{_f(m.get('added_p50_ms'), 3)} ms | {spread} | {_f(m.get('added_p99_ms'), 3)} ms | "
                         f"{_f(m.get('router_cpu_pct'), 0)} % | {_f(t.get('cpu_us_per_request'), 0)} µs |\n")
    lines.append("\n| target | sustained req/s (p99 under bound) | p99 at that rate | rates tried |\n|---|---|---|---|\n")
    for t in doc["targets"]:
        if t.get("skipped"):
            continue
        thr = t.get("throughput") or {}
        tried = ", ".join(f"{s['rate']:.0f}→{s['p99_ms']:.1f} ms{'' if s['ok'] else ' ✗'}"
                          for s in thr.get("steps", []))
        lines.append(f"| {t['target']} | {_f(thr.get('sustained_rps'), 0)} | {_f(thr.get('p99_ms_at_sustained'), 2)} ms"
                     f" | {tried} |\n")
    for t in doc["targets"]:
        if t.get("skipped"):
            msg = [ln.strip() for ln in str(t["skipped"]).splitlines() if ln.strip()]
            short = msg[0] if len(msg) < 2 else f"{msg[0]} … {msg[-1]}"
            lines.append(f"\n- {t['target']}: skipped — {short}\n")
    try:
        plot_overhead(doc, out / png)
        lines.append(f"\n![added latency]({png})\n")
    except Exception as e:  # noqa: BLE001 - the table is the main output
        lines.append(f"\n(plot failed: {e})\n")
    return "".join(lines)


def _loadavg(meta: dict[str, Any]) -> str:
    load = meta.get("loadavg")
    return f", load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}" if load else ""


def plot_overhead(doc: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    targets = [t for t in doc["targets"] if t.get("latency")]
    modes = sorted({m for t in targets for m in t["latency"]})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / max(1, len(modes))
    for j, mode in enumerate(modes):
        xs = [i + j * width for i in range(len(targets))]
        ax.bar(xs, [t["latency"].get(mode, {}).get("p50_ms", 0) for t in targets], width=width, label=f"{mode} p50")
        ax.scatter(xs, [t["latency"].get(mode, {}).get("p99_ms", 0) for t in targets], marker="_", s=200,
                   color="black")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(targets))])
    ax.set_xticklabels([t["target"] for t in targets], rotation=30, ha="right")
    ax.set_ylabel("latency at concurrency 1 (ms; bar p50, dash p99)")
    ax.set_yscale("log")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_report(inputs: Sequence[str | Path], out_dir: Path | None = None) -> Path:
    """Write report.md and the plots; returns the report path."""
    docs = collect(inputs)
    if not docs:
        raise SystemExit("no result files found in " + ", ".join(map(str, inputs)))
    if out_dir is None:
        first = Path(docs[0]["_path"]).parent
        out_dir = first
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = ["# Benchmark report\n\n"]
    runs = [d for d in docs if "requests" in d and d["meta"].get("kind") != "overhead"]
    by_spec: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for d in runs:
        # a steady-state run (--warmup) is its own workload: cold and warm rows never share a table
        by_spec[d["meta"].get("spec", "?") + ("-warm" if d["meta"].get("warmup_requests") else "")].append(d)
    all_summaries: list[dict[str, Any]] = []
    for spec, sdocs in sorted(by_spec.items()):
        summaries = [summarize(d) for d in sdocs]
        all_summaries += summaries
        meta0 = sdocs[0]["meta"]
        cap = meta0.get("capacity") or {}
        parts.append(f"## Workload `{spec}`\n\n")
        parts.append(
            f"Capacity {float(meta0.get('capacity_rps', 0)):.1f} requests per simulated second "
            f"(measured with `{cap.get('policy', '?')}`, {cap.get('inflight', '?')} in flight); "
            f"time-scale {meta0.get('time_scale')} (wall = simulated × time-scale); "
            f"state plane: {meta0.get('state_plane')}. TTFT and e2e in simulated milliseconds.\n\n")
        prefix = "" if len(by_spec) == 1 else f"{spec}_"
        for load in sorted({float(d["meta"]["load"]) for d in sdocs}):
            ldocs = [d for d in sdocs if float(d["meta"]["load"]) == load]
            lsum = [s for s in summaries if float(s["load"]) == load]
            rate = ldocs[0]["meta"].get("rate_rps")
            parts.append(f"### Load {int(round(100 * load))} % ({rate} requests/s simulated)\n\n")
            parts.append(load_table(lsum) + "\n")
            parts.append("CPU during the replay (100 % = one core):\n\n" + cpu_table(lsum) + "\n")
            name = f"{prefix}ttft_cdf_load{int(round(100 * load)):02d}.png"
            plot_cdf(ldocs, out_dir / name, f"{spec}: TTFT CDF at {int(round(100 * load))} % load")
            parts.append(f"![TTFT CDF at {int(round(100 * load))} %]({name})\n\n")
            parts.append("Disk-tier admissions against the bounds of the same trace (`bench.bounds`):\n\n"
                         + bound_table(ldocs) + "\n")
            placed = placement_table(ldocs)
            if placed:
                parts.append("What the placer did (stall in wall seconds, as budgeted):\n\n" + placed + "\n")
            name = f"{prefix}disk_admissions_load{int(round(100 * load)):02d}.png"
            plot_admissions(ldocs, out_dir / name, f"{spec}: disk-tier admissions at {int(round(100 * load))} % load")
            parts.append(f"![disk-tier admissions at {int(round(100 * load))} %]({name})\n\n")
        p99 = plot_p99_vs_load(summaries, out_dir / f"{prefix}p99_vs_load.png", f"{spec}: p99 TTFT vs load")
        hits = plot_hit_rates(summaries, out_dir / f"{prefix}hit_rates.png", f"{spec}: hit rates")
        parts.append(f"![p99 TTFT vs load]({p99.name})\n\n![hit rates]({hits.name})\n\n")
    if runs:
        plot_p99_by_workload(runs, out_dir / "p99_by_workload.png", "p99 TTFT by workload")
        parts.append("![p99 TTFT by workload](p99_by_workload.png)\n\n")
    overheads = [d for d in docs if d["meta"].get("kind") == "overhead"]
    for i, d in enumerate(overheads):
        png = "overhead.png" if len(overheads) == 1 else f"overhead_{i + 1}.png"
        parts.append(overhead_section(d, out_dir, png) + "\n")
    report = out_dir / "report.md"
    report.write_text("".join(parts))
    (out_dir / "summary.json").write_text(json.dumps(
        [{k: v for k, v in s.items() if k != "cpu"} for s in all_summaries], indent=2))
    return report
