"""The simulator's KV-cache events against vLLM 0.33.0's captured stream
(``tests/fixtures/vllm/kv-events-0.33.0.out.txt``): payload bytes, block hashes, PUB frames,
sequence numbers and the replay socket, in process and from a real ``loraroute sim`` process."""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

import msgpack
import pytest
import zmq
import zmq.asyncio

from loraroute.procs import free_ports, loraroute_cmd
from vllm_sim.engine import Engine, EngineConfig, Request
from vllm_sim.kvcache import block_hashes, chain_seed
from vllm_sim.kvevents import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventPublisher,
    KVEventsConfig,
    encode_batch,
)
from vllm_sim.lora_cache import LoraRef
from vllm_sim.tokenizer import token_ids_to_bytes

FIXTURE = Path(__file__).parent / "fixtures" / "vllm" / "kv-events-0.33.0.out.txt"
TS = 1764000000.25
TOKENS = list(range(1000, 1032))


def fixture() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in FIXTURE.read_text().splitlines():
        key, _, value = line.partition(": ")
        out.setdefault(key, value)
    return out


def fixture_payload() -> bytes:
    return bytes.fromhex(fixture()["payload hex"])


def fixture_int(label: str) -> int:
    return int(re.search(r"int64: (\d+)", fixture()[label]).group(1))  # type: ignore[union-attr]


def stored_event_bytes() -> bytes:
    """The BlockStored map inside the captured payload: after the batch header
    (array of 3, float64 ts, array of 3 events), up to the BlockRemoved map (fixmap of 4)."""
    payload = fixture_payload()
    start = 1 + 9 + 1
    return payload[start:payload.index(b"\x84\xa4type\xacBlockRemoved")]


def test_encoder_reproduces_the_captured_payload_byte_for_byte() -> None:
    events = [BlockStored([4277084476755224009, 1472957235265779246], None, TOKENS, 16, 1, "sql-lora"),
              BlockRemoved([123456789]), AllBlocksCleared()]
    assert encode_batch(TS, events, None) == fixture_payload()
    assert len(fixture_payload()) == int(fixture()["payload bytes"]) == 369
    # the publisher stamps its data-parallel rank (0): the same bytes but the last one
    published = encode_batch(TS, events, 0)
    assert published[:-1] == fixture_payload()[:-1] and published[-1:] == b"\x00"
    decoded = msgpack.unpackb(published)
    assert decoded[2] == 0 and decoded[1][0]["extra_keys"] == [["sql-lora"], ["sql-lora"]]


def test_block_hashes_are_vllms() -> None:
    data = token_ids_to_bytes(TOKENS)
    lora = block_hashes(data, 64, chain_seed("sql-lora", "/adapters/sql-lora"), 2)
    assert lora == [fixture_int("block0 (sql-lora)"), fixture_int("block1 (sql-lora)")]
    assert block_hashes(data, 64, chain_seed(None, None), 1) == [fixture_int("block0 (base model)")]
    # the adapter's path is part of the key (vLLM >= 0.31): another path, other hashes
    assert block_hashes(data, 64, chain_seed("sql-lora", "/elsewhere/sql-lora"), 2)[0] != lora[0]


def test_config_is_vllms_and_strict() -> None:
    c = KVEventsConfig.from_json('{"enable_kv_cache_events": true, "topic": "kv@a"}')
    assert c.enabled and c.effective_publisher == "zmq" and c.endpoint == "tcp://*:5557" and c.buffer_steps == 10000
    assert not KVEventsConfig.from_json("{}").enabled
    assert not KVEventsConfig.from_json('{"enable_kv_cache_events": true, "publisher": "null"}').enabled
    for bad, why in (('{"enable_kv_cache_events": true, "topik": "x"}', "unknown key 'topik'"),
                     ('{"hwm": "many"}', "hwm must be int"), ('{"buffer_steps": 0}', "buffer_steps must be >= 1"),
                     ('{"publisher": "kafka"}', "not supported"), ("[1]", "JSON object"), ("{", "not valid JSON")):
        with pytest.raises(ValueError, match=why):
            KVEventsConfig.from_json(bad)


async def _recv(sock: zmq.asyncio.Socket, timeout: float = 5.0) -> list[bytes]:
    return await asyncio.wait_for(sock.recv_multipart(), timeout)


async def _replay(ctx: zmq.asyncio.Context, endpoint: str, start: int) -> list[list[bytes]]:
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(endpoint)
    try:
        await dealer.send_multipart([b"", start.to_bytes(8, "big")])
        frames = []
        while True:
            got = await _recv(dealer)
            frames.append(got)
            if got[2] == b"\xff" * 8:
                return frames
    finally:
        dealer.close(linger=0)


