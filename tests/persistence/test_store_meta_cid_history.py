"""`Store` conformance for message meta, client message ids and history pages
(docs/protocol.md §4.1, §4.2, §5.2), on every backend of `STORE_PARAMS`.

What `persistence/store.py` promises: `meta` and a publication's `sig` are stored and
read back as given; `enqueue(..., cid=)` remembers (sender, cid) in the transaction that
stores the message, answers a repeat with the first mid without storing it (also within
one group commit, across a reopen and, on PostgreSQL, across stores sharing the
database), forgets it after its window (`purge_expired`); `history_before` pages back.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest
from openred.persistence.store import HistoryEntry, QueueFull, Store, StoredMessage

if TYPE_CHECKING:
    from tests.persistence.conftest import PostgresFactory, StoreFactory

NOW = 1_700_000_000_000  # ms
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
WINDOW_MS = 600_000
META = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "req": "r-1", "x.y_z-1": "é ü \u0000 ok"}


def msg(mid: str, to: str = "bob", frm: str = "alice", *, created: int = NOW,
        meta: dict[str, str] | None = None) -> StoredMessage:
    return StoredMessage(mid=mid, sender=frm, recipient=to, body=f"body {mid}".encode(),
                         created=created, expires=created + DAY_MS, meta=meta)


async def pending_mids(store: Store, node: str = "bob", now: int = NOW) -> list[str]:
    return [m.mid for m in await store.pending(node, now, None, 1000)]


# -- meta ---------------------------------------------------------------------------------


async def test_meta_is_stored_and_read_back(store: Store) -> None:
    assert await store.enqueue(msg("m1", meta=META), 100) is None
    assert await store.enqueue(msg("m2"), 100) is None
    got = await store.pending("bob", NOW, None, 10)
    assert [(m.mid, m.meta) for m in got] == [("m1", META), ("m2", None)]


async def test_history_keeps_sig_and_meta(store: Store) -> None:
    await store.append_history(HistoryEntry("t", 0, "h1", "alice", b"a", NOW, b"s" * 64, META),
                               100, HOUR_MS)
    await store.append_history(HistoryEntry("t", 0, "h2", "alice", b"b", NOW), 100, HOUR_MS)
    since = await store.history_since("t", 0, NOW, HOUR_MS)
    assert [(e.seq, e.sig, e.meta) for e in since] == [(1, b"s" * 64, META), (2, None, None)]
    assert await store.history_before("t", None, 10, NOW, HOUR_MS) == since


# -- cid ----------------------------------------------------------------------------------


async def test_a_repeated_cid_answers_the_first_mid_and_stores_nothing(store: Store) -> None:
    assert await store.enqueue(msg("m1"), 100, cid="c-1", dedup_window_ms=WINDOW_MS) is None
    assert await store.enqueue(msg("m2"), 100, cid="c-1", dedup_window_ms=WINDOW_MS) == "m1"
    # Another cid, another sender with the same cid, no cid: all stored.
    assert await store.enqueue(msg("m3"), 100, cid="c-2", dedup_window_ms=WINDOW_MS) is None
    assert await store.enqueue(msg("m4", frm="carol"), 100, cid="c-1",
                               dedup_window_ms=WINDOW_MS) is None
    assert await store.enqueue(msg("m5"), 100) is None
    assert await store.enqueue(msg("m6"), 100) is None
    assert await pending_mids(store) == ["m1", "m3", "m4", "m5", "m6"]
    assert await store.message_state("m2", NOW) is None


async def test_a_repeat_is_dup_also_after_the_first_was_acked(store: Store) -> None:
    await store.enqueue(msg("m1"), 100, cid="c", dedup_window_ms=WINDOW_MS)
    await store.ack("bob", ["m1"], NOW + 1)
    assert await store.enqueue(msg("m2", created=NOW + 2), 100, cid="c",
                               dedup_window_ms=WINDOW_MS) == "m1"
    assert await pending_mids(store) == []


async def test_repeats_in_one_group_commit_store_one_message(store: Store) -> None:
    mids = await asyncio.gather(*(store.enqueue(msg(f"m{i}"), 100, cid="same",
                                                dedup_window_ms=WINDOW_MS)
                                  for i in range(5)))
    assert mids == [None] + ["m0"] * 4  # stored (None), then repeats of it
    assert await pending_mids(store) == ["m0"]


async def test_a_repeat_is_not_held_to_the_queue_bound(store: Store) -> None:
    await store.enqueue(msg("m1"), 1, cid="c", dedup_window_ms=WINDOW_MS)
    # bob's queue is full now: the repeat still answers the first mid.
    assert await store.enqueue(msg("m2"), 1, cid="c", dedup_window_ms=WINDOW_MS) == "m1"
    with pytest.raises(QueueFull):
        await store.enqueue(msg("m3"), 1, cid="other", dedup_window_ms=WINDOW_MS)
    # Refused: "other" is not remembered; once there is room it is stored.
    await store.ack("bob", ["m1"], NOW)
    assert await store.enqueue(msg("m4"), 1, cid="other", dedup_window_ms=WINDOW_MS) is None


async def test_a_repeat_behind_a_refused_first_is_stored_itself(store: Store) -> None:
    await store.enqueue(msg("full"), 1)
    results = await asyncio.gather(
        store.enqueue(msg("m1"), 1, cid="c", dedup_window_ms=WINDOW_MS),  # bob is full
        store.enqueue(msg("m2", to="carol"), 1, cid="c", dedup_window_ms=WINDOW_MS),
        store.enqueue(msg("m3", to="dave"), 1, cid="c", dedup_window_ms=WINDOW_MS),
        return_exceptions=True)
    assert isinstance(results[0], QueueFull)
    assert results[1:] == [None, "m2"]
    assert await pending_mids(store, "carol") == ["m2"]
    assert await pending_mids(store, "dave") == []
    # What is remembered is the message stored.
    assert await store.enqueue(msg("m4", to="erin"), 1, cid="c",
                               dedup_window_ms=WINDOW_MS) == "m2"


async def test_a_cid_is_forgotten_after_its_window(store: Store) -> None:
    await store.enqueue(msg("m1"), 100, cid="c", dedup_window_ms=1000)
    assert await store.enqueue(msg("m2", created=NOW + 999), 100, cid="c",
                               dedup_window_ms=1000) == "m1"
    # Past the window (not yet purged): the cid names the new message.
    assert await store.enqueue(msg("m3", created=NOW + 1000), 100, cid="c",
                               dedup_window_ms=1000) is None
    assert await store.enqueue(msg("m4", created=NOW + 1500), 100, cid="c",
                               dedup_window_ms=1000) == "m3"
    assert await pending_mids(store) == ["m1", "m3"]


async def test_purge_expired_forgets_cids_past_their_window(store: Store) -> None:
    await store.enqueue(msg("m1"), 100, cid="c", dedup_window_ms=1000)
    await store.purge_expired(NOW + 999)
    assert await store.enqueue(msg("m2", created=NOW + 1), 100, cid="c",
                               dedup_window_ms=1000) == "m1"
    assert await store.purge_expired(NOW + 1000) >= 1
    # Gone from the store: even a send dated inside the old window is new now.
    assert await store.enqueue(msg("m3", created=NOW + 2), 100, cid="c",
                               dedup_window_ms=1000) is None


async def test_a_cid_survives_a_reopen(store_factory: StoreFactory) -> None:
    store = store_factory.make()
    await store.open()
    try:
        await store.enqueue(msg("m1"), 100, cid="c", dedup_window_ms=WINDOW_MS)
    finally:
        await store.close()
    again = store_factory.make()
    await again.open()
    try:
        assert await again.enqueue(msg("m2"), 100, cid="c", dedup_window_ms=WINDOW_MS) == "m1"
        assert await pending_mids(again) == ["m1"]
    finally:
        await again.close()


async def test_two_stores_on_one_database_store_a_cid_once(pg_factory: PostgresFactory) -> None:
    """Two hub instances: a repeat sent through the other one, while the first is being
    committed or after, gets the first's mid (the dedup row's key makes it wait)."""
    a, b = pg_factory.make_pg(), pg_factory.make_pg()
    await a.open()
    await b.open()
    try:
        for i in range(10):
            got = await asyncio.gather(
                a.enqueue(msg(f"a{i}"), 100, cid=f"c{i}", dedup_window_ms=WINDOW_MS),
                b.enqueue(msg(f"b{i}"), 100, cid=f"c{i}", dedup_window_ms=WINDOW_MS))
            # One is stored (None), the other is answered with its mid.
            assert got in ([None, f"a{i}"], [f"b{i}", None]), got
        assert len(await pending_mids(a)) == 10
    finally:
        await a.close()
        await b.close()


# -- history pages ------------------------------------------------------------------------


def entry(n: int, topic: str = "news", ts: int = NOW) -> HistoryEntry:
    return HistoryEntry(topic=topic, seq=0, mid=f"h{n}", sender="alice",
                        body=f"pub {n}".encode(), ts=ts)


async def test_history_before_pages_back_oldest_first(store: Store) -> None:
    for n in range(1, 11):
        await store.append_history(entry(n), 8, HOUR_MS)  # keeps 3..10
    await store.append_history(entry(1, topic="other"), 8, HOUR_MS)

    async def seqs(before: int | None, limit: int) -> list[int]:
        return [e.seq for e in await store.history_before("news", before, limit, NOW,
                                                          HOUR_MS)]

    assert await seqs(None, 100) == list(range(3, 11))
    assert await seqs(None, 3) == [8, 9, 10]
    assert await seqs(8, 3) == [5, 6, 7]
    assert await seqs(5, 3) == [3, 4]
    assert await seqs(3, 3) == []
    assert await seqs(100, 1) == [10]
    assert await seqs(None, 0) == []
    assert await store.history_before("nothing", None, 10, NOW, HOUR_MS) == []
    [e] = await store.history_before("news", 4, 1, NOW, HOUR_MS)
    assert (e.topic, e.seq, e.mid, e.sender, e.body, e.ts) == ("news", 3, "h3", "alice",
                                                               b"pub 3", NOW)


async def test_history_before_leaves_out_what_is_past_the_ttl(store: Store) -> None:
    await store.append_history(entry(1, ts=NOW - 2 * HOUR_MS), 100, HOUR_MS)
    await store.append_history(entry(2, ts=NOW - HOUR_MS // 2), 100, HOUR_MS)
    await store.append_history(entry(3), 100, HOUR_MS)
    got = await store.history_before("news", None, 10, NOW, HOUR_MS)
    assert [e.seq for e in got] == [2, 3]


async def test_history_before_sees_appends_submitted_before_it(store: Store) -> None:
    appends = [asyncio.ensure_future(store.append_history(entry(n), 100, HOUR_MS))
               for n in range(1, 21)]
    await asyncio.sleep(0)  # the appends are submitted (waiting for their commit)
    got = await store.history_before("news", None, 5, NOW, HOUR_MS)
    assert [e.seq for e in got] == [16, 17, 18, 19, 20]
    await asyncio.gather(*appends)
