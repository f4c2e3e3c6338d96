"""A lean WebSocket load generator: raw asyncio protocols, frames encoded (and masked
with a zero key, which leaves the payload as is) once ahead of time, reads parsed by
`protocol.wsframes` (the repo's one WebSocket framing) and counted from each message's
first bytes. It exists so the generator is not the bottleneck: stock Python WebSocket
clients cost as much CPU as the relay they measure.

A `LeanNode` speaks the hub's handshake (docs/protocol.md §2: challenge, signed hello,
welcome), or with `plain_id` the baselines' one (`{"t":"hello","node":ID}` right after
the upgrade, answered by a welcome). After the welcome it counts frames received (a
batch, docs/protocol.md §1, counts as its number of frames, read from the array header).
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import msgpack
from openred.protocol.identity import Identity
from openred.protocol.wsframes import (
    ZERO_MASK_KEY,
    Close,
    Failure,
    FrameReader,
    FrameWriter,
    Ping,
    client_message,
)

__all__ = [
    "STAMP_BYTES",
    "LeanNode",
    "client_frame",
    "frame_count",
    "frames_of",
    "read_stamp",
    "stamped",
]

STAMP_BYTES = 8  # a send timestamp (perf_counter_ns, little endian) opens a body


# A masked final binary frame (RFC 6455 §5.3) with a zero masking key: the payload as is.
client_frame = client_message

# The hub is trusted here: its messages are read up to any size a bench may configure.
MAX_MESSAGE_BYTES = 1 << 26


def frame_count(payload: bytes | bytearray, start: int = 0) -> int:
    """How many protocol frames a message holds: the length of a msgpack array (a
    batch, §1), read from its header, else 1. No decoding."""
    b = payload[start] if len(payload) > start else 0
    if 0x90 <= b <= 0x9F:
        return b & 0x0F
    if b == 0xDC:
        return int.from_bytes(payload[start + 1:start + 3], "big")
    if b == 0xDD:
        return int.from_bytes(payload[start + 1:start + 5], "big")
    return 1


def frames_of(payload: bytes) -> list[dict[str, Any]]:
    """The frames of one message: a single map, or the maps of a batch."""
    value = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    return value if type(value) is list else [value]


def stamped(body_bytes: int) -> Callable[[], bytes]:
    """A body factory: the send time (perf_counter_ns) in the first 8 bytes, padded to
    `body_bytes` (at least 8)."""
    pad = os.urandom(max(0, body_bytes - STAMP_BYTES))
    ns = time.perf_counter_ns

    def body() -> bytes:
        return ns().to_bytes(STAMP_BYTES, "little") + pad

    return body


def read_stamp(body: bytes) -> int:
    return int.from_bytes(body[:STAMP_BYTES], "little")


class LeanNode(asyncio.Protocol):
    """One authenticated node. After the welcome it only counts frames received
    (`received`) and calls `on_messages(n)` once per read with how many arrived, and
    `on_payload(payload)` with each message's payload when set (slower path: the
    callback decodes it, see `frames_of`).

    Callbacks given to the constructor (or `connect`) are in place before the welcome,
    so frames the hub sends right behind it (stored QoS 1 messages) are not missed.
    """

    def __init__(self, identity: Identity | None = None,
                 hello_extra: dict[str, Any] | None = None, *, plain_id: str | None = None,
                 on_payload: Callable[[bytes], Any] | None = None,
                 on_messages: Callable[[int], Any] | None = None) -> None:
        self.plain_id = plain_id
        self.identity = identity if identity is not None or plain_id else Identity.generate()
        self.hello_extra = hello_extra or {}
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()  # the HTTP response, until its end
        self.reader = FrameReader(server=False, max_message_bytes=MAX_MESSAGE_BYTES)
        self.writer = FrameWriter(server=False, mask_key=ZERO_MASK_KEY)
        self.state = "http"
        self.ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.welcome: dict[str, Any] = {}
        self.welcomed_at = 0.0  # time.perf_counter() when the welcome arrived
        self.received = 0
        self.on_messages: Any = on_messages
        self.on_payload: Any = on_payload  # called with each payload when set (slower path)
        self.close_code: int | None = None
        self.lost = False

    @property
    def node_id(self) -> str:
        if self.plain_id is not None:
            return self.plain_id
        assert self.identity is not None
        return self.identity.node_id

    @classmethod
    async def connect(cls, host: str, port: int, identity: Identity | None = None,
                      wait_s: float = 30.0, local_host: str | None = None,
                      **kw: Any) -> LeanNode:
        loop = asyncio.get_running_loop()
        _, node = await loop.create_connection(
            lambda: cls(identity, **kw), host, port,
            local_addr=(local_host, 0) if local_host else None)
        key = base64.b64encode(os.urandom(16)).decode()
        assert node.transport is not None
        node.transport.write(
            f"GET /v1/ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        try:
            await asyncio.wait_for(node.ready, wait_s)
        except BaseException:
            node.close()
            raise
        return node

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def send(self, frame: dict[str, Any] | list[dict[str, Any]]) -> None:
        self.write(client_frame(msgpack.packb(frame, use_bin_type=True)))

    def close(self) -> None:
        """Drop the connection (no closing handshake: the bench only needs it gone)."""
        self.on_messages = self.on_payload = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    @property
    def is_open(self) -> bool:
        return self.state == "open" and not self.lost and self.close_code is None

    def data_received(self, data: bytes) -> None:
        if self.state == "http":
            buf = self.buf
            buf += data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                if not self.ready.done():
                    self.ready.set_exception(
                        ConnectionError(bytes(buf[:40]).decode(errors="replace")))
                return
            data = bytes(buf[end + 4:])  # frames that came with the response
            self.buf = bytearray()
            if self.plain_id is not None:
                self.send({"t": "hello", "node": self.plain_id, **self.hello_extra})
                self.state = "welcome"
            else:
                self.state = "challenge"
        count = 0
        on_payload = self.on_payload
        for ev in self.reader.feed(data):
            if type(ev) is bytes:
                if self.state != "open":
                    self._handshake(ev)
                    on_payload = self.on_payload
                    continue
                b = ev[0] if ev else 0
                count += 1 if b & 0xF0 != 0x90 and b < 0xDC else frame_count(ev)
                if on_payload is not None:
                    on_payload(ev)
            elif type(ev) is Ping:  # answer with a pong carrying the same data
                self.write(self.writer.pong(ev.data))
            elif type(ev) is Close or type(ev) is Failure:
                self.close_code = ev.code
        if count:
            self.received += count
            if self.on_messages is not None:
                self.on_messages(count)

    def _handshake(self, payload: bytes) -> None:
        frame = msgpack.unpackb(payload, raw=False)
        if self.state == "challenge":
            assert self.identity is not None
            hello = {"t": "hello", "key": self.identity.public_key,
                     "sig": self.identity.sign_auth(frame["hub"], frame["nonce"])}
            hello.update(self.hello_extra)
            self.send(hello)
            self.state = "welcome"
        elif frame.get("t") == "welcome":
            self.state = "open"
            self.welcome = frame
            self.welcomed_at = time.perf_counter()
            if not self.ready.done():
                self.ready.set_result(frame)
        elif not self.ready.done():
            self.ready.set_exception(ConnectionError(str(frame)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed during handshake"))
