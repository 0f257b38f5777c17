"""``loraroute doctor --gateway URL``: the checklist against a running installation, and
``loraroute doctor request --model base:adapter``: one minimal call traced layer by layer.

Live checks (through the gateway's admin API, so they need an admin key):

- Gateway: it answers, the key is accepted (and which roles it has);
- Pods: every pod's served bases, ``max-loras`` / ``max-cpu-loras`` / ``max-lora-rank``, health and
  state age; every allowlisted adapter has a pod whose rank limit fits it; every pod's sidecar
  publishes;
- Store (``GET /admin/store``: each sidecar checks with its own settings and CA bundle): the
  endpoint answers (a TLS failure is named as such, with the fix), and each allowlisted adapter
  is there with the right layout, a rank the pod accepts and its pinned version;
- Requests: a minimal ``<base>:<adapter>`` request per base is answered.

The request trace walks HTTP -> auth -> allowlist -> store fetch -> TLS -> validation -> GPU load
-> inference and says which layer failed and why; layers after a failure are ``SKIP`` (not
reached). The store layers come from the sidecars' store check; the GPU load from the real
request, or, when it fails, from the sidecar's own answer to an ensure on that pod.
"""

from __future__ import annotations

import difflib
import time
from typing import Any

import httpx

from loraroute.doctor_report import Check
from loraroute.gateway_client import GatewayClient, GatewayError

_STORE_FIX = {
    "tls_certificate": "mount the CA that signed the S3 endpoint's certificate: sidecar.caBundle (source.s3.ca_bundle)",
    "s3_connect": "check sidecar.s3.endpoint and that the object store is reachable from the pods",
    "s3_timeout": "the object store accepted the connection but did not answer: check its health",
    "s3_credentials": "the sidecar has no keys: check the S3 Secret (sidecar.s3.existingSecret)",
    "s3_auth": "the keys were refused: check the S3 Secret's keys and the bucket policy",
    "bucket_not_found": "check sidecar.s3.bucket",
    "rank_too_large": "start vLLM and the sidecar with a --max-lora-rank that fits (vllm.lora.maxLoraRank), or retrain "
                      "the adapter with a smaller r",
    "base_model_mismatch": "use an adapter trained for the served base, or fix base_model_name_or_path and push again",
    "adapter_not_found": "push it (loraroute adapters push DIR s3://...) or fix the name; the message lists what is there",
    "version_not_found": "roll to a version the store holds (loraroute adapters ls shows them)",
}
_LAYER_OF = {
    "tls_certificate": "TLS", "s3_connect": "store fetch", "s3_timeout": "store fetch", "s3_credentials": "store fetch",
    "s3_auth": "store fetch", "s3_error": "store fetch", "bucket_not_found": "store fetch",
    "adapter_not_found": "store fetch", "version_not_found": "store fetch", "vllm_load_failed": "GPU load",
    "unreachable": "store fetch",
}


def _chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 1, "temperature": 0}


# --------------------------------------------------------------------------------------------
# the live checklist
# --------------------------------------------------------------------------------------------
def check_live(gw: GatewayClient, api_key: str | None) -> list[Check]:
    out: list[Check] = []
    t0 = time.perf_counter()
    try:
        gw.call("GET", "/health")
    except GatewayError as exc:
        return [Check("Gateway", "gateway answers", "FAIL", str(exc), "check the URL and that the gateway runs")]
    out.append(Check("Gateway", "gateway answers", "PASS", f"{gw.url}/health in {1000 * (time.perf_counter() - t0):.0f} ms"))
    try:
        who = gw.get("/admin/whoami")
    except GatewayError as exc:
        out.append(Check("Gateway", "admin key accepted", "FAIL", str(exc),
                         "pass the admin key (--key or LORAROUTE_ADMIN_KEY)"))
        return out
    out.append(Check("Gateway", "admin key accepted", "PASS", f"key {who['name']} ({', '.join(who['roles'])})"))
    bases = gw.get("/admin/allowlist")["data"]
    pods = gw.get("/admin/pods")["data"]
    out.extend(_pods(bases, pods))
    out.extend(_store(gw, bases))
    out.extend(_requests(gw, bases, api_key))
    return out


