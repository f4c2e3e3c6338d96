"""The WebSocket edge under hostile input (docs/protocol.md §1, §2, §8, §10).

Each test is one finding of a red-team run against the hub, tried the way an attacker
would: raw sockets, bytes written by hand (protocol/wsframes.py frames them), a peer that
never reads. Memory bounds are checked on a hub in its own process, by its RSS.
"""

from __future__ import annotations

import asyncio
import base64
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from openred.protocol.identity import Identity
from openred.protocol.wsframes import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    Close,
    FrameReader,
    FrameWriter,
    Ping,
    Pong,
)
from websockets.exceptions import InvalidStatus

from tests.cluster.conftest import HubProcess
from tests.conftest import timeout
from tests.hub.nodes import RawNode, eventually

# -- a raw client ----------------------------------------------------------------------


class Raw:
    """A TCP connection that speaks exactly the bytes a test writes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r = reader
        self.w = writer
        self.frames = FrameReader(server=False, max_message_bytes=1 << 24)
        self.out = FrameWriter(server=False)
        self.events: list[Any] = []

    @classmethod
    async def connect(cls, port: int) -> Raw:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        return cls(r, w)

    @staticmethod
    def request(headers: str = "") -> bytes:
        key = base64.b64encode(os.urandom(16)).decode()
        return (f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\n{headers}\r\n").encode()

    async def upgrade(self, headers: str = "") -> bytes:
        """Send the upgrade request; return the response head (status line first)."""
        self.w.write(self.request(headers))
        head = await asyncio.wait_for(self.r.readuntil(b"\r\n\r\n"), timeout(5))
        return head

    async def event(self, wait: float = 5.0) -> Any:
        """The next WebSocket event from the hub: bytes (a message), Ping, Close..."""
        while not self.events:
            data = await asyncio.wait_for(self.r.read(65536), timeout(wait))
            if not data:
                raise EOFError
            self.events.extend(self.frames.feed(data))
        return self.events.pop(0)

    async def frame(self, wait: float = 5.0) -> dict[str, Any]:
        ev = await self.event(wait)
        assert type(ev) is bytes, ev
        return msgpack.unpackb(ev, raw=False)  # type: ignore[no-any-return]

    async def close_event(self, wait: float = 5.0) -> Close:
        """Events up to the hub's close frame (frames before it are skipped)."""
        while True:
            ev = await self.event(wait)
            if type(ev) is Close:
                return ev

    def send(self, data: bytes) -> None:
        self.w.write(data)

    def send_frame(self, frame: dict[str, Any]) -> None:
        self.w.write(self.out.message(msgpack.packb(frame, use_bin_type=True)))

    async def eof(self, wait: float) -> bool:
        """Whether the hub ends the connection within `wait` s (what it sends is read
        and dropped)."""
        try:
            async with asyncio.timeout(timeout(wait)):
                while await self.r.read(65536):
                    pass
        except (ConnectionError, TimeoutError) as exc:
            return not isinstance(exc, TimeoutError)
        return True

    def abort(self) -> None:
        self.w.transport.abort()


def hello_for(ident: Identity, challenge: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"t": "hello", "key": ident.public_key,
            "sig": ident.sign_auth(challenge["hub"], challenge["nonce"]), **extra}


# -- a hub in its own process, for memory bounds -------------------------------------------


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


HubProc = Callable[..., Awaitable[HubProcess]]
TOKEN = "edge-test-token-0123456789abcdef"


@pytest.fixture
async def hub_proc(tmp_path: Path) -> AsyncIterator[HubProc]:
    started: list[HubProcess] = []

    async def factory(**env: str) -> HubProcess:
        base = {k: v for k, v in os.environ.items() if not k.startswith("OPENRED_HUB_")}
        base.update({"OPENRED_HUB_STORE_URL": f"sqlite:///{tmp_path}/edge.db",
                     "OPENRED_HUB_LOG_LEVEL": "warning",
                     "OPENRED_HUB_ADMIN_TOKENS": TOKEN, **env})
        h = HubProcess(f"edge{len(started)}", base, tmp_path)
        started.append(h)
        await h.start()
        return h

    yield factory
    for h in started:
        await h.stop()


MIB = 1024 * 1024


