"""`loraroute bench gpu …` / `python3 -m bench.gpu …`: the offline GPU benchmark kit.

    wheelhouse [--out gpu-kit] [--part-mib 60] [--no-peer] [--glibc-minor 31]   (package access)
    parts split FILE DIR [--part-mib 60] | parts join DIR OUT                     (any machine)
    host unpack --parts DIR --dest DIR                                           (GPU host)
    host run --kit DIR --work DIR --spec FILE [...] [--detach]                   (GPU host)
    host status --work DIR | host wait --work DIR [--max-s 540] | host pack --work DIR --out DIR
    model --out DIR [--shape 8b|tiny] [--adapters SPEC]                          (model + adapters only)
    sim RESULTS --profile NAME [--time-scale X]                                  (the simulated counterpart)
    compare REAL SIM [--out FILE]                                                (real vs simulated tables)

Only ``parts`` and ``host unpack|status|wait|pack`` are guaranteed to run with the standard library
alone; the module imports what a command needs when it runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraroute bench gpu", description="the offline GPU benchmark kit")
    sub = p.add_subparsers(dest="cmd", required=True)

    w = sub.add_parser("wheelhouse", help="resolve, download, unpack, pack and split what the GPU host lacks")
    w.add_argument("--out", type=Path, default=Path("gpu-kit"), help="output folder (ignored by git)")
    w.add_argument("--part-mib", type=float, default=60.0, help="largest part, MiB (default 60)")
    w.add_argument("--host-list", type=Path, default=None,
                   help="the host's `pip list --format=freeze` (default: the H200 image's, bench/gpu/)")
    w.add_argument("--python-version", default="3.12")
    w.add_argument("--glibc-minor", type=int, default=31, help="the host's glibc is 2.N (default 31)")
    w.add_argument("--no-peer", action="store_true", help="leave sglang-router out")
    w.add_argument("--xz-preset", type=int, default=6)

    pa = sub.add_parser("parts", help="split a file into parts with a manifest, or join and verify them")
    pa_sub = pa.add_subparsers(dest="parts_cmd", required=True)
    ps = pa_sub.add_parser("split")
    ps.add_argument("file", type=Path)
    ps.add_argument("dir", type=Path)
    ps.add_argument("--part-mib", type=float, default=60.0)
    pj = pa_sub.add_parser("join")
    pj.add_argument("dir", type=Path)
    pj.add_argument("out", type=Path)

    h = sub.add_parser("host", help="the driver on the GPU host")
    h_sub = h.add_subparsers(dest="host_cmd", required=True)
    hu = h_sub.add_parser("unpack", help="join and verify the kit's parts, unpack the tree")
    hu.add_argument("--parts", type=Path, required=True, help="folder with the parts and manifest.json")
    hu.add_argument("--dest", type=Path, required=True, help="the tree goes to DEST/tree")
    hr = h_sub.add_parser("run", help="servers, state plane, gateway, replays (see bench/gpu/host.py)")
    hr.add_argument("--kit", type=Path, default=None, help="folder holding tree/ (put on PYTHONPATH)")
    hr.add_argument("--work", type=Path, required=True, help="everything the run writes")
    hr.add_argument("--spec", type=Path, required=True)
    hr.add_argument("--servers", type=int, default=None, help="default: the spec's cluster.pods")
    hr.add_argument("--gpu-memory-utilization", type=float, default=0.2)
    hr.add_argument("--compiled", action="store_true", help="CUDA graphs / torch.compile (default: --enforce-eager)")
    hr.add_argument("--max-model-len", type=int, default=4096)
    hr.add_argument("--shape", choices=("8b", "tiny"), default="8b")
    hr.add_argument("--policies", default=",".join(POLICY_NAMES), help="comma-separated; sglang = the peer")
    hr.add_argument("--phases", default=",".join(PHASE_NAMES), help="comma-separated subset of " + ",".join(PHASE_NAMES))
    hr.add_argument("--requests", type=int, default=None, help="per policy (default: the spec's)")
    hr.add_argument("--replay-s", type=float, default=None,
                    help="at most this many seconds of arrivals per policy (fewer requests when the rate is low)")
    hr.add_argument("--rate", type=float, default=None, help="requests/s of the replays; skips the ramp")
    hr.add_argument("--load", type=float, default=0.6, help="replay rate as a fraction of the ramp's capacity")
    hr.add_argument("--ramp-rates", default="1,2,3,4,6,8")
    hr.add_argument("--ramp-step-s", type=float, default=15.0)
    hr.add_argument("--ramp-ttft-p90-s", type=float, default=2.0)
    hr.add_argument("--budget-s", type=float, default=None, help="stop cleanly after this, keeping the results")
    hr.add_argument("--reserve-s", type=float, default=45.0, help="budget kept for stopping and packing")
    hr.add_argument("--drain-s", type=float, default=30.0, help="budget after a replay's last arrival")
    hr.add_argument("--server-start-s", type=float, default=None,
                    help="expected start-up of one server for the budget (default 60 eager, 150 compiled)")
    hr.add_argument("--server-cmd", default=None, help="a server command template instead of vLLM")
    hr.add_argument("--server-timeout-s", type=float, default=600.0)
    hr.add_argument("--threads-per-server", type=int, default=None,
                    help="OMP/MKL threads of each server (default: the host's cores / servers)")
    hr.add_argument("--poll-cost-s", type=float, default=10.0)
    hr.add_argument("--probe-trials", type=int, default=2)
    hr.add_argument("--share-trials", type=int, default=3, help="trials per busy-neighbour count of the sharing probe")
    hr.add_argument("--probe-rank", type=int, default=64)
    hr.add_argument("--code-version", default=None, help="recorded in the results (git describe of the copied code)")
    hr.add_argument("--detach", action="store_true", help="run detached from this shell; watch with host status/wait")
    hs = h_sub.add_parser("status", help="the run's status and last log lines")
    hs.add_argument("--work", type=Path, required=True)
    hw = h_sub.add_parser("wait", help="follow the log until the run ends or --max-s passes "
                                       "(exit 0 done, 1 failed, 3 stopped by the budget, 4 still running)")
    hw.add_argument("--work", type=Path, required=True)
    hw.add_argument("--max-s", type=float, default=540.0)
    hp = h_sub.add_parser("pack", help="results as <= 8 files of <= 16 MiB for copying back")
    hp.add_argument("--work", type=Path, required=True)
    hp.add_argument("--out", type=Path, required=True)
    hp.add_argument("--max-files", type=int, default=8)
    hp.add_argument("--max-file-mib", type=float, default=16.0)

    m = sub.add_parser("model", help="write the benchmark model folder and a spec's adapters")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--shape", choices=("8b", "tiny"), default="8b")
    m.add_argument("--spec", type=Path, default=None, help="also write the spec's adapters under OUT/adapters")

    si = sub.add_parser("sim", help="replay a real run's spec, rate and requests on the simulator")
    si.add_argument("results", type=Path, help="the real run's results/replays folder (or files)")
    si.add_argument("--spec", type=Path, default=None, help="default: each result's spec_path")
    si.add_argument("--profile", required=True, help="the simulator cost profile (cluster.profile)")
    si.add_argument("--sim-arg", action="append", default=[], help="extra `loraroute sim cluster` flag (repeatable)")
    si.add_argument("--gpu-share", type=Path, default=None, metavar="SHARE_JSON",
                    help="the run's share.json: the simulated pods share one GPU as the real servers did "
                         "(--pods-per-gpu = the run's servers, slowed by the factors its sharing probe measured)")
    si.add_argument("--time-scale", type=float, default=1.0)
    si.add_argument("--out", type=Path, default=Path("bench/results/gpu-sim"))

    c = sub.add_parser("compare", help="policies on the real servers, real vs simulated, the targets")
    c.add_argument("real", type=Path)
    c.add_argument("sim", type=Path, nargs="?", default=None)
    c.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    return p


POLICY_NAMES = ("default", "llm-d", "round-robin", "sglang")
PHASE_NAMES = ("build", "servers", "warmup", "share", "state", "capacity", "replay", "probe")


def _csv(value: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in value.split(",") if x.strip())


def _use_kit(kit: Path | None) -> None:
    """Put the kit's tree and this checkout first on the import path, here and for children."""
    paths = [str(REPO_ROOT)]
    if kit is not None:
        tree = kit / "tree"
        if not tree.is_dir():
            raise SystemExit(f"host run: {tree} does not exist; run `host unpack --parts … --dest {kit}` first")
        paths.insert(0, str(tree.resolve()))
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, *([old] if old else [])])
    os.environ.setdefault("PYTHONUNBUFFERED", "1")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _detach(argv: list[str], work: Path) -> int:
    """Start the same ``host run`` without ``--detach``, detached from this shell, output to driver.log."""
    work.mkdir(parents=True, exist_ok=True)
    rest = [a for a in argv if a != "--detach"]
    log = open(work / "driver.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([sys.executable, "-m", "bench.gpu", *rest], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(REPO_ROOT))
    (work / "driver.pid").write_text(str(proc.pid))
    print(f"driver started (pid {proc.pid}); follow it with: python3 -m bench.gpu host wait --work {work}")
    return 0


def _host(args: argparse.Namespace, argv: list[str]) -> int:
    from bench.gpu import status

    if args.host_cmd == "unpack":
        from bench.gpu import parts

        archive = args.dest / "kit.tar.xz"
        try:
            m = parts.join(args.parts, archive)
        except parts.PartsError as e:
            print(f"host unpack: {e}", file=sys.stderr)
            return 1
        print(f"joined and verified {len(m.parts)} parts ({m.size / parts.MIB:.1f} MiB)", flush=True)
        with tarfile.open(archive) as tar:
            tar.extractall(args.dest / "tree", filter="data")
        archive.unlink()
        print(f"unpacked into {args.dest / 'tree'} ({len(m.info.get('packages', []))} packages)")
        return 0
    if args.host_cmd == "status":
        state, text = status.describe(args.work)
        print(text)
        return 0 if state != "failed" else 1
    if args.host_cmd == "wait":
        state = status.wait(args.work, args.max_s)
        print(status.describe(args.work, 0)[1])
        return {"done": 0, "stopped": 3, "failed": 1}.get(state, 4)
    if args.host_cmd == "pack":
        m = status.pack(args.work, args.out, args.max_files, args.max_file_mib)
        for part in m.parts:
            print(args.out / part.file)
        return 0
    if args.detach:
        return _detach(argv, args.work)
    _use_kit(args.kit)
    from bench.gpu.host import Driver, HostOptions

    opts = HostOptions(
        work=args.work, spec_path=args.spec, servers=args.servers, gpu_memory_utilization=args.gpu_memory_utilization,
        compiled=args.compiled, max_model_len=args.max_model_len, shape=args.shape, policies=_csv(args.policies),
        phases=_csv(args.phases), requests=args.requests, replay_s=args.replay_s, rate=args.rate, load=args.load,
        ramp_rates=tuple(float(x) for x in _csv(args.ramp_rates)), ramp_step_s=args.ramp_step_s,
        ramp_ttft_p90_s=args.ramp_ttft_p90_s, budget_s=args.budget_s, reserve_s=args.reserve_s, drain_s=args.drain_s,
        server_start_s=args.server_start_s, server_cmd=args.server_cmd,
        server_timeout_s=args.server_timeout_s, threads_per_server=args.threads_per_server, poll_cost_s=args.poll_cost_s, probe_trials=args.probe_trials,
        share_trials=args.share_trials,
        probe_rank=args.probe_rank, code_version=args.code_version)
    unknown = set(opts.phases) - set(PHASE_NAMES) or set(opts.policies) - set(POLICY_NAMES)
    if unknown:
        print(f"host run: unknown phase or policy {sorted(unknown)}", file=sys.stderr)
        return 2
    from bench.workload import SpecError

    # SIGTERM (an operator's kill of the detached driver) unwinds like Ctrl-C: every server stopped
    signal.signal(signal.SIGTERM, _interrupt)

    try:
        driver = Driver(opts)
    except (SpecError, OSError) as e:
        print(f"host run: {e}", file=sys.stderr)
        return 2
    return driver.run()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.cmd == "host":
        return _host(args, argv)
    if args.cmd == "model":
        from bench.gpu import model

        shape = model.SHAPES[args.shape]
        model.write_model(args.out, shape)
        if args.spec:
            from bench.workload import load_spec

            spec = load_spec(args.spec)
            model.write_adapter_sets([args.out / "adapters"], spec.adapters.all(), base_model=spec.cluster.base_model,
                                     shape=shape)
        print(args.out)
        return 0
    if args.cmd in ("sim", "compare"):
        from bench.gpu import counterpart
        from bench.report import collect

        real = [d for d in collect([args.results if args.cmd == "sim" else args.real])
                if d["meta"].get("kind") == "real-vllm"]
        if not real:
            print("no real-vLLM result files found", file=sys.stderr)
            return 1
        if args.cmd == "sim":
            spec = args.spec or Path(real[0]["meta"]["spec_path"])
            sim_args = list(args.sim_arg)
            if args.gpu_share:
                sim_args += ["--pods-per-gpu", str(len(real[0]["meta"]["pods"])), "--gpu-share", str(args.gpu_share.absolute())]
            try:
                paths = counterpart.simulate(real, spec, args.profile, args.out, sim_args=sim_args,
                                             time_scale=args.time_scale)
            except ValueError as e:
                print(f"sim: {e}", file=sys.stderr)
                return 1
            for path in paths:
                print(path)
            return 0
        sim = collect([args.sim]) if args.sim else []
        text = counterpart.report(real, [d for d in sim if d["meta"].get("kind") != "real-vllm"])
        if args.out:
            args.out.write_text(text)
        print(text)
        return 0
    if args.cmd == "wheelhouse":
        from bench.gpu import wheelhouse as wh

        reqs = [wh.VLLM_REQUIREMENT, *wh.LORAROUTE_REQUIREMENTS, *(() if args.no_peer else wh.PEER_REQUIREMENTS)]
        opts = wh.WheelhouseOptions(out_dir=args.out, requirements=reqs, host_list=args.host_list or wh.HOST_LIST,
                                    python_version=args.python_version, glibc_minor=args.glibc_minor,
                                    part_mib=args.part_mib, xz_preset=args.xz_preset)
        try:
            manifest = wh.build(opts)
        except RuntimeError as e:
            print(f"wheelhouse: {e}", file=sys.stderr)
            return 1
        for part in manifest.parts:
            print(args.out / "parts" / part.file)
        print(args.out / "parts" / "manifest.json")
        return 0
    if args.cmd == "parts":
        from bench.gpu import parts

        try:
            if args.parts_cmd == "split":
                m = parts.split(args.file, args.dir, int(args.part_mib * parts.MIB))
                print(f"{len(m.parts)} parts of {m.file} in {args.dir}")
            else:
                m = parts.join(args.dir, args.out)
                print(f"joined {len(m.parts)} parts into {args.out} ({m.size} bytes, sha256 ok)")
        except parts.PartsError as e:
            print(f"parts: {e}", file=sys.stderr)
            return 1
        return 0
    return 2
