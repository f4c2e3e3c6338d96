"""The WebSocket edge (hub/transport.py, session.py, inbox.py, admission.py) attacked as
a hostile client would, by a second red-team pass over the rewritten edge.

Each test is one attack against a real hub: in process (`make_hub`, where the hub's own
objects can be inspected) or in its own process (`hub_proc`, where its RSS is the
measure). Frames are built with protocol/wsframes.py. Nine of these found holes in the
first version of the rewrite (each docstring says what broke); all now guard the fix.

Some attacks need the hub's socket to be full. A client with a small receive buffer that
stops reading gets there quickly; where kernel buffers on loopback would make that slow,
the hub-side socket's SO_SNDBUF is shrunk, which stands for a slow link and changes
nothing in the hub's logic.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any, cast

import msgpack
import pytest
from openred.hub.session import _Recovery
from openred.hub.transport import CLOSE_GRACE_S, OPEN
from openred.protocol.identity import Identity
from openred.protocol.wsframes import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_TEXT,
    Deflate,
    FrameReader,
    FrameWriter,
    frame_header,
)

from tests.conftest import timeout
from tests.hub.nodes import RawNode, eventually, no_frame
from tests.hub.test_edge import (
    HubProc,
    Raw,
    _status,
    hello_for,
    hub_proc,  # noqa: F401  (a fixture)
    rss_of,
)

MIB = 1024 * 1024
BODY = os.urandom(60_000)  # under limits.max_body_bytes (64 KiB)


# -- helpers ---------------------------------------------------------------------------------


async def tiny_window(port: int, rcvbuf: int = 4096) -> Raw:
    """A raw client with a small receive buffer: once it stops reading, the hub's socket
    fills after a few hundred KiB instead of several MiB."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    r, w = await asyncio.open_connection(sock=sock)
    return Raw(r, w)


def reading(raw: Raw, on: bool) -> None:
    """Start or stop reading the client's socket (a peer that does not read)."""
    t = cast(asyncio.Transport, raw.w.transport)
    if on:
        t.resume_reading()
    else:
        t.pause_reading()


def hub_side(h: Any, raw: Raw) -> Any:
    """The hub's `Connection` for a raw client (matched by the client's port)."""
    port = raw.w.get_extra_info("sockname")[1]
    for c in list(h.node.connections):
        if c.transport is not None:
            peer = c.transport.get_extra_info("peername")
            if peer and peer[1] == port:
                return c
    raise AssertionError("no hub-side connection for this client")


async def login(raw: Raw, ident: Identity | None = None) -> str:
    await raw.upgrade()
    challenge = await raw.frame()
    raw.send_frame(hello_for(ident or Identity.generate(), challenge))
    welcome = await raw.frame()
    assert welcome["t"] == "welcome", welcome
    return str(welcome["node"])


def packed(frame: dict[str, Any]) -> bytes:
    return msgpack.packb(frame, use_bin_type=True)  # type: ignore[no-any-return]


async def fill_hub_buffer(h: Any, raw: Raw, me: str, *, until_paused: bool = False) -> Any:
    """Stop reading and make the hub write to us (QoS 0 messages to ourselves) until its
    transport holds unsent data (or, with `until_paused`, has paused writing). Each
    message is waited for, so the send queue stays far from its bounds."""
    reading(raw, False)
    conn = hub_side(h, raw)
    frame = raw.out.message(packed({"t": "send", "to": me, "body": BODY, "qos": 0}))
    metrics = h.node.metrics
    for _ in range(400):
        if conn.write_paused if until_paused else conn.transport.get_write_buffer_size():
            return conn
        before = metrics.frames_in["send"]
        raw.send(frame)
        await eventually(lambda b=before: metrics.frames_in["send"] > b)
    raise AssertionError("the hub's socket never filled")


