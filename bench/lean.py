"""A lean WebSocket load generator: raw asyncio protocols, frames encoded (and masked
with a zero key, which leaves the payload as is) once ahead of time, reads parsed only
down to WebSocket frame headers. It exists so the generator is not the bottleneck:
stock Python WebSocket clients cost as much CPU as the relay they measure.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from typing import Any

import msgpack

from protocol.identity import Identity

__all__ = ["LeanNode", "client_frame"]


def client_frame(payload: bytes) -> bytes:
    """A masked final binary frame (RFC 6455 §5.3) with a zero masking key."""
    n = len(payload)
    if n < 126:
        head = bytes((0x82, 0x80 | n))
    elif n < 65536:
        head = b"\x82\xfe" + n.to_bytes(2, "big")
    else:
        head = b"\x82\xff" + n.to_bytes(8, "big")
    return head + b"\x00\x00\x00\x00" + payload


class LeanNode(asyncio.Protocol):
    """One authenticated node. After the welcome it only counts messages received
    (`received`) and calls `on_messages(n)` once per read with how many arrived."""

    def __init__(self, identity: Identity, hello_extra: dict[str, Any] | None = None) -> None:
        self.identity = identity
        self.hello_extra = hello_extra or {}
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.state = "http"
        self.ready = asyncio.get_running_loop().create_future()
        self.received = 0
        self.on_messages: Any = None
        self.on_payload: Any = None  # called with each payload when set (slower path)
        self.close_code: int | None = None

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    @classmethod
    async def connect(cls, host: str, port: int, identity: Identity | None = None,
                      **kw: Any) -> LeanNode:
        loop = asyncio.get_running_loop()
        _, node = await loop.create_connection(
            lambda: cls(identity or Identity.generate(), **kw), host, port)
        key = base64.b64encode(os.urandom(16)).decode()
        assert node.transport is not None
        node.transport.write(
            f"GET /v1/ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        await asyncio.wait_for(node.ready, 30)
        return node

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def send(self, frame: dict[str, Any]) -> None:
        self.write(client_frame(msgpack.packb(frame, use_bin_type=True)))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.state == "http":
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.ready.set_exception(ConnectionError(bytes(buf[:40]).decode(errors="replace")))
                return
            del buf[: end + 4]
            self.state = "challenge"
        count = 0
        pos = 0
        n_buf = len(buf)
        on_payload = self.on_payload
        while n_buf - pos >= 2:
            b1 = buf[pos + 1] & 0x7F
            op = buf[pos] & 0x0F
            if b1 < 126:
                hl, n = 2, b1
            elif b1 == 126:
                if n_buf - pos < 4:
                    break
                hl, n = 4, int.from_bytes(buf[pos + 2:pos + 4], "big")
            else:
                if n_buf - pos < 10:
                    break
                hl, n = 10, int.from_bytes(buf[pos + 2:pos + 10], "big")
            if n_buf - pos < hl + n:
                break
            start = pos + hl
            pos = start + n
            if op == 0x2:
                if self.state != "open":
                    self._handshake(bytes(buf[start:pos]))
                else:
                    count += 1
                    if on_payload is not None:
                        on_payload(bytes(buf[start:pos]))
            elif op == 0x8:
                self.close_code = int.from_bytes(buf[start:start + 2], "big") if n >= 2 else None
            elif op == 0x9:  # ping: answer with a pong carrying the same data
                payload = bytes(buf[start:pos])
                self.write(bytes((0x8A, 0x80 | len(payload))) + b"\x00" * 4 + payload)
        del buf[:pos]
        if count:
            self.received += count
            if self.on_messages is not None:
                self.on_messages(count)

    def _handshake(self, payload: bytes) -> None:
        frame = msgpack.unpackb(payload, raw=False)
        if self.state == "challenge":
            hello = {"t": "hello", "key": self.identity.public_key,
                     "sig": self.identity.sign_auth(frame["hub"], frame["nonce"])}
            hello.update(self.hello_extra)
            self.send(hello)
            self.state = "welcome"
        elif frame.get("t") == "welcome":
            self.state = "open"
            self.ready.set_result(frame)
        else:
            self.ready.set_exception(ConnectionError(str(frame)))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed during handshake"))
