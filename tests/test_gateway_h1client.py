"""The lean upstream client: against a tiny scripted HTTP server on loopback (exact bytes on the
wire: Content-Length and chunked bodies, 204/304, ``Connection: close``, a malformed status line, a
response cut mid-body, pieces handed over as they arrive), against a real simulated pod (keep-alive
reuse, streaming, a restarted pod behind a pooled connection, the total timeout), and its request
fences (no CR/LF/NUL anywhere in what it writes, IPv6 hosts in brackets)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from scripted_http import Script, ScriptedServer

from gateway.h1client import NoFirstByte, Pool, UpstreamError, build_head, split_url
from loraroute.procs import free_port, loraroute_cmd

# path -> what the server writes (a float: a pause), and whether it then closes the connection
SCRIPTS: dict[str, Script] = {
    "/length": Script([b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-Thing: a\r\n\r\nhello world"]),
    "/chunked": Script([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", 0.1,
                        b"6\r\n world\r\n", 0.1, b"0\r\n\r\n"]),
    "/no-content": Script([b"HTTP/1.1 204 No Content\r\n\r\n"]),
    "/not-modified": Script([b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\nContent-Length: 9\r\n\r\n"]),
    "/close": Script([b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"], close=True),
    "/malformed": Script([b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok"]),
    "/cut": Script([b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"], close=True),
    "/error": Script([b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\n{}"]),
    # 3 MiB, more than the 1 MiB read-ahead: read whole, it must not stall on back-pressure
    "/big": Script([b"HTTP/1.1 200 OK\r\nContent-Length: 3145728\r\n\r\n" + b"x" * 3145728]),
    "/slow-body": Script([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", 0.5, b"2\r\nok\r\n0\r\n\r\n"]),
}


def tiny_server() -> ScriptedServer:
    return ScriptedServer(lambda req: SCRIPTS[req.path])


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 30))


async def get(pool: Pool, port: int, path: str, timeout_s: float | None = 5) -> tuple[int, dict[str, str], list[bytes]]:
    head = build_head("POST", path, "127.0.0.1", port, {"Content-Type": "application/json"}, 2)
    resp = await pool.request("127.0.0.1", port, head, b"{}", timeout_s)
    chunks = []
    try:
        while chunk := await resp.read_chunk():
            chunks.append(chunk)
    finally:
        resp.release()
    return resp.status, resp.headers, chunks


def test_bodies_by_length_and_chunked_and_none() -> None:
    async def scenario() -> None:
        async with tiny_server() as srv:
            pool = Pool(connect_timeout_s=2)
            status, headers, chunks = await get(pool, srv.port, "/length")
            assert (status, b"".join(chunks), headers["x-thing"]) == (200, b"hello world", "a")
            status, _, chunks = await get(pool, srv.port, "/chunked")
            assert status == 200 and b"".join(chunks) == b"hello world" and chunks[0] == b"hello"  # decoded,
            # and handed over as the first piece arrived (the rest came 0.1 s later)
            assert (await get(pool, srv.port, "/no-content"))[::2] == (204, [])
            assert (await get(pool, srv.port, "/not-modified"))[::2] == (304, [])  # no body despite the length
            # every one of them left the connection reusable: one connection for all four
            assert srv.connections == 1 and pool.idle_count() == {("127.0.0.1", srv.port): 1}
            pool.close()

    run(scenario)


def test_connection_close_malformed_and_cut_responses() -> None:
    async def scenario() -> None:
        async with tiny_server() as srv:
            pool = Pool(connect_timeout_s=2)
            assert (await get(pool, srv.port, "/close"))[::2] == (200, [b"ok"])
            assert pool.idle_count().get(("127.0.0.1", srv.port), 0) == 0  # the server said close: not kept
            assert (await get(pool, srv.port, "/length"))[0] == 200
            assert srv.connections == 2
            with pytest.raises(UpstreamError, match="malformed response"):
                await get(pool, srv.port, "/malformed")
            head = build_head("POST", "/cut", "127.0.0.1", srv.port, {}, 0)
            resp = await pool.request("127.0.0.1", srv.port, head, b"", 5)
            assert resp.status == 200 and await resp.read_chunk() == b"partial"
            with pytest.raises(UpstreamError, match="closed the connection"):
                await resp.read_chunk()
            assert not resp.complete
            resp.release()
            # a 5xx is just a response here (the gateway decides what it means)
            assert (await get(pool, srv.port, "/error"))[0] == 503
            # the first-byte limit: headers in time are not enough, the first body byte must be too
            head = build_head("POST", "/slow-body", "127.0.0.1", srv.port, {}, 0)
            resp = await pool.request("127.0.0.1", srv.port, head, b"", 5, first_byte_s=0.2)
            with pytest.raises(NoFirstByte):
                await resp.read_chunk()
            resp.release()
            resp = await pool.request("127.0.0.1", srv.port, head, b"", 5, first_byte_s=2.0)
            assert await resp.read_all() == b"ok"
            resp.release()
            head = build_head("POST", "/big", "127.0.0.1", srv.port, {}, 0)
            resp = await pool.request("127.0.0.1", srv.port, head, b"", 5)
            assert len(await resp.read_all()) == 3145728 and resp.complete
            resp.release()
            pool.close()

    run(scenario)


def test_requests_cannot_be_split_and_ipv6_hosts_are_bracketed() -> None:
    for bad in ({"X-A": "1\r\nX-Injected: 1"}, {"X-A\nB": "1"}, {"X-A": "nul\x00"}):
        with pytest.raises(ValueError, match="CR, LF or NUL"):
            build_head("POST", "/v1/completions", "127.0.0.1", 80, bad, 0)
    with pytest.raises(ValueError, match="request path"):
        build_head("POST", "/v1/completions HTTP/1.1\r\nX: y", "h", 80, {}, 0)
    head = build_head("POST", "/p", "::1", 8000, {"X-Request-Id": "abc"}, 2)
    assert head == b"POST /p HTTP/1.1\r\nHost: [::1]:8000\r\nContent-Length: 2\r\nX-Request-Id: abc\r\n\r\n"
    assert split_url("http://[::1]:8000/v1/") == ("::1", 8000, "/v1")
    assert split_url("http://[fe80::1]") == ("fe80::1", 80, "")
    assert split_url("http://127.0.0.1:8000") == ("127.0.0.1", 8000, "")
    assert split_url("http://pod-0.vllm:8000/prefix/") == ("pod-0.vllm", 8000, "/prefix")
    assert split_url("http://vllm") == ("vllm", 80, "")
    with pytest.raises(ValueError):
        split_url("https://x:1")


# --- against a real simulated pod --------------------------------------------------------------------
def sim_argv(port: int, *extra: str) -> list[str]:
    return loraroute_cmd("sim", "--port", str(port), "--model", "base", *extra)


def body(stream: bool, max_tokens: int = 4) -> bytes:
    return json.dumps({"model": "base", "prompt": "hello", "max_tokens": max_tokens, "stream": stream}).encode()


async def post(pool: Pool, port: int, data: bytes, timeout_s: float | None = 30) -> tuple[int, list[bytes]]:
    head = build_head("POST", "/v1/completions", "127.0.0.1", port, {"Content-Type": "application/json"}, len(data))
    resp = await pool.request("127.0.0.1", port, head, data, timeout_s)
    chunks = []
    while chunk := await resp.read_chunk():
        chunks.append(chunk)
    resp.release()
    return resp.status, chunks


def test_keep_alive_streaming_restart_and_errors(procs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    sim = procs.start("sim", sim_argv(port, "--time-scale", "0.2"), port=port,
                      ready_url=f"http://127.0.0.1:{port}/health", timeout=60)

    async def scenario() -> None:
        pool = Pool(connect_timeout_s=2)
        status, chunks = await post(pool, port, body(False))
        assert status == 200 and json.loads(b"".join(chunks))["choices"][0]["text"]
        status, chunks = await post(pool, port, body(True, 8))  # (piece by piece: the scripted tests above)
        assert status == 200 and b"".join(chunks).endswith(b"data: [DONE]\n\n")
        assert pool.idle_count() == {("127.0.0.1", port): 1}  # one connection, reused

        # the total timeout cuts a long stream and closes the connection
        with pytest.raises(asyncio.TimeoutError):
            await post(pool, port, body(True, 3000), timeout_s=0.3)
        assert pool.idle_count().get(("127.0.0.1", port), 0) <= 1
        pool.close()

    asyncio.run(scenario())

    async def pooled_then_restart() -> None:
        pool = Pool(connect_timeout_s=2)
        assert (await post(pool, port, body(False)))[0] == 200
        sim.kill()
        procs.start("sim2", sim_argv(port), port=port, ready_url=f"http://127.0.0.1:{port}/health", timeout=60)
        # the pooled connection belongs to the dead process; the request still succeeds
        assert (await post(pool, port, body(False)))[0] == 200
        with pytest.raises(UpstreamError, match="cannot connect"):
            await post(pool, free_port(), body(False))
        pool.close()

    asyncio.run(pooled_then_restart())
