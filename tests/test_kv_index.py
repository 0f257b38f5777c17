"""The precise prefix index and its inputs, without processes: vLLM's block hashes on the router
(against the captured vLLM 0.33.0 computation), decoding the event stream (both wire shapes),
the index (against plain sets), and the ``precise-prefix`` scorer with its fallback."""

from __future__ import annotations

import random
import re
from pathlib import Path

import msgpack
import numpy as np
import pytest

from podstate.kv_events import Cleared, KVDecodeError, Removed, Stored, apply_batch, decode_batch
from podstate.kv_store import pack_hashes, unpack_hashes
from scorer.errors import ConfigError
from scorer.kv_index import KVBlockIndex
from scorer.model import AdapterRef, PodState, RoutingRequest
from scorer.build import build_pipeline
from scorer.prefix import prompt_block_hashes
from scorer.vllm_blocks import block_hashes, iter_block_hashes, lora_extra_keys

FIXTURE = Path(__file__).parent / "fixtures" / "vllm" / "kv-events-0.33.0.out.txt"
TOKENS = list(range(1000, 1032))
NOW = 1_800_000_000.0
BASE = "llama"


def fixture_line(prefix: str) -> str:
    return next(line for line in FIXTURE.read_text().splitlines() if line.startswith(prefix))


def fixture_int(label: str) -> int:
    return int(re.search(r"int64: (\d+)", fixture_line(label)).group(1))  # type: ignore[union-attr]


def test_router_block_hashes_are_vllms() -> None:
    lora = block_hashes(TOKENS, 16, lora_extra_keys("sql-lora", "/adapters/sql-lora"))
    assert lora == [fixture_int("block0 (sql-lora)"), fixture_int("block1 (sql-lora)")]
    assert block_hashes(TOKENS[:16], 16, lora_extra_keys(None, None)) == [fixture_int("block0 (base model)")]
    assert block_hashes(TOKENS[:31], 16, None) == block_hashes(TOKENS[:16], 16, None)  # only full blocks
    with pytest.raises(ValueError):
        block_hashes(TOKENS, 0, None)


def test_decode_the_captured_batch_and_the_legacy_array_shape() -> None:
    payload = bytes.fromhex(fixture_line("payload hex: ").split(": ", 1)[1])
    batch = decode_batch(payload)
    assert batch.ts == 1764000000.25
    assert batch.changes == [Stored([4277084476755224009, 1472957235265779246], "sql-lora"), Removed([123456789]),
                             Cleared()]
    # vLLM <= 0.23 sent every event as a tagged array
    import json

    legacy = json.loads(fixture_line("legacy generic decode: ").split(": ", 1)[1])
    assert decode_batch(msgpack.packb(legacy)).changes == [Stored([4277084476755224009, 1472957235265779246],
                                                                  "sql-lora")]
    # 32-byte hashes (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0) become their low 64 bits; CPU blocks are left out
    full = bytes(range(32))
    raw = [1.0, [{"type": "BlockStored", "block_hashes": [full], "medium": "GPU"},
                 {"type": "BlockStored", "block_hashes": [5], "medium": "CPU"},
                 {"type": "SomethingNew", "x": 1}], 0]
    assert decode_batch(msgpack.packb(raw)).changes == [Stored([int.from_bytes(full[-8:], "big")])]
    for bad in (b"\xc1", msgpack.packb({"a": 1}), msgpack.packb([1.0, [{"type": "BlockStored"}]]),
                msgpack.packb([1.0, [3]])):
        with pytest.raises(KVDecodeError):
            decode_batch(bad)


def test_index_agrees_with_plain_sets_and_stays_compact() -> None:
    rng = random.Random(3)
    pods = [f"p{i}" for i in range(8)]
    pool = [rng.getrandbits(64) for _ in range(8_000)] + [0, 1, 2**64 - 1]
    index, truth = KVBlockIndex(), {p: set() for p in pods}
    for _ in range(1200):
        p = rng.choice(pods)
        batch = rng.sample(pool, rng.choice((1, 5, 85, 700)))  # Python and numpy paths
        arg = np.array(batch, dtype=np.uint64) if rng.random() < 0.3 else batch
        r = rng.random()
        if r < 0.6:
            index.store(p, arg)
            truth[p].update(h or 1 for h in batch)  # 0 is the empty marker: stored as 1
        elif r < 0.97:
            index.remove(p, arg)
            truth[p].difference_update(h or 1 for h in batch)
        else:
            index.clear(p)
            truth[p].clear()
    for p in pods:
        assert index.pods[p].blocks == len(truth[p])
    for h in pool:
        assert index.holders(h) == {p for p in pods if (h or 1) in truth[p]}
    assert len(index) == len(set().union(*truth.values()))
    # ≤ 64 bytes per cached block whatever the fill (21-64 by construction)
    big = KVBlockIndex()
    for i in range(0, 100_000, 1000):
        big.store(f"p{i % 8}", [rng.getrandbits(64) for _ in range(1000)])
        assert big.nbytes / len(big) <= 64.0 + 1e-9
    index.forget("p0")
    assert "p0" not in index.pods and all("p0" not in index.holders(h) for h in pool[:2000])


def test_match_counts_leading_blocks_and_stops_early() -> None:
    rng = random.Random(9)
    chain = [rng.getrandbits(64) for _ in range(40)]
    index = KVBlockIndex()
    index.store("a", chain[:10])
    index.store("b", chain[:25])
    index.store("c", chain[3:30])  # not the first block: no prefix hit
    consumed = []

    def lazy():  # type: ignore[no-untyped-def]
        for h in chain:
            consumed.append(h)
            yield h

    assert index.match(lazy(), ["a", "b", "c", "unknown"]) == {"a": 10, "b": 25, "c": 0}
    assert len(consumed) == 26  # the 26th block is the first nobody holds
    assert index.match(iter(chain), []) == {}


