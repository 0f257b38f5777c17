"""`host run`: real vLLM servers on one GPU host, loraroute in front, a workload replayed per policy.

Phases, in order (``--phases`` picks a subset; each prints progress lines and is recorded in
``<work>/status.json``):

1. ``build``: the model folder (``bench.gpu.model``: 8B-shaped config, offline tokenizer, chat
   template) and the spec's adapters, one folder per server (``<work>/adapters/s<i>``: each server
   reads its own files), plus a ``warmup`` adapter;
2. ``servers``: N servers started one after another, each once the previous one answers
   ``/health`` (``bench.gpu.servers``); a server that dies prints its last log lines;
3. ``warmup``: one LoRA request per server (an eager engine JIT-compiles its LoRA kernels on the
   first one), then the warm-up adapter is unloaded;
4. ``share``: the sharing probe (``bench.gpu.share_probe``; needs two servers): how much slower
   s0's prefill, decode and adapter load are with 0 … N-1 other servers busy on the GPU, the
   factors ``loraroute sim cluster --gpu-share`` reads (``<work>/results/share.json``);
5. ``state``: Redis and one sidecar per server; the API servers' CPU is measured for
   ``poll_cost_s`` before and after the sidecars start polling ``/metrics`` and ``/v1/models``;
6. ``capacity``: a short ramp through the gateway with the ``least-loaded`` preset (open-loop
   steps of ``ramp_step_s`` at rising rates, each drained; a step passes when every request
   succeeds and TTFT p90 ≤ ``ramp_ttft_p90_s``); capacity = the last passing rate, and the replay
   rate = ``load`` × capacity (``--rate`` skips the ramp);
7. ``replay <policy>`` for each policy (``default``, ``llm-d``, ``round-robin``, and ``sglang`` when
   sglang-router is importable): every server reset (adapters unloaded, prefix cache reset), the
   router started, the same trace replayed open-loop with streaming requests, the result written
   with ``bench run``'s schema to ``<work>/results/replays/<spec>/<target>-loadNN.json``, each
   server's ``/metrics`` and ``/v1/models`` to ``<work>/results/servers/<target>/``;
8. ``probe``: the load probe (``bench.gpu.probe``; needs two servers), last so that a tight budget
   cuts it rather than a replay;
9. everything stopped; ``<work>/results/run.json`` holds the run's facts.

``--budget-s``: before a phase starts the driver checks the time left; a replay's trace is cut to
what fits; when the budget is spent the driver stops everything and keeps what it has
(``state: stopped``, exit 3). Each failure is a clear line and exit 1 (``state: failed``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.client import ReplayConfig, RequestResult, replay
from bench.cluster import BenchCluster, Pod, Target
from bench.gpu import model, probe, servers, share_probe
from bench.gpu.counterpart import estimate_tiers
from bench.gpu.status import Status
from bench.peers import sglang_argv, sglang_ready
from bench.procstats import CpuMeter
from bench.runner import _group_cpu, code_version, model_name, request_rows, result_path
from bench.stats import is_ok, percentile, summarize
from bench.workload import TraceRequest, WorkloadSpec, generate, load_spec
from loraroute.procs import Proc, free_port, start_process

PHASES = ("build", "servers", "warmup", "share", "state", "capacity", "replay", "probe")
POLICIES = ("default", "llm-d", "round-robin", "sglang")
WARMUP_ADAPTER = "warmup"
CAPACITY_POLICY = "least-loaded"
EXIT_STOPPED = 3          # the budget ran out; what was measured is kept


class PhaseError(RuntimeError):
    """A phase that cannot go on; the message is the operator's next step."""


class BudgetSpent(Exception):
    """The time budget ran out; what was measured so far is kept."""


