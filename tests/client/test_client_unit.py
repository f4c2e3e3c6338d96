"""Unit tests of the node client SDK (openred.client) against the fake hub of
tests/client/fakehub.py: handshake, requests, inbound messages and acks, reconnects,
typed events and errors, the QoS 1 outbox. The real hub is exercised in
tests/client/test_e2e.py."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from openred.client import (
    AuthError,
    Client,
    ClientError,
    Closed,
    Connected,
    ConnectError,
    ConnectionLost,
    ConnectTimeout,
    CryptoError,
    Disconnected,
    Event,
    HubError,
    Message,
    OutboxError,
    OutboxFull,
    PresenceChanged,
    Receipt,
    RequestTimeout,
    StateEvent,
    SubscriptionError,
    SubscriptionRefused,
    TopicGap,
    backoff_delay,
)
from openred.protocol.errors import (
    CLOSE_AUTH_FAILED,
    CLOSE_FORBIDDEN,
    CLOSE_REPLACED,
    CLOSE_RESTART,
    CLOSE_UNDECODABLE,
    HandshakeError,
)
from openred.protocol.frames import batch_of, encode_bye, encode_ok, encode_receipt
from openred.protocol.identity import Identity, save_key_file
from websockets.exceptions import InvalidStatus, InvalidURI

from tests.client.fakehub import (
    LIMITS,
    TOKEN,
    TOKEN_NODE,
    FakeHub,
    msg,
    pack,
    topic_msg,
)
from tests.cluster.conftest import free_port
from tests.conftest import FACTOR, timeout

SCALE = FACTOR


class _AnyId:
    def __eq__(self, other: object) -> bool:
        return type(other) is int


ANY_ID: Any = _AnyId()
WAIT_S = timeout(5.0)


async def eventually(pred: Callable[[], bool], within_s: float = WAIT_S) -> None:
    """Poll `pred` (state of the fake hub or the client, no event to wait on)."""
    async with asyncio.timeout(within_s):
        while not pred():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def next_msg(c: Client | Any, within_s: float = WAIT_S) -> Any:
    async with asyncio.timeout(within_s):
        return await anext(c)


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


def file_mode(path: Path) -> int:
    return path.stat().st_mode


def leftovers(folder: Path, pattern: str) -> list[Path]:
    return list(folder.glob(pattern))


@pytest.fixture
def ident() -> Identity:
    return Identity.generate()


def client(hub: FakeHub, ident: Identity, **kw: Any) -> Client:
    kw.setdefault("backoff_min_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)
    kw.setdefault("request_timeout_s", WAIT_S)
    return Client(hub.url, identity=ident, **kw)


# -- handshake and typed state events ------------------------------------------------


async def test_connect_with_key_and_typed_states(fake: FakeHub, ident: Identity) -> None:
    states: list[StateEvent] = []
    async with client(fake, ident, on_state=states.append, meta={"v": "1"}) as c:
        assert c.connected
        assert c.node_id == ident.node_id
        assert c.session == "s1"
        assert c.welcome is not None and c.welcome.limits["max_topics"] == 1000
        hello = fake.hellos[0]
        assert hello["key"] == ident.public_key and hello["meta"] == {"v": "1"}
        assert "batch" not in hello and hello["v"] == 1
    assert states == [Connected("s1", 0, ident.node_id),
                      Disconnected(1000, "closed by client", False),
                      Closed(1000, "closed by client")]
    await eventually(lambda: fake.client_close_codes == [1000])


async def test_connect_with_key_file_token_and_token_with_identity(
        fake: FakeHub, ident: Identity, tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    save_key_file(ident, path)
    async with Client(fake.url, key_file=path) as c:
        assert c.node_id == ident.node_id
    async with Client(fake.url, token=TOKEN) as c:
        assert c.node_id == TOKEN_NODE and c.identity is None
        assert fake.hellos[-1]["token"] == TOKEN
    # A token authenticates; an identity beside it signs end to end (§12).
    async with Client(fake.url, token=TOKEN, identity=ident, sign=True) as c:
        assert c.node_id == TOKEN_NODE and "key" not in fake.hellos[-1]
        await c.send("bob", b"x")
        assert "sig" in fake.of_type("send")[-1]


def test_credentials_checked(ident: Identity, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Client("ws://x/v1/ws")
    with pytest.raises(ValueError):
        Client("ws://x/v1/ws", identity=ident, key_file=tmp_path / "k")
    with pytest.raises(ValueError, match="sign"):
        Client("ws://x/v1/ws", token="t", sign=True)
    with pytest.raises(ValueError, match="connect_timeout_s"):
        Client("ws://x/v1/ws", identity=ident, connect_timeout_s=0)


@pytest.mark.parametrize(("code", "close_code"), [("auth_failed", CLOSE_AUTH_FAILED),
                                                  ("forbidden", CLOSE_FORBIDDEN)])
async def test_connect_refused_fails_fast(fake: FakeHub, ident: Identity, code: str,
                                          close_code: int) -> None:
    fake.refuse = (code, close_code)
    states: list[StateEvent] = []
    c = client(fake, ident, on_state=states.append)
    t0 = time.monotonic()
    with pytest.raises(AuthError) as info:
        await c.connect()
    assert isinstance(info.value, ClientError) and isinstance(info.value, ConnectError)
    assert isinstance(info.value.__cause__, HandshakeError)
    assert info.value.code == code
    assert info.value.close_code == close_code
    assert time.monotonic() - t0 < WAIT_S / 2
    assert len(fake.hellos) == 1  # no retry with the same credentials
    assert states[-1] == Closed(close_code, "connect failed")
    await c.close()


async def test_bad_token_refused(fake: FakeHub) -> None:
    with pytest.raises(AuthError) as info:
        async with Client(fake.url, token="wrong"):
            pass
    assert info.value.code == "auth_failed"


async def test_transport_errors_are_client_errors_with_cause(ident: Identity) -> None:
    port = free_port()  # nothing listens there
    c = Client(f"ws://127.0.0.1:{port}/v1/ws", identity=ident, reconnect=False)
    with pytest.raises(ConnectError) as info:
        await c.connect()
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    await c.close()
    c = Client("http://not-a-ws-url", identity=ident, reconnect=False)
    with pytest.raises(ConnectError) as info:
        await c.connect()
    assert isinstance(info.value.__cause__, InvalidURI)
    await c.close()


async def test_upgrade_rejected_is_a_connect_error(fake: FakeHub, ident: Identity) -> None:
    fake.reject_upgrades = 1
    c = client(fake, ident, reconnect=False)
    with pytest.raises(ConnectError) as info:
        await c.connect()
    assert isinstance(info.value.__cause__, InvalidStatus)
    await c.close()


async def test_first_connect_retries_until_the_hub_comes_up(ident: Identity) -> None:
    port = free_port()
    events: list[StateEvent] = []
    c = Client(f"ws://127.0.0.1:{port}/v1/ws", identity=ident, backoff_min_s=0.05,
               backoff_max_s=0.1, connect_timeout_s=WAIT_S, on_state=events.append)
    connecting = asyncio.create_task(c.connect())
    await eventually(lambda: len(events) >= 3)
    assert not connecting.done()
    retries = [e for e in events if isinstance(e, Disconnected)]
    assert [e.attempt for e in retries][:3] == [1, 2, 3]
    assert all(e.will_retry and e.code == 1006 and 0.05 <= e.delay_s <= 0.1
               for e in retries)
    async with FakeHub(port) as late:
        await asyncio.wait_for(connecting, WAIT_S)
        assert c.connected and len(late.sessions) == 1
        assert isinstance(events[-1], Connected)
        await c.close()


async def test_connect_timeout_is_separate_from_the_reply_timeout(ident: Identity) -> None:
    port = free_port()
    c = Client(f"ws://127.0.0.1:{port}/v1/ws", identity=ident, backoff_min_s=0.02,
               backoff_max_s=0.05, connect_timeout_s=0.4, request_timeout_s=30)
    t0 = time.monotonic()
    with pytest.raises(ConnectTimeout) as info:
        await c.connect()
    elapsed = time.monotonic() - t0
    assert 0.35 <= elapsed < 0.4 + timeout(1.0)
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, ClientError)
    assert str(info.value)  # never a bare TimeoutError('')
    assert isinstance(info.value.__cause__, ConnectError)
    await c.close()


async def test_requests_wait_for_the_reconnect_beyond_the_reply_timeout(
        fake: FakeHub, ident: Identity) -> None:
    async with client(fake, ident, request_timeout_s=0.2, connect_timeout_s=WAIT_S,
                      backoff_min_s=0.1, backoff_max_s=0.1) as c:
        fake.reject_upgrades = 4  # the reconnect takes ~0.5 s, longer than 0.2 s
        await fake.kick(4011, "idle")
        await eventually(lambda: not c.connected)
        assert await c.send("bob", b"later") == "mid-later"
        assert len(fake.sessions) == 2
        await c.wait_connected(0.1)


# -- requests ------------------------------------------------------------------------


async def test_requests_and_replies_out_of_order(fake: FakeHub, ident: Identity) -> None:
    fake.hold = 4
    async with client(fake, ident) as c:
        fake.online = {"on-1"}
        r0, r1, r2, r3 = await asyncio.gather(
            c.send("bob", b"a"), c.send("bob", b"b", qos=1, ttl=60, receipt=True),
            c.publish("room/1", b"c"), c.presence(["on-1", "off-2"]))
        assert (r0, r1, r2, r3) == ("mid-a", "mid-b", ("mid-c", 1),
                                    {"on-1": True, "off-2": False})
        sends = fake.of_type("send")
        assert [(s["body"], s["qos"], s.get("ttl"), s.get("receipt")) for s in sends] == [
            (b"a", 0, None, None), (b"b", 1, 60, True)]
        assert type(sends[1]["cid"]) is str and "cid" not in sends[0]
        ids = [f["id"] for _, f in fake.frames]
        assert len(set(ids)) == 4 and all(type(i) is int for i in ids)
        fake.hold = 0
        sub = await c.subscribe("room/1")
        assert (sub.topic, sub.seq, sub.recovered) == ("room/1", 1, None)
        await c.unsubscribe("room/1")
        assert c.subscriptions == {}


async def test_hub_error_maps_to_hub_error(fake: FakeHub, ident: Identity) -> None:
    fake.errors = {"gone": "no_route", "full": "queue_full", "secret/x": "forbidden"}
    async with client(fake, ident) as c:
        with pytest.raises(HubError) as info:
            await c.send("gone", b"x")
        assert info.value.code == "no_route" and info.value.msg == "refused"
        with pytest.raises(HubError, match="queue_full"):
            await c.send("full", b"x", qos=1)
        assert c.outbox_size == 0  # refused: not kept
        with pytest.raises(HubError) as info:
            await c.subscribe("secret/x")
        assert info.value.code == "forbidden"
        assert c.subscriptions == {}
        assert await c.send("bob", b"ok") == "mid-ok"  # the session goes on


async def test_local_checks(fake: FakeHub, ident: Identity) -> None:
    async with client(fake, ident) as c:
        with pytest.raises(ValueError):
            await c.send("not a node id!", b"x")
        with pytest.raises(ValueError):
            await c.send("bob", b"x", qos=2)
        with pytest.raises(ValueError):
            await c.subscribe("bad topic")
        with pytest.raises(ValueError, match="cid"):
            await c.send("bob", b"x", qos=1, cid="has space")
        with pytest.raises(ValueError, match="meta"):
            await c.send("bob", b"x", meta={"bad key!": "v"})
        with pytest.raises(ValueError, match="meta"):
            await c.send("bob", b"x", meta={f"k{i}": "v" for i in range(17)})
        with pytest.raises(ValueError, match="meta"):
            await c.send("bob", b"x", meta={"k": "v" * 513})
        with pytest.raises(ValueError, match="limit"):
            await c.history("room/1", limit=0)
        with pytest.raises(HubError) as info:
            await c.send("bob", b"x" * (LIMITS["max_body_bytes"] + 1))
        assert info.value.code == "too_large"
        await c.send("bob", b"y", meta={"k": "v"})
        assert len(fake.of_type("send")) == 1  # nothing refused here reached the hub
        assert fake.of_type("send")[0]["meta"] == {"k": "v"}


async def test_send_nowait_and_unsolicited_error(fake: FakeHub, ident: Identity) -> None:
    errors: list[HubError] = []
    fake.errors = {"gone": "rate_limited"}
    async with client(fake, ident, on_error=errors.append) as c:
        c.send_nowait("bob", b"1")
        c.send_nowait("gone", b"2")
        await c.send("bob", b"3")  # ordered after the two above
        assert [(s.get("id"), s["body"]) for s in fake.of_type("send")][:2] == [
            (None, b"1"), (None, b"2")]
        await eventually(lambda: len(errors) == 1)
        assert errors[0].code == "rate_limited"


async def test_request_timeout_is_typed(fake: FakeHub, ident: Identity) -> None:
    fake.silent = True
    async with client(fake, ident, request_timeout_s=0.2) as c:
        with pytest.raises(RequestTimeout) as info:
            await c.presence(["x"])
        assert isinstance(info.value, TimeoutError) and str(info.value)
        with pytest.raises(RequestTimeout, match="outbox"):
            await c.send("bob", b"x", qos=1)
        assert c.outbox_size == 1  # still to be delivered


# -- inbound, acks -------------------------------------------------------------------


async def test_inbound_messages_and_receipts(fake: FakeHub, ident: Identity) -> None:
    receipts: list[Receipt] = []
    async with client(fake, ident, on_receipt=receipts.append) as c:
        sub = await c.subscribe("room/1")
        await fake.push(msg("m1", b"hi", sender="alice", sig=b"s" * 64, meta={"a": "b"}))
        await fake.push(topic_msg("m2", "room/1", 7, b"yo", sender="carol"))
        await fake.push(encode_receipt("m0", "dave", 9))
        first = await next_msg(c)
        assert (first.mid, first.sender, first.body, first.qos, first.topic, first.sig,
                first.meta) == ("m1", "alice", b"hi", 0, None, b"s" * 64, {"a": "b"})
        assert first.verified is None  # "alice" is not a key; no key given
        second = await next_msg(sub)
        assert isinstance(second, Message)
        assert (second.mid, second.sender, second.topic, second.seq, second.body) == (
            "m2", "carol", "room/1", 7, b"yo")
        await eventually(lambda: receipts == [Receipt("m0", "dave", 9)])


async def test_auto_ack_after_the_body(fake: FakeHub, ident: Identity) -> None:
    async with client(fake, ident) as c:
        await fake.push(msg("q1", qos=1))
        await fake.push(msg("q2", qos=1))
        m = await next_msg(c)
        assert m.mid == "q1" and m.qos == 1 and not m.acked
        await asyncio.sleep(0.1)
        assert fake.acked() == []  # not while the body runs
        m = await next_msg(c)  # asking for the next acks the previous
        assert m.mid == "q2"
        await eventually(lambda: fake.acked() == ["q1"])
        received: list[str] = []

        async def consume() -> None:
            async for m in c:
                received.append(m.mid)
                if m.mid == "q3":
                    break

        await fake.push(msg("q3", qos=1))
        await asyncio.wait_for(consume(), WAIT_S)
        await asyncio.sleep(0.1)
        # q2 was taken by this test's task, q3 by consume(): neither asked again.
        assert fake.acked() == ["q1"]
        assert received == ["q3"]


async def test_a_message_dropped_unacked_comes_again(fake: FakeHub,
                                                     ident: Identity) -> None:
    """§4 at least once: a QoS 1 message the program dropped without an ack (a loop
    left with `break`) is delivered again when the hub redelivers it next session."""
    async with client(fake, ident) as c:
        await fake.push(msg("u1", qos=1))
        async for m in c:
            assert m.mid == "u1"
            break
        del m
        gc.collect()
        await fake.kick(CLOSE_RESTART)
        await eventually(lambda: len(fake.sessions) == 2 and c.connected)
        await fake.push(msg("u1", qos=1))  # the hub's redelivery
        again = await next_msg(c)
        assert again.mid == "u1"
        await again.ack()
        await fake.push(msg("u1", qos=1))  # acked now: a repeat is acked, not delivered
        await eventually(lambda: fake.acked() == ["u1", "u1"])


async def test_two_consumers_each_ack_their_own_message(fake: FakeHub,
                                                        ident: Identity) -> None:
    """Auto-ack is per message: with two tasks on one client, a task asking for its
    next message acks the one it took, never the other task's."""
    async with client(fake, ident) as c:
        took: dict[str, list[str]] = {"slow": [], "fast": []}
        slow_go = asyncio.Event()

        async def slow() -> None:
            m = await next_msg(c)
            took["slow"].append(m.mid)
            await slow_go.wait()  # still processing
            took["slow"].append((await next_msg(c)).mid)

        async def fast() -> None:
            for _ in range(2):
                took["fast"].append((await next_msg(c)).mid)

        slow_task = asyncio.create_task(slow())
        await fake.push(msg("a1", qos=1))
        await eventually(lambda: took["slow"] == ["a1"])
        fast_task = asyncio.create_task(fast())
        await fake.push(msg("b1", qos=1))
        await eventually(lambda: took["fast"] == ["b1"])
        await fake.push(msg("b2", qos=1))
        await eventually(lambda: took["fast"] == ["b1", "b2"])
        await fast_task
        # fast asked for b2: b1 is acked; a1, still being processed by slow, is not.
        await eventually(lambda: fake.acked() == ["b1"])
        await asyncio.sleep(0.1)
        assert fake.acked() == ["b1"]
        slow_go.set()
        await fake.push(msg("a2", qos=1))
        await asyncio.wait_for(slow_task, WAIT_S)
        await eventually(lambda: fake.acked() == ["b1", "a1"])


