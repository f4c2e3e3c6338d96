"""The `Store` contract's credential lifecycle, per backend: `forget_node` (DELETE
/v1/nodes/{id}) and token revocations (POST /v1/tokens/revoke, migration 0002).

Same fixtures as test_store_conformance.py: `store` runs on every backend of
`STORE_PARAMS` (SQLite file, PostgreSQL)."""

from __future__ import annotations

import asyncio

from openred.persistence.store import QueueFull, Store, StoredMessage

NOW = 1_700_000_000_000  # ms
DAY_MS = 86_400_000
NEVER = 2**63 - 1


def msg(i: int, to: str, *, created: int = NOW) -> StoredMessage:
    return StoredMessage(mid=f"c{i:08d}.{to}", sender="alice", recipient=to,
                         body=b"x", created=created, expires=created + DAY_MS)


# -- forget_node --------------------------------------------------------------------------


async def test_forget_node_drops_registration_meta_key_and_expires_its_queue(
        store: Store) -> None:
    await store.put_node("n1", {"name": "a"}, b"k" * 32, NOW)
    for i in range(3):
        await store.enqueue(msg(i, "n1"), 10)
    await store.enqueue(msg(9, "other"), 10)
    await store.ack("n1", [msg(0, "n1").mid], NOW + 1)  # acked stays acked

    assert await store.forget_node("n1", NOW + 10) is True
    assert await store.get_node("n1") is None
    assert await store.pending("n1", NOW + 10, None, 100) == []
    assert await store.count_pending("n1", NOW + 10) == 0
    states = [await store.message_state(msg(i, "n1").mid, NOW + 11) for i in range(3)]
    assert [s.state if s else None for s in states] == ["acked", "expired", "expired"]
    # Other recipients are untouched.
    assert [m.mid for m in await store.pending("other", NOW + 10, None, 100)] == [
        msg(9, "other").mid]
    # Nothing left to forget.
    assert await store.forget_node("n1", NOW + 20) is False


async def test_forget_node_keeps_a_ban(store: Store) -> None:
    await store.put_node("n2", {"a": 1}, b"k" * 32, NOW)
    await store.set_banned("n2", True, NOW)
    assert await store.forget_node("n2", NOW + 1) is True
    rec = await store.get_node("n2")
    assert rec is not None and rec.banned
    assert (rec.registered, rec.meta, rec.key) == (False, {}, None)


async def test_forget_unknown_node_with_a_queue(store: Store) -> None:
    # open mode: QoS 1 to a node never seen is stored for it, with no node row.
    await store.enqueue(msg(1, "ghost"), 10)
    assert await store.forget_node("ghost", NOW + 1) is True
    assert await store.count_pending("ghost", NOW + 1) == 0
    assert await store.forget_node("never", NOW + 1) is False


async def test_forget_node_includes_enqueues_not_yet_committed(store: Store) -> None:
    # Enqueues submitted before the call (still in the group commit) expire too.
    enqueues = [asyncio.ensure_future(store.enqueue(msg(i, "n3"), 100)) for i in range(20)]
    await asyncio.sleep(0)
    assert await store.forget_node("n3", NOW + 1) is True
    await asyncio.gather(*enqueues)
    assert await store.count_pending("n3", NOW + 1) == 0


async def test_queue_bound_is_free_again_after_forget(store: Store) -> None:
    for i in range(2):
        await store.enqueue(msg(i, "n4"), 2)
    try:
        await store.enqueue(msg(5, "n4"), 2)
        raise AssertionError("QueueFull expected")
    except QueueFull:
        pass
    await store.forget_node("n4", NOW + 1)
    await store.enqueue(msg(6, "n4", created=NOW + 2), 2)  # counted afresh
    assert await store.count_pending("n4", NOW + 2) == 1


# -- revocations --------------------------------------------------------------------------


async def test_revocations_are_durable_and_paged_by_id(store: Store) -> None:
    a = await store.add_revocation("jti", "j-1", None, NOW + DAY_MS, NOW)
    b = await store.add_revocation("node", "n1", NOW, NEVER, NOW)
    assert (a.kind, a.subject, a.issued_before, a.created, a.expires) == (
        "jti", "j-1", None, NOW, NOW + DAY_MS)
    assert (b.kind, b.subject, b.issued_before, b.expires) == ("node", "n1", NOW, NEVER)
    assert b.id > a.id
    assert await store.revocations_since(0, NOW, 100) == [a, b]
    assert await store.revocations_since(a.id, NOW, 100) == [b]
    assert await store.revocations_since(0, NOW, 1) == [a]


async def test_revocation_merge_gets_a_fresh_id_and_keeps_the_later_values(
        store: Store) -> None:
    first = await store.add_revocation("node", "n1", NOW + 500, NEVER, NOW)
    other = await store.add_revocation("jti", "j-1", None, NOW + DAY_MS, NOW)
    # An earlier cut-off does not move it back; the row moves past `other`.
    again = await store.add_revocation("node", "n1", NOW + 100, NEVER, NOW + 1)
    assert again.id > other.id > first.id
    assert again.issued_before == NOW + 500
    later = await store.add_revocation("node", "n1", NOW + 900, NEVER, NOW + 2)
    assert later.issued_before == NOW + 900
    jti = await store.add_revocation("jti", "j-1", None, NOW + 10, NOW + 3)
    assert jti.expires == NOW + DAY_MS  # the later expiry wins
    rows = await store.revocations_since(0, NOW + 3, 100)
    assert [(r.kind, r.subject) for r in rows] == [("node", "n1"), ("jti", "j-1")]


async def test_expired_revocations_are_not_returned_and_are_dropped(store: Store) -> None:
    old = await store.add_revocation("jti", "j-old", None, NOW + 10, NOW)
    assert await store.revocations_since(0, NOW + 10, 100) == []
    await store.add_revocation("jti", "j-new", None, NOW + DAY_MS, NOW + 20)
    rows = await store.revocations_since(0, NOW, 100)  # even as of an earlier time
    assert [r.subject for r in rows] == ["j-new"] and rows[0].id > old.id


async def test_concurrent_revocations_all_land_with_distinct_ids(store: Store) -> None:
    rows = await asyncio.gather(*(store.add_revocation("jti", f"j{i}", None, NEVER, NOW)
                                  for i in range(20)))
    assert len({r.id for r in rows}) == 20
    listed = await store.revocations_since(0, NOW, 100)
    assert sorted(r.subject for r in listed) == sorted(f"j{i}" for i in range(20))
    assert [r.id for r in listed] == sorted(r.id for r in listed)
