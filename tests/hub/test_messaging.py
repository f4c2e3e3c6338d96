"""Direct messages through a real hub (docs/protocol.md §1 batches, §3 replies, §4 sends, §7
slow consumers), checked frame by frame on real sockets."""

from __future__ import annotations

import asyncio
import base64
import os
from typing import Any

import msgpack
from openred.protocol.identity import Identity
from openred.protocol.wsframes import OP_TEXT, ZERO_MASK_KEY, Close, Event, FrameReader, FrameWriter

from tests.conftest import timeout
from tests.hub.nodes import RawNode, eventually, no_frame, recv_msgs

MID_LEN = 26


async def test_qos0_send_ok_and_delivery(hub):
    a = await RawNode.connect(hub)
    b = await RawNode.connect(hub)
    ok = await a.request({"t": "send", "id": 1, "to": b.node_id, "body": b"hello"})
    assert set(ok) == {"t", "id", "mid", "status"}
    assert (ok["t"], ok["id"], ok["status"]) == ("ok", 1, "sent")
    assert isinstance(ok["mid"], str) and len(ok["mid"]) == MID_LEN
    msg = await b.recv()
    assert set(msg) == {"t", "mid", "from", "body", "ts", "qos"}
    assert msg["mid"] == ok["mid"]
    assert (msg["from"], msg["body"], msg["qos"]) == (a.node_id, b"hello", 0)
    assert isinstance(msg["ts"], int) and msg["ts"] > 1_600_000_000_000
    # explicit qos 0 is the same thing
    ok2 = await a.request({"t": "send", "id": 2, "to": b.node_id, "body": b"x", "qos": 0})
    assert ok2["status"] == "sent" and ok2["mid"] > ok["mid"]  # time-ordered
    assert (await b.recv())["mid"] == ok2["mid"]


async def test_qos0_offline_with_id_is_no_route(hub):
    a = await RawNode.connect(hub)
    err = await a.request({"t": "send", "id": "q", "to": "nobody.here", "body": b"x"})
    assert (err["t"], err["id"], err["code"]) == ("error", "q", "no_route")
    assert isinstance(err["msg"], str)


async def test_qos0_offline_without_id_is_silent(hub):
    a = await RawNode.connect(hub)
    await a.send({"t": "send", "to": "nobody.here", "body": b"x"})
    await no_frame(a)
    ok = await a.request({"t": "presence", "id": 9, "nodes": ["nobody.here"]})
    assert ok == {"t": "ok", "id": 9, "online": {"nobody.here": False}}
    await no_frame(a, 0.1)


async def test_from_is_the_authenticated_sender(hub):
    a = await RawNode.connect(hub)
    b = await RawNode.connect(hub)
    ok = await a.request({"t": "send", "id": 1, "to": b.node_id, "body": b"x",
                          "from": "someone.else"})
    assert ok["t"] == "ok"
    msg = await b.recv()
    assert msg["from"] == a.node_id
    ok = await a.request({"t": "send", "id": 2, "to": b.node_id, "body": b"y", "qos": 1,
                          "from": "$admin"})
    assert ok["status"] == "stored"
    msg = await b.recv()
    assert (msg["from"], msg["qos"]) == (a.node_id, 1)


async def test_sig_passed_through_untouched(hub):
    a = await RawNode.connect(hub)
    b = await RawNode.connect(hub)
    sig = bytes(range(64))
    odd = b"\x00\xff" * 100  # not an Ed25519 signature at all: still passed through
    await a.request({"t": "send", "id": 1, "to": b.node_id, "body": b"x", "sig": sig})
    await a.request({"t": "send", "id": 2, "to": b.node_id, "body": b"y", "sig": odd,
                     "qos": 1})
    await a.request({"t": "send", "id": 3, "to": b.node_id, "body": b"z"})
    m1, m2, m3 = await recv_msgs(b, 3)
    assert m1["sig"] == sig and type(m1["sig"]) is bytes
    assert m2["sig"] == odd
    assert "sig" not in m3


