"""The reliability targets, one command each, against real processes on loopback.

    python -m bench.reliability hostile [--requests 2000] [--names 1000]
    python -m bench.reliability outage  [--outage-s 60] [--clients 6]
    python -m bench.reliability chaos   [--duration-s 80] [--kill-every-s 15] [--freeze-s 30]
    python -m bench.reliability secrets
    python -m bench.reliability soak    [--minutes 30] [--clients 4]

(also ``loraroute bench reliability ...``; every target but hostile takes ``--time-scale``, the
simulated pods' wall seconds per simulated second: > 1 slows them, for a machine short of CPU). Each starts what it measures — a Redis, simulated
vLLM pods (one process each, so one can be killed or frozen alone), a sidecar per pod publishing
into the Redis, one gateway — prints a JSON summary and writes it to ``--out``. ``--tree DIR`` runs
the gateway and the sidecars from another loraroute checkout (the figures of before a change; the
config then holds only keys that checkout knows). Results and commands: docs/reliability.md.

- **hostile**: every hand-written case of ``bench.hostile`` in turn, then randomly mangled bodies,
  until ``--requests``; an answer ≥ 500, no answer, an error outside OpenAI's shape, a stack trace
  or a secret is a violation; then ``--names`` distinct 1 MB model names, the gateway's RSS before
  and after (target: < 50 MiB growth).
- **outage**: closed-loop clients; after ``--pre-s`` the Redis process is killed, and started again
  on its port after ``--outage-s``; outcomes counted before, during and after (target: 0 failed).
- **chaos**: four pods; every ``--kill-every-s`` one of pods 0-2 is killed (SIGKILL) and started
  again 3 s later, and pod 3 is frozen (SIGSTOP) for ``--freeze-s``; targets: no failure before
  the first byte, every broken stream ends with the error event and ``[DONE]``, no request left
  without its first byte for 30 s.
- **secrets**: a Redis with a password, tenant, admin, scraper and sidecar keys; probes of the
  allowlist (case, aliases, encodings, look-alike names, path tricks) must never get a forbidden
  model served; a forbidden adapter must answer as an unknown one; no key and no password may
  appear in any answer, log line or ``--check-config`` output.
- **soak**: a steady mixed load for ``--minutes``; the gateway's RSS and open file descriptors
  sampled every 10 s (targets: RSS growth < 5 % after the first minute, descriptors flat, 0 errors).

Outcomes of a request (``Load``): ``ok``; ``failed`` (an error status or no connection before the
first byte); ``broken_clean`` (a stream that ended with the error event and ``[DONE]``);
``broken_dirty`` (a stream cut without them); ``no_answer`` (nothing for 30 s).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.hostile import MIB, chat, raw_cases, random_body, request, send_raw, violations
from bench.procstats import CpuMeter
from bench.runner import code_version
from loraroute import peft
from loraroute.procs import Proc, free_port, http_ready, loraroute_cmd, start_process
from loraroute.services import start_redis

BASE = "tsuzumi-base"
ADAPTERS = (("sql", 8), ("summarize", 16), ("chat", 8), ("support", 16))
ANSWER_WITHIN_S = 30.0


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# the processes
# --------------------------------------------------------------------------------------------
@dataclass
class Stack:
    """Redis, ``pods`` simulated pods with a sidecar each (or the gateway's own monitors when
    ``sidecars`` is False), one gateway. ``config`` is merged into the gateway's config."""

    work: Path
    pods: int = 3
    sidecars: bool = True
    tree: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)
    sim_args: tuple[str, ...] = ("--time-scale", "1")
    redis_password: str | None = None
    sidecar_env: dict[str, str] = field(default_factory=dict)
    gateway_env: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    sims: list[Proc] = field(default_factory=list)
    sim_ports: list[int] = field(default_factory=list)
    redis: Proc | None = None
    gateway: Proc | None = None

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    @property
    def url(self) -> str:
        assert self.gateway is not None
        return self.gateway.url

    @property
    def redis_url(self) -> str:
        assert self.redis is not None
        auth = f":{self.redis_password}@" if self.redis_password else ""
        return f"redis://{auth}127.0.0.1:{self.redis.port}/0"

    def _env(self, extra: dict[str, str]) -> dict[str, str] | None:
        env = dict(extra)
        if self.tree is not None:
            env["PYTHONPATH"] = str(self.tree)
        return env or None

    def start(self) -> Stack:
        self.logs.mkdir(parents=True, exist_ok=True)
        source = self.work / "adapter-source"
        peft.make_adapter_set(source, ADAPTERS, base_model=BASE)
        if self.sidecars:
            self.start_redis()
        for i in range(self.pods):
            port = free_port()
            self.sim_ports.append(port)
            self.sims.append(self._start_sim(i))
            if self.sidecars:
                self._start_sidecar(i, source)
        self._start_gateway()
        return self

    def _start_sim(self, i: int) -> Proc:
        port = self.sim_ports[i]
        cache = self.work / f"cache-{i}"
        cache.mkdir(exist_ok=True)
        if not self.sidecars:  # no sidecar fetches them: the pod's resolver folder holds them all
            peft.make_adapter_set(cache, ADAPTERS, base_model=BASE)
        proc = start_process(f"sim-{i}", loraroute_cmd(
            "sim", "--port", str(port), "--model", BASE, "--enable-lora", "--max-loras", "2", "--max-cpu-loras", "4",
            "--max-lora-rank", "16", "--adapter-dir", str(cache), "--allow-runtime-lora-updating", *self.sim_args),
            port=port, ready_url=f"http://127.0.0.1:{port}/health", timeout=60, log_dir=self.logs)
        self.procs.append(proc)
        return proc

    def _start_sidecar(self, i: int, source: Path) -> None:
        port = free_port()
        argv = loraroute_cmd(
            "sidecar", "--pod-id", f"pod-{i}", "--vllm-url", f"http://127.0.0.1:{self.sim_ports[i]}",
            "--port", str(port), "--sidecar-url", f"http://127.0.0.1:{port}", "--store-url", self.redis_url,
            "--adapter-dir", str(self.work / f"cache-{i}"), "--source-type", "local", "--source-path", str(source),
            "--base-model", BASE, "--served-model-name", BASE, "--max-lora-rank", "16", "--max-loras", "2",
            "--max-cpu-loras", "4")
        self.procs.append(start_process(f"sidecar-{i}", argv, port=port, ready_url=f"http://127.0.0.1:{port}/healthz",
                                        timeout=60, log_dir=self.logs, env=self._env(self.sidecar_env),
                                        cwd=str(self.tree) if self.tree else None))

    def _start_gateway(self) -> None:
        port = free_port()
        cfg: dict[str, Any] = {
            "server": {"port": port, "reload_poll_s": 0},
            "bases": [{"name": BASE, "adapters": [name for name, _ in ADAPTERS]}],
        }
        if self.sidecars:
            cfg["store"] = {"url": self.redis_url}
        else:
            cfg["discovery"] = {"static": [{"id": f"pod-{i}", "url": f"http://127.0.0.1:{p}"}
                                           for i, p in enumerate(self.sim_ports)]}
        for key, value in self.config.items():
            cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
        path = self.work / "gateway.yaml"
        path.write_text(yaml.safe_dump(cfg))
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            if not http_ready(url + "/health"):
                return False
            r = httpx.get(url + "/ready", timeout=2)
            return r.status_code == 200 and r.json().get("healthy_pods", 0) >= self.pods

        self.gateway = start_process("gateway", loraroute_cmd("gateway", "--config", str(path)), port=port,
                                     ready=ready, timeout=90, log_dir=self.logs, env=self._env(self.gateway_env),
                                     cwd=str(self.tree) if self.tree else None)
        self.procs.append(self.gateway)

    # --- chaos ---------------------------------------------------------------------------------
    def start_redis(self) -> None:
        port = self.redis.port if self.redis is not None else None
        self.redis = start_redis(port, log_dir=self.logs)
        self.procs.append(self.redis)
        if self.redis_password:
            import redis

            client = redis.Redis(host="127.0.0.1", port=self.redis.port)
            client.config_set("requirepass", self.redis_password)
            client.close()

    def stop_redis(self) -> None:
        assert self.redis is not None
        self.redis.kill()

    def kill_pod(self, i: int) -> None:
        self.sims[i].kill()

    def restart_pod(self, i: int) -> None:
        self.sims[i] = self._start_sim(i)

    def freeze_pod(self, i: int) -> None:
        os.kill(self.sims[i].popen.pid, signal.SIGSTOP)

    def thaw_pod(self, i: int) -> None:
        os.kill(self.sims[i].popen.pid, signal.SIGCONT)

    def gateway_rss_kib(self) -> int:
        assert self.gateway is not None
        for line in Path(f"/proc/{self.gateway.popen.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def gateway_fds(self) -> int:
        assert self.gateway is not None
        return len(os.listdir(f"/proc/{self.gateway.popen.pid}/fd"))

    def close(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(OSError):
                if proc.alive():
                    os.kill(proc.popen.pid, signal.SIGCONT)  # a frozen process cannot stop
                proc.stop()


# --------------------------------------------------------------------------------------------
# the load
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Outcome:
    started: float  # time.monotonic()
    ttfb_s: float | None
    took_s: float
    kind: str  # ok | failed | broken_clean | broken_dirty | no_answer
    status: int
    stream: bool
    pod: str
    detail: str = ""


class Load:
    """``clients`` closed-loop clients, each sending one request after the other: a mix of
    streamed and non-streamed chat completions over the allowlisted adapters."""

    def __init__(self, url: str, clients: int, *, key: str | None = None, seed: int = 1,
                 max_tokens: tuple[int, int] = (8, 48), stream_share: float = 0.5) -> None:
        self.url = url
        self.clients = clients
        self.key = key
        self.seed = seed
        self.max_tokens = max_tokens
        self.stream_share = stream_share
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> Load:
        for i in range(self.clients):
            t = threading.Thread(target=self._client, args=(random.Random(self.seed * 1000 + i),), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for t in self._threads:
            t.join(ANSWER_WITHIN_S + 10)
        return self.outcomes

    def _client(self, rng: random.Random) -> None:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        with httpx.Client(timeout=httpx.Timeout(ANSWER_WITHIN_S, connect=5.0), headers=headers) as client:
            while not self._stop.is_set():
                adapter = rng.choice(ADAPTERS)[0]
                body = {"model": f"{BASE}:{adapter}", "max_tokens": rng.randint(*self.max_tokens),
                        "messages": [{"role": "system", "content": f"You are the {adapter} assistant."},
                                     {"role": "user", "content": f"question {rng.randrange(10 ** 6)}"}]}
                stream = rng.random() < self.stream_share
                outcome = self._one(client, body, stream)
                with self._lock:
                    self.outcomes.append(outcome)
                time.sleep(rng.uniform(0.0, 0.05))

    def _one(self, client: httpx.Client, body: dict[str, Any], stream: bool) -> Outcome:
        t0 = time.monotonic()

        def done(kind: str, status: int, pod: str, detail: str = "", ttfb: float | None = None) -> Outcome:
            return Outcome(t0, ttfb, time.monotonic() - t0, kind, status, stream, pod, detail[:200])

        path = self.url + "/v1/chat/completions"
        try:
            if not stream:
                r = client.post(path, json=body)
                pod = r.headers.get("x-loraroute-pod", "")
                if r.status_code != 200:
                    return done("failed", r.status_code, pod, r.text, time.monotonic() - t0)
                return done("ok", 200, pod, ttfb=time.monotonic() - t0)
            with client.stream("POST", path, json={**body, "stream": True}) as resp:
                pod = resp.headers.get("x-loraroute-pod", "")
                if resp.status_code != 200:
                    resp.read()
                    return done("failed", resp.status_code, pod, resp.text, time.monotonic() - t0)
                ttfb = None
                lines: list[str] = []
                try:
                    for line in resp.iter_lines():
                        if ttfb is None:
                            ttfb = time.monotonic() - t0
                        if line:
                            lines.append(line)
                except httpx.ReadTimeout:
                    return done("no_answer", 200, pod, "nothing for 30 s mid-stream", ttfb)
                except httpx.HTTPError as exc:
                    return done("broken_dirty", 200, pod, f"{type(exc).__name__}", ttfb)
                if not lines or lines[-1] != "data: [DONE]":
                    return done("broken_dirty", 200, pod, lines[-1] if lines else "empty", ttfb)
                errors = [ln for ln in lines if ln.startswith('data: {"error"')]
                if errors:
                    return done("broken_clean", 200, pod, errors[0], ttfb)
                return done("ok", 200, pod, ttfb=ttfb)
        except httpx.ReadTimeout:
            return done("no_answer", 0, "", "no first byte within 30 s")
        except httpx.HTTPError as exc:
            return done("failed", 0, "", f"{type(exc).__name__}: {exc}")


def summarize(outcomes: list[Outcome], since: float | None = None, until: float | None = None) -> dict[str, Any]:
    """Counts by outcome, latencies (time to the first byte: median, p99) within a window."""
    sel = [o for o in outcomes if (since is None or o.started >= since) and (until is None or o.started < until)]
    kinds = Counter(o.kind for o in sel)
    ttfb = sorted(o.ttfb_s for o in sel if o.ttfb_s is not None and o.kind == "ok")
    out: dict[str, Any] = {"requests": len(sel), **{k: kinds.get(k, 0) for k in
                                                    ("ok", "failed", "broken_clean", "broken_dirty", "no_answer")}}
    if ttfb:
        out["ttfb_p50_ms"] = round(1000 * statistics.median(ttfb), 1)
        out["ttfb_p99_ms"] = round(1000 * ttfb[min(len(ttfb) - 1, int(0.99 * len(ttfb)))], 1)
    failed = Counter(f"{o.status} {o.detail[:90]}" for o in sel if o.kind in ("failed", "broken_dirty", "no_answer"))
    if failed:
        out["failures"] = dict(failed.most_common(8))
    return out


# --------------------------------------------------------------------------------------------
# the targets
# --------------------------------------------------------------------------------------------
KEYS = {"acme": "sk-acme-19f3c7", "lab": "sk-lab-5be20a", "admin": "sk-admin-c81d44", "scrape": "sk-scrape-77a0e1",
        "sidecar": "sidecar-token-3f9a0c", "redis": "redis-pass-d4e8b2"}


def _tenants(new_keys: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "tenants": [{"name": "acme", "api_key_sha256": [digest(KEYS["acme"])], "adapters": ["sql", "chat"]},
                    {"name": "lab", "api_key_sha256": [digest(KEYS["lab"])]}],
        "admin": {"api_key_sha256": [digest(KEYS["admin"])]},
    }
    if new_keys:
        cfg["metrics"] = {"auth": {"required": True, "api_key_sha256": [digest(KEYS["scrape"])]}}
    return cfg


def _sim(args: argparse.Namespace) -> tuple[str, ...]:
    return ("--time-scale", f"{args.time_scale:g}")


def run_hostile(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    stack = Stack(work, pods=1, sidecars=False, tree=args.tree, config=_tenants(args.tree is None),
                  sim_args=("--time-scale", "0")).start()
    try:
        port = int(stack.url.rsplit(":", 1)[1])
        rng = random.Random(7)
        statuses: Counter[int] = Counter()
        problems: Counter[str] = Counter()
        examples: dict[str, str] = {}
        sent = 0
        meter = CpuMeter({"gateway": stack.gateway.popen.pid})  # type: ignore[union-attr]
        meter.start()
        t0 = time.monotonic()
        cases = raw_cases(f"{BASE}:sql", KEYS["acme"])
        while sent < args.requests:
            if sent < len(cases) * 3:
                name, data = cases[sent % len(cases)]
            else:
                name = "random body"
                path = rng.choice(["/v1/chat/completions", "/v1/completions"])
                data = request(path, random_body(rng, f"{BASE}:sql"), rng.choice([KEYS["lab"], KEYS["acme"]]))
            answer = send_raw("127.0.0.1", port, data)
            sent += 1
            statuses[answer.status] += 1
            for problem in violations(answer, list(KEYS.values())):
                kind = problem.split(":")[0]
                problems[kind] += 1
                examples.setdefault(kind, f"{name}: {problem[:160]}")
        hostile_s = time.monotonic() - t0
        cpu = meter.stop()
        for i in range(10):  # warm the allocator up before the baseline
            send_raw("127.0.0.1", port, request("/v1/chat/completions", json.dumps(chat(f"w{i}" + "m" * MIB)).encode(),
                                                KEYS["lab"]))
        rss0 = stack.gateway_rss_kib()
        fds0 = stack.gateway_fds()
        for i in range(args.names):
            send_raw("127.0.0.1", port, request("/v1/chat/completions",
                                                json.dumps(chat(f"{i}-" + "n" * MIB)).encode(), KEYS["lab"]))
        rss1 = stack.gateway_rss_kib()
        log = stack.gateway.log_tail(10 ** 7)  # type: ignore[union-attr]
        return {
            "requests": sent, "seconds": round(hostile_s, 1), "statuses": dict(sorted(statuses.items())),
            "at_or_above_500": sum(n for s, n in statuses.items() if s >= 500),
            "no_answer": statuses.get(0, 0), "violations": dict(problems), "violation_examples": examples,
            "tracebacks_in_log": log.count("Traceback"),
            "megabyte_names": args.names, "rss_before_mib": round(rss0 / 1024, 1), "rss_after_mib": round(rss1 / 1024, 1),
            "rss_growth_mib": round((rss1 - rss0) / 1024, 1), "fds_before": fds0, "fds_after": stack.gateway_fds(),
            "cpu": cpu,
        }
    finally:
        stack.close()


def _outage_config(new_keys: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = {"admin": {"api_key_sha256": [digest(KEYS["admin"])]}}
    if new_keys:
        cfg["server"] = {"timeouts": {"idle_unhealthy_s": 2.0}}
    return cfg


def run_outage(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    stack = Stack(work, pods=3, tree=args.tree, config=_outage_config(args.tree is None), sim_args=_sim(args)).start()
    try:
        load = Load(stack.url, args.clients).start()
        meter = CpuMeter({"gateway": stack.gateway.popen.pid})  # type: ignore[union-attr]
        meter.start()
        time.sleep(args.pre_s)
        down = time.monotonic()
        stack.stop_redis()
        time.sleep(args.outage_s / 2)
        during = _admin_store(stack)
        time.sleep(args.outage_s / 2)
        up = time.monotonic()
        stack.start_redis()
        time.sleep(args.post_s)
        outcomes = load.stop()
        cpu = meter.stop()
        return {
            "outage_s": args.outage_s, "clients": args.clients,
            "before": summarize(outcomes, until=down), "during": summarize(outcomes, down, up),
            "after": summarize(outcomes, since=up), "total": summarize(outcomes),
            "store_during_outage": during, "cpu": cpu,
            "log_lines": [ln for ln in stack.gateway.log_tail(10 ** 6).splitlines()  # type: ignore[union-attr]
                          if "state store" in ln][:6],
        }
    finally:
        stack.close()


def _admin_store(stack: Stack) -> Any:
    try:
        return httpx.get(stack.url + "/admin/pods", headers={"Authorization": f"Bearer {KEYS['admin']}"},
                         timeout=5).json().get("store")
    except (httpx.HTTPError, ValueError):
        return None


def run_chaos(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    cfg = {"admin": {"api_key_sha256": [digest(KEYS["admin"])]}}
    if args.tree is None:
        cfg["server"] = {"timeouts": {"idle_unhealthy_s": 2.0}}  # type: ignore[assignment]
    stack = Stack(work, pods=4, tree=args.tree, config=cfg, sim_args=_sim(args)).start()
    events: list[str] = []
    try:
        load = Load(stack.url, args.clients).start()
        meter = CpuMeter({"gateway": stack.gateway.popen.pid})  # type: ignore[union-attr]
        meter.start()
        t0 = time.monotonic()
        next_kill = t0 + args.kill_every_s
        victim = 0
        frozen_at = t0 + 10.0
        thawed = False
        frozen = False
        pending_restart: tuple[float, int] | None = None
        while time.monotonic() - t0 < args.duration_s:
            now = time.monotonic()
            if not frozen and now >= frozen_at:
                stack.freeze_pod(3)
                frozen = True
                events.append(f"{now - t0:5.1f}s freeze pod-3")
            if frozen and not thawed and now >= frozen_at + args.freeze_s:
                stack.thaw_pod(3)
                thawed = True
                events.append(f"{now - t0:5.1f}s thaw pod-3")
            if now >= next_kill:
                stack.kill_pod(victim)
                events.append(f"{now - t0:5.1f}s kill pod-{victim}")
                pending_restart = (now + 3.0, victim)
                victim = (victim + 1) % 3
                next_kill += args.kill_every_s
            if pending_restart is not None and now >= pending_restart[0]:
                stack.restart_pod(pending_restart[1])
                events.append(f"{time.monotonic() - t0:5.1f}s restart pod-{pending_restart[1]}")
                pending_restart = None
            time.sleep(0.1)
        outcomes = load.stop()
        cpu = meter.stop()
        total = summarize(outcomes)
        slowest = max((o.ttfb_s or o.took_s for o in outcomes), default=0.0)
        return {"duration_s": args.duration_s, "events": events, "total": total,
                "failed_before_first_byte": total["failed"], "broken_streams_clean": total["broken_clean"],
                "broken_streams_dirty": total["broken_dirty"], "no_answer_within_30s": total["no_answer"],
                "slowest_first_byte_s": round(slowest, 2), "cpu": cpu}
    finally:
        stack.close()


# allowlist probes: names a tenant that may use only sql and chat tries, none of which it may get
_BYPASS_NAMES = [
    "tsuzumi-base:summarize", "tsuzumi-base:SUMMARIZE", "TSUZUMI-BASE:summarize", "tsuzumi-base:summarize ",
    " tsuzumi-base:summarize", "tsuzumi-base:summarize\u200b", "tsuzumi-base:summ\u0430rize", "tsuzumi-base:%73ummarize",
    "tsuzumi-base:summarize%00", "tsuzumi-base:sql/../summarize", "tsuzumi-base:./summarize", "tsuzumi-base::summarize",
    "tsuzumi-base:summarize:sql", "tsuzumi-base:sql,summarize", "summarize", "tsuzumi-base/summarize",
    "tsuzumi-base:summarize\n", "tsuzumi-base:summarize\t", "tsuzumi-base:support", "tsuzumi-base:supp*",
    "tsuzumi-base:*", "tsuzumi-base:?ummarize", "tsuzumi-base:[s]ummarize", "tsuzumi-base:sql\x00summarize",
]


def run_secrets(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    new = args.tree is None
    cfg = _tenants(new)
    token_env = {"LR_SIDECAR_TOKEN": KEYS["sidecar"]}
    if new:
        cfg["security"] = {"sidecar_token_env": "LR_SIDECAR_TOKEN"}
    stack = Stack(work, pods=2, tree=args.tree, config=cfg, redis_password=KEYS["redis"], sim_args=_sim(args),
                  sidecar_env={**token_env, "LORAROUTE_SIDECAR_CONTROL_TOKEN_ENV": "LR_SIDECAR_TOKEN"} if new else {},
                  gateway_env=token_env if new else {}).start()
    try:
        meter = CpuMeter({"gateway": stack.gateway.popen.pid})  # type: ignore[union-attr]
        meter.start()
        secrets = list(KEYS.values())
        leaks: list[str] = []
        answers = 0
        bypasses: list[str] = []
        with httpx.Client(timeout=30) as client:
            def check(what: str, r: httpx.Response) -> None:
                nonlocal answers
                answers += 1
                blob = r.text + json.dumps(dict(r.headers))
                leaks.extend(f"{what}: a secret in the answer" for s in secrets if s in blob)

            acme = {"Authorization": f"Bearer {KEYS['acme']}"}
            for name in _BYPASS_NAMES:
                for path, body in (("/v1/chat/completions", chat(name)),
                                   ("/v1/completions", {"model": name, "prompt": "x", "max_tokens": 2})):
                    r = client.post(stack.url + path, json=body, headers=acme)
                    check(name, r)
                    if r.status_code == 200:
                        bypasses.append(f"{name!r} on {path}")
            for headers in ({"x-loraroute-admin-key": KEYS["acme"]}, {"Authorization": "Bearer " + KEYS["acme"] + "x"},
                            {"Authorization": KEYS["admin"][:-1]}):
                r = client.get(stack.url + "/admin/pods", headers=headers)
                check("admin probe", r)
                if r.status_code == 200:
                    bypasses.append(f"admin API with {list(headers)}")
            forbidden = client.post(stack.url + "/v1/chat/completions", json=chat(f"{BASE}:summarize"), headers=acme)
            unknown = client.post(stack.url + "/v1/chat/completions", json=chat(f"{BASE}:summarizf"), headers=acme)
            same = (forbidden.status_code == unknown.status_code
                    and forbidden.json()["error"]["code"] == unknown.json()["error"]["code"]
                    and forbidden.json()["error"]["message"].replace("summarize", "summarizf")
                    == unknown.json()["error"]["message"] and forbidden.headers.keys() == unknown.headers.keys())
            for path in ("/metrics", "/admin/pods", "/admin/decisions", "/v1/models", "/ready"):
                check(path, client.get(stack.url + path))
                check(path, client.get(stack.url + path, headers={"Authorization": f"Bearer {KEYS['admin']}"}))
            sidecar_open = []
            pods = client.get(stack.url + "/admin/pods", headers={"Authorization": f"Bearer {KEYS['admin']}"}).json()
            for pod in pods["data"]:
                if pod.get("sidecar_url"):
                    r = client.post(pod["sidecar_url"] + "/adapters/sql/ensure", json={})
                    check("sidecar", r)
                    if r.status_code == 200:
                        sidecar_open.append(pod["pod_id"])
        check_config = subprocess.run(
            loraroute_cmd("sidecar", "--check-config", "--pod-id", "p", "--vllm-url", "http://127.0.0.1:1",
                          "--store-url", stack.redis_url), capture_output=True, text=True, timeout=60,
            cwd=str(args.tree) if args.tree else None, env={**os.environ, **({"PYTHONPATH": str(args.tree)}
                                                                             if args.tree else {})})
        logs = "".join(p.log_tail(10 ** 7) for p in stack.procs) + check_config.stdout + check_config.stderr
        leaks.extend(f"log or --check-config: {s[:6]}..." for s in secrets if s in logs)
        return {"answers_checked": answers, "allowlist_probes": 2 * len(_BYPASS_NAMES) + 3, "bypasses": bypasses,
                "secrets_leaked": sorted(set(leaks)), "forbidden_equals_unknown": same,
                "forbidden": [forbidden.status_code, forbidden.json()["error"]["code"]],
                "unknown": [unknown.status_code, unknown.json()["error"]["code"]],
                "sidecar_control_api_open_to": sidecar_open,
                "log_bytes_scanned": len(logs), "cpu": meter.stop()}
    finally:
        stack.close()


def run_soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    stack = Stack(work, pods=3, tree=args.tree, sim_args=_sim(args)).start()
    try:
        load = Load(stack.url, args.clients, max_tokens=(8, 32)).start()
        meter = CpuMeter({"gateway": stack.gateway.popen.pid})  # type: ignore[union-attr]
        meter.start()
        samples: list[tuple[float, int, int]] = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < args.minutes * 60:
            samples.append((round(time.monotonic() - t0, 1), stack.gateway_rss_kib(), stack.gateway_fds()))
            time.sleep(10.0)
        samples.append((round(time.monotonic() - t0, 1), stack.gateway_rss_kib(), stack.gateway_fds()))
        outcomes = load.stop()
        cpu = meter.stop()
        after_warmup = [s for s in samples if s[0] >= 60.0] or samples
        rss0, rss1 = after_warmup[0][1], samples[-1][1]
        fds = [s[2] for s in after_warmup]
        return {"minutes": args.minutes, "clients": args.clients, "total": summarize(outcomes),
                "rss_first_mib": round(rss0 / 1024, 1), "rss_last_mib": round(rss1 / 1024, 1),
                "rss_max_mib": round(max(s[1] for s in samples) / 1024, 1),
                "rss_growth_pct": round(100 * (rss1 - rss0) / rss0, 2), "fds_min": min(fds), "fds_max": max(fds),
                "samples": samples, "cpu": cpu}
    finally:
        stack.close()


TARGETS = {"hostile": run_hostile, "outage": run_outage, "chaos": run_chaos, "secrets": run_secrets,
           "soak": run_soak}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.reliability", description=__doc__.split("\n\n")[0])
    p.add_argument("target", choices=sorted(TARGETS))
    p.add_argument("--out", type=Path, default=None, help="write the JSON summary here too")
    p.add_argument("--tree", type=Path, default=None, help="run the gateway and sidecars from this checkout")
    p.add_argument("--requests", type=int, default=2000, help="hostile: requests to send")
    p.add_argument("--names", type=int, default=1000, help="hostile: distinct 1 MB model names")
    p.add_argument("--clients", type=int, default=6, help="closed-loop clients")
    p.add_argument("--pre-s", type=float, default=10.0, help="outage: load before Redis goes")
    p.add_argument("--outage-s", type=float, default=60.0)
    p.add_argument("--post-s", type=float, default=20.0, help="outage: load after Redis is back")
    p.add_argument("--duration-s", type=float, default=80.0, help="chaos: seconds of load")
    p.add_argument("--kill-every-s", type=float, default=15.0)
    p.add_argument("--freeze-s", type=float, default=30.0)
    p.add_argument("--minutes", type=float, default=30.0, help="soak: minutes of load")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="the simulated pods' wall time per simulated second (> 1: slower pods, less CPU; "
                        "not hostile, whose pod answers at once)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    code = code_version(args.tree) if args.tree else code_version()  # before: a soak outlasts commits
    with tempfile.TemporaryDirectory(prefix="loraroute-reliability-") as tmp:
        started = time.time()
        result = TARGETS[args.target](args, Path(tmp))
    doc = {"target": args.target, "code": code,
           "argv": sys.argv[1:] if argv is None else argv, "started": round(started, 1),
           "load_average": os.getloadavg(), **result}
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
