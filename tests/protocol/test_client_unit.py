"""Unit tests of the node client SDK (protocol.client) against a tiny fake hub.

The fake hub is written here with websockets' asyncio server on port 0: it speaks enough
of docs/protocol.md (challenge, signed hello checked with `verify_signature`, welcome, ok /
error replies by id) and lets a test push frames, batches, `bye`, and close with a
chosen code. The real hub is exercised in tests/hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from typing import Any

import pytest
from openred.client import (
    Client,
    Disconnected,
    HubError,
    Message,
    Receipt,
    backoff_delay,
)
from openred.protocol.errors import (
    CLOSE_AUTH_FAILED,
    CLOSE_FORBIDDEN,
    CLOSE_REPLACED,
    CLOSE_RESTART,
    CLOSE_UNDECODABLE,
    FrameError,
    HandshakeError,
)
from openred.protocol.frames import (
    Ack,
    ClientFrame,
    Hello,
    Presence,
    Pub,
    Send,
    Sub,
    Unsub,
    batch_of,
    decode_client,
    encode_bye,
    encode_challenge,
    encode_error,
    encode_msg,
    encode_ok,
    encode_receipt,
    encode_topic_msg,
    encode_welcome,
)
from openred.protocol.identity import Identity, auth_message, node_id_for_key, verify_signature
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from tests.conftest import FACTOR, timeout

# The suite's one timing factor (OPENRED_TEST_TIMEOUT_FACTOR) scales every wait.
SCALE = FACTOR
WAIT_S = timeout(5.0)
HUB_ID = "fake-hub"
TOKEN = "good-token"
TOKEN_NODE = "token-node"
LIMITS = {"max_frame_bytes": 131072, "max_body_bytes": 65536, "msgs_per_s": 1000,
          "burst": 1000, "max_topics": 1000}


# -- the fake hub --------------------------------------------------------------------


class FakeHub:
    """Speaks §2 and §3 well enough for the SDK; records every client frame."""

    def __init__(self) -> None:
        self.server: Server | None = None
        self.url = ""
        self.sessions: list[ServerConnection] = []
        self.hellos: list[Hello] = []
        self.frames: list[tuple[int, ClientFrame | FrameError]] = []  # (session no, f)
        self.raw_messages = 0
        self.refuse: tuple[str, int] | None = None  # (error code, close code)
        self.errors: dict[str, str] = {}  # `to` or topic -> error code to answer
        self.hold = 0  # collect this many requests, then answer them in reverse order
        self.held: list[bytes] = []
        self.silent = False  # answer no request at all
        self.reject_upgrades = 0  # answer this many upgrades with HTTP 503
        self.upgrade_times: list[float] = []
        self.welcome_times: list[float] = []
        self.topic_seq: dict[str, int] = {}
        self.client_close_codes: list[int | None] = []
        self.limits = dict(LIMITS)  # sent in the welcome
        self.drop_on_resub = 0  # close this many sessions (1012) on a `sub` with since

    async def __aenter__(self) -> FakeHub:
        self.server = await serve(self._handler, "127.0.0.1", 0, compression=None,
                                  process_request=self._process_request)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}/v1/ws"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        self.upgrade_times.append(time.monotonic())
        if self.reject_upgrades > 0:
            self.reject_upgrades -= 1
            return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "busy\n")
        return None

    # what tests look at

    def of_type(self, cls: type[Any], session: int | None = None) -> list[Any]:
        return [f for s, f in self.frames
                if isinstance(f, cls) and (session is None or s == session)]

    @property
    def current(self) -> ServerConnection:
        return self.sessions[-1]

    async def push(self, data: bytes, session: int = -1) -> None:
        await self.sessions[session].send(data)

    async def kick(self, code: int, reason: str = "", bye: bytes | None = None) -> None:
        ws = self.current
        if bye is not None:
            await ws.send(bye)
        await ws.close(code, reason)

    # the protocol

    async def _handler(self, ws: ServerConnection) -> None:
        nonce = os.urandom(32)
        await ws.send(encode_challenge(HUB_ID, nonce))
        try:
            hello = decode_client(await ws.recv())[0]  # type: ignore[arg-type]
        except ConnectionClosed:
            return
        assert isinstance(hello, Hello)
        self.hellos.append(hello)
        if self.refuse is not None:
            code, close_code = self.refuse
            await ws.send(encode_error(None, code, "refused"))
            await ws.close(close_code, code)
            return
        if hello.key is not None:
            assert hello.sig is not None
            if not verify_signature(hello.key, auth_message(HUB_ID, nonce), hello.sig):
                await ws.send(encode_error(None, "auth_failed", "bad signature"))
                await ws.close(CLOSE_AUTH_FAILED, "auth_failed")
                return
            node = node_id_for_key(hello.key)
        elif hello.token == TOKEN:
            node = TOKEN_NODE
        else:
            await ws.send(encode_error(None, "auth_failed", "bad token"))
            await ws.close(CLOSE_AUTH_FAILED, "auth_failed")
            return
        self.sessions.append(ws)
        no = len(self.sessions)
        self.welcome_times.append(time.monotonic())
        await ws.send(encode_welcome(node, f"s{no}", 30, 0, self.limits))
        try:
            async for data in ws:
                assert isinstance(data, bytes)
                self.raw_messages += 1
                for frame in decode_client(data):
                    self.frames.append((no, frame))
                    await self._answer(ws, frame)
        except ConnectionClosed:
            pass
        finally:
            self.client_close_codes.append(ws.close_code)

    async def _answer(self, ws: ServerConnection, f: ClientFrame | FrameError) -> None:
        if isinstance(f, FrameError):
            await ws.send(encode_error(f.id, f.code, f.msg))
            return
        if isinstance(f, Ack | Hello):
            return
        fid = f.id
        if fid is None:
            if isinstance(f, Send) and f.to in self.errors:
                await ws.send(encode_error(None, self.errors[f.to], "refused"))
            return
        if self.silent:
            return
        if isinstance(f, Sub) and f.since is not None and self.drop_on_resub > 0:
            self.drop_on_resub -= 1
            await ws.close(CLOSE_RESTART, "restart")
            return
        reply: bytes
        if isinstance(f, Send):
            if f.to in self.errors:
                reply = encode_error(fid, self.errors[f.to], "refused")
            else:
                reply = encode_ok(fid, mid="mid-" + f.body.decode(),
                                  status="stored" if f.qos == 1 else "sent")
        elif isinstance(f, Pub):
            seq = self.topic_seq.get(f.topic, 0) + 1
            self.topic_seq[f.topic] = seq
            reply = encode_ok(fid, mid="mid-" + f.body.decode(), seq=seq)
        elif isinstance(f, Sub):
            if f.topic in self.errors:
                reply = encode_error(fid, self.errors[f.topic], "refused")
            elif f.since is not None:
                reply = encode_ok(fid, seq=self.topic_seq.get(f.topic, 0), recovered=True)
            else:
                reply = encode_ok(fid, seq=self.topic_seq.get(f.topic, 0))
        elif isinstance(f, Unsub):
            reply = encode_ok(fid)
        elif isinstance(f, Presence):
            reply = encode_ok(fid, online={n: n.startswith("on") for n in f.nodes})
        else:
            raise AssertionError(f"unexpected frame {f!r}")
        if self.hold:
            self.held.append(reply)
            if len(self.held) == self.hold:
                for r in reversed(self.held):
                    await ws.send(r)
                self.held.clear()
            return
        await ws.send(reply)


# -- helpers and fixtures ------------------------------------------------------------


async def eventually(pred: Callable[[], bool], within_s: float = WAIT_S) -> None:
    """Poll `pred` (state of the fake hub or the client, no event to wait on)."""
    async with asyncio.timeout(within_s):
        while not pred():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def next_msg(c: Client, within_s: float = WAIT_S) -> Message:
    async with asyncio.timeout(within_s):
        return await anext(c)


def msg(mid: str, body: bytes = b"x", qos: int = 0, sender: str = "peer") -> bytes:
    return encode_msg(mid, sender, body, 1_700_000_000_000, qos)


@pytest.fixture(autouse=True)
async def loop_hygiene() -> AsyncIterator[None]:
    """Fail on an unhandled loop exception, and on a client task left running."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    yield
    await asyncio.sleep(0)
    left = [t for t in asyncio.all_tasks()
            if t.get_name().startswith("openred-client") and not t.done()]
    loop.set_exception_handler(None)
    assert not left, left
    assert not errors, errors


