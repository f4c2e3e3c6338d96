"""QoS 1 through a real hub (docs/protocol.md §4): stored before ok, delivered now or on the
next session in order, redelivered until acked, ttl, queue bounds, receipts, restarts."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

from openred.protocol.identity import Identity

from tests.hub.nodes import RawNode, no_frame, recv_msgs

MID_LEN = 26


async def send_q1(a: RawNode, to: str, bodies: list[bytes], **extra: Any) -> list[str]:
    """Send QoS 1 messages without waiting between them; the mids, in send order."""
    base = f"q{time.monotonic_ns()}-"
    for i, body in enumerate(bodies):
        await a.send({"t": "send", "id": f"{base}{i}", "to": to, "body": body, "qos": 1,
                      **extra})
    mids: dict[int, str] = {}
    while len(mids) < len(bodies):
        f = await a.recv()
        if f["t"] not in ("ok", "error") or not str(f["id"]).startswith(base):
            continue
        assert (f["t"], f["status"]) == ("ok", "stored"), f
        mids[int(f["id"][len(base):])] = f["mid"]
    return [mids[i] for i in range(len(bodies))]


def bodies(n: int, start: int = 0) -> list[bytes]:
    return [i.to_bytes(4, "big") for i in range(start, start + n)]


def nums(msgs: list[dict[str, Any]]) -> list[int]:
    return [int.from_bytes(m["body"], "big") for m in msgs]


async def test_ok_stored_and_live_delivery(hub):
    a = await RawNode.connect(hub)
    b = await RawNode.connect(hub)
    ok = await a.request({"t": "send", "id": 1, "to": b.node_id, "body": b"x", "qos": 1})
    assert set(ok) == {"t", "id", "mid", "status"}
    assert (ok["t"], ok["id"], ok["status"]) == ("ok", 1, "stored")
    assert isinstance(ok["mid"], str) and len(ok["mid"]) == MID_LEN
    msg = await b.recv()
    assert set(msg) == {"t", "mid", "from", "body", "ts", "qos"}
    assert (msg["mid"], msg["from"], msg["body"], msg["qos"]) == (ok["mid"], a.node_id,
                                                                   b"x", 1)
    st = await hub.node.store.message_state(ok["mid"], time.time_ns() // 1_000_000)
    assert st is not None and st.recipient == b.node_id and st.state in ("stored",
                                                                           "delivered")
    await b.send({"t": "ack", "mid": ok["mid"]})
    for _ in range(100):
        st = await hub.node.store.message_state(ok["mid"], time.time_ns() // 1_000_000)
        if st.state == "acked":
            break
        await asyncio.sleep(0.01)
    assert st.state == "acked"


async def test_offline_delivery_in_order_300(hub):
    a = await RawNode.connect(hub)
    bid = Identity.generate()
    mids = await send_q1(a, bid.node_id, bodies(300))
    assert len(set(mids)) == 300 and mids == sorted(mids)
    b = await RawNode.connect(hub, bid)
    assert b.welcome["pending"] == 300
    msgs = await recv_msgs(b, 300)
    assert nums(msgs) == list(range(300))
    assert [m["mid"] for m in msgs] == mids
    assert all(m["qos"] == 1 and m["from"] == a.node_id for m in msgs)
    await no_frame(b, 0.2)
    await b.send({"t": "ack", "mids": mids})
    await b.request({"t": "presence", "id": "sync", "nodes": []})  # acks handled by now
    await b.close()
    await asyncio.sleep(0.1)
    b2 = await RawNode.connect(hub, bid)
    assert b2.welcome["pending"] == 0
    await no_frame(b2, 0.2)


async def test_unacked_redelivered_acked_not(hub):
    a = await RawNode.connect(hub)
    bid = Identity.generate()
    b = await RawNode.connect(hub, bid)
    mids = await send_q1(a, b.node_id, bodies(5))
    msgs = await recv_msgs(b, 5)
    assert [m["mid"] for m in msgs] == mids
    await b.send({"t": "ack", "mid": mids[1]})
    await b.send({"t": "ack", "mids": [mids[3], "unknown-mid"]})
    await b.request({"t": "presence", "id": "sync", "nodes": []})
    await b.close()
    b2 = await RawNode.connect(hub, bid)
    assert b2.welcome["pending"] == 3  # unacked ones count, even though delivered once
    again = await recv_msgs(b2, 3)
    assert [m["mid"] for m in again] == [mids[0], mids[2], mids[4]]
    assert nums(again) == [0, 2, 4]
    await no_frame(b2, 0.2)


async def test_ack_by_another_node_changes_nothing(hub):
    a = await RawNode.connect(hub)
    bid = Identity.generate()
    [mid] = await send_q1(a, bid.node_id, [b"for b"])
    # the sender and a third node both try to ack b's message
    await a.send({"t": "ack", "mid": mid})
    c = await RawNode.connect(hub)
    await c.send({"t": "ack", "mids": [mid]})
    for n in (a, c):
        await n.request({"t": "presence", "id": "sync", "nodes": []})
        await no_frame(n, 0.05)  # not an error
    b = await RawNode.connect(hub, bid)
    assert b.welcome["pending"] == 1
    msg = await b.recv()
    assert (msg["mid"], msg["body"]) == (mid, b"for b")


async def test_ack_mids_list(hub):
    a = await RawNode.connect(hub)
    bid = Identity.generate()
    b = await RawNode.connect(hub, bid)
    mids = await send_q1(a, b.node_id, bodies(4))
    await recv_msgs(b, 4)
    await b.send({"t": "ack", "mids": mids[:3]})
    await b.request({"t": "presence", "id": "sync", "nodes": []})
    await b.close()
    b2 = await RawNode.connect(hub, bid)
    assert b2.welcome["pending"] == 1
    assert (await b2.recv())["mid"] == mids[3]


async def test_receipt_on_ack(hub):
    a = await RawNode.connect(hub)
    b = await RawNode.connect(hub)
    ok = await a.request({"t": "send", "id": 1, "to": b.node_id, "body": b"r", "qos": 1,
                          "receipt": True})
    ok2 = await a.request({"t": "send", "id": 2, "to": b.node_id, "body": b"n", "qos": 1})
    m1, m2 = await recv_msgs(b, 2)
    t0 = time.time_ns() // 1_000_000
    await b.send({"t": "ack", "mids": [m2["mid"], m1["mid"]]})
    r = await a.recv()
    assert set(r) == {"t", "mid", "to", "ts"}
    assert (r["t"], r["mid"], r["to"]) == ("receipt", ok["mid"], b.node_id)
    assert isinstance(r["ts"], int) and r["ts"] >= t0 - 1000
    await no_frame(a, 0.2)  # no receipt for the message sent without receipt: true
    assert ok2["mid"] == m2["mid"]
    # a second ack of the same mid gives no second receipt
    await b.send({"t": "ack", "mid": m1["mid"]})
    await no_frame(a, 0.2)


async def test_receipt_for_message_acked_on_later_session(hub):
    a = await RawNode.connect(hub)
    bid = Identity.generate()
    ok = await a.request({"t": "send", "id": 1, "to": bid.node_id, "body": b"r", "qos": 1,
                          "receipt": True})
    b = await RawNode.connect(hub, bid)
    msg = await b.recv()
    await b.send({"t": "ack", "mid": msg["mid"]})
    r = await a.recv()
    assert (r["t"], r["mid"], r["to"]) == ("receipt", ok["mid"], bid.node_id)


async def test_ttl_expired_not_delivered_not_pending(hub):
    a = await RawNode.connect(hub)
    bid = Identity.generate()
    m0 = await send_q1(a, bid.node_id, [b"keep0"])
    await send_q1(a, bid.node_id, [b"gone"], ttl=1)
    m2 = await send_q1(a, bid.node_id, [b"keep2"], ttl=60)
    await asyncio.sleep(1.5)
    b = await RawNode.connect(hub, bid)
    assert b.welcome["pending"] == 2
    msgs = await recv_msgs(b, 2)
    assert [m["mid"] for m in msgs] == m0 + m2
    await no_frame(b, 0.3)


async def test_ttl_bounds(make_hub):
    h = await make_hub(**{"store.message_ttl_s": 60})
    a = await RawNode.connect(h)
    b = await RawNode.connect(h)
    for i, ttl in enumerate((61, 0, -5, "10", 1.5)):
        err = await a.request({"t": "send", "id": i, "to": b.node_id, "body": b"x",
                               "qos": 1, "ttl": ttl})
        assert (err["t"], err["code"]) == ("error", "bad_frame"), (ttl, err)
    ok = await a.request({"t": "send", "id": "max", "to": b.node_id, "body": b"x", "qos": 1,
                          "ttl": 60})
    assert ok["status"] == "stored"
    msg = await b.recv()
    assert msg["mid"] == ok["mid"]
    await no_frame(b, 0.1)  # nothing refused was routed


async def test_qos1_without_id_is_bad_frame(hub):
    a = await RawNode.connect(hub)
    b = await RawNode.connect(hub)
    await a.send({"t": "send", "to": b.node_id, "body": b"x", "qos": 1})
    err = await a.recv()
    assert err == {"t": "error", "id": None, "code": "bad_frame", "msg": err["msg"]}
    await no_frame(b, 0.2)
    for i, qos in enumerate((2, -1, "1", True)):
        err = await a.request({"t": "send", "id": i, "to": b.node_id, "body": b"x",
                               "qos": qos})
        assert err["code"] == "bad_frame", qos


async def test_queue_full(make_hub):
    h = await make_hub(**{"limits.max_pending_per_node": 5})
    a = await RawNode.connect(h)
    bid = Identity.generate()
    mids = await send_q1(a, bid.node_id, bodies(5))
    err = await a.request({"t": "send", "id": "six", "to": bid.node_id, "body": b"6",
                          "qos": 1})
    assert (err["t"], err["id"], err["code"]) == ("error", "six", "queue_full")
    # another recipient is not affected
    other = await a.request({"t": "send", "id": "o", "to": "other.node", "body": b"o",
                            "qos": 1})
    assert other["status"] == "stored"
    b = await RawNode.connect(h, bid)
    assert b.welcome["pending"] == 5
    msgs = await recv_msgs(b, 5)
    assert [m["mid"] for m in msgs] == mids
    await no_frame(b, 0.1)  # the refused one was not stored
    # delivered but unacked messages still count; an ack makes room
    err = await a.request({"t": "send", "id": "x", "to": bid.node_id, "body": b"x",
                          "qos": 1})
    assert err["code"] == "queue_full"
    await b.send({"t": "ack", "mid": mids[0]})
    await b.request({"t": "presence", "id": "sync", "nodes": []})
    ok = await a.request({"t": "send", "id": "y", "to": bid.node_id, "body": b"y",
                         "qos": 1})
    assert ok["status"] == "stored"
    assert (await b.recv())["mid"] == ok["mid"]


async def test_survives_restart(make_hub):
    h = await make_hub()
    a = await RawNode.connect(h)
    bid = Identity.generate()
    mids = await send_q1(a, bid.node_id, bodies(3))
    ok = await a.request({"t": "send", "id": "r", "to": bid.node_id, "body": b"rcpt",
                          "qos": 1, "receipt": True, "sig": b"s" * 64})
    await h.stop()
    h2 = await make_hub()
    b = await RawNode.connect(h2, bid)
    assert b.welcome["pending"] == 4
    msgs = await recv_msgs(b, 4)
    assert [m["mid"] for m in msgs] == [*mids, ok["mid"]]
    assert nums(msgs[:3]) == [0, 1, 2]
    assert msgs[3]["sig"] == b"s" * 64 and msgs[3]["from"] == a.node_id
    # the receipt flag survived too
    a2 = await RawNode.connect(h2, a.identity)
    await b.send({"t": "ack", "mid": ok["mid"]})
    r = await a2.recv()
    assert (r["t"], r["mid"], r["to"]) == ("receipt", ok["mid"], bid.node_id)


async def test_live_messages_during_replay_in_order(hub):
    """Messages sent while the recipient replays its backlog are delivered after it,
    exactly once each, in send order (no gap, no duplicate)."""
    a = await RawNode.connect(hub)
    bid = Identity.generate()
    first = 1200  # more than one replay page
    await send_q1(a, bid.node_id, bodies(first))
    more = 600

    async def keep_sending() -> None:
        for i in range(first, first + more):
            await a.send({"t": "send", "id": f"m{i}", "to": bid.node_id,
                          "body": i.to_bytes(4, "big"), "qos": 1})
            if i % 5 == 0:  # paced so that it spans the handshake and the replay
                await asyncio.sleep(0.002)

    sender = asyncio.create_task(keep_sending())
    await asyncio.sleep(0.005)
    b = await RawNode.connect(hub, bid)
    assert first <= b.welcome["pending"] <= first + more
    msgs = await recv_msgs(b, first + more, wait=10)
    await sender
    oks = 0
    while oks < more:
        f = await a.recv()
        assert f["t"] == "ok", f
        oks += 1
    assert nums(msgs) == list(range(first + more))
    assert len({m["mid"] for m in msgs}) == first + more
    await no_frame(b, 0.3)


async def test_messages_during_handshake_in_order(hub):
    """Messages sent while the recipient authenticates (pending counted, replay not
    started yet) are neither lost nor repeated nor reordered."""
    a = await RawNode.connect(hub)
    bid = Identity.generate()
    await send_q1(a, bid.node_id, bodies(600))
    b_task = asyncio.create_task(RawNode.connect(hub, bid))
    for i in range(600, 900):
        await a.send({"t": "send", "id": f"m{i}", "to": bid.node_id,
                      "body": i.to_bytes(4, "big"), "qos": 1})
    b = await b_task
    msgs = await recv_msgs(b, 900, wait=10)
    assert nums(msgs) == list(range(900))
    assert len({m["mid"] for m in msgs}) == 900
    for _ in range(300):
        assert (await a.recv())["status"] == "stored"
    await no_frame(b, 0.2)


async def test_allowlist_mode(make_hub):
    h = await make_hub(**{"auth.mode": "allowlist"})
    store = h.node.store
    now = time.time_ns() // 1_000_000
    aid, bid = Identity.generate(), Identity.generate()
    await store.put_node(aid.node_id, {}, aid.public_key, now)
    await store.put_node(bid.node_id, {"role": "b"}, bid.public_key, now)
    a = await RawNode.connect(h, aid)
    err = await a.request({"t": "send", "id": 1, "to": "not.registered", "body": b"x",
                           "qos": 1})
    assert (err["t"], err["id"], err["code"]) == ("error", 1, "no_route")
    ok = await a.request({"t": "send", "id": 2, "to": bid.node_id, "body": b"y", "qos": 1})
    assert ok["status"] == "stored"
    b = await RawNode.connect(h, bid)
    assert b.welcome["pending"] == 1
    assert (await b.recv())["mid"] == ok["mid"]


async def test_backlog_larger_than_send_queue(make_hub):
    """A backlog bigger than `limits.send_queue_max`, and a burst of QoS 1 replies to
    the sender, are flow controlled, not taken for slow consumers (§4, §7)."""
    h = await make_hub(**{"limits.send_queue_max": 50})
    a = await RawNode.connect(h)
    bid = Identity.generate()
    mids = await send_q1(a, bid.node_id, bodies(700))
    b_task = asyncio.create_task(RawNode.connect(h, bid))
    more = await send_q1(a, bid.node_id, bodies(200, start=700))  # during the replay
    b = await b_task
    msgs = await recv_msgs(b, 900, wait=10)
    assert [m["mid"] for m in msgs] == mids + more
    assert nums(msgs) == list(range(900))
    await no_frame(b, 0.2)


async def test_backlog_of_large_messages_flow_controlled(make_hub):
    """A backlog of several MB for a session that does not read yet: the replay waits
    for the socket to drain instead of overflowing the send queue (§7), and a slow but
    live reader gets everything."""
    h = await make_hub(**{"limits.send_queue_max": 50})
    a = await RawNode.connect(h)
    bid = Identity.generate()
    n = 620  # more than one replay page of the default size
    for start in range(0, n, 155):
        await send_q1(a, bid.node_id, [i.to_bytes(4, "big") + b"\x00" * 12_000
                                       for i in range(start, start + 155)])
    # a small receive buffer, so that the hub's socket fills up fast
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.connect(("127.0.0.1", h.ws_port))
    sock.setblocking(False)
    b = await RawNode.open(h, bid, sock=sock)
    await b.send({"t": "hello", "key": bid.public_key,
                  "sig": bid.sign_auth(b.challenge["hub"], b.challenge["nonce"])})
    b.ws.transport.pause_reading()
    await asyncio.sleep(0.5)  # the replay runs into a full socket meanwhile
    b.ws.transport.resume_reading()
    welcome = await b.recv()
    assert (welcome["t"], welcome["pending"]) == ("welcome", n)
    msgs = await recv_msgs(b, n, wait=10)
    assert [int.from_bytes(m["body"][:4], "big") for m in msgs] == list(range(n))


async def test_replay_read_again_when_the_store_fails(hub):
    """The store refuses the replay's read (a reconnect storm exhausting it, a blip):
    the session stays open and the read is made again, so the stored messages still
    come in this session, first, with live QoS 1 sent meanwhile after them (§4). The
    failure is injected into the real store's `pending`, twice, then it answers."""
    from openred.persistence.store import StoreUnavailable

    a = await RawNode.connect(hub)
    bid = Identity.generate()
    await send_q1(a, bid.node_id, bodies(3))
    store = hub.node.store
    real_pending = store.pending
    failures = [0]

    async def failing_pending(*args: Any, **kw: Any) -> Any:
        if failures[0] < 2:
            failures[0] += 1
            raise StoreUnavailable("store: injected failure")
        return await real_pending(*args, **kw)

    store.pending = failing_pending
    try:
        b = await RawNode.connect(hub, bid)
        assert b.welcome["pending"] == 3
        await send_q1(a, bid.node_id, bodies(2, start=3))  # live, during the retries
        msgs = await recv_msgs(b, 5, wait=10)
    finally:
        store.pending = real_pending
    assert failures[0] == 2
    assert nums(msgs) == [0, 1, 2, 3, 4]
    await b.send({"t": "ack", "mids": [m["mid"] for m in msgs]})
    await no_frame(b, 0.3)
