"""The pick's precise KV match shared by ``precise-prefix`` and ``estimated-ttft``
(``scorer.kv_match``), without processes: the TTFT prediction prices a live pod's uncached prefill
from what its events say it holds, a pod without live events from the approximate index; the
prompt's blocks are hashed once per pick however many scorers read them; the dispatch books
(pending queue, learning ticket) use the same estimate."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

import scorer.vllm_blocks
from podstate.kv_events import apply_batch, decode_batch
from scorer.build import build_pipeline
from scorer.model import AdapterRef, PodState, RoutingRequest
from scorer.pipeline import Pipeline
from scorer.prefix import prompt_block_hashes
from scorer.vllm_blocks import block_hashes, lora_extra_keys

BASE = "base"
NOW = 1_800_000_000.0
PST = 0.001  # prefill seconds per token: big enough to read the differences
TOKENS = list(range(7000, 7000 + 16 * 64))  # 64 blocks of 16
TEXT = "x" * 2560  # 10 approximate blocks of 256 characters


def pipeline(precise: bool = True) -> Pipeline:
    scorers: list[dict[str, Any]] = [{"type": "estimated-ttft", "parameters": {
        "learn": False, "prefill_s_per_token": PST, "graph_tokens": 0}}]
    if precise:
        scorers.append({"type": "precise-prefix", "parameters": {"lora_path": "/adapters/{name}"}})
    return build_pipeline({"filters": [], "scorers": scorers})


def pod(pid: str) -> PodState:
    return PodState(pod_id=pid, url=f"http://{pid}", base_models=(BASE,), observed_at=NOW + 1e6, max_loras=4)


def request(tokens: list[int] = TOKENS) -> RoutingRequest:
    return RoutingRequest(AdapterRef(BASE, "sql", 8), prompt_tokens=len(TOKENS), prompt_token_ids=tuple(tokens),
                          prefix_hashes=prompt_block_hashes(BASE, "sql", TEXT, 256))


def events(pl: Pipeline, pod_id: str, hashes: list[int]) -> None:
    batch = [NOW, [{"type": "BlockStored", "block_hashes": hashes, "medium": "GPU"}], 0]
    apply_batch(pl.local.kv, pod_id, decode_batch(msgpack.packb(batch)), NOW)


PODS = {p: pod(p) for p in ("holds", "evicted", "no-events")}


def cluster(pl: Pipeline) -> None:
    """"holds" holds the prompt's first 48 blocks (its events), "evicted" has live events but none
    of them, "no-events" publishes nothing; the approximate index believes "evicted" and
    "no-events" hold the whole prompt (the router sent it there, long ago)."""
    hashes = block_hashes(TOKENS, 16, lora_extra_keys("sql", "/adapters/sql"))
    events(pl, "holds", hashes[:48])
    events(pl, "evicted", [424242])
    for p in ("evicted", "no-events"):
        pl.pick(request(), PODS, NOW)
        pl.on_dispatch(p, request(), NOW)
        pl.on_complete(p, request(), True)


def predictions(pl: Pipeline, now: float = NOW + 10.0) -> tuple[Any, dict[str, float]]:
    d = pl.pick(request(), PODS, now)
    return d, {p: pl.predicted_ttft_s(d, p) for p in PODS}  # type: ignore[misc]


def test_estimated_ttft_prices_what_a_live_pod_really_holds() -> None:
    pl = pipeline()
    cluster(pl)
    d, t = predictions(pl)
    # "evicted": the full prefill, although the approximate index says it is cached there;
    # "holds": 48 blocks × 16 tokens fewer; "no-events": the approximate index (all of it)
    assert t["holds"] - t["evicted"] == pytest.approx(-48 * 16 * PST, abs=1e-9)
    assert t["no-events"] - t["evicted"] == pytest.approx(-len(TOKENS) * PST, abs=1e-9)
    assert {c.pod_id: c.scores["precise-prefix"] for c in d.ranked} == {
        "holds": 0.75, "evicted": 0.0, "no-events": 1.0}
    # the same pods without precise-prefix in the pipeline: the approximate index for everyone
    plain = pipeline(precise=False)
    plain.adopt_state_from(pl)
    _, t2 = predictions(plain)
    assert t2["evicted"] == pytest.approx(t2["no-events"], abs=1e-9)
    assert t2["holds"] - t2["evicted"] == pytest.approx(len(TOKENS) * PST, abs=1e-9)
    # a request without token ids: the approximate index, as precise-prefix falls back
    d3 = pl.pick(request([]), PODS, NOW + 10.0)
    assert pl.predicted_ttft_s(d3, "evicted") == pytest.approx(t2["evicted"], abs=1e-9)


def test_a_pick_hashes_each_block_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = scorer.vllm_blocks._sha256
    monkeypatch.setattr(scorer.vllm_blocks, "_sha256", lambda obj: calls.append(1) or real(obj))
    counts = {}
    for precise_only in (True, False):
        pl = pipeline()
        if precise_only:
            pl = build_pipeline({"filters": [], "scorers": [
                {"type": "precise-prefix", "parameters": {"lora_path": "/adapters/{name}"}}]})
        cluster(pl)
        calls.clear()
        d = pl.pick(request(), PODS, NOW + 10.0)
        for p in PODS:  # the gateway's deadline reads the prediction again after the pick
            pl.predicted_ttft_s(d, p)
        pl.on_dispatch("holds", request(), NOW + 10.0, d)
        counts[precise_only] = len(calls)
    # 48 blocks held, the 49th held by no live candidate ends the walk; estimated-ttft adds none
    assert counts == {True: 49, False: 49}


def test_dispatch_books_the_uncached_tokens_the_prediction_priced() -> None:
    pl = pipeline()
    cluster(pl)
    d = pl.pick(request(), PODS, NOW + 10.0)
    ticket = pl.on_dispatch("holds", request(), NOW + 10.0, d)
    assert ticket is not None and ticket.uncached_tokens == len(TOKENS) - 48 * 16
    ticket = pl.on_dispatch("evicted", request(), NOW + 10.0, d)
    assert ticket is not None and ticket.uncached_tokens == len(TOKENS)  # the approximate index said 0
    ticket = pl.on_dispatch("no-events", request(), NOW + 10.0, d)
    assert ticket is not None and ticket.uncached_tokens == 0  # no live events: the approximate index


def test_the_explanation_shows_the_kv_state_the_pick_used() -> None:
    pl = build_pipeline({"filters": [], "scorers": [
        {"type": "precise-prefix", "parameters": {"lora_path": "/adapters/{name}"}},
        {"type": "prefix-cache", "weight": 0.0}]})
    cluster(pl)
    d = pl.pick(request(), PODS, NOW + 10.0)
    pl.on_dispatch(d.pod_id, request(), NOW + 10.0, d)  # must not change what the explanation says
    kv = {c["pod"]: c["kv"] for c in d.explain()["candidates"]}
    assert kv == {
        "holds": {"live": True, "precise": 48, "precise_of": 64, "approx": 0, "approx_of": 10},
        "evicted": {"live": True, "precise": 0, "precise_of": 64, "approx": 10, "approx_of": 10},
        "no-events": {"live": False, "precise": None, "precise_of": None, "approx": 10, "approx_of": 10},
    }
    assert d.pod_id == "no-events"  # the approximate index's word, its events being silent
    d = pl.pick(request(), {p: PODS[p] for p in ("holds", "evicted")}, NOW + 10.0)
    assert d.pod_id == "holds" and "KV events 48/64 blocks" in d.reason
    # a request without token ids: nothing judged; without a KV reader: no kv entry at all
    d = pl.pick(request([]), PODS, NOW + 10.0)
    assert {c["kv"]["live"] for c in d.explain()["candidates"]} == {None}
    plain = build_pipeline({"filters": [], "scorers": [{"type": "prefix-cache"}]})
    assert all("kv" not in c for c in plain.pick(request(), PODS, NOW).explain()["candidates"])