@pytest.fixture
async def hub() -> AsyncIterator[FakeHub]:
    async with FakeHub() as h:
        yield h


@pytest.fixture
def ident() -> Identity:
    return Identity.generate()


def client(hub: FakeHub, ident: Identity, **kw: Any) -> Client:
    kw.setdefault("backoff_min_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)
    kw.setdefault("request_timeout_s", WAIT_S)
    return Client(hub.url, identity=ident, **kw)


# -- handshake -----------------------------------------------------------------------


async def test_connect_with_key(hub: FakeHub, ident: Identity) -> None:
    states: list[str] = []
    async with client(hub, ident, on_state=states.append, meta={"v": "1"}) as c:
        assert c.connected
        assert c.node_id == ident.node_id
        assert c.session == "s1"
        assert c.welcome is not None and c.welcome.limits["max_topics"] == 1000
        hello = hub.hellos[0]
        assert hello.key == ident.public_key and hello.meta == {"v": "1"}
        assert hello.batch is False and hello.v == 1
    assert states == ["connected", "closed"]
    await eventually(lambda: hub.client_close_codes == [1000])


async def test_connect_with_key_file_and_token(hub: FakeHub, ident: Identity,
                                               tmp_path: Any) -> None:
    from openred.protocol.identity import save_key_file

    path = tmp_path / "node.key"
    save_key_file(ident, path)
    async with Client(hub.url, key_file=path) as c:
        assert c.node_id == ident.node_id
    async with Client(hub.url, token=TOKEN) as c:
        assert c.node_id == TOKEN_NODE and c.identity is None
        assert hub.hellos[-1].token == TOKEN


def test_exactly_one_credential(ident: Identity) -> None:
    with pytest.raises(ValueError):
        Client("ws://x/v1/ws")
    with pytest.raises(ValueError):
        Client("ws://x/v1/ws", identity=ident, token="t")


@pytest.mark.parametrize(("code", "close_code"), [("auth_failed", CLOSE_AUTH_FAILED),
                                                  ("forbidden", CLOSE_FORBIDDEN)])
async def test_connect_refused_fails_fast(hub: FakeHub, ident: Identity, code: str,
                                          close_code: int) -> None:
    hub.refuse = (code, close_code)
    c = client(hub, ident)
    t0 = time.monotonic()
    with pytest.raises(HandshakeError) as info:
        await c.connect()
    assert info.value.code == code
    assert info.value.close_code == close_code
    assert time.monotonic() - t0 < WAIT_S / 2
    assert len(hub.hellos) == 1  # no retry
    await c.close()


async def test_bad_token_refused(hub: FakeHub) -> None:
    with pytest.raises(HandshakeError) as info:
        async with Client(hub.url, token="wrong"):
            pass
    assert info.value.code == "auth_failed"


# -- requests ------------------------------------------------------------------------


async def test_requests_and_replies_out_of_order(hub: FakeHub, ident: Identity) -> None:
    hub.hold = 4
    async with client(hub, ident) as c:
        r0, r1, r2, r3 = await asyncio.gather(
            c.send("bob", b"a"), c.send("bob", b"b", qos=1, ttl=60, receipt=True),
            c.publish("room/1", b"c"), c.presence(["on-1", "off-2"]))
        assert (r0, r1, r2, r3) == ("mid-a", "mid-b", ("mid-c", 1),
                                    {"on-1": True, "off-2": False})
        sends = hub.of_type(Send)
        assert [(s.body, s.qos, s.ttl, s.receipt) for s in sends] == [
            (b"a", 0, None, False), (b"b", 1, 60, True)]
        ids = [f.id for _, f in hub.frames]
        assert len(set(ids)) == 4 and all(type(i) is int for i in ids)
        hub.hold = 0
        assert await c.subscribe("room/1") == (1, None)
        await c.unsubscribe("room/1")
        assert c.subscriptions == {}


async def test_hub_error_maps_to_hub_error(hub: FakeHub, ident: Identity) -> None:
    hub.errors = {"gone": "no_route", "full": "queue_full", "secret/x": "forbidden"}
    async with client(hub, ident) as c:
        with pytest.raises(HubError) as info:
            await c.send("gone", b"x")
        assert info.value.code == "no_route" and info.value.msg == "refused"
        with pytest.raises(HubError, match="queue_full"):
            await c.send("full", b"x", qos=1)
        with pytest.raises(HubError) as info:
            await c.subscribe("secret/x")
        assert info.value.code == "forbidden"
        assert c.subscriptions == {}
        # The session goes on.
        assert await c.send("bob", b"ok") == "mid-ok"


async def test_local_checks(hub: FakeHub, ident: Identity) -> None:
    async with client(hub, ident) as c:
        with pytest.raises(ValueError):
            await c.send("not a node id!", b"x")
        with pytest.raises(ValueError):
            await c.send("bob", b"x", qos=2)
        with pytest.raises(ValueError):
            await c.subscribe("bad topic")
        with pytest.raises(HubError) as info:
            await c.send("bob", b"x" * (LIMITS["max_body_bytes"] + 1))
        assert info.value.code == "too_large"
        await c.send("bob", b"y")
        assert len(hub.of_type(Send)) == 1  # nothing refused here reached the hub


async def test_send_nowait_and_unsolicited_error(hub: FakeHub, ident: Identity) -> None:
    errors: list[HubError] = []
    hub.errors = {"gone": "rate_limited"}
    async with client(hub, ident, on_error=errors.append) as c:
        c.send_nowait("bob", b"1")
        c.send_nowait("gone", b"2")
        await c.send("bob", b"3")  # ordered after the two above
        assert [(s.id, s.body) for s in hub.of_type(Send)][:2] == [(None, b"1"),
                                                                   (None, b"2")]
        await eventually(lambda: len(errors) == 1)
        assert errors[0].code == "rate_limited"


async def test_request_timeout(hub: FakeHub, ident: Identity) -> None:
    hub.silent = True
    async with client(hub, ident, request_timeout_s=0.2) as c:
        with pytest.raises(TimeoutError):
            await c.send("bob", b"x", qos=1)


# -- inbound -------------------------------------------------------------------------


async def test_inbound_messages(hub: FakeHub, ident: Identity) -> None:
    receipts: list[Receipt] = []
    async with client(hub, ident, on_receipt=receipts.append) as c:
        await hub.push(encode_msg("m1", "alice", b"hi", 5, 0, sig=b"s" * 64))
        await hub.push(encode_topic_msg("m2", "carol", "room/1", 7, b"yo", 6))
        await hub.push(encode_receipt("m0", "dave", 9))
        first = await next_msg(c)
        assert first == Message("m1", "alice", b"hi", 5, 0, None, None, b"s" * 64)
        second = await next_msg(c)
        assert (second.mid, second.sender, second.topic, second.seq, second.body) == (
            "m2", "carol", "room/1", 7, b"yo")
        await eventually(lambda: receipts == [Receipt("m0", "dave", 9)])


async def test_auto_ack_after_the_body(hub: FakeHub, ident: Identity) -> None:
    async with client(hub, ident) as c:
        await hub.push(msg("q1", qos=1))
        await hub.push(msg("q2", qos=1))
        m = await next_msg(c)
        assert m.mid == "q1" and m.qos == 1
        await asyncio.sleep(0.1)
        assert hub.of_type(Ack) == []  # not while the body runs
        m = await next_msg(c)  # asking for the next acks the previous
        assert m.mid == "q2"
        await eventually(lambda: hub.of_type(Ack) == [Ack(["q1"])])
        received: list[str] = []

        async def consume() -> None:
            async for m in c:
                received.append(m.mid)
                if m.mid == "q3":
                    break

        await hub.push(msg("q3", qos=1))
        await asyncio.wait_for(consume(), WAIT_S)
        await eventually(lambda: hub.of_type(Ack) == [Ack(["q1"]), Ack(["q2"])])
        assert received == ["q3"]  # left with break: q3 is not acked (at least once)


async def test_manual_ack(hub: FakeHub, ident: Identity) -> None:
    async with client(hub, ident, auto_ack=False) as c:
        await hub.push(msg("q1", qos=1))
        await hub.push(msg("q2", qos=1))
        m1 = await next_msg(c)
        await next_msg(c)
        await asyncio.sleep(0.1)
        assert hub.of_type(Ack) == []
        await c.ack(m1)
        await c.ack("q2")
        await eventually(lambda: hub.of_type(Ack) == [Ack(["q1"]), Ack(["q2"])])


async def test_batches_both_ways(hub: FakeHub, ident: Identity) -> None:
    hub.hold = 3
    async with client(hub, ident, batch=True) as c:
        assert hub.hellos[0].batch is True
        await hub.push(batch_of([msg("b1"), msg("b2", qos=1),
                                 encode_topic_msg("b3", "x", "t/1", 1, b"t", 1)]))
        assert [(await next_msg(c)).mid for _ in range(3)] == ["b1", "b2", "b3"]
        # The client coalesces what waits in its outbox into one batch (§1).
        before = hub.raw_messages
        mids = await asyncio.gather(*(c.send("bob", str(i).encode()) for i in range(3)))
        assert mids == ["mid-0", "mid-1", "mid-2"]
        assert hub.raw_messages - before < 3


async def test_hub_batch_with_replies_and_messages(hub: FakeHub, ident: Identity) -> None:
    hub.silent = True
    async with client(hub, ident) as c:
        task = asyncio.create_task(c.send("bob", b"x"))
        await eventually(lambda: len(hub.of_type(Send)) == 1)
        rid = hub.of_type(Send)[0].id
        await hub.push(batch_of([msg("z1"), encode_ok(rid, mid="m-x", status="sent")]))
        assert await asyncio.wait_for(task, WAIT_S) == "m-x"
        assert (await next_msg(c)).mid == "z1"


async def test_duplicate_mids_dropped(hub: FakeHub, ident: Identity) -> None:
    async with client(hub, ident) as c:
        await hub.push(msg("d1"))
        await hub.push(msg("d1"))
        await hub.push(msg("d2", qos=1))
        await hub.push(msg("d2", qos=1))  # still unacked: not acked twice
        await hub.push(msg("d3"))
        assert [(await next_msg(c)).mid for _ in range(3)] == ["d1", "d2", "d3"]
        await eventually(lambda: hub.of_type(Ack) == [Ack(["d2"])])
        # A repeat of an acked QoS 1 message is acked again, never delivered again.
        await hub.push(msg("d2", qos=1))
        await eventually(lambda: hub.of_type(Ack) == [Ack(["d2"]), Ack(["d2"])])
        await hub.push(msg("d4"))
        assert (await next_msg(c)).mid == "d4"


async def test_backpressure_bounded_queue_never_drops(hub: FakeHub,
                                                      ident: Identity) -> None:
    async with client(hub, ident, max_queue=3) as c:
        for i in range(40):
            await hub.push(msg(f"p{i:02}"))
        await asyncio.sleep(0.2)
        assert len(c._inbox) <= 3
        got = [(await next_msg(c)).mid for _ in range(40)]
        assert got == [f"p{i:02}" for i in range(40)]


async def test_full_queue_does_not_deadlock_a_request(hub: FakeHub,
                                                      ident: Identity) -> None:
    async with client(hub, ident, max_queue=2) as c:
        for i in range(3):
            await hub.push(msg(f"e{i}"))
        m = await next_msg(c)
        await asyncio.sleep(0.1)  # the reader is paused on the full queue
        assert await asyncio.wait_for(c.send(m.sender, m.body), WAIT_S) == "mid-x"


# -- disconnects and reconnects ------------------------------------------------------


async def test_reconnect_and_resubscribe_since_last_seq(hub: FakeHub,
                                                        ident: Identity) -> None:
    states: list[str] = []
    hub.topic_seq = {"room/1": 5, "room/2": 0}
    async with client(hub, ident, on_state=states.append) as c:
        assert await c.subscribe("room/1") == (5, None)
        await c.subscribe("room/2", since=0)
        await hub.push(encode_topic_msg("t6", "x", "room/1", 6, b"6", 1))
        await hub.push(encode_topic_msg("t7", "x", "room/1", 7, b"7", 1))
        assert [(await next_msg(c)).seq for _ in range(2)] == [6, 7]
        assert c.subscriptions == {"room/1": 7, "room/2": 0}
        hub.silent = True
        in_flight = asyncio.create_task(c.send("bob", b"lost", qos=1))
        await eventually(lambda: len(hub.of_type(Send)) == 1)
        hub.silent = False
        await hub.kick(CLOSE_RESTART, "restart", encode_bye("shutdown", retry_ms=10))
        with pytest.raises(Disconnected) as info:
            await asyncio.wait_for(in_flight, WAIT_S)
        assert info.value.code == CLOSE_RESTART and not info.value.final
        await eventually(lambda: len(hub.of_type(Sub, session=2)) == 2)
        resubs = sorted((s.topic, s.since) for s in hub.of_type(Sub, session=2))
        assert resubs == [("room/1", 7), ("room/2", 0)]
        await eventually(lambda: c.connected and c.session == "s2")
        assert states == ["connected", "reconnecting", "connected"]
        # The QoS 1 send is not resent by the SDK.
        assert hub.of_type(Send, session=2) == []
        # The iterator goes on across the reconnect, and new requests work.
        await hub.push(encode_topic_msg("t8", "x", "room/1", 8, b"8", 1))
        assert (await next_msg(c)).seq == 8
        assert await c.send("bob", b"again") == "mid-again"


async def test_drop_during_resubscribe_retries_at_once(hub: FakeHub,
                                                      ident: Identity) -> None:
    # The request timeout is long: a drop while resubscribing must not wait for it.
    async with client(hub, ident, request_timeout_s=30) as c:
        await c.subscribe("room/1")
        hub.drop_on_resub = 1
        t0 = time.monotonic()
        await hub.kick(CLOSE_RESTART)
        await eventually(lambda: len(hub.sessions) == 3 and c.connected)
        assert time.monotonic() - t0 < WAIT_S / 2
        assert [s.topic for s in hub.of_type(Sub, session=3)] == ["room/1"]
        assert c.session == "s3"


async def test_resubscribe_refused_drops_the_topic(hub: FakeHub, ident: Identity) -> None:
    async with client(hub, ident) as c:
        await c.subscribe("room/1")
        await c.subscribe("room/2")
        hub.errors = {"room/2": "forbidden"}
        await hub.kick(CLOSE_RESTART)
        await eventually(lambda: len(hub.sessions) == 2 and c.connected)
        assert list(c.subscriptions) == ["room/1"]


async def test_resubscribe_paced_by_the_burst(hub: FakeHub, ident: Identity) -> None:
    hub.limits.update(burst=2, msgs_per_s=50)
    topics = [f"room/{i}" for i in range(5)]
    async with client(hub, ident) as c:
        for t in topics:
            await c.subscribe(t)
        await hub.kick(CLOSE_RESTART)
        await eventually(lambda: len(hub.sessions) == 2 and c.connected)
        assert sorted(s.topic for s in hub.of_type(Sub, session=2)) == topics
        assert sorted(c.subscriptions) == topics


async def test_requests_wait_for_the_reconnect(hub: FakeHub, ident: Identity) -> None:
    async with client(hub, ident, backoff_min_s=0.2, backoff_max_s=0.2) as c:
        await hub.kick(4011, "idle")
        await eventually(lambda: not c.connected)
        assert await c.send("bob", b"later") == "mid-later"
        assert len(hub.sessions) == 2


async def test_undecodable_hub_message_reconnects(hub: FakeHub, ident: Identity) -> None:
    async with client(hub, ident) as c:
        await hub.push(b"\xc1")
        await eventually(lambda: len(hub.sessions) == 2 and c.connected)
        assert hub.client_close_codes[0] == CLOSE_UNDECODABLE


@pytest.mark.parametrize("code", [CLOSE_REPLACED, CLOSE_AUTH_FAILED, CLOSE_FORBIDDEN, 4012])
async def test_no_reconnect_after_final_close(hub: FakeHub, ident: Identity,
                                              code: int) -> None:
    states: list[str] = []
    async with client(hub, ident, on_state=states.append) as c:
        hub.silent = True
        pending = asyncio.create_task(c.send("bob", b"x", qos=1))
        await eventually(lambda: len(hub.of_type(Send)) == 1)
        await hub.push(msg("last"))
        await hub.kick(code, "bye", encode_bye("replaced") if code == CLOSE_REPLACED
                       else None)
        with pytest.raises(Disconnected) as info:
            await asyncio.wait_for(pending, WAIT_S)
        assert info.value.code == code and info.value.final
        # Queued messages are still handed over, then the iterator raises.
        got: list[str] = []
        with pytest.raises(Disconnected) as info:
            async with asyncio.timeout(WAIT_S):
                async for m in c:
                    got.append(m.mid)
        assert got == ["last"]
        assert info.value.code == code and info.value.final
        with pytest.raises(Disconnected):
            await c.send("bob", b"y")
        with pytest.raises(Disconnected):
            c.send_nowait("bob", b"y")
        await asyncio.sleep(0.2)
        assert len(hub.sessions) == 1 and not c.connected
        assert states == ["connected", "closed"]
    assert states == ["connected", "closed"]


async def test_no_reconnect_when_disabled(hub: FakeHub, ident: Identity) -> None:
    async with client(hub, ident, reconnect=False) as c:
        await hub.kick(CLOSE_RESTART, "restart")
        with pytest.raises(Disconnected) as info:
            await next_msg(c)
        assert info.value.code == CLOSE_RESTART and info.value.final
        assert len(hub.sessions) == 1


async def test_reconnect_refused_is_final(hub: FakeHub, ident: Identity) -> None:
    async with client(hub, ident) as c:
        hub.refuse = ("forbidden", CLOSE_FORBIDDEN)
        await hub.kick(CLOSE_RESTART)
        with pytest.raises(Disconnected) as info:
            await next_msg(c)
        assert info.value.code == CLOSE_FORBIDDEN and info.value.final


def test_backoff_delay_bounds() -> None:
    hi: Callable[[float, float], float] = lambda a, b: b  # noqa: E731
    lo: Callable[[float, float], float] = lambda a, b: a  # noqa: E731
    assert [backoff_delay(n, 0.2, 30, hi) for n in range(10)] == [
        0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30, 30]
    assert all(backoff_delay(n, 0.2, 30, lo) == 0.2 for n in range(10))
    assert backoff_delay(10_000, 0.2, 30, hi) == 30
    for n in range(20):
        assert 0.2 <= backoff_delay(n, 0.2, 30) <= 30


async def test_backoff_honoured_between_attempts(hub: FakeHub, ident: Identity) -> None:
    lo, hi = 0.05, 0.2
    async with client(hub, ident, backoff_min_s=lo, backoff_max_s=hi) as c:
        hub.reject_upgrades = 4
        hub.upgrade_times.clear()
        await hub.kick(CLOSE_RESTART)
        await eventually(lambda: len(hub.sessions) == 2 and c.connected)
        times = hub.upgrade_times
        assert len(times) == 5
        gaps = [b - a for a, b in itertools.pairwise(times)]
        for i, gap in enumerate(gaps):
            cap = min(hi, lo * 2 ** (i + 1))
            assert lo * 0.9 <= gap <= cap + 0.15 * SCALE, (i, gaps)


async def test_bye_retry_ms_is_the_minimum_delay(hub: FakeHub, ident: Identity) -> None:
    async with client(hub, ident, backoff_min_s=0.01, backoff_max_s=0.02) as c:
        t0 = time.monotonic()
        await hub.kick(CLOSE_RESTART, "restart", encode_bye("shutdown", retry_ms=300))
        await eventually(lambda: len(hub.sessions) == 2 and c.connected)
        assert hub.welcome_times[1] - t0 >= 0.3


# -- close ---------------------------------------------------------------------------


async def test_close_is_clean(hub: FakeHub, ident: Identity) -> None:
    hub.silent = True
    c = client(hub, ident)
    await c.connect()
    before = {t for t in asyncio.all_tasks() if t.get_name().startswith("openred-client")}
    assert len(before) == 4  # supervisor, reader, writer, close watcher
    ended = asyncio.Event()

    async def consume() -> None:
        async for _ in c:
            pass
        ended.set()

    consumer = asyncio.create_task(consume())
    pending = asyncio.create_task(c.send("bob", b"x", qos=1))
    await eventually(lambda: len(hub.of_type(Send)) == 1)
    await c.close()
    await asyncio.wait_for(ended.wait(), WAIT_S)
    await consumer
    with pytest.raises(Disconnected) as info:
        await pending
    assert info.value.code == 1000 and info.value.final
    assert all(t.done() for t in before)
    await eventually(lambda: hub.client_close_codes == [1000])
    await c.close()  # idempotent
    with pytest.raises(StopAsyncIteration):
        await anext(c)


async def test_close_during_reconnect(hub: FakeHub, ident: Identity) -> None:
    c = client(hub, ident, backoff_min_s=5, backoff_max_s=5)
    await c.connect()
    await hub.kick(CLOSE_RESTART)
    await eventually(lambda: not c.connected)
    t0 = time.monotonic()
    await c.close()
    assert time.monotonic() - t0 < timeout(1.0)
    with contextlib.suppress(StopAsyncIteration):
        await anext(c)
    assert len(hub.sessions) == 1


async def test_connect_fails_when_hub_is_down(ident: Identity) -> None:
    async with FakeHub() as h:
        url = h.url
    c = Client(url, identity=ident)
    with pytest.raises(OSError):
        await c.connect()
    await c.close()


async def test_upgrade_rejected_on_connect(hub: FakeHub, ident: Identity) -> None:
    from websockets.exceptions import InvalidStatus

    hub.reject_upgrades = 1
    c = client(hub, ident)
    with pytest.raises(InvalidStatus):
        await c.connect()
    await c.close()