async def test_message_ack_and_context_manager(fake: FakeHub, ident: Identity) -> None:
    async with client(fake, ident, auto_ack=False) as c:
        for mid in ("q1", "q2", "q3", "q4"):
            await fake.push(msg(mid, qos=1))
        m1 = await next_msg(c)
        await m1.ack()
        await m1.ack()  # once only
        async with await next_msg(c) as m2:
            assert m2.mid == "q2"
        with pytest.raises(RuntimeError):
            async with await next_msg(c):
                raise RuntimeError("handler failed")  # q3: not acked, comes again
        m4 = await next_msg(c)
        await c.ack(m4.mid)
        await eventually(lambda: fake.acked() == ["q1", "q2", "q4"])
        await asyncio.sleep(0.1)
        assert fake.acked() == ["q1", "q2", "q4"]


async def test_context_manager_takes_a_message_out_of_auto_ack(fake: FakeHub,
                                                               ident: Identity) -> None:
    async with client(fake, ident) as c:
        await fake.push(msg("f1", qos=1))
        await fake.push(msg("f2", qos=1))
        with contextlib.suppress(ValueError):
            async with await next_msg(c):
                raise ValueError("failed")
        assert (await next_msg(c)).mid == "f2"  # does not ack the failed f1
        await asyncio.sleep(0.1)
        assert fake.acked() == []


