"""The Redis behind the Redis broker (`broker_redis.py`): its connections, kept up, and
which shard owns which channel or key.

Owned here: `Shards`, the whole Redis as one `Shard` or one per master of a Redis
Cluster; each shard's pub/sub and publishing connections (hub/broker_resp.py), kept up
by one task, and the channels it subscribes; the Cluster slot map; commands sent to the
shard owning their key (`per_shard`); redis-py for what is off the message path
(presence counts, ping, the slot map). The broker decides what is published and what
messages mean; it hears back through `on_message` and `on_state` (all shards up or not).

Failures: a shard is up only once both its new connections answered PING (a TCP connect
alone is not Redis). A lost shard reconnects with jittered backoff that doubles from
0.1 s while connections keep failing, up to 2 s apart, and starts over only after a
connection that lasted 10 s; it then subscribes again to every channel it holds, those
subscribed meanwhile included. A pub/sub connection silent for 3 heartbeats (half-open
TCP) is dropped and reconnected the same way.

Redis Cluster (`?cluster=true`, any node as the seed): sharded pub/sub (SSUBSCRIBE /
SPUBLISH: a message travels only to the shard owning its channel), keys without hash
tags so sequences, owners and channels spread over all slots. When a master fails or a
slot moves, the slot map is read again, a dead master's shard is dropped and its
channels are subscribed where they live now; a channel Redis unsubscribes (its slot
moved) is followed; a command answered MOVED or ASK is sent once more.

A little over 500 lines on purpose: one shard's connections and the set of shards share
the slot map and the reconnection rules above; apart, each would reach into the other.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as redis
from openred.hub.broker import BrokerUnavailable
from openred.hub.broker_resp import RespConnection, RespError, command, open_resp
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["REDIS_DOWN", "Shard", "Shards", "stop_tasks"]

log = logging.getLogger("openred.hub.broker")

CONFIRM_TIMEOUT_S = 2.0  # how long claim/interest wait for Redis to confirm a subscription
RESUBSCRIBE_CHUNK = 1000
MOVE_FOLLOW_TRIES = 10  # slot map reads (0.05 s apart, doubling to 1 s) after a move
HEARTBEAT_S = 5.0  # a silent pub/sub connection is PINGed, and dropped after 3x this
PUBLISH_TIMEOUT_S = 5.0  # a pipeline not answered by then: the connection is dropped
REDIS_DOWN = (RedisError, RedisClusterException, OSError)  # what "Redis is down" raises
RECONNECT_MIN_S = 0.1  # first wait before a lost shard is connected again, doubling ...
RECONNECT_MAX_S = 2.0  # ... up to this (each wait jittered down to half)
STABLE_S = 10.0  # a connection up this long starts the backoff over
HEALTH_TIMEOUT_S = 2.0  # how long a new connection has to answer PING
_PING = command("PING")


async def _health_check(conn: RespConnection) -> None:
    """PING on a connection just opened (nothing subscribed yet, so the answer is a
    reply, not a push). Raises ConnectionError unless Redis answers PONG in time: an
    error reply (LOADING, NOAUTH, MASTERDOWN) is not a Redis to route through."""
    async with asyncio.timeout(HEALTH_TIMEOUT_S):
        (reply,) = await conn.send(_PING, 1)
    if reply != b"PONG":
        conn.close()
        raise ConnectionError(f"redis did not answer PING: {reply}")


def _node_url(url: str, host: str, port: int) -> str:
    """The seed URL with another host:port (credentials, TLS and options kept)."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]], nudge: Callable[[], None]) -> None:
    """End `tasks` whose loops check a closing flag the caller has set.

    A redis-py call may swallow a cancellation (it finishes the command, or
    asyncio.timeout turns it into a TimeoutError): the flag ends the loops, `nudge` wakes
    the idle ones, and what is left is cancelled again.
    """
    tasks = list(tasks)
    for _ in range(20):
        nudge()
        pending = [t for t in tasks if not t.done()]
        if not pending:
            break
        for t in pending:
            t.cancel()
        await asyncio.wait(pending, timeout=0.1)
    for t in tasks:
        if t.done() and not t.cancelled():
            t.exception()  # retrieved: a loop that ended on an error is not logged twice


