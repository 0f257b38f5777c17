"""The Helm chart: lint, render, validate every manifest, cross-check references, refuse bad values,
and feed the rendered gateway config to the gateway's own loader (and to a real gateway process).

helm comes from PATH or from .tools/bin/helm (``make tools``); without it these tests FAIL.
Native kinds are validated with kubernetes-validate in strict mode against Kubernetes 1.30;
the CRDs it has no schema for (ServiceMonitor, PodMonitor, ServingRuntime, InferenceService,
Route) are checked structurally here: their embedded containers/volumes/tolerations are
validated as a Pod spec, and every name they point at must exist in the rendering.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "loraroute"
CI = CHART / "ci"
KUBE_VERSION = "1.30.0"
NAMESPACE = "llm"
VALUE_SETS = ["minimal", "production", "kserve", "openshift"]
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "ServingRuntime", "InferenceService", "Route"}
# objects the chart expects to exist already (created by the operator / cluster admin)
EXTERNAL = {
    "Secret": {"aws-connection", "redis-credentials", "loraroute-gateway-auth", "minio-ca", "mirror-pull"},
    "ConfigMap": {"corporate-ca", "trusted-ca-bundle"},
    "PersistentVolumeClaim": {"models", "base-models"},
}


def helm_binary() -> str:
    found = shutil.which("helm")
    if found:
        return found
    local = ROOT / ".tools" / "bin" / "helm"
    if local.exists():
        return str(local)
    pytest.fail("helm not found on PATH or at .tools/bin/helm: run `make tools`")


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=60, check=False)


@cache
def rendered(value_set: str) -> tuple[dict[str, Any], ...]:
    res = run_helm("template", "lr", str(CHART), "-f", str(CI / f"{value_set}-values.yaml"),
                   "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION)
    assert res.returncode == 0, res.stderr
    return tuple(d for d in yaml.safe_load_all(res.stdout) if d)


def by_kind(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: tuple[dict[str, Any], ...], kind: str, name_suffix: str) -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{kind} *{name_suffix}: {[d['metadata']['name'] for d in by_kind(docs, kind)]}"
    return found[0]


def vllm_pod_spec(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """The vLLM pod spec: the Deployment's, or the ServingRuntime's containers + volumes."""
    deps = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-vllm")]
    if deps:
        return deps[0]["spec"]["template"]["spec"]
    sr = by_kind(docs, "ServingRuntime")[0]["spec"]
    return {"containers": sr["containers"], "volumes": sr.get("volumes", [])}


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in spec["containers"] if c["name"] == name)


# --------------------------------------------------------------------------------------------
# lint and render
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_helm_lint_strict(value_set: str) -> None:
    res = run_helm("lint", "--strict", str(CHART), "-f", str(CI / f"{value_set}-values.yaml"), "--namespace", NAMESPACE)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 chart(s) failed" in res.stdout


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_manifest_validates(value_set: str) -> None:
    import kubernetes_validate

    docs = rendered(value_set)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "NetworkPolicy", "ServiceAccount", "Role", "PodDisruptionBudget", "Pod"} <= kinds
    native = 0
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            check_crd(doc, docs)
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        native += 1
    assert native >= 8
    # strict validation is real: an unknown field in a rendered Deployment is refused
    dep = json.loads(json.dumps(by_kind(docs, "Deployment")[0]))
    dep["spec"]["template"]["spec"]["containers"][0]["argz"] = ["x"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, KUBE_VERSION, strict=True)


def validate_as_pod(spec: dict[str, Any]) -> None:
    """Validate pod-spec fragments embedded in a CRD by wrapping them in a v1 Pod."""
    import kubernetes_validate

    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "embedded"}, "spec": spec}
    kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)


def names_of(docs: tuple[dict[str, Any], ...], kind: str) -> set[str]:
    return {d["metadata"]["name"] for d in by_kind(docs, kind)} | EXTERNAL.get(kind, set())


def check_crd(doc: dict[str, Any], docs: tuple[dict[str, Any], ...]) -> None:
    kind, spec = doc["kind"], doc["spec"]
    assert doc["metadata"]["name"] and isinstance(doc["metadata"].get("labels", {}), dict)
    if kind == "ServiceMonitor":
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        sel = spec["selector"]["matchLabels"]
        svcs = [s for s in by_kind(docs, "Service") if s["spec"].get("selector") and sel.items() <= s["metadata"]["labels"].items()]
        assert svcs, "ServiceMonitor selects no rendered Service"
        ports = {p["name"] for s in svcs for p in s["spec"]["ports"]}
        for ep in spec["endpoints"]:
            assert ep["port"] in ports and ep["path"].startswith("/")
    elif kind == "PodMonitor":
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        sel = spec["selector"]["matchLabels"]
        pod = vllm_pod_spec(docs)
        port_names = {p["name"] for c in pod["containers"] for p in c.get("ports", [])}
        for ep in spec["podMetricsEndpoints"]:
            assert ep["port"] in port_names and ep["path"] == "/metrics"
        deps = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-vllm")]
        if deps:
            assert sel.items() <= deps[0]["spec"]["template"]["metadata"]["labels"].items()
        else:
            isvc = by_kind(docs, "InferenceService")[0]
            assert sel == {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"]}
    elif kind == "ServingRuntime":
        assert doc["apiVersion"] == "serving.kserve.io/v1alpha1"
        assert [c["name"] for c in spec["containers"]] == ["kserve-container", "sidecar"]
        validate_as_pod({"containers": spec["containers"], "volumes": spec.get("volumes", [])})
        assert spec["supportedModelFormats"][0]["name"]
    elif kind == "InferenceService":
        assert doc["apiVersion"] == "serving.kserve.io/v1beta1"
        pred = spec["predictor"]
        model = pred["model"]
        srs = by_kind(docs, "ServingRuntime")
        assert model["runtime"] in {s["metadata"]["name"] for s in srs}
        assert model["modelFormat"]["name"] == srs[0]["spec"]["supportedModelFormats"][0]["name"]
        assert model["storageUri"].split("://")[0] in {"pvc", "s3", "hf", "oci", "https"}
        assert pred["minReplicas"] <= pred["maxReplicas"]
        validate_as_pod({"containers": [{"name": "x", "resources": model["resources"]}],
                         "tolerations": pred.get("tolerations", []), "nodeSelector": pred.get("nodeSelector", {})})
    elif kind == "Route":
        assert doc["apiVersion"] == "route.openshift.io/v1"
        assert spec["to"]["kind"] == "Service" and spec["to"]["name"] in names_of(docs, "Service")
        svc = next(s for s in by_kind(docs, "Service") if s["metadata"]["name"] == spec["to"]["name"])
        assert spec["port"]["targetPort"] in {p["name"] for p in svc["spec"]["ports"]}
        assert spec["tls"]["termination"] in {"edge", "reencrypt", "passthrough"}
        assert spec["tls"]["insecureEdgeTerminationPolicy"] in {"Redirect", "Allow", "None"}
    else:  # pragma: no cover
        raise AssertionError(kind)


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_references_resolve(value_set: str) -> None:
    """Every ConfigMap, Secret, PVC and ServiceAccount a pod mounts or reads exists in the
    rendering or is one of the documented pre-existing objects; selectors select something."""
    docs = rendered(value_set)
    pod_specs = [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    pod_specs += [{"containers": s["spec"]["containers"], "volumes": s["spec"].get("volumes", [])} for s in by_kind(docs, "ServingRuntime")]
    assert pod_specs
    for spec in pod_specs:
        for vol in spec.get("volumes", []):
            if "configMap" in vol:
                assert vol["configMap"]["name"] in names_of(docs, "ConfigMap"), vol
            if "secret" in vol:
                assert vol["secret"]["secretName"] in names_of(docs, "Secret"), vol
            if "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"]["claimName"] in names_of(docs, "PersistentVolumeClaim")
        mounts = {m["name"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
        assert mounts <= {v["name"] for v in spec.get("volumes", [])} | {"data"}  # data: volumeClaimTemplate
        for c in spec["containers"]:
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in names_of(docs, "Secret"), ref
        if "serviceAccountName" in spec:
            assert spec["serviceAccountName"] in names_of(docs, "ServiceAccount")
    for dep in by_kind(docs, "Deployment") + by_kind(docs, "StatefulSet"):
        sel = dep["spec"]["selector"]["matchLabels"]
        assert sel.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    for svc in by_kind(docs, "Service"):
        sel = svc["spec"]["selector"]
        pods = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet") and sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert pods, f"Service {svc['metadata']['name']} selects nothing"


# --------------------------------------------------------------------------------------------
# the vLLM pod: flags, environment, shared adapter folder, CA bundle, credentials
# --------------------------------------------------------------------------------------------
def load_values(value_set: str) -> dict[str, Any]:
    base = yaml.safe_load((CHART / "values.yaml").read_text())
    over = yaml.safe_load((CI / f"{value_set}-values.yaml").read_text()) or {}

    def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    return merge(base, over)


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_vllm_pod_carries_the_lora_flags_and_the_sidecar(value_set: str) -> None:
    docs, values = rendered(value_set), load_values(value_set)
    spec = vllm_pod_spec(docs)
    kserve = values["vllm"]["mode"] == "kserve"
    vllm = container(spec, "kserve-container" if kserve else "vllm")
    lora = values["vllm"]["lora"]
    args = vllm["args"]
    model = "/mnt/models" if kserve else f"{values['vllm']['model']['pvc']['mountPath']}/{values['vllm']['model']['path']}"
    for flag in ["--enable-lora", f"--max-loras={lora['maxLoras']}", f"--max-lora-rank={lora['maxLoraRank']}",
                 f"--max-cpu-loras={lora['maxCpuLoras']}", f"--gpu-memory-utilization={values['vllm']['gpuMemoryUtilization']}",
                 f"--model={model}", f"--served-model-name={values['vllm']['model']['servedName']}"]:
        assert flag in args, (flag, args)
    for extra in values["vllm"]["extraArgs"]:
        assert extra in args
    assert ("--gpu-memory-utilization=0.85" in args) == (values["vllm"]["gpuMemoryUtilization"] == 0.85)
    env = {e["name"]: e.get("value") for e in vllm["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "true"
    adapter_dir = values["sidecar"]["adapterDir"]
    assert env["VLLM_LORA_RESOLVER_CACHE_DIR"] == adapter_dir
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert vllm[probe]["httpGet"]["path"] == "/health"
    # the resolver folder is one emptyDir mounted in both containers at the same path
    side = container(spec, "sidecar")
    vols = {v["name"]: v for v in spec["volumes"]}
    for c in (vllm, side):
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == adapter_dir)
        assert "emptyDir" in vols[mount["name"]]
    if not kserve:
        pvc_mount = next(m for m in vllm["volumeMounts"] if m["name"] == "model")
        assert pvc_mount["readOnly"] is True
        assert vols["model"]["persistentVolumeClaim"]["claimName"] == values["vllm"]["model"]["pvc"]["claimName"]
        dep = one(docs, "Deployment", "-vllm")
        assert dep["spec"]["template"]["spec"]["tolerations"] == values["vllm"]["tolerations"]
    else:
        isvc = by_kind(docs, "InferenceService")[0]
        claim, path = values["vllm"]["model"]["pvc"]["claimName"], values["vllm"]["model"]["path"]
        assert isvc["spec"]["predictor"]["model"]["storageUri"] == f"pvc://{claim}/{path}"
    # S3 credentials from the aws-connection style Secret, never inline
    senv = {e["name"]: e for e in side["env"]}
    s3 = values["sidecar"]["s3"]
    assert senv["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": s3["existingSecret"], "key": s3["accessKeyIdKey"]}
    assert senv["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == s3["existingSecret"]
    # CA bundle: mounted and exported under every usual name
    ca = values["sidecar"]["caBundle"]
    if ca["enabled"]:
        path = f"{ca['mountPath']}/{ca['key']}"
        for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "AWS_CA_BUNDLE"):
            assert senv[name]["value"] == path
        src = vols["ca-bundle"]
        if ca["configMapName"]:
            assert src["configMap"]["name"] == ca["configMapName"]
        else:
            assert src["secret"]["secretName"] == ca["secretName"]
    else:
        assert "SSL_CERT_FILE" not in senv and "ca-bundle" not in vols


def test_kserve_runtime_uses_the_same_arguments_as_the_deployment() -> None:
    dep_args = container(vllm_pod_spec(rendered("minimal")), "vllm")["args"]
    sr_args = container(vllm_pod_spec(rendered("openshift")), "kserve-container")["args"]
    strip = lambda args: [a for a in args if not a.startswith("--model=")]  # noqa: E731
    assert strip(dep_args) == strip(sr_args)
    isvc = by_kind(rendered("openshift"), "InferenceService")[0]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"


def test_image_mirror_prefix_applies_to_every_image() -> None:
    docs = rendered("production")
    images = [c["image"] for d in docs if d["kind"] in ("Deployment", "StatefulSet") for c in d["spec"]["template"]["spec"]["containers"]]
    assert images and all(i.startswith("mirror.example.internal/hub/") for i in images), images
    assert any(i.endswith("vllm/vllm-openai:v0.33.0") for i in images)
    assert all(i.split("/")[0] != "mirror.example.internal" or "//" not in i for i in images)
    minimal = [c["image"] for d in rendered("minimal") if d["kind"] == "Deployment" for c in d["spec"]["template"]["spec"]["containers"]]
    assert "vllm/vllm-openai:v0.33.0" in minimal


def test_network_policies_isolate_vllm_and_redis() -> None:
    docs = rendered("minimal")
    gw_labels = one(docs, "Deployment", "-gateway")["spec"]["template"]["metadata"]["labels"]
    vllm_labels = one(docs, "Deployment", "-vllm")["spec"]["template"]["metadata"]["labels"]
    vpol = one(docs, "NetworkPolicy", "-vllm")["spec"]
    assert vpol["podSelector"]["matchLabels"].items() <= vllm_labels.items()
    (rule,) = vpol["ingress"]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"].items() <= gw_labels.items()
    assert not peer["podSelector"]["matchLabels"].items() <= vllm_labels.items()
    rpol = one(docs, "NetworkPolicy", "-redis")["spec"]
    sources = [p["podSelector"]["matchLabels"] for p in rpol["ingress"][0]["from"]]
    assert any(s.items() <= gw_labels.items() for s in sources) and any(s.items() <= vllm_labels.items() for s in sources)
    assert len(sources) == 2


def test_redis_password_never_appears_in_a_manifest() -> None:
    docs = rendered("production")
    text = json.dumps([d for d in docs if d["kind"] != "Secret"])
    assert "$(LORAROUTE_REDIS_PASSWORD)" in text  # only the reference
    gw = container(one(docs, "Deployment", "-gateway")["spec"]["template"]["spec"], "gateway")
    env = [e["name"] for e in gw["env"]]
    # Kubernetes expands $(VAR) only from variables defined earlier in the list
    assert env.index("LORAROUTE_REDIS_PASSWORD") < env.index("LORAROUTE__STORE__URL")
    minimal = rendered("minimal")
    secret = one(minimal, "Secret", "-redis")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


# --------------------------------------------------------------------------------------------
# invalid values are refused
# --------------------------------------------------------------------------------------------
BAD_VALUES = [
    (["--set", "bogusKey=1"], "Additional property bogusKey is not allowed"),
    (["--set", "gateway.replicas=-1"], "gateway.replicas"),
    (["--set", "gateway.replicas=two"], "gateway.replicas"),
    (["--set", "vllm.replicas=-2"], "vllm.replicas"),
    (["--set", "vllm.lora.maxLoraRank=24"], "vllm.lora.maxLoraRank"),
    (["--set", "vllm.lora.maxLoraRank=1024"], "vllm.lora.maxLoraRank"),
    (["--set", "vllm.gpuMemoryUtilization=0"], "vllm.gpuMemoryUtilization"),
    (["--set", "vllm.gpuMemoryUtilization=1.2"], "vllm.gpuMemoryUtilization"),
    (["--set", "vllm.lora.maxLoras=8", "--set", "vllm.lora.maxCpuLoras=4"], "maxCpuLoras (4) must be >= vllm.lora.maxLoras (8)"),
    (["--set", "vllm.mode=statefulset"], "vllm.mode"),
    (["--set", "redis.enabled=false"], "redis.external.url"),
    (["--set", "sidecar.caBundle.enabled=true"], "sidecar.caBundle"),
    (["--set", "sidecar.caBundle.enabled=true", "--set", "sidecar.caBundle.configMapName=a", "--set", "sidecar.caBundle.secretName=b"], "sidecar.caBundle"),
    (["--set", "sidecar.s3.layout=adapters/"], "sidecar.s3.layout"),
    (["--set-json", 'gateway.config.discovery={"static": []}'], "discovery"),
    (["--set-json", 'gateway.config.server={"port": 9000}'], "gateway.config.server"),
    (["--set-json", 'gateway.config.tenants=[{"name": "a/b"}]'], "gateway.config.tenants.0.name"),
    (["--set-json", 'gateway.config.tenants=[{"name": "acme", "keys": ["x"]}]'], "keys"),
    (["--set-json", 'gateway.auth.adminKeyDigests=["not-a-digest"]'], "gateway.auth.adminKeyDigests.0"),
    (["--set", "route.tls.termination=passthrough"], "route.tls.termination"),
    (["--set", "vllm.kserve.deploymentMode=Serverless"], "vllm.kserve.deploymentMode"),
    (["--set", "route.tls.termination=reencrypt"], "route.tls.termination"),
    (["--set", "ingress.enabled=true", "--set", "route.enabled=true"], "either ingress or route"),
    (["--set", "vllm.enabled=false"], "set discovery.labelSelector"),
    (["--set", "gateway.terminationGracePeriodSeconds=30"], "must be at least gateway.drain.preStopSeconds"),
    (["--set-json", 'gateway.config.server={"drain": {"grace_s": 1}}'], "gateway.config.server"),
    (["--set-json", 'gateway.config.tenants=[{"name": "a", "limits": {"requests_per_minute": 0}}]'],
     "gateway.config.tenants.0.limits.requests_per_minute"),
    (["--set", "gateway.auth.metricsAuth=true", "--set", "monitoring.serviceMonitor.enabled=true"],
     "bearerTokenSecret"),
    (["--set", "precisePrefix.eventsPort=0"], "precisePrefix.eventsPort"),
    (["--set", "precisePrefix.tokenizer.mode=guess"], "precisePrefix.tokenizer.mode"),
    (["--set", "precisePrefix.enable=true"], "precisePrefix"),
]


@pytest.mark.parametrize(("args", "message"), BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_invalid_values_are_refused(args: list[str], message: str) -> None:
    res = run_helm("template", "lr", str(CHART), *args)
    assert res.returncode != 0, f"accepted: {args}"
    assert message in res.stderr, res.stderr


def test_good_values_in_every_ci_file_are_accepted() -> None:
    for value_set in VALUE_SETS:
        assert rendered(value_set)


# --------------------------------------------------------------------------------------------
# the rendered gateway config is what the gateway accepts
# --------------------------------------------------------------------------------------------
def configmap_file(docs: tuple[dict[str, Any], ...], suffix: str, key: str) -> str:
    return one(docs, "ConfigMap", suffix)["data"][key]


def materialise_gateway(docs: tuple[dict[str, Any], ...], tmp: Path, digests: dict[str, str] | None = None) -> tuple[Path, dict[str, str]]:
    """Write gateway.yaml and the auth Secret's files as the pod would see them (mount paths
    moved under ``tmp``); return the config path and the pod's resolved environment."""
    text = configmap_file(docs, "-gateway", "gateway.yaml")
    auth_dir = tmp / "auth"
    auth_dir.mkdir(parents=True, exist_ok=True)
    secrets = [d for d in by_kind(docs, "Secret") if d["metadata"]["name"].endswith("-gateway-auth")]
    files = dict(secrets[0]["stringData"]) if secrets else dict(digests or {})
    for name, content in files.items():
        (auth_dir / name).write_text(content)
    cfg = tmp / "gateway.yaml"
    cfg.write_text(text.replace("/etc/loraroute-auth/", f"{auth_dir}/"))
    gw = container(one(docs, "Deployment", "-gateway")["spec"]["template"]["spec"], "gateway")
    env: dict[str, str] = {}
    for e in gw["env"]:
        if "value" in e:
            value = e["value"]
            for k, v in env.items():
                value = value.replace(f"$({k})", v)
            env[e["name"]] = value
        elif "secretKeyRef" in e.get("valueFrom", {}):
            env[e["name"]] = "s3cretPassw0rd"
    return cfg, env


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_rendered_gateway_config_is_accepted_by_load_config(value_set: str, tmp_path: Path) -> None:
    from gateway.config import load_config

    docs, values = rendered(value_set), load_values(value_set)
    existing = {
        # what an operator puts in the pre-created Secret for the production value set
        "admin.sha256": hashlib.sha256(b"admin-key").hexdigest() + "\n",
        "key-alice.sha256": hashlib.sha256(b"alice-key").hexdigest() + "\n",
        "key-bob.sha256": hashlib.sha256(b"bob-key").hexdigest() + "\n",
        "key-grafana.sha256": hashlib.sha256(b"grafana-key").hexdigest() + "\n",
        "tenant-analytics.sha256": hashlib.sha256(b"analytics-key").hexdigest() + "\n",
        "tenant-writers.sha256": "# rotated monthly\n" + hashlib.sha256(b"writers-key").hexdigest() + "\n",
    }
    cfg_path, env = materialise_gateway(docs, tmp_path, existing)
    cfg = load_config(cfg_path, env=env)
    assert cfg.server.host == "0.0.0.0" and cfg.server.port == values["gateway"]["port"]
    assert [t.name for t in cfg.tenants] == [t["name"] for t in values["gateway"]["config"]["tenants"]]
    assert [b.name for b in cfg.bases] == [b["name"] for b in values["gateway"]["config"]["bases"]]
    if value_set == "production":
        assert cfg.keys_configured and cfg.tenants[0].api_key_sha256 == (hashlib.sha256(b"analytics-key").hexdigest(),)
        assert cfg.store.url == "rediss://:s3cretPassw0rd@redis.example.internal:6380/0"
        assert cfg.admin.api_key_sha256 == (hashlib.sha256(b"admin-key").hexdigest(),)
        assert [(k.name, k.roles, k.api_key_sha256) for k in cfg.admin.keys] == [
            (name, (role,), (hashlib.sha256(f"{name}-key".encode()).hexdigest(),))
            for name, role in (("alice", "operator"), ("bob", "approver"), ("grafana", "viewer"))]
        assert cfg.changes.two_person == ("allowlist.add", "allowlist.retire", "adapter.roll", "pipeline.weights")
    if value_set == "kserve":
        digests = values["gateway"]["auth"]["tenantKeyDigests"]["acme"]
        assert cfg.tenants[0].api_key_sha256 == tuple(digests) and cfg.tenants[1].api_key_sha256 == ()
        assert cfg.pipeline == "llm-d"
    if value_set in ("minimal", "kserve", "openshift"):
        assert cfg.store.url == f"redis://:s3cretPassw0rd@lr-loraroute-redis.{NAMESPACE}.svc:6379/0"
    # discovery points at exactly the vLLM pods this chart runs, on their ports
    k8s = cfg.discovery.kubernetes
    assert k8s is not None and cfg.discovery.monitor == "never"
    selector = dict(kv.split("=") for kv in k8s.label_selector.split(","))
    spec = vllm_pod_spec(docs)
    ports = {p["name"]: p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
    assert k8s.port == ports["http"] and k8s.sidecar_port == ports["sidecar"]
    if values["vllm"]["mode"] == "kserve":
        assert selector == {"serving.kserve.io/inferenceservice": by_kind(docs, "InferenceService")[0]["metadata"]["name"]}
    else:
        assert selector.items() <= one(docs, "Deployment", "-vllm")["spec"]["template"]["metadata"]["labels"].items()


def test_rendered_gateway_config_passes_the_gateway_check_command(tmp_path: Path) -> None:
    """The real `loraroute gateway --check` (config + pipeline build) accepts the rendering."""
    from loraroute.procs import loraroute_cmd

    cfg_path, env = materialise_gateway(rendered("kserve"), tmp_path)
    res = subprocess.run([*loraroute_cmd("gateway", "--config", str(cfg_path), "--check")], capture_output=True, text=True,
                         timeout=60, env={**os.environ, **env}, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "config ok" in res.stdout
    bad = cfg_path.read_text().replace("pipeline: llm-d", "pipeline: no-such-preset")
    cfg_path.write_text(bad)
    res = subprocess.run([*loraroute_cmd("gateway", "--config", str(cfg_path), "--check")], capture_output=True, text=True,
                         timeout=60, env={**os.environ, **env}, check=False)
    assert res.returncode == 2


def test_values_schema_tracks_the_gateway_config_model() -> None:
    """The chart's schema for gateway.config must accept exactly the gateway's keys (minus the
    ones the chart owns), so a renamed key in gateway/config.py fails here, not at install."""
    from gateway.config import BaseConfig, GatewayConfig, TenantConfig

    schema = json.loads((CHART / "values.schema.json").read_text())
    cfg = schema["properties"]["gateway"]["properties"]["config"]
    chart_owned = {"discovery", "store", "admin"}
    assert set(cfg["properties"]) == set(GatewayConfig.model_fields) - chart_owned
    tenant = cfg["properties"]["tenants"]["items"]["properties"]
    assert set(tenant) == set(TenantConfig.model_fields) - {"api_key_sha256", "api_key_sha256_file"}
    base = cfg["properties"]["bases"]["items"]["properties"]
    assert set(base) == set(BaseConfig.model_fields)


def iter_values_keys(node: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for k, v in node.items():
        path = f"{prefix}{k}"
        yield path
        if isinstance(v, dict) and v and k not in ("config", "resources", "labels", "annotations", "nodeSelector", "podLabels", "podAnnotations", "tenantKeyDigests", "podSecurityContext", "affinity"):
            yield from iter_values_keys(v, path + ".")


def test_every_default_value_is_allowed_by_the_schema_and_documented() -> None:
    """values.yaml and values.schema.json describe the same keys, and every key has a comment."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def find(path: str) -> dict[str, Any] | None:
        node: dict[str, Any] = schema
        for part in path.split("."):
            props = node.get("properties", {})
            if part not in props:
                return None
            node = props[part]
        return node

    missing = [p for p in iter_values_keys(values) if find(p) is None]
    assert not missing, missing
    # every key has a comment right above it (or inline), except the contents of Kubernetes-native
    # blocks (resources, security contexts, labels) that are passed through as they are
    text = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    native_indent: int | None = None
    for i, line in enumerate(text):
        m = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if not m:
            continue
        indent = len(m.group(1))
        if native_indent is not None and indent > native_indent:
            continue
        native_indent = indent if m.group(2) in ("resources", "podSecurityContext", "labels") else None
        if not (text[i - 1].strip().startswith("#") or "#" in line.split(":", 1)[1]):
            undocumented.append(line.strip())
    assert not undocumented, undocumented


# --------------------------------------------------------------------------------------------
# the rendered sidecar settings are what the sidecar accepts
# --------------------------------------------------------------------------------------------
# what an OpenShift AI data connection Secret holds (besides the two keys)
DATA_CONNECTION = {"AWS_S3_ENDPOINT": "https://minio-api.minio.svc:443", "AWS_S3_BUCKET": "dc-adapters",
                   "AWS_DEFAULT_REGION": "eu-west-1"}


def sidecar_invocation(docs: tuple[dict[str, Any], ...], tmp: Path) -> tuple[list[str], dict[str, str]]:
    """The sidecar's argv (after ``loraroute``) and environment as the kubelet would produce
    them for a pod named vllm-pod-0 with IP 10.1.2.3, with the settings file under ``tmp``."""
    side = container(vllm_pod_spec(docs), "sidecar")
    settings = tmp / "sidecar.yaml"
    settings.write_text(configmap_file(docs, "-sidecar", "sidecar.yaml"))
    env = {"POD_NAME": "vllm-pod-0", "POD_IP": "10.1.2.3"}
    for e in side["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in e.get("valueFrom", {}):
            env[e["name"]] = DATA_CONNECTION.get(e["valueFrom"]["secretKeyRef"]["key"], "from-secret")
    args = []
    for a in side["args"]:
        for k in ("POD_NAME", "POD_IP"):
            a = a.replace(f"$({k})", env[k])
        args.append(a.replace("/etc/loraroute/sidecar.yaml", str(settings)))
    return args, env


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_rendered_sidecar_settings_are_accepted_by_the_sidecar(value_set: str, tmp_path: Path) -> None:
    from vllm_sidecar.cli import build_parser, settings_from_args

    docs, values = rendered(value_set), load_values(value_set)
    args, env = sidecar_invocation(docs, tmp_path)
    assert container(vllm_pod_spec(docs), "sidecar")["command"] == ["loraroute"] and args[0] == "sidecar"
    settings = settings_from_args(build_parser().parse_args(args[1:]), env=env)
    vllm = values["vllm"]
    assert settings.pod_id == "vllm-pod-0"
    assert settings.vllm_url == f"http://127.0.0.1:{vllm['port']}"
    assert settings.advertise_url == f"http://10.1.2.3:{vllm['port']}"
    assert settings.sidecar_url == f"http://10.1.2.3:{values['sidecar']['port']}"
    assert settings.listen.host == "0.0.0.0" and settings.listen.port == values["sidecar"]["port"]
    assert (settings.max_lora_rank, settings.max_loras, settings.max_cpu_loras) == (
        vllm["lora"]["maxLoraRank"], vllm["lora"]["maxLoras"], vllm["lora"]["maxCpuLoras"])
    vllm_args = container(vllm_pod_spec(docs), "kserve-container" if vllm["mode"] == "kserve" else "vllm")["args"]
    assert f"--model={settings.base_model}" in vllm_args  # the resolver compares these exactly
    assert f"--served-model-name={settings.served_model_name}" in vllm_args
    assert settings.adapter_dir == values["sidecar"]["adapterDir"]
    demand = values["sidecar"]["demand"]
    assert (settings.demand.enabled, settings.demand.refresh_s, settings.demand.prefetch) == (
        demand["enabled"], demand["refreshSeconds"], demand["prefetch"])
    s3 = settings.source.s3
    assert settings.source.type == "s3" and s3.layout == values["sidecar"]["s3"]["layout"]
    if values["sidecar"]["s3"]["fromDataConnection"]:
        assert (s3.endpoint_url, s3.bucket, s3.region) == (
            DATA_CONNECTION["AWS_S3_ENDPOINT"], DATA_CONNECTION["AWS_S3_BUCKET"], DATA_CONNECTION["AWS_DEFAULT_REGION"])
    else:
        assert (s3.endpoint_url or "") == values["sidecar"]["s3"]["endpoint"]
        assert s3.bucket == values["sidecar"]["s3"]["bucket"] and s3.region == values["sidecar"]["s3"]["region"]
    if values["sidecar"]["caBundle"]["enabled"]:
        assert s3.ca_bundle == env["AWS_CA_BUNDLE"] == env["SSL_CERT_FILE"]
    assert settings.store.type == "redis" and settings.store.password_env == "LORAROUTE_REDIS_PASSWORD"
    assert env.get("LORAROUTE_REDIS_PASSWORD") == "from-secret"
    # sidecar and gateway share one store: same URL and key prefix
    gw_cfg, gw_env = materialise_gateway(docs, tmp_path / "gw", {f: "" for f in ("admin.sha256", "key-alice.sha256", "key-bob.sha256", "key-grafana.sha256",
                                                                            "tenant-analytics.sha256", "tenant-writers.sha256")})
    from gateway.config import load_config

    gw = load_config(gw_cfg, env={})
    assert gw.store.url == settings.store.url and gw.store.key_prefix == settings.store.key_prefix


def test_rendered_sidecar_passes_the_sidecar_check_command(tmp_path: Path) -> None:
    from loraroute.procs import loraroute_cmd

    args, env = sidecar_invocation(rendered("production"), tmp_path)
    res = subprocess.run([*loraroute_cmd(*args, "--check-config")], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **env}, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    effective = json.loads(res.stdout)
    assert effective["source"]["s3"]["endpoint_url"] == "https://minio.example.internal:9000"
    assert "from-secret" not in res.stdout  # credentials never printed


def render_with(*args: str) -> tuple[dict[str, Any], ...]:
    res = run_helm("template", "lr", str(CHART), "--namespace", NAMESPACE, *args)
    assert res.returncode == 0, res.stderr
    return tuple(d for d in yaml.safe_load_all(res.stdout) if d)


def test_redis_only_discovery_needs_no_kubernetes_api(tmp_path: Path) -> None:
    from gateway.config import load_config

    docs = render_with("--set", "discovery.mode=redis", "--set", "rbac.create=false")
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")
    cfg_path, env = materialise_gateway(docs, tmp_path)
    cfg = load_config(cfg_path, env=env)
    assert cfg.discovery.kubernetes is None and not cfg.discovery.static  # pods = sidecar registrations


def test_gateway_only_install_for_vllm_pods_run_elsewhere(tmp_path: Path) -> None:
    import kubernetes_validate
    from gateway.config import load_config

    docs = render_with("--set", "vllm.enabled=false", "--set", "discovery.labelSelector=app=my-vllm")
    kinds = {d["kind"] for d in docs}
    assert not any(d["metadata"]["name"].endswith("-vllm") for d in docs), kinds
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    cfg_path, env = materialise_gateway(docs, tmp_path)
    cfg = load_config(cfg_path, env=env)
    assert cfg.discovery.kubernetes is not None and cfg.discovery.kubernetes.label_selector == "app=my-vllm"


def test_image_dockerfile_copies_what_exists() -> None:
    """helm/image/Dockerfile (not built here: no container runtime) names only real paths and
    installs the extra that Kubernetes discovery needs."""
    text = (ROOT / "helm" / "image" / "Dockerfile").read_text()
    sources = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ")]
    assert sources
    for group in sources:
        for src in group:
            assert (ROOT / src).exists(), src
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert 'pip install ".[k8s]"' in text and "k8s" in project["project"]["optional-dependencies"]
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {src for group in sources for src in group}
    assert packages <= copied, packages - copied
    assert "USER 10001" in text  # numeric, so runAsNonRoot can verify it


def test_gateway_config_hot_reload_or_rollout() -> None:
    """By default a config change is hot-reloaded (no pod-template checksum); opt in to rollouts.
    A change of the chart-made auth Secret always rolls the pods (digests are read on reload)."""
    default = one(render_with(), "Deployment", "-gateway")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/config" not in default and "checksum/auth" in default
    rolled = one(render_with("--set", "gateway.rolloutOnConfigChange=true"), "Deployment", "-gateway")
    assert "checksum/config" in rolled["spec"]["template"]["metadata"]["annotations"]
    a = one(render_with("--set-json", 'gateway.auth.adminKeyDigests=["' + "a" * 64 + '"]'), "Deployment", "-gateway")
    assert a["spec"]["template"]["metadata"]["annotations"]["checksum/auth"] != default["checksum/auth"]


def test_helm_test_pod_checks_the_gateway_service() -> None:
    docs = rendered("production")
    (pod,) = [d for d in by_kind(docs, "Pod") if d["metadata"]["annotations"].get("helm.sh/hook") == "test"]
    svc = one(docs, "Service", "-gateway")
    script = pod["spec"]["containers"][0]["args"][0]
    assert f"http://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}" in script
    assert pod["spec"]["containers"][0]["image"].startswith("mirror.example.internal/hub/loraroute/loraroute:")
    compile(script, "helm-test", "exec")  # the check itself is valid Python
    # the restricted gateway NetworkPolicy still lets the test pod in
    gw_pol = one(docs, "NetworkPolicy", "-gateway")["spec"]["ingress"][0]["from"]
    assert any(p.get("podSelector", {}).get("matchLabels", {}).items() <= pod["metadata"]["labels"].items() for p in gw_pol if "podSelector" in p)
    pdb = one(docs, "PodDisruptionBudget", "-vllm")["spec"]
    assert pdb["maxUnavailable"] == 1
    assert pdb["selector"]["matchLabels"].items() <= one(docs, "Deployment", "-vllm")["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize(("script", "target"), [("values_schema.py", "values.schema.json"), ("dashboard.py", "dashboards/loraroute.json")])
def test_generated_chart_files_are_current(script: str, target: str) -> None:
    """values.schema.json and the dashboard are generated by helm/tools/*.py; the committed files
    must equal the generators' output (run the script after editing it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(script[:-3], ROOT / "helm" / "tools" / script)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (CHART / target).read_text() == module.render(), f"run: python helm/tools/{script}"


def test_named_admin_keys_reach_the_gateway_through_the_chart_made_secret(tmp_path: Path) -> None:
    """gateway.auth.roleKeys: one digest file per key in the chart's Secret, named keys with roles
    in the config, and the gateway's own loader reads them back."""
    from gateway.config import load_config

    alice = hashlib.sha256(b"alice-key").hexdigest()
    docs = render_with("--set-json", f'gateway.auth.roleKeys=[{{"name": "alice", "roles": ["operator"], '
                                     f'"digests": ["{alice}"]}}, {{"name": "bob", "roles": ["approver", "viewer"]}}]',
                       "--set-json", 'gateway.config.changes={"two_person": "all"}')
    secret = one(docs, "Secret", "-gateway-auth")["stringData"]
    assert secret["key-alice.sha256"].split() == [alice] and secret["key-bob.sha256"].split() == []
    cfg_path, env = materialise_gateway(docs, tmp_path)
    cfg = load_config(cfg_path, env=env)
    assert [(k.name, k.roles, k.api_key_sha256) for k in cfg.admin.keys] == [
        ("alice", ("operator",), (alice,)), ("bob", ("approver", "viewer"), ())]
    assert cfg.changes.two_person == ("allowlist.add", "allowlist.retire", "adapter.roll", "pipeline.weights")
    res = run_helm("template", "lr", str(CHART), "--set-json", 'gateway.auth.roleKeys=[{"name": "x", "roles": ["root"]}]')
    assert res.returncode != 0 and "roleKeys" in res.stderr


def test_sidecar_control_token_reaches_both_sides_from_one_secret(tmp_path: Path) -> None:
    """The sidecars' control API requires a token: one Secret (random unless given), mounted as
    the same variable in the gateway and in every sidecar, each config naming that variable; and
    only the gateways may reach the sidecar's port (metrics scrapers aside, for /metrics)."""
    from gateway.config import load_config
    from vllm_sidecar.settings import load_settings

    for docs in (rendered("minimal"), rendered("kserve")):
        secret = one(docs, "Secret", "-sidecar-token")
        assert len(secret["data"]["token"]) > 40  # 40 random characters, base64
        refs = []
        gw = container(one(docs, "Deployment", "-gateway")["spec"]["template"]["spec"], "gateway")
        for c in (gw, container(vllm_pod_spec(docs), "sidecar")):
            env = {e["name"]: e for e in c["env"]}
            refs.append(env["LORAROUTE_CONTROL_TOKEN"]["valueFrom"]["secretKeyRef"])
        assert refs[0] == refs[1] == {"name": secret["metadata"]["name"], "key": "token"}
        cfg_path, env = materialise_gateway(docs, tmp_path)
        assert load_config(cfg_path, env=env).security.sidecar_token_env == "LORAROUTE_CONTROL_TOKEN"
        sidecar = load_settings(yaml.safe_load(configmap_file(docs, "-sidecar", "sidecar.yaml")) | {
            "pod_id": "p", "vllm_url": "http://127.0.0.1:8000"})
        assert sidecar.control_token_env == "LORAROUTE_CONTROL_TOKEN"
    policy = one(rendered("minimal"), "NetworkPolicy", "-vllm")["spec"]["ingress"]
    assert [r["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for r in policy] == ["gateway"]
    off = render_with("--set", "sidecar.controlToken.enabled=false")
    assert not [d for d in by_kind(off, "Secret") if d["metadata"]["name"].endswith("-sidecar-token")]
    assert "LORAROUTE_CONTROL_TOKEN" not in json.dumps(off)


def test_drain_timing_reaches_the_config_and_the_pod(tmp_path: Path) -> None:
    from gateway.config import load_config

    docs = render_with("--set", "gateway.drain.preStopSeconds=3", "--set", "gateway.drain.deadlineSeconds=30",
                       "--set", "gateway.terminationGracePeriodSeconds=45")
    spec = one(docs, "Deployment", "-gateway")["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] == 45
    assert container(spec, "gateway")["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "3"]
    cfg_path, env = materialise_gateway(docs, tmp_path)
    drain = load_config(cfg_path, env=env).server.drain
    assert (drain.grace_s, drain.deadline_s) == (5.0, 30.0)
    default = container(one(rendered("minimal"), "Deployment", "-gateway")["spec"]["template"]["spec"], "gateway")
    assert "lifecycle" not in default  # no preStop: the gateway's own grace does the waiting


def test_metrics_auth_through_the_chart(tmp_path: Path) -> None:
    from gateway.config import load_config

    scraper = hashlib.sha256(b"scraper-key").hexdigest()
    docs = render_with("--set", "gateway.auth.metricsAuth=true", "--set-json",
                       f'gateway.auth.metricsKeyDigests=["{scraper}"]', "--set", "monitoring.serviceMonitor.enabled=true",
                       "--set", "monitoring.serviceMonitor.bearerTokenSecret.name=prom-key",
                       "--set", "monitoring.serviceMonitor.bearerTokenSecret.key=key")
    assert one(docs, "Secret", "-gateway-auth")["stringData"]["metrics.sha256"].split() == [scraper]
    cfg_path, env = materialise_gateway(docs, tmp_path)
    auth = load_config(cfg_path, env=env).metrics.auth
    assert auth.required and auth.api_key_sha256 == (scraper,)
    endpoint = one(docs, "ServiceMonitor", "-gateway")["spec"]["endpoints"][0]
    assert endpoint["bearerTokenSecret"] == {"name": "prom-key", "key": "key"}


# --------------------------------------------------------------------------------------------
# precise prefix routing (precisePrefix.enabled)
# --------------------------------------------------------------------------------------------
def kv_events_config(args: list[str]) -> dict[str, Any] | None:
    found = [a.split("=", 1)[1] for a in args if a.startswith("--kv-events-config=")]
    assert len(found) <= 1
    return json.loads(found[0]) if found else None


@pytest.mark.parametrize("value_set", ["minimal", "kserve"])
def test_precise_prefix_switch_wires_vllm_sidecar_and_gateway(value_set: str, tmp_path: Path) -> None:
    """On: vLLM publishes KV events on the pod, the sidecar relays them from localhost (its own
    settings loader accepts them), the gateway's pipeline has precise-prefix where prefix-cache
    was, at its weight, hashing adapters at the sidecar's folder, and every base tokenizes through
    the pod. Every manifest still validates. Off (the default): none of it."""
    import kubernetes_validate
    from gateway.config import load_config
    from scorer.build import build_pipeline
    from vllm_sidecar.cli import build_parser, settings_from_args

    values = load_values(value_set)
    docs = render_with("-f", str(CI / f"{value_set}-values.yaml"), "--set", "precisePrefix.enabled=true",
                       "--set", "precisePrefix.eventsPort=6557", "--kube-version", KUBE_VERSION)
    for doc in docs:
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    name = "kserve-container" if values["vllm"]["mode"] == "kserve" else "vllm"
    events = kv_events_config(container(vllm_pod_spec(docs), name)["args"])
    assert events == {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:6557",
                      "replay_endpoint": "tcp://*:5558", "topic": "kv"}
    args, env = sidecar_invocation(docs, tmp_path)
    kv = settings_from_args(build_parser().parse_args(args[1:]), env=env).kv_events
    assert kv is not None and (kv.endpoint, kv.replay_endpoint, kv.topic) == (
        "tcp://127.0.0.1:6557", "tcp://127.0.0.1:5558", "kv")
    cfg_path, genv = materialise_gateway(docs, tmp_path / "gw", {f: "" for f in (
        "admin.sha256", "tenant-acme.sha256", "tenant-labs.sha256")})
    cfg = load_config(cfg_path, env=genv)
    assert {b.name: b.tokenizer.mode for b in cfg.bases} == {b["name"]: "pod" for b in values["gateway"]["config"]["bases"]}
    pipeline = build_pipeline(cfg.pipeline)
    preset = values["gateway"]["config"].get("pipeline", "default")
    plain = [(n, w) for n, _, w in build_pipeline(preset).scorers]
    assert [(n, w) for n, _, w in pipeline.scorers] == [
        ("precise-prefix" if n == "prefix-cache" else n, w) for n, w in plain]
    assert pipeline.name == f"{preset}+precise" and pipeline.kv_reader is not None
    lora_path = next(sc for n, sc, _ in pipeline.scorers if n == "precise-prefix").params["lora_path"]
    assert lora_path == values["sidecar"]["adapterDir"].rstrip("/") + "/{name}"

    off = render_with("-f", str(CI / f"{value_set}-values.yaml"))
    assert kv_events_config(container(vllm_pod_spec(off), name)["args"]) is None
    assert "kv_events" not in yaml.safe_load(configmap_file(off, "-sidecar", "sidecar.yaml"))
    gw = yaml.safe_load(configmap_file(off, "-gateway", "gateway.yaml"))
    assert gw["pipeline"] == preset and all("tokenizer" not in b for b in gw["bases"])


def test_precise_prefix_keeps_a_pipeline_that_has_it_and_a_base_tokenizer_given() -> None:
    pipeline = {"filters": ["healthy-fresh"], "scorers": [{"type": "precise-prefix", "weight": 4,
                                                           "parameters": {"lora_path": "/x/{name}"}}]}
    bases = [{"name": "base", "served_name": "base", "tokenizer": {"mode": "local", "path": "/models/tok"}},
             {"name": "other", "served_name": "other"}]
    docs = render_with("--set", "precisePrefix.enabled=true", "--set-json", f"gateway.config.pipeline={json.dumps(pipeline)}",
                       "--set-json", f"gateway.config.bases={json.dumps(bases)}",
                       "--set-json", 'precisePrefix.tokenizer={"mode": "pod", "timeout_ms": 50}')
    gw = yaml.safe_load(configmap_file(docs, "-gateway", "gateway.yaml"))
    assert gw["pipeline"] == pipeline
    assert [b.get("tokenizer") for b in gw["bases"]] == [bases[0]["tokenizer"], {"mode": "pod", "timeout_ms": 50}]
