"""Generate helm/loraroute/values.schema.json (run: python helm/tools/values_schema.py).

The schema is strict: every object refuses unknown keys, numbers have ranges, enums list what
the templates and vLLM accept. tests/test_helm.py checks that the committed file equals this
script's output and that gateway.config tracks gateway/config.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Schema = dict[str, Any]


def obj(props: Schema, required: tuple[str, ...] | list[str] = (), additional: bool = False, **extra: Any) -> Schema:
    """An object schema that refuses unknown keys (unless ``additional``)."""
    d: Schema = {"type": "object", "properties": props, "additionalProperties": additional}
    if required:
        d["required"] = list(required)
    d.update(extra)
    return d


# building blocks
S = {"type": "string"}
B = {"type": "boolean"}
I0 = {"type": "integer", "minimum": 0}
I1 = {"type": "integer", "minimum": 1}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
MAP = {"type": "object"}
LIST = {"type": "array"}
STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
#: a tenant's limits (gateway/config.py TenantLimits)
LIMITS = {"type": "object", "additionalProperties": False, "properties": {
    k: {"type": ["integer", "null"], "minimum": 1}
    for k in ("requests_per_minute", "prompt_tokens_per_minute", "concurrent_requests")}}
ENV = {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {"name": S}}}
QTY = {"type": ["string", "integer", "number"]}
RES = obj({"requests": {"type": "object", "additionalProperties": QTY},
           "limits": {"type": "object", "additionalProperties": QTY},
           "claims": LIST})
PROBE = obj({k: I0 for k in ["periodSeconds", "timeoutSeconds", "failureThreshold",
                             "initialDelaySeconds", "successThreshold"]})
IMG = obj({"repository": {"type": "string", "minLength": 1}, "tag": S,
           "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]}}, ["repository"])
TOL = {"type": "array", "items": MAP}
DIGEST = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
ADAPTER = "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
schema = obj({
    "nameOverride": S, "fullnameOverride": S, "imageRegistry": S,
    "imagePullSecrets": {"type": "array", "items": {"type": "string", "minLength": 1}},
    "image": IMG,
    "global": MAP,
    "serviceAccount": obj({"create": B, "name": S, "annotations": STRMAP}),
    "rbac": obj({"create": B}),
    "gateway": obj({
        "replicas": I1, "port": PORT,
        "logLevel": {"enum": ["debug", "info", "warning", "error"]},
        "resources": RES,
        "podAntiAffinity": {"enum": ["soft", "hard", "none"]},
        "nodeSelector": STRMAP, "tolerations": TOL, "affinity": MAP,
        "podAnnotations": STRMAP, "podLabels": STRMAP, "extraEnv": ENV,
        "terminationGracePeriodSeconds": I0, "rolloutOnConfigChange": B,
        "drain": obj({"preStopSeconds": I0, "graceSeconds": {"type": "number", "minimum": 0},
                      "deadlineSeconds": {"type": "number", "minimum": 0}}),
        "probes": obj({"readiness": PROBE, "liveness": PROBE}),
        "service": obj({"type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}, "port": PORT,
                        "annotations": STRMAP}),
        "pdb": obj({"enabled": B, "minAvailable": I0}),
        "hpa": obj({"enabled": B, "minReplicas": I1, "maxReplicas": I1,
                    "targetCPUUtilizationPercentage": {"type": "integer", "minimum": 1, "maximum": 100}}),
        "auth": obj({"existingSecret": S,
                     "adminKeyDigests": {"type": "array", "items": DIGEST},
                     "roleKeys": {"type": "array", "items": obj({
                         "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"},
                         "roles": {"type": "array", "minItems": 1,
                                   "items": {"enum": ["viewer", "operator", "approver"]}},
                         "digests": {"type": "array", "items": DIGEST}}, ["name", "roles"])},
                     "tenantKeyDigests": {"type": "object", "additionalProperties": {"type": "array", "items": DIGEST}},
                     "metricsAuth": B, "metricsKeyDigests": {"type": "array", "items": DIGEST}}),
        "config": obj({
            # chart-owned keys (discovery, store, admin, server.host/port/log_level/drain) are refused here
            "server": {"type": "object", "not": {"anyOf": [{"required": ["host"]}, {"required": ["port"]},
                                                          {"required": ["log_level"]}, {"required": ["drain"]}]}},
            "bases": {"type": "array", "items": obj({
                "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._/-]{0,255}$"},
                "served_name": S, "aliases": {"type": "array", "items": S},
                "adapters": {"type": "array", "items": {"oneOf": [
                    {"type": "string", "pattern": ADAPTER},
                    obj({"name": {"type": "string", "pattern": ADAPTER},
                         "rank": {"type": "integer", "minimum": 1, "maximum": 1024},
                         "served_name": S, "version": {"type": "string", "pattern": "^[0-9a-f]{12}$"}},
                        ["name"])]}},
                # gateway/precise_config.py TokenizerConfig
                "tokenizer": obj({"mode": {"enum": ["none", "sim", "pod", "local"]}, "min_chars": I0,
                                  "timeout_ms": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000},
                                  "backoff_s": {"type": "number", "minimum": 0},
                                  "cache_entries": {"type": "integer", "minimum": 0, "maximum": 1000000},
                                  "path": {"type": ["string", "null"]}})}, ["name"])},
            "tenants": {"type": "array", "items": obj({
                "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,100}$"},
                "adapters": {"type": "array", "items": {"type": "string", "minLength": 1}},
                "base_models": B, "limits": LIMITS}, ["name"])},
            "pipeline": {"type": ["string", "object"]},
            "ensure": MAP, "metrics": MAP, "placement": MAP, "sharing": MAP, "changes": MAP,
            "limits": obj({"default": LIMITS, "sync_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 10}}),
            "security": obj({"conceal_forbidden": B}),
        }),
    }),
    "discovery": obj({"mode": {"enum": ["kubernetes", "redis"]}, "labelSelector": S, "namespace": S}),
    "redis": obj({
        "enabled": B, "image": IMG, "port": PORT, "podSecurityContext": MAP, "resources": RES,
        "persistence": obj({"enabled": B, "size": S, "storageClass": S}),
        "auth": obj({"enabled": B, "existingSecret": S, "passwordKey": {"type": "string", "minLength": 1}}),
        "external": obj({"url": {"type": "string", "pattern": "^(|rediss?://.+)$"}, "existingSecret": S,
                         "passwordKey": {"type": "string", "minLength": 1}}),
    }),
    "vllm": obj({
        "enabled": B, "mode": {"enum": ["deployment", "kserve"]}, "image": IMG,
        "replicas": I0, "port": PORT,
        "model": obj({"servedName": {"type": "string", "minLength": 1},
                      "path": {"type": "string", "minLength": 1},
                      "pvc": obj({"claimName": {"type": "string", "minLength": 1},
                                  "mountPath": {"type": "string", "pattern": "^/"}})}),
        "lora": obj({"maxLoras": I1,
                     "maxLoraRank": {"enum": [1, 8, 16, 32, 64, 128, 256, 320, 512],
                                     "description": "vLLM's allowed --max-lora-rank values"},
                     "maxCpuLoras": I1}),
        "gpuMemoryUtilization": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "maxModelLen": I0,
        "extraArgs": {"type": "array", "items": S}, "extraEnv": ENV,
        "pdb": obj({"enabled": B, "maxUnavailable": I1}),
        "resources": RES, "shmSize": QTY, "nodeSelector": STRMAP, "tolerations": TOL, "affinity": MAP,
        "podAnnotations": STRMAP, "podLabels": STRMAP,
        "probes": obj({"startup": PROBE, "readiness": PROBE, "liveness": PROBE}),
        "kserve": obj({"deploymentMode": {"enum": ["RawDeployment"]},
                       "storageUri": S, "modelFormat": {"type": "string", "minLength": 1},
                       "minReplicas": I0, "maxReplicas": I1, "annotations": STRMAP}),
    }),
    "sidecar": obj({
        "port": PORT, "logLevel": {"enum": ["debug", "info", "warning", "error"]}, "resources": RES,
        "adapterDir": {"type": "string", "pattern": "^/"}, "adapterDirSizeLimit": QTY,
        "diskBudgetBytes": I1, "pollIntervalSeconds": {"type": "number", "exclusiveMinimum": 0},
        "demand": obj({"enabled": B, "refreshSeconds": {"type": "number", "exclusiveMinimum": 0}, "prefetch": I0}),
        "extraEnv": ENV,
        "controlToken": obj({"enabled": B, "existingSecret": S, "key": {"type": "string", "minLength": 1}}),
        "s3": obj({"endpoint": {"type": "string", "pattern": "^(|https?://.+)$"},
                   "bucket": {"type": "string", "minLength": 1}, "region": S,
                   "layout": {"type": "string", "pattern": "\\{adapter\\}"},
                   "existingSecret": {"type": "string", "minLength": 1},
                   "fromDataConnection": B,
                   "accessKeyIdKey": {"type": "string", "minLength": 1},
                   "secretAccessKeyKey": {"type": "string", "minLength": 1}}),
        "caBundle": obj({"enabled": B, "configMapName": S, "secretName": S,
                         "key": {"type": "string", "minLength": 1},
                         "mountPath": {"type": "string", "pattern": "^/"}}),
    }),
    "precisePrefix": obj({"enabled": B, "eventsPort": PORT, "replayPort": PORT, "topic": S,
                          "tokenizer": obj({"mode": {"enum": ["none", "sim", "pod", "local"]}}, ["mode"],
                                           additional=True)}),
    "ingress": obj({"enabled": B, "className": S, "annotations": STRMAP, "host": S, "tlsSecretName": S}),
    "route": obj({"enabled": B, "host": S, "annotations": STRMAP,
                  "tls": obj({"termination": {"enum": ["edge"], "description": "reencrypt needs a gateway that serves TLS; it does not yet"},
                              "insecureEdgeTerminationPolicy": {"enum": ["Redirect", "Allow", "None"]}})}),
    "networkPolicy": obj({"enabled": B, "gatewayFrom": {"type": "array", "items": MAP},
                          "metricsFrom": {"type": "array", "items": MAP}}),
    "monitoring": obj({
        "serviceMonitor": obj({"enabled": B, "interval": S, "labels": STRMAP,
                               "bearerTokenSecret": obj({"name": S, "key": S})}),
        "podMonitor": obj({"enabled": B, "interval": S, "labels": STRMAP}),
        "dashboard": obj({"enabled": B, "labels": STRMAP, "annotations": STRMAP}),
    }),
})
schema["$schema"] = "http://json-schema.org/draft-07/schema#"
schema["title"] = "loraroute chart values"
# cross-field rules
schema["allOf"] = [
    {"if": {"properties": {"redis": {"properties": {"enabled": {"const": False}}}}},
     "then": {"properties": {"redis": {"properties": {"external": {"properties": {
         "url": {"minLength": 1}}}}}}}},
    {"if": {"properties": {"sidecar": {"properties": {"caBundle": {"properties": {"enabled": {"const": True}}}}}}},
     "then": {"properties": {"sidecar": {"properties": {"caBundle": {"oneOf": [
         {"properties": {"configMapName": {"minLength": 1}, "secretName": {"maxLength": 0}}},
         {"properties": {"secretName": {"minLength": 1}, "configMapName": {"maxLength": 0}}}]}}}}}},
]


def render() -> str:
    """The file's exact text."""
    return json.dumps(schema, indent=2) + "\n"


OUTPUT = Path(__file__).resolve().parent.parent / "loraroute/values.schema.json"

if __name__ == "__main__":
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")