async def _flood(raw: Raw, chunk: bytes, total: int, seconds: float) -> int:
    """Write `chunk` until `total` bytes went out or `seconds` passed; bytes sent."""
    sent = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while sent < total and loop.time() < deadline:
        raw.send(chunk)
        try:
            await asyncio.wait_for(raw.w.drain(), timeout(10))
        except (ConnectionError, TimeoutError):
            break
        sent += len(chunk)
    return sent


# -- memory grown before login ---------------------------------------------------------------


@pytest.mark.parametrize("compression", [False, True], ids=["plain", "permessage-deflate"])
async def test_pings_from_a_peer_that_never_reads_do_not_grow_memory(
        hub_proc: HubProc, compression: bool) -> None:
    """Red team: one connection that never sent `hello` and never read, pinging, grew
    the hub by 803 MiB in 4.5 s (every pong buffered). Pongs now wait for the socket and
    only the latest is answered (RFC 6455 §5.5.3)."""
    h = await hub_proc(OPENRED_HUB_AUTH_HELLO_TIMEOUT_S="60",
                       OPENRED_HUB_SERVER_COMPRESSION=str(compression).lower())
    assert h.proc is not None
    raw = await Raw.connect(h.ws_port)
    ext = "Sec-WebSocket-Extensions: permessage-deflate\r\n" if compression else ""
    head = await raw.upgrade(ext)
    assert head.startswith(b"HTTP/1.1 101")
    assert (b"permessage-deflate" in head.lower()) == compression
    raw.w.transport.pause_reading()  # never reads again
    rss0 = rss_of(h.proc.pid)
    ping = FrameWriter(server=False).frame(OP_PING, os.urandom(125))
    sent = await _flood(raw, ping * 512, 400 * MIB, 4.5)
    grown = rss_of(h.proc.pid) - rss0
    print(f"pings sent: {sent // len(ping)} ({sent / MIB:.0f} MiB), hub RSS grew "
          f"{grown / MIB:.1f} MiB")
    assert sent > 40 * MIB  # the hub kept reading: the flood really reached it
    assert grown < 24 * MIB
    raw.abort()


async def test_a_consumer_that_never_reads_is_cut_off_by_bytes(hub_proc: HubProc) -> None:
    """Red team: the send queue counted frames, so one slow consumer could hold
    10,000 x 128 KiB = 1.3 GB. Bounded in bytes too (limits.send_queue_max_bytes): the
    subscriber is closed 4009 long before 10,000 frames, and the hub's RSS stays small
    while a publisher keeps going."""
    h = await hub_proc(OPENRED_HUB_LIMITS_SEND_QUEUE_MAX_BYTES=str(4 * MIB),
                       OPENRED_HUB_LIMITS_MSGS_PER_S="100000",
                       OPENRED_HUB_LIMITS_BURST="100000")
    assert h.proc is not None
    slow = await RawNode.connect(h)
    assert (await slow.request({"t": "sub", "id": 1, "topic": "big"}))["t"] == "ok"
    slow.ws.transport.pause_reading()
    publisher = await RawNode.connect(h)
    rss0 = rss_of(h.proc.pid)
    body = os.urandom(60_000)
    n = 2000  # 120 MB, well under send_queue_max (10,000 frames)
    closed: asyncio.Task[Any] | None = None
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        for i in range(n):
            await publisher.send({"t": "pub", "topic": "big", "body": body, "id": i})
            if i % 50 == 49 and closed is None:
                async with http.get(f"{h.admin}/v1/stats") as r:
                    stats = (await r.json())["instances"][0]
                if stats["slow_consumer_disconnects"]:
                    # Read again, to see the bye and the close code before the hub's
                    # close grace runs out.
                    slow.ws.transport.resume_reading()
                    closed = asyncio.create_task(slow.closed(wait=10))
    await publisher.request({"t": "presence", "id": "p", "nodes": []})
    grown = rss_of(h.proc.pid) - rss0
    assert closed is not None, "the slow consumer was never cut off"
    code, frames = await closed
    msgs = sum(1 for f in frames if f["t"] == "msg")
    print(f"published {n} x 60 kB; slow subscriber got {msgs} before close {code}; "
          f"hub RSS grew {grown / MIB:.1f} MiB")
    assert code == 4009
    assert frames[-1] == {"t": "bye", "reason": "slow_consumer"}
    assert msgs < 200  # 4 MiB of 60 kB bodies, and what the sockets held
    assert grown < 48 * MIB
    await publisher.close()