async def test_batches_both_ways(fake: FakeHub, ident: Identity) -> None:
    fake.hold = 3
    async with client(fake, ident, batch=True) as c:
        assert fake.hellos[0]["batch"] is True
        await fake.push(batch_of([msg("b1"), msg("b2", qos=1), msg("b3")]))
        assert [(await next_msg(c)).mid for _ in range(3)] == ["b1", "b2", "b3"]
        before = fake.raw_messages
        mids = await asyncio.gather(*(c.send("bob", str(i).encode()) for i in range(3)))
        assert mids == ["mid-0", "mid-1", "mid-2"]
        assert fake.raw_messages - before < 3


async def test_hub_batch_with_replies_and_messages(fake: FakeHub, ident: Identity) -> None:
    fake.silent = True
    async with client(fake, ident) as c:
        task = asyncio.create_task(c.send("bob", b"x"))
        await eventually(lambda: len(fake.of_type("send")) == 1)
        rid = fake.of_type("send")[0]["id"]
        await fake.push(batch_of([msg("z1"), encode_ok(rid, mid="m-x", status="sent")]))
        assert await asyncio.wait_for(task, WAIT_S) == "m-x"
        assert (await next_msg(c)).mid == "z1"


async def test_duplicate_mids_dropped(fake: FakeHub, ident: Identity) -> None:
    async with client(fake, ident) as c:
        await fake.push(msg("d1"))
        await fake.push(msg("d1"))
        await fake.push(msg("d2", qos=1))
        await fake.push(msg("d2", qos=1))  # still unacked: not acked twice
        await fake.push(msg("d3"))
        assert [(await next_msg(c)).mid for _ in range(3)] == ["d1", "d2", "d3"]
        await eventually(lambda: fake.acked() == ["d2"])
        await fake.push(msg("d2", qos=1))  # acked already: acked again, not delivered
        await eventually(lambda: fake.acked() == ["d2", "d2"])
        await fake.push(msg("d4"))
        assert (await next_msg(c)).mid == "d4"


