"""A reconnect storm against the real PostgreSQL store behind the hub's GuardedStore
(hub/breaker.py): calls that need a pool connection wait for one in a bounded queue,
outside `store.timeout_s`, so thousands of handshakes at once are answered late rather
than refused, and the circuit breaker, which is for a store that does not answer, stays
closed. Before the queue, the pool's own wait ran inside the timeout: a storm of 10,000
reconnecting nodes on two instances opened the breaker again and again (`python -m bench
storm --targets hub-cluster`: 71 s, against 16.5 s to have every node back with it)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from openred.hub.breaker import CLOSED, Breaker, GuardedStore
from openred.hub.metrics import Metrics
from prometheus_client import CollectorRegistry

from tests.persistence.conftest import PostgresFactory

NOW = int(time.time() * 1000)
CALLS = 3000
TIMEOUT_S = 0.3  # store.timeout_s: far longer than one call, far shorter than the storm


@pytest.fixture
async def pg(tmp_path: Path) -> Any:
    factory = PostgresFactory(tmp_path)  # a fresh schema on the real server
    factory.pool_size = 4
    store = factory.make_pg()
    await store.open()
    yield store
    await store.close()
    await factory.cleanup()


async def storm(store: Any) -> tuple[int, int]:
    """CALLS handshake-like reads at once: (answered, refused)."""
    async def one(i: int) -> bool:
        try:
            await store.get_node(f"n{i}")
            await store.count_pending(f"n{i}", NOW)
            return True
        except Exception:
            return False

    results = await asyncio.gather(*(one(i) for i in range(CALLS)))
    return sum(results), CALLS - sum(results)


async def test_a_storm_of_reads_queues_and_does_not_open_the_breaker(pg: Any) -> None:
    b = Breaker("store", failures=5, window_s=10.0, open_s=5.0)
    guarded: Any = GuardedStore(pg, b, Metrics(CollectorRegistry()), TIMEOUT_S)
    t0 = time.perf_counter()
    answered, refused = await storm(guarded)
    took = time.perf_counter() - t0
    assert (answered, refused) == (CALLS, 0)
    assert b.state is CLOSED
    # The storm itself lasted many timeouts: what was waiting was queued, not timed.
    assert took > TIMEOUT_S, f"{took:.2f} s: the storm was too short to test anything"


async def test_without_the_queue_the_same_storm_times_out(pg: Any) -> None:
    """The same storm straight into the pool, timed as GuardedStore times a read: calls
    that wait for a connection longer than the timeout fail (what opened the breaker)."""
    async def timed(i: int) -> bool:
        try:
            async with asyncio.timeout(TIMEOUT_S):
                await pg.get_node(f"n{i}")
                await pg.count_pending(f"n{i}", NOW)
            return True
        except TimeoutError:
            return False

    results = await asyncio.gather(*(timed(i) for i in range(CALLS)))
    assert CALLS - sum(results) > 0
