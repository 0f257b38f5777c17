"""Precise prefix routing end to end in a real gateway process: simulated pods publishing KV
events, sidecars relaying them through a real Redis (or, with ``memory://``, the gateway
following the pods' sockets itself), the gateway's feed applying them and its tokenizer stage
producing the prompt's token ids. Routing follows what the pods really hold: after a pod evicts a
conversation, precise-prefix stops preferring it while the approximate index still does."""

from __future__ import annotations

import hashlib
import json
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from loraroute.procs import consecutive_free_ports, free_port, loraroute_cmd
from loraroute.services import restart_redis, start_redis
from pseudotok import apply_chat_template, tokenize

ADMIN = "admin-key"
SYSTEM = "You answer questions about the orders database, briefly and exactly. " * 35


def kv_config(pub: int, replay: int) -> str:
    return json.dumps({"enable_kv_cache_events": True, "endpoint": f"tcp://*:{pub}",
                       "replay_endpoint": f"tcp://*:{replay}"})


def call(url: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
         method: str | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - loopback
        raw = resp.read()
        return json.loads(raw) if raw.startswith(b"{") or raw.startswith(b"[") else raw.decode()


def admin(gw: str, path: str) -> Any:
    return call(gw + path, headers={"Authorization": f"Bearer {ADMIN}"})


def chat(url: str, model: str, messages: list[dict[str, str]], request_id: str | None = None) -> None:
    call(url + "/v1/chat/completions", {"model": model, "messages": messages, "max_tokens": 2},
         headers={"x-request-id": request_id} if request_id else None)


def explained(url: str, model: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    """The x-loraroute-explain header of a chat request sent as admin."""
    req = urllib.request.Request(url + "/v1/chat/completions", method="POST",
                                 data=json.dumps({"model": model, "messages": messages, "max_tokens": 2}).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {ADMIN}",
                                          "x-loraroute-debug": "1"})
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - loopback
        return json.loads(resp.headers["x-loraroute-explain"])


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def decision(gw: str, request_id: str) -> dict[str, Any]:
    recs = [d for d in admin(gw, "/admin/decisions?limit=200")["data"] if d["request_id"] == request_id]
    assert recs, f"no decision recorded for {request_id}"
    return recs[0]


def scores(rec: dict[str, Any], scorer: str) -> dict[str, float]:
    return {c["pod"]: c["scores"].get(scorer, 0.0) for c in rec["candidates"]}


def kv_of(gw: str) -> dict[str, Any]:
    return {p["pod_id"]: p["kv"] for p in admin(gw, "/admin/pods")["data"]}


def metric(gw: str, name: str, **labels: str) -> float:
    text = call(gw + "/metrics")
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def conversation(topic: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM + topic}, {"role": "user", "content": f"How many {topic} today?"},
            {"role": "assistant", "content": "Forty-two."}]


def filler(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"unrelated filler text number {i:04d} " * 40}]


def start_cluster(procs, root: Path, pods: int, *extra: str):  # type: ignore[no-untyped-def]
    http = consecutive_free_ports(pods)
    pub = consecutive_free_ports(pods, start=http + pods)
    replay = consecutive_free_ports(pods, start=pub + pods)
    procs.start("sim", loraroute_cmd(
        "sim", "cluster", "--pods", str(pods), "--base-port", str(http), "--model", "base", "--enable-lora",
        "--allow-runtime-lora-updating", "--adapter-dir", str(root / "adapters"), "--time-scale", "0.05",
        "--kv-events-config", kv_config(pub, replay), *extra),
        ready_url=f"http://127.0.0.1:{http + pods - 1}/health", timeout=60)
    return [f"http://127.0.0.1:{http + i}" for i in range(pods)], pub, replay