def test_engine_stream_matches_the_capture() -> None:
    """The fixture's request (32 tokens for sql-lora at /adapters/sql-lora, adapter id 1) through the
    simulated engine: its BlockStored event is the captured one byte for byte; frames, topic, seq
    and replay are vLLM's."""

    async def scenario() -> None:
        pub_port, replay_port = free_ports(2)
        config = KVEventsConfig(enable_kv_cache_events=True, endpoint=f"tcp://*:{pub_port}",
                                replay_endpoint=f"tcp://*:{replay_port}", topic="kv@sim")
        loop = asyncio.get_running_loop()
        engine = Engine(EngineConfig(time_scale=0.0, max_loras=1, max_cpu_loras=1, num_gpu_blocks=64), loop=loop,
                        wall_clock=lambda: TS)
        publisher = KVEventPublisher(config, wall_clock=engine.wall_clock)
        engine.pool.enable_events(publisher.publish)
        publisher.start()
        ctx = zmq.asyncio.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"kv@sim")
        sub.connect(f"tcp://127.0.0.1:{pub_port}")
        try:
            await asyncio.sleep(0.3)  # PUB drops messages until the subscription has arrived
            lora = LoraRef(1, "sql-lora", "/adapters/sql-lora", 8)
            prompt = token_ids_to_bytes([*TOKENS, 7])
            req = Request("r1", lora, "sql-lora", prompt, len(TOKENS) + 1, 2, [], 0)
            engine.add_request(req)
            frames = await _recv(sub)
            assert [len(f) for f in frames[:2]] == [6, 8]
            assert frames[0] == b"kv@sim" and int.from_bytes(frames[1], "big") == 0
            expected = b"\x93" + msgpack.packb(TS) + b"\x91" + stored_event_bytes() + b"\x00"
            assert frames[2] == expected
            while not req.finished:
                await asyncio.sleep(0.01)
            assert engine.pool.reset()
            engine.pool.flush_events()
            cleared = await _recv(sub)
            assert int.from_bytes(cleared[1], "big") == 1
            assert msgpack.unpackb(cleared[2]) == [TS, [{"type": "AllBlocksCleared"}], 0]
            replay = await _replay(ctx, f"tcp://127.0.0.1:{replay_port}", 0)
            assert [f[:3] for f in replay] == [[b"", b"kv@sim", (0).to_bytes(8, "big")],
                                              [b"", b"kv@sim", (1).to_bytes(8, "big")],
                                              [b"", b"", b"\xff" * 8]]
            assert replay[0][3] == frames[2] and replay[2][3] == b""
            assert [f[2] for f in await _replay(ctx, f"tcp://127.0.0.1:{replay_port}", 1)] == [
                (1).to_bytes(8, "big"), b"\xff" * 8]
        finally:
            sub.close(linger=0)
            ctx.term()
            await publisher.close()

    asyncio.run(scenario())


def _sim_argv(port: int, pub: int, replay: int, *extra: str) -> list[str]:
    kv = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{pub}",
          "replay_endpoint": f"tcp://*:{replay}", "topic": "kv@pod-a"}
    return loraroute_cmd("sim", "--port", str(port), "--model", "base", "--time-scale", "0",
                         "--kv-events-config", json.dumps(kv), *extra)


def test_sim_process_publishes_stores_evictions_and_resets(procs) -> None:  # type: ignore[no-untyped-def]
    """A real ``loraroute sim`` with a KV cache of 12 blocks: distinct prompts evict each other;
    every stored block is removed before its block is reused, sequence numbers have no gap, and
    ``/reset_prefix_cache`` publishes AllBlocksCleared."""
    import urllib.request

    port, pub, replay = free_ports(3)
    sim = procs.start("sim-kv", _sim_argv(port, pub, replay, "--num-gpu-blocks", "12"), port=port,
                      ready_url=f"http://127.0.0.1:{port}/health", env={"VLLM_SERVER_DEV_MODE": "1"})
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@pod-a")
    sub.setsockopt(zmq.RCVTIMEO, 5000)
    sub.connect(f"tcp://127.0.0.1:{pub}")
    try:
        def post(path: str, body: dict[str, object]) -> dict[str, object]:
            req = urllib.request.Request(sim.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback
                return json.loads(resp.read())

        import time
        time.sleep(0.3)
        for i in range(4):  # 4 prompts of 4 full blocks each: the 12-block cache must evict
            post("/v1/completions", {"model": "base", "prompt": f"{i:02d}" * 130, "max_tokens": 2})
        assert post("/reset_prefix_cache", {}) == {"success": True}
        stored: set[int] = set()
        removed = 0
        seqs = []
        while True:
            topic, seq, payload = sub.recv_multipart()
            assert topic == b"kv@pod-a"
            seqs.append(int.from_bytes(seq, "big"))
            ts, events, rank = msgpack.unpackb(payload)
            assert rank == 0 and abs(ts - time.time()) < 60
            for e in events:
                if e["type"] == "BlockStored":
                    assert e["lora_name"] is None and e["extra_keys"] == [None] * len(e["block_hashes"])
                    assert len(e["token_ids"]) == 16 * len(e["block_hashes"]) and e["medium"] == "GPU"
                    stored.update(e["block_hashes"])
                elif e["type"] == "BlockRemoved":
                    assert len(e["block_hashes"]) == 1 and e["block_hashes"][0] in stored
                    stored.discard(e["block_hashes"][0])
                    removed += 1
            if events[-1] == {"type": "AllBlocksCleared"}:
                break
        assert seqs == list(range(len(seqs)))
        assert removed >= 4 and len(stored) <= 12  # what is left is what the cache holds
        state = json.loads(urllib.request.urlopen(sim.url + "/sim/state?limit=0", timeout=5).read())  # noqa: S310
        assert state["kv_events"]["next_seq"] == len(seqs) and state["cached_blocks"] == 0
    finally:
        sub.close(linger=0)
        ctx.term()


def test_bad_kv_events_config_is_refused_at_start() -> None:
    import subprocess
    import sys

    port, pub, replay = free_ports(3)
    argv = loraroute_cmd("sim", "--port", str(port), "--kv-events-config", '{"enable_kv_cache_events": 1}')
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert out.returncode == 2 and "enable_kv_cache_events must be bool" in out.stderr
    assert sys.executable in argv
