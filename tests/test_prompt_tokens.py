"""The gateway's prompt token ids (gateway/tokens.py, gateway/tokens_local.py) and the KV relay's
retry of a delta that did not reach Redis (podstate/kv_store.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgpack
import pytest

from gateway.parse import Kind
from gateway.tokens import prompt_ids, sim_ids
from gateway.tokens_local import LocalTokenizer
from podstate.kv_events import KVBatch, Removed, Stored
from podstate.kv_store import KVBlockRelay, unpack_hashes
from pseudotok import apply_chat_template, tokenize
from scorer.vllm_blocks import block_hashes, lora_extra_keys

MESSAGES = [{"role": "system", "content": "You are terse. " * 20}, {"role": "user", "content": "Count the rows."}]


def test_sim_ids_are_the_simulators_for_chat_and_completions() -> None:
    assert sim_ids(Kind.CHAT, {"messages": MESSAGES}, 1 << 20) == tuple(tokenize(apply_chat_template(MESSAGES)))
    assert sim_ids(Kind.COMPLETIONS, {"prompt": "abcdefgh"}, 1 << 20) == tuple(tokenize("abcdefgh"))
    assert sim_ids(Kind.COMPLETIONS, {"prompt": ["abcdefgh"]}, 1 << 20) == tuple(tokenize("abcdefgh"))
    assert sim_ids(Kind.COMPLETIONS, {"prompt": ["a", "b"]}, 1 << 20) == ()
    # a cut prompt gives a prefix of the full ids (the last, maybe partial, token dropped)
    full = sim_ids(Kind.CHAT, {"messages": MESSAGES}, 1 << 20)
    cut = sim_ids(Kind.CHAT, {"messages": MESSAGES}, 101)
    assert cut == full[:len(cut)] and 0 < len(cut) < len(full)


def test_token_id_prompts_are_used_as_given() -> None:
    assert prompt_ids({"prompt": [1, 2, 3]}) == (1, 2, 3)
    assert prompt_ids({"prompt": [[4, 5]]}) == (4, 5)
    assert prompt_ids({"prompt": "text"}) is None and prompt_ids({"prompt": [True, 2]}) is None


def test_the_gateways_token_ids_hash_to_the_captured_vllm_blocks() -> None:
    """The captured vLLM 0.33 stream stores tokens 1000..1031 of ``sql-lora`` as two blocks: the
    ids the gateway takes from a token-id prompt hash to exactly those (the chat path, ids from the
    template and tokenizer, is checked against a simulated pod's own events in
    tests/test_precise_gateway.py, where a whole-prefix match scores exactly shared/total)."""
    text = (Path(__file__).parent / "fixtures" / "vllm" / "kv-events-0.33.0.out.txt").read_text()
    want = [int(x.rsplit("int64: ", 1)[1]) for x in text.splitlines() if x.startswith("block") and "(sql-lora)" in x]
    ids = prompt_ids({"prompt": list(range(1000, 1032))})
    assert ids is not None
    assert block_hashes(list(ids), 16, lora_extra_keys("sql-lora", "/adapters/sql-lora")) == want


def test_local_tokenizer_renders_the_models_template(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2")
    from tokenizers import Tokenizer

    from bench.gpu import model

    folder = model.write_model(tmp_path / "model", model.SHAPES["tiny"])
    tok = LocalTokenizer.load(str(folder))
    # the GPU kit's template is the simulator's: the rendered prompt is the same text
    assert tok.render(MESSAGES, {}) == apply_chat_template(MESSAGES)
    assert tok.render(MESSAGES, {"add_generation_prompt": False}) == apply_chat_template(MESSAGES, False)
    ids = tok.chat_ids(MESSAGES, {})
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert ids == tuple(raw.encode(apply_chat_template(MESSAGES), add_special_tokens=False).ids)
    assert len(ids) == len(tokenize(apply_chat_template(MESSAGES)))  # 4 characters a token, as the simulator


class _FailingPipe:
    def __init__(self, owner: _FlakyRedis) -> None:
        self.owner = owner

    async def __aenter__(self) -> _FailingPipe:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def set(self, *args: Any, **kw: Any) -> None:
        self.owner.sets.append(args[1])

    def publish(self, channel: str, body: bytes) -> None:
        self.owner.pending.append(body)

    async def execute(self) -> None:
        if self.owner.fail:
            self.owner.fail -= 1
            self.owner.pending.clear()
            raise ConnectionError("down")
        self.owner.published += self.owner.pending
        self.owner.pending = []


class _FlakyRedis:
    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.pending: list[bytes] = []
        self.published: list[bytes] = []
        self.sets: list[bytes] = []

    def pipeline(self, transaction: bool = False) -> _FailingPipe:
        return _FailingPipe(self)


def test_a_delta_that_did_not_go_out_is_published_again_with_the_same_version() -> None:
    async def scenario() -> None:
        client = _FlakyRedis(fail=1)
        relay = KVBlockRelay(client, "pod")  # type: ignore[arg-type]
        relay.apply("pod", KVBatch(1.0, [Stored([1, 2, 3])]))
        with pytest.raises(ConnectionError):
            await relay.flush()
        # meanwhile: 3 is evicted, 4 stored
        relay.apply("pod", KVBatch(2.0, [Removed([3]), Stored([4])]))
        await relay.flush()
        assert len(client.published) == 1
        _, _, version, cleared, added, removed, ts = msgpack.unpackb(client.published[0])
        assert version == 1 and not cleared and ts == 1.0
        assert set(unpack_hashes(added).tolist()) == {1, 2, 4} and len(unpack_hashes(removed)) == 0

    asyncio.run(scenario())