async def test_backpressure_bounded_queue_never_drops(fake: FakeHub,
                                                      ident: Identity) -> None:
    async with client(fake, ident, max_queue=3) as c:
        for i in range(40):
            await fake.push(msg(f"p{i:02}"))
        await asyncio.sleep(0.2)
        assert len(c._inbox) <= 3
        got = [(await next_msg(c)).mid for _ in range(40)]
        assert got == [f"p{i:02}" for i in range(40)]


async def test_full_queue_does_not_deadlock_a_request(fake: FakeHub,
                                                      ident: Identity) -> None:
    async with client(fake, ident, max_queue=2) as c:
        for i in range(3):
            await fake.push(msg(f"e{i}"))
        m = await next_msg(c)
        await asyncio.sleep(0.1)  # the reader is paused on the full queue
        assert await asyncio.wait_for(c.send(m.sender, m.body), WAIT_S) == "mid-x"


# -- callbacks -----------------------------------------------------------------------


async def test_sync_and_async_callbacks_both_run(fake: FakeHub, ident: Identity) -> None:
    sync_seen: list[Event] = []
    async_seen: list[Event] = []

    async def on_state(ev: StateEvent) -> None:
        await asyncio.sleep(0.01)  # really async
        async_seen.append(ev)

    def broken(ev: Event) -> None:
        raise RuntimeError("a callback that raises must not stop the client")

    async with client(fake, ident, on_state=on_state, on_event=sync_seen.append,
                      on_error=broken) as c:
        fake.errors = {"gone": "rate_limited"}
        c.send_nowait("gone", b"x")
        await fake.push(encode_receipt("m0", "dave", 9))
        await eventually(lambda: Receipt("m0", "dave", 9) in sync_seen)
        await eventually(lambda: len(async_seen) == 1)
        assert await c.send("bob", b"still") == "mid-still"
    # close() ran the queued async callbacks, Closed included.
    assert [type(e) for e in async_seen] == [Connected, Disconnected, Closed]
    assert [type(e) for e in sync_seen if not isinstance(e, Receipt)] == [
        Connected, Disconnected, Closed]


