"""A tiny fake hub for the SDK's unit tests, on websockets' asyncio server, port 0.

It speaks enough of docs/protocol.md (challenge, signed hello checked with
`verify_signature`, welcome, `ok` / `error` replies by id, §4.2 `cid` repeats answered
`dup`, `sub` with `recovered`, `watch`) and lets a test push frames and batches, send
`bye`, and close with a chosen code. Client frames are kept as the plain maps the SDK
sent (so `meta` and `cid` are visible whatever the protocol decoder knows); the real hub
is exercised in the e2e tests.
"""

from __future__ import annotations

import os
import time
from http import HTTPStatus
from typing import Any

import msgpack
from openred.protocol.errors import CLOSE_AUTH_FAILED, CLOSE_RESTART
from openred.protocol.frames import (
    encode_challenge,
    encode_error,
    encode_msg,
    encode_ok,
    encode_welcome,
)
from openred.protocol.identity import auth_message, node_id_for_key, verify_signature
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

HUB_ID = "fake-hub"
TOKEN = "good-token"
TOKEN_NODE = "token-node"
LIMITS = {"max_frame_bytes": 131072, "max_body_bytes": 65536, "msgs_per_s": 1000,
          "burst": 1000, "max_topics": 1000}


def pack(frame: Any) -> bytes:
    return msgpack.packb(frame, use_bin_type=True)


def msg(mid: str, body: bytes = b"x", qos: int = 0, sender: str = "peer",
        **extra: Any) -> bytes:
    if not extra:
        return encode_msg(mid, sender, body, 1_700_000_000_000, qos)
    frame = {"t": "msg", "mid": mid, "from": sender, "body": body, "ts": 1_700_000_000_000,
             "qos": qos, **extra}
    return pack(frame)


def topic_msg(mid: str, topic: str, seq: int, body: bytes = b"t", sender: str = "x",
              **extra: Any) -> bytes:
    return pack({"t": "msg", "mid": mid, "from": sender, "topic": topic, "seq": seq,
                 "body": body, "ts": 1, "qos": 0, **extra})


