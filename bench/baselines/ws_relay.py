"""Minimal websockets relay (asyncio API + uvloop), see `bench.baselines`.

    python -m bench.baselines.ws_relay --port 9001
    python -m bench.baselines.ws_relay --port 9001 --redis redis://127.0.0.1:6379/0 --prefix b1:
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from typing import Any

import msgpack
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

__all__ = ["main"]

_packer = msgpack.Packer(use_bin_type=True)
packb = _packer.pack
unpackb = msgpack.unpackb

conns: dict[str, ServerConnection] = {}
topics: dict[str, set[ServerConnection]] = {}


class RedisLink:
    """Cross-relay routing: one Redis channel per connected node, subscribed by the relay
    holding it; what one loop turn publishes goes out in one pipeline."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis.asyncio as redis

        self.redis = redis.Redis.from_url(url)
        self.pubsub = self.redis.pubsub()
        self.prefix = prefix
        self.batch: list[tuple[str, bytes]] = []
        self.wake = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.pubsub.subscribe(self.prefix + "$ctl")
        self.tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._write())]

    async def claim(self, node: str) -> None:
        await self.pubsub.subscribe(self.prefix + node)

    async def release(self, node: str) -> None:
        await self.pubsub.unsubscribe(self.prefix + node)

    def publish(self, node: str, frame: bytes) -> None:
        self.batch.append((self.prefix + node, frame))
        self.wake.set()

    async def _write(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            batch, self.batch = self.batch, []
            if not batch:
                continue
            pipe = self.redis.pipeline(transaction=False)
            for channel, frame in batch:
                pipe.publish(channel, frame)
            await pipe.execute()

    async def _read(self) -> None:
        skip = len(self.prefix)
        while True:
            m = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if m is None or m["type"] != "message":
                continue
            target = conns.get(m["channel"].decode()[skip:])
            if target is not None:
                with contextlib.suppress(Exception):
                    await target.send(m["data"])


link: RedisLink | None = None


async def handler(ws: ServerConnection) -> None:
    # The bench drops its connections without a closing handshake: not an error here.
    with contextlib.suppress(ConnectionClosed):
        await _relay(ws)


async def _relay(ws: ServerConnection) -> None:
    hello = unpackb(await ws.recv())
    me = hello["node"]
    conns[me] = ws
    if link is not None:
        await link.claim(me)
    await ws.send(packb({"t": "welcome", "node": me}))
    mine: list[str] = []
    try:
        async for data in ws:
            value: Any = unpackb(data)
            for f in value if type(value) is list else (value,):
                t = f["t"]
                if t == "send":
                    frame = packb({"t": "msg", "from": me, "body": f["body"]})
                    target = conns.get(f["to"])
                    if target is not None:
                        await target.send(frame)
                    elif link is not None:
                        link.publish(f["to"], frame)
                elif t == "pub":
                    frame = packb({"t": "msg", "from": me, "topic": f["topic"],
                                   "body": f["body"]})
                    broadcast([c for c in topics.get(f["topic"], ()) if c is not ws], frame)
                elif t == "sub":
                    topics.setdefault(f["topic"], set()).add(ws)
                    mine.append(f["topic"])
                    await ws.send(packb({"t": "ok", "id": f.get("id")}))
    finally:
        if conns.get(me) is ws:
            del conns[me]
            if link is not None:
                with contextlib.suppress(Exception):
                    await link.release(me)
        for topic in mine:
            topics.get(topic, set()).discard(ws)


async def run(host: str, port: int, redis_url: str | None, prefix: str) -> None:
    global link
    if redis_url:
        link = RedisLink(redis_url, prefix)
        await link.start()
    async with serve(handler, host, port, compression=None, backlog=4096) as server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.baselines.ws_relay")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--redis", help="join other relays through this Redis (cluster baseline)")
    p.add_argument("--prefix", default="bench:", help="Redis channel prefix")
    args = p.parse_args(argv)
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(run(args.host, args.port, args.redis, args.prefix))


if __name__ == "__main__":
    main()
