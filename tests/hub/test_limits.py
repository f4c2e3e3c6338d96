"""docs/protocol.md §1 body size, §5 max_topics, §6 presence size, §7 rate limits, per-IP
handshake limit and idle timeout, §3 nil ids on error frames, against a real hub."""

from __future__ import annotations

import asyncio
import itertools
import time

import msgpack
import pytest
from openred.protocol.identity import Identity
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus
from websockets.frames import Opcode
from websockets.uri import parse_uri

from tests.conftest import timeout
from tests.hub.nodes import RawNode, url


def pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


async def replies_by_id(node: RawNode, n: int) -> dict:
    out = {}
    while len(out) < n:
        f = await node.recv()
        if f["t"] in ("ok", "error"):
            assert f["id"] not in out, f
            out[f["id"]] = f
    return out


async def assert_quiet(node: RawNode, wait: float = 0.3) -> None:
    with pytest.raises(TimeoutError):
        f = await node.recv(wait=wait)
        raise AssertionError(f"unexpected frame {f}")


# -- body size (§1) ---------------------------------------------------------------------


async def test_body_size_limit_send(make_hub):
    h = await make_hub(**{"limits.max_body_bytes": 1000, "limits.max_frame_bytes": 8192})
    a = await RawNode.connect(h)
    b = await RawNode.connect(h)
    r = await a.request({"t": "send", "id": 1, "to": b.node_id, "body": b"e" * 1000})
    assert (r["t"], r["status"]) == ("ok", "sent")
    r = await a.request({"t": "send", "id": 2, "to": b.node_id, "body": b"o" * 1001})
    assert (r["t"], r["id"], r["code"]) == ("error", 2, "too_large")
    r = await a.request({"t": "send", "id": "q1", "to": b.node_id, "body": b"o" * 1001,
                         "qos": 1})
    assert (r["t"], r["id"], r["code"]) == ("error", "q1", "too_large")
    await a.send({"t": "send", "to": b.node_id, "body": b"o" * 5000})
    f = await a.recv()
    assert (f["t"], f["code"]) == ("error", "too_large")
    assert "id" in f and f["id"] is None
    r = await a.request({"t": "send", "id": 3, "to": b.node_id, "body": b"marker"})
    assert r["t"] == "ok"
    # Not routed: b sees only the accepted messages.
    bodies = [(await b.recv())["body"] for _ in range(2)]
    assert bodies == [b"e" * 1000, b"marker"]
    await assert_quiet(b)
    assert await h.node.store.count_pending(b.node_id, time.time_ns() // 10**6) == 0
    await a.close()
    await b.close()


async def test_body_size_limit_pub(make_hub):
    h = await make_hub(**{"limits.max_body_bytes": 1000, "limits.max_frame_bytes": 8192})
    a = await RawNode.connect(h)
    b = await RawNode.connect(h)
    assert (await b.request({"t": "sub", "id": 1, "topic": "big"}))["t"] == "ok"
    r = await a.request({"t": "pub", "id": 1, "topic": "big", "body": b"e" * 1000})
    assert (r["t"], r["seq"]) == ("ok", 1)
    r = await a.request({"t": "pub", "id": 2, "topic": "big", "body": b"o" * 1001})
    assert (r["t"], r["id"], r["code"]) == ("error", 2, "too_large")
    await a.send({"t": "pub", "topic": "big", "body": b"o" * 1001})
    f = await a.recv()
    assert (f["t"], f["code"], f["id"]) == ("error", "too_large", None)
    r = await a.request({"t": "pub", "id": 3, "topic": "big", "body": b"m"})
    assert (r["t"], r["seq"]) == ("ok", 2)  # refused ones took no sequence number
    got = [(await b.recv()) for _ in range(2)]
    assert [(m["seq"], m["body"]) for m in got] == [(1, b"e" * 1000), (2, b"m")]
    await assert_quiet(b)
    await a.close()
    await b.close()


# -- rate limit (§7) ----------------------------------------------------------------------


async def test_rate_limit_sixth_frame_refused(make_hub):
    h = await make_hub(**{"limits.msgs_per_s": 5, "limits.burst": 5})
    a = await RawNode.connect(h)
    b = await RawNode.connect(h)
    assert (await b.request({"t": "sub", "id": 1, "topic": "rl"}))["t"] == "ok"
    await a.send([*({"t": "pub", "id": i, "topic": "rl", "body": bytes([i])}
                    for i in range(1, 7)),
                  {"t": "pub", "topic": "rl", "body": b"x"}])
    r = await replies_by_id(a, 7)
    for i in range(1, 6):
        assert r[i]["t"] == "ok", r[i]
    assert (r[6]["t"], r[6]["code"]) == ("error", "rate_limited")
    # Without an id, the refusal is still answered, with a nil id.
    assert (r[None]["t"], r[None]["code"]) == ("error", "rate_limited")
    # The refused frame was not routed.
    got = [(await b.recv())["body"] for _ in range(5)]
    assert got == [bytes([i]) for i in range(1, 6)]
    await assert_quiet(b)
    # The bucket refills at msgs_per_s.
    await asyncio.sleep(0.5)
    r = await a.request({"t": "pub", "id": 9, "topic": "rl", "body": b"later"})
    assert r["t"] == "ok"
    await a.close()
    await b.close()


async def test_rate_limit_separate_messages(make_hub):
    h = await make_hub(**{"limits.msgs_per_s": 5, "limits.burst": 5})
    a = await RawNode.connect(h)
    for i in range(1, 7):
        await a.send({"t": "presence", "id": i, "nodes": []})
    r = await replies_by_id(a, 6)
    assert [r[i]["t"] for i in range(1, 6)] == ["ok"] * 5
    assert (r[6]["t"], r[6]["code"]) == ("error", "rate_limited")
    await a.close()


async def test_acks_are_not_rate_limited(make_hub):
    h = await make_hub(**{"limits.msgs_per_s": 5, "limits.burst": 5})
    a = await RawNode.connect(h)
    b = await RawNode.connect(h)
    for i in range(3):
        r = await a.request({"t": "send", "id": i, "to": b.node_id, "body": b"q", "qos": 1})
        assert (r["t"], r["status"]) == ("ok", "stored")
    mids = [(await b.recv())["mid"] for _ in range(3)]
    frames = [{"t": "unsub", "id": i, "topic": "t"} for i in range(1, 6)]
    frames.append({"t": "ack", "mid": mids[0]})
    frames.append({"t": "ack", "mids": mids[1:]})
    frames.append({"t": "unsub", "id": 6, "topic": "t"})
    await b.send(frames)  # the bucket is empty after the 5 unsubs
    r = await replies_by_id(b, 6)
    assert [r[i]["t"] for i in range(1, 6)] == ["ok"] * 5
    assert (r[6]["t"], r[6]["code"]) == ("error", "rate_limited")
    await assert_quiet(b)
    deadline = time.monotonic() + timeout(5)
    while True:
        now = time.time_ns() // 10**6
        states = [(await h.node.store.message_state(m, now)).state for m in mids]
        if states == ["acked"] * 3 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert states == ["acked"] * 3
    await a.close()
    await b.close()


async def test_rate_abuse_closes_1008(make_hub):
    h = await make_hub(**{"limits.msgs_per_s": 5, "limits.burst": 5})
    a = await RawNode.connect(h)
    # 5 pass, then 10 x msgs_per_s = 50 refusals are tolerated; the 51st closes.
    await a.send([{"t": "unsub", "topic": "x"} for _ in range(5 + 51 + 20)])
    code, frames = await a.closed()
    assert code == 1008
    assert len(frames) == 50
    assert all((f["t"], f["code"], f["id"]) == ("error", "rate_limited", None)
               for f in frames)


async def test_rate_abuse_threshold_is_strictly_more(make_hub):
    h = await make_hub(**{"limits.msgs_per_s": 5, "limits.burst": 5})
    a = await RawNode.connect(h)
    await a.send([{"t": "unsub", "topic": "x"} for _ in range(5 + 50)])
    for _ in range(50):
        f = await a.recv()
        assert (f["t"], f["code"]) == ("error", "rate_limited")
    await asyncio.sleep(1.1)  # a new second, the bucket refilled
    r = await a.request({"t": "presence", "id": 1, "nodes": []})
    assert r["t"] == "ok"
    await a.close()


async def test_rate_abuse_with_separate_messages_closes_1008(make_hub):
    h = await make_hub(**{"limits.msgs_per_s": 5, "limits.burst": 5})
    a = await RawNode.connect(h)
    b = await RawNode.connect(h)
    for _ in range(80):
        await a.send({"t": "send", "to": b.node_id, "body": b"f"})
    code, frames = await a.closed()
    assert code == 1008
    assert [f["code"] for f in frames] == ["rate_limited"] * 50
    got = [(await b.recv())["body"] for _ in range(5)]
    assert got == [b"f"] * 5
    # b is unaffected.
    assert (await b.request({"t": "presence", "id": 1, "nodes": []}))["t"] == "ok"
    await b.close()


# -- count limits (§5, §6) ------------------------------------------------------------------


async def test_max_topics(make_hub):
    h = await make_hub(**{"limits.max_topics": 3})
    a = await RawNode.connect(h)
    for i, t in enumerate(["t1", "t2", "t3"], 1):
        assert (await a.request({"t": "sub", "id": i, "topic": t}))["t"] == "ok"
    r = await a.request({"t": "sub", "id": 4, "topic": "t4"})
    assert (r["t"], r["id"], r["code"]) == ("error", 4, "limit_exceeded")
    r = await a.request({"t": "sub", "id": 5, "topic": "t1"})  # held: not an error
    assert r["t"] == "ok"
    r = await a.request({"t": "sub", "id": 6, "topic": "t2", "since": 0})
    assert r["t"] == "ok"
    await a.send({"t": "sub", "topic": "t5"})
    f = await a.recv()
    assert (f["t"], f["code"]) == ("error", "limit_exceeded")
    assert "id" in f and f["id"] is None
    # The refused subscription was not made: nothing published there arrives.
    b = await RawNode.connect(h)
    await b.request({"t": "pub", "id": 1, "topic": "t4", "body": b"no"})
    await b.request({"t": "pub", "id": 2, "topic": "t3", "body": b"yes"})
    assert (await a.recv())["body"] == b"yes"
    # Unsubscribing frees a slot.
    assert (await a.request({"t": "unsub", "id": 7, "topic": "t2"}))["t"] == "ok"
    assert (await a.request({"t": "sub", "id": 8, "topic": "t4"}))["t"] == "ok"
    r = await a.request({"t": "sub", "id": 9, "topic": "t6"})
    assert r["code"] == "limit_exceeded"
    await a.close()
    await b.close()


async def test_presence_limit(hub):
    a = await RawNode.connect(hub)
    nodes = [f"n{i}" for i in range(1000)]
    r = await a.request({"t": "presence", "id": 1, "nodes": nodes})
    assert r["t"] == "ok" and len(r["online"]) == 1000
    assert not any(r["online"].values())
    r = await a.request({"t": "presence", "id": 2, "nodes": [*nodes, a.node_id]})
    assert (r["t"], r["id"], r["code"]) == ("error", 2, "limit_exceeded")
    r = await a.request({"t": "presence", "id": 3, "nodes": [a.node_id]})
    assert r["online"] == {a.node_id: True}
    await a.close()


# -- per-IP handshakes (§7) -----------------------------------------------------------------


async def test_per_ip_handshake_limit(make_hub):
    """docs/protocol.md §8: rate and burst are both handshakes_per_s (limits.burst, the
    per-session frame burst, plays no part: 2,000 here would let 2,000 through)."""
    h = await make_hub(**{"limits.handshakes_per_s": 2, "limits.burst": 2000,
                          "limits.msgs_per_s": 1})
    a = await RawNode.connect(h)
    b = await RawNode.connect(h)
    with pytest.raises(InvalidStatus) as info:
        await RawNode.open(h)
    assert info.value.response.status_code == 429
    with pytest.raises(InvalidStatus) as info:
        await RawNode.open(h)
    assert info.value.response.status_code == 429
    # Existing sessions are unaffected.
    assert (await a.request({"t": "presence", "id": 1, "nodes": [b.node_id]}))["online"] == {
        b.node_id: True}
    await asyncio.sleep(0.6)  # 2 per second: one more token
    c = await RawNode.connect(h)
    assert c.welcome["t"] == "welcome"
    for n in (a, b, c):
        await n.close()


async def _open_as(h: object, forwarded_for: str | None) -> int:
    """Status of an upgrade from 127.0.0.1 carrying this X-Forwarded-For: 101 or 429."""
    headers = {} if forwarded_for is None else {"X-Forwarded-For": forwarded_for}
    try:
        node = await RawNode.open(h, additional_headers=headers)
    except InvalidStatus as exc:
        return exc.response.status_code
    await node.close()
    return 101


async def test_per_ip_handshake_limit_keys_on_the_forwarded_address(make_hub):
    """Behind a trusted proxy (server.trusted_proxies) each client behind it has its
    own handshake bucket, keyed on the right-most untrusted X-Forwarded-For entry; what
    a client prepends itself changes nothing; the audit trail records that address."""
    h = await make_hub(**{"limits.handshakes_per_s": 1,
                          "server.trusted_proxies": ["127.0.0.1", "10.0.0.0/8"]})
    assert [await _open_as(h, "203.0.113.1") for _ in range(2)] == [101, 429]
    # Another client behind the same proxy is limited on its own.
    assert await _open_as(h, "203.0.113.2") == 101
    # A client cannot escape its bucket by writing its own entries to the left, and a
    # chain of trusted proxies is seen through.
    assert await _open_as(h, "198.51.100.9, 203.0.113.1") == 429
    assert await _open_as(h, "203.0.113.1, 10.1.1.1") == 429
    assert await _open_as(h, "203.0.113.3, 10.1.1.1") == 101
    assert await _open_as(h, "203.0.113.3") == 429
    # The proxy's own connections (no header) are a client of their own.
    assert await _open_as(h, None) == 101
    # An unreadable header never breaks the upgrade: the proxy's address is used (its
    # bucket's one token went to the request above).
    assert await _open_as(h, "not an address") == 429
    assert await _open_as(h, ",,") == 429

    ident = Identity.generate()
    ws = await RawNode.open(h, ident, additional_headers={"X-Forwarded-For": "203.0.113.4"})
    await ws.send({"t": "hello", "key": ident.public_key,
                   "sig": ident.sign_auth(ws.challenge["hub"], ws.challenge["nonce"])})
    assert (await ws.recv())["t"] == "welcome"
    events = await h.node.store.audit_query(ident.node_id, "auth_ok", None, 10, None)
    assert [e.ip for e in events] == ["203.0.113.4"]
    await ws.close()


async def test_forwarded_for_ignored_from_an_untrusted_peer(make_hub):
    """Without server.trusted_proxies (the default) X-Forwarded-For is the client's own
    claim: ignored, every connection from 127.0.0.1 shares one bucket."""
    h = await make_hub(**{"limits.handshakes_per_s": 2})
    statuses = [await _open_as(h, f"203.0.113.{i}") for i in range(1, 4)]
    assert statuses == [101, 101, 429]
    assert await _open_as(h, None) == 429
    # Trusting some other proxy does not make 127.0.0.1 one.
    h2 = await make_hub(**{"limits.handshakes_per_s": 2,
                           "server.trusted_proxies": ["10.0.0.0/8"]})
    ident = Identity.generate()
    ws = await RawNode.open(h2, ident, additional_headers={"X-Forwarded-For": "203.0.113.9"})
    await ws.send({"t": "hello", "key": ident.public_key,
                   "sig": ident.sign_auth(ws.challenge["hub"], ws.challenge["nonce"])})
    assert (await ws.recv())["t"] == "welcome"
    assert [await _open_as(h2, f"203.0.113.{i}") for i in (1, 2)] == [101, 429]
    events = await h2.node.store.audit_query(ident.node_id, "auth_ok", None, 10, None)
    assert [e.ip for e in events] == ["127.0.0.1"]
    await ws.close()


# -- idle timeout (§7) ------------------------------------------------------------------


class SilentClient:
    """Does the upgrade and the hello by hand over a raw socket, then never writes again:
    the hub's pings go unanswered (websockets' client would answer them)."""

    def __init__(self) -> None:
        self.frames: list[dict] = []
        self.pings = 0
        self.close_code: int | None = None

    async def start(self, hub: object, identity: Identity) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", hub.ws_port)
        self.proto = ClientProtocol(parse_uri(url(hub)), max_size=None)
        self.proto.send_request(self.proto.connect())
        self._flush()
        challenge = await self._next_frame()
        assert challenge["t"] == "challenge"
        self.proto.send_binary(pack({
            "t": "hello", "key": identity.public_key,
            "sig": identity.sign_auth(challenge["hub"], challenge["nonce"])}))
        self._flush()
        self.hello_at = time.monotonic()
        welcome = await self._next_frame()
        assert welcome["t"] == "welcome", welcome

    def _flush(self) -> None:
        for data in self.proto.data_to_send():
            self.writer.write(data)

    async def _read(self) -> bool:
        data = await self.reader.read(65536)
        if not data:
            self.proto.receive_eof()
            return False
        self.proto.receive_data(data)
        for ev in self.proto.events_received():
            if getattr(ev, "opcode", None) is Opcode.BINARY:
                self.frames.append(msgpack.unpackb(ev.data))
            elif getattr(ev, "opcode", None) is Opcode.PING:
                self.pings += 1
        # Whatever the protocol wants to send (pongs) is deliberately dropped.
        self.proto.data_to_send()
        if self.proto.close_rcvd is not None:
            self.close_code = self.proto.close_rcvd.code
            return False
        return True

    async def _next_frame(self) -> dict:
        while not self.frames:
            assert await self._read(), "connection ended"
        return self.frames.pop(0)

    async def wait_closed(self) -> float:
        """Read until the hub's close frame; return seconds since the hello."""
        try:
            while await self._read():
                pass
        except ConnectionError:
            pass
        elapsed = time.monotonic() - self.hello_at
        self.writer.close()
        return elapsed


@pytest.mark.parametrize("hb", [1, 2])
async def test_idle_timeout(make_hub, hb):
    """Closed between 3 x hb and 3 x hb + 1 s (docs/protocol.md §8), also with hb above
    the sweep's one second, where a session is visited only when one of its deadlines
    is due (hub/node.py, the sweep's wheel)."""
    h = await make_hub(**{"limits.hb_s": hb})
    silent = SilentClient()
    await silent.start(h, Identity.generate())
    lively = await RawNode.connect(h)  # websockets answers pings by itself
    assert lively.welcome["hb"] == hb
    elapsed = await asyncio.wait_for(silent.wait_closed(), timeout(8 * hb))
    assert silent.close_code == 4011
    assert 3.0 * hb <= elapsed < 3.0 * hb + timeout(1.8)
    assert silent.pings >= 2  # pinged every hb, on the 1 s housekeeping tick
    # The session that answers pings is alive past 3 x hb.
    await asyncio.sleep(max(0.0, 3.0 * hb + 1 - (time.monotonic() - silent.hello_at)))
    r = await lively.request({"t": "presence", "id": 1, "nodes": [lively.node_id]})
    assert r["online"] == {lively.node_id: True}
    await lively.close()


# -- §3: every error without an id carries "id": nil -----------------------------------------


async def test_error_frames_without_id_have_nil_id(make_hub):
    h = await make_hub(**{"limits.max_topics": 1, "limits.max_body_bytes": 100,
                          "limits.max_frame_bytes": 4096})
    a = await RawNode.connect(h)
    assert (await a.request({"t": "sub", "id": 1, "topic": "held"}))["t"] == "ok"
    bad = [
        5,  # not a map
        "str",
        [1, 2],
        {},  # no t
        {"t": 3},
        {"t": "nope"},  # unknown type
        {"t": "send", "body": b"x"},  # no to
        {"t": "send", "to": 5, "body": b"x"},  # int node id
        {"t": "send", "to": "x", "body": "str"},  # str body
        {"t": "send", "to": "x", "body": b"x", "qos": 1},  # qos 1 without id
        {"t": "sub", "topic": "bad topic"},
        {"t": "sub", "id": -1, "topic": "ok"},  # bad id -> nil id
        {"t": "sub", "id": "x" * 65, "topic": "ok"},
        {"t": "sub", "id": 1.5, "topic": "ok"},
        {"t": "pub", "topic": "ok", "body": b"x" * 101},  # too_large
        {"t": "sub", "topic": "other"},  # limit_exceeded
        {"t": "presence", "nodes": []},  # presence without id
        {"t": "ack"},
        {"t": "hello", "key": b"k" * 32},  # after welcome
    ]
    await a.send(bad)
    expected = {"bad_frame", "unknown_type", "too_large", "limit_exceeded"}
    seen = []
    for _ in range(len(bad)):
        f = await a.recv()
        assert f["t"] == "error", f
        assert "id" in f and f["id"] is None, f
        assert f["code"] in expected, f
        assert type(f["msg"]) is str
        seen.append(f["code"])
    assert set(seen) == expected
    await assert_quiet(a)
    # No error for an offline recipient without id (§3: not for no_route).
    await a.send({"t": "send", "to": "offline-node", "body": b"x"})
    await assert_quiet(a)
    r = await a.request({"t": "presence", "id": 2, "nodes": []})
    assert r["t"] == "ok"
    await a.close()


async def test_the_sweep_visits_only_connections_due(make_hub, monkeypatch) -> None:
    """Each second the housekeeping sweep looks only at the connections with a deadline
    (ping, idle, write) in it, not at all of them: with hb 5, forty quiet sessions
    are not looked at again until their first ping is due. A sweep over every
    connection each second made ~1 us a session of work, 100 ms a second at 100,000
    sessions (docs/benchmarks.md). Counted, not timed."""
    from openred.hub.node import HubNode

    visits: list[int] = []
    sweep = HubNode._sweep

    async def counted(self: HubNode, due: set) -> None:
        visits.append(len(due))
        await sweep(self, due)

    monkeypatch.setattr(HubNode, "_sweep", counted)
    h = await make_hub(**{"limits.hb_s": 5})
    nodes = await asyncio.gather(*(RawNode.connect(h) for _ in range(40)))
    await asyncio.sleep(1.5)  # each is looked at once, a second after it connected
    seen = sum(visits)
    assert seen >= 40
    await asyncio.sleep(2.0)  # pings are due 5 s after connecting: nothing to look at
    assert sum(visits) - seen < 40, visits  # a sweep of all would be 80 here
    for n in nodes:  # ...and all of them still pinged when due, and alive
        r = await n.request({"t": "presence", "id": 1, "nodes": [n.node_id]})
        assert r["online"] == {n.node_id: True}
    await asyncio.gather(*(n.close() for n in nodes))


async def test_housekeeping_pings_in_small_slices(make_hub, monkeypatch) -> None:
    """A sweep that pings many sessions at once yields to the loop every
    HOUSEKEEP_SLICE / HOUSEKEEP_PING_COST pings, not only every HOUSEKEEP_SLICE
    sessions: a burst of pings (a socket write each) is what held relaying up with
    19,000 sessions connected (hub/node.py). Counted per loop iteration by a callback
    that runs once in each: no timing."""
    from openred.hub import node as hub_node
    from openred.hub.transport import Connection

    monkeypatch.setattr(hub_node, "HOUSEKEEP_SLICE", 40)
    monkeypatch.setattr(hub_node, "HOUSEKEEP_PING_COST", 10)  # at most 4 pings a slice
    pings = [0]
    target = [10**9]
    enough = asyncio.Event()
    send_ping = Connection.send_ping

    def counted(self: Connection) -> None:
        pings[0] += 1
        if pings[0] >= target[0]:
            enough.set()
        send_ping(self)

    monkeypatch.setattr(Connection, "send_ping", counted)
    h = await make_hub(**{"limits.hb_s": 1})
    nodes = await asyncio.gather(*(RawNode.connect(h) for _ in range(60)))
    loop = asyncio.get_running_loop()
    samples: list[int] = []
    running = [True]

    def tick() -> None:  # once per loop iteration
        samples.append(pings[0])
        if running[0]:
            loop.call_soon(tick)

    target[0] = pings[0] + 120  # two sweeps that ping every session
    tick()
    await asyncio.wait_for(enough.wait(), timeout(10))
    running[0] = False
    steps = [b - a for a, b in itertools.pairwise(samples)]
    assert max(steps) <= 4, max(steps)
    assert sum(steps) >= 120
    await asyncio.gather(*(n.close() for n in nodes))