def test_apply_batch_keeps_event_order() -> None:
    index = KVBlockIndex()
    batch = decode_batch(msgpack.packb([1.0, [
        {"type": "BlockStored", "block_hashes": [1, 2, 3], "medium": "GPU"},
        {"type": "BlockRemoved", "block_hashes": [2], "medium": "GPU"},
        {"type": "BlockRemoved", "block_hashes": [3], "medium": "GPU"},
        {"type": "BlockStored", "block_hashes": [3, 4], "medium": "GPU"},
    ], 0]))
    apply_batch(index, "p", batch, 5.0)
    assert {h for h in (1, 2, 3, 4) if index.holders(h)} == {1, 3, 4}
    assert index.pods["p"].batches == 1 and index.pods["p"].last_batch_at == 5.0
    apply_batch(index, "p", decode_batch(msgpack.packb([2.0, [{"type": "AllBlocksCleared"}], 0])), 6.0)
    assert index.pods["p"].blocks == 0 and index.pods["p"].cleared == 1
    assert unpack_hashes(pack_hashes([7, 2**64 - 1])).tolist() == [7, 2**64 - 1]


# --- the scorer ------------------------------------------------------------------------------------
def pod(pid: str, queries: float = 0.0, hits: float = 0.0) -> PodState:
    return PodState(pod_id=pid, url=f"http://{pid}", base_models=(BASE,), observed_at=NOW, max_loras=4,
                    prefix_cache_queries=queries, prefix_cache_hits=hits)


def request(tokens: list[int], text: str = "", adapter: str = "sql") -> RoutingRequest:
    return RoutingRequest(AdapterRef(BASE, adapter, 8), prompt_token_ids=tuple(tokens),
                          prefix_hashes=prompt_block_hashes(BASE, adapter, text, 256) if text else ())


def scores(pl, pods: list[PodState], req: RoutingRequest, now: float = NOW) -> dict[str, float]:  # type: ignore[no-untyped-def]
    d = pl.pick(req, {p.pod_id: p for p in pods}, now)
    return {c.pod_id: c.scores["precise-prefix"] for c in d.ranked}


def test_precise_prefix_scores_from_events_and_falls_back_per_pod() -> None:
    pl = build_pipeline({"filters": [], "scorers": [
        {"type": "precise-prefix", "parameters": {"lora_path": "/adapters/{name}", "silence_s": 1.0,
                                                  "silence_tokens": 1000}}]})
    tokens = list(range(5000, 5000 + 16 * 10))  # 10 blocks
    hashes = block_hashes(tokens, 16, lora_extra_keys("sql", "/adapters/sql"))
    kv = pl.local.kv
    apply = lambda p, hs: apply_batch(kv, p, decode_batch(msgpack.packb(  # noqa: E731
        [NOW, [{"type": "BlockStored", "block_hashes": hs, "medium": "GPU"}], 0])), NOW)
    apply("warm", hashes[:8])
    apply("cold", [12345])
    text = "x" * 2560
    pods = [pod("warm"), pod("cold"), pod("no-events")]
    # the approximate index believes in "no-events" (the router sent it this text before)
    pl.on_dispatch("no-events", request(tokens, text), NOW)
    got = scores(pl, pods, request(tokens, text))
    assert got == {"warm": 0.8, "cold": 0.0, "no-events": 1.0}
    # the path is part of the key: another lora_path, no match
    other = build_pipeline({"filters": [], "scorers": [{"type": "precise-prefix", "parameters": {"fallback": False}}]})
    other.adopt_state_from(pl)
    assert scores(other, pods, request(tokens, text)) == {"warm": 0.0, "cold": 0.0, "no-events": 0.0}
    # "warm" goes silent: it computes 1,200 uncached tokens and 1 s passes with no new batch
    pods = [pod("warm", queries=100.0), pod("cold"), pod("no-events")]
    scores(pl, pods, request(tokens, text), NOW)
    pods = [pod("warm", queries=1300.0), pod("cold"), pod("no-events")]
    assert scores(pl, pods, request(tokens, text), NOW + 0.5)["warm"] == 0.8  # not for long enough yet
    assert scores(pl, pods, request(tokens, text), NOW + 1.5)["warm"] == 0.0  # approximate: never sent there
    apply("warm", [99])  # events again: live again
    assert scores(pl, pods, request(tokens, text), NOW + 1.6)["warm"] == 0.8
    # a request the caller could not tokenize is scored by the approximate index everywhere
    assert scores(pl, pods, request([], text)) == {"warm": 0.0, "cold": 0.0, "no-events": 1.0}


def test_precise_prefix_parameters_are_strict() -> None:
    with pytest.raises(ConfigError, match="lora_path.*must contain"):
        build_pipeline({"scorers": [{"type": "precise-prefix", "parameters": {"lora_path": "/adapters"}}]})
    with pytest.raises(ConfigError, match="silence_s"):
        build_pipeline({"scorers": [{"type": "precise-prefix", "parameters": {"silence_s": -1}}]})
    with pytest.raises(ConfigError, match="did you mean 'min_blocks'"):
        build_pipeline({"scorers": [{"type": "precise-prefix", "parameters": {"min_block": 2}}]})


def test_lazy_hashing_matches_the_list() -> None:
    tokens = list(range(300))
    assert list(iter_block_hashes(tokens, 16, None)) == block_hashes(tokens, 16, None)
    assert len(block_hashes(tokens, 16, None)) == 300 // 16