@dataclass
class HostOptions:
    work: Path
    spec_path: Path
    servers: int | None = None                 # default: the spec's cluster.pods
    gpu_memory_utilization: float = 0.2
    compiled: bool = False
    max_model_len: int = 4096
    shape: str = "8b"
    policies: tuple[str, ...] = POLICIES
    phases: tuple[str, ...] = PHASES
    requests: int | None = None                # default: the spec's requests
    replay_s: float | None = None              # at most this many seconds of arrivals per policy
    rate: float | None = None                  # requests/s; skips the ramp
    load: float = 0.6
    ramp_rates: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
    ramp_step_s: float = 15.0
    ramp_ttft_p90_s: float = 2.0
    budget_s: float | None = None
    reserve_s: float = 45.0                    # kept for stopping and packing
    drain_s: float = 30.0                      # after a replay's last arrival, for its last answers
    server_start_s: float | None = None        # expected start-up (default 60 eager, 150 compiled)
    server_cmd: str | None = None              # a template instead of vLLM (bench.gpu.servers)
    server_timeout_s: float = 600.0
    threads_per_server: int | None = None      # default: the host's cores / servers
    poll_cost_s: float = 10.0
    probe_trials: int = 2
    share_trials: int = 3
    probe_rank: int = 64
    request_timeout_s: float = 300.0
    code_version: str | None = None            # recorded when the copy of the code has no git history
    python: str = sys.executable


class RealCluster(BenchCluster):
    """``BenchCluster``'s state plane and routers in front of servers started elsewhere; each
    sidecar manages its own server's adapter folder and validates against ``model_arg``, the
    servers' ``--model`` (a folder here, served under the spec's base model name)."""

    model_arg: str | None = None

    def sidecar_model_args(self) -> list[str]:
        if self.model_arg is None:
            return super().sidecar_model_args()
        return ["--base-model", self.model_arg, "--served-model-name", self.spec.cluster.base_model]

    def adapter_dir_for(self, pod: Pod) -> Path:
        return self.work_dir.parent / "adapters" / pod.id

    def start_state_plane(self) -> None:
        self._start_state_plane()


def _write_json(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))


