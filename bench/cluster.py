"""The simulated production set-up a benchmark runs against, started as real processes.

``BenchCluster`` starts, in this order, each on free loopback ports:

1. one shared adapter folder with a tiny real PEFT adapter per workload adapter (every pod's
   "disk": the simulator's ``--adapter-dir``, vLLM's filesystem resolver folder);
2. ``loraroute sim cluster`` with the spec's pods, profile and LoRA limits (one process);
3. Redis (``loraroute.services.start_redis``) and one ``loraroute sidecar`` per pod publishing
   PodState to it, as in production; when the sidecar command is not available the gateway's
   in-process monitors with the in-memory store are used instead (recorded as ``state_plane``);
4. the router under test: ``loraroute gateway --config FILE`` with a preset (``start_gateways``:
   one or several replicas, each its own process on its own port, all on the same store), a peer
   router from its own venv (``bench.peers``), or nothing (``direct``: requests go to pod 0).

Simulated time: every simulator duration is multiplied by ``time_scale`` (> 1 slows the clock,
which leaves the CPU headroom so that client and router costs stay small against model time).
"""

from __future__ import annotations

import importlib.util
import json
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench import peers as peers_mod
from bench.workload import WorkloadSpec, sim_profile_args
from loraroute import peft
from loraroute.procs import Proc, consecutive_free_ports, free_port, http_ready, loraroute_cmd, start_process
from loraroute.services import start_redis


@dataclass
class Pod:
    id: str
    url: str
    sidecar_url: str | None = None


@dataclass
class Target:
    """What routes the requests: ``policy`` (our gateway preset), ``peer`` or ``direct``.

    ``replicas`` > 1 (policies only) runs that many gateway replicas on the same store, reached
    as through a Service (``spread``: see ``bench.client.Spreader``); the label then reads
    ``default-x4`` (per-connection) or ``default-x4-req`` (per-request). ``placement`` (policies
    only) runs the placer and the placement-plan scorer (``bench.placement``); the label gains
    ``+placement``. ``sharing`` False (policies only) turns the replicas' shared routing state off
    (``sharing.enabled: false``, each replica routes on what it alone has seen); the label gains
    ``+unshared``. ``precise`` (policies only) runs the pods with KV events and the preset with
    ``precise-prefix`` in place of ``prefix-cache`` (``bench.precise``); the label gains ``+precise``."""

    kind: str
    name: str
    replicas: int = 1
    spread: str = "per-connection"
    placement: bool = False
    sharing: bool = True
    precise: bool = False

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError("replicas must be >= 1")
        if self.replicas > 1 and self.kind != "policy":
            raise ValueError(f"--replicas applies to our gateway only, not to {self.kind} targets")
        if self.placement and self.kind != "policy":
            raise ValueError(f"--placement applies to our gateway only, not to {self.kind} targets")
        if self.precise and self.kind != "policy":
            raise ValueError(f"--precise-prefix applies to our gateway only, not to {self.kind} targets")

    @property
    def label(self) -> str:
        base = self.name if self.kind == "policy" else f"{self.kind}:{self.name}"
        if self.replicas > 1:
            base += f"-x{self.replicas}" + ("-req" if self.spread == "per-request" else "")
        base = f"{base}+placement" if self.placement else base
        base = f"{base}+precise" if self.precise else base
        return base if self.sharing or self.kind != "policy" else f"{base}+unshared"

    @classmethod
    def parse(cls, label: str) -> Target:
        if label.startswith("peer:"):
            return cls("peer", label[5:])
        if label == "direct":
            return cls("direct", "direct")
        name = label.removeprefix("policy:")
        flags = {}
        for flag in ("unshared", "precise", "placement"):
            flags[flag] = name.endswith(f"+{flag}")
            name = name.removesuffix(f"+{flag}")
        return cls("policy", name, placement=flags["placement"], sharing=not flags["unshared"],
                   precise=flags["precise"])


def make_adapters(spec: WorkloadSpec, root: Path) -> Path:
    """One tiny real adapter folder per spec adapter (idempotent)."""
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, rank) in enumerate(spec.adapters.all()):
        if not (root / name / "adapter_model.safetensors").exists():
            peft.make_adapter(root / name, base_model=spec.cluster.base_model, rank=rank, seed=i)
    return root


def get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback only
        return json.loads(resp.read())