async def test_async_callbacks_that_fall_behind_are_bounded(fake: FakeHub,
                                                           ident: Identity) -> None:
    """Receipts faster than an async callback runs: at most `max_queue` wait, the rest
    are dropped and counted, and the client goes on."""
    release = asyncio.Event()
    seen: list[Receipt] = []

    async def on_receipt(r: Receipt) -> None:
        await release.wait()
        seen.append(r)

    async with client(fake, ident, on_receipt=on_receipt, max_queue=5) as c:
        await fake.push(batch_of([encode_receipt(f"m{i}", "dave", i) for i in range(20)]))
        # One batch, read in one go: five wait, fifteen are dropped.
        await eventually(lambda: c.callbacks_dropped == 15)
        release.set()
        await eventually(lambda: len(seen) == 5)
        assert [r.mid for r in seen] == [f"m{i}" for i in range(5)]
        assert await c.send("bob", b"still") == "mid-still"


# -- disconnects, reconnects, topics -------------------------------------------------


async def test_reconnect_resubscribes_and_reports_typed_events(fake: FakeHub,
                                                               ident: Identity) -> None:
    states: list[StateEvent] = []
    fake.topic_seq = {"room/1": 5, "room/2": 0}
    async with client(fake, ident, on_state=states.append) as c:
        sub1 = await c.subscribe("room/1")
        assert (sub1.seq, sub1.recovered) == (5, None)
        await c.subscribe("room/2", since=0)
        await fake.push(topic_msg("t6", "room/1", 6))
        await fake.push(topic_msg("t7", "room/1", 7))
        assert [(await next_msg(sub1)).seq for _ in range(2)] == [6, 7]
        assert c.subscriptions == {"room/1": 7, "room/2": 0}
        await fake.kick(CLOSE_RESTART, "restart", encode_bye("shutdown", retry_ms=10))
        await eventually(lambda: len(fake.of_type("sub", session=2)) == 2)
        resubs = sorted((s["topic"], s["since"]) for s in fake.of_type("sub", session=2))
        assert resubs == [("room/1", 7), ("room/2", 0)]
        await eventually(lambda: c.connected and c.session == "s2")
        down = states[1]
        assert isinstance(down, Disconnected)
        assert (down.code, down.reason, down.will_retry, down.attempt) == (
            CLOSE_RESTART, "restart", True, 1)
        assert down.delay_s >= 0.01  # at least the bye's retry_ms
        assert states[2] == Connected("s2", 0, ident.node_id)
        await fake.push(topic_msg("t8", "room/1", 8))
        assert (await next_msg(sub1)).seq == 8  # the iterator goes on across reconnects
        assert await c.send("bob", b"again") == "mid-again"


async def test_topic_gap_on_recovered_false(fake: FakeHub, ident: Identity) -> None:
    events: list[Event] = []
    fake.topic_seq = {"news": 3}
    async with client(fake, ident, on_event=events.append) as c:
        sub = await c.subscribe("news")
        fake.topic_seq["news"] = 20
        fake.lost = {"news"}  # history kept only 16.. of 4..20
        await fake.kick(CLOSE_RESTART)
        await eventually(lambda: len(fake.sessions) == 2 and c.connected)
        await fake.push(topic_msg("n16", "news", 16))
        gap = await next_msg(sub)
        assert gap == TopicGap("news", 4, 15)
        assert (await next_msg(sub)).seq == 16
        assert gap in events
        # Without any kept message, the gap ends at the ok's seq (after a short wait).
        fake.topic_seq["news"] = 30
        await fake.kick(CLOSE_RESTART)
        assert await next_msg(sub) == TopicGap("news", 17, 30)


async def test_resubscribe_refused_is_an_event_and_ends_the_iterator(
        fake: FakeHub, ident: Identity) -> None:
    events: list[Event] = []
    async with client(fake, ident, on_event=events.append) as c:
        await c.subscribe("room/1")
        sub2 = await c.subscribe("room/2")
        fake.errors = {"room/2": "forbidden"}
        await fake.kick(CLOSE_RESTART)
        await eventually(lambda: len(fake.sessions) == 2 and c.connected)
        assert list(c.subscriptions) == ["room/1"]
        assert SubscriptionRefused("room/2", "forbidden") in events
        with pytest.raises(SubscriptionError) as info:
            await next_msg(sub2)
        assert info.value.code == "forbidden"