def _pods(bases: list[dict[str, Any]], pods: list[dict[str, Any]]) -> list[Check]:
    out: list[Check] = []
    if not pods:
        return [Check("Pods", "pods discovered", "FAIL", "the gateway knows no pod", "check discovery (GET /admin/pods)")]
    served = {b["served_name"] for b in bases}
    limits: dict[str, int] = {}
    for p in pods:
        state = p.get("state")
        if state is None:
            out.append(Check("Pods", f"pod {p['pod_id']}", "FAIL", "discovered but publishes no state",
                             "check its sidecar (or the gateway's monitor) can reach vLLM"))
            continue
        limits[p["pod_id"]] = int(state["max_lora_rank"])
        missing = sorted(served - set(state.get("base_models") or []))
        detail = (f"serves {', '.join(state.get('base_models') or []) or 'nothing'}; --max-loras={state['max_loras']} "
                  f"--max-cpu-loras={state['max_cpu_loras']} --max-lora-rank={state['max_lora_rank']}; "
                  f"state {p.get('state_age_s')} s old")
        if missing:
            out.append(Check("Pods", f"pod {p['pod_id']}", "FAIL", f"{detail}; does not serve {', '.join(missing)}",
                             "start vLLM with --served-model-name matching bases[].served_name"))
        elif not state.get("healthy") or not p.get("routable"):
            out.append(Check("Pods", f"pod {p['pod_id']}", "WARN", f"{detail}; not healthy or not routable",
                             "see the pod's vLLM and sidecar logs"))
        else:
            out.append(Check("Pods", f"pod {p['pod_id']}", "PASS", detail))
    adapters = [(b["base"], a) for b in bases for a in b["adapters"]]
    no_pod = [f"{b}:{a['name']} (rank {a['rank']})" for b, a in adapters
              if a.get("rank") and limits and all(a["rank"] > r for r in limits.values())]
    some = [f"{b}:{a['name']}" for b, a in adapters
            if a.get("rank") and any(a["rank"] > r for r in limits.values()) and not all(a["rank"] > r for r in limits.values())]
    if no_pod:
        out.append(Check("Pods", "a pod fits every adapter's rank", "FAIL", f"no pod's --max-lora-rank fits "
                         f"{', '.join(no_pod)}", "raise --max-lora-rank (vllm.lora.maxLoraRank) or retrain"))
    elif some:
        out.append(Check("Pods", "a pod fits every adapter's rank", "WARN", f"only some pods fit {', '.join(some)}: "
                         "routing sends them to those", "give every pod the same --max-lora-rank"))
    else:
        out.append(Check("Pods", "a pod fits every adapter's rank", "PASS",
                         f"{len(adapters)} allowlisted adapter(s), pod rank limits {sorted(set(limits.values()))}"))
    with_sidecar = [p["pod_id"] for p in pods if (p.get("state") or {}).get("sidecar_url")]
    if len(with_sidecar) == len(pods):
        out.append(Check("Pods", "sidecars publishing", "PASS", f"{len(pods)} of {len(pods)} pods"))
    else:
        without = sorted({p["pod_id"] for p in pods} - set(with_sidecar))
        out.append(Check("Pods", "sidecars publishing", "WARN", f"no sidecar for {', '.join(without)}: the gateway "
                         "monitors them itself; no store fetches, no version rolls there",
                         "run the sidecar beside every vLLM pod (the chart does)"))
    return out


def _item(entry: dict[str, Any]) -> str:
    """How the store check names an allowlist entry: ``served_name`` or ``served_name@version``."""
    return f"{entry['served_name']}@{entry['version']}" if entry.get("version") else str(entry["served_name"])


def _store(gw: GatewayClient, bases: list[dict[str, Any]]) -> list[Check]:
    wanted = {_item(a): (b["base"], a) for b in bases for a in b["adapters"]}
    try:
        report = gw.get("/admin/store")
    except GatewayError as exc:
        return [Check("Store", "store check", "FAIL", str(exc))]
    out: list[Check] = []
    if not report["data"]:
        return [Check("Store", "S3 endpoint reachable", "SKIP", "no pod has a sidecar: adapters come from the pods' "
                      "own folders")]
    reachable = []
    for answer in report["data"]:
        if answer.get("ok"):
            reachable.append(answer)
            out.append(Check("Store", f"store from {answer['pod']}", "PASS", f"{answer['source']} answers"))
        else:
            err = answer.get("error") or {}
            layer = "TLS" if err.get("code") == "tls_certificate" else "store"
            out.append(Check("Store", f"store from {answer['pod']}", "FAIL", f"{layer}: {err.get('message')}",
                             _STORE_FIX.get(str(err.get("code")), "see the sidecar log")))
    for served, (base, entry) in sorted(wanted.items()):
        problems: list[tuple[str, str]] = []  # (code, "pod: [code] message")
        seen = []
        for answer in reachable:
            item = answer["adapters"].get(served, {})
            if item.get("present") and not item.get("problems"):
                seen.append(answer["pod"])
            else:
                problems += [(str(p["code"]), f"{answer['pod']}: [{p['code']}] {p['message']}")
                             for p in item.get("problems", [])]
        if not reachable:
            continue
        name = f"{base}:{entry['name']} in the store"
        version = f"version {entry['version']}"
        if problems and not seen:
            code, text = problems[0]
            out.append(Check("Store", name, "FAIL", text, _STORE_FIX.get(code, "push a valid adapter: loraroute "
                                                                             "adapters validate DIR, then push")))
        elif problems:
            out.append(Check("Store", name, "WARN", f"ok on {', '.join(seen)}; {problems[0][1]}"))
        elif not entry.get("version"):
            live = next((a["adapters"][served].get("version") for a in reachable
                         if a["adapters"].get(served, {}).get("version")), None) or "<version>"
            out.append(Check("Store", name, "WARN", f"right layout, rank fits on {', '.join(seen)}; not pinned: pods "
                             "fetch whatever the live folder holds, so a push changes it without an approved change",
                             f"pin it: loraroute changes propose roll --base {base} --adapter {entry['name']} "
                             f"--version {live}"))
        else:
            out.append(Check("Store", name, "PASS", f"right layout, rank fits on {', '.join(seen)} ({version})"))
    return out


