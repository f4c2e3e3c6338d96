"""The Redis broker: many hub instances as one hub (ARCHITECTURE.md, `broker.url =
"redis://..."`). It keeps the contract of `hub.broker.Broker`.

Routing choice: **one channel per connected node** (`<prefix>n:<node id>`), subscribed
by the instance that holds the node's session, rather than a node -> instance registry
with per-instance channels. Why:
- PUBLISH answers how many subscribers got the message, so "is the node online
  anywhere" and "deliver to it" are one atomic step: no registry look-up per message, no
  stale cache sending to an instance the node has left, no heartbeat keys to expire.
- When an instance dies (even SIGKILL), Redis drops its connection and with it its
  subscriptions: presence (`PUBSUB NUMSUB`) is right at once, not after a TTL.
- Only the holder of a node receives its traffic, and only instances with local
  subscribers of a topic receive that topic (`<prefix>t:<topic>`): route, don't
  broadcast; nobody decodes traffic meant for others.

Publishing is batched: everything published during one event-loop turn goes out in one
pipeline (one round trip), and frames bound for the same channel share one PUBLISH
(a msgpack array of already-encoded frames). One writer task sends the batches one
after the other, so frames keep their order per (instance, channel) and thus per
sender -> recipient. One pub/sub connection per instance is read by one task; when Redis
goes away it reconnects with backoff and subscribes again to everything it held.

Topic sequences are Redis counters (INCR, atomic cluster wide), floored by the store's
last sequence so a Redis restart (which loses the counters) never reuses one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import msgpack
import redis.asyncio as redis
from redis.exceptions import RedisError

from hub.broker import BrokerHandler, BrokerUnavailable

__all__ = ["RedisBroker"]

log = logging.getLogger("openred.hub.broker")

MAX_PENDING = 100_000  # frames waiting for the next pipeline; past it, publishes fail fast
OWNER_TTL_S = 86_400
_NODE, _CONTROL = 0, 1

# Atomic "next sequence, never below the store's": a Redis restart loses counters.
_NEXT_SEQ = """
local v = redis.call('INCR', KEYS[1])
local floor = tonumber(ARGV[1])
if v <= floor then
  v = floor + 1
  redis.call('SET', KEYS[1], v)
