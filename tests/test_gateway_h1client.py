"""The lean upstream client against a real simulated pod: keep-alive reuse, streaming chunks as
they arrive, a restarted pod behind a pooled connection, the total timeout, connect errors."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from gateway.h1client import Pool, UpstreamError, build_head, split_url
from loraroute.procs import free_port, loraroute_cmd


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
        status, chunks = await post(pool, port, body(True, 8))
        assert status == 200 and b"".join(chunks).endswith(b"data: [DONE]\n\n")
        assert len(chunks) > 2  # handed over as they arrived, not buffered to the end
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


def test_split_url() -> None:
    assert split_url("http://127.0.0.1:8000") == ("127.0.0.1", 8000, "")
    assert split_url("http://pod-0.vllm:8000/prefix/") == ("pod-0.vllm", 8000, "/prefix")
    assert split_url("http://vllm") == ("vllm", 80, "")
    with pytest.raises(ValueError):
        split_url("https://x:1")