async def test_subscription_close_ends_iteration(fake: FakeHub, ident: Identity) -> None:
    async with client(fake, ident) as c:
        sub = await c.subscribe("room/1")
        assert await c.subscribe("room/1") is sub
        await fake.push(topic_msg("r1", "room/1", 1))
        await eventually(lambda: c.subscriptions["room/1"] == 1)
        await sub.close()
        assert [m.mid async for m in sub] == ["r1"]  # queued ones, then the end
        assert fake.of_type("unsub")[0]["topic"] == "room/1"


async def test_drop_during_resubscribe_retries_at_once(fake: FakeHub,
                                                      ident: Identity) -> None:
    async with client(fake, ident, request_timeout_s=30) as c:
        await c.subscribe("room/1")
        fake.drop_on_resub = 1
        t0 = time.monotonic()
        await fake.kick(CLOSE_RESTART)
        await eventually(lambda: len(fake.sessions) == 3 and c.connected)
        assert time.monotonic() - t0 < WAIT_S / 2
        assert [s["topic"] for s in fake.of_type("sub", session=3)] == ["room/1"]


async def test_resubscribe_paced_by_the_burst(fake: FakeHub, ident: Identity) -> None:
    fake.limits.update(burst=2, msgs_per_s=50)
    topics = [f"room/{i}" for i in range(5)]
    async with client(fake, ident) as c:
        for t in topics:
            await c.subscribe(t)
        await fake.kick(CLOSE_RESTART)
        await eventually(lambda: len(fake.sessions) == 2 and c.connected)
        assert sorted(s["topic"] for s in fake.of_type("sub", session=2)) == topics


async def test_undecodable_hub_message_reconnects(fake: FakeHub, ident: Identity) -> None:
    async with client(fake, ident) as c:
        await fake.push(b"\xc1")
        await eventually(lambda: len(fake.sessions) == 2 and c.connected)
        assert fake.client_close_codes[0] == CLOSE_UNDECODABLE


async def test_a_kick_reconnects_once_and_a_repeated_kick_ends_the_client(
        fake: FakeHub, ident: Identity) -> None:
    """§9, 4012: reconnect with backoff; stop if it repeats (within KICK_REPEAT_S)."""
    states: list[StateEvent] = []
    async with client(fake, ident, on_state=states.append) as c:
        await fake.kick(4012, "kicked")
        await eventually(lambda: len(fake.sessions) == 2 and c.connected)
        await fake.kick(4012, "kicked")
        await eventually(lambda: any(isinstance(s, Closed) for s in states))
        await asyncio.sleep(0.2)
        assert len(fake.sessions) == 2 and not c.connected
        downs = [s for s in states if isinstance(s, Disconnected)]
        assert [(d.code, d.will_retry) for d in downs] == [(4012, True), (4012, False)]


async def test_backoff_restarts_only_after_a_session_that_lasted(
        fake: FakeHub, ident: Identity) -> None:
    """§9: reset once a session has lasted a minute; a hub that closes each session at
    once sees the attempts, and the delays, keep growing."""
    states: list[StateEvent] = []
    async with client(fake, ident, on_state=states.append) as c:
        for n in (2, 3):
            await fake.kick(CLOSE_RESTART, "restart")
            await eventually(lambda n=n: len(fake.sessions) == n and c.connected)
        downs = [s for s in states if isinstance(s, Disconnected)]
        assert [d.attempt for d in downs] == [1, 2]


@pytest.mark.parametrize("code", [CLOSE_REPLACED, CLOSE_AUTH_FAILED, CLOSE_FORBIDDEN,
                                  1002, 1003, 1007])
async def test_no_reconnect_after_final_close(fake: FakeHub, ident: Identity,
                                              code: int) -> None:
    states: list[StateEvent] = []
    async with client(fake, ident, on_state=states.append) as c:
        fake.silent = True
        pending = asyncio.create_task(c.presence(["x"]))
        await eventually(lambda: len(fake.of_type("presence")) == 1)
        await fake.push(msg("last"))
        await fake.kick(code, "bye", encode_bye("replaced") if code == CLOSE_REPLACED
                        else None)
        with pytest.raises(ConnectionLost) as info:
            await asyncio.wait_for(pending, WAIT_S)
        assert info.value.code == code and info.value.final
        got: list[str] = []
        with pytest.raises(ConnectionLost) as info:
            async with asyncio.timeout(WAIT_S):
                async for m in c:
                    got.append(m.mid)
        assert got == ["last"]  # queued messages are still handed over
        assert info.value.code == code and info.value.final
        with pytest.raises(ConnectionLost):
            await c.send("bob", b"y")
        with pytest.raises(ConnectionLost):
            c.send_nowait("bob", b"y")
        await asyncio.sleep(0.2)
        assert len(fake.sessions) == 1 and not c.connected
        assert states == [Connected("s1", 0, ident.node_id),
                          Disconnected(code, "bye", False), Closed(code, "bye")]
    assert len(states) == 3


async def test_no_reconnect_when_disabled(fake: FakeHub, ident: Identity) -> None:
    async with client(fake, ident, reconnect=False) as c:
        await fake.kick(CLOSE_RESTART, "restart")
        with pytest.raises(ConnectionLost) as info:
            await next_msg(c)
        assert info.value.code == CLOSE_RESTART and info.value.final