async def test_order_1000_mixed_qos(hub):
    a = await RawNode.connect(hub)
    b = await RawNode.connect(hub)
    n = 1000
    for i in range(n):
        frame: dict[str, Any] = {"t": "send", "to": b.node_id, "body": i.to_bytes(4, "big")}
        if i % 3 == 0:
            frame.update(qos=1, id=i)
        elif i % 3 == 1:
            frame["id"] = i
        await a.send(frame)
    msgs = await recv_msgs(b, n, wait=10)
    assert [int.from_bytes(m["body"], "big") for m in msgs] == list(range(n))
    assert [m["qos"] for m in msgs] == [1 if i % 3 == 0 else 0 for i in range(n)]
    assert len({m["mid"] for m in msgs}) == n
    replies = {}
    while len(replies) < 2 * n // 3 + 1:
        f = await a.recv(10)
        assert f["t"] == "ok", f
        replies[f["id"]] = f
    assert set(replies) == {i for i in range(n) if i % 3 != 2}
    assert all(replies[i]["status"] == ("stored" if i % 3 == 0 else "sent") for i in replies)
    # the mids a got back are the mids b saw, and they are time-ordered
    assert [replies[i]["mid"] for i in sorted(replies)] == [
        m["mid"] for i, m in enumerate(msgs) if i % 3 != 2]
    await b.send({"t": "ack", "mids": [m["mid"] for m in msgs if m["qos"] == 1]})


async def test_unknown_keys_ignored(hub):
    a = await RawNode.connect(hub)
    b = await RawNode.connect(hub)
    ok = await a.request({"t": "send", "id": 1, "to": b.node_id, "body": b"x",
                          "zzz": [1, 2, {"q": None}], "extra": b"\x01"})
    assert (ok["t"], ok["status"]) == ("ok", "sent")
    assert (await b.recv())["body"] == b"x"
    ok = await a.request({"t": "presence", "id": 2, "nodes": [b.node_id], "more": 1})
    assert ok["online"] == {b.node_id: True}
    ok = await a.request({"t": "sub", "id": 3, "topic": "t.k", "weird": True})
    assert ok["t"] == "ok"


async def test_replies_matched_by_id(hub):
    a = await RawNode.connect(hub)
    b = await RawNode.connect(hub)
    ids: list[Any] = ["abc", 7, "7", 0, "x" * 64, 2**64 - 1, ""]
    for i, fid in enumerate(ids):
        await a.send({"t": "send", "id": fid, "to": b.node_id, "body": bytes([i])})
    got = []
    for _ in ids:
        f = await a.recv()
        assert f["t"] == "ok"
        got.append(f["id"])
    assert sorted(map(repr, got)) == sorted(map(repr, ids))  # "7" and 7 both, distinct
    # error replies carry the id as well
    err = await a.request({"t": "send", "id": "e1", "to": b.node_id, "body": "str body"})
    assert (err["t"], err["code"]) == ("error", "bad_frame")
    err = await a.request({"t": "nope", "id": 42})
    assert (err["t"], err["code"]) == ("error", "unknown_type")


async def test_bad_id_is_bad_frame_with_nil_id(hub):
    a = await RawNode.connect(hub)
    b = await RawNode.connect(hub)
    for bad in ("x" * 65, -1, 1.5, [1], b"id"):
        await a.send({"t": "send", "id": bad, "to": b.node_id, "body": b"x"})
        err = await a.recv()
        assert err == {"t": "error", "id": None, "code": "bad_frame", "msg": err["msg"]}
    await no_frame(b, 0.1)  # none was routed


async def test_batch_in_handled_in_order(hub):
    a = await RawNode.connect(hub)
    b = await RawNode.connect(hub)
    batch = [{"t": "send", "id": i, "to": b.node_id, "body": bytes([i])} for i in range(10)]
    batch[4] = {"t": "send", "id": 4, "to": b.node_id, "body": "bad"}  # bad_frame in the middle
    await a.send(batch)
    msgs = await recv_msgs(b, 9)
    assert [m["body"][0] for m in msgs] == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    replies = {}
    for _ in range(10):
        f = await a.recv()
        replies[f["id"]] = f
    assert replies[4]["code"] == "bad_frame"
    assert all(replies[i]["status"] == "sent" for i in range(10) if i != 4)
    # a batch of control frames: sub then pub in one message, in order
    c = await RawNode.connect(hub)
    await b.send([{"t": "sub", "id": "s", "topic": "bt"},
                  {"t": "presence", "id": "p", "nodes": [c.node_id]}])
    assert (await b.recv())["id"] == "s"
    assert (await b.recv())["id"] == "p"


