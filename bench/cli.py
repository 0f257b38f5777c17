"""`loraroute bench workload|run|report|overhead|peers ...`.

    loraroute bench workload SPEC --rate R [--requests N] [--out trace.jsonl]
    loraroute bench run SPEC (--policy NAME | --peer NAME | --direct) [--load 0.6 ...]
                         [--requests N] [--time-scale X] [--capacity R] [--remeasure]
                         [--replicas N [--spread per-connection|per-request]] [--no-sharing]
                         [--precise-prefix]
    loraroute bench run SPEC --all [--load ...]       every preset and every installed peer
    loraroute bench run SPEC --policy NAME --placement [--no-persisted-demand] [--plan-weight W]
    loraroute bench report RESULTS... [--out DIR]
    loraroute bench plan SPEC                         the placement plan from yesterday's demand
    loraroute bench learning SPEC [--requests 2000] [--scenario NAME ...] [--mode NAME ...]
                                                      does estimated-ttft learn unknown costs
    loraroute bench overhead [--requests 300] [--peers all|none|NAME,...] [--rounds 5]
                             [--baseline-tree DIR] [--out FILE]
    loraroute bench peers setup [NAME ...] | loraroute bench peers list
    loraroute bench gpu ...                           the offline GPU kit (bench/gpu/cli.py)
    loraroute bench reliability hostile|outage|chaos|secrets|soak   (bench/reliability.py)
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

PRESETS = ("default", "llm-d", "round-robin", "random", "least-loaded")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraroute bench", description="workloads, benchmark runs and reports")
    sub = p.add_subparsers(dest="cmd", required=True)

    w = sub.add_parser("workload", help="expand a workload spec into a JSONL trace")
    w.add_argument("spec", type=Path)
    w.add_argument("--rate", type=float, required=True, help="mean arrival rate, requests per second")
    w.add_argument("--requests", type=int, default=None)
    w.add_argument("--duration", type=float, default=None, help="seconds of arrivals instead of a count")
    w.add_argument("--out", type=Path, default=None, help="trace file (default: print a summary only)")

    r = sub.add_parser("run", help="run one target (or all) over the spec's load levels")
    r.add_argument("spec", type=Path)
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--policy", choices=PRESETS)
    g.add_argument("--peer")
    g.add_argument("--direct", action="store_true", help="no router: every request to pod 0")
    g.add_argument("--all", action="store_true", help="every preset, then every installed peer")
    r.add_argument("--load", type=float, action="append", default=None,
                   help="fraction of capacity (repeatable); default: the spec's loads")
    r.add_argument("--requests", type=int, default=None, help="requests per load point (default: spec)")
    r.add_argument("--time-scale", type=float, default=5.0,
                   help="simulated clock factor, > 1 slows it (default 5: leaves CPU headroom)")
    r.add_argument("--capacity", type=float, default=None, help="requests per simulated second; skips measuring")
    r.add_argument("--remeasure", action="store_true", help="measure capacity again")
    r.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    r.add_argument("--no-sidecars", action="store_true", help="gateway monitors pods itself (embedded mode)")
    r.add_argument("--warmup", action="store_true",
                   help="serve every adapter's system prompts once before measuring (steady state); "
                        "results go to <spec>-warm/")
    r.add_argument("--replicas", type=int, default=1,
                   help="gateway replicas on the same store (--policy only; default 1)")
    r.add_argument("--spread", choices=("per-connection", "per-request"), default="per-connection",
                   help="how the client spreads requests over replicas, as a Service would: round-robin "
                        "per new connection (default, kube-proxy IPVS) or per request")
    r.add_argument("--no-sharing", action="store_true",
                   help="replicas do not share routing state (sharing.enabled: false; label +unshared)")
    r.add_argument("--placement", action="store_true",
                   help="with the placer and the placement-plan scorer (policies only); the store is seeded "
                        "with yesterday's demand first, so a cold cluster is warmed before the replay")
    r.add_argument("--no-persisted-demand", action="store_true",
                   help="with --placement: start without yesterday's demand (the placer learns it live)")
    r.add_argument("--plan-weight", type=float, default=0.5, help="weight of the placement-plan scorer (0.5)")
    r.add_argument("--precise-prefix", action="store_true",
                   help="pods publish KV events; the preset routes with precise-prefix in place of prefix-cache "
                        "(bench/precise.py; policies default and llm-d; label +precise)")
    r.add_argument("--keep-logs", action="store_true")
    r.add_argument("--quiet", action="store_true", help="no progress bar")

    rp = sub.add_parser("report", help="Markdown tables and PNG plots from result files")
    rp.add_argument("results", nargs="+", type=Path)
    rp.add_argument("--out", type=Path, default=None)

    pl = sub.add_parser("plan", help="the placement plan a cluster of the spec gets from yesterday's demand")
    pl.add_argument("spec", type=Path)

    le = sub.add_parser("learning", help="estimated-ttft with and without learning on clusters of unknown costs")
    le.add_argument("spec", type=Path)
    le.add_argument("--scenario", action="append", default=None, help="slow-loads, fast-loads (default: both)")
    le.add_argument("--mode", action="append", default=None, help="defaults, learning, true-values (default: all)")
    le.add_argument("--load", type=float, default=0.6, help="fraction of capacity (default 0.6)")
    le.add_argument("--requests", type=int, default=2000)
    le.add_argument("--window", type=int, default=200, help="requests per p99 window in the report")
    le.add_argument("--time-scale", type=float, default=1.0)
    le.add_argument("--capacity", type=float, default=None, help="requests per simulated second; skips measuring")
    le.add_argument("--out-dir", type=Path, default=Path("bench/results/learning"))
    le.add_argument("--report-only", action="store_true", help="rebuild report.md and the plots from the results")

    o = sub.add_parser("overhead", help="added latency and max rate of each router on zero-delay pods")
    o.add_argument("--requests", type=int, default=300, help="sequential requests per mode (default 300)")
    o.add_argument("--peers", default="all", help="all, none, or a comma-separated list")
    o.add_argument("--p99-bound-ms", type=float, default=50.0)
    o.add_argument("--rates", default="100,200,400,800,1200,1600",
                   help="offered rates (req/s) tried for throughput, ascending")
    o.add_argument("--rate-duration", type=float, default=5.0, help="seconds per offered rate")
    o.add_argument("--out", type=Path, default=Path("bench/results/overhead/overhead.json"))
    o.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the latency phase (default 5)")
    o.add_argument("--baseline-tree", type=Path, default=None,
                   help="another loraroute checkout whose gateway runs as one more interleaved target (A/B)")
    o.add_argument("--sharing-ab", action="store_true",
                   help="two more targets on one Redis: shared routing state on (with an idle peer) and off")

    pe = sub.add_parser("peers", help="install or list the peer routers")
    pe_sub = pe.add_subparsers(dest="peers_cmd", required=True)
    ps = pe_sub.add_parser("setup", help="create .bench-venvs/<peer> and pip-install each peer")
    ps.add_argument("names", nargs="*")
    pe_sub.add_parser("list", help="which peers are usable")
    sub.add_parser("gpu", help="the offline GPU benchmark kit: `loraroute bench gpu --help`", add_help=False)
    sub.add_parser("reliability", help="the reliability targets: `loraroute bench reliability --help`",
                   add_help=False)
    return p


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so every started process (pods, sidecars, routers) is stopped."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # every command may have started processes (pods, sidecars, routers): SIGTERM unwinds like Ctrl-C
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if argv[:1] == ["gpu"]:
        from bench.gpu.cli import main as gpu_main

        return gpu_main(argv[1:])
    if argv[:1] == ["reliability"]:
        from bench.reliability import main as reliability_main

        return reliability_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.cmd == "workload":
        from bench.workload import generate, load_spec, summarize, write_trace

        spec = load_spec(args.spec)
        trace = generate(spec, args.rate, args.requests, args.duration)
        if args.out:
            write_trace(args.out, trace, {"spec": spec.name, "seed": spec.seed, "rate": args.rate})
            print(f"wrote {len(trace)} requests to {args.out}")
        for k, v in summarize(trace).items():
            print(f"{k:>26}: {v}")
        return 0
    if args.cmd == "run":
        if args.replicas < 1 or (args.replicas > 1 and not args.policy):
            print("loraroute bench run: error: --replicas N (>= 1) needs --policy", file=sys.stderr)
            return 2
        from bench import peers
        from bench.cluster import Target
        from bench.placement import PlacementOptions
        from bench.runner import RunOptions, run

        if args.placement and not args.policy:
            print("--placement needs --policy (peers and direct have no placer)", file=sys.stderr)
            return 2
        if args.precise_prefix and args.policy not in ("default", "llm-d"):
            print("--precise-prefix needs --policy default or llm-d (it replaces their prefix-cache scorer)",
                  file=sys.stderr)
            return 2

        if args.all:
            targets = [Target("policy", p) for p in PRESETS]
            for name in peers.PEERS:
                ok, reason = peers.peer_available(name)
                if ok:
                    targets.append(Target("peer", name))
                else:
                    print(f"skipping peer {name}: {reason}", file=sys.stderr)
        elif args.policy:
            targets = [Target("policy", args.policy, args.replicas, args.spread, placement=args.placement,
                              sharing=not args.no_sharing, precise=args.precise_prefix)]
        elif args.peer:
            targets = [Target("peer", args.peer)]
        else:
            targets = [Target("direct", "direct")]
        written = []
        for target in targets:
            opts = RunOptions(
                spec_path=args.spec, target=target, loads=args.load, requests=args.requests,
                time_scale=args.time_scale, capacity=args.capacity, remeasure=args.remeasure,
                out_dir=args.out_dir, progress=not args.quiet, keep_logs=args.keep_logs,
                sidecars=False if args.no_sidecars else None, warmup=args.warmup,
                placement=PlacementOptions(weight=args.plan_weight, persisted=not args.no_persisted_demand),
            )
            written += run(opts)
        for path in written:
            print(path)
        return 0 if written else 1
    if args.cmd == "report":
        from bench.report import build_report

        print(build_report(args.results, args.out))
        return 0
    if args.cmd == "plan":
        from bench.placement import spec_plan
        from bench.workload import load_spec

        plan = spec_plan(load_spec(args.spec))
        roles = plan.role_counts()
        print(f"roles: {roles['hot']} hot, {roles['warm']} warm, {roles['tail']} tail (with demand)")
        hot = sorted((a for a in plan.adapters.values() if a.role == "hot"), key=lambda a: -a.share)
        print("hot replicas: " + ", ".join(f"{a.adapter} x{len(a.pods)}" for a in hot))
        for pod_id, pp in sorted(plan.pods.items()):
            print(f"{pod_id}: planned share {pp.load:.3f}, GPU {', '.join(pp.gpu) or '-'}; CPU {', '.join(pp.cpu) or '-'}")
        return 0
    if args.cmd == "learning":
        from bench import learning

        if args.report_only:
            print(learning.report(args.out_dir, args.window))
            return 0
        lopts = learning.LearningOptions(
            spec_path=args.spec, scenarios=tuple(args.scenario or learning.SCENARIOS),
            modes=tuple(args.mode or learning.MODES), load=args.load, requests=args.requests,
            time_scale=args.time_scale, window=args.window, out_dir=args.out_dir, capacity=args.capacity)
        unknown = [s for s in lopts.scenarios if s not in learning.SCENARIOS] + [
            m for m in lopts.modes if m not in learning.MODES]
        if unknown:
            print(f"unknown scenario or mode: {', '.join(unknown)}", file=sys.stderr)
            return 2
        print(learning.run(lopts))
        return 0
    if args.cmd == "overhead":
        from bench.overhead import OverheadOptions, run_overhead

        rates = [float(x) for x in args.rates.split(",") if x.strip()]
        path = run_overhead(OverheadOptions(
            requests=args.requests, peers=args.peers, p99_bound_ms=args.p99_bound_ms, rates=rates,
            rate_duration_s=args.rate_duration, out=args.out, rounds=args.rounds,
            baseline_tree=args.baseline_tree.resolve() if args.baseline_tree else None,
            sharing_ab=args.sharing_ab))
        print(path)
        return 0
    if args.cmd == "peers":
        from bench import peers

        if args.peers_cmd == "setup":
            results = peers.setup(args.names or list(peers.PEERS))
            return 0 if all(not v.startswith("failed") for v in results.values()) else 1
        for name, spec in peers.PEERS.items():
            ok, reason = peers.peer_available(name)
            print(f"{name:<17} {'ok' if ok else 'missing':<8} {spec.description}" + ("" if ok else f" — {reason}"))
        return 0
    return 2