def _requests(gw: GatewayClient, bases: list[dict[str, Any]], api_key: str | None) -> list[Check]:
    out = []
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    for b in bases:
        model = f"{b['base']}:{b['adapters'][0]['name']}" if b["adapters"] else b["base"]
        t0 = time.perf_counter()
        resp = gw.request("POST", "/v1/chat/completions", json=_chat(model), headers=headers)
        ms = 1000 * (time.perf_counter() - t0)
        if resp.status_code == 200:
            out.append(Check("Requests", f"{model} answered", "PASS",
                             f"by {resp.headers.get('x-loraroute-pod')} in {ms:.0f} ms"))
        elif resp.status_code == 401 and not api_key:
            out.append(Check("Requests", f"{model} answered", "SKIP", "the gateway needs a tenant key",
                             "pass --api-key (a tenant's key)"))
        else:
            out.append(Check("Requests", f"{model} answered", "FAIL", f"HTTP {resp.status_code}: {_message(resp)}",
                             f"trace it: loraroute doctor request --model {model}"))
    return out


def _message(resp: httpx.Response) -> str:
    try:
        return str(resp.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return resp.text[:300]


def _code(resp: httpx.Response) -> str | None:
    try:
        return resp.json()["error"].get("code")  # type: ignore[no-any-return]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


# --------------------------------------------------------------------------------------------
# one request, layer by layer
# --------------------------------------------------------------------------------------------
LAYERS = ("HTTP", "auth", "allowlist", "store fetch", "TLS", "validation", "GPU load", "inference")


class Trace:
    """Layer -> check; printed in ``LAYERS`` order, layers never reached as ``SKIP``."""

    def __init__(self) -> None:
        self._by_layer: dict[str, Check] = {}

    def set(self, layer: str, status: str, detail: str, fix: str = "") -> None:
        self._by_layer[layer] = Check("Request", layer, status, detail, fix)  # type: ignore[arg-type]

    def checks(self, reason: str = "not reached") -> list[Check]:
        return [self._by_layer.get(layer) or Check("Request", layer, "SKIP", reason) for layer in LAYERS]


def trace_request(gw: GatewayClient, model: str, api_key: str | None, admin: bool) -> list[Check]:
    t = Trace()
    t0 = time.perf_counter()
    try:
        gw.call("GET", "/health")
        t.set("HTTP", "PASS", f"{gw.url} answered in {1000 * (time.perf_counter() - t0):.0f} ms")
    except GatewayError as exc:
        t.set("HTTP", "FAIL", str(exc), "check the URL, the Service / Route and the gateway pod")
        return t.checks()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    resp = gw.request("GET", "/v1/models", headers=headers)
    if resp.status_code != 200:
        t.set("auth", "FAIL", f"HTTP {resp.status_code}: {_message(resp)}", "use a tenant's API key (--api-key)")
        return t.checks()
    names = [m["id"] for m in resp.json()["data"]]
    t.set("auth", "PASS", "key accepted" if api_key else "no tenant key needed (or the admin key)")
    if model not in names:
        near = difflib.get_close_matches(model, names, n=3, cutoff=0.5)
        t.set("allowlist", "FAIL", f"{model!r} is not among the {len(names)} model(s) this key may use"
              + (f"; did you mean {', '.join(near)}?" if near else ""),
              "add it: loraroute changes propose add --base B --adapter A (or fix the tenant's patterns)")
        return t.checks()
    t.set("allowlist", "PASS", f"{model} is allowlisted for this key")
    base, _, adapter = model.partition(":")
    if not adapter:
        return _infer(gw, t, model, headers, None, None, admin)
    served = _served(gw, base, adapter) if admin else None
    if served is None:
        for layer in ("store fetch", "TLS", "validation"):
            t.set(layer, "SKIP", "needs the admin key (--key) to ask the sidecars")
    elif not _store_layers(gw, t, served):
        return t.checks()
    return _infer(gw, t, model, headers, adapter, served, admin)


def _infer(gw: GatewayClient, t: Trace, model: str, headers: dict[str, str] | None, adapter: str | None,
           served: str | None, admin: bool) -> list[Check]:
    """The real request; on an ensure failure, the failing pod's sidecar says which layer."""
    t0 = time.perf_counter()
    resp = gw.request("POST", "/v1/chat/completions", json=_chat(model), headers=headers)
    ms = 1000 * (time.perf_counter() - t0)
    pod = resp.headers.get("x-loraroute-pod")
    if resp.status_code == 200:
        if adapter:
            t.set("GPU load", "PASS", f"{adapter} loaded on {pod}")
        t.set("inference", "PASS", f"{pod} answered in {ms:.0f} ms")
        return t.checks("base model: no adapter layers")
    code, message = _code(resp), _message(resp)
    if code not in ("adapter_ensure_failed", "adapter_ensure_timeout"):
        t.set("inference", "FAIL", f"HTTP {resp.status_code}{' from ' + pod if pod else ''}: {message}",
              "see GET /admin/pods and the pod's vLLM log")
        return t.checks()
    if admin and pod:
        ensured = gw.request("POST", "/admin/ensure", json={"pod": pod, "adapter": (served or adapter).split("@")[0]})
        answer = ensured.json() if ensured.status_code == 200 else {}
        err = (answer.get("body") or {}).get("error") if answer.get("status") != 200 else None
        if isinstance(err, dict):
            code = str(err.get("code"))
            layer = _LAYER_OF.get(code, "validation")
            t.set(layer, "FAIL", f"{pod}: [{code}] {err.get('message')}", _STORE_FIX.get(
                code, "read the message; the pod's vLLM log has the rest" if layer == "GPU load" else ""))
            return t.checks()
    t.set("GPU load", "FAIL", f"HTTP {resp.status_code} from {pod}: {message}",
          "see the sidecar log of that pod (kubectl logs <pod> -c sidecar)")
    return t.checks()


def _served(gw: GatewayClient, base: str, adapter: str) -> str | None:
    """The adapter as the store check names it (``served_name`` or ``served_name@version``:
    the pinned version); None without admin access."""
    try:
        for b in gw.get("/admin/allowlist")["data"]:
            if base == b["base"] or base in b["aliases"]:
                for a in b["adapters"]:
                    if a["name"] == adapter:
                        return _item(a)
    except GatewayError:
        return None
    return None


def _store_layers(gw: GatewayClient, t: Trace, served: str) -> bool:
    """store fetch, TLS, validation from the sidecars' store check; False after a failure."""
    report = gw.get("/admin/store", adapter=served)
    if not report["data"]:
        for layer in ("store fetch", "TLS", "validation"):
            t.set(layer, "SKIP", "no pod has a sidecar: the adapter comes from the pods' own folder")
        return True
    failure: tuple[str, str, dict[str, Any]] | None = None
    for answer in report["data"]:
        if not answer.get("ok"):
            err = answer.get("error") or {}
            failure = failure or (answer["pod"], _LAYER_OF.get(str(err.get("code")), "store fetch"), err)
            continue
        item = answer["adapters"].get(served, {})
        if item.get("present") and not item.get("problems"):
            manifest = "" if item.get("version") else " (no manifest: pushed by another tool)"
            t.set("store fetch", "PASS", f"{item['location']}{manifest} seen by {answer['pod']}")
            t.set("TLS", "PASS", f"{answer['source']} trusted by {answer['pod']}")
            t.set("validation", "PASS", f"rank {item.get('rank')} fits {answer['pod']} (--max-lora-rank "
                  f"{answer.get('max_lora_rank')})")
            return True
        for p in item.get("problems") or []:
            failure = failure or (answer["pod"], _LAYER_OF.get(str(p.get("code")), "validation"), p)
    assert failure is not None
    pod, layer, err = failure
    code = str(err.get("code"))
    if layer == "validation":
        t.set("store fetch", "PASS", "the adapter's files are in the store")
    if layer == "validation" or code in ("adapter_not_found", "version_not_found"):
        t.set("TLS", "PASS", "the store answered")
    if layer == "TLS":
        t.set("store fetch", "SKIP", "not attempted: the TLS handshake with the store failed")
    t.set(layer, "FAIL", f"{pod}: [{code}] {err.get('message')}",
          _STORE_FIX.get(code, "push a valid adapter: loraroute adapters validate DIR, then push"))
    return False