def _is_array(data: bytes) -> bool:
    return isinstance(msgpack.unpackb(data, raw=False), list)


async def test_batch_out_only_to_batch_nodes(hub):
    a = await RawNode.connect(hub)
    b = await RawNode.connect(hub, batch=True)
    c = await RawNode.connect(hub)
    n = 200
    # one WebSocket message from a: every frame for b is pending in one loop iteration
    await a.send([{"t": "send", "to": b.node_id, "body": i.to_bytes(2, "big")}
                  for i in range(n)])
    await a.send([{"t": "send", "to": c.node_id, "body": i.to_bytes(2, "big")}
                  for i in range(n)])
    got_b: list[dict[str, Any]] = []
    arrays = 0
    while len(got_b) < n:
        data = await asyncio.wait_for(b.ws.recv(), timeout(5))
        value = msgpack.unpackb(data, raw=False)
        if isinstance(value, list):
            arrays += 1
            assert len(value) >= 2
            got_b.extend(value)
        else:
            got_b.append(value)
    assert arrays >= 1
    assert [int.from_bytes(m["body"], "big") for m in got_b] == list(range(n))
    got_c = []
    while len(got_c) < n:
        data = await asyncio.wait_for(c.ws.recv(), timeout(5))
        assert not _is_array(data)
        got_c.append(msgpack.unpackb(data, raw=False))
    assert [int.from_bytes(m["body"], "big") for m in got_c] == list(range(n))


async def test_batch_out_respects_max_frame_bytes(make_hub):
    h = await make_hub(**{"limits.max_frame_bytes": 8192, "limits.max_body_bytes": 3000})
    a = await RawNode.connect(h)
    b = await RawNode.connect(h, batch=True)
    n = 40
    for i in range(0, n, 2):  # two frames per message: a's messages stay under the limit
        await a.send([{"t": "send", "to": b.node_id, "body": bytes([j]) * 2900}
                      for j in (i, i + 1)])
    got: list[dict[str, Any]] = []
    while len(got) < n:
        data = await asyncio.wait_for(b.ws.recv(), timeout(5))
        assert len(data) <= 8192
        value = msgpack.unpackb(data, raw=False)
        got.extend(value if isinstance(value, list) else [value])
    assert [m["body"][0] for m in got] == list(range(n))


async def test_burst_to_a_reading_node_is_not_slow(make_hub):
    """§7: send_queue_max bounds what waits for a socket that does not drain; a burst
    queued in one go for a node that reads (a batch of requests and their replies) is
    not a slow consumer."""
    h = await make_hub(**{"limits.send_queue_max": 50})
    a = await RawNode.connect(h)
    b = await RawNode.connect(h)
    n = 300
    await a.send([{"t": "send", "id": i, "to": b.node_id, "body": b"%d" % i}
                  for i in range(n)])
    msgs = await recv_msgs(b, n)
    assert [m["body"] for m in msgs] == [b"%d" % i for i in range(n)]
    replies = [await a.recv() for _ in range(n)]
    assert sorted(r["id"] for r in replies if r["t"] == "ok") == list(range(n))