async def test_reconnect_refused_is_final(fake: FakeHub, ident: Identity) -> None:
    states: list[StateEvent] = []
    async with client(fake, ident, on_state=states.append) as c:
        fake.refuse = ("forbidden", CLOSE_FORBIDDEN)
        await fake.kick(CLOSE_RESTART)
        with pytest.raises(ConnectionLost) as info:
            await next_msg(c)
        assert info.value.code == CLOSE_FORBIDDEN and info.value.final
        assert isinstance(states[-1], Closed) and states[-1].code == CLOSE_FORBIDDEN


def test_backoff_delay_bounds() -> None:
    hi: Callable[[float, float], float] = lambda a, b: b  # noqa: E731
    lo: Callable[[float, float], float] = lambda a, b: a  # noqa: E731
    assert [backoff_delay(n, 0.2, 30, hi) for n in range(10)] == [
        0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30, 30]
    assert all(backoff_delay(n, 0.2, 30, lo) == 0.2 for n in range(10))
    assert backoff_delay(10_000, 0.2, 30, hi) == 30


async def test_backoff_honoured_between_attempts(fake: FakeHub, ident: Identity) -> None:
    lo, hi = 0.05, 0.2
    async with client(fake, ident, backoff_min_s=lo, backoff_max_s=hi) as c:
        fake.reject_upgrades = 4
        fake.upgrade_times.clear()
        await fake.kick(CLOSE_RESTART)
        await eventually(lambda: len(fake.sessions) == 2 and c.connected)
        times = fake.upgrade_times
        assert len(times) == 5
        gaps = [b - a for a, b in itertools.pairwise(times)]
        for i, gap in enumerate(gaps):
            cap = min(hi, lo * 2 ** (i + 1))
            assert lo * 0.9 <= gap <= cap + 0.15 * SCALE, (i, gaps)


async def test_bye_retry_ms_is_the_minimum_delay(fake: FakeHub, ident: Identity) -> None:
    async with client(fake, ident, backoff_min_s=0.01, backoff_max_s=0.02) as c:
        t0 = time.monotonic()
        await fake.kick(CLOSE_RESTART, "restart", encode_bye("shutdown", retry_ms=300))
        await eventually(lambda: len(fake.sessions) == 2 and c.connected)
        assert fake.welcome_times[1] - t0 >= 0.3


# -- the QoS 1 outbox (§4.2) ---------------------------------------------------------


async def test_qos1_cut_by_a_disconnect_is_resent_with_the_same_cid(
        fake: FakeHub, ident: Identity) -> None:
    async with client(fake, ident) as c:
        fake.silent = True
        sending = asyncio.create_task(c.send("bob", b"cut", qos=1))
        await eventually(lambda: len(fake.of_type("send")) == 1)
        first = fake.of_type("send")[0]
        fake.silent = False
        await fake.kick(CLOSE_RESTART)
        assert await asyncio.wait_for(sending, WAIT_S) == "mid-cut"  # no ConnectionLost
        again = fake.of_type("send", session=2)
        assert [(s["cid"], s["body"]) for s in again] == [(first["cid"], b"cut")]
        assert again[0]["id"] != first["id"]
        assert c.outbox_size == 0


async def test_a_repeat_is_answered_dup_with_the_first_mid(fake: FakeHub,
                                                           ident: Identity) -> None:
    async with client(fake, ident) as c:
        mid = await c.send("bob", b"once", qos=1, cid="reading-1")
        assert await c.send("bob", b"once", qos=1, cid="reading-1") == mid
        assert len(fake.stored) == 1
        # The same cid while the first is still in flight joins it.
        fake.silent = True
        a = asyncio.create_task(c.send("bob", b"two", qos=1, cid="reading-2"))
        b = asyncio.create_task(c.send("bob", b"two", qos=1, cid="reading-2"))
        await eventually(lambda: len(fake.of_type("send")) == 3)
        fake.silent = False
        await fake.kick(CLOSE_RESTART)
        assert await asyncio.wait_for(asyncio.gather(a, b), WAIT_S) == ["mid-two"] * 2


async def test_outbox_bound_exceeded_is_a_clear_error(fake: FakeHub, ident: Identity) -> None:
    fake.silent = True
    async with client(fake, ident, outbox_max=3, request_timeout_s=0.05) as c:
        for i in range(3):
            with pytest.raises(RequestTimeout):
                await c.send("bob", b"%d" % i, qos=1)
        with pytest.raises(OutboxFull, match="3"):
            await c.send("bob", b"3", qos=1)
        assert c.outbox_size == 3
        assert len(fake.of_type("send")) == 3  # the refused one never left
        c.send_nowait("bob", b"q0")  # QoS 0 does not use the outbox
    with pytest.raises(ValueError, match="outbox_max"):
        Client(fake.url, identity=ident, outbox_max=0)


async def test_file_outbox_survives_a_client_restart(fake: FakeHub, ident: Identity,
                                                     tmp_path: Path) -> None:
    box = tmp_path / "outbox.bin"
    fake.silent = True
    async with client(fake, ident, outbox_file=box, request_timeout_s=0.1) as c:
        for i in range(3):
            with pytest.raises(RequestTimeout):
                await c.send("bob", b"r%d" % i, qos=1, meta={"n": str(i)})
        cids = [s["cid"] for s in fake.of_type("send")]
    assert file_mode(box) & 0o077 == 0
    assert leftovers(tmp_path, ".outbox.bin.*.tmp") == []  # written atomically
    fake.silent = False
    async with client(fake, ident, outbox_file=box) as c2:  # a new process, in effect
        assert c2.outbox_size == 3
        await c2.flush(WAIT_S)
        resent = fake.of_type("send", session=2)
        assert [(s["cid"], s["body"], s["meta"]) for s in resent] == [
            (cid, b"r%d" % i, {"n": str(i)}) for i, cid in enumerate(cids)]
    async with client(fake, ident, outbox_file=box) as c3:
        assert c3.outbox_size == 0  # the confirmations were written too


