"""Time of ``POST /adapters/{name}/ensure`` for a cold and a cached adapter, local folder and S3.

Set-up: moto's S3 server and a local source folder holding the same adapters (``--size-mb``
each; 14 MB is about a q,v-only rank-16 8B adapter, 84 MB an all-modules one), a simulated vLLM pod (real time) and two ``loraroute sidecar`` processes, one
per source. For each of ``--repeats`` fresh adapter names and each source it times, as the client
sees it:

Adapters are real (every tensor a LoRA weight, as vLLM requires): q,v projections of a
4096-wide model at ``--rank``, with as many layers as make up ``--size-mb``.

- cold: nothing on local disk -> list + download + validate + atomic rename (``load=false``);
- cached: the same name again (re-validation of config and safetensors header only);
- cold + load: another fresh name with ``load=true`` (adds vLLM's ``/v1/load_lora_adapter``,
  which in the simulator costs the disk->CPU load time of the rank).

    python -m bench.ensure_latency [--size-mb 14] [--repeats 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import boto3
import httpx

from loraroute import peft
from loraroute.procs import Proc, free_port, loraroute_cmd, start_process
from loraroute.services import start_s3


def _timed(client: httpx.Client, proc: Proc, name: str, load: bool) -> tuple[float, dict[str, object]]:
    t0 = time.perf_counter()
    resp = client.post(f"{proc.url}/adapters/{name}/ensure", json={"load": load}, timeout=300)
    elapsed = time.perf_counter() - t0
    if resp.status_code != 200:
        raise RuntimeError(f"ensure {name} failed: {resp.status_code} {resp.text}")
    return elapsed, resp.json()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=float, default=14.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    # throwaway credentials for the throwaway moto server (inherited by the sidecar processes)
    for key, value in (("AWS_ACCESS_KEY_ID", "bench-access-key"), ("AWS_SECRET_ACCESS_KEY", "bench-secret-key"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)
    work = Path(tempfile.mkdtemp(prefix="loraroute-ensure-"))
    logs = work / "logs"
    size = int(args.size_mb * 1e6)
    names = [f"ad-{i}" for i in range(2 * args.repeats)]
    print(f"making {len(names)} adapters of {args.size_mb} MB ...", flush=True)
    src = work / "source"
    hidden = 4096  # q,v LoRA of a 4096-wide model: 2 modules x (r x 4096 + 4096 x r) float32 per layer
    layers = max(1, round(size / (2 * 2 * args.rank * hidden * 4)))
    for i, name in enumerate(names):
        peft.make_adapter(src / name, rank=args.rank, seed=i, hidden=hidden, layers=layers)
    s3_proc = start_s3(log_dir=logs)
    endpoint = str(s3_proc.extra["endpoint_url"])
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="bench-adapters")
    for name in names:
        for f in (src / name).iterdir():
            s3.upload_file(str(f), "bench-adapters", f"adapters/{name}/{f.name}")
    procs: list[Proc] = [s3_proc]
    results: dict[str, dict[str, list[float]]] = {}
    try:
        sim_dirs = {k: work / f"vllm-adapters-{k}" for k in ("local", "s3")}
        for d in sim_dirs.values():
            d.mkdir()
        sidecars: dict[str, Proc] = {}
        for kind in ("local", "s3"):
            port, sport = free_port(), free_port()
            sim = start_process(f"sim-{kind}", loraroute_cmd(
                "sim", "--port", str(port), "--enable-lora", "--allow-runtime-lora-updating", "--max-loras", "2",
                "--max-lora-rank", str(max(16, args.rank)), "--adapter-dir", str(sim_dirs[kind])),
                port=port, ready_url=f"http://127.0.0.1:{port}/health", timeout=60, log_dir=logs)
            procs.append(sim)
            source = (["--source-path", str(src)] if kind == "local" else
                      ["--source-type", "s3", "--s3-endpoint-url", endpoint, "--s3-bucket", "bench-adapters"])
            sidecar = start_process(f"sidecar-{kind}", loraroute_cmd(
                "sidecar", "--pod-id", f"pod-{kind}", "--port", str(sport), "--vllm-url", sim.url,
                "--adapter-dir", str(sim_dirs[kind]), "--max-lora-rank", str(max(16, args.rank)),
                "--max-adapter-bytes", str(size * 2 + 10_000_000), "--log-level", "warning", *source),
                port=sport, ready_url=f"http://127.0.0.1:{sport}/healthz", timeout=60, log_dir=logs)
            procs.append(sidecar)
            sidecars[kind] = sidecar
        client = httpx.Client()  # one keep-alive client: per-call client set-up would dominate
        for kind, sidecar in sidecars.items():
            r: dict[str, list[float]] = {"cold": [], "cached": [], "cold+load": []}
            for i in range(args.repeats):
                cold, body = _timed(client, sidecar, names[i], False)
                assert body["source"] == "downloaded"
                cached, body = _timed(client, sidecar, names[i], False)
                assert body["source"] == "cached"
                loaded, body = _timed(client, sidecar, names[args.repeats + i], True)
                assert body["source"] == "downloaded" and body["loaded"] is True
                r["cold"].append(cold)
                r["cached"].append(cached)
                r["cold+load"].append(loaded)
            results[kind] = r
            print(f"  {kind}: done", flush=True)
    finally:
        for proc in reversed(procs):
            proc.stop()

    print(f"\nensure time, adapter {args.size_mb} MB rank {args.rank}, {args.repeats} repeats (ms, median / max)")
    print(f"{'source':8}{'cold':>18}{'cached':>18}{'cold+load':>18}")
    table: dict[str, dict[str, dict[str, float]]] = {}
    for kind, r in results.items():
        row = {k: {"median_ms": round(statistics.median(v) * 1000, 1), "max_ms": round(max(v) * 1000, 1)}
               for k, v in r.items()}
        table[kind] = row
        cells = "".join(f"{row[k]['median_ms']:>10} / {row[k]['max_ms']:<6}" for k in ("cold", "cached", "cold+load"))
        print(f"{kind:8}{cells}")
    if args.json:
        args.json.write_text(json.dumps({"size_mb": args.size_mb, "rank": args.rank, "repeats": args.repeats,
                                         "results": table}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
