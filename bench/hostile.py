"""Hostile and malformed requests for the gateway, and the rules every answer must keep.

Shared by the hostile-input test (``tests/test_hostile.py``: the hand-written cases plus
``hypothesis``-generated bodies, a bounded number) and the reliability benchmark
(``bench/reliability.py hostile``: thousands of them, with the memory check).

- ``raw_cases(model, key)`` — hand-written requests as raw HTTP/1.1 bytes: broken HTTP, heads over
  the limits, bodies that are not JSON, too deep, too large, names that are too long or not
  strings, sampling parameters vLLM refuses, keys that are wrong in every way;
- ``random_body(rng, model)`` — one randomly mangled completion body (JSON bytes);
- ``send_raw(host, port, data)`` — send one raw request on a fresh connection, read the answer;
- ``violations(answer, secrets)`` — what is wrong with an answer: a status ≥ 500, no answer at
  all (a dropped connection), an error that is not in OpenAI's shape, a stack trace, a secret.
"""

from __future__ import annotations

import json
import random
import socket
from dataclasses import dataclass
from typing import Any

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Answer:
    """One raw HTTP answer: ``status`` 0 when none came (the connection was dropped or timed out)."""

    status: int
    headers: dict[str, str]
    body: bytes
    error: str = ""


def request(path: str, body: bytes, key: str | None = None, extra: list[tuple[str, str]] | None = None,
            method: str = "POST") -> bytes:
    """A well-formed HTTP/1.1 request carrying ``body`` (``Connection: close``)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "Connection: close"]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    lines += [f"{k}: {v}" for k, v in extra or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chat(model: Any, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


def _j(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def raw_cases(model: str, key: str | None) -> list[tuple[str, bytes]]:
    """(name, raw request) for every hand-written case; ``model`` is an allowed ``base:adapter``,
    ``key`` a valid tenant key (None: the gateway is open)."""
    chat_path = "/v1/chat/completions"
    base = model.split(":", 1)[0]
    deep = 300
    cases: list[tuple[str, bytes]] = [
        # the HTTP layer
        ("garbage instead of HTTP", b"\x16\x03\x01\x02\x00garbage\r\n\r\n"),
        ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        ("unknown method", request(chat_path, b"{}", key, method="BREW")),
        ("GET on a completion route", request(chat_path, b"", key, method="GET")),
        ("1 MiB header", request(chat_path, _j(chat(model)), key, [("X-Big", "a" * MIB)])),
        ("2,000 headers", request(chat_path, _j(chat(model)), key, [(f"X-H{i}", "1") for i in range(2000)])),
        ("64 KiB URL", request(chat_path + "?" + "q" * 65536, _j(chat(model)), key)),
        ("path traversal", request("/v1/../admin/pods", b"", key, method="GET")),
        ("encoded traversal", request("/v1/%2e%2e/admin/pods", b"", key, method="GET")),
        ("bad content-length", b"POST " + chat_path.encode() + b" HTTP/1.1\r\nHost: g\r\nContent-Length: x\r\n\r\n"),
        ("negative content-length", b"POST " + chat_path.encode() + b" HTTP/1.1\r\nHost: g\r\nContent-Length: -5\r\n\r\n"),
        ("body over the limit", request(chat_path, _j(chat(model, extra="x" * (5 * MIB))), key)),
        ("NUL in a header value", request(chat_path, _j(chat(model)), key, [("X-Null", "a\x00b")])),
        ("hostile x-request-id", request(chat_path, _j(chat(model)), key, [("X-Request-Id", "a" * 10000)])),
        ("hostile session header", request(chat_path, _j(chat(model)), key, [("X-Session-Id", "s" * 10000)])),
        # the body
        ("empty body", request(chat_path, b"", key)),
        ("not JSON", request(chat_path, b"{model: sql", key)),
        ("invalid UTF-8", request(chat_path, b'{"model": "\xff\xfe", "messages": []}', key)),
        ("lone surrogate", request(chat_path, b'{"model": "\\ud800", "messages": []}', key)),
        ("JSON array", request(chat_path, b"[1, 2, 3]", key)),
        ("JSON scalar", request(chat_path, b'"hello"', key)),
        (f"JSON {deep} levels deep", request(chat_path, _j(chat(model))[:-1] + b', "extra": '
                                              + b"[" * deep + b"]" * deep + b"}", key)),
        ("JSON 2,000 levels deep", request(chat_path, b"[" * 2000 + b"]" * 2000, key)),
        ("huge number", request(chat_path, b'{"model": "' + model.encode() + b'", "max_tokens": 1e999}', key)),
        ("1 MB model name", request(chat_path, _j(chat("m" * MIB)), key)),
        ("model is a list", request(chat_path, _j(chat([model] * 1000)), key)),
        ("model is an object", request(chat_path, _j(chat({"name": model})), key)),
        ("model is null", request(chat_path, _j(chat(None)), key)),
        ("control characters in model", request(chat_path, _j(chat(base + ":s\u0000ql\u0007")), key)),
        ("traversal in model", request(chat_path, _j(chat(base + ":../../etc/passwd")), key)),
        ("second colon", request(chat_path, _j(chat(model + ":v2")), key)),
        ("messages is a string", request(chat_path, _j({"model": model, "messages": "hi"}), key)),
        ("messages of numbers", request(chat_path, _j({"model": model, "messages": [1, 2, 3]}), key)),
        ("content is an object", request(chat_path, _j({"model": model, "messages": [{"role": "user",
                                                                                      "content": {"a": 1}}]}), key)),
        ("role is null", request(chat_path, _j({"model": model, "messages": [{"role": None, "content": "x"}]}), key)),
        ("prompt of nested lists", request("/v1/completions", _j({"model": model, "prompt": [[[1]]]}), key)),
        ("prompt of mixed types", request("/v1/completions", _j({"model": model, "prompt": ["a", 1, None]}), key)),
        ("stream is a string", request(chat_path, _j(chat(model, stream="yes")), key)),
        ("max_tokens negative", request(chat_path, _j(chat(model, max_tokens=-1)), key)),
        ("max_tokens a string", request(chat_path, _j(chat(model, max_tokens="10")), key)),
        ("max_tokens a boolean", request(chat_path, _j(chat(model, max_tokens=True)), key)),
        ("max_tokens huge", request(chat_path, _j(chat(model, max_tokens=10 ** 30)), key)),
        # sampling parameters the pod refuses (vLLM's 400s, passed through)
        ("stop is a number", request(chat_path, _j(chat(model, stop=5)), key)),
        ("stop holds a number", request(chat_path, _j(chat(model, stop=["a", 5])), key)),
        ("empty stop string", request(chat_path, _j(chat(model, stop=[""])), key)),
        ("temperature negative", request(chat_path, _j(chat(model, temperature=-1)), key)),
        ("temperature a word", request(chat_path, _j(chat(model, temperature="hot")), key)),
        ("top_p above 1", request(chat_path, _j(chat(model, top_p=2)), key)),
        ("top_k -5", request(chat_path, _j(chat(model, top_k=-5)), key)),
        ("presence_penalty 9", request(chat_path, _j(chat(model, presence_penalty=9)), key)),
        ("n is 0", request(chat_path, _j(chat(model, n=0)), key)),
        ("n is 5", request(chat_path, _j(chat(model, n=5)), key)),
        ("seed a float", request(chat_path, _j(chat(model, seed=1.5)), key)),
        # who may call
        ("no key", request(chat_path, _j(chat(model)), None)),
        ("wrong key", request(chat_path, _j(chat(model)), "sk-wrong")),
        ("empty bearer", request(chat_path, _j(chat(model)), None, [("Authorization", "Bearer ")])),
        ("basic auth", request(chat_path, _j(chat(model)), None, [("Authorization", "Basic dXNlcjpwYXNz")])),
        ("key with whitespace", request(chat_path, _j(chat(model)), None, [("Authorization", f"Bearer  {key} ")])),
        ("admin API without a key", request("/admin/pods", b"", None, method="GET")),
        ("admin API with a tenant key", request("/admin/pods", b"", key, method="GET")),
        ("reload with a tenant key", request("/admin/reload", b"", key)),
        ("explain without admin", request(chat_path, _j(chat(model)), key, [("x-loraroute-debug", "1")])),
        ("metrics without a key", request("/metrics", b"", None, method="GET")),
        ("unknown route", request("/v1/embeddings", _j({"model": model, "input": "x"}), key)),
    ]
    return cases


_FIELDS = ("model", "messages", "prompt", "stream", "max_tokens", "max_completion_tokens", "temperature", "top_p",
           "top_k", "stop", "n", "seed", "logprobs", "presence_penalty", "stream_options", "extra")


def _junk(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2 ** 31, -(2 ** 63), 10 ** 20, 7])
    if kind == 3:
        return rng.choice([0.5, -1e308, 1e-300, 3.14, -0.0])
    if kind == 4:
        return "".join(rng.choice("ab:/.\\\x00\u00e9\u4e2d\U0001f600 \n\t\"'{}[]") for _ in range(rng.randrange(0, 40)))
    if kind == 5:
        return rng.choice(["", "tsuzumi-base", "tsuzumi-base:sql", ":", "a" * 500, "tsuzumi-base:..", "user"])
    if kind == 6:
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    if kind == 7:
        return {rng.choice(["role", "content", "text", "type", "x"]): _junk(rng, depth + 1) for _ in range(3)}
    return [{"role": rng.choice(["user", "system", None, 5]), "content": _junk(rng, depth + 1)}]


def random_body(rng: random.Random, model: str) -> bytes:
    """A completion body with some fields right, some mangled, some missing, some extra."""
    body: dict[str, Any] = chat(model)
    for field in rng.sample(_FIELDS, rng.randrange(1, 6)):
        if rng.random() < 0.2:
            body.pop(field, None)
        else:
            body[field] = _junk(rng)
    raw = json.dumps(body).encode()
    if rng.random() < 0.1:  # and now and then the bytes themselves are broken
        cut = rng.randrange(1, len(raw))
        raw = raw[:cut] + rng.choice([b"", b"\xff", b"}", b"\x00", b"]]]"]) + raw[cut:]
    return raw


def send_raw(host: str, port: int, data: bytes, timeout_s: float = 30.0) -> Answer:
    """Send ``data`` on a fresh connection and read the whole answer (the server closes it)."""
    chunks: list[bytes] = []
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            try:
                sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server may answer and close before reading everything (431, 413)
            while True:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
    except OSError as exc:
        return Answer(0, {}, b"", f"{type(exc).__name__}: {exc}")
    raw = b"".join(chunks)
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/1."):
        return Answer(0, {}, raw, "no HTTP answer")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        return Answer(0, {}, raw, "unreadable status line")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return Answer(status, headers, body)


def _dechunk(data: bytes) -> bytes:
    out = []
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out.append(rest[:size])
        data = rest[size + 2:]
    return b"".join(out)


def violations(answer: Answer, secrets: list[str]) -> list[str]:
    """What breaks the rules in one answer (see the module docstring); [] when it keeps them."""
    problems = []
    if answer.status == 0:
        return [f"no answer ({answer.error or 'connection dropped'})"]
    if answer.status >= 500:
        problems.append(f"status {answer.status}")
    text = answer.body.decode("utf-8", "replace")
    if "Traceback" in text or 'File "' in text:
        problems.append("a stack trace in the body")
    everything = text + "\n".join(f"{k}: {v}" for k, v in answer.headers.items())
    for secret in secrets:
        if secret and secret in everything:
            problems.append("a secret in the answer")
    if answer.status >= 400:
        try:
            err = json.loads(answer.body)["error"]
            if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"}:
                problems.append(f"error not in OpenAI's shape: {text[:200]}")
        except (ValueError, KeyError, TypeError):
            problems.append(f"error body is not OpenAI-shaped JSON: {text[:200]}")
    return problems
