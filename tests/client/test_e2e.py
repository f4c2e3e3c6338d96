"""The node client SDK end to end through a real (in-process) hub: direct QoS 0 and 1,
receipts, topics through `Subscription`s, a hub restart the SDK rides through, and the
additions of docs/protocol.md §4.1-§6.1 and §12-§13 as the SDK speaks them: `cid`
repeats (§4.2), request/reply (§4.3), signed publications (§5.1), history (§5.2),
presence watch (§6.1), end-to-end signatures and encryption (§12: the store and the
wire hold only ciphertext), trace context (§13)."""

from __future__ import annotations

import asyncio
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openred.client import (
    Client,
    Disconnected,
    GroupKeys,
    Message,
    PresenceChanged,
    Receipt,
    RemoteError,
    RequestTimeout,
    StateEvent,
    TopicGap,
    _otel,
)
from openred.client.crypto import topic_message
from openred.protocol.identity import Identity

from tests.cluster.conftest import free_port
from tests.conftest import timeout
from tests.hub.nodes import RawNode, eventually


def ws_url(hub: Any, port: int | None = None) -> str:
    return f"ws://127.0.0.1:{port or hub.ws_port}/v1/ws"


async def next_msg(it: Any, wait: float = 5.0) -> Any:
    # asyncio.timeout, not wait_for: the same task takes each message, so auto-ack
    # (per task for anext(client)) acks the previous one.
    async with asyncio.timeout(timeout(wait)):
        return await anext(it)


def node(hub: Any, **kw: Any) -> Client:
    kw.setdefault("identity", Identity.generate())
    return Client(ws_url(hub), **kw)


