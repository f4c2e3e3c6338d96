"""What the cluster-wide limits and revocations cost (docs/benchmarks.md, "Shared limits").

    python -m bench.limits_cost [--redis redis://127.0.0.1:6379/0]

- the per-IP handshake check on the upgrade path (`HandshakeLimiter.allow`, synchronous)
  against the old `IpLimiter.allow`, with the memory broker and with Redis (the Redis
  figure includes the background reconciliation, which runs on the same loop);
- one admin request's limit check (`SharedLimiter.check`, three buckets: lockout, IP,
  token): in process, and one Redis round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time
from typing import Any

from openred.hub.broker import MemoryBroker
from openred.hub.broker_redis import RedisBroker
from openred.hub.ratelimit import PEEK, TAKE, IpLimiter, Rate
from openred.hub.ratelimit_shared import HandshakeLimiter, SharedLimiter

N = 200_000
IPS = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(5000)]


class _Handler:
    def on_node_frame(self, *a: Any) -> None: ...
    def on_topic_frame(self, *a: Any) -> None: ...
    def on_control(self, *a: Any) -> None: ...
    def on_broker_up(self) -> None: ...
    def on_presence(self, *a: Any) -> None: ...


async def _allow_ns(limiter: Any) -> float:
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    for i in range(N):
        limiter.allow(IPS[i % len(IPS)], loop.time())
        if i % 1000 == 999:
            await asyncio.sleep(0)  # other work between handshakes: reconciliation runs
    return (time.perf_counter() - t0) / N * 1e9


async def _check_us(shared: SharedLimiter, n: int = 2000) -> tuple[float, float]:
    calls = [("{adm}:fail:198.51.100.1", Rate(1 / 300, 10), 1.0, PEEK),
             ("{adm}:ip:198.51.100.1", Rate(1e6, 1e6), 1.0, TAKE),
             ("{adm}:tok:bench", Rate(1e6, 1e6), 1.0, TAKE)]
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        await shared.check(calls)
        lat.append(time.perf_counter() - t0)
    lat.sort()
    return lat[n // 2] * 1e6, lat[int(n * 0.99)] * 1e6


async def run(redis_url: str) -> None:
    unlimited = Rate(1e9, 1e9)
    print(f"IpLimiter.allow (local only, no sharing): "
          f"{await _allow_ns(IpLimiter(1e9, 1e9)):6.0f} ns")
    memory = SharedLimiter(MemoryBroker())
    print(f"HandshakeLimiter.allow, memory broker:   "
          f"{await _allow_ns(HandshakeLimiter(unlimited, memory)):6.0f} ns")
    broker = RedisBroker(redis_url, hub_id="bench" + secrets.token_hex(3))
    await broker.start("bench", _Handler())
    try:
        shared = SharedLimiter(broker)
        limiter = HandshakeLimiter(unlimited, shared)
        ns = await _allow_ns(limiter)
        await limiter.close()
        print(f"HandshakeLimiter.allow, Redis broker:    {ns:6.0f} ns "
              f"({shared.redis_calls} reconciliation round trips)")
        p50, p99 = await _check_us(memory)
        print(f"admin limit check, in process:           p50 {p50:6.1f} us  p99 {p99:6.1f} us")
        p50, p99 = await _check_us(shared)
        print(f"admin limit check, Redis (1 round trip): p50 {p50:6.1f} us  p99 {p99:6.1f} us")
    finally:
        await broker.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = p.parse_args()
    try:
        import uvloop

        uvloop.run(run(args.redis))
    except ImportError:  # pragma: no cover
        asyncio.run(run(args.redis))


if __name__ == "__main__":
    main()