async def gone_within(h: Any, conn: Any, wait: float) -> bool:
    """Whether the hub forgets `conn` (connection_lost) within `wait` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout(wait)
    while conn in h.node.connections:
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def qos1_msgs(ev: Any) -> list[dict[str, Any]]:
    if type(ev) is not bytes:
        return []
    v = msgpack.unpackb(ev, raw=False)
    return [f for f in (v if isinstance(v, list) else [v]) if f["t"] == "msg" and f["qos"] == 1]


def slow_enqueue(h: Any, monkeypatch: pytest.MonkeyPatch, body: bytes, delay: float) -> None:
    """Make the store take `delay` s to write QoS 1 messages with a message whose body is
    `body` among them (a store under load, a PostgreSQL pool where one write waits for a
    lock)."""
    store = h.node.store
    real = store.enqueue_many

    async def enqueue_many(items: list[Any]) -> Any:
        if any(msg.body == body for msg, *_ in items):
            await asyncio.sleep(delay)
        return await real(items)

    monkeypatch.setattr(store, "enqueue_many", enqueue_many)


# == holes still open ========================================================================

# -- connections that are never let go ------------------------------------------------------


async def test_peer_close_frame_then_no_reading_is_disconnected_after_grace(
        make_hub: Any) -> None:
    """Attack: log in (open mode: any fresh key), stop reading until the hub's socket
    holds unsent data, then send a close frame. `_peer_closed` echoes it and calls
    `transport.close()`, which waits for the buffer to drain, with no grace timer; the
    session is CLOSED, so housekeeping skips it. The connection, its buffer and its
    per-IP slot are held forever: with max_connections_per_ip=1 the address is locked
    out."""
    h = await make_hub(**{"limits.max_connections_per_ip": 1})
    raw = await tiny_window(h.ws_port)
    me = await login(raw)
    conn = await fill_hub_buffer(h, raw, me)
    raw.send(raw.out.frame(OP_CLOSE, (1000).to_bytes(2, "big")))
    try:
        gone = await gone_within(h, conn, CLOSE_GRACE_S + 1.5)
        assert gone, (f"still open after {CLOSE_GRACE_S + 1.5} s: phase {conn.phase!r}, "
                      f"{conn.transport.get_write_buffer_size()} bytes unsent, "
                      f"per_ip {h.node.admission.per_ip}")
        assert await _status(h) == 101  # the address's only slot was given back
    finally:
        raw.abort()
        if conn.transport is not None:
            conn.transport.abort()


async def test_half_closed_peer_that_does_not_read_is_disconnected(make_hub: Any) -> None:
    """Attack: log in, stop reading until the hub's socket holds unsent data, then
    shutdown(SHUT_WR). `eof_received` returns None, so the transport starts closing and
    waits for its buffer to drain; the session stays ACTIVE and routable until the idle
    check closes it, and `Connection.close` then returns early (`transport.is_closing()`)
    without arming the grace timer. The connection is never released."""
    h = await make_hub(**{"limits.hb_s": 1})
    raw = await tiny_window(h.ws_port)
    me = await login(raw)
    conn = await fill_hub_buffer(h, raw, me)
    raw.w.write_eof()
    try:
        # A generous bound: idle close (3 x hb, checked once a second) plus the grace.
        gone = await gone_within(h, conn, 4 + CLOSE_GRACE_S + 0.5)
        assert gone, (f"still open: phase {conn.phase!r}, session {conn.session.state!r}, "
                      f"{conn.transport.get_write_buffer_size()} bytes unsent, "
                      f"per_ip {h.node.admission.per_ip}")
    finally:
        raw.abort()
        if conn.transport is not None:
            conn.transport.abort()


@pytest.mark.parametrize("hb", [1, 2])
async def test_session_that_never_reads_is_cut_off_even_while_it_pings(
        hub_proc: HubProc, hb: int) -> None:  # noqa: F811
    """Attack: a publisher fills a topic's history (100 x 60 kB); eight sessions that
    never read (small receive window) each send `sub since=0` and then a ping every
    0.5 s. Each recovery pushes half the send queue, waits for room that never comes,
    and holds the history it read; nothing more is pushed, so the slow-consumer bound is
    never crossed, and the pings keep the idle check quiet. Per docs/protocol.md §8 a
    consumer that does not drain is cut off (4009); here all eight stay online past
    3 x hb + grace and the hub's RSS grows ~5.6 MiB per session (1000 per IP allowed).
    With hb 2 a session's writing pauses between two visits of the sweep, which must
    still find the write deadline (hub/node.py, the sweep's wheel)."""
    h = await hub_proc(OPENRED_HUB_LIMITS_HB_S=str(hb))
    assert h.proc is not None
    publisher = await RawNode.connect(h)
    for i in range(100):
        r = await publisher.request({"t": "pub", "id": i, "topic": "h", "body": BODY})
        assert r["t"] == "ok", r
    rss0 = rss_of(h.proc.pid)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    raws: list[Raw] = []
    ids: list[str] = []
    try:
        for _ in range(8):
            raw = await tiny_window(h.ws_port)
            ids.append(await login(raw))
            reading(raw, False)
            raw.send_frame({"t": "sub", "id": 1, "topic": "h", "since": 0})
            raws.append(raw)
        while loop.time() - t0 < 3 * hb + 1 + CLOSE_GRACE_S:
            for raw in raws:
                raw.send(raw.out.frame(OP_PING, b"still here"))
            await asyncio.sleep(0.5)
        r = await publisher.request({"t": "presence", "id": "p", "nodes": ids})
        online = sum(r["online"].values())
        grown = rss_of(h.proc.pid) - rss0
        print(f"{online}/{len(ids)} non-reading sessions online after "
              f"{loop.time() - t0:.1f} s; hub RSS grew {grown / MIB:.1f} MiB")
        assert online == 0, f"{online} still online; RSS +{grown / MIB:.1f} MiB"
    finally:
        for raw in raws:
            raw.abort()
        await publisher.close()


# -- memory past the documented bounds ------------------------------------------------------


async def test_topic_recovery_holdback_is_bounded_in_bytes(make_hub: Any) -> None:
    """Attack: a subscriber that does not read makes its send queue more than half full
    (QoS 0 to itself), then sends `sub since=0` on a topic with history: the recovery
    waits for room, and every live publication is held in the recovery buffer, checked
    against send_queue_max (10,000 frames) only. With send_queue_max_bytes = 1 MiB, 100
    publications of 60 kB (6 MB) are held and the session is not cut off; at 64 KiB
    bodies 10,000 frames are 640 MB."""
    h = await make_hub(**{"limits.send_queue_max_bytes": MIB, "limits.msgs_per_s": 100_000,
                          "limits.burst": 100_000})
    publisher = await RawNode.connect(h)
    r = await publisher.request({"t": "pub", "id": 0, "topic": "t", "body": b"old"})
    assert r["t"] == "ok"
    raw = await tiny_window(h.ws_port)
    me = await login(raw)
    conn = await fill_hub_buffer(h, raw, me, until_paused=True)
    frame = raw.out.message(packed({"t": "send", "to": me, "body": BODY, "qos": 0}))
    while conn.out_bytes <= MIB // 2:  # more than half full, under the bound
        before = conn.out_bytes
        raw.send(frame)
        await eventually(lambda b=before: conn.out_bytes > b)
    assert conn.phase is OPEN
    raw.send_frame({"t": "sub", "id": 1, "topic": "t", "since": 0})
    await eventually(lambda: isinstance(conn.session.topics.get("t"), _Recovery)
                     and conn._room is not None)
    for i in range(100):
        r = await publisher.request({"t": "pub", "id": i + 1, "topic": "t", "body": BODY})
        assert r["t"] == "ok", r
    try:
        rec = conn.session.topics.get("t")
        held = sum(len(f) for _, f in rec.items) if isinstance(rec, _Recovery) else 0
        assert conn.phase is not OPEN or held + conn.out_bytes <= MIB, (
            f"{held / MIB:.1f} MiB held for recovery + {conn.out_bytes / MIB:.2f} MiB queued, "
            f"bound {MIB / MIB:.0f} MiB, session still open")
    finally:
        raw.abort()
        await publisher.close()


async def test_qos0_waiting_behind_a_slow_qos1_counts_against_the_inflight_bound(
        make_hub: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack: one QoS 1 send whose store write is slow, then 300 QoS 0 sends of 60 kB.
    Each QoS 0 waits for the QoS 1 (§5 order) in a callback that holds its body twice
    (frame and Send), but only tasks count against MAX_INFLIGHT_BYTES (4 MiB,
    docs/protocol.md §8 "Reading pauses"): the hub reads all 300 (18 MB) and holds them;
    only the rate limit (burst 2000 x 64 KiB = 128 MB per session) stops it."""
    h = await make_hub()
    slow_enqueue(h, monkeypatch, b"slow", 2.0)
    raw = await Raw.connect(h.ws_port)
    await login(raw)
    to = Identity.generate().node_id  # offline: nothing is written back
    raw.send_frame({"t": "send", "id": 1, "to": to, "body": b"slow", "qos": 1})
    frame = raw.out.message(packed({"t": "send", "to": to, "body": BODY, "qos": 0}))
    n = 300
    for _ in range(n):
        raw.send(frame)  # no drain: the client's own buffer holds what the hub refuses
    metrics = h.node.metrics
    last = -1
    while metrics.frames_in["send"] != last:  # until the hub stops reading
        last = metrics.frames_in["send"]
        await asyncio.sleep(0.2)
    held = (last - 1) * len(BODY)
    try:
        assert held <= 4 * MIB + 8 * len(BODY), (
            f"hub read {last - 1} of {n} QoS 0 sends ({held / MIB:.1f} MiB) behind one "
            f"pending QoS 1")
    finally:
        raw.abort()


# -- QoS 1 -----------------------------------------------------------------------------------


async def test_qos1_sends_of_one_read_each_get_their_own_answer(make_hub: Any) -> None:
    """The QoS 1 sends of one read are stored with one store call: a full queue, a
    repeated cid and another recipient among them still get their own answers, in
    order, and the store is asked fewer times than there are messages."""
    h = await make_hub(**{"limits.max_pending_per_node": 3})
    raw = await Raw.connect(h.ws_port)
    await login(raw)
    to, other = Identity.generate().node_id, Identity.generate().node_id
    frames = [{"t": "send", "id": 1, "to": to, "body": b"1", "qos": 1, "cid": "c1"}]
    frames += [{"t": "send", "id": i, "to": to, "body": b"%d" % i, "qos": 1}
               for i in range(2, 6)]
    frames += [{"t": "send", "id": 6, "to": to, "body": b"1", "qos": 1, "cid": "c1"},
               {"t": "send", "id": 7, "to": other, "body": b"7", "qos": 1}]
    calls = h.node.metrics.store_ops
    before = calls[("enqueue_many", "ok")]
    raw.send(b"".join(raw.out.message(packed(f)) for f in frames))  # one write
    got = {}
    while len(got) < len(frames):
        f = await raw.frame()
        got[f["id"]] = f
    assert [got[i]["t"] for i in range(1, 8)] == ["ok", "ok", "ok", "error", "error", "ok",
                                                  "ok"]
    assert {got[i]["code"] for i in (4, 5)} == {"queue_full"}
    assert got[6]["mid"] == got[1]["mid"] and got[6].get("dup") is True
    assert got[7]["status"] == "stored"
    assert list(got) == list(range(1, 8))  # answered in the order sent
    assert 1 <= calls[("enqueue_many", "ok")] - before <= 2
    raw.abort()


async def test_replay_and_sub_recovery_both_resume_after_waiting_for_room(
        make_hub: Any) -> None:
    """Attack (or just a slow link): a node with 60 stored QoS 1 messages reconnects,
    reads slowly, and resubscribes with `since` as docs/protocol.md §10 tells it to.
    The replay waits for room, then the recovery waits too. When each waiter had an
    event of its own, the second replaced the first and the flush woke only it: the
    replay slept forever (21 of 60 stored messages arrived, and live QoS 1 stayed held
    behind it until the node reconnected). Both must resume."""
    h = await make_hub(**{"limits.send_queue_max": 20})
    publisher = await RawNode.connect(h)
    for i in range(5):
        r = await publisher.request({"t": "pub", "id": i, "topic": "t", "body": b"x"})
        assert r["t"] == "ok"
    ident = Identity.generate()
    stored = 60
    for i in range(stored):
        r = await publisher.request({"t": "send", "id": i, "to": ident.node_id, "body": BODY,
                                     "qos": 1})
        assert r["status"] == "stored"
    raw = await tiny_window(h.ws_port)
    await raw.upgrade()
    challenge = await raw.frame()
    conn = hub_side(h, raw)
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                                       4096)  # a slow link
    reading(raw, False)
    raw.send_frame(hello_for(ident, challenge))
    await eventually(lambda: conn.write_paused and conn._room is not None)  # the replay
    raw.send_frame({"t": "sub", "id": 1, "topic": "t", "since": 0})
    # The recovery holds live messages back while it waits for room too.
    await eventually(lambda: conn.session.topics.get("t") is not None)
    reading(raw, True)
    got = 0
    try:
        while got < stored:
            got += len(qos1_msgs(await raw.event(3)))
    except (TimeoutError, EOFError, ConnectionError):
        pass
    try:
        assert got == stored, (f"{got} of {stored} stored QoS 1 messages arrived; replay "
                               f"still running: {conn.session.inbox.replaying}")
    finally:
        raw.abort()
        await publisher.close()


async def test_stored_qos1_reaches_an_online_recipient_when_its_sender_disconnects(
        make_hub: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack: a sender's first QoS 1 write is slow; its second is stored and answered
    `ok stored`, then waits for the first (§5 order). The sender disconnects:
    connection_lost cancels every task of its session, the waiting one included, so
    the accepted message never reaches its online recipient in this session (it sits
    in the store until the recipient reconnects)."""
    h = await make_hub()
    slow_enqueue(h, monkeypatch, b"slow", 1.0)
    recipient = await RawNode.connect(h)
    sender = await RawNode.connect(h)
    await sender.send({"t": "send", "id": 1, "to": recipient.node_id, "body": b"slow",
                       "qos": 1})
    # Read apart: the sends of one read are stored together, so both would wait.
    await eventually(lambda: h.node.metrics.frames_in["send"] == 1)
    ok = await sender.request({"t": "send", "id": 2, "to": recipient.node_id,
                               "body": b"accepted", "qos": 1})
    assert ok["status"] == "stored"
    assert sender.ws.transport is not None
    sender.ws.transport.abort()
    try:
        f = await recipient.recv_type("msg", wait=3)
        assert f["body"] == b"accepted"
    except TimeoutError:
        pending = await h.node.store.count_pending(recipient.node_id, time.time_ns() // 10**6)
        raise AssertionError(f"accepted message not delivered to the online recipient; "
                             f"{pending} pending in the store") from None
    finally:
        await recipient.close()


# -- admission --------------------------------------------------------------------------------


async def test_duplicate_origin_headers_are_refused_not_raised(
        make_hub: Any, loop_guard: list[dict[str, Any]]) -> None:
    """Attack: an upgrade request with two `Origin` headers. websockets' `Headers.get`
    raises MultipleValuesError (a LookupError, not a KeyError); it escapes
    `Admission.on_request` into the event loop (a traceback per request, the socket
    reset, no HTTP answer). Expected: 403 (or 400) and nothing in the loop's handler."""
    h = await make_hub()
    try:
        status = await _status(h, "Origin: https://a.example\r\nOrigin: https://b.example\r\n")
        await asyncio.sleep(0.1)
        errors = [f"{e.get('message')}: {e.get('exception')!r}" for e in loop_guard]
        assert not errors and status in (400, 403), f"status {status}, loop errors {errors}"
    finally:
        loop_guard.clear()  # reported here, not again by the fixture


async def test_hello_refused_before_welcome_does_not_replace_the_live_session(
        make_hub: Any) -> None:
    """Attack: a second connection of the same node sends its hello and another frame
    in one write. The second frame closes it (not_authenticated, 4001) before the
    authenticate task runs; the task does not look at the state before replacing the
    node's live session (bye replaced, 4010) and registering the closed one."""
    h = await make_hub()
    ident = Identity.generate()
    live = await RawNode.connect(h, ident)
    raw = await Raw.connect(h.ws_port)
    await raw.upgrade()
    challenge = await raw.frame()
    raw.send(raw.out.message(packed(hello_for(ident, challenge)))
             + raw.out.message(packed({"t": "presence", "id": 5, "nodes": []})))
    assert (await raw.frame())["code"] == "not_authenticated"
    assert (await raw.close_event()).code == 4001
    try:
        r = await live.request({"t": "presence", "id": 1, "nodes": [ident.node_id]}, wait=2)
        assert r["online"] == {ident.node_id: True}
    finally:
        raw.abort()


# == what held =================================================================================


async def test_per_ip_count_returns_to_zero_after_every_refused_or_broken_upgrade(
        make_hub: Any) -> None:
    """Refusals of every kind (404, garbage, 431, no upgrade headers, 403 Origin, 429),
    a client gone mid-request (abort, EOF) and a silent one dropped at the open timeout
    each give their per-IP slot back: none counted twice or never released."""
    h = await make_hub(**{"server.open_timeout_s": 1.0, "limits.max_connections_per_ip": 3})

    async def head(data: bytes) -> bytes:
        raw = await Raw.connect(h.ws_port)
        try:
            raw.send(data)
            return await asyncio.wait_for(raw.r.read(200), timeout(3))
        finally:
            raw.abort()

    assert (await head(Raw.request().replace(b"/v1/ws", b"/nope"))).startswith(b"HTTP/1.1 404")
    assert await head(b"NOT HTTP AT ALL\r\n\r\n") == b""  # websockets: EOF, no answer
    huge = Raw.request("X-Big: " + "a" * 9000 + "\r\n")
    assert (await head(huge)).startswith(b"HTTP/1.1 431")
    plain = b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n\r\n"
    assert not (await head(plain)).startswith(b"HTTP/1.1 101")
    assert await _status(h, "Origin: https://evil.example\r\n") == 403
    aborted = await Raw.connect(h.ws_port)
    aborted.send(b"GET /v1/ws HTT")
    await asyncio.sleep(0.05)
    aborted.abort()
    half = await Raw.connect(h.ws_port)
    half.send(b"GET /v1/ws HTTP/1.1\r\n")
    half.w.write_eof()
    silent = [await Raw.connect(h.ws_port) for _ in range(2)]
    await eventually(lambda: len(h.node.connections) >= 2)
    assert await _status(h) in (101, 429)
    assert await half.eof(3)
    for s in silent:
        assert await s.eof(3)  # the open timeout
    await eventually(lambda: not h.node.connections and not h.node.admission.per_ip, 3)
    assert await _status(h) == 101  # and the address is welcome again


async def test_trusted_proxy_counts_each_forwarded_client_once(make_hub: Any) -> None:
    """Behind a trusted proxy the per-IP cap counts the forwarded client, once per
    connection (not also the proxy), refuses past the cap and releases on close."""
    h = await make_hub(**{"server.trusted_proxies": ["127.0.0.1"],
                          "limits.max_connections_per_ip": 1})
    a = await Raw.connect(h.ws_port)
    assert (await a.upgrade("X-Forwarded-For: 10.0.0.1\r\n")).startswith(b"HTTP/1.1 101")
    assert h.node.admission.per_ip == {"10.0.0.1": 1}
    assert await _status(h, "X-Forwarded-For: 10.0.0.1\r\n") == 429
    b = await Raw.connect(h.ws_port)
    assert (await b.upgrade("X-Forwarded-For: 10.0.0.2\r\n")).startswith(b"HTTP/1.1 101")
    assert h.node.admission.per_ip == {"10.0.0.1": 1, "10.0.0.2": 1}
    a.abort()
    b.abort()
    await eventually(lambda: not h.node.admission.per_ip and not h.node.connections)


async def test_handshake_bucket_burst_is_handshakes_per_s(make_hub: Any) -> None:
    """The per-IP handshake bucket lets `handshakes_per_s` through at once, then 429."""
    h = await make_hub(**{"limits.handshakes_per_s": 5})
    statuses = [await _status(h) for _ in range(10)]
    assert statuses[:5] == [101] * 5
    assert 429 in statuses[5:]
    assert h.node.metrics.handshakes["rate_limited"] >= 1


async def test_connection_refused_at_connect_is_still_dropped_at_the_open_timeout(
        make_hub: Any) -> None:
    """A connection over limits.max_connections that never sends its request (so never
    hears its 503) is dropped at server.open_timeout_s like any other."""
    h = await make_hub(**{"limits.max_connections": 1, "server.open_timeout_s": 0.5})
    first = await Raw.connect(h.ws_port)
    over = await Raw.connect(h.ws_port)
    assert await over.eof(3)
    assert await first.eof(3)
    assert h.node.metrics.handshakes["open_timeout"] == 2
    assert await _status(h) == 101


@pytest.mark.parametrize("how", ["protocol_failure", "operator_kick"])
async def test_hub_close_to_a_peer_that_stopped_reading_is_aborted_after_grace(
        make_hub: Any, how: str) -> None:
    """The hub closes (a protocol failure, an operator kick) while the peer's socket is
    full and the peer reads nothing: the close frame cannot go out, and the socket is
    aborted within CLOSE_GRACE_S, its per-IP slot released."""
    h = await make_hub()
    raw = await tiny_window(h.ws_port)
    me = await login(raw)
    conn = await fill_hub_buffer(h, raw, me, until_paused=True)
    t0 = asyncio.get_running_loop().time()
    if how == "protocol_failure":
        raw.send(frame_header(0x82, 1) + b"x")  # unmasked: 1002
    else:
        assert h.node.close_node(me, 4012, "kicked")
    assert await gone_within(h, conn, CLOSE_GRACE_S + 1.5)
    assert asyncio.get_running_loop().time() - t0 >= CLOSE_GRACE_S - 0.5
    assert not h.node.admission.per_ip
    raw.abort()


async def test_frames_after_the_hubs_close_are_not_handled_and_raise_nothing(
        make_hub: Any) -> None:
    """After the hub's close frame: a send is not routed, a ping not answered, a text
    message and a malformed close frame (a Failure while CLOSING) raise nothing in the
    loop (loop_guard), and the hub ends the TCP connection."""
    h = await make_hub()
    other = await RawNode.connect(h)
    raw = await Raw.connect(h.ws_port)
    me = await login(raw)
    assert h.node.close_node(me, 4012, "kicked")
    assert (await raw.close_event()).code == 4012
    w = raw.out
    raw.send(w.message(packed({"t": "send", "to": other.node_id, "body": b"late", "qos": 0}))
             + w.frame(OP_PING, b"late") + w.frame(OP_TEXT, b"late")
             + w.frame(OP_CLOSE, b"\x03")  # 1-byte body: a Failure, while CLOSING
             + frame_header(0x82, 1) + b"x")  # unmasked, after the reader stopped
    after: list[Any] = []
    try:
        while True:
            after.append(await raw.event(3))
    except (EOFError, ConnectionError):
        pass
    assert after == []
    await no_frame(other)
    await other.close()


async def test_reading_pause_and_resume_pair_up_under_inflight_pressure(
        make_hub: Any) -> None:
    """3,000 QoS 1 sends in a few reads push a session past MAX_INFLIGHT (1,024): the
    hub pauses reading, resumes as the store catches up, and every pause is matched by
    a resume (the counter is back at 0, the socket is read again)."""
    h = await make_hub(**{"limits.msgs_per_s": 100_000, "limits.burst": 100_000})
    raw = await Raw.connect(h.ws_port)
    await login(raw)
    conn = hub_side(h, raw)
    to = Identity.generate().node_id
    n = 3000
    for start in range(0, n, 500):
        batch = [{"t": "send", "id": i, "to": to, "body": b"q", "qos": 1}
                 for i in range(start, start + 500)]
        raw.send(raw.out.message(packed(batch)))  # type: ignore[arg-type]
    oks = 0
    while oks < n:
        v = msgpack.unpackb(await raw.event(10), raw=False)
        oks += sum(1 for f in (v if isinstance(v, list) else [v]) if f.get("t") == "ok")
    assert h.node.metrics.frames_in["send"] == n
    await eventually(lambda: conn._reading_paused == 0 and not conn.session._read_paused)
    raw.send_frame({"t": "presence", "id": "p", "nodes": []})
    assert (await raw.frame())["id"] == "p"  # the socket is read again
    raw.abort()


async def test_qos1_sends_stored_together_still_count_one_by_one_in_flight(
        make_hub: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack: 1,100 QoS 1 sends in one read while the store is slow. They are stored
    with one call and one task, but each counts against MAX_INFLIGHT (1,024): the hub
    stops reading until they are stored, then answers all of them."""
    h = await make_hub(**{"limits.msgs_per_s": 100_000, "limits.burst": 100_000})
    slow_enqueue(h, monkeypatch, b"s", 1.0)
    raw = await Raw.connect(h.ws_port)
    await login(raw)
    conn = hub_side(h, raw)
    to = Identity.generate().node_id
    n = 1100
    sends = [{"t": "send", "id": i, "to": to, "body": b"s", "qos": 1} for i in range(n)]
    raw.send(raw.out.message(packed(sends)))  # type: ignore[arg-type]
    await eventually(lambda: conn.session._read_paused)  # while the store is slow
    oks = 0
    while oks < n:
        v = msgpack.unpackb(await raw.event(10), raw=False)
        oks += sum(1 for f in (v if isinstance(v, list) else [v]) if f.get("t") == "ok")
    await eventually(lambda: not conn.session._read_paused)
    raw.abort()


async def test_deflate_bomb_and_corrupt_deflate_fail_cleanly(make_hub: Any) -> None:
    """With permessage-deflate, a 10 MiB message of zeros (10 kB compressed) fails with
    1009 while inflating, and bytes that are not deflate fail with 1002; nothing
    reaches the loop's exception handler."""
    h = await make_hub(**{"server.compression": True})

    async def deflated() -> Raw:
        raw = await Raw.connect(h.ws_port)
        head = await raw.upgrade("Sec-WebSocket-Extensions: permessage-deflate\r\n")
        assert b"permessage-deflate" in head.lower()
        d = Deflate(server=False)
        raw.frames = FrameReader(server=False, max_message_bytes=1 << 24, deflate=d)
        raw.out = FrameWriter(server=False, deflate=d)
        assert (await raw.frame())["t"] == "challenge"
        return raw

    bomb = await deflated()
    message = bomb.out.message(b"\x00" * (10 * MIB))
    assert len(message) < 64 * 1024
    bomb.send(message)
    assert (await bomb.close_event()).code == 1009
    corrupt = await deflated()
    key = os.urandom(4)
    payload = b"\xff\xff\xff\xff"
    corrupt.send(frame_header(0x80 | 0x40 | OP_BINARY, len(payload), masked=True) + key
                 + bytes(b ^ key[i % 4] for i, b in enumerate(payload)))
    assert (await corrupt.close_event()).code == 1002
    for raw in (bomb, corrupt):
        assert await raw.eof(3)


def test_close_codes_the_hub_sends_may_all_be_sent() -> None:
    """Every close code the hub passes to FrameWriter.close (errors.CLOSE_*, the 1000
    answer to a code-less close) is one RFC 6455 lets travel, so `close_body` never
    raises ValueError inside the event loop."""
    from openred.protocol import errors as E
    from openred.protocol.wsframes import valid_close_code

    codes = {getattr(E, n) for n in dir(E) if n.startswith("CLOSE_")} | {1000}
    assert codes and all(valid_close_code(c) for c in codes), sorted(codes)