async def test_sdk_direct_qos0_qos1_and_topics(hub: Any) -> None:
    receipts: list[Receipt] = []
    async with node(hub, on_receipt=receipts.append) as a, node(hub) as b:
        assert a.node_id and b.node_id and a.node_id != b.node_id
        assert await a.presence([b.node_id]) == {b.node_id: True}
        mid0 = await a.send(b.node_id, b"zero")
        m = await next_msg(b)
        assert (m.mid, m.sender, m.body, m.qos, m.topic) == (mid0, a.node_id, b"zero", 0,
                                                            None)
        mid1 = await a.send(b.node_id, b"one", qos=1, receipt=True)
        m = await next_msg(b)
        assert (m.mid, m.body, m.qos) == (mid1, b"one", 1)
        await m.ack()
        await eventually(lambda: receipts, 5)
        assert receipts[0].mid == mid1 and receipts[0].to == b.node_id
        st = await hub.node.store.message_state(mid1, time.time_ns() // 1_000_000)
        assert st is not None and st.state == "acked"
        sub = await b.subscribe("room/1")
        assert (sub.seq, sub.recovered) == (0, None)
        for i in range(3):
            _mid, seq = await a.publish("room/1", b"p%d" % i)
            assert seq == i + 1
        got = [await next_msg(sub) for _ in range(3)]
        assert [(g.topic, g.seq, g.body, g.sender) for g in got] == [
            ("room/1", i + 1, b"p%d" % i, a.node_id) for i in range(3)]
        assert b.subscriptions == {"room/1": 3}
        async with node(hub) as c:
            sub_c = await c.subscribe("room/1", since=1)
            assert (sub_c.seq, sub_c.recovered) == (3, True)
            assert [(await next_msg(sub_c)).seq for _ in range(2)] == [2, 3]


async def test_sdk_qos1_offline_then_delivered_and_acked(hub: Any) -> None:
    bid = Identity.generate()
    async with node(hub) as a:
        mids = [await a.send(bid.node_id, b"%d" % i, qos=1) for i in range(20)]
        async with node(hub, identity=bid) as b:
            assert b.welcome is not None and b.welcome.pending == 20
            got = [await next_msg(b) for _ in range(20)]
            assert [g.mid for g in got] == mids
            await got[-1].ack()  # the last one explicitly; the others by iteration
            await b.presence([])  # the ack went out before this reply came back
        async with node(hub, identity=bid) as b2:
            assert b2.welcome is not None and b2.welcome.pending == 0


async def test_sdk_reconnects_after_restart_without_loss(make_hub: Any) -> None:
    port = free_port()
    cfg = {"server.ws_port": port, "store.topic_history": 1000}
    h = await make_hub(**cfg)
    states: list[StateEvent] = []
    opts: dict[str, Any] = {"backoff_min_s": 0.05, "backoff_max_s": 0.5,
                            "connect_timeout_s": timeout(20)}
    async with node(h, **opts) as a, node(h, on_state=states.append, **opts) as b:
        news = await b.subscribe("news")
        for i in range(3):
            await a.publish("news", b"%d" % i)
        assert [(await next_msg(news)).seq for _ in range(3)] == [1, 2, 3]
        qos1_before = await a.send(b.node_id, b"q-before", qos=1)
        m = await next_msg(b)
        assert m.mid == qos1_before  # taken, not acked yet (acked on the next request)
        await h.stop()
        h2 = await make_hub(**cfg)
        raw = await RawNode.connect(h2)
        for i in range(3, 6):
            ok = await raw.request({"t": "pub", "id": i, "topic": "news",
                                    "body": b"%d" % i})
            assert ok["seq"] == i + 1
        qos1_after = await a.send(b.node_id, b"q-after", qos=1)  # waits for reconnect
        await raw.request({"t": "pub", "id": "live", "topic": "news", "body": b"6"})
        assert [((g := await next_msg(news, 20)).seq, g.body) for _ in range(4)] == [
            (i + 1, b"%d" % i) for i in range(3, 7)]
        # The unacked one was pending for the new session; the SDK drops the repeat
        # by mid (§4) and acks it (asking for the next message did).
        assert (await next_msg(b, 20)).mid == qos1_after
        assert any(isinstance(s, Disconnected) and s.will_retry for s in states)
        assert b.subscriptions == {"news": 7}
        _mid, seq = await a.publish("news", b"7")
        assert seq == 8 and (await next_msg(news)).seq == 8
        store = h2.node.store

        async def acked(mid: str) -> bool:
            st = await store.message_state(mid, time.time_ns() // 1_000_000)
            return st is not None and st.state == "acked"

        await b.presence([])
        for mid in (qos1_before,):
            await eventually(lambda mid=mid: acked(mid), 5)


# -- §4.2 cid ------------------------------------------------------------------------


async def test_cid_repeat_is_stored_once(hub: Any) -> None:
    async with node(hub) as a, node(hub) as b:
        assert b.node_id is not None
        mid = await a.send(b.node_id, b"reading", qos=1, cid="r-1")
        # A restart of the sender, in effect: a new session repeats the cid.
        async with node(hub, identity=a.identity) as a2:
            assert await a2.send(b.node_id, b"reading", qos=1, cid="r-1") == mid
        m = await next_msg(b)
        assert m.mid == mid
        await m.ack()
        with pytest.raises(TimeoutError):
            await next_msg(b, 0.5)


# -- §4.3 request / reply ------------------------------------------------------------


async def test_request_reply_and_remote_error(hub: Any) -> None:
    async def handler(msg: Message) -> bytes:
        if msg.body == b"boom":
            raise ValueError("cannot do boom")
        if msg.body == b"wrong type":
            return "not bytes"  # type: ignore[return-value]
        return msg.body.upper()

    async with node(hub, on_request=handler) as server, node(hub) as caller:
        assert server.node_id is not None
        reply = await caller.request(server.node_id, b"hello", timeout_s=timeout(5))
        assert reply.body == b"HELLO" and reply.sender == server.node_id
        with pytest.raises(RemoteError, match="cannot do boom"):
            await caller.request(server.node_id, b"boom", timeout_s=timeout(5))
        with pytest.raises(RemoteError):  # a handler returning no bytes fails too
            await caller.request(server.node_id, b"wrong type", timeout_s=timeout(5))
        # QoS 1 request: stored, the reply is QoS 1 too and acked by the SDK.
        reply = await caller.request(server.node_id, b"q", qos=1, timeout_s=timeout(5))
        assert (reply.body, reply.qos) == (b"Q", 1)
        # Several in flight, each matched to its own reply.
        bodies = [b"a%d" % i for i in range(10)]
        replies = await asyncio.gather(*(caller.request(server.node_id, x)
                                         for x in bodies))
        assert [r.body for r in replies] == [x.upper() for x in bodies]


async def test_request_without_handler_and_manual_reply(hub: Any) -> None:
    async with node(hub) as server, node(hub) as caller:
        assert server.node_id is not None

        async def serve_one() -> None:
            async for msg in server:
                assert msg.request_id is not None
                await server.reply(msg, b"pong:" + msg.body)
                return

        task = asyncio.create_task(serve_one())
        reply = await caller.request(server.node_id, b"ping", timeout_s=timeout(5))
        await task
        assert reply.body == b"pong:ping" and reply.reply_to is not None
        with pytest.raises(RequestTimeout):  # nobody answers: a typed timeout
            await caller.request(server.node_id, b"again", timeout_s=0.3)


async def test_a_late_reply_is_dropped_not_queued(hub: Any) -> None:
    """A reply after its request gave up is not put in the inbox: a client that only
    makes requests never reads it, and a full inbox stops the reading (§7)."""
    async with node(hub) as server, node(hub) as caller:
        assert server.node_id is not None and caller.node_id is not None

        async def first(client: Any) -> Any:
            async for msg in client:
                return msg

        with pytest.raises(RequestTimeout):
            await caller.request(server.node_id, b"slow", timeout_s=0.3)
        request = await asyncio.wait_for(first(server), timeout(5))
        await server.reply(request, b"late")
        await server.send(caller.node_id, b"plain")
        got = await asyncio.wait_for(first(caller), timeout(5))
        assert (got.body, got.reply_to) == (b"plain", None)


# -- §5.1 / §5.2 / §6.1 --------------------------------------------------------------


async def test_history_last_n(make_hub: Any) -> None:
    h = await make_hub(**{"store.topic_history": 50})
    async with node(h) as a:
        for i in range(30):
            await a.publish("log", b"%d" % i)
        page = await a.history("log", limit=10)
        assert page.seq == 30 and page.more is True
        assert [(m.seq, m.body) for m in page.messages] == [
            (i + 1, b"%d" % i) for i in range(20, 30)]
        older = await a.history("log", limit=10, before=page.messages[0].seq)
        assert [m.seq for m in older.messages] == list(range(11, 21))
        first = await a.history("log", limit=100, before=11)
        assert [m.seq for m in first.messages] == list(range(1, 11))
        assert first.more is False
        assert (await a.history("empty")).messages == []


async def test_watch_presence_events(hub: Any) -> None:
    bid = Identity.generate()
    events: list[Any] = []
    async with node(hub, on_event=events.append) as watcher:
        w = await watcher.watch([bid.node_id])
        assert w.online == {bid.node_id: False}
        async with node(hub, identity=bid) as b:
            ev = await next_msg(w)
            assert (ev.node, ev.online, ev.topic) == (bid.node_id, True, None)
            assert w.online[bid.node_id] is True
            tw = await watcher.watch(topic="room/9")
            await b.subscribe("room/9")
            ev = await next_msg(tw)
            assert (ev.node, ev.online, ev.topic) == (bid.node_id, True, "room/9")
        ev = await next_msg(w)
        assert (ev.node, ev.online) == (bid.node_id, False)
        assert any(isinstance(e, PresenceChanged) for e in events)
        await w.close()
        await tw.close()


async def test_signed_direct_and_topic_messages_are_verified(hub: Any) -> None:
    async with node(hub, sign=True) as a, node(hub) as b:
        assert a.node_id is not None and b.node_id is not None
        sub = await b.subscribe("signed")
        await a.send(b.node_id, b"direct")
        await a.publish("signed", b"topic")
        d = await next_msg(b)
        t = await next_msg(sub)
        assert (d.body, d.verified) == (b"direct", True)
        assert (t.body, t.verified) == (b"topic", True)
        await a.send(b.node_id, b"unsigned", sign=False)
        assert (await next_msg(b)).verified is None
        # A tampered body: a signature made for other bytes (a raw node with a key).
        mallory = Identity.generate()
        raw = await RawNode.connect(hub, mallory)
        await raw.request({"t": "send", "id": 1, "to": b.node_id, "body": b"tampered",
                           "sig": mallory.sign_body(b.node_id, b"original")})
        await raw.request({"t": "pub", "id": 2, "topic": "signed", "body": b"tampered",
                           "sig": mallory.sign(topic_message("signed", b"original"))})
        assert (await next_msg(b)).verified is False
        assert (await next_msg(sub)).verified is False


async def test_hub_checks_topic_signatures_when_configured(make_hub: Any) -> None:
    h = await make_hub(**{"auth.verify_body_sig": True})
    async with node(h, sign=True) as a, node(h) as b:
        assert b.node_id is not None
        sub = await b.subscribe("t")
        await a.publish("t", b"ok")
        assert (await next_msg(sub)).verified is True
        await a.send(b.node_id, b"ok")
        assert (await next_msg(b)).verified is True


def store_files(folder: Path) -> list[tuple[str, bytes]]:
    """The test hub's SQLite file and its WAL, as bytes."""
    files = [(f.name, f.read_bytes()) for f in folder.glob("hub.db*")]
    assert files
    return files


class RecordingProxy:
    """A TCP proxy between a client and the hub that keeps every byte both ways."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = 0
        self.seen = bytearray()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.target)
        for src, dst in ((r, uw), (ur, w)):
            t = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                self.seen += data
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            dst.close()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def test_encrypted_bodies_are_ciphertext_in_the_store_and_on_the_wire(
        make_hub: Any, tmp_path: Path) -> None:
    # A SQLite store whatever the suite's backend: the test reads its file.
    hub = await make_hub(**{"store.url": f"sqlite:///{tmp_path}/hub.db"})
    secret_direct = b"SECRET-DIRECT-" + b"d" * 20
    secret_topic = b"SECRET-TOPIC-" + b"t" * 20
    proxy = RecordingProxy(hub.ws_port)
    await proxy.start()
    group_key = b"\x07" * 32
    keys_a, keys_b = GroupKeys(), GroupKeys()
    keys_a.add("vault", "2026-12", group_key)
    keys_b.add("vault", "2026-12", group_key)
    try:
        url = ws_url(hub, proxy.port)
        async with Client(url, identity=Identity.generate(), encrypt=True, sign=True,
                          group_keys=keys_a) as a, \
                Client(url, identity=Identity.generate(), group_keys=keys_b) as b, \
                Client(url, identity=Identity.generate()) as c:
            assert b.node_id is not None
            sub = await b.subscribe("vault")
            sub_c = await c.subscribe("vault")
            await a.send(b.node_id, secret_direct, qos=1)  # stored by the hub
            await a.publish("vault", secret_topic)
            d = await next_msg(b)
            assert (d.body, d.enc, d.verified, d.decrypted) == (secret_direct, "box", True,
                                                                True)
            assert secret_direct not in d.raw
            t = await next_msg(sub)
            assert (t.body, t.enc, t.meta.get("kid")) == (secret_topic, "secretbox",
                                                          "2026-12")
            # A subscriber without the group key gets the message but cannot read it.
            tc = await next_msg(sub_c)
            assert tc.enc == "secretbox" and not tc.decrypted
            with pytest.raises(Exception, match="group key"):
                _ = tc.body
            await d.ack()
            await b.presence([])
            page = await b.history("vault")
            assert [m.body for m in page.messages] == [secret_topic]
    finally:
        await proxy.close()
    wire = bytes(proxy.seen)
    assert len(wire) > 0
    for secret in (secret_direct, secret_topic):
        assert secret not in wire
        for name, data in store_files(tmp_path):
            assert secret not in data, name


async def test_wrong_recipient_cannot_open_a_box(hub: Any) -> None:
    """A box sealed for B, relayed to C (by a node replaying its bytes), does not open
    for C: C's message says so and its body raises."""
    alice, bob = Identity.generate(), Identity.generate()
    from openred.client.crypto import seal_box

    sealed = seal_box(alice, bob.public_key, b"for bob")
    raw = await RawNode.connect(hub, alice)
    async with node(hub) as c:
        assert c.node_id is not None
        await raw.request({"t": "send", "id": 1, "to": c.node_id, "body": sealed,
                           "meta": {"enc": "box"}})
        m = await next_msg(c)
        assert m.enc == "box" and not m.decrypted and m.raw == sealed
        with pytest.raises(Exception, match="does not open"):
            _ = m.body


@pytest.fixture
def fake_otel(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    prop = types.ModuleType("opentelemetry.propagate")
    parent = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    prop.inject = lambda carrier: carrier.update({"traceparent": parent})  # type: ignore[attr-defined]
    prop.extract = lambda carrier: ("ctx", carrier.get("traceparent"))  # type: ignore[attr-defined]
    pkg = types.ModuleType("opentelemetry")
    pkg.propagate = prop  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "opentelemetry", pkg)
    monkeypatch.setitem(sys.modules, "opentelemetry.propagate", prop)
    _otel.reset()
    yield
    _otel.reset()


async def test_trace_context_travels_in_meta(hub: Any, fake_otel: None) -> None:
    async with node(hub) as a, node(hub) as b:
        assert b.node_id is not None
        sub = await b.subscribe("traced")
        await a.send(b.node_id, b"x")
        await a.publish("traced", b"y")
        for m in (await next_msg(b), await next_msg(sub)):
            assert m.meta["traceparent"].startswith("00-")
            assert m.trace_context is not None and m.trace_context[0] == "ctx"


async def test_sdk_topic_gap_after_a_reconnect_is_a_typed_event(make_hub: Any) -> None:
    """§5: publications dropped from history while the node was away come back as one
    `TopicGap` in its subscription (and to `on_event`), before what history still held;
    the disconnect itself is a typed `Disconnected` that will retry."""
    hub = await make_hub(**{"store.topic_history": 2})
    states: list[StateEvent] = []
    events: list[Any] = []
    async with node(hub, backoff_min_s=0.5, backoff_max_s=1.0, on_state=states.append,
                    on_event=events.append) as b, node(hub) as a:
        sub = await b.subscribe("feed")
        await a.publish("feed", b"1")
        assert (await next_msg(sub)).seq == 1
        hub.node.local[b.node_id].close(4011, "idle timeout")  # §9: reconnect
        await eventually(lambda: not b.connected, 5)
        for i in range(2, 7):  # history keeps 5 and 6 only
            await a.publish("feed", b"%d" % i)
        await b.wait_connected()
        gap = await next_msg(sub)
        assert gap == TopicGap("feed", 2, 4)
        assert [(m.seq, m.body) for m in [await next_msg(sub) for _ in range(2)]] == [
            (5, b"5"), (6, b"6")]
    assert TopicGap("feed", 2, 4) in events
    assert any(isinstance(s, Disconnected) and s.code == 4011 and s.will_retry
               for s in states)
