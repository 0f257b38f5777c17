"""The request path's pure pieces: body parsing, the model-name echo, the failure policies."""

from __future__ import annotations

import json

import pytest

from gateway.echo import ModelEcho
from gateway.errors import APIError, error_message
from gateway.failures import (
    BadStatus, ConnectFailed, EmptyStream, EnsureFailed, FirstByteTimeout, StreamBroken, UpstreamFailure,
)
from gateway.parse import Kind, parse_request


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


MSGS = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {}}]}]


def test_a_chat_request_as_routing_sees_it() -> None:
    p = parse_request(body(model="b:sql", messages=MSGS, max_completion_tokens=7, stream=True, seed=1), Kind.CHAT)
    assert (p.model, p.stream, p.max_tokens) == ("b:sql", True, 7)
    assert p.text == "system\nBe brief.\nuser\nHi" and p.tokens == len(p.text) // 4
    assert p.payload["seed"] == 1  # everything else travels to the pod untouched
    assert parse_request(body(model="b", messages=MSGS, stream=None), Kind.CHAT).stream is False


@pytest.mark.parametrize(("prompt", "text", "tokens"), [
    ("Once upon a time", "Once upon a time", 4),
    (["ab" * 4, "cd" * 4], "abababab\ncdcdcdcd", 4),
    ([101, 2023, 7], "101 2023 7", 3),  # token ids: hashed as text, counted exactly
    ([[1, 2], [3]], "", 3),
])
def test_completion_prompts(prompt: object, text: str, tokens: int) -> None:
    p = parse_request(body(model="b", prompt=prompt), Kind.COMPLETIONS)
    assert (p.text, p.tokens, p.max_tokens) == (text, tokens, 0)


@pytest.mark.parametrize(("raw", "kind", "param", "fragment"), [
    (b"", Kind.CHAT, None, "empty"),
    (b'{"model": ', Kind.CHAT, None, "not valid JSON"),
    (b"[1]", Kind.CHAT, None, "JSON object"),
    (body(messages=MSGS), Kind.CHAT, "model", "'model' is required"),
    (body(model="b", messages=MSGS, stream="yes"), Kind.CHAT, "stream", "true or false"),
    (body(model="b", messages=MSGS, max_tokens=-1), Kind.CHAT, "max_tokens", "non-negative"),
    (body(model="b", messages=MSGS, max_tokens=True), Kind.CHAT, "max_tokens", "non-negative"),
    (body(model="b", messages=[]), Kind.CHAT, "messages", "non-empty list"),
    (body(model="b", messages=["hi"]), Kind.CHAT, "messages", "an object"),
    (body(model="b"), Kind.COMPLETIONS, "prompt", "'prompt' is required"),
    (body(model="b", prompt=[]), Kind.COMPLETIONS, "prompt", "non-empty"),
    (body(model="b", prompt=[1, "a"]), Kind.COMPLETIONS, "prompt", "list of token ids"),
])
def test_bad_bodies_are_400s_naming_the_field(raw: bytes, kind: Kind, param: str | None, fragment: str) -> None:
    with pytest.raises(APIError) as e:
        parse_request(raw, kind)
    assert e.value.status == 400 and e.value.param == param and fragment in e.value.message


# --- the model echo ------------------------------------------------------------------------------------
def test_echo_rewrites_the_served_name_in_whole_bodies_only_once() -> None:
    echo = ModelEcho("sql", "tsuzumi-base:sql")
    out = echo.body(b'{"id":"x","model":"sql","choices":[{"text":"model: sql"}],"usage":{}}')
    assert json.loads(out)["model"] == "tsuzumi-base:sql" and b'"text":"model: sql"' in out
    spaced = echo.body(b'{"model": "sql", "x": {"model": "sql"}}')
    assert spaced == b'{"model": "tsuzumi-base:sql", "x": {"model": "sql"}}'
    assert echo.body(b'{"model":"sql-v2"}') == b'{"model":"sql-v2"}'  # another name is left alone
    assert echo.body(b'{"content":"\\"model\\":\\"sql\\""}') == b'{"content":"\\"model\\":\\"sql\\""}'


def test_echo_in_a_stream_survives_a_name_cut_by_the_network() -> None:
    echo = ModelEcho("sql", "tsuzumi-base:sql")
    stream = b'data: {"model":"sql","n":1}\n\ndata: {"model":"sql","n":2}\n\ndata: [DONE]\n\n'
    for cut in range(1, len(stream)):
        out, held = echo.chunk(stream[:cut])
        rest, held = echo.chunk(held + stream[cut:])
        assert out + rest + held == stream.replace(b'"model":"sql"', b'"model":"tsuzumi-base:sql"'), cut
    ready, held = echo.chunk(b'data: {"n":0}\n\n')
    assert held == b"" and ready == b'data: {"n":0}\n\n'  # an event-aligned piece is never held back


# --- failures ------------------------------------------------------------------------------------------
def test_each_failure_carries_its_policy_and_its_answer() -> None:
    cases: list[tuple[UpstreamFailure, str, bool, bool, int, str]] = [
        (ConnectFailed("p", "refused"), "connect", True, True, 502, "upstream_unreachable"),
        (FirstByteTimeout("p", 2.5), "timeout", True, True, 504, "upstream_timeout"),
        (BadStatus("p", 503, "busy"), "status", True, False, 502, "upstream_error"),
        (EmptyStream("p"), "empty", True, False, 502, "upstream_error"),
        (EnsureFailed("p", "sidecar down", permanent=False), "ensure", True, False, 503, "adapter_ensure_failed"),
        (EnsureFailed("p", "late", permanent=False, timed_out=True), "ensure", True, False, 503,
         "adapter_ensure_timeout"),
        (EnsureFailed("p", "not in the store", permanent=True), "ensure", False, False, 502, "adapter_ensure_failed"),
        (StreamBroken("p", ConnectFailed("p", "reset")), "stream", False, False, 502, "upstream_stream_error"),
    ]
    for f, reason, retry, suspect, status, code in cases:
        err = f.error()
        assert (f.reason, f.retry, f.suspect, err.status, err.code) == (reason, retry, suspect, status, code), f
        assert "'p'" in err.message or f.reason == "ensure"
    assert FirstByteTimeout("p", 2.5).message == "pod 'p' sent no response within 2.5s"
    assert StreamBroken("p", FirstByteTimeout("p", 1)).message == "pod 'p' timed out mid-stream; the response is incomplete"
    assert EmptyStream("a").error(["a", "b"]).message.endswith("(tried a, b)")
    assert EmptyStream("a").error(["a"]).message == "pod 'a' closed the stream before sending anything"


def test_error_message_of_other_services_bodies() -> None:
    assert error_message(b'{"error": {"message": "bad rank", "code": 1}}') == "bad rank"
    assert error_message(b'{"detail": "Not Found"}') == "Not Found"
    assert error_message(b"<html>502 Bad Gateway</html>") == "<html>502 Bad Gateway</html>"
    assert error_message(b'["odd"]') == '["odd"]' and error_message(b"x" * 400) == "x" * 300