async def test_corrupt_outbox_file_is_an_outbox_error(ident: Identity,
                                                      tmp_path: Path) -> None:
    box = tmp_path / "outbox.bin"
    box.write_bytes(b"\x93garbage")
    with pytest.raises(OutboxError, match=r"outbox\.bin"):
        Client("ws://127.0.0.1:1/v1/ws", identity=ident, outbox_file=box)


async def test_unwritable_outbox_file_fails_the_send(fake: FakeHub, ident: Identity,
                                                    tmp_path: Path) -> None:
    box = tmp_path / "missing-dir" / "outbox.bin"
    async with client(fake, ident, outbox_file=box) as c:
        with pytest.raises(OutboxError, match="cannot write") as info:
            await c.send("bob", b"x", qos=1)
        assert isinstance(info.value.__cause__, OSError)
        assert c.outbox_size == 0 and fake.of_type("send") == []


async def test_rate_limited_outbox_send_is_retried(fake: FakeHub, ident: Identity) -> None:
    async with client(fake, ident) as c:
        fake.errors = {"bob": "rate_limited"}
        sending = asyncio.create_task(c.send("bob", b"later", qos=1))
        await eventually(lambda: len(fake.of_type("send")) == 1)
        fake.errors = {}
        assert await asyncio.wait_for(sending, WAIT_S) == "mid-later"
        cids = {s["cid"] for s in fake.of_type("send")}
        assert len(fake.of_type("send")) == 2 and len(cids) == 1


# -- presence watch, keys of token nodes ---------------------------------------------


async def test_watch_again_after_a_reconnect_reports_what_changed(
        fake: FakeHub, ident: Identity) -> None:
    events: list[Event] = []
    peer = Identity.generate().node_id
    async with client(fake, ident, on_event=events.append) as c:
        w = await c.watch([peer], topic="room/1")
        assert w.online == {peer: False}
        await fake.push(pack({"t": "presence", "node": "x", "online": True, "ts": 5,
                              "topic": "room/1"}))
        ev = await next_msg(w)
        assert ev == PresenceChanged("x", True, 5, "room/1")
        fake.online = {peer}  # it came online while this client was away
        await fake.kick(CLOSE_RESTART)
        await eventually(lambda: len(fake.of_type("watch", session=2)) == 2)
        rewatch = fake.of_type("watch", session=2)
        assert sorted(str(f.get("nodes") or f.get("topic")) for f in rewatch) == sorted(
            [str([peer]), "room/1"])
        ev = await next_msg(w)
        assert (ev.node, ev.online, ev.snapshot) == (peer, True, True)
        assert w.online == {peer: True}
        assert ev in events
        await w.close()
        assert fake.of_type("unwatch")[0] == {"t": "unwatch", "id": ANY_ID,
                                              "nodes": [peer], "topic": "room/1"}
        assert [e async for e in w] == []


async def test_verified_with_a_known_key_of_a_token_node(fake: FakeHub,
                                                         ident: Identity) -> None:
    token_key = Identity.generate()
    me = ident.node_id
    sig = token_key.sign_body(me, b"signed")
    async with client(fake, ident, keys={"token-peer": token_key.public_key}) as c:
        await fake.push(msg("k1", b"signed", sender="token-peer", sig=sig))
        await fake.push(msg("k2", b"altered", sender="token-peer", sig=sig))
        await fake.push(msg("k3", b"signed", sender="stranger", sig=sig))
        assert [(await next_msg(c)).verified for _ in range(3)] == [True, False, None]
        with pytest.raises(CryptoError, match="no key"):
            await c.send("stranger", b"x", encrypt=True)
        assert fake.of_type("send") == []


# -- close ---------------------------------------------------------------------------


async def test_close_is_clean(fake: FakeHub, ident: Identity) -> None:
    fake.silent = True
    c = client(fake, ident)
    await c.connect()
    before = {t for t in asyncio.all_tasks() if t.get_name().startswith("openred-client")}
    assert len(before) == 4  # supervisor, reader, writer, close watcher
    ended = asyncio.Event()

    async def consume() -> None:
        async for _ in c:
            pass
        ended.set()

    consumer = asyncio.create_task(consume())
    pending = asyncio.create_task(c.presence(["x"]))
    await eventually(lambda: len(fake.of_type("presence")) == 1)
    await c.close()
    await asyncio.wait_for(ended.wait(), WAIT_S)
    await consumer
    with pytest.raises(ConnectionLost) as info:
        await pending
    assert info.value.code == 1000 and info.value.final
    assert all(t.done() for t in before)
    await c.close()  # idempotent
    with pytest.raises(StopAsyncIteration):
        await anext(c)


async def test_close_during_reconnect(fake: FakeHub, ident: Identity) -> None:
    c = client(fake, ident, backoff_min_s=5, backoff_max_s=5)
    await c.connect()
    await fake.kick(CLOSE_RESTART)
    await eventually(lambda: not c.connected)
    t0 = time.monotonic()
    await c.close()
    assert time.monotonic() - t0 < timeout(1.0)
    with contextlib.suppress(StopAsyncIteration):
        await anext(c)
    assert len(fake.sessions) == 1