# -- upgrades that never finish --------------------------------------------------------------


@pytest.mark.parametrize("how", ["silent", "half_request_line", "one_header_a_second"])
async def test_upgrade_that_never_finishes_is_closed(make_hub: Any, how: str) -> None:
    """Red team (slowloris): silent connections, half a request line, a header now and
    then were all still open 15 s later. server.open_timeout_s bounds the upgrade."""
    h = await make_hub(**{"server.open_timeout_s": 1.0, "auth.hello_timeout_s": 1.0})
    raw = await Raw.connect(h.ws_port)
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    async def dribble() -> None:
        if how == "half_request_line":
            raw.send(b"GET /v1/w")
        elif how == "one_header_a_second":
            raw.send(b"GET /v1/ws HTTP/1.1\r\n")
            for i in range(20):
                await asyncio.sleep(0.3)
                raw.send(f"X-Slow-{i}: 1\r\n".encode())

    task = asyncio.create_task(dribble())
    try:
        assert await raw.eof(4.0), "still open after 4 s"
    finally:
        task.cancel()
    assert loop.time() - t0 >= 0.9
    assert h.node.metrics.handshakes["open_timeout"] == 1


async def test_hello_timer_starts_after_the_upgrade(make_hub: Any) -> None:
    """The hello timeout counts from the challenge, not from the TCP connect: an upgrade
    that took most of the open timeout still gets its full hello time."""
    h = await make_hub(**{"server.open_timeout_s": 3.0, "auth.hello_timeout_s": 1.0})
    raw = await Raw.connect(h.ws_port)
    request = Raw.request()
    for i in range(0, len(request), 8):  # the request over 1.2 s
        raw.send(request[i:i + 8])
        await asyncio.sleep(1.2 * 8 / len(request))
    await raw.r.readuntil(b"\r\n\r\n")
    challenge = await raw.frame()
    assert challenge["t"] == "challenge"
    await asyncio.sleep(0.6)  # 1.8 s after connect: past a hello timer started then
    ident = Identity.generate()
    raw.send_frame(hello_for(ident, challenge))
    assert (await raw.frame())["t"] == "welcome"
    raw.abort()


# -- connection caps ---------------------------------------------------------------------------


async def _status(h: Any, headers: str = "") -> int:
    raw = await Raw.connect(h.ws_port)
    try:
        head = await raw.upgrade(headers)
        return int(head.split()[1])
    except (ConnectionError, asyncio.IncompleteReadError):
        return 0
    finally:
        raw.abort()


async def test_connections_per_ip_count_upgrades_that_never_finished(make_hub: Any) -> None:
    """The per-IP cap counts from the TCP connect: silent connections hold their slots
    (answered 429 past the cap), and a closed one gives its slot back."""
    h = await make_hub(**{"limits.max_connections_per_ip": 3})
    silent = [await Raw.connect(h.ws_port) for _ in range(3)]
    await eventually(lambda: len(h.node.connections) == 3)
    assert await _status(h) == 429
    assert h.node.metrics.handshakes["too_many_connections_per_ip"] == 1
    silent.pop().abort()
    await eventually(lambda: len(h.node.connections) == 2)
    assert await _status(h) == 101
    for s in silent:
        s.abort()


async def test_max_connections_is_answered_503(make_hub: Any) -> None:
    h = await make_hub(**{"limits.max_connections": 2})
    a = await RawNode.connect(h)
    b = await RawNode.connect(h)
    with pytest.raises(InvalidStatus) as info:
        await RawNode.open(h)
    assert info.value.response.status_code == 503
    await a.close()
    await eventually(lambda: len(h.node.connections) == 1)
    c = await RawNode.connect(h)
    for n in (b, c):
        await n.close()


# -- Origin ------------------------------------------------------------------------------------