@dataclass
class Driver:
    opts: HostOptions
    status: Status = field(init=False)
    spec: WorkloadSpec = field(init=False)
    launch: servers.ServerLaunch | None = None
    running: list[servers.Server] = field(default_factory=list)
    cluster: RealCluster | None = None
    facts: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.opts.work.mkdir(parents=True, exist_ok=True)
        self.status = Status(self.opts.work, self.opts.budget_s)
        self.spec = load_spec(self.opts.spec_path)
        n = self.opts.servers or self.spec.cluster.pods
        if n != self.spec.cluster.pods:
            self.spec = dataclasses.replace(self.spec, cluster=dataclasses.replace(self.spec.cluster, pods=n))
        self.results = self.opts.work / "results"
        self.facts = {"spec": self.spec.name, "spec_path": str(self.opts.spec_path), "servers": n,
                      "mode": "compiled" if self.opts.compiled else "eager",
                      "threads_per_server": self.threads_per_server,
                      "gpu_memory_utilization": self.opts.gpu_memory_utilization, "shape": self.opts.shape,
                      "code_version": self.opts.code_version or code_version(), "started_at": self.status.started_at}

    # ------------------------------------------------------------------ helpers
    @property
    def c(self) -> Any:
        return self.spec.cluster

    def say(self, message: str) -> None:
        self.status.say(message)

    @property
    def threads_per_server(self) -> int:
        """CPU threads each server's torch may use. Unbounded, each of N servers sizes its pools to
        every core: on a 16-core host with 4 eager servers, two simultaneous adapter loads took 16 s
        instead of 0.5 s and the host's load average was 25-30."""
        return self.opts.threads_per_server or max(1, (os.cpu_count() or 1) // self.c.pods)

    @property
    def model_arg(self) -> str:
        """The servers' ``--model``: the model folder, as adapters must name it."""
        return str((self.opts.work / "model").absolute())

    def _adapter_roots(self) -> list[Path]:
        return [self.opts.work / "adapters" / f"s{i}" for i in range(self.c.pods)]

    def _need(self, seconds: float, what: str) -> None:
        if self.status.remaining() - self.opts.reserve_s < seconds:
            raise BudgetSpent(f"{what} needs about {seconds:.0f}s; {self.status.remaining():.0f}s of the budget left")

    # ------------------------------------------------------------------ phases
    def build(self) -> None:
        shape = model.SHAPES[self.opts.shape]
        t0 = time.monotonic()
        model.write_model(self.opts.work / "model", shape)
        names = [*self.spec.adapters.all(), (WARMUP_ADAPTER, 8)]
        # vLLM's filesystem resolver compares base_model_name_or_path with the server's --model
        # (model_config.model: this folder), not with --served-model-name
        sizes = model.write_adapter_sets(self._adapter_roots(), names, base_model=self.model_arg, shape=shape)
        total = sum(sizes.values()) * self.c.pods
        self.facts["adapter_bytes"] = sizes
        self.say(f"model folder and {len(names)} adapters × {self.c.pods} server folders "
                 f"({total / 1e9:.1f} GB) in {time.monotonic() - t0:.1f}s")

    def start_servers(self) -> None:
        self.launch = servers.ServerLaunch(
            model_dir=Path(self.model_arg), served_name=self.c.base_model, max_loras=self.c.max_loras,
            max_cpu_loras=self.c.max_cpu_loras, max_lora_rank=self.c.max_lora_rank,
            gpu_memory_utilization=self.opts.gpu_memory_utilization, max_model_len=self.opts.max_model_len,
            compiled=self.opts.compiled, template=self.opts.server_cmd, python=self.opts.python,
            threads=self.threads_per_server)
        expected = self.opts.server_start_s or (150.0 if self.opts.compiled else 60.0)
        for i, root in enumerate(self._adapter_roots()):
            self._need(expected, f"starting server s{i}")
            self.say(f"starting server s{i} ({'compiled' if self.opts.compiled else 'eager'}, "
                     f"--gpu-memory-utilization {self.opts.gpu_memory_utilization}) ...")
            try:
                server = servers.start_server(self.launch, f"s{i}", root, self.opts.work / "logs",
                                              min(self.opts.server_timeout_s, self.status.remaining()))
            except servers.ServerError as e:
                raise PhaseError(str(e)) from None
            self.running.append(server)
            self.say(f"server s{i} ready at {server.url} after {server.ready_s:.1f}s"
                     + (f"; KV cache {server.kv_tokens:,} tokens ({server.kv_gib} GiB)" if server.kv_tokens else ""))
        self.facts["server_facts"] = [s.facts() for s in self.running]

    def warmup(self) -> None:
        rows = []
        for s in self.running:
            status, secs = servers.chat(s.url, WARMUP_ADAPTER)
            if status != 200:
                raise PhaseError(f"the warm-up LoRA request to {s.id} answered HTTP {status} "
                                 f"({servers.base_root(s.url)!r} serves; adapters name {self.model_arg!r}); "
                                 f"see {s.proc.log_path}")
            servers.unload(s.url, WARMUP_ADAPTER)
            rows.append({"server": s.id, "seconds": round(secs, 3)})
            self.say(f"{s.id}: first LoRA request {secs:.2f}s")
        self.facts["warmup"] = rows

    def _api_cpu(self, seconds: float) -> dict[str, float]:
        meter = CpuMeter({s.id: s.proc.popen.pid for s in self.running}, own_only={s.id for s in self.running})
        meter.start()
        time.sleep(seconds)
        return {k: v["cpu_pct"] for k, v in meter.stop().items() if k != "machine"}

    def state_plane(self) -> None:
        self.cluster = RealCluster(self.spec, self.opts.work / "stack")
        self.cluster.model_arg = self.model_arg
        self.cluster.pods = [Pod(s.id, s.url) for s in self.running]
        (self.opts.work / "stack").mkdir(parents=True, exist_ok=True)
        before = self._api_cpu(self.opts.poll_cost_s) if self.opts.poll_cost_s > 0 else {}
        self.cluster.start_state_plane()
        after = self._api_cpu(self.opts.poll_cost_s) if self.opts.poll_cost_s > 0 else {}
        self.facts["api_server_cpu_pct_idle"] = {"without_sidecars": before, "with_sidecars": after}
        self.say(f"Redis and {len(self.running)} sidecars up; idle API-server CPU without / with sidecar "
                 f"polling: {before} / {after} % of a core")

    def load_probe(self) -> None:
        if len(self.running) < 2:
            self.say("skipped: the load probe needs two servers")
            return
        lp = probe.LoadProbe(self.running, self.opts.work / "probe", served=self.c.base_model, model_arg=self.model_arg,
                             shape=model.SHAPES[self.opts.shape], rank=self.opts.probe_rank,
                             trials=self.opts.probe_trials, say=self.say)
        rows = lp.run()
        _write_json(self.results / "probe.json", {"rows": rows, "summary": probe.summarize(rows),
                                                 "mode": self.facts["mode"], "rank": self.opts.probe_rank})
        for line in probe.summarize(rows):
            self.say(f"{line['condition']}: load median {line['load_ms_median']} ms (max {line['load_ms_max']}), "
                     f"first use {line['first_use_ms_median']} ms, n={line['n']}")

    def share(self) -> None:
        if len(self.running) < 2:
            self.say("skipped: the sharing probe needs two servers")
            return
        self._need(60.0, "the sharing probe")
        sp = share_probe.ShareProbe(self.running, self.opts.work / "share", served=self.c.base_model,
                                    model_arg=self.model_arg, shape=model.SHAPES[self.opts.shape],
                                    rank=self.opts.probe_rank, trials=self.opts.share_trials, say=self.say)
        rows = sp.run()
        doc = {"factors": share_probe.factors(rows), "rows": rows, "mode": self.facts["mode"],
               "servers": len(self.running), "rank": self.opts.probe_rank}
        _write_json(self.results / "share.json", doc)
        self.say("slow-down with 0 … N-1 busy neighbours: "
                 + "; ".join(f"{kind} {' / '.join(f'{x:g}' for x in seq)}" for kind, seq in doc["factors"].items()))

    def reset_servers(self) -> None:
        notes = []
        for s in self.running:
            try:
                r = servers.reset(s)
            except servers.ServerError as e:
                raise PhaseError(str(e)) from None
            notes.append(r)
            if not r["prefix_cache_reset"]:
                self.say(f"WARNING {s.id}: POST /reset_prefix_cache answered {r.get('prefix_cache_reset_status')} "
                         "(vLLM needs VLLM_SERVER_DEV_MODE=1); its prefix cache is not reset")
        self.say("servers reset: " + ", ".join(f"{s.id} unloaded {n['unloaded']}" for s, n in zip(self.running, notes)))

    def _router(self, target: Target) -> tuple[str, Proc]:
        assert self.cluster is not None
        if target.kind == "policy":
            proc = self.cluster.start_gateway(target.name)
            return proc.url, proc
        port = free_port()
        argv = sglang_argv(self.opts.python, port, [s.url for s in self.running])
        proc = start_process("peer-sglang", argv, port=port, ready=lambda: sglang_ready(port), timeout=90,
                             log_dir=self.opts.work / "logs")
        self.cluster.procs.append(proc)
        return proc.url, proc

    def _stop_router(self, proc: Proc) -> None:
        assert self.cluster is not None
        proc.stop(timeout=10)
        if proc in self.cluster.procs:
            self.cluster.procs.remove(proc)

    def _replay(self, url: str, target: Target, trace: list[TraceRequest], label: str,
                timeout_s: float | None = None) -> list[RequestResult]:
        cfg = ReplayConfig(url=url, model_for=lambda r: model_name(target, self.spec, r), time_scale=1.0,
                           request_timeout_s=timeout_s or self.opts.request_timeout_s, progress_label=label,
                           extra_body={"ignore_eos": True})
        return asyncio.run(replay(trace, cfg))

    def capacity(self) -> dict[str, Any]:
        if self.opts.rate:
            return {"capacity_rps": self.opts.rate / self.opts.load, "policy": "rate given on the command line"}
        self.reset_servers()
        target = Target("policy", CAPACITY_POLICY)
        url, proc = self._router(target)
        steps = []
        passed = None
        try:
            for k, rate in enumerate(self.opts.ramp_rates):
                self._need(self.opts.ramp_step_s + self.opts.drain_s, f"ramp step {rate} req/s")
                spec_k = dataclasses.replace(self.spec, seed=self.spec.seed + 1000 + k)
                trace = generate(spec_k, rate=rate, requests=None, duration_s=self.opts.ramp_step_s)
                # an overloaded step must not hold the ramp for the full request timeout
                results = self._replay(url, target, trace, f"ramp {rate} req/s", timeout_s=self.opts.drain_s + 30)
                ok = [r for r in results if is_ok(r.to_dict())]
                p90 = percentile([r.ttft_s for r in ok if r.ttft_s is not None], 90)
                good = len(ok) == len(results) and p90 is not None and p90 <= self.opts.ramp_ttft_p90_s
                steps.append({"rate_rps": rate, "requests": len(results), "ok": len(ok), "ttft_p90_s": p90,
                              "passed": good})
                self.say(f"ramp {rate} req/s: {len(ok)}/{len(results)} ok, TTFT p90 "
                         f"{'-' if p90 is None else f'{p90:.2f}s'} → {'pass' if good else 'over capacity'}")
                if not good:
                    break
                passed = rate
        finally:
            self._stop_router(proc)
        if passed is None:
            passed = self.opts.ramp_rates[0] / 2
            self.say(f"even {self.opts.ramp_rates[0]} req/s was over capacity; taking {passed} req/s")
        return {"capacity_rps": passed, "policy": f"{CAPACITY_POLICY} ramp", "steps": steps,
                "ttft_p90_bound_s": self.opts.ramp_ttft_p90_s, "step_s": self.opts.ramp_step_s}

    def replay_policy(self, target: Target, trace: list[TraceRequest], cap: dict[str, Any], rate: float) -> Path:
        duration = trace[-1].t if trace else 0.0
        left = self.status.remaining() - self.opts.reserve_s - self.opts.drain_s
        if duration > left:
            trace = [r for r in trace if r.t <= left]
            if not trace:
                raise BudgetSpent(f"no time left for {target.label}")
            self.say(f"budget: the trace is cut to {len(trace)} requests ({left:.0f}s of arrivals)")
        self.reset_servers()
        url, proc = self._router(target)
        assert self.cluster is not None
        pids = {**{f"vllm:{s.id}": s.proc.popen.pid for s in self.running},
                **{f"vllm-api:{s.id}": s.proc.popen.pid for s in self.running},
                **{k: v for k, v in self.cluster.pids().items() if k != proc.name}, "router": proc.popen.pid}
        meter = CpuMeter(pids, own_only={f"vllm-api:{s.id}" for s in self.running})
        meter.start()
        t0 = time.monotonic()
        try:
            results = self._replay(url, target, trace, f"{target.label} @{rate:.2f} req/s")
        finally:
            wall = time.monotonic() - t0
            cpu = meter.stop()
            folder = self.results / "servers" / target.label.replace(":", "-")
            for s in self.running:
                servers.snapshot(s, folder, "after")
            if target.kind == "policy":
                (folder / "gateway-metrics.txt").write_bytes(servers.http("GET", url + "/metrics")[1])
            self._stop_router(proc)
        rows = request_rows(trace, results)
        estimate_tiers(rows, self.c.max_loras, self.c.max_cpu_loras)
        doc = {
            "meta": {
                "spec": self.spec.name, "spec_path": str(self.opts.spec_path), "target": target.label,
                "target_kind": target.kind, "load": self.opts.load, "rate_rps": round(rate, 3), "capacity": cap,
                "capacity_rps": cap["capacity_rps"], "time_scale": 1.0, "requests": len(rows),
                "pods": [s.id for s in self.running], "state_plane": self.cluster.state_plane,
                "ground_truth_joined": 0, "warmup_requests": 0, "wall_s": round(wall, 2), "cpu": _group_cpu(cpu),
                "cluster": self.spec.to_dict()["cluster"], "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "code_version": self.facts["code_version"], "kind": "real-vllm", "mode": self.facts["mode"],
                "gpu_memory_utilization": self.opts.gpu_memory_utilization, "tier_source": "lru-estimate",
            },
            "requests": rows,
        }
        doc["summary"] = summarize(doc)
        path = result_path(self.results / "replays", self.spec, target, self.opts.load)
        _write_json(path, doc)
        s = doc["summary"]
        self.say(f"{target.label}: ok {s['ok']}/{s['requests']}, TTFT p50 {s['ttft_p50'] or 0:.3f}s p90 "
                 f"{s['ttft_p90'] or 0:.3f}s p99 {s['ttft_p99'] or 0:.3f}s, per server {s['pod_counts']}")
        return path

    # ------------------------------------------------------------------ the run
    def _targets(self) -> list[Target]:
        out = []
        for p in self.opts.policies:
            if p == "sglang":
                if importlib.util.find_spec("sglang_router") is None:
                    self.say("sglang-router is not importable here: that peer is skipped")
                    continue
                out.append(Target("peer", "sglang"))
            else:
                out.append(Target("policy", p))
        return out

    def _phase(self, name: str, fn: Any) -> Any:
        self.status.begin(name)
        try:
            value = fn()
        except BaseException as e:
            self.status.end(False, str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
            raise
        self.status.end(True)
        return value

    def run(self) -> int:
        ph = set(self.opts.phases)
        state, error = "done", None
        try:
            if "build" in ph:
                self._phase("build", self.build)
            if "servers" in ph:
                self._phase("servers", self.start_servers)
            if "warmup" in ph and self.running:
                self._phase("warmup", self.warmup)
            if "share" in ph and self.running:
                self._phase("share", self.share)
            if ({"state", "capacity", "replay"} & ph) and self.running:
                self._phase("state", self.state_plane)
            if "replay" in ph and self.running:
                cap = self._phase("capacity", self.capacity)
                rate = self.opts.load * float(cap["capacity_rps"])
                self.facts["capacity"], self.facts["rate_rps"] = cap, rate
                n = self.opts.requests or self.spec.requests
                if n and self.opts.replay_s:   # the same, shorter trace for every policy
                    n = min(n, max(20, int(rate * self.opts.replay_s)))
                trace = generate(self.spec, rate=rate, requests=n, duration_s=None if n else self.spec.duration_s)
                self.say(f"replay rate {rate:.2f} req/s ({self.opts.load:g} × {cap['capacity_rps']:g}), "
                         f"{len(trace)} requests, {trace[-1].t:.0f}s of arrivals per policy")
                written, failed = [], []
                for target in self._targets():
                    try:
                        written.append(str(self._phase(f"replay {target.label}",
                                                       lambda t=target: self.replay_policy(t, trace, cap, rate))))
                    except (PhaseError, RuntimeError, OSError) as e:
                        # one router that fails (a peer that does not start) does not cost the others
                        failed.append(target.label)
                        self.say(f"FAILED {target.label}: {e}; going on with the next policy")
                self.facts["results"] = written
                if failed:
                    state, error = "failed", f"replays failed: {', '.join(failed)} (the others are kept)"
            if "probe" in ph and self.running:
                self._need(60.0, "the load probe")
                self._phase("probe", self.load_probe)
        except BudgetSpent as e:
            state, error = "stopped", f"budget spent: {e}"
            self.say(error)
        except (PhaseError, servers.ServerError, OSError, RuntimeError, ValueError) as e:
            state, error = "failed", str(e)
            self.say(f"FAILED: {e}")
        except KeyboardInterrupt:
            state, error = "stopped", "interrupted"
        finally:
            self.shutdown()
            self.facts["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            _write_json(self.results / "run.json", self.facts)
            self.status.finish(state, error)
        self.say(f"{state}; results in {self.results}")
        return {"done": 0, "stopped": EXIT_STOPPED}.get(state, 1)

    def shutdown(self) -> None:
        if self.running:
            for s in self.running:
                servers.snapshot(s, self.results / "servers" / "final", "final")
        if self.cluster is not None:
            self.cluster.stop()
        servers.stop_all(self.running)
