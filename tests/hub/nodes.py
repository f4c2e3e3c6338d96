"""`RawNode`: a test client that speaks raw protocol frames to a real hub, so tests can
send exactly the bytes they mean (malformed ones included) and read every reply."""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
from openred.protocol.identity import Identity
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import timeout


def url(hub: Any) -> str:
    return f"ws://127.0.0.1:{hub.ws_port}/v1/ws"


class RawNode:
    def __init__(self, ws: ClientConnection, identity: Identity | None) -> None:
        self.ws = ws
        self.identity = identity
        self.welcome: dict[str, Any] = {}
        self.challenge: dict[str, Any] = {}
        self._buffer: list[dict[str, Any]] = []

    @property
    def node_id(self) -> str:
        return str(self.welcome["node"])

    @classmethod
    async def open(cls, hub: Any, identity: Identity | None = None, **kw: Any) -> RawNode:
        ws = await connect(url(hub), max_size=None, compression=None, ping_interval=None,
                           **kw)
        node = cls(ws, identity)
        node.challenge = msgpack.unpackb(await asyncio.wait_for(ws.recv(), timeout(5)))
        return node

    @classmethod
    async def connect(cls, hub: Any, identity: Identity | None = None, *,
                      token: str | None = None, batch: bool = False,
                      meta: dict[str, Any] | None = None) -> RawNode:
        if identity is None and token is None:
            identity = Identity.generate()
        node = await cls.open(hub, identity)
        hello: dict[str, Any] = {"t": "hello", "v": 1}
        if token is not None:
            hello["token"] = token
        else:
            assert identity is not None
            hello["key"] = identity.public_key
            hello["sig"] = identity.sign_auth(node.challenge["hub"], node.challenge["nonce"])
        if batch:
            hello["batch"] = True
        if meta is not None:
            hello["meta"] = meta
        await node.send(hello)
        node.welcome = await node.recv()
        assert node.welcome["t"] == "welcome", node.welcome
        return node

    async def send(self, frame: Any) -> None:
        await self.ws.send(msgpack.packb(frame, use_bin_type=True))

    async def send_raw(self, data: bytes | str) -> None:
        await self.ws.send(data)

    async def recv(self, wait: float = 5.0) -> dict[str, Any]:
        """The next frame (batches are unpacked into single frames)."""
        if self._buffer:
            return self._buffer.pop(0)
        data = await asyncio.wait_for(self.ws.recv(), timeout(wait))
        value = msgpack.unpackb(data, raw=False)
        if isinstance(value, list):
            self._buffer.extend(value[1:])
            return value[0]  # type: ignore[no-any-return]
        return value  # type: ignore[no-any-return]

    async def recv_type(self, t: str, wait: float = 5.0) -> dict[str, Any]:
        """Skip frames until one of type `t`."""
        while True:
            f = await self.recv(wait)
            if f["t"] == t:
                return f

    async def request(self, frame: dict[str, Any], wait: float = 5.0) -> dict[str, Any]:
        """Send a frame with an id and return the reply with that id (other frames
        received meanwhile are kept in order for later recv())."""
        await self.send(frame)
        kept: list[dict[str, Any]] = []
        try:
            while True:
                f = await self.recv(wait)
                if f.get("t") in ("ok", "error") and f.get("id") == frame.get("id"):
                    return f
                kept.append(f)
        finally:
            self._buffer[:0] = kept

    async def closed(self, wait: float = 5.0) -> tuple[int | None, list[dict[str, Any]]]:
        """Read until the hub closes; return (close code, frames received before)."""
        frames: list[dict[str, Any]] = list(self._buffer)
        self._buffer.clear()
        try:
            async with asyncio.timeout(timeout(wait)):
                while True:
                    data = await self.ws.recv()
                    v = msgpack.unpackb(data, raw=False)
                    frames.extend(v if isinstance(v, list) else [v])
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            return (rcvd.code if rcvd is not None else None), frames
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self.ws.close()


async def eventually(pred: Any, wait: float = 2.0) -> None:
    """Poll `pred()` (a bool, or an awaitable of one) until true, within `wait` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout(wait)
    while True:
        v = pred()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def no_frame(node: RawNode, wait: float = 0.3) -> None:
    """Assert that nothing arrives within `wait` seconds."""
    try:
        f = await node.recv(wait)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected frame {f}")


async def recv_msgs(node: RawNode, n: int, wait: float = 5.0) -> list[dict[str, Any]]:
    """The next `n` msg frames (other frames are skipped)."""
    out: list[dict[str, Any]] = []
    while len(out) < n:
        f = await node.recv(wait)
        if f["t"] == "msg":
            out.append(f)
    return out
