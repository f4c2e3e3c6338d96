"""Minimal picows relay (+ uvloop), see `bench.baselines`.

    python -m bench.baselines.picows_relay --port 9002             # one send() per frame
    python -m bench.baselines.picows_relay --port 9002 --coalesce  # one write per loop turn
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from typing import Any

import msgpack
from openred.protocol.wsframes import binary_header
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

__all__ = ["main"]

_packer = msgpack.Packer(use_bin_type=True)
packb = _packer.pack
unpackb = msgpack.unpackb

conns: dict[str, Relay] = {}
topics: dict[str, set[Relay]] = {}
COALESCE = False


class Relay(WSListener):
    def __init__(self) -> None:
        self.t: WSTransport | None = None
        self.me: str | None = None
        self.mine: list[str] = []
        self.out: list[bytes] = []
        self.scheduled = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.t = transport

    def push(self, frame: bytes) -> None:
        if not COALESCE:
            assert self.t is not None
            self.t.send(WSMsgType.BINARY, frame)
            return
        self.out.append(binary_header(len(frame)))
        self.out.append(frame)
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        out, self.out = self.out, []
        if self.t is not None and out and not self.t.is_disconnected:
            self.t.underlying_transport.write(b"".join(out))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if frame.msg_type != WSMsgType.BINARY:
            return
        value: Any = unpackb(frame.get_payload_as_bytes())
        for f in value if type(value) is list else (value,):
            t = f["t"]
            if t == "send":
                target = conns.get(f["to"])
                if target is not None:
                    target.push(packb({"t": "msg", "from": self.me, "body": f["body"]}))
            elif t == "pub":
                out = packb({"t": "msg", "from": self.me, "topic": f["topic"],
                             "body": f["body"]})
                for c in topics.get(f["topic"], ()):
                    if c is not self:
                        c.push(out)
            elif t == "sub":
                topics.setdefault(f["topic"], set()).add(self)
                self.mine.append(f["topic"])
                self.push(packb({"t": "ok", "id": f.get("id")}))
            elif t == "hello":
                self.me = f["node"]
                conns[f["node"]] = self
                self.push(packb({"t": "welcome", "node": self.me}))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.me is not None and conns.get(self.me) is self:
            del conns[self.me]
        for topic in self.mine:
            topics.get(topic, set()).discard(self)
        self.t = None


def _factory(request: WSUpgradeRequest) -> Relay:
    return Relay()


async def run(host: str, port: int) -> None:
    server = await ws_create_server(_factory, host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    global COALESCE
    p = argparse.ArgumentParser(prog="python -m bench.baselines.picows_relay")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--coalesce", action="store_true",
                   help="write all frames for one connection once per loop iteration")
    args = p.parse_args(argv)
    COALESCE = args.coalesce
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(run(args.host, args.port))


if __name__ == "__main__":
    main()