class Shard:
    """The whole Redis, or one master of a Redis Cluster (then SSUBSCRIBE / SPUBLISH:
    sharded pub/sub): one pub/sub connection, read in `data_received`, and one
    connection for this instance's pipelined publishes, both kept up by one task."""

    def __init__(self, shards: Shards, name: str, client: Any, sharded: bool) -> None:
        self.shards = shards
        self.name = name
        self.client = client  # redis-py: settings for the raw connections, presence
        self.sharded = sharded
        self.publish_cmd = b"SPUBLISH" if sharded else b"PUBLISH"
        self._sub_cmd = b"SSUBSCRIBE" if sharded else b"SUBSCRIBE"
        self._unsub_cmd = b"SUNSUBSCRIBE" if sharded else b"UNSUBSCRIBE"
        self.channels: set[str] = set()
        self.up = False
        self.sub: RespConnection | None = None
        self.pub: RespConnection | None = None
        self._confirm: dict[bytes, list[asyncio.Future[None]]] = {}
        self.task: asyncio.Task[None] | None = None
        self.tried = asyncio.Event()  # set once the first connection attempt is over
        self.last_error = ""  # why the last connection ended or failed (for the logs)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def subscribe(self, ch: str, wait: bool) -> None:
        self.channels.add(ch)
        sub = self.sub
        if sub is None or not sub.open:
            return  # subscribed with the others when the connection is back
        fut: asyncio.Future[None] | None = None
        if wait:
            fut = asyncio.get_running_loop().create_future()
            self._confirm.setdefault(ch.encode(), []).append(fut)
        sub.write(command(self._sub_cmd, ch))
        if fut is not None:
            try:
                async with asyncio.timeout(CONFIRM_TIMEOUT_S):
                    await fut
            except TimeoutError:
                self._drop_waiter(ch, fut)

    def _drop_waiter(self, ch: str, fut: asyncio.Future[None]) -> None:
        futs = self._confirm.get(ch.encode())
        if futs is not None and fut in futs:
            futs.remove(fut)
            if not futs:
                del self._confirm[ch.encode()]

    async def unsubscribe(self, ch: str) -> None:
        self.channels.discard(ch)
        sub = self.sub
        if sub is not None:
            sub.write(command(self._unsub_cmd, ch))

    def _subscribe_all(self, sub: RespConnection) -> None:
        """Every channel held, in one write."""
        channels = list(self.channels)
        if self.sharded:  # one slot per SSUBSCRIBE (CROSSSLOT otherwise)
            sub.write(b"".join(command(self._sub_cmd, ch) for ch in channels))
        else:
            sub.write(b"".join(command(self._sub_cmd, *channels[i:i + RESUBSCRIBE_CHUNK])
                               for i in range(0, len(channels), RESUBSCRIBE_CHUNK)))

    def _on_push(self, value: Any) -> None:
        if type(value) is not list or len(value) < 3:
            return  # PONG
        kind = value[0]
        try:
            if kind == b"message" or kind == b"smessage":
                self.shards.on_message(value[1], value[2])
            elif kind == b"subscribe" or kind == b"ssubscribe":
                for f in self._confirm.pop(value[1], ()):
                    if not f.done():
                        f.set_result(None)
            elif kind == b"sunsubscribe" and value[1].decode() in self.channels:
                # Redis moved the slot to another master: follow it.
                self.shards.moved(self, value[1].decode())
        except Exception:
            log.exception("broker message handling failed",
                          extra={"event": "broker_message_failed"})

    async def _run(self) -> None:
        shards = self.shards
        loop = asyncio.get_running_loop()
        delay = RECONNECT_MIN_S
        while not shards.closing:
            up_at: float | None = None
            try:
                pool = self.client.connection_pool
                sub = await open_resp(pool, self._on_push)
                pub: RespConnection | None = None
                try:
                    pub = await open_resp(pool)
                    # Up once Redis answers on both new connections, not on a TCP
                    # connect: an endpoint that accepts and then resets (a proxy in front
                    # of a dead Redis, a Redis still loading) never counts as back.
                    await _health_check(sub)
                    await _health_check(pub)
                except BaseException:
                    sub.close()
                    if pub is not None:
                        pub.close()
                    raise
                self.sub, self.pub = sub, pub
                self._subscribe_all(sub)
                self._set_up(True)
                self.tried.set()
                up_at = loop.time()
                await self._watch(sub, pub)
                error = "connection lost"
            except asyncio.CancelledError:
                self._close_connections()
                raise
            except (*REDIS_DOWN, TimeoutError) as exc:
                error = str(exc) or type(exc).__name__
            self.last_error = error
            self.tried.set()
            self._close_connections()
            if shards.closing:
                return
            if self.up:
                log.warning("redis connection lost", extra={
                    "event": "broker_down", "shard": self.name, "error": error})
            else:
                log.debug("redis connection failed", extra={
                    "event": "broker_connect_failed", "shard": self.name, "error": error})
            self._set_up(False)
            # The backoff grows while connections keep failing, and starts over only
            # after a connection that lasted: a Redis that answers and then drops every
            # connection is retried at most every RECONNECT_MAX_S, not ten times a
            # second (each "up" makes the hub read every session's queue again).
            if up_at is not None and loop.time() - up_at >= STABLE_S:
                delay = RECONNECT_MIN_S
            await asyncio.sleep(delay * (0.5 + random.random() / 2))  # jittered
            delay = min(delay * 2, RECONNECT_MAX_S)
            if self.sharded:  # not awaited: it may retire this very shard
                shards.spawn(shards.refresh_topology())

    async def _watch(self, sub: RespConnection, pub: RespConnection) -> None:
        """Return when either connection is gone, or the pub/sub one has been silent
        (not even answering PING) for too long: a half-open TCP connection."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.wait((sub.lost, pub.lost), timeout=HEARTBEAT_S,
                               return_when=asyncio.FIRST_COMPLETED)
            if not (sub.open and pub.open):
                return
            silent = loop.time() - sub.last_rx
            if silent > 3 * HEARTBEAT_S:
                return
            if silent >= HEARTBEAT_S:
                sub.write(_PING)

    def _close_connections(self) -> None:
        for conn in (self.sub, self.pub):
            if conn is not None:
                conn.close()
        self.sub = self.pub = None

    def _set_up(self, up: bool) -> None:
        if up and not self.up and self.tried.is_set():
            log.info("redis back", extra={"event": "broker_up", "shard": self.name})
        self.up = up
        self.shards.state_changed()

    async def close(self) -> None:
        self._close_connections()
        if self.sharded:  # its own client (a standalone shard shares the broker's)
            try:
                await self.client.aclose()
                await self.client.connection_pool.aclose()
            except Exception:
                pass


class Shards:
    """Every shard of the Redis named by `url` (a Cluster's masters when `cluster`).

    `on_message(channel, data)` gets every pub/sub message; `on_state(up)` is called
    whenever a shard connects or is lost, with whether all of them are up.
    """

    def __init__(self, url: str, cluster: bool, *, pool_size: int,
                 on_message: Callable[[bytes, bytes], None],
                 on_state: Callable[[bool], None]) -> None:
        self.url = url
        self.cluster = cluster
        self.on_message = on_message
        self._on_state = on_state
        # One immediate retry: a pooled connection may be stale after a Redis restart.
        # Never more, never with backoff: while Redis is down, calls fail fast.
        self._conn_kw: dict[str, Any] = {
            "socket_connect_timeout": 2, "socket_timeout": 5,
            "retry": Retry(NoBackoff(), 1),
            "retry_on_error": [RedisConnectionError, RedisTimeoutError]}
        self._pool: Any = None
        self.client: Any  # redis-py, Redis or RedisCluster
        # redis-py carries only what is off the message path (presence, ping, the
        # Cluster slot map); its cluster client raises instead of waiting when a node's
        # pool is exhausted (PERF-NOTES), so the bound is kept here.
        self._limit = asyncio.Semaphore(pool_size)
        if cluster:
            self.client = RedisCluster.from_url(url, max_connections=pool_size,
                                                **self._conn_kw)
        else:
            # A blocking pool: redis-py's default pool raises when exhausted (PERF-NOTES).
            self._pool = redis.BlockingConnectionPool.from_url(
                url, max_connections=pool_size, timeout=5,
                health_check_interval=10, **self._conn_kw)
            self.client = redis.Redis(connection_pool=self._pool)
        self.by_name: dict[str, Shard] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unplaced: set[str] = set()
        self._topology_at = 0.0
        self.up = False
        self.closing = False

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Connect every shard (waiting for the first attempt of each); when Redis
        cannot be reached, log why and keep trying in the background."""
        if self.cluster:
            # One pub/sub connection per master, each read by its own task.
            if not await self._discover():
                log.warning("redis cluster not reachable at start; will keep trying",
                            extra={"event": "broker_down"})
                self.spawn(self._discover_forever())
        else:
            shard = Shard(self, "redis", self.client, sharded=False)
            self.by_name[shard.name] = shard
            shard.start()
            await shard.tried.wait()
            if not self.up:
                log.warning("redis not reachable at start; will keep trying",
                            extra={"event": "broker_down", "error": shard.last_error})

    async def _discover(self) -> bool:
        """Redis Cluster: read the slot map and start a shard per master."""
        try:
            await self.client.initialize()
            shards = [self._shard_of_node(node) for node in self.client.get_primaries()]
            await asyncio.gather(*(shard.tried.wait() for shard in shards))
            unplaced, self._unplaced = self._unplaced, set()
            for ch in unplaced:
                await self.shard_for(ch).subscribe(ch, wait=False)
        except REDIS_DOWN:
            return False
        self.state_changed()
        return True

    async def _discover_forever(self) -> None:
        while not self.closing:
            await asyncio.sleep(1.0)
            if await self._discover():
                return

    async def close(self) -> None:
        self.closing = True
        await stop_tasks([*self._tasks, *(s.task for s in self.by_name.values()
                                          if s.task is not None)], lambda: None)
        for shard in self.by_name.values():
            await shard.close()
        try:
            await self.client.aclose()
            if self._pool is not None:
                await self._pool.aclose()
        except Exception:
            pass

    def state_changed(self) -> None:
        self.up = bool(self.by_name) and all(s.up for s in self.by_name.values())
        self._on_state(self.up)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def ping(self) -> None:
        try:
            async with self._limit:
                await self.client.ping()
        except REDIS_DOWN as exc:
            raise BrokerUnavailable(str(exc)) from None

    # -- channels -------------------------------------------------------------------

    async def hold(self, ch: str, wait: bool = False) -> None:
        """Subscribe `ch` (now, or when Redis is reachable again)."""
        try:
            shard = self.shard_for(ch)
        except (BrokerUnavailable, *REDIS_DOWN):
            self._unplaced.add(ch)  # a Cluster not reached yet: placed by _discover
            return
        await shard.subscribe(ch, wait)

    async def let_go(self, ch: str) -> None:
        self._unplaced.discard(ch)
        try:
            shard = self.shard_for(ch)
        except (BrokerUnavailable, *REDIS_DOWN):
            return
        await shard.unsubscribe(ch)

    async def numsub(self, channels: list[str]) -> list[tuple[Any, Any]]:
        """(channel, subscriber count) of each channel (`PUBSUB NUMSUB`; on a Cluster
        `PUBSUB SHARDNUMSUB`, asked of the master owning each channel's slot)."""
        try:
            if self.cluster:
                by_shard: dict[str, list[str]] = {}
                for ch in channels:
                    by_shard.setdefault(self.shard_for(ch).name, []).append(ch)
                async with self._limit:
                    parts = await asyncio.gather(*(
                        self.by_name[name].client.execute_command("PUBSUB SHARDNUMSUB", *chs)
                        for name, chs in by_shard.items()))
                return [pair for part in parts for pair in _pairs(part)]
            async with self._limit:
                counts: list[tuple[Any, Any]] = await self.client.pubsub_numsub(*channels)
            return counts
        except REDIS_DOWN as exc:
            raise BrokerUnavailable(str(exc)) from None

    # -- Redis Cluster topology -----------------------------------------------------

    def shard_for(self, ch: str) -> Shard:
        """The shard owning `ch` (a channel or a key)."""
        if not self.cluster:
            return self.by_name["redis"]
        if not self.by_name:
            raise BrokerUnavailable("redis cluster unavailable")
        return self._shard_of_node(self.client.get_node_from_key(ch))

    def _shard_of_node(self, node: Any) -> Shard:
        shard = self.by_name.get(node.name)
        if shard is None:
            # Its pub/sub connection, and presence queries (blocking: they wait).
            pool = redis.BlockingConnectionPool.from_url(
                _node_url(self.url, node.host, node.port), max_connections=4, timeout=5,
                health_check_interval=10, **self._conn_kw)
            client = redis.Redis(connection_pool=pool)
            shard = self.by_name[node.name] = Shard(self, node.name, client, sharded=True)
            shard.start()
        return shard

    async def refresh_topology(self) -> None:
        """After a shard failed or a slot moved: read the slot map again and move every
        channel to the master that owns it now."""
        now = time.monotonic()
        if now - self._topology_at < 1.0:
            return
        self._topology_at = now
        try:
            await self.client.nodes_manager.initialize()
            primaries = {node.name for node in self.client.get_primaries()}
            for shard in list(self.by_name.values()):
                if shard.name not in primaries:
                    # Failed over, or removed: its channels go to their new masters.
                    del self.by_name[shard.name]
                    if shard.task is not None:
                        shard.task.cancel()
                    self.spawn(shard.close())
                for ch in list(shard.channels):
                    target = self.shard_for(ch)
                    if target is not shard:
                        await shard.unsubscribe(ch)
                        await target.subscribe(ch, wait=False)
        except REDIS_DOWN:
            return
        finally:
            self.state_changed()

    def moved(self, shard: Shard, ch: str) -> None:
        shard.channels.discard(ch)

        async def follow() -> None:
            # The slot map may not show the move yet (a master asked may not know of
            # it): read it again until the channel's slot is served by another master.
            delay = 0.05
            for _ in range(MOVE_FOLLOW_TRIES):
                self._topology_at = 0.0
                await self.refresh_topology()
                try:
                    target = self.shard_for(ch)
                except BrokerUnavailable:
                    target = None
                if target is not None and target is not shard:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            await self.hold(ch)

        self.spawn(follow())

    # -- commands on the raw connections -------------------------------------------

    async def call(self, key: str, *args: bytes | str | int) -> Any:
        """One command, to the shard owning `key`, on its publishing connection (in
        order with this instance's publishes); the reply. BrokerUnavailable when Redis
        does not answer, or answers with an error."""
        data = command(*args)
        (reply,) = await self.per_shard([key], lambda _shard, _idx: data)
        if isinstance(reply, BrokerUnavailable):
            raise reply
        if isinstance(reply, RespError):
            raise BrokerUnavailable(f"redis: {reply}")
        return reply

    async def per_shard(self, keys: list[str], build: Callable[[Shard, list[int]], bytes],
                        retry_moved: bool = True) -> list[Any]:
        """Commands about `keys` (keys or channels) on the publishing connections of
        the shards owning them: `build(shard, indices)` makes one shard's commands, one
        per index in order, sent in one write; every shard is written before any reply
        is awaited. The replies in the order of `keys`, error replies as RespError
        values and a shard that did not answer as BrokerUnavailable values. On a
        Cluster, commands answered MOVED or ASK (a slot changed masters) are sent once
        more after the slot map is read again."""
        results: list[Any] = [None] * len(keys)
        by_shard: dict[Shard, list[int]] = {}
        for i, key in enumerate(keys):
            try:
                by_shard.setdefault(self.shard_for(key), []).append(i)
            except BrokerUnavailable as exc:
                results[i] = exc
        sent: list[tuple[list[int], RespConnection, asyncio.Future[list[Any]]]] = []
        for shard, idx in by_shard.items():
            if not shard.tried.is_set():  # a Cluster master just found
                await shard.tried.wait()
            conn = shard.pub
            if conn is None or not conn.open:
                for i in idx:
                    results[i] = BrokerUnavailable("redis unavailable")
                continue
            sent.append((idx, conn, conn.send(build(shard, idx), len(idx))))
        for idx, conn, fut in sent:
            replies: list[Any]
            try:
                async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                    replies = await fut
            except (*REDIS_DOWN, TimeoutError) as exc:
                conn.close()  # the shard's task connects again
                replies = [BrokerUnavailable(str(exc) or "redis did not answer")] * len(idx)
            for i, reply in zip(idx, replies, strict=True):
                results[i] = reply
        if retry_moved and self.cluster:
            moved = [i for i, r in enumerate(results)
                     if isinstance(r, RespError) and str(r).startswith(("MOVED", "ASK"))]
            if moved:
                self._topology_at = 0.0
                await self.refresh_topology()
                again = await self.per_shard(
                    [keys[i] for i in moved],
                    lambda shard, idx: build(shard, [moved[j] for j in idx]),
                    retry_moved=False)
                for i, reply in zip(moved, again, strict=True):
                    results[i] = reply
        return results


def _pairs(reply: Any) -> list[tuple[Any, Any]]:
    """`PUBSUB SHARDNUMSUB` as (channel, count) pairs, parsed by redis-py or flat."""
    if reply and not isinstance(reply[0], (list, tuple)):
        return list(zip(reply[::2], reply[1::2], strict=True))
    return [tuple(p) for p in reply]