def module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@dataclass
class BenchCluster:
    spec: WorkloadSpec
    work_dir: Path
    time_scale: float = 1.0
    sidecars: bool | None = None        # None: use them when the sidecar command exists
    zero_delay: bool = False            # simulator --time-scale 0 (overhead benchmark)
    pods_override: int | None = None
    kv_events: bool = False             # pods publish KV events, followed by sidecars or the gateway
    kv_ports: tuple[int, int] | None = None  # first PUB and replay port (pod i: + i)
    procs: list[Proc] = field(default_factory=list)
    pods: list[Pod] = field(default_factory=list)
    redis_url: str | None = None
    state_plane: str = "none"
    sim_proc: Proc | None = None

    @property
    def log_dir(self) -> Path:
        return self.work_dir / "logs"

    # ------------------------------------------------------------------ simulated pods
    def start(self) -> BenchCluster:
        adapter_dir = make_adapters(self.spec, self.work_dir / "adapters")
        c = self.spec.cluster
        n = self.pods_override or c.pods
        base_port = consecutive_free_ports(n)
        scale = "0" if self.zero_delay else repr(self.time_scale)
        argv = loraroute_cmd(
            "sim", "cluster", "--pods", str(n), "--base-port", str(base_port),
            "--model", c.base_model, "--enable-lora", "--allow-runtime-lora-updating",
            "--max-loras", str(c.max_loras), "--max-cpu-loras", str(c.max_cpu_loras),
            "--max-lora-rank", str(c.max_lora_rank), "--adapter-dir", str(adapter_dir),
            "--time-scale", scale, "--seed", str(self.spec.seed), *sim_profile_args(c), *c.sim_args,
        )
        if self.kv_events:
            pub = consecutive_free_ports(n, start=base_port + n)
            replay = consecutive_free_ports(n, start=pub + n)
            self.kv_ports = (pub, replay)
            argv += ["--kv-events-config", json.dumps({"enable_kv_cache_events": True, "endpoint": f"tcp://*:{pub}",
                                                       "replay_endpoint": f"tcp://*:{replay}"})]
        last = f"http://127.0.0.1:{base_port + n - 1}/health"
        self.sim_proc = start_process("sim", argv, ready_url=last, timeout=90, log_dir=self.log_dir)
        self.procs.append(self.sim_proc)
        deadline = time.monotonic() + 60
        self.pods = [Pod(f"pod-{i}", f"http://127.0.0.1:{base_port + i}") for i in range(n)]
        while not all(http_ready(p.url + "/health") for p in self.pods):
            if time.monotonic() > deadline:
                raise RuntimeError(f"simulated pods not healthy:\n{self.sim_proc.log_tail()}")
            time.sleep(0.1)
        use_sidecars = self.sidecars if self.sidecars is not None else module_available("vllm_sidecar.cli")
        if use_sidecars:
            self._start_state_plane()
        return self

    def adapter_dir_for(self, pod: Pod) -> Path:
        """The folder a pod's sidecar manages (its vLLM's resolver folder): one shared folder here."""
        return self.work_dir / "adapters"

    def sidecar_model_args(self) -> list[str]:
        """The sidecars' view of the pods' ``--model`` (adapters must name it)."""
        return ["--base-model", self.spec.cluster.base_model]

    def _start_state_plane(self) -> None:
        redis = start_redis(log_dir=self.log_dir)
        self.procs.append(redis)
        self.redis_url = str(redis.extra["url"])
        c = self.spec.cluster
        for pod in self.pods:
            port = free_port()
            argv = loraroute_cmd(
                "sidecar", "--vllm-url", pod.url, "--pod-id", pod.id, "--store-url", self.redis_url,
                "--host", "127.0.0.1", "--port", str(port),
                "--adapter-dir", str(self.adapter_dir_for(pod)),
                "--max-loras", str(c.max_loras), "--max-cpu-loras", str(c.max_cpu_loras),
                "--max-lora-rank", str(c.max_lora_rank), *self.sidecar_model_args(),
                # the simulated pods compile nothing on their first LoRA request (the compiled
                # profile), and a warm-up would load an adapter before the measured start state
                "--set", "warmup.enabled=false", *self._sidecar_kv_args(pod),
            )
            proc = start_process(f"sidecar-{pod.id}", argv, port=port,
                                 ready_url=f"http://127.0.0.1:{port}/healthz", timeout=60,
                                 log_dir=self.log_dir)
            self.procs.append(proc)
            pod.sidecar_url = proc.url
        self.state_plane = "sidecars+redis"

    def kv_endpoints(self, pod: Pod) -> tuple[str, str] | None:
        """(PUB, replay) addresses of a pod's KV events, when the pods publish them."""
        if self.kv_ports is None:
            return None
        i = self.pods.index(pod)
        return f"tcp://127.0.0.1:{self.kv_ports[0] + i}", f"tcp://127.0.0.1:{self.kv_ports[1] + i}"

    def _sidecar_kv_args(self, pod: Pod) -> list[str]:
        ends = self.kv_endpoints(pod)
        return [] if ends is None else ["--kv-events-endpoint", ends[0], "--kv-events-replay-endpoint", ends[1]]

    # ------------------------------------------------------------------ routers
    def gateway_config(self, policy: str, port: int) -> dict[str, Any]:
        c = self.spec.cluster
        static = []
        for pod in self.pods:
            entry: dict[str, Any] = {"id": pod.id, "url": pod.url, "max_lora_rank": c.max_lora_rank,
                                     "max_cpu_loras": c.max_cpu_loras}
            if pod.sidecar_url:
                entry["sidecar_url"] = pod.sidecar_url
            ends = self.kv_endpoints(pod)
            if ends is not None and not self.redis_url:  # one process: the gateway follows the pod itself
                entry["kv_events"] = {"endpoint": ends[0], "replay_endpoint": ends[1]}
            static.append(entry)
        return {
            "server": {"host": "127.0.0.1", "port": port, "reload_poll_s": 0, "log_level": "warning",
                       "timeouts": {"first_byte_s": 600.0, "total_s": 3600.0}},
            "bases": [{"name": c.base_model, "served_name": c.base_model, "aliases": ["base"],
                       "adapters": [{"name": n, "rank": r} for n, r in self.spec.adapters.all()],
                       # the pods are simulators: their tokenizer, exactly (read by precise-prefix only)
                       "tokenizer": {"mode": "sim" if self.kv_events else "none"}}],
            "discovery": {"static": static, "monitor": "never" if self.redis_url else "auto"},
            "store": {"url": self.redis_url or "memory://"},
            "pipeline": policy,
            "ensure": {"enabled": False},
            "metrics": {"enabled": True},
        }

    def start_gateway(self, policy: str, replica: int | None = None, extra: dict[str, Any] | None = None,
                      ready_timeout: float = 30.0, source: Path | None = None, name: str | None = None) -> Proc:
        """Our gateway with ``policy``. ``extra``: top-level config sections that replace the
        generated ones (e.g. placement); ``source``: run the code of another loraroute checkout
        instead of this one (the A/B of two versions in ``bench.overhead``)."""
        port = free_port()
        name = name or (f"gateway-{policy}" if replica is None else f"gateway-{policy}-{replica}")
        cfg_path = self.work_dir / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump({**self.gateway_config(policy, port), **(extra or {})}, sort_keys=False))
        argv = loraroute_cmd("gateway", "--config", str(cfg_path))
        env = {"PYTHONPATH": str(source)} if source is not None else None
        proc = start_process(name, argv, port=port, ready_url=f"http://127.0.0.1:{port}/health", timeout=60,
                             log_dir=self.log_dir, env=env, cwd=str(source) if source is not None else None)
        self.procs.append(proc)
        if self.state_plane == "none":
            self.state_plane = "gateway-monitors+memory"
        self._wait_gateway_ready(proc, ready_timeout)
        return proc

    def start_gateways(self, policy: str, replicas: int,
                       extras: list[dict[str, Any]] | None = None, ready_timeout: float = 30.0) -> list[Proc]:
        """``replicas`` gateways with the same configuration on one store (Redis with sidecars);
        ``extras[i]``: replica i's extra config sections (``start_gateway``).

        Without sidecars each replica would monitor the pods itself into its own memory store,
        which is not the shared set-up being measured, so several replicas need the sidecars."""
        if replicas == 1:
            return [self.start_gateway(policy, extra=extras[0] if extras else None, ready_timeout=ready_timeout)]
        if self.redis_url is None:
            raise RuntimeError("several gateway replicas need the sidecars and Redis (do not pass --no-sidecars)")
        return [self.start_gateway(policy, i, extras[i] if extras else None, ready_timeout) for i in range(replicas)]

    def _wait_gateway_ready(self, proc: Proc, timeout: float = 30.0) -> None:
        """Until /ready answers 200 (every pod known), bounded."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(proc.url + "/ready", timeout=2) as resp:  # noqa: S310
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)

    def start_peer(self, name: str) -> Proc:
        names = [n for n, _ in self.spec.adapters.all()] + [self.spec.cluster.base_model]
        proc = peers_mod.start_peer(name, [p.url for p in self.pods], names, log_dir=self.log_dir)
        self.procs.append(proc)
        if self.state_plane == "none":
            self.state_plane = "peer's own"
        return proc

    # ------------------------------------------------------------------ ground truth
    def sim_state(self, pod: Pod, limit: int | None = None) -> dict[str, Any]:
        """``GET /sim/state`` (``limit=0``: the counters and tiers without the request records)."""
        return get_json(pod.url + "/sim/state" + (f"?limit={limit}" if limit is not None else ""))

    def pids(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.procs:
            key = "sidecars" if p.name.startswith("sidecar-") else p.name
            if key == "sidecars":
                out[f"sidecar:{p.name[8:]}"] = p.popen.pid
            else:
                out[key] = p.popen.pid
        return out

    def stop(self) -> None:
        for p in reversed(self.procs):
            try:
                p.stop(timeout=5)
            except Exception:  # noqa: BLE001 - best effort teardown
                p.kill()
        self.procs.clear()

    def __enter__(self) -> BenchCluster:
        # a start that fails half-way (a sidecar that does not come up) raises before ``with``
        # owns the cluster, so __exit__ would not run: stop what did start (Redis, pods) here
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
