"""Shared rate limits (hub/ratelimit_shared.py) on every broker: the GCRA answers of
the Lua script in real Redis (plain and Cluster) equal those of `GcraTable` in process;
two instances share one bucket; keys expire; a Redis that goes away leaves the local
limit (never unlimited, never refusing all); and the handshake limiter's reconciliation
makes the per-IP bucket cluster wide."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis.asyncio as redis
from openred.hub.broker_redis import RedisBroker, parse_redis_url
from openred.hub.ratelimit import FORCE, PEEK, TAKE, GcraTable, Rate
from openred.hub.ratelimit_shared import HandshakeLimiter, SharedLimiter

from tests.broker.conftest import Brokers, Recorder, until
from tests.conftest import timeout

SLOW = Rate(per_s=1.0, burst=5.0)  # slow enough that a test never sees a refill


async def test_gcra_table_semantics() -> None:
    t = GcraTable()
    now = 1e12
    r = Rate(per_s=10, burst=3)
    assert [t.check([("a", r, 1, TAKE)], now)[0] for _ in range(3)] == [0, 0, 0]
    over = t.check([("a", r, 1, TAKE)], now)[0]
    assert over == pytest.approx(0.1)
    assert t.check([("a", r, 1, TAKE)], now + 100_000)[0] == 0  # refilled one
    # PEEK never writes; a refused batch writes none of its TAKEs.
    assert t.check([("b", r, 3, PEEK)], now) == [0]
    assert t.check([("b", r, 2, TAKE), ("a", r, 1, TAKE)], now + 100_000) == [
        0, pytest.approx(0.1)]
    assert t.check([("b", r, 3, TAKE)], now + 100_000) == [0]  # b was left untouched
    # FORCE always writes and reports the debt.
    assert t.check([("c", r, 5, FORCE)], now) == [pytest.approx(0.2)]
    assert t.check([("c", r, 1, PEEK)], now) == [pytest.approx(0.3)]


async def test_gcra_table_is_bounded() -> None:
    t = GcraTable(max_keys=100)
    r = Rate(per_s=1, burst=1)
    for i in range(1000):
        t.check([(f"k{i}", r, 1, TAKE)], 1e12 + i)
    assert len(t) <= 100


def _limiter(broker: Any) -> SharedLimiter:
    return SharedLimiter(broker)


async def test_same_answers_as_in_process(brokers: Brokers) -> None:
    """The script and GcraTable agree, call for call (all well within a refill)."""
    broker, _ = await brokers.make()
    shared = _limiter(broker)
    assert shared.shared == brokers.clustered
    local = GcraTable()
    r = Rate(per_s=0.5, burst=4)
    now = time.monotonic() * 1e6
    script = [
        [("{t}:a", r, 1, TAKE)], [("{t}:a", r, 2, TAKE)], [("{t}:a", r, 1, PEEK)],
        [("{t}:a", r, 1, TAKE)], [("{t}:a", r, 1, TAKE)],  # the last is over
        [("{t}:b", r, 3, TAKE), ("{t}:a", r, 1, TAKE)],  # refused: b stays empty
        [("{t}:b", r, 4, TAKE)],
        [("{t}:c", r, 6, FORCE)], [("{t}:c", r, 0, PEEK)],
    ]
    for calls in script:
        got = await shared.check(calls)
        want = local.check(calls, now)
        assert [g > 0 for g in got] == [w > 0 for w in want], calls
        assert got == pytest.approx(want, abs=0.05), calls
    if brokers.clustered:
        assert shared.redis_calls == len(script) and shared.fallbacks == 0


async def test_two_instances_share_one_bucket(shared_brokers: Brokers) -> None:
    brokers = shared_brokers
    a = _limiter((await brokers.make(name="a"))[0])
    b = _limiter((await brokers.make(name="b"))[0])
    calls = [("{t}:ip:1.2.3.4", SLOW, 1.0, TAKE)]
    results = [await (a if i % 2 else b).check(calls) for i in range(12)]
    assert sum(1 for r in results if r[0] == 0) == 5  # the burst, once, not once each


async def test_keys_expire_when_the_bucket_is_full_again(shared_brokers: Brokers) -> None:
    brokers = shared_brokers
    broker, _ = await brokers.make()
    shared = _limiter(broker)
    await shared.check([("{t}:exp", Rate(per_s=10, burst=10), 3.0, TAKE)])
    key = shared.prefix + "{t}:exp"
    ttl = await broker.shards.call(key, "PTTL", key)
    assert 200 < int(ttl) <= 301  # 3 units at 10/s: full again in 0.3 s
    await asyncio.sleep(0.4)
    assert await broker.shards.call(key, "EXISTS", key) == 0


async def test_redis_down_falls_back_to_the_local_limit(redis_server: Any) -> None:
    broker = RedisBroker(redis_server.url, hub_id="rldown")
    await broker.start("i1", Recorder("i1"))
    try:
        shared = _limiter(broker)
        calls = [("{t}:x", SLOW, 1.0, TAKE)]
        assert (await shared.check(calls))[0] == 0
        redis_server.kill()
        await until(lambda: not broker.up, what="broker down")
        answers = [(await shared.check(calls))[0] for _ in range(8)]
        # Never unlimited, never refusing everything: the local bucket (its own burst).
        assert sum(1 for a in answers if a == 0) == 5
        assert shared.fallbacks == 0  # known down: no attempt, straight to local
    finally:
        await broker.close()


async def test_a_slow_redis_is_not_waited_for(redis_server: Any) -> None:
    broker = RedisBroker(redis_server.url, hub_id="rlslow")
    await broker.start("i1", Recorder("i1"))
    client = redis.Redis.from_url(parse_redis_url(redis_server.url)[0])
    try:
        shared = _limiter(broker)
        await client.execute_command("CLIENT", "PAUSE", "1000", "ALL")  # Redis hangs 1 s
        t0 = time.monotonic()
        assert (await shared.check([("{t}:s", SLOW, 1.0, TAKE)]))[0] == 0
        assert time.monotonic() - t0 < timeout(0.8)
        assert shared.fallbacks == 1
    finally:
        await client.aclose()
        await broker.close()


async def test_handshake_bucket_is_cluster_wide(brokers: Brokers) -> None:
    """One IP alternating between two instances gets the shared burst, not one per
    instance; each instance alone still holds the limit."""
    rate = Rate(per_s=2, burst=5)
    limiters = [HandshakeLimiter(rate, _limiter((await brokers.make(name=n))[0]))
                for n in ("a", "b")]
    loop = asyncio.get_running_loop()
    admitted = 0
    for i in range(40):
        admitted += limiters[i % 2].allow("10.0.0.1", loop.time())
        await asyncio.sleep(0.01)  # a handshake now and then: the answers come back
    if brokers.clustered:
        assert 5 <= admitted <= 7, admitted  # 5, and the refill over 0.4 s (+ a race)
        assert sum(h.shared_refusals for h in limiters) > 0
    else:
        assert 10 <= admitted <= 11  # two unrelated instances (memory): 5 each
    for h in limiters:
        await h.close()