def gateway_config(port: int, root: Path, static: list[dict[str, Any]], store: str, tokenizer: dict[str, Any],
                   approx_weight: float = 0.0) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": port, "reload_poll_s": 0},
        "bases": [{"name": "base", "adapters": [{"name": "sql", "rank": 8}], "tokenizer": tokenizer}],
        "admin": {"api_key_sha256": [hashlib.sha256(ADMIN.encode()).hexdigest()]},
        "discovery": {"static": static, "monitor_timeout_s": 2.0, "monitor_unhealthy_after_s": 3.0,
                      "monitor_ttl_s": 5.0},
        "store": {"url": store},
        "ensure": {"enabled": False},
        # precise-prefix decides; the approximate index is scored beside it with weight 0, so
        # each decision shows what it would have said
        "pipeline": {"filters": ["healthy-fresh", "serves-base"], "scorers": [
            {"type": "precise-prefix", "weight": 1.0,
             "parameters": {"lora_path": f"{root / 'adapters'}/{{name}}", "silence_s": 30.0}},
            {"type": "prefix-cache", "weight": approx_weight}]},
    }


def start_gateway(procs, root: Path, config: dict[str, Any], name: str = "gateway"):  # type: ignore[no-untyped-def]
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = config["server"]["port"]
    return procs.start(name, loraroute_cmd("gateway", "--config", str(path)), port=port,
                       ready_url=f"http://127.0.0.1:{port}/ready", timeout=60), path