async def test_slow_consumer_closed_others_not_stalled(make_hub):
    h = await make_hub(**{"limits.send_queue_max": 50})
    a = await RawNode.connect(h)
    slow_id = Identity.generate()
    slow = await RawNode.connect(h, slow_id)
    fast = await RawNode.connect(h)
    fast_got: list[bytes] = []

    async def fast_reader() -> None:
        while True:
            fast_got.append((await fast.recv(30))["body"])

    reader = asyncio.create_task(fast_reader())
    slow.ws.transport.pause_reading()
    body = b"\x5a" * 60_000
    stored = []
    sent_fast = 0
    closed_at = None
    try:
        for i in range(3000):
            if i % 50 == 10:  # QoS 1 for the slow node along the way
                ok = await a.request({"t": "send", "id": f"q{i}", "to": slow.node_id,
                                      "body": b"q%d" % i, "qos": 1})
                assert ok["status"] == "stored"
                stored.append(ok["mid"])
            r = await a.request({"t": "send", "id": i, "to": slow.node_id, "body": body})
            if i % 5 == 0:
                ok = await a.request({"t": "send", "id": f"f{i}", "to": fast.node_id,
                                      "body": b"%d" % sent_fast})
                assert ok["status"] == "sent"
                sent_fast += 1
            if r["t"] == "error":
                assert r["code"] == "no_route"  # the slow node's session is gone
                closed_at = i
                break
        assert closed_at is not None, "slow consumer never disconnected"
        # the fast recipient got everything, promptly, while the slow one was stuck
        await eventually(lambda: len(fast_got) >= sent_fast, 2)
        assert fast_got == [b"%d" % k for k in range(sent_fast)]
        online = await a.request({"t": "presence", "id": "p", "nodes": [slow.node_id]})
        assert online["online"] == {slow.node_id: False}
        # QoS 1 sent after the close is stored for later as well
        for k in range(3):
            ok = await a.request({"t": "send", "id": f"late{k}", "to": slow.node_id,
                                  "body": b"late%d" % k, "qos": 1})
            stored.append(ok["mid"])
    finally:
        slow.ws.transport.resume_reading()
    code, frames = await slow.closed(10)
    # The bye and the 4009 are written after everything that was in the socket; if the
    # client is too slow draining, the hub aborts the socket (no close frame).
    if code is not None:
        assert code == 4009
        assert frames[-1] == {"t": "bye", "reason": "slow_consumer"}
    # memory was bounded: the queued frames past the bound were dropped, not sent
    assert len(frames) < closed_at + len(stored) - 40
    # its QoS 1 messages stayed queued: a new session gets them, in order
    again = await RawNode.connect(h, slow_id)
    assert again.welcome["pending"] == len(stored)
    msgs = await recv_msgs(again, len(stored))
    assert [m["mid"] for m in msgs] == stored
    await again.send({"t": "ack", "mids": stored})
    reader.cancel()


# -- a raw RFC 6455 client, to see every byte the hub writes -------------------------


class _RawWs:
    """The hub's frames through protocol.wsframes, fed a byte at a time so that anything
    the hub writes after its close frame is counted in `after_close`."""

    def __init__(self, r: asyncio.StreamReader) -> None:
        self.r = r
        self.frames = FrameReader(server=False, max_message_bytes=1 << 24)
        self.pending: list[Event] = []
        self.after_close = 0

    async def event(self) -> Event:
        while not self.pending:
            data = await self.r.read(65536)
            if not data:
                raise asyncio.IncompleteReadError(b"", None)
            for i in range(len(data)):
                if self.frames.done:
                    self.after_close += len(data) - i
                    break
                self.pending += self.frames.feed(data[i:i + 1])
        return self.pending.pop(0)


_WS = FrameWriter(server=False, mask_key=ZERO_MASK_KEY)  # masked with a zero key


async def test_no_data_frame_after_close_frame(hub):
    """RFC 6455 §5.5.1 (docs/protocol.md §1): once the hub sent its close frame, the replies
    of requests still in flight (QoS 1 store writes) are not written after it."""
    for _ in range(3):
        r, w = await asyncio.open_connection("127.0.0.1", hub.ws_port)
        key = base64.b64encode(os.urandom(16)).decode()
        w.write(("GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                 f"Sec-WebSocket-Key: {key}\r\n\r\n").encode())
        assert b" 101 " in await r.readuntil(b"\r\n\r\n")
        ws = _RawWs(r)
        ident = Identity.generate()
        ch = msgpack.unpackb(await ws.event())
        w.write(_WS.message(msgpack.packb(
            {"t": "hello", "key": ident.public_key,
             "sig": ident.sign_auth(ch["hub"], ch["nonce"])})))
        assert msgpack.unpackb(await ws.event())["t"] == "welcome"
        # QoS 1 sends (answered after a store write) then a text message (close 1003)
        w.write(_WS.messages([msgpack.packb(
            {"t": "send", "id": i, "to": "nobody", "body": b"x", "qos": 1})
            for i in range(5)]) + _WS.frame(OP_TEXT, b"text"))
        events: list[Event] = []
        try:
            while True:
                events.append(await asyncio.wait_for(ws.event(), timeout(0.3)))
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        last = events[-1] if events else None
        assert type(last) is Close and last.code == 1003, events
        assert ws.after_close == 0  # not a byte after the close frame
        w.close()
