"""The node client SDK (protocol/client.py) end to end through a real hub: direct QoS 0
and QoS 1 with auto-ack and receipts, topics, and a hub restart the SDK rides through
(reconnect, resubscribe with `since`, nothing lost)."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

from openred.client import Client, Message, Receipt
from openred.protocol.identity import Identity

from tests.conftest import timeout
from tests.hub.nodes import RawNode, eventually


def ws_url(hub: Any) -> str:
    return f"ws://127.0.0.1:{hub.ws_port}/v1/ws"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def next_msg(c: Client, wait: float = 5.0) -> Message:
    return await asyncio.wait_for(anext(c), timeout(wait))


async def test_sdk_direct_qos0_qos1_and_topics(hub):
    receipts: list[Receipt] = []
    async with Client(ws_url(hub), identity=Identity.generate(),
                      on_receipt=receipts.append) as a, \
            Client(ws_url(hub), identity=Identity.generate()) as b:
        assert a.node_id and b.node_id and a.node_id != b.node_id
        assert await a.presence([b.node_id]) == {b.node_id: True}
        # QoS 0
        mid0 = await a.send(b.node_id, b"zero")
        m = await next_msg(b)
        assert (m.mid, m.sender, m.body, m.qos, m.topic) == (mid0, a.node_id, b"zero", 0,
                                                            None)
        # QoS 1 with a receipt: acked automatically when b asks for the next message
        mid1 = await a.send(b.node_id, b"one", qos=1, receipt=True)
        m = await next_msg(b)
        assert (m.mid, m.body, m.qos) == (mid1, b"one", 1)
        mid2 = await a.send(b.node_id, b"two")
        m = await next_msg(b)  # this call acks "one"
        assert m.mid == mid2
        await eventually(lambda: receipts, 5)
        assert receipts[0].mid == mid1 and receipts[0].to == b.node_id
        st = await hub.node.store.message_state(mid1, time.time_ns() // 1_000_000)
        assert st is not None and st.state == "acked"
        # topics
        sub = await b.subscribe("room/1")
        assert (sub.seq, sub.recovered) == (0, None)
        for i in range(3):
            _mid, seq = await a.publish("room/1", b"p%d" % i)
            assert seq == i + 1
        got = [await next_msg(b) for _ in range(3)]
        assert [(g.topic, g.seq, g.body, g.sender) for g in got] == [
            ("room/1", i + 1, b"p%d" % i, a.node_id) for i in range(3)]
        assert b.subscriptions == {"room/1": 3}
        # a since-subscribe from another client recovers history
        async with Client(ws_url(hub), identity=Identity.generate()) as c:
            sub = await c.subscribe("room/1", since=1)
            assert (sub.seq, sub.recovered) == (3, True)
            assert [(await next_msg(c)).seq for _ in range(2)] == [2, 3]


async def test_sdk_qos1_offline_then_delivered_and_acked(hub):
    bid = Identity.generate()
    async with Client(ws_url(hub), identity=Identity.generate()) as a:
        mids = [await a.send(bid.node_id, b"%d" % i, qos=1) for i in range(20)]
        async with Client(ws_url(hub), identity=bid) as b:
            assert b.welcome is not None and b.welcome.pending == 20
            got = [await next_msg(b) for _ in range(20)]
            assert [g.mid for g in got] == mids
            await b.ack(got[-1])  # the last one explicitly; the others by iteration
            await b.presence([])  # the ack went out before this reply came back
        async with Client(ws_url(hub), identity=bid) as b2:
            assert b2.welcome is not None and b2.welcome.pending == 0


async def test_sdk_reconnects_after_restart_without_loss(make_hub):
    port = free_port()
    cfg = {"server.ws_port": port, "store.topic_history": 1000}
    h = await make_hub(**cfg)
    url = ws_url(h)
    states: list[str] = []
    opts: dict[str, Any] = {"backoff_min_s": 0.05, "backoff_max_s": 0.5,
                            "request_timeout_s": 15}
    async with Client(url, identity=Identity.generate(), **opts) as a, \
            Client(url, identity=Identity.generate(), on_state=states.append, **opts) as b:
        await b.subscribe("news")
        for i in range(3):
            await a.publish("news", b"%d" % i)
        assert [(await next_msg(b)).seq for _ in range(3)] == [1, 2, 3]
        qos1_before = await a.send(b.node_id, b"q-before", qos=1)
        m = await next_msg(b)
        assert m.mid == qos1_before  # taken, not acked yet (acked on the next request)
        await h.stop()
        h2 = await make_hub(**cfg)
        assert h2.ws_port == port
        # published while the clients are still away (bye retry_ms >= 1 s)
        raw = await RawNode.connect(h2)
        for i in range(3, 6):
            ok = await raw.request({"t": "pub", "id": i, "topic": "news",
                                    "body": b"%d" % i})
            assert ok["seq"] == i + 1
        qos1_after = await a.send(b.node_id, b"q-after", qos=1)  # waits for reconnect
        await raw.request({"t": "pub", "id": "live", "topic": "news", "body": b"6"})
        got: list[Message] = []
        async with asyncio.timeout(timeout(20)):
            while len([g for g in got if g.topic]) < 4 or all(g.topic for g in got):
                got.append(await next_msg(b, 20))
        topic_msgs = [g for g in got if g.topic]
        assert [(g.seq, g.body) for g in topic_msgs] == [
            (i + 1, b"%d" % i) for i in range(3, 7)]
        # the unacked one was still pending for the new session; the SDK drops the
        # redelivered copy by mid (§4) and acks it (asking for the next message did)
        assert b.welcome is not None and b.welcome.pending >= 1
        direct = [g.mid for g in got if not g.topic]
        assert direct == [qos1_after]
        assert "reconnecting" in states and states[-1] == "connected"
        assert b.subscriptions == {"news": 7}
        # the live subscription holds on the new hub
        _mid, seq = await a.publish("news", b"7")
        assert seq == 8
        assert (await next_msg(b)).seq == 8
        store = h2.node.store

        async def acked(mid: str) -> bool:
            st = await store.message_state(mid, time.time_ns() // 1_000_000)
            return st is not None and st.state == "acked"

        for mid in (qos1_before, qos1_after):
            await eventually(lambda mid=mid: acked(mid), 5)