@pytest.mark.timeout(300)
def test_routing_follows_what_the_pods_hold_through_redis(procs, make_adapter, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Sidecars relay, the gateway's feed applies, ``tokenizer.mode: sim`` hashes exactly what
    the pods hash. After pod X evicts a conversation (and pod Y computed it meanwhile), the
    follow-up goes to Y although the approximate index, which only saw the gateway's own
    dispatches, still names X. A Redis restart: the index keeps what it knew, then resyncs."""
    make_adapter("sql", rank=8, base_model="base", root=tmp_path / "adapters")
    # 96 blocks of 16 tokens per pod: a conversation is ~40 blocks, a filler ~22; eight fillers
    # use every block the pod has, the conversation's first
    pods, pub, replay = start_cluster(procs, tmp_path, 2, "--num-gpu-blocks", "96")
    redis = start_redis(log_dir=tmp_path / "logs")
    try:
        redis_url = str(redis.extra["url"])
        static = []
        for i, url in enumerate(pods):
            port = free_port()
            sc = procs.start(f"sidecar-{i}", loraroute_cmd(
                "sidecar", "--vllm-url", url, "--pod-id", f"pod-{i}", "--store-url", redis_url, "--host", "127.0.0.1",
                "--port", str(port), "--adapter-dir", str(tmp_path / "adapters"), "--base-model", "base",
                "--kv-events-endpoint", f"tcp://127.0.0.1:{pub + i}",
                "--kv-events-replay-endpoint", f"tcp://127.0.0.1:{replay + i}", "--set", "warmup.enabled=false"),
                port=port, ready_url=f"http://127.0.0.1:{port}/healthz", timeout=60)
            static.append({"id": f"pod-{i}", "url": url, "sidecar_url": sc.url})
        gw_port = free_port()
        cfg = gateway_config(gw_port, tmp_path, static, redis_url, {"mode": "sim"})
        cfg["discovery"]["monitor"] = "never"
        gw, cfg_path = start_gateway(procs, tmp_path, cfg)
        g = gw.url
        wait_for(lambda: all(k is not None and k["source"] == "redis" for k in kv_of(g).values()), "the Redis feed")

        conv = conversation("orders")
        chat(g, "base:sql", conv, "first")
        x = decision(g, "first")["picked"]
        y = "pod-1" if x == "pod-0" else "pod-0"
        pod_url = dict(zip(("pod-0", "pod-1"), pods))
        shared = len(tokenize(apply_chat_template(conv, add_generation_prompt=False))) // 16
        wait_for(lambda: kv_of(g)[x]["blocks"] >= shared, "pod X's blocks in the gateway's index")

        follow = [*conv, {"role": "user", "content": "And yesterday?"}]
        chat(g, "base:sql", follow, "second")
        rec = decision(g, "second")
        total = len(tokenize(apply_chat_template(follow))) // 16
        # the gateway's token ids hash to exactly the blocks the pod stored: a whole-prefix match
        assert rec["picked"] == x
        assert scores(rec, "precise-prefix")[x] == pytest.approx(shared / total, abs=1e-6)
        assert scores(rec, "prefix-cache")[x] > 0.5
        assert kv_of(g)[x]["live"] is True

        # X evicts the conversation (requests the gateway never saw); Y computes it
        blocks_before = kv_of(g)[x]["blocks"]
        for i in range(8):
            chat(pod_url[x], "base", filler(i))
        chat(pod_url[y], "sql", conv)

        def caught_up(pod: str) -> bool:
            truth = call(pod_url[pod] + "/sim/state?limit=0")["cached_blocks"]
            return kv_of(g)[pod]["blocks"] == truth

        wait_for(lambda: caught_up(x) and caught_up(y) and kv_of(g)[x]["blocks"] != blocks_before,
                 "the eviction and Y's blocks in the index")
        follow2 = [*conv, {"role": "user", "content": "And last week?"}]
        chat(g, "base:sql", follow2, "third")
        rec = decision(g, "third")
        total2 = len(tokenize(apply_chat_template(follow2))) // 16
        precise, approx = scores(rec, "precise-prefix"), scores(rec, "prefix-cache")
        assert rec["picked"] == y, rec
        assert precise[y] == pytest.approx(shared / total2, abs=1e-6) and precise[x] < precise[y]
        assert approx[x] > 0.5 and approx.get(y, 0.0) < approx[x]  # the approximate index is wrong here
        # /admin/decisions shows the KV state each candidate was scored on: both streams live, Y
        # holding the conversation's blocks, X none of them, the approximate index saying otherwise
        kv = {c["pod"]: c["kv"] for c in rec["candidates"]}
        assert kv[x]["live"] is True and kv[y]["live"] is True
        assert kv[y]["precise"] == shared and kv[y]["precise_of"] == total2 and kv[x]["precise"] < shared
        assert kv[x]["approx"] > kv[y]["approx"] and kv[x]["approx_of"] == kv[y]["approx_of"] > 0
        assert f"KV events {shared}/{total2} blocks" in rec["reason"]
        assert metric(g, "loraroute_kv_feed_deltas_total") > 0
        assert metric(g, "loraroute_kv_feed_delay_seconds_count") > 0
        assert metric(g, "loraroute_tokenize_total", mode="sim", outcome="ok") >= 3

        # Redis restarts empty: the index keeps what it knew meanwhile; reconnected, the feed
        # applies the sidecars' next deltas (their versions go on) and routing is unchanged
        before = kv_of(g)[y]["blocks"]
        redis = restart_redis(redis, log_dir=tmp_path / "logs")
        assert kv_of(g)[y]["blocks"] == before
        wait_for(lambda: metric(g, "loraroute_kv_feed_connected") == 1.0, "the feed to reconnect", 30)
        wait_for(lambda: all(p["routable"] for p in admin(g, "/admin/pods")["data"]), "the pods back", 30)
        deltas = metric(g, "loraroute_kv_feed_deltas_total")
        chat(pod_url[y], "base", filler(99))
        wait_for(lambda: caught_up(y) and metric(g, "loraroute_kv_feed_deltas_total") > deltas, "deltas again", 30)
        chat(g, "base:sql", [*conv, {"role": "user", "content": "And today?"}], "fourth")
        assert decision(g, "fourth")["picked"] == y

        # a reload without precise-prefix stops the feed and empties the index; with it again, the
        # feed starts over from the sidecars' snapshots
        plain = {**cfg, "pipeline": "default"}
        cfg_path.write_text(yaml.safe_dump(plain, sort_keys=False))
        call(g + "/admin/reload", {}, headers={"Authorization": f"Bearer {ADMIN}"}, method="POST")
        wait_for(lambda: all(k is None for k in kv_of(g).values()), "the feed to stop")
        assert metric(g, "loraroute_kv_feed_running", source="redis") == 0.0
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        call(g + "/admin/reload", {}, headers={"Authorization": f"Bearer {ADMIN}"}, method="POST")
        wait_for(lambda: (kv_of(g)[y] or {}).get("blocks", 0) >= shared, "the feed to start again", 30)
    finally:
        redis.stop()


@pytest.mark.timeout(240)
def test_one_process_follows_the_pods_events_itself_and_tokenizes_through_the_pod(procs, make_adapter,  # type: ignore[no-untyped-def]
                                                                                   tmp_path: Path) -> None:
    """``memory://``: no sidecar, the gateway subscribes to each static pod's KV events; the
    prompt's token ids come from the pod's own ``/tokenize`` (``tokenizer.mode: pod``), cached per
    conversation. The pod that computed a conversation (outside the gateway) wins its follow-up."""
    make_adapter("sql", rank=8, base_model="base", root=tmp_path / "adapters")
    pods, pub, replay = start_cluster(procs, tmp_path, 2)
    static = [{"id": f"pod-{i}", "url": url, "kv_events": {"endpoint": f"tcp://127.0.0.1:{pub + i}",
                                                           "replay_endpoint": f"tcp://127.0.0.1:{replay + i}"}}
              for i, url in enumerate(pods)]
    cfg = gateway_config(free_port(), tmp_path, static, "memory://", {"mode": "pod", "min_chars": 200})
    gw, _ = start_gateway(procs, tmp_path, cfg)
    g = gw.url
    wait_for(lambda: all(k is not None and k["source"] == "zmq" for k in kv_of(g).values()), "the direct feeds")

    conv = conversation("invoices")
    chat(pods[1], "sql", conv)  # only pod-1 computed it; the gateway never saw it
    shared = len(tokenize(apply_chat_template(conv, add_generation_prompt=False))) // 16
    wait_for(lambda: kv_of(g)["pod-1"]["blocks"] >= shared, "pod-1's events in the index")
    follow = [*conv, {"role": "user", "content": "And yesterday?"}]
    total = len(tokenize(apply_chat_template(follow))) // 16
    for rid in ("a", "b"):  # b: the same conversation again (pod-1 now holds a's blocks too)
        chat(g, "base:sql", follow, rid)
        rec = decision(g, rid)
        assert rec["picked"] == "pod-1"
        got = scores(rec, "precise-prefix")["pod-1"]
        assert got == pytest.approx(shared / total, abs=1e-6) if rid == "a" else got > shared / total
        assert scores(rec, "prefix-cache").get("pod-0", 0.0) == 0.0
    assert metric(g, "loraroute_tokenize_total", mode="pod", outcome="ok") == 1
    assert metric(g, "loraroute_tokenize_total", mode="pod", outcome="cached") == 1
    # the explain header carries the KV state per candidate: pod-1 holds more than the shared
    # blocks now (a's and b's); pod-0 has published no event yet, so it is not live and the
    # approximate index (empty there) spoke for it
    header = explained(g, "base:sql", follow)
    kv = {c["pod"]: c["kv"] for c in header["candidates"]}
    assert header["picked"] == "pod-1"
    held = kv["pod-1"]["precise"]
    assert shared < held <= total and held / total == pytest.approx(
        scores(header, "precise-prefix")["pod-1"], abs=1e-6)
    assert kv["pod-1"] == {"live": True, "precise": held, "precise_of": total,
                           "approx": kv["pod-1"]["approx_of"], "approx_of": kv["pod-1"]["approx_of"]}
    assert kv["pod-0"] == {"live": False, "precise": None, "precise_of": None, "approx": 0,
                           "approx_of": kv["pod-1"]["approx_of"]}
    # a short prompt is not worth a call
    chat(g, "base:sql", [{"role": "user", "content": "hi"}], "short")
    assert metric(g, "loraroute_tokenize_total", mode="pod", outcome="short") == 1
    assert metric(g, "loraroute_kv_events_batches_total", pod="pod-1") > 0
    assert kv_of(g)["pod-1"]["live"] is True