class FakeHub:
    """Records every client frame as (session number, map)."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.server: Server | None = None
        self.url = ""
        self.sessions: list[ServerConnection] = []
        self.hellos: list[dict[str, Any]] = []
        self.frames: list[tuple[int, dict[str, Any]]] = []
        self.raw_messages = 0
        self.refuse: tuple[str, int] | None = None  # (error code, close code)
        self.errors: dict[str, str] = {}  # `to` or topic -> error code to answer
        self.hold = 0  # collect this many replies, then send them in reverse order
        self.held: list[bytes] = []
        self.silent = False  # answer no request at all
        self.reject_upgrades = 0  # answer this many upgrades with HTTP 503
        self.upgrade_times: list[float] = []
        self.welcome_times: list[float] = []
        self.topic_seq: dict[str, int] = {}
        self.lost: set[str] = set()  # topics whose `sub` with since says recovered false
        self.client_close_codes: list[int | None] = []
        self.limits = dict(LIMITS)
        self.drop_on_resub = 0  # close this many sessions (1012) on a `sub` with since
        self.cids: dict[tuple[str, str], str] = {}  # (sender, cid) -> mid (§4.2)
        self.stored: list[dict[str, Any]] = []  # QoS 1 sends stored (not repeats)
        self.online: set[str] = set()
        self._mids = 0

    async def __aenter__(self) -> FakeHub:
        await self.start()
        return self

    async def start(self) -> None:
        self.server = await serve(self._handler, "127.0.0.1", self.port, compression=None,
                                  process_request=self._process_request)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{self.port}/v1/ws"

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        self.upgrade_times.append(time.monotonic())
        if self.reject_upgrades > 0:
            self.reject_upgrades -= 1
            return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "busy\n")
        return None

    # what tests look at

    def of_type(self, t: str, session: int | None = None) -> list[dict[str, Any]]:
        return [f for s, f in self.frames
                if f.get("t") == t and (session is None or s == session)]

    def acked(self) -> list[str]:
        out: list[str] = []
        for f in self.of_type("ack"):
            if "mid" in f:
                out.append(f["mid"])
            out += f.get("mids", [])
        return out

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
            hello = msgpack.unpackb(await ws.recv(), raw=False)
        except ConnectionClosed:
            return
        self.hellos.append(hello)
        if self.refuse is not None:
            code, close_code = self.refuse
            await ws.send(encode_error(None, code, "refused"))
            await ws.close(close_code, code)
            return
        if hello.get("key") is not None:
            if not verify_signature(hello["key"], auth_message(HUB_ID, nonce), hello["sig"]):
                await ws.send(encode_error(None, "auth_failed", "bad signature"))
                await ws.close(CLOSE_AUTH_FAILED, "auth_failed")
                return
            node = node_id_for_key(hello["key"])
        elif hello.get("token") == TOKEN:
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
                value = msgpack.unpackb(data, raw=False)
                for frame in value if isinstance(value, list) else [value]:
                    self.frames.append((no, frame))
                    await self._answer(ws, node, frame)
        except ConnectionClosed:
            pass
        finally:
            self.client_close_codes.append(ws.close_code)

    def _mid(self, body: bytes) -> str:
        self._mids += 1
        return "mid-" + body.decode(errors="replace") if len(body) < 30 else f"mid{self._mids}"

    async def _answer(self, ws: ServerConnection, node: str, f: dict[str, Any]) -> None:
        t = f.get("t")
        if t == "ack":
            return
        fid = f.get("id")
        if fid is None:
            if t == "send" and f.get("to") in self.errors:
                await ws.send(encode_error(None, self.errors[f["to"]], "refused"))
            return
        if self.silent:
            return
        if t == "sub" and f.get("since") is not None and self.drop_on_resub > 0:
            self.drop_on_resub -= 1
            await ws.close(CLOSE_RESTART, "restart")
            return
        reply: bytes
        if t == "send":
            if f["to"] in self.errors:
                reply = encode_error(fid, self.errors[f["to"]], "refused")
            elif f.get("qos") == 1 and f.get("cid") is not None:
                key = (node, f["cid"])
                if key in self.cids:
                    reply = encode_ok(fid, mid=self.cids[key], status="stored", dup=True)
                else:
                    mid = self._mid(f["body"])
                    self.cids[key] = mid
                    self.stored.append(f)
                    reply = encode_ok(fid, mid=mid, status="stored")
            else:
                reply = encode_ok(fid, mid=self._mid(f["body"]),
                                  status="stored" if f.get("qos") == 1 else "sent")
        elif t == "pub":
            seq = self.topic_seq.get(f["topic"], 0) + 1
            self.topic_seq[f["topic"]] = seq
            reply = encode_ok(fid, mid=self._mid(f["body"]), seq=seq)
        elif t == "sub":
            topic = f["topic"]
            if topic in self.errors:
                reply = encode_error(fid, self.errors[topic], "refused")
            elif f.get("since") is not None:
                reply = encode_ok(fid, seq=self.topic_seq.get(topic, 0),
                                  recovered=topic not in self.lost)
            else:
                reply = encode_ok(fid, seq=self.topic_seq.get(topic, 0))
        elif t in ("unsub", "unwatch"):
            reply = encode_ok(fid)
        elif t == "presence":
            reply = encode_ok(fid, online={n: n in self.online for n in f["nodes"]})
        elif t == "watch":
            fields: dict[str, Any] = {}
            if f.get("nodes") is not None:
                fields["online"] = {n: n in self.online for n in f["nodes"]}
            reply = encode_ok(fid, **fields)
        else:
            reply = encode_error(fid, "unknown_type", "unknown frame type")
        if self.hold:
            self.held.append(reply)
            if len(self.held) == self.hold:
                for r in reversed(self.held):
                    await ws.send(r)
                self.held.clear()
            return
        await ws.send(reply)