end
return v
"""


class RedisBroker:
    def __init__(self, url: str, *, hub_id: str = "openred",
                 seed: Callable[[str], Awaitable[int]] | None = None,
                 pool_size: int = 16) -> None:
        self.url = url
        self.prefix = f"openred:{hub_id}:"
        self._seed = seed
        # A blocking pool: redis-py's default pool raises when exhausted (PERF-NOTES).
        self._pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=pool_size, timeout=5, socket_connect_timeout=2,
            socket_timeout=5, health_check_interval=10)
        self._redis = redis.Redis(connection_pool=self._pool)
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._batch: dict[str, list[Any]] = {}
        self._waiters: dict[str, list[asyncio.Future[bool]]] = {}
        self._queued = 0
        self._handler: BrokerHandler | None = None
        self._channels: set[str] = set()
        self._floors: dict[str, int] = {}
        self.instance_id = ""
        self.up = False
        self._next_seq = self._redis.register_script(_NEXT_SEQ)

    # -- lifecycle ----------------------------------------------------------------

    async def start(self, instance_id: str, handler: BrokerHandler) -> None:
        self.instance_id = instance_id
        self._handler = handler
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await self._redis.ping()
            self.up = True
        except (RedisError, OSError):
            log.warning("redis not reachable at start; will keep trying",
                        extra={"event": "broker_down"})
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def close(self) -> None:
        for task in (self._reader, self._writer):
            if task is not None:
                task.cancel()
        for task in (self._reader, self._writer):
            if task is not None:
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        self._fail_waiters()
        if self._pubsub is not None:
            try:
                await self._pubsub.aclose()
            except Exception:
                pass
        await self._redis.aclose()
        await self._pool.aclose()

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from None

    # -- sequences ----------------------------------------------------------------

    def _seq_key(self, topic: str) -> str:
        return f"{self.prefix}seq:{topic}"

    async def _floor(self, topic: str) -> int:
        floor = self._floors.get(topic)
        if floor is None:
            floor = await self._seed(topic) if self._seed is not None else 0
            if len(self._floors) >= 100_000:
                self._floors.clear()
            self._floors[topic] = floor
        return floor

    async def next_seq(self, topic: str) -> int:
        floor = await self._floor(topic)
        try:
            return int(await self._next_seq(keys=[self._seq_key(topic)], args=[floor]))
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from None

    async def last_seq(self, topic: str) -> int:
        try:
            v = await self._redis.get(self._seq_key(topic))
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from None
        if v is None:
            return await self._floor(topic)
        return max(int(v), await self._floor(topic))

    # -- sessions -------------------------------------------------------------------

    def _node_channel(self, node_id: str) -> str:
        return f"{self.prefix}n:{node_id}"

    async def claim(self, node_id: str, session_id: str) -> None:
        """Become the holder of `node_id`: record the owner (tie-break for a race of two
        instances), tell any previous holder to close (§2 replace), then subscribe."""
        ch = self._node_channel(node_id)
        try:
            await self._redis.set(f"{self.prefix}owner:{node_id}", session_id, ex=OWNER_TTL_S)
            await self._redis.publish(ch, msgpack.packb(
                [self.instance_id, [[_CONTROL, "replace", session_id]]], use_bin_type=True))
            await self._subscribe(ch)
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from None

    async def release(self, node_id: str, session_id: str) -> None:
        handler = self._handler
        # The node may have reconnected here already: keep the channel then.
        if handler is not None and getattr(handler, "local", {}).get(node_id) is not None:
            return
        await self._unsubscribe(self._node_channel(node_id))

    async def interest(self, topic: str, on: bool) -> None:
        ch = f"{self.prefix}t:{topic}"
        if on:
            await self._subscribe(ch)
        else:
            await self._unsubscribe(ch)

    async def _subscribe(self, ch: str) -> None:
        self._channels.add(ch)
        try:
            await self._pubsub.subscribe(ch)
        except (RedisError, OSError):
            pass  # resubscribed by the reader when Redis is back

    async def _unsubscribe(self, ch: str) -> None:
        self._channels.discard(ch)
        try:
            await self._pubsub.unsubscribe(ch)
        except (RedisError, OSError):
            pass

    async def owner(self, node_id: str) -> str | None:
        v = await self._redis.get(f"{self.prefix}owner:{node_id}")
        return v.decode() if isinstance(v, bytes) else v

    # -- publishing -----------------------------------------------------------------

    def publish_to_node_nowait(self, node_id: str, frame: bytes, qos: int, mid: str,
                               want_result: bool = False) -> asyncio.Future[bool] | None:
        """Queue a frame for the instance holding `node_id` (sent with this loop turn's
        pipeline). With `want_result`, the future tells whether any instance held it."""
        return self._queue(self._node_channel(node_id), [_NODE, qos, mid, frame], want_result)

    async def publish_to_node(self, node_id: str, frame: bytes, qos: int, mid: str) -> bool:
        fut = self.publish_to_node_nowait(node_id, frame, qos, mid, True)
        assert fut is not None
        return await fut

    async def publish_to_topic(self, topic: str, seq: int, frame: bytes) -> None:
        self._queue(f"{self.prefix}t:{topic}", [seq, frame], False)

    async def control(self, node_id: str, command: str) -> bool:
        fut = self._queue(self._node_channel(node_id), [_CONTROL, command, None], True)
        assert fut is not None
        return await fut

    def _queue(self, ch: str, entry: list[Any], want_result: bool) -> asyncio.Future[bool] | None:
        if not self.up or self._queued >= MAX_PENDING:
            raise BrokerUnavailable("redis unavailable" if not self.up else "broker backlog full")
        batch = self._batch.get(ch)
        if batch is None:
            self._batch[ch] = [entry]
        else:
            batch.append(entry)
        self._queued += 1
        fut: asyncio.Future[bool] | None = None
        if want_result:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(ch, []).append(fut)
        self._wake.set()
        return fut

    async def _write_loop(self) -> None:
        """One pipeline per batch; the next batch collects while this one is in flight
        (the same group-commit shape as the stores)."""
        origin = self.instance_id
        while True:
            await self._wake.wait()
            self._wake.clear()
            # Let the rest of this loop turn add to the batch before it is sent.
            await asyncio.sleep(0)
            batch, self._batch = self._batch, {}
            waiters, self._waiters = self._waiters, {}
            self._queued = 0
            if not batch:
                continue
            channels = list(batch)
            try:
                pipe = self._redis.pipeline(transaction=False)
                for ch in channels:
                    pipe.publish(ch, msgpack.packb([origin, batch[ch]], use_bin_type=True))
                t0 = time.perf_counter()
                counts = await pipe.execute()
                self.publish_seconds = time.perf_counter() - t0
            except (RedisError, OSError) as exc:
                self.up = False
                log.warning("redis publish failed", extra={"event": "broker_publish_failed",
                                                           "error": str(exc)})
                for futs in waiters.values():
                    for f in futs:
                        if not f.done():
                            f.set_exception(BrokerUnavailable("redis unavailable"))
                continue
            for ch, n in zip(channels, counts, strict=True):
                for f in waiters.get(ch, ()):
                    if not f.done():
                        f.set_result(bool(n))

    def _fail_waiters(self) -> None:
        for futs in self._waiters.values():
            for f in futs:
                if not f.done():
                    f.set_exception(BrokerUnavailable("broker closed"))
        self._waiters.clear()

    # -- receiving ------------------------------------------------------------------

    async def _read_loop(self) -> None:
        delay = 0.1
        node_prefix = f"{self.prefix}n:".encode()
        topic_prefix = f"{self.prefix}t:".encode()
        while True:
            try:
                if not self._pubsub.subscribed:
                    if self._channels:
                        await self._pubsub.subscribe(*self._channels)
                    else:
                        await self._redis.ping()
                        self.up = True
                        delay = 0.1
                        await asyncio.sleep(0.2)
                        continue
                msg = await self._pubsub.get_message(timeout=1.0)
                if not self.up:
                    log.info("redis back", extra={"event": "broker_up"})
                self.up = True
                delay = 0.1
                if msg is None or msg.get("type") != "message":
                    continue
                ch: bytes = msg["channel"]
                if ch.startswith(node_prefix):
                    self._on_node(ch[len(node_prefix):].decode(), msg["data"])
                elif ch.startswith(topic_prefix):
                    self._on_topic(ch[len(topic_prefix):].decode(), msg["data"])
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if self.up:
                    log.warning("redis connection lost", extra={"event": "broker_down",
                                                                "error": str(exc)})
                self.up = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                try:
                    # Resubscribe everything this instance holds on a fresh connection.
                    await self._pubsub.aclose()
                except Exception:
                    pass
                self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            except Exception:
                log.exception("broker message handling failed",
                              extra={"event": "broker_message_failed"})

    def _on_node(self, node_id: str, data: bytes) -> None:
        handler = self._handler
        if handler is None:
            return
        origin, entries = msgpack.unpackb(data, raw=False)
        for entry in entries:
            if entry[0] == _NODE:
                handler.on_node_frame(node_id, entry[3], entry[1], entry[2])
            elif origin != self.instance_id or entry[1] != "replace":
                if entry[1] == "replace":
                    asyncio.get_running_loop().create_task(
                        self._replace(node_id, entry[2]))
                else:
                    handler.on_control(node_id, entry[1], entry[2])

    async def _replace(self, node_id: str, session_id: str) -> None:
        """Close the local session of `node_id` unless it is the recorded owner: of two
        instances racing, the last to claim wins and the other closes."""
        handler = self._handler
        if handler is None:
            return
        try:
            owner = await self.owner(node_id)
        except (RedisError, OSError):
            owner = session_id
        handler.on_control(node_id, "replace", owner)

    def _on_topic(self, topic: str, data: bytes) -> None:
        handler = self._handler
        if handler is None:
            return
        origin, entries = msgpack.unpackb(data, raw=False)
        if origin == self.instance_id:
            return  # fanned out locally already
        for seq, frame in entries:
            handler.on_topic_frame(topic, seq, frame)

    # -- presence -------------------------------------------------------------------

    async def presence(self, node_ids: Iterable[str]) -> dict[str, bool]:
        ids = list(node_ids)
        if not ids:
            return {}
        try:
            counts = await self._redis.pubsub_numsub(*[self._node_channel(n) for n in ids])
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from None
        return {n: bool(c) for n, (_ch, c) in zip(ids, counts, strict=True)}
