"""The `Store` conformance suite: the guarantees of `persistence/store.py`, per backend.

Every test takes `store` (each backend of `STORE_PARAMS` in conftest.py) or `any_store`
(those plus SQLite `:memory:`). A backend is done when this file passes against it. The
last section tests what only the SQLite backend has (URL forms, its lock handling).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from openred.persistence.backends import open_store
from openred.persistence.sqlite import SqliteStore, parse_sqlite_url
from openred.persistence.store import (
    AckResult,
    HistoryEntry,
    QueueFull,
    Store,
    StoredMessage,
    StoreError,
    StoreUnavailable,
    outcomes_of,
)

from tests.conftest import timeout

if TYPE_CHECKING:
    from tests.persistence.conftest import StoreFactory

NOW = 1_700_000_000_000  # ms
SECOND_MS = 1_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
REPO = Path(__file__).resolve().parents[2]


def msg(i: int, to: str = "bob", frm: str = "alice", *, ttl_ms: int = DAY_MS,
        created: int = NOW, receipt: bool = False, sig: bytes | None = None) -> StoredMessage:
    return StoredMessage(mid=f"m{i:08d}.{to}", sender=frm, recipient=to,
                         body=f"body {i}".encode(), created=created, expires=created + ttl_ms,
                         sig=sig, receipt=receipt)


def commits(store: Store) -> int:
    """Transactions committed so far: every backend exposes `commits` (conftest.py)."""
    value: Any = getattr(store, "commits")  # noqa: B009 - not part of the Store protocol
    return int(value)


async def mids_pending(store: Store, node: str, now: int = NOW, limit: int = 100_000) -> list[str]:
    return [m.mid for m in await store.pending(node, now, None, limit)]


# -- nodes ------------------------------------------------------------------------------


async def test_get_node_unknown_is_none(store: Store) -> None:
    assert await store.get_node("nobody") is None


async def test_node_seen_creates_then_updates(any_store: Store) -> None:
    store = any_store
    await store.node_seen("alice", b"k1", {"v": 1}, NOW)
    node = await store.get_node("alice")
    assert node is not None
    assert (node.key, node.meta, node.first_seen, node.last_seen) == (b"k1", {"v": 1}, NOW, NOW)
    assert not node.banned and not node.registered

    # key and meta not given: kept; last_seen moves, first_seen does not.
    await store.node_seen("alice", None, None, NOW + 5)
    node = await store.get_node("alice")
    assert node is not None
    assert (node.key, node.meta, node.first_seen, node.last_seen) == (b"k1", {"v": 1}, NOW,
                                                                      NOW + 5)

    await store.node_seen("alice", b"k2", {"v": 2}, NOW + 9)
    node = await store.get_node("alice")
    assert node is not None
    assert (node.key, node.meta, node.last_seen) == (b"k2", {"v": 2}, NOW + 9)


async def test_session_start_sees_the_node_and_counts_its_queue(any_store: Store) -> None:
    store = any_store
    rec, pending = await store.session_start("alice", b"k1", {"v": 1}, NOW)
    assert (rec, pending) == (None, 0)  # unknown until now: created
    node = await store.get_node("alice")
    assert node is not None
    assert (node.key, node.meta, node.first_seen, node.last_seen) == (b"k1", {"v": 1}, NOW, NOW)

    # The count sees the enqueues submitted before it (same batch or not); the record
    # returned is the one before this call; key and meta not given are kept.
    results = await asyncio.gather(store.enqueue(msg(1, to="alice"), 10),
                                   store.enqueue(msg(2, to="alice"), 10),
                                   store.session_start("alice", None, None, NOW + 5))
    rec, pending = results[2]
    assert rec is not None and (rec.key, rec.last_seen) == (b"k1", NOW)
    assert pending == 2
    node = await store.get_node("alice")
    assert node is not None
    assert (node.key, node.meta, node.first_seen, node.last_seen) == (b"k1", {"v": 1}, NOW,
                                                                      NOW + 5)
    # The same node twice in one batch: both answered, the later time kept.
    both = await asyncio.gather(store.session_start("alice", b"k2", None, NOW + 6),
                                store.session_start("alice", None, {"v": 3}, NOW + 7))
    assert [p for _, p in both] == [2, 2]
    node = await store.get_node("alice")
    assert node is not None and (node.key, node.meta, node.last_seen) == (b"k2", {"v": 3},
                                                                          NOW + 7)


async def test_session_start_leaves_banned_and_unregistered_nodes_unseen(any_store: Store
                                                                         ) -> None:
    store = any_store
    await store.node_seen("mallory", b"k", None, NOW)
    await store.set_banned("mallory", True, NOW + 1)
    rec, _ = await store.session_start("mallory", b"other", None, NOW + 5)
    assert rec is not None and rec.banned
    node = await store.get_node("mallory")
    assert node is not None and (node.key, node.last_seen) == (b"k", NOW)

    # Allowlist mode: a stranger is not created, a registered node is seen.
    rec, pending = await store.session_start("stranger", b"k", None, NOW,
                                             registered_only=True)
    assert (rec, pending) == (None, 0) and await store.get_node("stranger") is None
    await store.put_node("member", {}, b"k", NOW)
    rec, _ = await store.session_start("member", None, None, NOW + 3, registered_only=True)
    assert rec is not None and rec.registered
    node = await store.get_node("member")
    assert node is not None and node.last_seen == NOW + 3


async def test_put_node_created_flag(store: Store) -> None:
    node, created = await store.put_node("alice", {"team": "a"}, b"key", NOW)
    assert created
    assert node.registered and node.meta == {"team": "a"} and node.key == b"key"

    node, created = await store.put_node("alice", {"team": "b"}, None, NOW + 1)
    assert not created
    assert node.meta == {"team": "b"}
    assert node.key == b"key"  # an omitted key keeps the known one
    assert node.first_seen == NOW
    assert await store.get_node("alice") == node


async def test_put_node_on_a_node_already_seen(store: Store) -> None:
    await store.node_seen("bob", b"kb", None, NOW)
    node, created = await store.put_node("bob", {"x": [1, 2]}, None, NOW + 10)
    assert not created
    assert node.registered and node.key == b"kb" and node.meta == {"x": [1, 2]}
    assert node.first_seen == NOW


async def test_set_banned_creates_unknown_node(store: Store) -> None:
    node = await store.set_banned("mallory", True, NOW)
    assert node.id == "mallory" and node.banned and not node.registered
    assert await store.get_node("mallory") == node

    # The ban survives the node's first authentication.
    await store.node_seen("mallory", b"km", None, NOW + 1)
    seen = await store.get_node("mallory")
    assert seen is not None and seen.banned

    node = await store.set_banned("mallory", False, NOW + 2)
    assert not node.banned and node.key == b"km"


async def test_list_nodes_paginates_by_id(store: Store) -> None:
    ids = [f"node-{i:02d}" for i in range(25)]
    for node_id in reversed(ids):
        await store.node_seen(node_id, None, None, NOW)
    seen: list[str] = []
    after: str | None = None
    pages = 0
    while True:
        page = await store.list_nodes(10, after)
        if not page:
            break
        pages += 1
        assert len(page) <= 10
        seen.extend(n.id for n in page)
        after = page[-1].id
    assert seen == ids
    assert pages == 3
    assert [n.id for n in await store.list_nodes(3, "node-10")] == ["node-11", "node-12",
                                                                     "node-13"]


# -- QoS 1 queues ---------------------------------------------------------------------------


async def test_enqueue_then_pending_keeps_order_of_1000(any_store: Store) -> None:
    store = any_store
    sent = [msg(i) for i in range(1000)]
    for m in sent:
        await store.enqueue(m, 100_000)
    assert await store.pending("bob", NOW, None, 2000) == sent
    assert await store.count_pending("bob", NOW) == 1000
    assert await store.pending("alice", NOW, None, 10) == []


async def test_pending_pages_after_mid(store: Store) -> None:
    sent = [msg(i) for i in range(50)]
    for m in sent:
        await store.enqueue(m, 1000)
    # Interleave another recipient: it must not disturb bob's pages.
    await store.enqueue(msg(0, to="carol"), 1000)
    got: list[StoredMessage] = []
    after: str | None = None
    while page := await store.pending("bob", NOW, after, 7):
        assert len(page) <= 7
        got.extend(page)
        after = page[-1].mid
    assert got == sent
    # Acked messages drop out of the pages, but still mark a position.
    await store.ack("bob", [sent[10].mid, sent[11].mid], NOW)
    page = await store.pending("bob", NOW, sent[9].mid, 3)
    assert [m.mid for m in page] == [sent[12].mid, sent[13].mid, sent[14].mid]
    page = await store.pending("bob", NOW, sent[10].mid, 1)
    assert [m.mid for m in page] == [sent[12].mid]


async def test_count_pending_skips_acked_and_expired(store: Store) -> None:
    await store.enqueue(msg(1), 10)
    await store.enqueue(msg(2, ttl_ms=SECOND_MS), 10)
    await store.enqueue(msg(3), 10)
    assert await store.count_pending("bob", NOW) == 3
    await store.ack("bob", [msg(1).mid], NOW)
    assert await store.count_pending("bob", NOW) == 2
    assert await store.count_pending("bob", NOW + SECOND_MS) == 1
    assert await store.count_pending("nobody", NOW) == 0


async def test_pending_total_and_pool_usage(store: Store) -> None:
    """The backlog gauge and the pool gauges of hub/metrics.py."""
    assert await store.pending_total(NOW) == 0
    await store.enqueue(msg(1), 10)
    await store.enqueue(msg(2, ttl_ms=SECOND_MS), 10)
    await store.enqueue(msg(3, to="carol"), 10)
    await store.ack("bob", [msg(1).mid], NOW)
    assert await store.pending_total(NOW) == 2  # acked left, every recipient counted
    assert await store.pending_total(NOW + SECOND_MS) == 1  # expired left
    in_use, size = store.pool_usage()
    assert size >= 1 and 0 <= in_use <= size


async def test_queue_full_at_the_bound(store: Store) -> None:
    for i in range(5):
        await store.enqueue(msg(i), 5)
    with pytest.raises(QueueFull):
        await store.enqueue(msg(5), 5)
    # Other recipients are unaffected.
    await store.enqueue(msg(5, to="carol"), 5)
    assert await mids_pending(store, "bob") == [msg(i).mid for i in range(5)]
    # Acking one makes room again.
    await store.ack("bob", [msg(0).mid], NOW)
    await store.enqueue(msg(6), 5)
    with pytest.raises(QueueFull):
        await store.enqueue(msg(7), 5)


async def test_queue_full_ignores_expired(store: Store) -> None:
    await store.enqueue(msg(1, ttl_ms=10), 2)
    await store.enqueue(msg(2, ttl_ms=10), 2)
    with pytest.raises(QueueFull):
        await store.enqueue(msg(3), 2)
    await store.enqueue(msg(3, created=NOW + 10), 2)


async def test_queue_full_is_exact_across_acks_expiry_and_clock(store: Store) -> None:
    # An ack of a message that had already expired frees no room.
    await store.enqueue(msg(1, ttl_ms=10), 2)
    await store.enqueue(msg(2, created=NOW + 20), 2)
    assert await store.ack("bob", [msg(1).mid], NOW + 20) != []
    await store.enqueue(msg(3, created=NOW + 20), 2)
    with pytest.raises(QueueFull):
        await store.enqueue(msg(4, created=NOW + 20), 2)
    # A clock that steps back sees messages unexpired again.
    await store.enqueue(msg(1, to="carol", ttl_ms=50), 2)
    await store.enqueue(msg(2, to="carol", created=NOW + 100), 2)
    with pytest.raises(QueueFull):
        await store.enqueue(msg(3, to="carol", created=NOW), 2)
    # Housekeeping changes nothing of the count.
    assert await store.purge_expired(NOW + 100) == 2  # bob's acked-expired, carol's 1
    with pytest.raises(QueueFull):
        await store.enqueue(msg(5, created=NOW + 100), 2)
    await store.enqueue(msg(3, to="carol", created=NOW + 100), 2)


async def test_queue_full_fails_only_that_caller_of_a_batch(store: Store) -> None:
    for i in range(3):
        await store.enqueue(msg(i), 3)
    calls = [store.enqueue(msg(10 + i, to="carol"), 3) for i in range(3)]
    calls.insert(1, store.enqueue(msg(3), 3))
    calls.append(store.enqueue(msg(4), 3))
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert [type(r) for r in results] == [type(None), QueueFull, type(None), type(None),
                                          QueueFull]
    assert await mids_pending(store, "carol") == [msg(10 + i, to="carol").mid for i in range(3)]
    assert await mids_pending(store, "bob") == [msg(i).mid for i in range(3)]


async def test_ack_only_by_the_recipient(store: Store) -> None:
    m = msg(1, to="bob", frm="alice")
    await store.enqueue(m, 10)
    assert await store.ack("carol", [m.mid], NOW) == []  # not addressed to carol
    assert await store.ack("alice", [m.mid], NOW) == []  # nor to its sender
    assert await store.ack("bob", ["no-such-mid"], NOW) == []
    assert await mids_pending(store, "bob") == [m.mid]
    state = await store.message_state(m.mid, NOW)
    assert state is not None and state.state == "stored"

    assert await store.ack("bob", ["no-such-mid", m.mid], NOW) == [
        AckResult(mid=m.mid, sender="alice", receipt=False)
    ]
    assert await mids_pending(store, "bob") == []


async def test_ack_returns_each_message_once(any_store: Store) -> None:
    store = any_store
    a, b = msg(1), msg(2)
    await store.enqueue(a, 10)
    await store.enqueue(b, 10)
    first = await store.ack("bob", [a.mid, a.mid, b.mid], NOW)
    assert [r.mid for r in first] == [a.mid, b.mid]
    assert await store.ack("bob", [a.mid, b.mid], NOW + 1) == []
    assert await store.ack("bob", [], NOW + 1) == []


async def test_ack_of_many_mids_in_their_order(any_store: Store) -> None:
    """An ack frame may name hundreds of mids (more than one statement's worth),
    repeats and mids of another recipient among them: each acked once, in the frame's
    order."""
    store = any_store
    mine = [msg(i) for i in range(600)]
    theirs = msg(900, to="carol")
    await asyncio.gather(*(store.enqueue(m, 1000) for m in [*mine, theirs]))
    named = [m.mid for m in reversed(mine)] + [theirs.mid, mine[5].mid, "no-such-mid"]
    acked = await store.ack("bob", named, NOW + 1)
    assert [r.mid for r in acked] == [m.mid for m in reversed(mine)]
    assert await store.count_pending("bob", NOW + 2) == 0
    assert await store.count_pending("carol", NOW + 2) == 1


async def test_receipt_and_sig_round_trip(store: Store) -> None:
    signed = msg(1, receipt=True, sig=bytes(range(64)))
    plain = msg(2)
    await store.enqueue(signed, 10)
    await store.enqueue(plain, 10)
    assert await store.pending("bob", NOW, None, 10) == [signed, plain]
    assert await store.ack("bob", [signed.mid, plain.mid], NOW) == [
        AckResult(mid=signed.mid, sender="alice", receipt=True),
        AckResult(mid=plain.mid, sender="alice", receipt=False),
    ]


async def test_ttl_expiry(store: Store) -> None:
    m = msg(1, ttl_ms=SECOND_MS)
    await store.enqueue(m, 10)
    assert await mids_pending(store, "bob", NOW + SECOND_MS - 1) == [m.mid]
    assert await mids_pending(store, "bob", NOW + SECOND_MS) == []
    assert await store.count_pending("bob", NOW + SECOND_MS) == 0
    state = await store.message_state(m.mid, NOW + SECOND_MS)
    assert state is not None and state.state == "expired"


async def test_message_state_stored_delivered_acked(store: Store) -> None:
    m = msg(1)
    assert await store.message_state(m.mid, NOW) is None
    await store.enqueue(m, 10)
    state = await store.message_state(m.mid, NOW)
    assert state is not None
    assert (state.state, state.qos, state.sender, state.recipient, state.created) == (
        "stored", 1, "alice", "bob", NOW)
    assert state.delivered is None and state.acked is None

    # Best effort, batched: it lands with the next commit.
    store.mark_delivered_nowait([m.mid, "no-such-mid"], NOW + 5)
    await store.ping()
    state = await store.message_state(m.mid, NOW + 6)
    assert state is not None and (state.state, state.delivered) == ("delivered", NOW + 5)

    await store.ack("bob", [m.mid], NOW + 9)
    state = await store.message_state(m.mid, NOW + 10)
    assert state is not None
    assert (state.state, state.delivered, state.acked) == ("acked", NOW + 5, NOW + 9)
    # Acked wins over expired.
    state = await store.message_state(m.mid, NOW + 2 * DAY_MS)
    assert state is not None and state.state == "acked"


async def test_ack_without_delivered_mark_reads_delivered(store: Store) -> None:
    m = msg(1)
    await store.enqueue(m, 10)
    await store.ack("bob", [m.mid], NOW + 3)
    state = await store.message_state(m.mid, NOW + 3)
    assert state is not None and (state.state, state.delivered, state.acked) == (
        "acked", NOW + 3, NOW + 3)


async def test_purge_expired(store: Store) -> None:
    week = 7 * DAY_MS
    expired = msg(1, ttl_ms=SECOND_MS)
    acked_long_ago = msg(2, ttl_ms=week)
    unacked = msg(3, ttl_ms=week)
    acked_recently = msg(4, ttl_ms=week)
    for m in (expired, acked_long_ago, unacked, acked_recently):
        await store.enqueue(m, 10)
    await store.ack("bob", [acked_long_ago.mid], NOW)
    await store.ack("bob", [acked_recently.mid], NOW + DAY_MS)
    purged = await store.purge_expired(NOW + DAY_MS + SECOND_MS)
    assert purged == 2
    assert await store.message_state(expired.mid, NOW) is None
    assert await store.message_state(acked_long_ago.mid, NOW) is None
    assert await store.message_state(acked_recently.mid, NOW) is not None
    assert await mids_pending(store, "bob", NOW + DAY_MS + SECOND_MS) == [unacked.mid]
    assert await store.purge_expired(NOW + DAY_MS + SECOND_MS) == 0


async def test_concurrent_writers_are_group_committed(store: Store) -> None:
    before = commits(store)

    async def writer(t: int) -> None:
        for i in range(100):
            await store.enqueue(msg(i, to=f"node-{t:02d}"), 1000)

    await asyncio.gather(*(writer(t) for t in range(50)))
    made = commits(store) - before
    # 5,000 awaited enqueues; with 50 writers in flight a commit carries many of them.
    assert 0 < made <= 5000 // 5
    for t in range(50):
        node = f"node-{t:02d}"
        assert await mids_pending(store, node) == [msg(i, to=node).mid for i in range(100)]


async def test_nowait_calls_ride_with_one_commit(store: Store) -> None:
    await store.enqueue(msg(1), 10)
    before = commits(store)
    for i in range(200):
        store.mark_delivered_nowait([msg(1).mid], NOW + i)
        store.audit_nowait("admin_call", None, None, {"i": i}, NOW + i)
    await store.ping()
    assert commits(store) - before <= 2  # not one per call
    state = await store.message_state(msg(1).mid, NOW)
    assert state is not None and state.delivered == NOW  # the first delivery time
    assert len(await store.audit_query(None, "admin_call", None, 1000, None)) == 200


# -- durability -------------------------------------------------------------------------------


async def test_state_survives_close_and_reopen(store_factory: StoreFactory) -> None:
    assert store_factory.durable  # store_factory only builds durable backends
    store = store_factory.make()
    await store.open()
    await store.put_node("alice", {"a": 1}, b"ka", NOW)
    for i in range(3):
        await store.enqueue(msg(i), 10)
    await store.ack("bob", [msg(0).mid], NOW)
    for _ in range(7):  # the store numbers them: 1..7
        await store.append_history(HistoryEntry("t", 0, "h7", "alice", b"x", NOW), 1, HOUR_MS)
    store.audit_nowait("ban", "alice", "127.0.0.1", {"by": "op"}, NOW)
    await store.close()  # flushes the audit event

    again = store_factory.make()
    await again.open()
    try:
        node = await again.get_node("alice")
        assert node is not None and node.meta == {"a": 1} and node.key == b"ka"
        assert await again.pending("bob", NOW, None, 10) == [msg(1), msg(2)]
        state = await again.message_state(msg(0).mid, NOW)
        assert state is not None and state.state == "acked"
        assert await again.last_seq("t") == 7
        assert [e.seq for e in await again.history_since("t", 0, NOW, HOUR_MS)] == [7]
        [event] = await again.audit_query(None, None, None, 10, None)
        assert (event.kind, event.node, event.ip, event.detail) == ("ban", "alice",
                                                                    "127.0.0.1", {"by": "op"})
        assert await again.migrate() == []
    finally:
        await again.close()


_WRITER = r"""
import asyncio, sys
from openred.persistence.backends import open_store
from openred.persistence.store import StoredMessage

async def main() -> None:
    store = open_store(sys.argv[1])
    await store.open()
    i = 0
    while True:
        mid = f"k{i:08d}"
        await store.enqueue(StoredMessage(mid=mid, sender="a", recipient="b", body=b"x",
                                          created=1, expires=2**62), 10**9)
        print(mid, flush=True)  # "ok stored" goes out only now
        i += 1

asyncio.run(main())
"""


async def test_enqueued_message_survives_a_killed_process(store_factory: StoreFactory) -> None:
    assert store_factory.durable  # store_factory only builds durable backends
    # Create the schema first so the writer starts enqueueing at once.
    store = store_factory.make()
    await store.open()
    await store.close()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WRITER, store_factory.url, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    acknowledged: list[str] = []
    try:
        async with asyncio.timeout(timeout(60)):
            while len(acknowledged) < 300:
                line = await proc.stdout.readline()
                assert line, "writer exited early"
                acknowledged.append(line.decode().strip())
    finally:
        proc.kill()  # SIGKILL: no close(), no flush
        rest, _ = await proc.communicate()
    acknowledged.extend(rest.decode().split())

    store = store_factory.make()
    await store.open()
    try:
        kept = set(await mids_pending(store, "b", now=2))
        assert set(acknowledged) <= kept
    finally:
        await store.close()


# -- topic history ------------------------------------------------------------------------------


def entry(seq: int, topic: str = "news", ts: int = NOW) -> HistoryEntry:
    return HistoryEntry(topic=topic, seq=seq, mid=f"h{seq}", sender="alice",
                        body=f"pub {seq}".encode(), ts=ts)


async def test_history_trimmed_to_keep(any_store: Store) -> None:
    store = any_store
    for seq in range(1, 11):
        await store.append_history(entry(seq), 3, HOUR_MS)
    assert await store.history_since("news", 0, NOW, HOUR_MS) == [entry(8), entry(9), entry(10)]
    assert await store.last_seq("news") == 10


async def test_history_since_filters_by_seq(store: Store) -> None:
    for seq in range(1, 6):
        await store.append_history(entry(seq), 100, HOUR_MS)
    await store.append_history(entry(1, topic="other"), 100, HOUR_MS)
    assert [e.seq for e in await store.history_since("news", 3, NOW, HOUR_MS)] == [4, 5]
    assert await store.history_since("news", 5, NOW, HOUR_MS) == []
    assert await store.history_since("nothing", 0, NOW, HOUR_MS) == []
    assert await store.history_since("other", 0, NOW, HOUR_MS) == [entry(1, topic="other")]


async def test_history_ttl(store: Store) -> None:
    await store.append_history(entry(1, ts=NOW - 2 * HOUR_MS), 100, HOUR_MS)
    await store.append_history(entry(2, ts=NOW - HOUR_MS // 2), 100, HOUR_MS)
    await store.append_history(entry(3, ts=NOW), 100, HOUR_MS)
    assert [e.seq for e in await store.history_since("news", 0, NOW, HOUR_MS)] == [2, 3]
    # Entries older than the ttl are not returned even before a trim removes them.
    later = NOW + HOUR_MS // 2 + 1
    assert [e.seq for e in await store.history_since("news", 0, later, HOUR_MS)] == [3]
    assert await store.last_seq("news") == 3


async def test_last_seq_survives_trimming_and_keep_zero(store: Store) -> None:
    assert await store.last_seq("news") == 0
    for seq in range(1, 4):
        await store.append_history(entry(seq), 0, HOUR_MS)
    assert await store.history_since("news", 0, NOW, HOUR_MS) == []
    assert await store.last_seq("news") == 3

    await store.append_history(entry(4), 5, HOUR_MS)
    assert [e.seq for e in await store.history_since("news", 0, NOW, HOUR_MS)] == [4]
    await store.append_history(entry(5), 0, HOUR_MS)  # history turned off: entries go
    assert await store.history_since("news", 0, NOW, HOUR_MS) == []
    assert await store.last_seq("news") == 5
    # The store numbers: an entry's own seq is ignored, and the sequence never goes back.
    assert await store.append_history(entry(2, topic="news"), 0, HOUR_MS) == 6
    assert await store.last_seq("news") == 6


async def test_append_history_numbers_each_topic_in_call_order(store: Store) -> None:
    """docs/protocol.md §6: the store takes the topic's next seq in the transaction that
    keeps the entry, so concurrent appends get 1, 2, 3, ... with no gap or repeat."""
    seqs = await asyncio.gather(*(store.append_history(entry(0, topic=t), 100, HOUR_MS)
                                  for t in ["a", "b", "a", "a", "b"] * 20))
    by_topic: dict[str, list[int]] = {"a": [], "b": []}
    for t, seq in zip(["a", "b", "a", "a", "b"] * 20, seqs, strict=True):
        by_topic[t].append(seq)
    assert by_topic["a"] == list(range(1, 61)) and by_topic["b"] == list(range(1, 41))
    assert [e.seq for e in await store.history_since("a", 58, NOW, HOUR_MS)] == [59, 60]
    assert await store.last_seq("a") == 60


async def test_history_appends_are_group_committed_in_order(store: Store) -> None:
    before = commits(store)
    await asyncio.gather(*(store.append_history(entry(seq), 50, HOUR_MS)
                           for seq in range(1, 201)))
    assert commits(store) - before < 200
    assert [e.seq for e in await store.history_since("news", 0, NOW, HOUR_MS)] == list(
        range(151, 201))
    assert await store.last_seq("news") == 200


# -- audit --------------------------------------------------------------------------------------


async def test_audit_nowait_then_query_with_filters(any_store: Store) -> None:
    store = any_store
    store.audit_nowait("auth_ok", "alice", "10.0.0.1", {"mode": "open"}, NOW)
    store.audit_nowait("auth_failed", "bob", "10.0.0.2", {"reason": "bad_sig"}, NOW + 1)
    store.audit_nowait("ban", "alice", None, {}, NOW + 2)
    store.audit_nowait("kick", None, None, {"by": ["admin", 1]}, NOW + 3)

    events = await store.audit_query(None, None, None, 100, None)
    assert [e.kind for e in events] == ["kick", "ban", "auth_failed", "auth_ok"]
    assert events[0].id > events[1].id > events[2].id > events[3].id
    assert (events[3].ts, events[3].node, events[3].ip, events[3].detail) == (
        NOW, "alice", "10.0.0.1", {"mode": "open"})
    assert events[0].detail == {"by": ["admin", 1]} and events[0].node is None

    assert [e.kind for e in await store.audit_query("alice", None, None, 100, None)] == [
        "ban", "auth_ok"]
    assert [e.kind for e in await store.audit_query(None, "auth_failed", None, 100, None)] == [
        "auth_failed"]
    assert [e.kind for e in await store.audit_query(None, None, NOW + 2, 100, None)] == [
        "kick", "ban"]
    assert await store.audit_query("alice", "kick", None, 100, None) == []

    first = await store.audit_query(None, None, None, 2, None)
    second = await store.audit_query(None, None, None, 2, first[-1].id)
    assert [e.kind for e in first + second] == ["kick", "ban", "auth_failed", "auth_ok"]
    assert await store.audit_query(None, None, None, 2, second[-1].id) == []


async def test_audit_nowait_never_raises_on_odd_detail(store: Store) -> None:
    circular: dict[str, Any] = {}
    circular["self"] = circular
    store.audit_nowait("admin_call", None, None, {"when": object()}, NOW)
    store.audit_nowait("admin_call", None, None, circular, NOW)
    # The odd value is recorded as text; the circular one is dropped (and counted).
    events = await store.audit_query(None, "admin_call", None, 10, None)
    assert [list(e.detail) for e in events] == [["when"]]


# -- delivery hints -------------------------------------------------------------------------------


async def test_undelivered_marks_one_row_per_recipient(store: Store) -> None:
    """One row per recipient: `since` kept from the first mark, `mark` replaced (also
    within one call), oldest `since` first, bounded by `limit`."""
    assert await store.undelivered(10) == []
    await store.mark_undelivered([("bob", "m1"), ("carol", "m2")], NOW)
    await store.mark_undelivered([("bob", "m3"), ("dave", "m4"), ("dave", "m5")], NOW + 5)
    rows = await store.undelivered(10)
    assert [(u.recipient, u.since, u.mark) for u in rows] == [
        ("bob", NOW, "m3"), ("carol", NOW, "m2"), ("dave", NOW + 5, "m5")]
    assert [u.recipient for u in await store.undelivered(2)] == ["bob", "carol"]
    await store.mark_undelivered([], NOW)  # nothing to do, not an error


async def test_undelivered_clear_needs_the_mark_read(store: Store) -> None:
    """A row is cleared only with the mark that was read: a recipient marked again after
    the read (a message stored after the hint went out) keeps its row."""
    await store.mark_undelivered([("bob", "m1"), ("carol", "m2")], NOW)
    read = [(u.recipient, u.mark) for u in await store.undelivered(10)]
    await store.mark_undelivered([("carol", "m9")], NOW + 1)
    assert await store.clear_undelivered(read) == 1
    rows = await store.undelivered(10)
    assert [(u.recipient, u.since, u.mark) for u in rows] == [("carol", NOW, "m9")]
    assert await store.clear_undelivered([("carol", "m2"), ("nobody", "m1")]) == 0
    assert await store.clear_undelivered([("carol", "m9")]) == 1
    assert await store.undelivered(10) == []
    assert await store.clear_undelivered([]) == 0


async def test_undelivered_marks_survive_a_reopen(store_factory: StoreFactory) -> None:
    """Durable before return: what another process (a restarted hub) finds."""
    store = store_factory.make()
    await store.open()
    try:
        await store.mark_undelivered([("bob", "m1")], NOW)
    finally:
        await store.close()
    again = store_factory.make()
    await again.open()
    try:
        assert [(u.recipient, u.mark) for u in await again.undelivered(10)] == [("bob", "m1")]
    finally:
        await again.close()


# -- migrations and lifecycle ---------------------------------------------------------------------


async def test_migrate_is_idempotent(store: Store) -> None:
    assert await store.migrate() == []
    assert await store.migrate() == []


async def test_migrate_before_open_then_open(store_factory: StoreFactory) -> None:
    store = store_factory.make(auto_migrate=False)
    try:
        applied = await store.migrate()
        assert applied and applied == sorted(applied)
        assert applied[0].startswith("0001_")
        assert await store.migrate() == []
        await store.open()
        await store.ping()
    finally:
        await store.close()


async def test_open_refuses_pending_migrations_without_auto_migrate(
        store_factory: StoreFactory) -> None:
    store = store_factory.make(auto_migrate=False)
    with pytest.raises(StoreError, match="openred-hub migrate"):
        await store.open()
    with pytest.raises(StoreUnavailable):
        await store.ping()


async def test_changed_migration_is_refused(store_factory: StoreFactory) -> None:
    assert store_factory.durable  # store_factory only builds durable backends
    migrations = store_factory.copy_migrations()
    store = store_factory.make(migrations_dir=migrations)
    await store.open()
    await store.close()

    first = sorted(migrations.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited after it was applied\n")
    changed = store_factory.make(migrations_dir=migrations)
    with pytest.raises(StoreError, match="checksum"):
        await changed.open()


async def test_new_migration_is_applied_on_open(store_factory: StoreFactory) -> None:
    assert store_factory.durable  # store_factory only builds durable backends
    migrations = store_factory.copy_migrations()
    store = store_factory.make(migrations_dir=migrations)
    await store.open()
    await store.close()

    (migrations / "9999_extra.sql").write_text(
        "-- a later migration\nCREATE TABLE extra_test (x INTEGER);\n")
    store = store_factory.make(auto_migrate=False, migrations_dir=migrations)
    with pytest.raises(StoreError, match="9999_extra"):
        await store.open()
    store = store_factory.make(migrations_dir=migrations)
    await store.open()
    try:
        assert await store.migrate() == []
    finally:
        await store.close()


async def test_closed_store_raises_unavailable(store_factory: StoreFactory) -> None:
    store = store_factory.make()
    with pytest.raises(StoreUnavailable):
        await store.ping()  # not open yet
    await store.open()
    await store.close()
    calls = [
        store.ping(),
        store.migrate(),
        store.get_node("a"),
        store.node_seen("a", None, None, NOW),
        store.put_node("a", {}, None, NOW),
        store.set_banned("a", True, NOW),
        store.list_nodes(10, None),
        store.enqueue(msg(1), 10),
        store.pending("bob", NOW, None, 10),
        store.count_pending("bob", NOW),
        store.ack("bob", ["x"], NOW),
        store.ack("bob", [], NOW),
        store.message_state("x", NOW),
        store.purge_expired(NOW),
        store.mark_undelivered([("bob", "m1")], NOW),
        store.mark_undelivered([], NOW),
        store.undelivered(10),
        store.clear_undelivered([("bob", "m1")]),
        store.clear_undelivered([]),
        store.append_history(entry(1), 10, HOUR_MS),
        store.history_since("news", 0, NOW, HOUR_MS),
        store.last_seq("news"),
        store.audit_query(None, None, None, 10, None),
    ]
    for call in calls:
        with pytest.raises(StoreUnavailable):
            await call
    # Fire-and-forget calls never raise.
    store.mark_delivered_nowait(["x"], NOW)
    store.audit_nowait("kick", "a", None, {}, NOW)
    await store.close()  # closing twice is fine


async def _delivered_seen_by_another(store_factory: StoreFactory, mid: str) -> int | None:
    """The delivered time of `mid` as another store on the same database reads it: what
    is written, not what `store` holds in memory."""
    other = store_factory.make()
    await other.open()
    try:
        state = await other.message_state(mid, NOW + 2)
        assert state is not None
        return state.delivered
    finally:
        await other.close()


async def test_delivered_mark_is_written_by_the_ack(store: Store,
                                                    store_factory: StoreFactory) -> None:
    """A mark is held (DeliveredMarks); the ack that follows writes it in its own row
    update, with the time of the mark, not of the ack."""
    store.delivered_marks.hold_s = 60.0  # type: ignore[attr-defined]
    await store.enqueue(msg(1), 10)
    store.mark_delivered_nowait([msg(1).mid], NOW + 1)
    await store.enqueue(msg(2), 10)  # a commit after the mark: it is still held
    assert await _delivered_seen_by_another(store_factory, msg(1).mid) is None
    state = await store.message_state(msg(1).mid, NOW + 2)  # this instance knows
    assert state is not None and (state.state, state.delivered) == ("delivered", NOW + 1)
    assert [r.mid for r in await store.ack("bob", [msg(1).mid], NOW + 7)] == [msg(1).mid]
    assert len(store.delivered_marks) == 0  # type: ignore[attr-defined]
    assert await _delivered_seen_by_another(store_factory, msg(1).mid) == NOW + 1


async def test_held_delivered_mark_is_written_after_hold_s(
        store: Store, store_factory: StoreFactory) -> None:
    store.delivered_marks.hold_s = 0.3  # type: ignore[attr-defined]
    await store.enqueue(msg(1), 10)
    store.mark_delivered_nowait([msg(1).mid], NOW + 1)
    await asyncio.sleep(0.1)
    assert await _delivered_seen_by_another(store_factory, msg(1).mid) is None
    # No other call: the writer wakes for the due mark by itself.
    deadline = asyncio.get_running_loop().time() + 5
    while await _delivered_seen_by_another(store_factory, msg(1).mid) is None:
        assert asyncio.get_running_loop().time() < deadline, "mark never written"
        await asyncio.sleep(0.05)
    assert await _delivered_seen_by_another(store_factory, msg(1).mid) == NOW + 1


async def test_held_delivered_marks_are_bounded(store: Store,
                                                store_factory: StoreFactory) -> None:
    """Past max_held, the oldest marks are written with the next commit."""
    marks = store.delivered_marks  # type: ignore[attr-defined]
    marks.hold_s, marks.max_held = 60.0, 2
    for i in range(4):
        await store.enqueue(msg(i), 10)
    store.mark_delivered_nowait([msg(i).mid for i in range(4)], NOW + 1)
    # The next commit (PostgreSQL: of the acks' lane, where the marks are held); an ack
    # of no message changes nothing else.
    assert await store.ack("carol", ["no such mid"], NOW + 1) == []
    assert len(marks) == 2
    seen = [await _delivered_seen_by_another(store_factory, msg(i).mid) for i in range(4)]
    assert seen == [NOW + 1, NOW + 1, None, None]


async def test_an_ack_by_another_node_keeps_the_delivered_mark(
        store: Store, store_factory: StoreFactory) -> None:
    """The ack writes the held mark only if it acks the message: carol's ack of bob's
    message acks nothing, and the mark stays for bob's."""
    await store.enqueue(msg(0), 10)
    store.mark_delivered_nowait([msg(0).mid], NOW + 1)
    assert await store.ack("carol", [msg(0).mid], NOW + 2) == []
    await store.ping()  # the flush: held marks are written
    assert await _delivered_seen_by_another(store_factory, msg(0).mid) == NOW + 1
    state = await store.message_state(msg(0).mid, NOW + 3)
    assert state is not None and (state.state, state.delivered) == ("delivered", NOW + 1)


async def test_close_flushes_queued_work(store_factory: StoreFactory) -> None:
    assert store_factory.durable  # store_factory only builds durable backends
    store = store_factory.make()
    await store.open()
    await store.enqueue(msg(1), 10)
    store.mark_delivered_nowait([msg(1).mid], NOW + 1)
    store.audit_nowait("kick", "bob", None, {}, NOW + 1)
    await store.close()

    store = store_factory.make()
    await store.open()
    try:
        state = await store.message_state(msg(1).mid, NOW + 2)
        assert state is not None and state.state == "delivered"
        assert len(await store.audit_query("bob", "kick", None, 10, None)) == 1
    finally:
        await store.close()


# -- SQLite backend specifics ---------------------------------------------------------------------


@pytest.mark.parametrize(("url", "path"), [
    ("sqlite://:memory:", ":memory:"),
    ("sqlite:///hub.db", os.path.abspath("hub.db")),
    ("sqlite:///data/hub.db", os.path.abspath("data/hub.db")),
    ("sqlite:////var/lib/openred/hub.db", "/var/lib/openred/hub.db"),
])
def test_sqlite_url_forms(url: str, path: str) -> None:
    assert parse_sqlite_url(url) == path


@pytest.mark.parametrize("url", [
    "sqlite:", "sqlite:/hub.db", "sqlite://", "sqlite:///", "sqlite:////", "sqlite:///data/",
    "sqlite://host/hub.db", "sqlite:///hub.db?mode=ro", "sqlite:///hub.db#x",
    "sqlite:///:memory:", "sqlite://memory", "postgresql://localhost/db", "",
])
def test_sqlite_bad_urls_name_the_key(url: str) -> None:
    with pytest.raises(ValueError, match=r"store\.url"):
        SqliteStore(url)


def test_open_store_picks_sqlite() -> None:
    store = open_store("sqlite://:memory:", auto_migrate=False)
    assert isinstance(store, SqliteStore) and not store.auto_migrate


async def test_sqlite_unopenable_path_is_unavailable(tmp_path: Path) -> None:
    store = SqliteStore(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'hub.db'}")
    with pytest.raises(StoreUnavailable, match="cannot open"):
        await store.open()
    await store.close()


async def test_sqlite_locked_database_fails_the_batch_then_recovers(tmp_path: Path) -> None:
    db = tmp_path / "hub.db"
    store = SqliteStore(f"sqlite:///{db}")
    store.busy_timeout_ms = 50
    await store.open()
    other = sqlite3.connect(db, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        results = await asyncio.gather(*(store.enqueue(msg(i), 10) for i in range(3)),
                                       return_exceptions=True)
        assert all(isinstance(r, StoreUnavailable) for r in results)
        other.execute("ROLLBACK")
    finally:
        other.close()
    # Nothing of the failed batch was committed; the store works again.
    for i in range(3):
        await store.enqueue(msg(i), 10)
    assert await mids_pending(store, "bob") == [msg(i).mid for i in range(3)]
    await store.close()


async def test_sqlite_nowait_queue_is_bounded(tmp_path: Path) -> None:
    store = SqliteStore(f"sqlite:///{tmp_path / 'hub.db'}")
    store.max_nowait = 10
    store.nowait_linger_s = 5.0  # nothing commits until the awaited query below
    await store.open()
    try:
        for i in range(1000):
            store.audit_nowait("auth_failed", None, "10.0.0.9", {"i": i}, NOW)
        events = await store.audit_query(None, None, None, 2000, None)
        assert len(events) == 10
        assert store.nowait_dropped == 990
    finally:
        await store.close()


async def test_sqlite_memory_database_is_private_to_the_store() -> None:
    one = SqliteStore("sqlite://:memory:")
    two = SqliteStore("sqlite://:memory:")
    await one.open()
    await two.open()
    try:
        await one.enqueue(msg(1), 10)
        assert await mids_pending(one, "bob") == [msg(1).mid]
        assert await mids_pending(two, "bob") == []
    finally:
        await one.close()
        await two.close()


async def test_enqueue_many_answers_each_message(store: Store) -> None:
    """One call, one commit, an outcome per message in call order: stored (None), a
    duplicate mid refused alone, the queue bound met by the third of bob's."""
    out = await store.enqueue_many([(msg(1), 2, None, 0), (msg(1), 2, None, 0),
                                    (msg(2), 2, None, 0), (msg(3), 2, None, 0),
                                    (msg(4, to="carol"), 2, None, 0)])
    assert out[0] is None and out[2] is None and out[4] is None
    assert isinstance(out[1], StoreError) and "constraint failed" in str(out[1])
    assert isinstance(out[3], QueueFull)
    assert [m.mid for m in await store.pending("bob", NOW, None, 10)] == [msg(1).mid,
                                                                        msg(2).mid]


async def test_outcomes_of_keeps_store_errors_and_cancels_what_is_left() -> None:
    loop = asyncio.get_running_loop()
    done = [loop.create_future() for _ in range(3)]
    done[0].set_result("m1")
    done[1].set_exception(QueueFull("queue full"))
    done[2].set_result(None)
    out = await outcomes_of(done)
    assert out[0] == "m1" and isinstance(out[1], QueueFull) and out[2] is None

    bug = [loop.create_future() for _ in range(2)]
    bug[0].set_exception(RuntimeError("a bug"))
    with pytest.raises(RuntimeError):
        await outcomes_of(bug)
    assert bug[1].cancelled()

    waiting = [loop.create_future() for _ in range(3)]
    task = asyncio.ensure_future(outcomes_of(waiting))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert all(f.cancelled() for f in waiting)  # the writer skips them
