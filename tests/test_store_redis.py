"""RedisStore against a real Redis server: pushes, TTLs, resync, restarts, several readers."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import pytest
import redis

from loraroute.services import restart_redis, start_redis
from podstate import MemoryStore, check_store_url, open_store
from podstate.redis_store import RedisStore, redact_url
from scorer.model import PodState


async def until(cond: Callable[[], bool], timeout: float = 5.0, step: float = 0.01) -> float:
    """Wait until ``cond()`` holds; return the seconds it took. Fails the test after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if cond():
            return time.monotonic() - start
        await asyncio.sleep(step)
    raise AssertionError(f"condition not met within {timeout}s")


def state(pod: str, **kw: object) -> PodState:
    now = time.time()
    return PodState(pod_id=pod, url=f"http://127.0.0.1:1/{pod}", observed_at=now, published_at=now, **kw)  # type: ignore[arg-type]


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro_fn())


def test_publish_reaches_reader_and_key_has_ttl(redis_url: str) -> None:
    async def go() -> None:
        writer = RedisStore(redis_url, reader=False)
        reader = RedisStore(redis_url, resync_interval_s=30)  # pushes only
        await writer.start()
        await reader.start()
        await until(lambda: reader.connected)
        seen: list[tuple[str, bool]] = []
        reader.add_listener(lambda pod, st: seen.append((pod, st is not None)))
        await writer.publish(state("p0", gpu_adapters=("a",)), ttl_s=5)
        await until(lambda: "p0" in reader.view(), timeout=2)
        assert reader.view()["p0"].gpu_adapters == ("a",)
        assert seen == [("p0", True)]
        client = redis.Redis.from_url(redis_url)
        assert 0 < client.pttl("loraroute:pod:p0") <= 5000
        assert PodState.from_json(client.get("loraroute:pod:p0")).gpu_adapters == ("a",)
        client.close()
        await writer.close()
        await reader.close()

    run(go)


def test_heartbeat_refreshes_ttl_and_timestamps_without_full_message(redis_url: str) -> None:
    async def go() -> None:
        writer = RedisStore(redis_url, reader=False, key_prefix="hb")
        reader = RedisStore(redis_url, key_prefix="hb", resync_interval_s=30)
        await writer.start()
        await reader.start()
        await until(lambda: reader.connected)
        first = state("p0", num_running=1)
        await writer.publish(first, ttl_s=1.0)
        await until(lambda: "p0" in reader.view())
        # watch the channel for the next message
        client = redis.Redis.from_url(redis_url)
        sub = client.pubsub(ignore_subscribe_messages=True)
        sub.subscribe("hb:pods")
        await asyncio.sleep(0.05)
        later = first.replace(observed_at=first.observed_at + 5, published_at=first.published_at + 5)
        await writer.publish(later, ttl_s=1.0)
        msg = None
        for _ in range(100):
            msg = sub.get_message(timeout=0.05)
            if msg:
                break
        assert msg is not None and json.loads(msg["data"])["op"] == "hb"
        await until(lambda: reader.view()["p0"].observed_at == later.observed_at)
        assert client.pttl("hb:pod:p0") > 500
        # a content change is a full message again
        await writer.publish(later.replace(num_running=2), ttl_s=1.0)
        await until(lambda: reader.view()["p0"].num_running == 2)
        sub.close()
        client.close()
        await writer.close()
        await reader.close()

    run(go)


def test_dead_writer_leaves_view_after_ttl_and_withdraw_is_immediate(redis_url: str) -> None:
    async def go() -> None:
        writer = RedisStore(redis_url, reader=False)
        reader = RedisStore(redis_url, resync_interval_s=0.2)
        await writer.start()
        await reader.start()
        await until(lambda: reader.connected)
        await writer.publish(state("dies"), ttl_s=0.4)
        await writer.publish(state("leaves"), ttl_s=30)
        await until(lambda: {"dies", "leaves"} <= set(reader.view()))
        published = time.monotonic()
        gone = await until(lambda: "dies" not in reader.view(), timeout=3)
        assert time.monotonic() - published >= 0.3  # not before its TTL
        assert gone < 2.0
        await writer.withdraw("leaves")
        await until(lambda: "leaves" not in reader.view(), timeout=1)
        await writer.close()
        await reader.close()

    run(go)


