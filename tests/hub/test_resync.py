"""QoS 1 after a broker outage, inside one real hub (docs/protocol.md §4, §11): messages
stored while the broker could not route them reach their online recipients when the
broker is back (`HubNode.on_broker_up`), without a reconnect, in order, never written
twice to a session that has them unacked, and with bounded store work. A message
"stored during the outage" is enqueued straight into the store (it is what the router
does when the broker refuses it); the multi-process version with a real Redis restart
is in tests/cluster/test_cluster.py."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from openred.persistence.store import StoredMessage
from openred.protocol.frames import encode_msg
from openred.protocol.identity import Identity

from tests.hub.nodes import RawNode, eventually, no_frame, recv_msgs


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def store_unrouted(hub: Any, sender: str, to: str, body: bytes,
                         ttl_s: int = 3600) -> tuple[str, bytes]:
    """A QoS 1 message stored for `to` that no broker brought to it: (mid, its frame)."""
    ts = now_ms()
    mid = hub.node.mid(ts)
    await hub.node.store.enqueue(StoredMessage(mid, sender, to, body, ts, ts + ttl_s * 1000),
                                 hub.cfg.limits.max_pending_per_node)
    return mid, encode_msg(mid, sender, body, ts, 1)


async def test_online_recipient_gets_what_was_stored_without_reconnecting(hub):
    a = await RawNode.connect(hub)
    b = await RawNode.connect(hub)
    # In flight: delivered live, not acked yet.
    ok = await a.request({"t": "send", "id": 1, "to": b.node_id, "body": b"live", "qos": 1})
    assert (await b.recv_type("msg"))["mid"] == ok["mid"]
    stored = [(await store_unrouted(hub, a.node_id, b.node_id, b"s%d" % i))[0]
              for i in range(3)]
    await no_frame(b, 0.2)  # without the broker coming back, nothing

    hub.node.on_broker_up()
    msgs = await recv_msgs(b, 3)
    assert [m["mid"] for m in msgs] == stored  # in their stored order
    assert [m["body"] for m in msgs] == [b"s0", b"s1", b"s2"]
    await no_frame(b, 0.3)  # the unacked live message is not written again

    await b.send({"t": "ack", "mids": [ok["mid"], *stored]})
    await b.request({"t": "presence", "id": "sync", "nodes": []})
    hub.node.on_broker_up()  # a second outage: nothing new, nothing again
    await no_frame(b, 0.3)
    hub.node.on_broker_up()
    hub.node.on_broker_up()  # repeated while one is queued or running: harmless
    await no_frame(b, 0.3)


async def test_live_messages_arriving_during_the_resync_keep_their_order(hub):
    """§4 order: a message routed live right after the broker is back (it was stored
    after the outage ones) comes after them, once, though the resync also reads it from
    the store; a repeat of an unacked mid from the broker is not written again."""
    a = await RawNode.connect(hub)
    b = await RawNode.connect(hub)
    m1, _ = await store_unrouted(hub, a.node_id, b.node_id, b"outage")
    m2, f2 = await store_unrouted(hub, a.node_id, b.node_id, b"live")
    hub.node.on_broker_up()
    hub.node.on_node_frame(b.node_id, f2, 1, m2)  # before the resync read the store
    msgs = await recv_msgs(b, 2)
    assert [m["mid"] for m in msgs] == [m1, m2]
    m3, f3 = await store_unrouted(hub, a.node_id, b.node_id, b"after")
    hub.node.on_node_frame(b.node_id, f3, 1, m3)
    hub.node.on_node_frame(b.node_id, f2, 1, m2)  # a repeat while still unacked
    assert (await b.recv_type("msg"))["mid"] == m3
    await no_frame(b, 0.3)


async def test_resync_requested_while_a_replay_runs(make_hub, monkeypatch):
    """A resync asked for while the session's replay is running makes it read the queue
    once more when done (it may have read past new messages already); nothing comes
    twice."""
    h = await make_hub(**{"limits.send_queue_max": 50})  # replay pages of 25
    a = await RawNode.connect(h)
    b = await RawNode.connect(h)
    first = [(await store_unrouted(h, a.node_id, b.node_id, b"%d" % i))[0]
             for i in range(200)]
    gate = asyncio.Event()
    real = h.node.store.pending
    reads = 0

    async def pending(*args: Any, **kw: Any) -> Any:
        nonlocal reads
        reads += 1
        await gate.wait()
        return await real(*args, **kw)

    monkeypatch.setattr(h.node.store, "pending", pending)
    session = h.node.local[b.node_id]
    h.node.on_broker_up()
    assert session.inbox.replaying  # its turn came at once (limit not reached)
    await eventually(lambda: reads > 0)
    late, _ = await store_unrouted(h, a.node_id, b.node_id, b"late")
    h.node.on_broker_up()
    assert session.inbox.replay_again
    gate.set()
    msgs = await recv_msgs(b, 201, wait=10)
    assert [m["mid"] for m in msgs] == [*first, late]
    await no_frame(b, 0.3)
    await eventually(lambda: session.inbox is None or not session.inbox.replaying)
    assert reads >= 2 * 9  # two passes over 201 messages in pages of 25


async def test_store_work_is_bounded(make_hub, monkeypatch):
    """10 sessions, store pool of 4: at most 2 read their queue at once (half the pool,
    the rest stays for live traffic), and every one gets its message."""
    h = await make_hub(**{"store.pool_size": 4})
    a = await RawNode.connect(h)
    nodes = [await RawNode.connect(h) for _ in range(10)]
    mids = {n.node_id: (await store_unrouted(h, a.node_id, n.node_id, b"x"))[0]
            for n in nodes}
    store = h.node.store
    real = store.pending
    running = 0
    peak = 0
    calls = 0

    async def pending(*args: Any, **kw: Any) -> Any:
        nonlocal running, peak, calls
        running += 1
        calls += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(0.05)  # a slow database, so that reads would overlap
            return await real(*args, **kw)
        finally:
            running -= 1

    monkeypatch.setattr(store, "pending", pending)
    h.node.on_broker_up()
    for n in nodes:
        assert (await n.recv_type("msg", wait=10))["mid"] == mids[n.node_id]
    assert calls == 11  # one read each (a, too), no more
    assert peak == 2


async def test_closed_sessions_leave_the_queue(make_hub, monkeypatch):
    """Sessions that close while waiting for their turn are skipped, and the slots of
    those that close while reading are given back."""
    h = await make_hub(**{"store.pool_size": 2})  # one at a time
    nodes = [await RawNode.connect(h) for _ in range(4)]
    gate = asyncio.Event()
    real = h.node.store.pending

    async def pending(*args: Any, **kw: Any) -> Any:
        await gate.wait()
        return await real(*args, **kw)

    monkeypatch.setattr(h.node.store, "pending", pending)
    h.node.on_broker_up()
    for n in nodes[:3]:
        await n.close()
    await eventually(lambda: len(h.node.local) == 1)
    gate.set()
    await eventually(lambda: h.node.resyncs.running == 0 and not h.node.resyncs.waiting)
    sender = await RawNode.connect(h)
    ok = await sender.request({"t": "send", "id": 1, "to": nodes[3].node_id, "body": b"y",
                               "qos": 1})
    assert (await nodes[3].recv_type("msg"))["mid"] == ok["mid"]  # live again


async def test_a_session_with_too_many_unacked_is_not_resynced(make_hub):
    """Memory bound: a session that let more messages expire unacked than its queue can
    hold stops being tracked, and a resync (which could then repeat messages it has) is
    skipped: what was stored meanwhile comes at its next session, as before."""
    h = await make_hub(**{"limits.max_pending_per_node": 3})
    a = await RawNode.connect(h)
    bid = Identity.generate()
    b = await RawNode.connect(h, bid)
    for i in range(3):
        r = await a.request({"t": "send", "id": i, "to": b.node_id, "body": b"e", "qos": 1,
                             "ttl": 1})
        assert r["status"] == "stored", r
    await recv_msgs(b, 3)
    await asyncio.sleep(1.1)  # expired, never acked
    r = await a.request({"t": "send", "id": 9, "to": b.node_id, "body": b"4th", "qos": 1})
    assert (await b.recv_type("msg"))["mid"] == r["mid"]
    assert not h.node.local[b.node_id].inbox.tracks_unacked
    mid, _ = await store_unrouted(h, a.node_id, b.node_id, b"outage")
    h.node.on_broker_up()
    await no_frame(b, 0.3)
    await b.close()
    b2 = await RawNode.connect(h, bid)
    got = [m["mid"] for m in await recv_msgs(b2, 2)]
    assert got == [r["mid"], mid]
