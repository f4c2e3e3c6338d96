"""The Redis broker: many hub instances as one hub (README.md, `broker.url =
"redis://..."`, `rediss://` for TLS, `?cluster=true` for a Redis Cluster). It keeps the
contract of `hub.broker.Broker`.

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
A subscription is confirmed by Redis before `claim` / `interest` return, so whatever is
published after them reaches this instance (the QoS 1 replay of a new session relies
on it: what was stored before is read from the store, what comes after arrives here).

Presence events (docs/protocol.md §6.1) have channels of their own, `<prefix>wn:<node
id>` and `<prefix>wt:<topic>`, subscribed only by instances with a local watcher of
that node or topic (hub/presence_watch.py says why): the node and topic channels above
keep meaning "holds the node" and "has subscribers", which presence counts and topic
routing rely on.

Publishing is batched: everything published during one event-loop turn goes out in one
pipeline (one round trip), and frames bound for the same channel share one PUBLISH
(a msgpack array of already-encoded frames). One writer task sends the batches one
after the other, so frames keep their order per (instance, channel) and thus per
sender -> recipient.

Everything on the message path (publishes, the owner record of a claim, the
pub/sub reader) goes over the broker's own RESP connections (hub/broker_resp.py: two
per shard, no per-call coroutine stack); redis-py keeps presence, ping and the Cluster
slot map, and lends its connection settings (credentials, TLS) to those connections.

Topics are numbered by the store, not here (hub/node.py `publish`); messages published
on different instances may reach an instance out of `seq` order, and hub/topic_order.py
puts them back in order for its subscribers.

Failures: while Redis is unreachable every call raises `BrokerUnavailable` at once
(nothing waits on connect timeouts); routing resumes as soon as the connections are back
(nodes that claimed while Redis was down included). Their claims, and every claim of an
instance whose Redis came back, are then made again through `reassert` (hub/claims.py):
an owner record changes only to a newer session (`_REASSERT`), so of two sessions of
one node left by a partition the newer stays, whichever instance asks first.

The connections themselves, their reconnection, and which shard (the whole Redis, or a
master of a Redis Cluster, `?cluster=true`) owns which channel or key are
`broker_redis_shards.py`; this module decides what is published and subscribed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgpack
from openred.hub.broker import BrokerHandler, BrokerUnavailable
from openred.hub.broker_redis_shards import REDIS_DOWN, Shards, stop_tasks
from openred.hub.broker_resp import command

__all__ = ["RedisBroker", "parse_redis_url"]

log = logging.getLogger("openred.hub.broker")
packb = msgpack.Packer(use_bin_type=True).pack

MAX_PENDING = 100_000  # frames waiting for the next pipeline; past it, publishes fail fast
# §6.1 presence events are best effort (watchers re-check): they are refused past half of
# that, so a burst of them (a mass disconnect) never takes the backlog from messages.
MAX_PENDING_EVENTS = MAX_PENDING // 2
OWNER_TTL_S = 86_400
_NODE, _CONTROL = 0, 1
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")

# A claim re-asserted after an outage (or a failed claim): the owner becomes ARGV[1]
# unless a newer session owns the node. Session ids are mids: their first 10 characters
# are the creation time (ms, Crockford base32, which sorts as the bytes do), so the
# greater id is the newer claim. Answers {owner, 1 if it changed}.
_REASSERT = """
local cur = redis.call('GET', KEYS[1])
if cur and cur >= ARGV[1] then
  if cur == ARGV[1] then
    redis.call('EXPIRE', KEYS[1], ARGV[2])
  end
  return {cur, 0}
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return {ARGV[1], 1}
"""


def parse_redis_url(url: str) -> tuple[str, bool]:
    """Split `broker.url` into the URL for redis-py and whether it names a Cluster
    (`?cluster=true`). Raises ValueError naming `broker.url` for a bad value."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError("broker.url: expected redis://, rediss:// or memory://")
    query = parse_qsl(parts.query, keep_blank_values=True)
    values = [v.lower() for k, v in query if k == "cluster"]
    if not values:
        return url, False
    if values[-1] not in _TRUE + _FALSE:
        raise ValueError("broker.url: cluster must be true or false")
    rest = [(k, v) for k, v in query if k != "cluster"]
    return urlunsplit(parts._replace(query=urlencode(rest))), values[-1] in _TRUE


