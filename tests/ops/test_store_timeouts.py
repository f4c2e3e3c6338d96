"""PostgreSQL calls bounded by `store.timeout_s` when the server stops answering
(persistence/postgres.py, set up by `open_store(timeout_s=...)`), on the real server
behind the black-holing proxy of tests/ops/conftest.py.

Before: a write waited 10 s for BEGIN plus 10 s more for the ROLLBACK (20 s), and each
call queued behind it waited for the batch ahead first (30 s); a COMMIT that got no
answer kept its callers 30 s more. Now each call is answered within about one timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from openred.persistence.backends import open_store
from openred.persistence.store import Store, StoredMessage, StoreUnavailable

from tests.conftest import timeout
from tests.hub.nodes import eventually
from tests.ops.conftest import BlackHole

T = 1.0  # store.timeout_s in these tests
MARGIN_S = 0.5
NOW = int(time.time() * 1000)


def msg(i: int) -> StoredMessage:
    return StoredMessage(f"m{i:06d}", "alice", "bob", b"x", NOW, NOW + 86_400_000)


async def pending(store: Store) -> list[str]:
    return [m.mid for m in await store.pending("bob", NOW, None, 100)]


@pytest.fixture
async def store(pg_black_hole: tuple[BlackHole, str]) -> AsyncIterator[Store]:
    _, url = pg_black_hole
    s = open_store(url, pool_size=4, timeout_s=T)
    await s.open()
    yield s
    await s.close()


async def test_every_call_answered_within_the_timeout(
        store: Store, pg_black_hole: tuple[BlackHole, str]) -> None:
    proxy, _ = pg_black_hole
    await store.enqueue(msg(0), 100)
    proxy.black_hole()
    waits: dict[str, list[float]] = {"write": [], "read": []}
    outcomes: list[str] = []

    async def call(kind: str, coro: object) -> None:
        started = time.monotonic()
        try:
            await coro  # type: ignore[misc]
            outcomes.append("ok")
        except StoreUnavailable:
            outcomes.append("unavailable")
        waits[kind].append(time.monotonic() - started)

    calls = []
    for i in range(1, 41):  # writes arrive all along, reads too
        calls.append(asyncio.create_task(call("write", store.enqueue(msg(i), 100))))
        if i % 10 == 0:
            calls.append(asyncio.create_task(
                call("read", store.pending("bob", NOW, None, 10))))
        await asyncio.sleep(0.05)
    await asyncio.gather(*calls)
    assert set(outcomes) == {"unavailable"}
    assert max(waits["write"]) <= T + timeout(MARGIN_S), sorted(waits["write"])[-5:]
    # A read first waits for the queued writes of its data (the Store contract's order),
    # then for its own query: two timeouts at most. The hub cuts its reads at one
    # (hub/breaker.py GuardedStore).
    assert max(waits["read"]) <= 2 * T + timeout(MARGIN_S), waits["read"]
    proxy.heal()
    await eventually(lambda: _ok(store.ping()), wait=5 * T)  # the same store, recovered
    await store.enqueue(msg(99), 100)
    assert await pending(store) == [msg(0).mid, msg(99).mid]


async def _ok(coro: object) -> bool:
    try:
        await coro  # type: ignore[misc]
    except StoreUnavailable:
        return False
    return True


@pytest.mark.parametrize("server_got_it", [True, False], ids=["committed", "lost"])
async def test_commit_without_answer_is_unavailable_within_the_timeout(
        store: Store, pg_black_hole: tuple[BlackHole, str], server_got_it: bool) -> None:
    """The COMMIT reaches the server (which commits) or not, and no answer comes back:
    the caller hears `unavailable` after one timeout, not after the in-doubt wait; once
    the server answers again, a batch that did commit is taken back (persistence/
    postgres.py `_compensate`), so `unavailable` still means "not stored"."""
    proxy, _ = pg_black_hole
    proxy.hole_on, proxy.forward_trigger = b"COMMIT", server_got_it
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await store.enqueue(msg(1), 100)
    assert time.monotonic() - started <= T + timeout(MARGIN_S)
    assert store.in_doubt == 1  # type: ignore[attr-defined]
    proxy.heal()
    await eventually(lambda: _ok(store.ping()), wait=5 * T)
    await eventually(lambda: _none_pending(store), wait=10 * T)
    await store.enqueue(msg(2), 100)  # and the store goes on
    assert await pending(store) == [msg(2).mid]


async def _none_pending(store: Store) -> bool:
    try:
        return await pending(store) == []
    except StoreUnavailable:
        return False