async def test_origin_refused_unless_listed(make_hub: Any) -> None:
    """Red team: a page on another site connected to a hub on the visitor's machine,
    authenticated with a fresh key and read stored topic messages. A request that
    carries Origin is refused (403) unless its origin is listed; non-browser clients
    send none and are unaffected."""
    h = await make_hub(**{"server.allowed_origins": ["https://app.example.com"]})
    assert await _status(h) == 101  # no Origin: not a browser
    assert await _status(h, "Origin: https://evil.example\r\n") == 403
    assert await _status(h, "Origin: null\r\n") == 403
    assert await _status(h, "Origin: https://APP.example.com\r\n") == 101
    assert await _status(h, "Origin: https://app.example.com:8443\r\n") == 403
    assert h.node.metrics.handshakes["origin_refused"] == 3
    default = await make_hub()
    assert await _status(default, "Origin: http://localhost:3000\r\n") == 403
    anyone = await make_hub(**{"server.allowed_origins": ["*"]})
    assert await _status(anyone, "Origin: https://evil.example\r\n") == 101


# -- fragments -------------------------------------------------------------------------------


async def test_endless_empty_fragments_close_1008(make_hub: Any) -> None:
    """Red team: three million zero-length continuation frames grew the hub by 23 MiB
    (one list entry each; the size limit counts only bytes). The fragment count of a
    message is bounded: past it the connection is failed with 1008."""
    h = await make_hub()
    raw = await Raw.connect(h.ws_port)
    await raw.upgrade()
    assert (await raw.frame())["t"] == "challenge"
    w = raw.out
    raw.send(w.frame(OP_BINARY, b"\x81", fin=False) + w.frame(OP_CONT, b"", fin=False) * 5000)
    assert (await raw.close_event()).code == 1008
    assert await raw.eof(3)


# -- hello meta and handshake failures ----------------------------------------------------------


def _nested(depth: int) -> Any:
    v: Any = {}
    for _ in range(depth - 1):
        v = {"a": v}
    return v


BAD_META = {
    "bin_key": {b"k": 1},
    "bin_value": {"k": b"\x00\x01"},
    "ext": {"k": msgpack.ExtType(5, b"x")},
    "timestamp": {"k": msgpack.Timestamp(1, 0)},
    "deep_990": _nested(990),
    "nan": {"k": math.nan},
    "inf": {"k": math.inf},
    "minus_inf": {"k": -math.inf},
}


@pytest.mark.parametrize("kind", list(BAD_META))
async def test_hello_meta_that_is_not_json_gets_bad_frame_not_a_hang(
        make_hub: Any, kind: str) -> None:
    """Red team: a hello whose meta the store cannot hold hung forever (no welcome, no
    error, no close) while presence said the node was online."""
    h = await make_hub()
    watcher = await RawNode.connect(h)
    ident = Identity.generate()
    node = await RawNode.open(h, ident)
    hello = hello_for(ident, node.challenge, meta=BAD_META[kind])
    await node.ws.send(msgpack.packb(hello, use_bin_type=True, datetime=False))
    code, frames = await node.closed(wait=5)
    assert code == 4001
    assert [(f["t"], f["code"]) for f in frames] == [("error", "bad_frame")]
    assert frames[0]["msg"].startswith("meta")
    r = await watcher.request({"t": "presence", "id": 1, "nodes": [ident.node_id]})
    assert r["online"] == {ident.node_id: False}
    assert await h.node.store.get_node(ident.node_id) is None


async def test_store_error_during_the_handshake_ends_it(make_hub: Any,
                                                        monkeypatch: Any) -> None:
    """Any store error in a handshake (not only `unavailable`) ends it with an error
    frame and a close; the node is not left online."""
    h = await make_hub()
    watcher = await RawNode.connect(h)

    async def broken(*_a: Any, **_k: Any) -> None:
        raise ValueError("the store could not hold this")

    monkeypatch.setattr(h.node.store, "session_start", broken)
    ident = Identity.generate()
    node = await RawNode.open(h, ident)
    await node.send(hello_for(ident, node.challenge))
    code, frames = await node.closed(wait=5)
    assert code == 1011
    assert [(f["t"], f["code"]) for f in frames] == [("error", "internal")]
    r = await watcher.request({"t": "presence", "id": 1, "nodes": [ident.node_id]})
    assert r["online"] == {ident.node_id: False}


# -- RFC 6455 closing ---------------------------------------------------------------------------


