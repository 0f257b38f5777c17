"""``loraroute doctor -f values.yaml``: the pre-production checklist (seed §14) on chart values.

The chart's defaults (``helm/loraroute/values.yaml``) are merged with each ``-f`` file the way
helm merges them (maps recursively, everything else replaced, ``null`` removes a key); every
check then reads the merged values and says what the chart will render:

- Storage: the base model on a PVC (or a ``pvc://`` storageUri under KServe); the adapter layout;
- Runtime: ``--enable-lora`` and runtime loading on, ``--max-loras`` / ``--max-cpu-loras`` set
  (CPU standby beyond the GPU slots), ``--max-lora-rank`` at least every allowlisted adapter's
  rank and not far above it (vLLM sizes its LoRA buffers by it);
- Memory: ``--gpu-memory-utilization`` at most 0.9 (about 0.85 leaves headroom);
- Network / security: the S3 Secret referenced, the endpoint (a closed network has its own; plain
  HTTP sends keys in clear), the CA bundle for a TLS endpoint, and runtime updating only with an
  audited path (NetworkPolicies so that only the gateway and the sidecar reach vLLM's load API;
  named admin keys and the two-person rule for run-time changes; an audit log that survives a
  Redis restart);
- Client: the allowlist (what ``<base>:<adapter>`` names exist) and the gateway config itself,
  validated by the gateway's own model.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from loraroute.doctor_report import Check

DEFAULT_CHART = Path(__file__).resolve().parents[1] / "helm" / "loraroute"
_ALLOWED_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_values(chart: Path, files: list[str]) -> dict[str, Any]:
    defaults = chart / "values.yaml"
    if not defaults.is_file():
        raise FileNotFoundError(f"{defaults} not found: pass --chart with the loraroute chart's folder")
    values: dict[str, Any] = yaml.safe_load(defaults.read_text()) or {}
    for f in files:
        data = yaml.safe_load(Path(f).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{f} does not hold a mapping of values")
        values = merge(values, data)
    return values


def _env_value(env: list[dict[str, Any]], name: str) -> str | None:
    for e in env or []:
        if e.get("name") == name and "value" in e:
            return str(e["value"])
    return None


def _storage(v: dict[str, Any]) -> list[Check]:
    vllm, s3 = v["vllm"], v["sidecar"]["s3"]
    out = []
    if not vllm.get("enabled", True):
        out.append(Check("Storage", "base model on a PVC", "SKIP", "vllm.enabled is false: the vLLM pods are yours"))
    else:
        model = vllm["model"]
        pvc = model.get("pvc") or {}
        if vllm.get("mode") == "kserve":
            uri = vllm.get("kserve", {}).get("storageUri") or f"pvc://{pvc.get('claimName')}/{model.get('path')}"
            if uri.startswith("pvc://"):
                out.append(Check("Storage", "base model on a PVC", "PASS", f"storageUri {uri}, mounted at /mnt/models"))
            else:
                out.append(Check("Storage", "base model on a PVC", "WARN", f"storageUri {uri} is not a PVC: the base "
                                 "is copied at every pod start", "put the base on a PVC: vllm.kserve.storageUri: "
                                 "pvc://<claim>/<path>"))
        elif pvc.get("claimName") and model.get("path"):
            out.append(Check("Storage", "base model on a PVC", "PASS",
                             f"--model={pvc.get('mountPath', '/mnt/models').rstrip('/')}/{model['path']} from PVC "
                             f"{pvc['claimName']} (read-only)"))
        else:
            out.append(Check("Storage", "base model on a PVC", "FAIL", "vllm.model.pvc.claimName or vllm.model.path "
                             "is empty", "set vllm.model.pvc.claimName and vllm.model.path"))
    layout = s3.get("layout", "")
    if "{adapter}" in layout and layout.endswith("/"):
        out.append(Check("Storage", "adapter layout", "PASS",
                         f"s3://{s3.get('bucket')}/{layout} holding adapter_config.json + adapter_model.safetensors"))
    else:
        out.append(Check("Storage", "adapter layout", "FAIL", f"layout {layout!r} must name a folder with {{adapter}} "
                         "and end with '/'", "sidecar.s3.layout: \"adapters/{adapter}/\""))
    return out


def _allowlist(v: dict[str, Any]) -> list[tuple[str, str, int | None]]:
    out = []
    for b in v["gateway"]["config"].get("bases") or []:
        for a in b.get("adapters") or []:
            entry = {"name": a} if isinstance(a, str) else a
            out.append((b["name"], entry["name"], entry.get("rank")))
    return out


def _runtime(v: dict[str, Any]) -> list[Check]:
    vllm = v["vllm"]
    if not vllm.get("enabled", True):
        return [Check("Runtime", "LoRA flags", "SKIP", "vllm.enabled is false: check your pods' flags live "
                      "(loraroute doctor --gateway ...)")]
    lora = vllm["lora"]
    out = []
    runtime = _env_value(vllm.get("extraEnv") or [], "VLLM_ALLOW_RUNTIME_LORA_UPDATING")
    if runtime is not None and runtime.lower() not in ("1", "true"):
        out.append(Check("Runtime", "--enable-lora, runtime loading", "FAIL", f"vllm.extraEnv sets "
                         f"VLLM_ALLOW_RUNTIME_LORA_UPDATING={runtime}: the sidecar cannot load adapters",
                         "remove that entry from vllm.extraEnv"))
    else:
        out.append(Check("Runtime", "--enable-lora, runtime loading", "PASS",
                         "--enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=true (the chart sets both)"))
    n, cpu = int(lora["maxLoras"]), int(lora["maxCpuLoras"])
    if cpu < n:
        out.append(Check("Runtime", "--max-loras / --max-cpu-loras", "FAIL", f"maxCpuLoras {cpu} < maxLoras {n}: "
                         "vLLM refuses to start", f"set vllm.lora.maxCpuLoras >= {n}"))
    elif cpu == n:
        out.append(Check("Runtime", "--max-loras / --max-cpu-loras", "WARN", f"--max-loras={n} --max-cpu-loras={cpu}: "
                         "no CPU standby, an adapter leaving a GPU slot reloads from disk",
                         f"keep standby adapters in CPU memory: vllm.lora.maxCpuLoras: {max(2 * n, n + 4)}"))
    elif n > 8:
        out.append(Check("Runtime", "--max-loras / --max-cpu-loras", "WARN", f"--max-loras={n}: every GPU slot "
                         "takes KV-cache memory; start with 2-4 and grow step by step",
                         "vllm.lora.maxLoras: 4"))
    else:
        out.append(Check("Runtime", "--max-loras / --max-cpu-loras", "PASS",
                         f"--max-loras={n} GPU slots, --max-cpu-loras={cpu} ({cpu - n} standby in CPU memory)"))
    rank = int(lora["maxLoraRank"])
    adapters = _allowlist(v)
    too_big = [f"{b}:{a} (rank {r})" for b, a, r in adapters if r is not None and r > rank]
    unknown = [f"{b}:{a}" for b, a, r in adapters if r is None]
    known = [r for _b, _a, r in adapters if r is not None]
    name = "--max-lora-rank fits the adapters"
    if too_big:
        need = next((x for x in _ALLOWED_RANKS if x >= max(r for _b, _a, r in adapters if r)), rank)
        out.append(Check("Runtime", name, "FAIL", f"--max-lora-rank={rank} but {', '.join(too_big)}: vLLM refuses "
                         "the load (the 'OOM / load failure' accident)",
                         f"vllm.lora.maxLoraRank: {need} (or retrain those adapters with a smaller r)"))
    elif unknown:
        out.append(Check("Runtime", name, "WARN", f"--max-lora-rank={rank}; rank unknown for {', '.join(unknown[:6])}"
                         f"{' …' if len(unknown) > 6 else ''}",
                         "give each allowlist entry its rank ({name, rank}), or check live: loraroute doctor --gateway"))
    elif known and rank > 2 * max(known) and rank > 16:
        fit = next(x for x in _ALLOWED_RANKS if x >= max(known))
        out.append(Check("Runtime", name, "WARN", f"--max-lora-rank={rank}, largest allowlisted rank {max(known)}: "
                         "vLLM reserves LoRA memory for the maximum rank", f"vllm.lora.maxLoraRank: {fit}"))
    else:
        out.append(Check("Runtime", name, "PASS", f"--max-lora-rank={rank} >= every allowlisted rank "
                         f"({max(known) if known else 'none listed'})"))
    return out


def _memory(v: dict[str, Any]) -> list[Check]:
    vllm = v["vllm"]
    if not vllm.get("enabled", True):
        return []
    util = float(vllm["gpuMemoryUtilization"])
    out = []
    if util > 0.9:
        out.append(Check("Memory", "GPU memory headroom", "FAIL", f"--gpu-memory-utilization={util:g}: no headroom "
                         "for LoRA buffers and fragmentation (OOM risk)", "vllm.gpuMemoryUtilization: 0.85"))
    else:
        out.append(Check("Memory", "GPU memory headroom", "PASS", f"--gpu-memory-utilization={util:g} (<= 0.9)"))
    lora = vllm["lora"]
    out.append(Check("Memory", "CPU standby adapters", "PASS" if int(lora["maxCpuLoras"]) > int(lora["maxLoras"])
                     else "WARN", f"{int(lora['maxCpuLoras']) - int(lora['maxLoras'])} adapters beyond the GPU slots "
                     "stay in CPU memory", "" if int(lora["maxCpuLoras"]) > int(lora["maxLoras"])
                     else "raise vllm.lora.maxCpuLoras above maxLoras"))
    return out


def _security(v: dict[str, Any]) -> list[Check]:
    sidecar, gateway = v["sidecar"], v["gateway"]
    s3, ca = sidecar["s3"], sidecar["caBundle"]
    out = []
    secret = s3.get("existingSecret")
    if secret:
        out.append(Check("Network / security", "S3 Secret referenced", "PASS",
                         f"the sidecar reads {s3.get('accessKeyIdKey')} / {s3.get('secretAccessKeyKey')} from Secret "
                         f"{secret} (create it first: kubectl get secret {secret})"))
    else:
        out.append(Check("Network / security", "S3 Secret referenced", "FAIL", "sidecar.s3.existingSecret is empty: "
                         "no credentials for the store", "sidecar.s3.existingSecret: aws-connection"))
    endpoint = s3.get("endpoint") or ""
    if not endpoint and not s3.get("fromDataConnection"):
        out.append(Check("Network / security", "S3 endpoint", "WARN", "no sidecar.s3.endpoint: the sidecars call "
                         "AWS S3 (a closed network has its own MinIO)", "sidecar.s3.endpoint: https://minio.<domain>:9000"))
    elif endpoint.startswith("http://"):
        out.append(Check("Network / security", "S3 endpoint", "WARN", f"{endpoint} is plain HTTP: keys and adapters "
                         "cross the network unencrypted", "use the HTTPS endpoint and sidecar.caBundle"))
    else:
        out.append(Check("Network / security", "S3 endpoint", "PASS", endpoint or "from the data-connection Secret"))
    tls = endpoint.startswith("https://") or s3.get("fromDataConnection")
    if ca.get("enabled"):
        source = f"ConfigMap {ca['configMapName']}" if ca.get("configMapName") else f"Secret {ca.get('secretName')}"
        out.append(Check("Network / security", "trusted CA bundle", "PASS",
                         f"{source} key {ca.get('key')} at {ca.get('mountPath')}/{ca.get('key')} (S3 client, "
                         "SSL_CERT_FILE, AWS_CA_BUNDLE)"))
    elif tls:
        out.append(Check("Network / security", "trusted CA bundle", "WARN", "TLS to S3 without a CA bundle: a "
                         "corporate or self-signed CA ends in 'certificate verify failed'",
                         "sidecar.caBundle: {enabled: true, configMapName: trusted-ca-bundle}"))
    else:
        out.append(Check("Network / security", "trusted CA bundle", "SKIP", "the S3 endpoint is not HTTPS"))
    out.extend(_audited(v, gateway))
    return out


def _audited(v: dict[str, Any], gateway: dict[str, Any]) -> list[Check]:
    name = "runtime updates only via an audited path"
    if not v["networkPolicy"].get("enabled"):
        return [Check("Network / security", name, "FAIL", "VLLM_ALLOW_RUNTIME_LORA_UPDATING is on and "
                      "networkPolicy.enabled is false: any pod in the cluster can call vLLM's /v1/load_lora_adapter",
                      "networkPolicy.enabled: true (only the gateway reaches vLLM; the sidecar uses the pod's loopback)")]
    auth = gateway["auth"]
    changes = gateway["config"].get("changes") or {}
    keys = bool(auth.get("adminKeyDigests") or auth.get("roleKeys") or auth.get("existingSecret"))
    out = []
    if changes.get("enabled", True) is False or not keys:
        why = "changes.enabled is false" if keys else "no admin key"
        out.append(Check("Network / security", name, "PASS", f"NetworkPolicies on; {why}: the allowlist changes only "
                         "through the values in Git"))
        return out
    two = changes.get("two_person") or []
    two = ["allowlist.add", "allowlist.retire", "adapter.roll", "pipeline.weights"] if two in ("all", ["all"]) else two
    if not two:
        out.append(Check("Network / security", name, "WARN", "admin keys can change the allowlist at run time, and "
                         "no change kind needs a second person", "gateway.config.changes.two_person: all"))
    elif not auth.get("roleKeys"):
        out.append(Check("Network / security", name, "WARN", f"two-person rule for {', '.join(two)}, but no named "
                         "keys: the audit log shows every change as 'admin'",
                         "gateway.auth.roleKeys: [{name: alice, roles: [operator]}, {name: bob, roles: [approver]}]"))
    else:
        names = ", ".join(f"{k['name']} ({'/'.join(k['roles'])})" for k in auth["roleKeys"])
        out.append(Check("Network / security", name, "PASS", f"NetworkPolicies on; named keys {names}; a second "
                         f"person approves {'every change' if len(two) >= 4 else ', '.join(two)}"))
    redis = v["redis"]
    if redis.get("enabled") and not redis.get("persistence", {}).get("enabled"):
        out.append(Check("Network / security", "audit log survives a Redis restart", "WARN", "the audit log and "
                         "approved changes live in the chart's Redis, which has no persistence: a restart loses the "
                         "log (the gateways keep and write back the approved changes)",
                         "redis.persistence.enabled: true, or an external Redis with persistence; ship the "
                         "gateway's loraroute.audit log lines"))
    return out


def _client(v: dict[str, Any]) -> list[Check]:
    from gateway.config import ConfigError, load_config

    cfg = {k: val for k, val in v["gateway"]["config"].items() if k not in ("discovery", "store", "admin")}
    out = []
    try:
        load_config(cfg, env={})
        out.append(Check("Client", "gateway config", "PASS", "accepted by the gateway's own config model"))
    except ConfigError as exc:
        out.append(Check("Client", "gateway config", "FAIL", str(exc), "fix gateway.config (docs/config.md)"))
    names = [f"{b}:{a}" for b, a, _r in _allowlist(v)]
    if names:
        shown = ", ".join(names[:6]) + (f" (+{len(names) - 6} more)" if len(names) > 6 else "")
        out.append(Check("Client", "clients use <base>:<adapter>", "PASS", f"allowlisted: {shown}; anything else is "
                         "refused (404 with the nearest names)"))
    else:
        out.append(Check("Client", "clients use <base>:<adapter>", "WARN", "no adapter is allowlisted: clients can "
                         "call only the bare bases", "list adapters under gateway.config.bases[].adapters"))
    return out


def check_values(values: dict[str, Any]) -> list[Check]:
    return [*_storage(values), *_runtime(values), *_memory(values), *_security(values), *_client(values)]