def test_missed_message_heals_by_resync(redis_url: str) -> None:
    async def go() -> None:
        reader = RedisStore(redis_url, resync_interval_s=0.2)
        await reader.start()
        await until(lambda: reader.connected)
        # written behind the reader's back: no pub/sub message at all
        client = redis.Redis.from_url(redis_url)
        client.set("loraroute:pod:sneaky", state("sneaky", gpu_adapters=("x",)).to_json(), px=5000)
        client.set("loraroute:pod:garbage", b"{not json", px=5000)
        client.publish("loraroute:pods", b"not json either")
        await until(lambda: "sneaky" in reader.view(), timeout=3)
        assert reader.view()["sneaky"].gpu_adapters == ("x",)
        assert "garbage" not in reader.view()
        client.close()
        await reader.close()

    run(go)


def test_two_readers_converge(redis_url: str) -> None:
    async def go() -> None:
        writer = RedisStore(redis_url, reader=False)
        readers = [RedisStore(redis_url, resync_interval_s=0.5) for _ in range(2)]
        await writer.start()
        for r in readers:
            await r.start()
        await until(lambda: all(r.connected for r in readers))
        final: dict[str, PodState] = {}
        for i in range(30):
            s = state(f"p{i % 3}", num_running=i, gpu_adapters=(f"a{i}",))
            final[s.pod_id] = s
            await writer.publish(s, ttl_s=10)
        await writer.withdraw("p2")
        del final["p2"]
        for r in readers:
            await until(lambda r=r: dict(r.view()) == final, timeout=3)  # type: ignore[misc]
        assert dict(readers[0].view()) == dict(readers[1].view())
        await writer.close()
        for r in readers:
            await r.close()

    run(go)


def test_redis_restart_heals_and_nothing_crashes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = start_redis(log_dir=tmp_path)

    async def go() -> None:
        nonlocal server
        url = str(server.extra["url"])
        writer = open_store(url, reader=False)
        reader = RedisStore(url, resync_interval_s=0.2)
        await writer.start()
        await reader.start()
        await until(lambda: reader.connected)
        await writer.publish(state("p0", num_running=1), ttl_s=2)
        await until(lambda: "p0" in reader.view())

        server.stop()
        await until(lambda: not reader.connected, timeout=5)
        await writer.publish(state("p0", num_running=2), ttl_s=2)  # logs, does not raise
        await asyncio.sleep(2.5)  # longer than the TTL: the last known state stays while Redis is down
        assert reader.view()["p0"].num_running == 1

        server = restart_redis(server, log_dir=tmp_path)
        await until(lambda: reader.connected, timeout=10)
        # the writer's next heartbeat re-creates the key (Redis lost it in the restart)
        await writer.publish(state("p0", num_running=3), ttl_s=2)
        await writer.publish(state("p1"), ttl_s=2)
        await until(lambda: reader.view().get("p0") is not None and reader.view()["p0"].num_running == 3, timeout=5)
        await until(lambda: "p1" in reader.view(), timeout=5)
        assert reader.stats["reconnects"] >= 1
        await writer.close()
        await reader.close()

    try:
        run(go)
    finally:
        server.stop()


def test_open_store_and_redaction() -> None:
    store = open_store("redis://127.0.0.1:1/0", key_prefix="x", reader=False, password="pw")
    assert isinstance(store, RedisStore) and store.key("p") == "x:pod:p" and not store.reader
    assert isinstance(open_store("memory://", key_prefix="ignored"), MemoryStore)
    assert check_store_url("rediss://h:1/0") == "rediss://h:1/0"
    with pytest.raises(ValueError, match="use memory://"):
        check_store_url("postgres://x")
    assert redact_url("redis://user:s3cret@host:6379/0") == "redis://host:6379/0"
    with pytest.raises(ValueError, match="unknown state store URL"):
        open_store("http://nope")
