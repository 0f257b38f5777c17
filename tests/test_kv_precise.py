"""Precise prefix routing against real processes: the simulator's KV events, the router-side
subscriber (late start, sequence gaps, replay, resets, restarts, lost history), and the chosen
placement end to end — sidecars relaying each pod's block set through a real Redis into the
index a gateway replica reads, with the ``precise-prefix`` scorer falling back for a silent pod."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
import zmq

from loraroute.procs import consecutive_free_ports, free_port, free_ports, loraroute_cmd
from podstate.kv_events import IndexSink, KVEventSubscriber
from podstate.kv_store import KVBlockFeed
from podstate.redis_store import RedisStore
from scorer.kv_index import KVBlockIndex
from scorer.model import AdapterRef, RoutingRequest
from scorer.build import build_pipeline
from scorer.vllm_blocks import block_hashes, lora_extra_keys
from vllm_sim.tokenizer import apply_chat_template, tokenize

SYSTEM = "You answer questions about the orders database. " * 12


def kv_config(pub: int, replay: int, **extra: object) -> str:
    return json.dumps({"enable_kv_cache_events": True, "endpoint": f"tcp://*:{pub}",
                       "replay_endpoint": f"tcp://*:{replay}", **extra})


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read())


def post_json(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read())


def chat(url: str, model: str, messages: list[dict[str, str]]) -> None:
    post_json(url + "/v1/chat/completions", {"model": model, "messages": messages, "max_tokens": 2})


async def wait_for(cond: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_chat_prompt_block_hashes_match_the_pods_events(procs, make_adapter) -> None:  # type: ignore[no-untyped-def]
    """The router hashes a chat request's tokens (the pods' chat template and tokenizer) exactly
    as the pod does: the hashes of the BlockStored event the request causes."""
    path = make_adapter("sql", rank=8, base_model="base")
    port, pub, replay = free_ports(3)
    sim = procs.start("sim", loraroute_cmd("sim", "--port", str(port), "--model", "base", "--enable-lora",
                                          "--lora-modules", f"sql={path}", "--time-scale", "0",
                                          "--kv-events-config", kv_config(pub, replay)),
                      port=port, ready_url=f"http://127.0.0.1:{port}/health")
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVTIMEO, 5000)
    sub.connect(f"tcp://127.0.0.1:{pub}")
    try:
        time.sleep(0.3)
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "How many orders today?"}]
        chat(sim.url, "sql", messages)
        _, seq, payload = sub.recv_multipart()
        _, events, _ = msgpack.unpackb(payload)
        stored = [e for e in events if e["type"] == "BlockStored"]
        assert int.from_bytes(seq, "big") == 0 and len(stored) == 1
        event = stored[0]
        tokens = tokenize(apply_chat_template(messages))
        expected = block_hashes(tokens, 16, lora_extra_keys("sql", str(path)))
        assert len(expected) == len(tokens) // 16 >= 10
        assert event["block_hashes"] == expected
        assert event["token_ids"] == tokens[:16 * len(expected)]
        assert event["lora_name"] == "sql" and event["lora_id"] == 1
        assert event["extra_keys"] == [["sql"]] * len(expected) and event["parent_block_hash"] is None
        # the same text for the base model, or the adapter at another path, hashes differently
        assert block_hashes(tokens, 16, None)[0] != expected[0]
        assert block_hashes(tokens, 16, lora_extra_keys("sql", "/other/sql"))[0] != expected[0]
    finally:
        sub.close(linger=0)
        ctx.term()


def start_sim(procs, name: str, port: int, pub: int, replay: int, *extra: str):  # type: ignore[no-untyped-def]
    return procs.start(name, loraroute_cmd("sim", "--port", str(port), "--model", "base", "--time-scale", "0",
                                           "--kv-events-config", kv_config(pub, replay), *extra),
                       port=port, ready_url=f"http://127.0.0.1:{port}/health", env={"VLLM_SERVER_DEV_MODE": "1"})


def prompt(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"question {i:03d} " * 40}]


def test_subscriber_replays_gaps_and_follows_resets_and_restarts(procs) -> None:  # type: ignore[no-untyped-def]
    port, pub, replay = free_ports(3)
    sim = start_sim(procs, "sim", port, pub, replay)
    url = sim.url

    def cached() -> int:
        return int(get_json(url + "/sim/state?limit=0")["cached_blocks"])

    async def scenario() -> None:
        index = KVBlockIndex()
        sub = KVEventSubscriber("pod", f"tcp://127.0.0.1:{pub}", IndexSink(index),
                                replay_endpoint=f"tcp://127.0.0.1:{replay}")
        held = lambda: index.pods["pod"].blocks if "pod" in index.pods else -1  # noqa: E731
        # events sent before anyone listened come back through the replay socket
        for i in range(3):
            await asyncio.to_thread(chat, url, "base", prompt(i))
        sub.start()
        await sub.connected.wait()
        await asyncio.sleep(0.3)
        await asyncio.to_thread(chat, url, "base", prompt(3))
        await wait_for(lambda: held() == cached() > 0, "the late subscriber to catch up")
        assert sub.stats.replays == 1 and sub.stats.replayed == 3 and sub.stats.next_seq == 4
        # a gap in the middle (messages missed while not subscribed) is filled the same way
        await sub.close()
        for i in range(4, 7):
            await asyncio.to_thread(chat, url, "base", prompt(i))
        sub.start()
        await asyncio.sleep(0.3)
        await asyncio.to_thread(chat, url, "base", prompt(7))
        await wait_for(lambda: sub.stats.next_seq == 8, "the gap to be replayed")
        assert held() == cached() and sub.stats.replays == 2 and sub.stats.unrecoverable == 0
        # a reset empties the pod: AllBlocksCleared
        assert (await asyncio.to_thread(post_json, url + "/reset_prefix_cache", {})) == {"success": True}
        await wait_for(lambda: held() == 0, "AllBlocksCleared")
        await asyncio.to_thread(chat, url, "base", prompt(8))
        await wait_for(lambda: held() == cached() > 0, "new blocks after the reset")
        # the pod restarts (sequence numbers start again at 0, its cache is empty): what the
        # index knew of the old process is dropped
        before = held()
        sim.stop()
        start_sim(procs, "sim-again", port, pub, replay)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(chat, url, "base", prompt(9))
        await wait_for(lambda: sub.stats.restarts == 1, "the restart to be noticed")
        await wait_for(lambda: held() == cached() > 0, "the new process's blocks")
        assert held() != before + cached()
        await sub.close()

    asyncio.run(scenario())


def test_history_beyond_the_replay_buffer_resets_the_pod(procs) -> None:  # type: ignore[no-untyped-def]
    port, pub, replay = free_ports(3)
    sim = procs.start("sim-short", loraroute_cmd(
        "sim", "--port", str(port), "--model", "base", "--time-scale", "0",
        "--kv-events-config", kv_config(pub, replay, buffer_steps=1)), port=port,
        ready_url=f"http://127.0.0.1:{port}/health")

    async def scenario() -> None:
        index = KVBlockIndex()
        sub = KVEventSubscriber("pod", f"tcp://127.0.0.1:{pub}", IndexSink(index),
                                replay_endpoint=f"tcp://127.0.0.1:{replay}")
        sub.start()
        await sub.connected.wait()
        await asyncio.sleep(0.3)
        await asyncio.to_thread(chat, sim.url, "base", prompt(0))
        await wait_for(lambda: sub.stats.next_seq == 1, "the first batch")
        await sub.close()
        for i in range(1, 4):  # seq 1-3; the pod keeps only the last one
            await asyncio.to_thread(chat, sim.url, "base", prompt(i))
        sub.start()
        await asyncio.sleep(0.3)
        await asyncio.to_thread(chat, sim.url, "base", prompt(4))
        await wait_for(lambda: sub.stats.next_seq == 5, "the live batch after the lost ones")
        assert sub.stats.unrecoverable == 1 and index.pods["pod"].cleared == 1
        # what the index holds now is a subset of the truth: the blocks of the last request only
        truth = int(get_json(sim.url + "/sim/state?limit=0")["cached_blocks"])
        assert 0 < index.pods["pod"].blocks < truth
        await sub.close()

    asyncio.run(scenario())


@pytest.mark.timeout(240)
def test_sidecars_relay_block_sets_through_redis_to_the_precise_scorer(procs, redis_url, make_adapter,
                                                                      tmp_path: Path) -> None:
    """Two pods, a sidecar each relaying its pod's KV events to Redis, and what one gateway replica
    runs: a PodState reader, a KV feed into its pipeline's index, the precise-prefix scorer. The
    pod that served a conversation wins its follow-up; when that pod's events stop while it keeps
    computing, the scorer falls back to the approximate index for it; when they resume, the gap is
    replayed; a restarted sidecar hands its pod's whole block set over through its snapshot."""
    adapters = tmp_path / "adapters"
    make_adapter("sql", rank=8, base_model="base", root=adapters)
    http = consecutive_free_ports(2)  # the pods' HTTP ports, then their PUB and replay ports
    pub = consecutive_free_ports(2, start=http + 2)
    replay = consecutive_free_ports(2, start=pub + 2)
    sim = procs.start("sim", loraroute_cmd(
        "sim", "cluster", "--pods", "2", "--base-port", str(http), "--model", "base", "--enable-lora",
        "--allow-runtime-lora-updating", "--adapter-dir", str(adapters), "--time-scale", "0.2",
        "--kv-events-config", kv_config(pub, replay)), ready_url=f"http://127.0.0.1:{http + 1}/health", timeout=60)
    pods = [f"http://127.0.0.1:{http + i}" for i in range(2)]

    def start_sidecar(i: int, name: str) -> Any:
        port = free_port()
        argv = loraroute_cmd("sidecar", "--vllm-url", pods[i], "--pod-id", f"pod-{i}", "--store-url", redis_url,
                             "--host", "127.0.0.1", "--port", str(port), "--adapter-dir", str(adapters),
                             "--base-model", "base", "--kv-events-endpoint", f"tcp://127.0.0.1:{pub + i}",
                             "--kv-events-replay-endpoint", f"tcp://127.0.0.1:{replay + i}")
        return procs.start(name, argv, port=port, ready_url=f"http://127.0.0.1:{port}/healthz", timeout=60)

    sidecars = [start_sidecar(i, f"sidecar-{i}") for i in range(2)]
    assert sim.alive()
    pl = build_pipeline({"filters": [], "scorers": [{"type": "precise-prefix", "parameters": {
        "lora_path": f"{adapters}/{{name}}", "silence_s": 0.5, "silence_tokens": 256}}]})
    conversation = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "How many orders today?"},
                    {"role": "assistant", "content": "Forty-two."}]
    follow_up = [*conversation, {"role": "user", "content": "And yesterday?"}]
    tokens = tuple(tokenize(apply_chat_template(follow_up)))
    request = RoutingRequest(AdapterRef("base", "sql", 8), prompt_token_ids=tokens)
    shared = len(tokenize(apply_chat_template(conversation, add_generation_prompt=False))) // 16
    total = len(tokens) // 16

    async def scenario() -> None:
        store = RedisStore(redis_url)
        feed = KVBlockFeed(redis_url, pl.local.kv)
        await store.start()
        feed.start()
        try:
            await wait_for(lambda: len(store.view()) == 2, "both pods in the store", 30)
            await asyncio.wait_for(feed.ready.wait(), 10)

            def scores() -> dict[str, float]:
                d = pl.pick(request, dict(store.view()), time.time())
                return {c.pod_id: c.scores["precise-prefix"] for c in d.ranked}

            await asyncio.to_thread(chat, pods[1], "sql", conversation)
            kv = pl.local.kv
            await wait_for(lambda: "pod-1" in kv.pods and kv.pods["pod-1"].blocks >= shared, "pod-1's blocks")
            got = scores()
            assert got["pod-1"] == pytest.approx(shared / total) and got.get("pod-0", 0.0) == 0.0
            assert pl.pick(request, dict(store.view()), time.time()).pod_id == "pod-1"

            # pod-1's events stop; it keeps computing prompts nobody indexes
            await asyncio.to_thread(post_json, pods[1] + "/sim/faults", {"kv_events": False})
            batches = kv.pods["pod-1"].batches

            def computed() -> float:
                st = store.view()["pod-1"]
                return st.prefix_cache_queries - st.prefix_cache_hits

            start = computed()
            for i in range(3):
                await asyncio.to_thread(chat, pods[1], "base", prompt(i))
            await wait_for(lambda: computed() - start >= 256, "pod-1's counters to move", 20)
            await asyncio.sleep(0.6)
            assert kv.pods["pod-1"].batches == batches
            assert scores()["pod-1"] == 0.0  # silent: the approximate index, which never saw it
            # events again: the next batch shows a gap, the sidecar replays it, pod-1 is live again
            await asyncio.to_thread(post_json, pods[1] + "/sim/faults", {"kv_events": True})
            await asyncio.to_thread(chat, pods[1], "base", prompt(9))
            await wait_for(lambda: kv.pods["pod-1"].batches > batches, "pod-1's events again")
            truth = int(get_json(pods[1] + "/sim/state?limit=0")["cached_blocks"])
            await wait_for(lambda: kv.pods["pod-1"].blocks == truth, "the replayed gap")
            assert scores()["pod-1"] == pytest.approx(shared / total)

            # a new sidecar (new epoch) rebuilds the pod's set from the pod's replay buffer and
            # hands it to the feed as a snapshot
            sidecars[1].stop()
            start_sidecar(1, "sidecar-1-again")
            await asyncio.to_thread(chat, pods[1], "base", prompt(10))
            truth = int(get_json(pods[1] + "/sim/state?limit=0")["cached_blocks"])
            await wait_for(lambda: feed.stats.gaps >= 1 and kv.pods["pod-1"].blocks == truth,
                           "the new sidecar's snapshot", 20)
            assert scores()["pod-1"] == pytest.approx(shared / total)
        finally:
            await feed.close()
            await store.close()

    asyncio.run(scenario())