async def _opened(h: Any) -> Raw:
    raw = await Raw.connect(h.ws_port)
    await raw.upgrade()
    assert (await raw.frame())["t"] == "challenge"
    return raw


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
async def test_close_code_not_allowed_on_the_wire_is_answered_1002(make_hub: Any,
                                                                   code: int) -> None:
    """Red team: the hub echoed 1005, 1006, 1015 and 5000+, and mapped 0 and 999 to
    1000. RFC 6455 §7.4: those never appear in a close frame; the answer is 1002."""
    h = await make_hub()
    raw = await _opened(h)
    raw.send(raw.out.frame(OP_CLOSE, code.to_bytes(2, "big")))
    assert (await raw.close_event()).code == 1002
    assert await raw.eof(3)


async def test_one_byte_close_body_is_answered_1002(make_hub: Any) -> None:
    h = await make_hub()
    raw = await _opened(h)
    raw.send(raw.out.frame(OP_CLOSE, b"\x03"))
    assert (await raw.close_event()).code == 1002


async def test_close_reason_not_utf8_is_answered_1007(make_hub: Any) -> None:
    h = await make_hub()
    raw = await _opened(h)
    raw.send(raw.out.frame(OP_CLOSE, (4000).to_bytes(2, "big") + b"\xff\xfe"))
    assert (await raw.close_event()).code == 1007


@pytest.mark.parametrize("code", [1000, 1001, 1011, 3000, 4000, 4999])
async def test_valid_close_code_is_echoed(make_hub: Any, code: int) -> None:
    h = await make_hub()
    raw = await _opened(h)
    raw.send(raw.out.frame(OP_CLOSE, code.to_bytes(2, "big") + b"bye"))
    assert (await raw.close_event()).code == code
    assert await raw.eof(3)


async def test_nothing_follows_the_hubs_close_frame(make_hub: Any) -> None:
    """RFC 6455 §5.5.1: after its close frame the hub sends nothing, not even a pong."""
    h = await make_hub(**{"auth.hello_timeout_s": 0.3})
    raw = await _opened(h)
    assert (await raw.close_event()).code == 4002  # hello timeout: the hub closes
    raw.send(raw.out.frame(OP_PING, b"after") * 3)
    await asyncio.sleep(0.3)
    raw.send(raw.out.frame(OP_CLOSE, (1000).to_bytes(2, "big")))
    after: list[Any] = []
    try:
        while True:
            after.append(await raw.event(3))
    except (EOFError, ConnectionError):
        pass
    assert not [e for e in after if type(e) in (Ping, Pong, Close, bytes)], after


async def test_ping_is_answered_with_its_data(make_hub: Any) -> None:
    h = await make_hub()
    raw = await _opened(h)
    raw.send(raw.out.frame(OP_PING, b"are you there"))
    assert await raw.event() == Pong(b"are you there")
    raw.send(raw.out.frame(OP_PONG, b"unasked"))  # an unasked pong is fine
    raw.send_frame({"t": "presence", "id": 1, "nodes": []})
    assert (await raw.frame())["code"] == "not_authenticated"


# -- frame fields ----------------------------------------------------------------------------


@pytest.mark.parametrize("since", [2**63, 2**64 - 1, -1])
async def test_sub_since_out_of_range_is_bad_frame(make_hub: Any, since: int) -> None:
    """Red team: `since` >= 2^63 reached the store and came back `unavailable`."""
    h = await make_hub()
    node = await RawNode.connect(h)
    r = await node.request({"t": "sub", "id": 1, "topic": "t", "since": since})
    assert (r["t"], r["code"]) == ("error", "bad_frame")
    assert "since" in r["msg"]
    ok = await node.request({"t": "sub", "id": 2, "topic": "t", "since": 2**63 - 1})
    assert (ok["t"], ok["recovered"]) == ("ok", True)
    await node.close()



async def test_upgrade_responses_name_no_software_versions(make_hub: Any) -> None:
    """The upgrade's `Server` header said `Python/3.11 websockets/17.4`: an attacker's
    version scan for free. Accepted and refused upgrades alike say `openred-hub`."""
    h = await make_hub()
    for path in ("/v1/ws", "/nowhere"):
        raw = await Raw.connect(h.ws_port)
        raw.send(Raw.request().replace(b"/v1/ws", path.encode(), 1))
        head = (await raw.r.readuntil(b"\r\n\r\n")).decode().lower()
        assert "server: openred-hub\r\n" in head
        assert "python" not in head and "websockets" not in head
        raw.abort()