class RedisBroker:
    def __init__(self, url: str, *, hub_id: str = "openred", pool_size: int = 16) -> None:
        self.url = url
        self._url, self.cluster = parse_redis_url(url)
        self.prefix = f"openred:{hub_id}:"
        self._node_prefix = f"{self.prefix}n:".encode()  # channel names as Redis sends them
        self._topic_prefix = f"{self.prefix}t:".encode()
        self._watch_node_prefix = f"{self.prefix}wn:".encode()  # §6.1 presence events
        self._watch_topic_prefix = f"{self.prefix}wt:".encode()
        self.shards = Shards(self._url, self.cluster, pool_size=pool_size,
                             on_message=self._dispatch, on_state=self._on_shards)
        self._writer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        self._batch: dict[str, list[Any]] = {}
        self._waiters: dict[str, list[asyncio.Future[bool]]] = {}
        self._queued = 0
        self._handler: BrokerHandler | None = None
        self.instance_id = ""
        self.up = False
        self.closing = False
        self.publish_seconds = 0.0

    # -- lifecycle ----------------------------------------------------------------

    async def start(self, instance_id: str, handler: BrokerHandler) -> None:
        self.instance_id = instance_id
        self._handler = handler
        loop = asyncio.get_running_loop()
        await self.shards.start()
        self._writer = loop.create_task(self._write_loop())

    async def close(self) -> None:
        self.closing = True

        def nudge() -> None:  # the idle loops wake up and see `closing`
            self._wake.set()

        await stop_tasks([t for t in (self._writer, *self._tasks)
                          if t is not None], nudge)
        self._fail_waiters()
        await self.shards.close()

    async def ping(self) -> None:
        # This instance's own pub/sub and publish connections first: a fresh connection
        # answering while they are still in their reconnect backoff is not a broker the
        # hub can route through (/readyz, backend_up).
        self._check_up()
        await self.shards.ping()

    def _check_up(self) -> None:
        if not self.up:
            raise BrokerUnavailable("redis unavailable")

    def _on_shards(self, up: bool) -> None:
        was_up, self.up = self.up, up
        if up and not was_up:
            # What was published while down is lost: the hub re-reads QoS 1 (hub/broker.py).
            on_up = getattr(self._handler, "on_broker_up", None)
            if on_up is not None:
                on_up()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- sessions -------------------------------------------------------------------

    def _node_channel(self, node_id: str) -> str:
        return f"{self.prefix}n:{node_id}"

    async def claim(self, node_id: str, session_id: str) -> None:
        """Become the holder of `node_id`: record the owner (tie-break for a race of two
        instances), tell any previous holder to close (§2 replace), then subscribe and
        wait for Redis to confirm it. With Redis down it raises BrokerUnavailable, and
        the node is subscribed all the same as soon as Redis is back."""
        ch = self._node_channel(node_id)
        key = f"{self.prefix}owner:{node_id}"
        try:
            self._check_up()
            # In this order: the previous holder reads the owner when told to replace.
            await self.shards.call(key, "SET", key, session_id, "EX", OWNER_TTL_S)
            await self.shards.call(ch, "SPUBLISH" if self.cluster else "PUBLISH", ch, packb(
                [self.instance_id, [[_CONTROL, "replace", session_id]]]))
        except (BrokerUnavailable, *REDIS_DOWN) as exc:
            await self.shards.hold(ch)
            raise BrokerUnavailable(str(exc)) from None
        await self.shards.hold(ch, wait=True)

    async def reassert(self, claims: list[tuple[str, str]]) -> list[str | None]:
        """Claim again sessions whose claim Redis could not take, or may have lost (a
        restarted Redis): each becomes its node's owner unless a newer session owns it
        (the `_REASSERT` script, atomic), and a session that took the node over tells
        the previous holder to replace (§2) as `claim` does. The owner of each node
        afterwards; None where Redis did not answer."""
        self._check_up()
        keys = [f"{self.prefix}owner:{node_id}" for node_id, _ in claims]
        replies = await self.shards.per_shard(keys, lambda _shard, idx: b"".join([
            command("EVAL", _REASSERT, 1, keys[i], claims[i][1], OWNER_TTL_S) for i in idx]))
        owners: list[str | None] = []
        for (node_id, session_id), reply in zip(claims, replies, strict=True):
            if not isinstance(reply, list) or len(reply) != 2:
                owners.append(None)  # not answered, or an error reply
                continue
            owner = reply[0].decode() if isinstance(reply[0], bytes) else None
            if owner == session_id:
                ch = self._node_channel(node_id)
                await self.shards.hold(ch)  # held already, unless it was let go meanwhile
                if reply[1] == 1:
                    try:  # after the owner record, as in `claim`
                        self._queue(ch, [_CONTROL, "replace", session_id], False)
                    except BrokerUnavailable:
                        owner = None  # not told: asserted again later
            owners.append(owner)
        return owners

    async def release(self, node_id: str, session_id: str) -> None:
        handler = self._handler
        # The node may have reconnected here already: keep the channel then.
        if handler is not None and getattr(handler, "local", {}).get(node_id) is not None:
            return
        await self.shards.let_go(self._node_channel(node_id))

    async def interest(self, topic: str, on: bool) -> None:
        ch = f"{self.prefix}t:{topic}"
        if on:
            await self.shards.hold(ch, wait=True)
        else:
            await self.shards.let_go(ch)

    async def watch_node(self, node_id: str, on: bool) -> None:
        """§6.1: other instances' events of `node_id` (confirmed by Redis when on)."""
        await self._watch(f"{self.prefix}wn:{node_id}", on)

    async def watch_topic(self, topic: str, on: bool) -> None:
        """§6.1: other instances' events of `topic`'s subscribers."""
        await self._watch(f"{self.prefix}wt:{topic}", on)

    async def _watch(self, ch: str, on: bool) -> None:
        if on:
            await self.shards.hold(ch, wait=True)
        else:
            await self.shards.let_go(ch)

    async def owner(self, node_id: str) -> str | None:
        key = f"{self.prefix}owner:{node_id}"
        v = await self.shards.call(key, "GET", key)
        return v.decode() if isinstance(v, bytes) else None

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

    def publish_presence_nowait(self, node_id: str, online: bool, ts: int,
                                topic: str | None = None,
                                want_result: bool = False) -> asyncio.Future[bool] | None:
        """§6.1: an event for the instances watching the node (or the topic), in this
        loop turn's pipeline; Redis drops it when no instance watches, and the receiver
        count answers `want_result`."""
        if self._queued >= MAX_PENDING_EVENTS:
            raise BrokerUnavailable("broker backlog full")
        if topic is None:
            return self._queue(f"{self.prefix}wn:{node_id}", [online, ts], want_result)
        return self._queue(f"{self.prefix}wt:{topic}", [node_id, online, ts], want_result)

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
        """One pipeline per shard per batch, the next batch collecting while this one is
        in flight (the same group-commit shape as the stores)."""
        while not self.closing:
            await self._wake.wait()
            self._wake.clear()
            # Let the rest of this loop turn add to the batch before it is sent.
            await asyncio.sleep(0)
            batch, self._batch = self._batch, {}
            waiters, self._waiters = self._waiters, {}
            self._queued = 0
            if not batch:
                continue
            try:
                t0 = time.perf_counter()
                results = await self._publish(batch)
                self.publish_seconds = time.perf_counter() - t0
            except asyncio.CancelledError:
                for ch, futs in waiters.items():  # failed by close()
                    self._waiters.setdefault(ch, []).extend(futs)
                raise
            error: Exception | None = None
            for ch, n in results.items():
                down = isinstance(n, Exception)
                if isinstance(n, Exception):
                    error = n
                for f in waiters.get(ch, ()):
                    if f.done():
                        continue
                    if down:
                        f.set_exception(BrokerUnavailable("redis unavailable"))
                    else:
                        f.set_result(bool(n))
            if error is not None:
                log.warning("redis publish failed", extra={"event": "broker_publish_failed",
                                                           "error": str(error)})

    async def _publish(self, batch: dict[str, list[Any]]) -> dict[str, Any]:
        """(S)PUBLISH each channel's entries as one message, one write per shard; the
        receiver count per channel, or the error."""
        origin = self.instance_id
        chans = list(batch)
        replies = await self.shards.per_shard(chans, lambda shard, idx: b"".join([
            command(shard.publish_cmd, chans[i], packb([origin, batch[chans[i]]]))
            for i in idx]))
        return dict(zip(chans, replies, strict=True))

    def _fail_waiters(self) -> None:
        for futs in self._waiters.values():
            for f in futs:
                if not f.done():
                    f.set_exception(BrokerUnavailable("broker closed"))
        self._waiters.clear()

    # -- receiving ------------------------------------------------------------------

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        if channel.startswith(self._node_prefix):
            self._on_node(channel[len(self._node_prefix):].decode(), data)
        elif channel.startswith(self._topic_prefix):
            self._on_topic(channel[len(self._topic_prefix):].decode(), data)
        elif channel.startswith(self._watch_node_prefix):
            self._on_presence(channel[len(self._watch_node_prefix):].decode(), None, data)
        elif channel.startswith(self._watch_topic_prefix):
            self._on_presence(None, channel[len(self._watch_topic_prefix):].decode(), data)

    def _on_node(self, node_id: str, data: bytes) -> None:
        handler = self._handler
        if handler is None:
            return
        origin, entries = msgpack.unpackb(data, raw=False)
        for entry in entries:
            if entry[0] == _NODE:
                handler.on_node_frame(node_id, entry[3], entry[1], entry[2])
            elif entry[1] == "replace":
                if origin != self.instance_id:
                    self._spawn(self._replace(node_id, entry[2]))
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
        except (BrokerUnavailable, *REDIS_DOWN):
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

    def _on_presence(self, node_id: str | None, topic: str | None, data: bytes) -> None:
        """§6.1 events of a watched node (`node_id`) or topic (`topic`)."""
        on_presence = getattr(self._handler, "on_presence", None)
        if on_presence is None:
            return
        origin, entries = msgpack.unpackb(data, raw=False)
        if origin == self.instance_id:
            return  # told to the local watchers already
        for entry in entries:
            if topic is None:
                on_presence(node_id, entry[0], entry[1], None)
            else:
                on_presence(entry[0], entry[1], entry[2], topic)

    # -- presence -------------------------------------------------------------------

    async def presence(self, node_ids: Iterable[str]) -> dict[str, bool]:
        ids = list(node_ids)
        if not ids:
            return {}
        self._check_up()
        channels = [self._node_channel(n) for n in ids]
        counts = await self.shards.numsub(channels)
        by_channel = {(c.decode() if isinstance(c, bytes) else c): int(n) for c, n in counts}
        return {n: by_channel.get(ch, 0) > 0 for n, ch in zip(ids, channels, strict=True)}

