"""vllm_sim's HTTP surface against real `loraroute sim` processes: payloads, errors, metrics.

Expected shapes come from vLLM 0.33.0 payloads in tests/fixtures/vllm/, the error table of the
vLLM reference and the error bodies a real vLLM 0.25.1 answered (tests/fixtures/vllm-0.25-real/);
every request goes over real HTTP (official `openai` client or httpx).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraroute.procs import Proc, free_port, loraroute_cmd
from vllm_sim.costs import get_profile
from vllm_sim.tokenizer import apply_chat_template, count_tokens, detokenize, tokenize

FIXTURES = Path(__file__).parent / "fixtures" / "vllm"
REAL = Path(__file__).parent / "fixtures" / "vllm-0.25-real"
BASE = "meta-llama/Llama-3.1-8B-Instruct"


def start_sim(procs, *args: str, env: dict[str, str] | None = None) -> Proc:  # type: ignore[no-untyped-def]
    port = free_port()
    return procs.start(f"sim-{port}", loraroute_cmd("sim", "--port", str(port), *args), port=port,
                       ready_url=f"http://127.0.0.1:{port}/health", env=env, timeout=30)


def client(proc: Proc) -> openai.OpenAI:
    return openai.OpenAI(base_url=proc.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def sse_events(text: str) -> list[object]:
    out: list[object] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append("[DONE]" if data == "[DONE]" else json.loads(data))
    return out


def fixture_stream(section: str) -> list[object]:
    text = (FIXTURES / "stream-0.33.0.out.txt").read_text()
    part = text.split(f"=== /v1/{section} ")[1].split("\n", 1)[1].split("===")[0]
    return sse_events(part)


def test_chat_and_completions_with_openai_client(procs, make_adapter) -> None:  # type: ignore[no-untyped-def]
    path = make_adapter("sql-lora", rank=8)
    sim = start_sim(procs, "--enable-lora", "--lora-modules", f"sql-lora={path}", "--time-scale", "0.05")
    c = client(sim)
    messages = [{"role": "user", "content": "list the customers"}]
    chat = c.chat.completions.create(model="sql-lora", messages=messages, max_tokens=7,  # type: ignore[arg-type]
                                     extra_headers={"X-Request-Id": "req-chat-1"})
    assert chat.id == "chatcmpl-req-chat-1"
    assert chat.model == "sql-lora"
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage is not None and chat.usage.completion_tokens == 7
    assert chat.usage.prompt_tokens == count_tokens(apply_chat_template(messages))
    assert chat.choices[0].message.content
    again = c.chat.completions.create(model="sql-lora", messages=messages, max_tokens=7)  # type: ignore[arg-type]
    assert again.choices[0].message.content == chat.choices[0].message.content  # seeded, deterministic

    chunks = list(c.chat.completions.create(model="sql-lora", messages=messages, max_tokens=5, stream=True,  # type: ignore[arg-type]
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5 and chunks[-1].choices == []
    assert chunks[-2].choices[0].finish_reason == "length"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == c.chat.completions.create(model="sql-lora", messages=messages, max_tokens=5).choices[0].message.content  # type: ignore[arg-type]

    comp = c.completions.create(model=BASE, prompt="SELECT name FROM", max_tokens=3)
    assert comp.model == BASE and comp.choices[0].finish_reason == "length"
    assert comp.usage is not None and comp.usage.prompt_tokens == count_tokens("SELECT name FROM")
    parts = list(c.completions.create(model="sql-lora", prompt="SELECT", max_tokens=4, stream=True))
    assert [p.choices[0].finish_reason for p in parts] == [None, None, None, "length"]
    assert all(p.model == "sql-lora" for p in parts)

    stopped = c.completions.create(model=BASE, prompt="x", max_tokens=200, stop=[" the"])
    assert stopped.choices[0].finish_reason == "stop" and " the" not in stopped.choices[0].text
    natural = c.completions.create(model=BASE, prompt="no max tokens")
    assert natural.choices[0].finish_reason == "stop"
    assert natural.usage is not None and 16 <= natural.usage.completion_tokens <= 256


def test_stream_frames_match_vllm_fixture(procs, make_adapter) -> None:  # type: ignore[no-untyped-def]
    path = make_adapter("sql-lora", rank=8)
    sim = start_sim(procs, "--enable-lora", "--lora-modules", f"sql-lora={path}", "--time-scale", "0.05")
    body = {"model": "sql-lora", "messages": [{"role": "user", "content": "q"}], "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    got = sse_events(httpx.post(sim.url + "/v1/chat/completions", json=body, timeout=30).text)
    want = fixture_stream("chat/completions")
    assert got[-1] == want[-1] == "[DONE]"

    def shape(event: object) -> object:
        if not isinstance(event, dict):
            return event
        choices = [{k: (sorted(v) if k == "delta" else None) for k, v in ch.items()} for ch in event["choices"]]
        return (list(event), choices, list(event.get("usage") or {}))

    # role chunk, content chunk, usage chunk: same keys in the same order as vLLM 0.33
    assert shape(got[0]) == shape(want[0])
    assert shape(got[1]) == shape(want[1])
    assert shape(got[-2]) == shape(want[-2])
    assert list(got[-3]["choices"][0]) == list(want[-3]["choices"][0])  # type: ignore[index]
    assert got[-3]["choices"][0]["finish_reason"] == "length"  # type: ignore[index]

    body = {"model": "sql-lora", "prompt": "SELECT", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    got = sse_events(httpx.post(sim.url + "/v1/completions", json=body, timeout=30).text)
    want = fixture_stream("completions")
    assert [shape(e) for e in got] == [shape(e) for e in want]
    whole = httpx.post(sim.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 9}, timeout=30)

    # vLLM's --stream-interval 4: the first token at once, then 4 tokens per chunk, the last with the finish
    sim4 = start_sim(procs, "--enable-lora", "--lora-modules", f"sql-lora={path}", "--time-scale", "0.05",
                     "--stream-interval", "4")
    events = sse_events(httpx.post(sim4.url + "/v1/completions", json={**body, "max_tokens": 9}, timeout=30).text)
    texts = [e["choices"][0]["text"] for e in events if isinstance(e, dict) and e["choices"]]  # type: ignore[index]
    assert len(texts) == 4 and events[-3]["choices"][0]["finish_reason"] == "length"  # type: ignore[index]
    assert "".join(texts) == whole.json()["choices"][0]["text"]


def test_models_and_unknown_model(procs, make_adapter) -> None:  # type: ignore[no-untyped-def]
    path = make_adapter("sql-lora", rank=8)
    sim = start_sim(procs, "--enable-lora", "--lora-modules", f"sql-lora={path}")
    got = httpx.get(sim.url + "/v1/models", timeout=10).json()
    want = json.loads((FIXTURES / "models-0.33.0.out.txt").read_text().split("\n{\"error\"")[0])
    assert [list(card) for card in got["data"]] == [list(card) for card in want["data"][:2]]
    assert list(got["data"][0]["permission"][0]) == list(want["data"][0]["permission"][0])
    base, lora = got["data"]
    assert (base["id"], base["parent"], base["max_model_len"]) == (BASE, None, 131072)
    assert (lora["id"], lora["root"], lora["parent"], lora["max_model_len"]) == ("sql-lora", str(path), BASE, None)
    assert len(lora["permission"][0]["id"]) == len("modelperm-") + 16

    with pytest.raises(openai.NotFoundError) as err:
        client(sim).chat.completions.create(model="nope-lora", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 404
    assert err.value.response.json() == {"error": {
        "message": f"The model `nope-lora` does not exist. Valid aliases: {BASE}.",
        "type": "NotFoundError", "param": "model", "code": 404}}
    # without runtime updating the load routes do not exist (FastAPI's default 404)
    r = httpx.post(sim.url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(path)}, timeout=10)
    assert (r.status_code, r.json()) == (404, {"detail": "Not Found"})
    assert httpx.get(sim.url + "/version", timeout=10).json() == {"version": "0.33.0"}


def _err(resp: httpx.Response) -> tuple[int, str, str]:
    e = resp.json()["error"]
    assert e["code"] == resp.status_code
    return resp.status_code, e["type"], e["message"]


def test_load_unload_error_table(procs, make_adapter, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    good = make_adapter("good", rank=8)
    big = make_adapter("big", rank=32)
    no_weights = make_adapter("noweights", rank=8)
    (no_weights / "adapter_model.safetensors").unlink()
    no_r = make_adapter("nor", rank=8, config_overrides={"-r": None})
    bad_mod = make_adapter("badmod", rank=8, target_modules=("q_proj", "foo_proj"), layers=1)
    empty = tmp_path / "adapters" / "empty"
    empty.mkdir(parents=True)
    sim = start_sim(procs, "--enable-lora", "--max-loras", "2", "--max-lora-rank", "16", "--time-scale", "0.05",
                    env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"})

    def load(**body: object) -> httpx.Response:
        return httpx.post(sim.url + "/v1/load_lora_adapter", json=body, timeout=30)

    def unload(**body: object) -> httpx.Response:
        return httpx.post(sim.url + "/v1/unload_lora_adapter", json=body, timeout=30)

    ok = load(lora_name="sql-lora", lora_path=str(good))
    assert (ok.status_code, ok.text) == (200, "Success: LoRA adapter 'sql-lora' added successfully.")
    assert _err(load(lora_name="sql-lora", lora_path=str(good))) == (
        400, "InvalidUserInput", "The lora adapter 'sql-lora' has already been loaded. If you want to load the "
        "adapter in place, set 'load_inplace' to True.")
    assert load(lora_name="sql-lora", lora_path=str(good), load_inplace=True).status_code == 200
    assert _err(load(lora_name="", lora_path=str(good))) == (
        400, "InvalidUserInput", "Both 'lora_name' and 'lora_path' must be provided.")
    assert _err(load(lora_name=BASE, lora_path=str(good))) == (
        400, "InvalidUserInput", f"The lora adapter '{BASE}' conflicts with a served base model.")
    status, etype, msg = _err(load(lora_path=str(good)))
    assert (status, etype) == (400, "Bad Request") and msg.startswith("1 validation error:") and "<path>" in msg
    # paths under /tmp are sanitised to <path>; other absolute paths are kept
    assert _err(load(lora_name="x", lora_path=str(empty))) == (
        404, "NotFoundError", "Loading lora x failed: No adapter found for <path>")
    assert _err(load(lora_name="x", lora_path="/adapters/x")) == (
        404, "NotFoundError", "Loading lora x failed: No adapter found for /adapters/x")
    assert _err(load(lora_name="x", lora_path=str(big))) == (
        500, "InternalServerError", "Call to add_lora method failed: LoRA rank 32 is greater than max_lora_rank 16.")
    assert _err(load(lora_name="x", lora_path=str(no_weights))) == (
        500, "InternalServerError", "Call to add_lora method failed: <path> doesn't contain tensors")
    assert _err(load(lora_name="x", lora_path=str(no_r))) == (
        500, "InternalServerError", "Call to add_lora method failed: Missing required configuration fields: {'r'}")
    status, etype, msg = _err(load(lora_name="x", lora_path=str(bad_mod)))
    assert (status, etype) == (500, "InternalServerError")
    assert msg.startswith("Call to add_lora method failed: While loading <path>, expected target modules in {")
    assert "but received ['model.layers.0.mlp.foo_proj', 'model.layers.0.mlp.foo_proj']" in msg
    names = [m["id"] for m in httpx.get(sim.url + "/v1/models", timeout=10).json()["data"]]
    assert names == [BASE, "sql-lora"]  # failed loads register nothing

    ok = unload(lora_name="sql-lora")
    assert (ok.status_code, ok.text) == (200, "Success: LoRA adapter 'sql-lora' removed successfully.")
    assert _err(unload(lora_name="sql-lora")) == (404, "NotFoundError", "The lora adapter 'sql-lora' cannot be found.")
    # unload forgets the name only: the weights stay resident (ground truth)
    state = httpx.get(sim.url + "/sim/state", timeout=10).json()
    assert state["gpu_adapters"] == ["sql-lora"] and state["cpu_adapters"] == ["sql-lora"]


def test_resolver_loads_on_first_use(procs, make_adapter, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "resolver"
    make_adapter("fin-lora", rank=16, root=root)
    make_adapter("other-base", rank=8, root=root, base_model="some/other-model")
    make_adapter("not-lora", rank=8, root=root, config_overrides={"peft_type": "IA3"})
    make_adapter("too-big", rank=64, root=root)
    sim = start_sim(procs, "--enable-lora", "--max-loras", "2", "--adapter-dir", str(root),
                    "--allow-runtime-lora-updating", "--time-scale", "0.05")
    c = client(sim)
    msg = [{"role": "user", "content": "hi"}]
    out = c.chat.completions.create(model="fin-lora", messages=msg, max_tokens=2,  # type: ignore[arg-type]
                                    extra_headers={"X-Request-Id": "resolved-1"})
    assert out.model == "fin-lora"
    assert "fin-lora" in [m.id for m in c.models.list().data]
    state = httpx.get(sim.url + "/sim/state", timeout=10).json()
    rec = next(r for r in state["requests"] if r["request_id"] == "resolved-1")
    # the resolver loads through an engine utility call: disk + activation + the call, simulated seconds
    assert rec["adapter_tier"] == "disk" and rec["adapter_load"] == pytest.approx(get_profile().load_api_s(16))
    assert state["gpu_adapters"] == ["fin-lora"]
    for name in ("other-base", "not-lora", "absent"):
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model=name, messages=msg, max_tokens=2)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="too-big", messages=msg, max_tokens=2)  # type: ignore[arg-type]
    assert err.value.response.json()["error"]["message"] == "LoRA adapter 'too-big' was found but could not be loaded."


def test_a_request_that_waits_for_anothers_resolver_load_is_charged_for_it(procs, make_adapter,  # type: ignore[no-untyped-def]
                                                                         tmp_path: Path) -> None:
    """Two requests for an unregistered adapter at once: the second waits on the resolver's lock
    while the first loads it; its ground-truth TTFT must include that wait, as its client sees."""
    import concurrent.futures
    import time

    root = tmp_path / "resolver"
    make_adapter("big", rank=64, root=root)
    # loads 4× the profile's (~1.1 s, simulated = wall here): the second request lands well inside
    # the first's load even when a busy machine delays either by a few hundred milliseconds
    sim = start_sim(procs, "--enable-lora", "--max-loras", "2", "--max-lora-rank", "64", "--adapter-dir", str(root),
                    "--allow-runtime-lora-updating", "--time-scale", "1", "--cost", "load_scale=4")
    load_s = get_profile(overrides={"load_scale": 4.0}).load_api_s(64)

    def send(rid: str) -> float:
        t0 = time.perf_counter()
        r = httpx.post(sim.url + "/v1/chat/completions", headers={"X-Request-Id": rid}, timeout=30, json={
            "model": "big", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        assert r.status_code == 200
        return time.perf_counter() - t0

    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        first = ex.submit(send, "first")
        time.sleep(0.1)  # the first holds the lock and is loading
        second = ex.submit(send, "second")
        wall = {"first": first.result(), "second": second.result()}
    recs = {r["request_id"]: r for r in httpx.get(sim.url + "/sim/state", timeout=10).json()["requests"]}
    assert recs["first"]["adapter_load"] == pytest.approx(load_s)
    assert 0.02 < recs["second"]["adapter_load"] < load_s  # the rest of the first one's load
    for rid in ("first", "second"):
        rec = recs[rid]
        assert rec["adapter_tier"] == "disk"  # both arrived while the adapter was on disk only
        # simulated TTFT ≈ what the client waited (never far below it; a starved machine stretches wall time)
        assert rec["ttft"] > wall[rid] - 0.5, (rid, rec, wall)


def _families(text: str) -> dict[str, tuple[str, set[tuple[str, ...]]]]:
    return {f.name: (f.type, {tuple(sorted(s.labels)) for s in f.samples})
            for f in text_string_to_metric_families(text)}


def test_metrics_match_vllm_names_types_labels(procs, make_adapter) -> None:  # type: ignore[no-untyped-def]
    path = make_adapter("sql-lora", rank=8)
    sim = start_sim(procs, "--enable-lora", "--max-loras", "4", "--lora-modules", f"sql-lora={path}",
                    "--time-scale", "0.05", "--num-gpu-blocks", "4096")
    client(sim).chat.completions.create(model="sql-lora", messages=[{"role": "user", "content": "x"}], max_tokens=3)
    text = httpx.get(sim.url + "/metrics", timeout=10).text
    got = _families(text)
    want = _families((FIXTURES / "metrics-0.33.0.txt").read_text())
    vllm_names = {n for n in want if n.startswith("vllm:")}
    assert vllm_names <= set(got), sorted(vllm_names - set(got))
    for name, spec in got.items():
        assert name in want, name
        assert spec == want[name], name
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    base = (("engine", "0"), ("model_name", BASE))
    assert samples[("vllm:request_success_total", (base[0], ("finished_reason", "length"), base[1]))] == 1
    assert samples[("vllm:generation_tokens_total", base)] == 3
    info = next(f for f in text_string_to_metric_families(text) if f.name == "vllm:cache_config_info")
    assert info.samples[0].labels["num_gpu_blocks"] == "4096" and info.samples[0].labels["block_size"] == "16"
    lora_info = [s for s in text_string_to_metric_families(text) if s.name == "vllm:lora_requests_info"][0].samples
    assert {s.labels["max_lora"] for s in lora_info} == {"4"}
    newest = max(lora_info, key=lambda s: s.value)
    assert newest.value > 1.7e9  # a Unix timestamp
    assert newest.labels["running_lora_adapters"] == newest.labels["waiting_lora_adapters"]
    assert "vllm:lora_adapter_loaded" not in got  # opt-in only


def test_residency_metric_opt_in(procs, make_adapter) -> None:  # type: ignore[no-untyped-def]
    a, b = make_adapter("a-lora", rank=8), make_adapter("b-lora", rank=16)
    sim = start_sim(procs, "--enable-lora", "--max-loras", "1", "--max-cpu-loras", "2",
                    "--lora-modules", f"a-lora={a}", f"b-lora={b}", "--emit-residency-metrics")
    fam = next(f for f in text_string_to_metric_families(httpx.get(sim.url + "/metrics", timeout=10).text)
               if f.name == "vllm:lora_adapter_loaded")
    assert fam.type == "gauge"
    assert sorted((s.labels["adapter_name"], s.labels["level"], s.labels["rank"]) for s in fam.samples) == [
        ("a-lora", "cpu", "8"), ("b-lora", "gpu", "16")]


def test_tokenizer_endpoints_match_what_the_engine_counts(procs, make_adapter) -> None:  # type: ignore[no-untyped-def]
    """/tokenize, /detokenize and the two render routes (vLLM 0.33 shapes): the ids are the ones
    the engine counts and hashes, so a router that tokenizes first sees the pod's blocks."""
    path = make_adapter("sql-lora", rank=8)
    sim = start_sim(procs, "--enable-lora", "--lora-modules", f"sql-lora={path}", "--time-scale", "0",
                    "--max-model-len", "4096")
    http = httpx.Client(base_url=sim.url, timeout=30)
    messages = [{"role": "system", "content": "You write SQL."}, {"role": "user", "content": "Tables? é"}]
    chat = client(sim).chat.completions.create(model="sql-lora", messages=messages, max_tokens=2)  # type: ignore[arg-type]
    assert chat.usage is not None

    tok = http.post("/tokenize", json={"model": "sql-lora", "messages": messages}).json()
    assert list(tok) == ["count", "max_model_len", "tokens", "token_strs"]
    assert tok["count"] == len(tok["tokens"]) == chat.usage.prompt_tokens and tok["max_model_len"] == 4096
    assert tok["tokens"] == tokenize(apply_chat_template(messages)) and tok["token_strs"] is None
    open_ended = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert open_ended["tokens"] == tokenize(apply_chat_template(messages, add_generation_prompt=False))
    bad = http.post("/tokenize", json={"messages": messages, "continue_final_message": True,
                                       "add_generation_prompt": True})
    assert bad.status_code == 400 and "continue_final_message" in bad.json()["error"]["message"]
    continued = http.post("/tokenize", json={"messages": messages, "continue_final_message": True}).json()
    assert detokenize(continued["tokens"]).endswith("Tables? é")  # the last message stays open
    text = "SELECT name FROM customers; -- ünïcode"
    plain = http.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert plain["tokens"] == tokenize(text) and len(plain["token_strs"]) == plain["count"]
    assert plain["token_strs"][:2] == ["SELE", "CT n"]  # one 4-byte piece per token
    assert http.post("/detokenize", json={"tokens": plain["tokens"]}).json() == {"prompt": text}
    assert http.post("/detokenize", json={"tokens": [plain["tokens"][0], 2**40]}).json()["prompt"] == text[:4]
    for body, param in (({"tokens": [-1]}, "body.tokens"), ({"model": BASE}, "body.tokens"), ({}, "body.prompt")):
        route = "/detokenize" if param == "body.tokens" else "/tokenize"
        err = http.post(route, json=body)
        assert err.status_code == 400 and err.json()["error"]["param"] == param, err.text
    assert http.post("/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404

    rendered = http.post("/v1/chat/completions/render", json={"model": "sql-lora", "messages": messages,
                                                               "max_tokens": 7, "temperature": 0.2}).json()
    assert list(rendered) == ["request_id", "token_ids", "features", "sampling_params", "model", "stream",
                              "stream_options", "cache_salt", "priority", "kv_transfer_params"]
    assert rendered["token_ids"] == tok["tokens"] and rendered["model"] == "sql-lora"
    assert rendered["request_id"].startswith("chatcmpl-") and rendered["features"] is None
    assert rendered["sampling_params"]["max_tokens"] == 7 and rendered["sampling_params"]["temperature"] == 0.2
    many = http.post("/v1/completions/render", json={"model": BASE, "prompt": [text, "SELECT 1"]}).json()
    assert [m["token_ids"] for m in many] == [tokenize(text), tokenize("SELECT 1")]
    assert many[0]["sampling_params"]["max_tokens"] == 4096 - len(tokenize(text))  # what is left of the context
    ids = http.post("/v1/completions/render", json={"model": BASE, "prompt": [[11, 12, 13]]}).json()
    assert ids[0]["token_ids"] == [11, 12, 13] and ids[0]["request_id"].startswith("cmpl-")
    too_long = http.post("/v1/completions/render", json={"model": BASE, "prompt": "x" * 40000})
    assert too_long.status_code == 400 and "maximum context length" in too_long.json()["error"]["message"]
    missing = http.post("/v1/chat/completions/render", json={"model": "absent", "messages": messages})
    assert (missing.status_code, missing.json()["error"]["param"]) == (404, "model")


def test_error_statuses_and_bodies_match_a_real_vllm(procs, make_adapter, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Every case a real vLLM 0.25.1 answered (``vllm-0.25-real/errors.json``), replayed in order:
    same status, type, param and code; the same message, except where vLLM changed it since
    (0.33 adds ``Valid aliases: ...`` to an unknown model, sanitises paths to ``<path>`` and
    words the validation error's tail differently)."""
    cases = json.loads((REAL / "errors.json").read_text())
    for name, rank in (("ta", 16), ("tc", 16), ("big128", 128)):
        make_adapter(name, rank=rank)
    local = {name: str(tmp_path / "adapters" / name) for name in ("ta", "tc", "big128")}
    sim = start_sim(procs, "--enable-lora", "--served-model-name", "base", "--max-loras", "2", "--max-lora-rank", "64",
                    "--allow-runtime-lora-updating", "--lora-modules", f"ta={local['ta']}", f"tc={local['tc']}",
                    "--time-scale", "0")
    for case in cases:
        if case["path"]:
            body = dict(case["req"])
            if "lora_path" in body:  # the same adapter here, or a path that does not exist
                body["lora_path"] = local.get(Path(body["lora_path"]).name, str(tmp_path / "does-not-exist"))
            got = httpx.post(sim.url + case["path"], json=body, timeout=30)
        else:
            got = httpx.post(sim.url + "/v1/chat/completions", timeout=30, json={
                "model": case["model"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        assert got.status_code == case["status"], (case["label"], got.text)
        if case["status"] == 200:
            assert got.text == case["body"], case["label"]
            continue
        want, have = json.loads(case["body"])["error"], got.json()["error"]
        assert {k: have[k] for k in ("type", "param", "code")} == {k: want[k] for k in ("type", "param", "code")}, case
        if case["label"] == "err_path_missing":
            assert have["message"] == want["message"].replace(case["req"]["lora_path"], "<path>")
        elif case["label"] == "err_no_path":
            assert have["message"].split("\n")[:2] == want["message"].split("\n")[:2]
        elif want["type"] == "NotFoundError" and want["param"] == "model":
            assert have["message"] == want["message"] + " Valid aliases: base."
        else:
            assert have["message"] == want["message"], case["label"]


def _lora_series(sim: Proc) -> dict[tuple[str, str], float]:
    text = httpx.get(sim.url + "/metrics", timeout=10).text
    fam = [f for f in text_string_to_metric_families(text) if f.name == "vllm:lora_requests_info"]
    return {(s.labels["running_lora_adapters"], s.labels["waiting_lora_adapters"]): s.value
            for s in (fam[0].samples if fam else [])}


def test_lora_requests_info_behaves_like_vllm_0_25(procs, make_adapter) -> None:  # type: ignore[no-untyped-def]
    """As the real capture shows (metrics-*.txt): no series before the first request; a one-token
    request on an idle pod is never listed (it finishes in the step that admits it); a request
    that comes during a stream is listed with the stream's adapter, running = waiting; every label
    set stays exported with its last timestamp."""
    import threading
    import time

    a, b = make_adapter("a-lora", rank=8), make_adapter("b-lora", rank=8)
    sim = start_sim(procs, "--enable-lora", "--max-loras", "2", "--lora-modules", f"a-lora={a}", f"b-lora={b}",
                    "--time-scale", "0.05")
    assert _lora_series(sim) == {}
    c = client(sim)
    c.completions.create(model="a-lora", prompt="one token, idle pod", max_tokens=1)
    assert set(_lora_series(sim)) == {("", "")}
    stop = threading.Event()

    def stream() -> None:
        with c.completions.create(model="b-lora", prompt="long stream", max_tokens=100_000, stream=True) as s:
            for _ in s:
                if stop.is_set():
                    return

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 20
        while ("b-lora", "b-lora") not in _lora_series(sim):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        c.completions.create(model="a-lora", prompt="during the stream", max_tokens=1)
        seen = _lora_series(sim)
        assert ("b-lora,a-lora", "b-lora,a-lora") in seen and all(r == w for r, w in seen)
        stamp = seen[("", "")]
    finally:
        stop.set()
        t.join(30)
    deadline = time.monotonic() + 20
    while max(_lora_series(sim).items(), key=lambda kv: kv[1])[0] != ("", ""):  # idle again: newest is empty
        assert time.monotonic() < deadline
        time.sleep(0.01)
    final = _lora_series(sim)
    assert set(final) == {("", ""), ("b-lora", "b-lora"), ("b-lora,a-lora", "b-lora,a-lora")}  # stale ones kept
    assert final[("", "")] > stamp > 1.7e9  # the empty set's timestamp moved on; the others kept theirs


def test_profile_flags_are_validated(capsys: pytest.CaptureFixture[str]) -> None:
    from vllm_sim.cli import main

    for flags, message in ((["--profile", "8b-eagre"], "invalid choice: '8b-eagre'"),
                           (["--cost", "load_scal=3"], "unknown cost constant 'load_scal'; did you mean 'load_scale'?"),
                           (["--cost", "load_scale"], "--cost expects KEY=NUMBER")):
        try:
            code = main(["--port", "1", *flags])
        except SystemExit as e:  # argparse
            code = int(e.code or 0)
        assert code == 2 and message in capsys.readouterr().err, flags
