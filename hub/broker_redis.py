"""The Redis broker: many hub instances as one hub (ARCHITECTURE.md, `broker.url =
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

Publishing is batched: everything published during one event-loop turn goes out in one
pipeline (one round trip), and frames bound for the same channel share one PUBLISH
(a msgpack array of already-encoded frames). One writer task sends the batches one
after the other, so frames keep their order per (instance, channel) and thus per
sender -> recipient. One pub/sub connection per instance (per shard on a Cluster) is
read by one task; when Redis goes away it reconnects with backoff and subscribes again
to everything it held.

Everything on the message path (publishes, sequences, the owner record of a claim, the
pub/sub reader) goes over the broker's own RESP connections (hub/broker_resp.py: two
per shard, no per-call coroutine stack); redis-py keeps presence, ping and the Cluster
slot map, and lends its connection settings (credentials, TLS) to those connections.

Topic sequences are Redis counters (INCR in a script, atomic cluster wide) issued in
call order (one pipeline per loop turn, like publishes): one instance's publications of
a topic get increasing sequences in the order they were made. A counter is floored by
the store's last sequence; when the counter is missing (first use, or Redis lost it in
a restart) the floor is read again from the store, never taken from a cache, so a
sequence is never reused.

Not promised: topic messages published concurrently on different instances reach a
subscriber in the order they reach Redis, which may differ from their `seq` order
(their sequences are still unique and gap-free; one instance's, in order).

Failures: while Redis is unreachable every call raises `BrokerUnavailable` at once
(nothing waits on connect timeouts); the reader tasks reconnect with backoff (at most
1 s apart), subscribe again to every channel held (nodes that claimed while Redis was
down included) and routing resumes as soon as one succeeds.

Redis Cluster (`redis://host:port?cluster=true`, any node as the seed): sharded pub/sub
(SPUBLISH / SSUBSCRIBE, so a message travels only to the shard owning its channel, not
to every node) with one pub/sub connection and reader task per master, and keys named
without hash tags, so sequences, owners and channels spread over all slots. When a
master fails (or a slot moves) the slot map is read again, the dead master's reader is
dropped and its channels are subscribed on the masters that own them now.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgpack
import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from hub.broker import BrokerHandler, BrokerUnavailable
from hub.broker_resp import RespConnection, RespError, command, open_resp

__all__ = ["RedisBroker", "parse_redis_url"]

log = logging.getLogger("openred.hub.broker")
packb = msgpack.Packer(use_bin_type=True).pack

MAX_PENDING = 100_000  # frames waiting for the next pipeline; past it, publishes fail fast
OWNER_TTL_S = 86_400
CONFIRM_TIMEOUT_S = 2.0  # how long claim/interest wait for Redis to confirm a subscription
RESUBSCRIBE_CHUNK = 1000
MOVE_FOLLOW_TRIES = 10  # slot map reads (0.05 s apart, doubling to 1 s) after a move
HEARTBEAT_S = 5.0  # a silent pub/sub connection is PINGed, and dropped after 3x this
PUBLISH_TIMEOUT_S = 5.0  # a pipeline not answered by then: the connection is dropped
_PING = command("PING")
_NODE, _CONTROL = 0, 1
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")
_DOWN = (RedisError, RedisClusterException, OSError)

# Atomic "next sequence, never below the store's". ARGV[1] the floor, ARGV[2] "1" when
# the floor was just read from the store. A missing counter with a cached floor answers
# -1: the caller reads the floor again (Redis may have lost the counter in a restart).
_NEXT_SEQ = """
local v = redis.call('GET', KEYS[1])
if not v and ARGV[2] ~= '1' then
  return -1
end
v = redis.call('INCR', KEYS[1])
local floor = tonumber(ARGV[1])
if v <= floor then
  v = floor + 1
  redis.call('SET', KEYS[1], v)
end
return v
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


def _node_url(url: str, host: str, port: int) -> str:
    """The seed URL with another host:port (credentials, TLS and options kept)."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


class _Shard:
    """The whole Redis, or one master of a Redis Cluster (then SSUBSCRIBE / SPUBLISH:
    sharded pub/sub): one pub/sub connection, read in `data_received`, and one
    connection for this instance's pipelined publishes, both kept up by one task."""

    def __init__(self, broker: RedisBroker, name: str, client: Any, sharded: bool) -> None:
        self.broker = broker
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
                self.broker._dispatch(value[1], value[2])
            elif kind == b"subscribe" or kind == b"ssubscribe":
                for f in self._confirm.pop(value[1], ()):
                    if not f.done():
                        f.set_result(None)
            elif kind == b"sunsubscribe" and value[1].decode() in self.channels:
                # Redis moved the slot to another master: follow it.
                self.broker._moved(self, value[1].decode())
        except Exception:
            log.exception("broker message handling failed",
                          extra={"event": "broker_message_failed"})

    async def _run(self) -> None:
        broker = self.broker
        delay = 0.1
        while not broker.closing:
            try:
                pool = self.client.connection_pool
                sub = await open_resp(pool, self._on_push)
                try:
                    pub = await open_resp(pool)
                except BaseException:
                    sub.close()
                    raise
                self.sub, self.pub = sub, pub
                self._subscribe_all(sub)
                self._set_up(True)
                self.tried.set()
                delay = 0.1
                await self._watch(sub, pub)
                error = "connection lost"
            except asyncio.CancelledError:
                self._close_connections()
                raise
            except (*_DOWN, TimeoutError) as exc:
                error = str(exc) or type(exc).__name__
            self.last_error = error
            self.tried.set()
            self._close_connections()
            if broker.closing:
                return
            if self.up:
                log.warning("redis connection lost", extra={
                    "event": "broker_down", "shard": self.name, "error": error})
            self._set_up(False)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
            if self.sharded:  # not awaited: it may retire this very shard
                broker._spawn(broker._refresh_topology())

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
        self.broker._shard_state_changed()

    async def close(self) -> None:
        self._close_connections()
        if self.sharded:  # its own client (a standalone shard shares the broker's)
            try:
                await self.client.aclose()
                await self.client.connection_pool.aclose()
            except Exception:
                pass


class RedisBroker:
    def __init__(self, url: str, *, hub_id: str = "openred",
                 seed: Callable[[str], Awaitable[int]] | None = None,
                 pool_size: int = 16) -> None:
        self.url = url
        self._url, self.cluster = parse_redis_url(url)
        self.prefix = f"openred:{hub_id}:"
        self._node_prefix = f"{self.prefix}n:".encode()  # channel names as Redis sends them
        self._topic_prefix = f"{self.prefix}t:".encode()
        self._seed = seed
        self._pool_size = pool_size
        # One immediate retry: a pooled connection may be stale after a Redis restart.
        # Never more, never with backoff: while Redis is down, calls fail fast.
        self._conn_kw: dict[str, Any] = {
            "socket_connect_timeout": 2, "socket_timeout": 5,
            "retry": Retry(NoBackoff(), 1),
            "retry_on_error": [RedisConnectionError, RedisTimeoutError]}
        self._pool: Any = None
        self._redis: Any
        # redis-py carries only what is off the message path (presence, ping, the
        # Cluster slot map); its cluster client raises instead of waiting when a node's
        # pool is exhausted (PERF-NOTES), so the bound is kept here.
        self._limit = asyncio.Semaphore(pool_size)
        if self.cluster:
            self._redis = RedisCluster.from_url(self._url, max_connections=pool_size,
                                                **self._conn_kw)
        else:
            # A blocking pool: redis-py's default pool raises when exhausted (PERF-NOTES).
            self._pool = redis.BlockingConnectionPool.from_url(
                self._url, max_connections=pool_size, timeout=5,
                health_check_interval=10, **self._conn_kw)
            self._redis = redis.Redis(connection_pool=self._pool)
        self._shards: dict[str, _Shard] = {}
        self._writer: asyncio.Task[None] | None = None
        self._sequencer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        self._batch: dict[str, list[Any]] = {}
        self._waiters: dict[str, list[asyncio.Future[bool]]] = {}
        self._queued = 0
        self._seq_wake = asyncio.Event()
        self._seq_batch: list[tuple[str, asyncio.Future[int]]] = []
        self._handler: BrokerHandler | None = None
        self._floors: dict[str, int] = {}
        self._unplaced: set[str] = set()
        self._topology_at = 0.0
        self.instance_id = ""
        self.up = False
        self.closing = False
        self.publish_seconds = 0.0

    # -- lifecycle ----------------------------------------------------------------

    async def start(self, instance_id: str, handler: BrokerHandler) -> None:
        self.instance_id = instance_id
        self._handler = handler
        loop = asyncio.get_running_loop()
        if self.cluster:
            # One pub/sub connection per master, each read by its own task.
            if not await self._discover():
                log.warning("redis cluster not reachable at start; will keep trying",
                            extra={"event": "broker_down"})
                self._spawn(self._discover_forever())
        else:
            shard = _Shard(self, "redis", self._redis, sharded=False)
            self._shards[shard.name] = shard
            shard.start()
            await shard.tried.wait()
            if not self.up:
                log.warning("redis not reachable at start; will keep trying",
                            extra={"event": "broker_down", "error": shard.last_error})
        self._writer = loop.create_task(self._write_loop())
        self._sequencer = loop.create_task(self._seq_loop())

    async def _discover(self) -> bool:
        """Redis Cluster: read the slot map and start a shard per master."""
        try:
            await self._redis.initialize()
            shards = [self._shard_of_node(node) for node in self._redis.get_primaries()]
            await asyncio.gather(*(shard.tried.wait() for shard in shards))
            unplaced, self._unplaced = self._unplaced, set()
            for ch in unplaced:
                await self._shard_for(ch).subscribe(ch, wait=False)
        except _DOWN:
            return False
        self._shard_state_changed()
        return True

    async def _discover_forever(self) -> None:
        while not self.closing:
            await asyncio.sleep(1.0)
            if await self._discover():
                return

    async def close(self) -> None:
        self.closing = True
        tasks = [t for t in (self._writer, self._sequencer, *self._tasks,
                             *(s.task for s in self._shards.values())) if t is not None]
        # A redis-py call may swallow a cancellation (it finishes the command, or
        # asyncio.timeout turns it into a TimeoutError): `closing` ends the loops, the
        # events wake the idle ones, and what is left is cancelled again.
        for _ in range(20):
            self._wake.set()
            self._seq_wake.set()
            pending = [t for t in tasks if not t.done()]
            if not pending:
                break
            for t in pending:
                t.cancel()
            await asyncio.wait(pending, timeout=0.1)
        for t in tasks:
            if t.done() and not t.cancelled():
                t.exception()  # retrieved: a loop that ended on an error is not logged twice
        self._fail_waiters()
        for shard in self._shards.values():
            await shard.close()
        try:
            await self._redis.aclose()
            if self._pool is not None:
                await self._pool.aclose()
        except Exception:
            pass

    async def ping(self) -> None:
        try:
            async with self._limit:
                await self._redis.ping()
        except _DOWN as exc:
            raise BrokerUnavailable(str(exc)) from None

    def _check_up(self) -> None:
        if not self.up:
            raise BrokerUnavailable("redis unavailable")

    def _shard_state_changed(self) -> None:
        was_up = self.up
        self.up = bool(self._shards) and all(s.up for s in self._shards.values())
        if self.up and not was_up:
            # What was published while down is lost: the hub re-reads QoS 1 (hub/broker.py).
            on_up = getattr(self._handler, "on_broker_up", None)
            if on_up is not None:
                on_up()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- Redis Cluster topology -----------------------------------------------------

    def _shard_for(self, ch: str) -> _Shard:
        if not self.cluster:
            return self._shards["redis"]
        if not self._shards:
            raise BrokerUnavailable("redis cluster unavailable")
        return self._shard_of_node(self._redis.get_node_from_key(ch))

    def _shard_of_node(self, node: Any) -> _Shard:
        shard = self._shards.get(node.name)
        if shard is None:
            # Its pub/sub connection, and presence queries (blocking: they wait).
            pool = redis.BlockingConnectionPool.from_url(
                _node_url(self._url, node.host, node.port), max_connections=4, timeout=5,
                health_check_interval=10, **self._conn_kw)
            client = redis.Redis(connection_pool=pool)
            shard = self._shards[node.name] = _Shard(self, node.name, client, sharded=True)
            shard.start()
        return shard

    async def _refresh_topology(self) -> None:
        """After a shard failed or a slot moved: read the slot map again and move every
        channel to the master that owns it now."""
        now = time.monotonic()
        if now - self._topology_at < 1.0:
            return
        self._topology_at = now
        try:
            await self._redis.nodes_manager.initialize()
            primaries = {node.name for node in self._redis.get_primaries()}
            for shard in list(self._shards.values()):
                if shard.name not in primaries:
                    # Failed over, or removed: its channels go to their new masters.
                    del self._shards[shard.name]
                    if shard.task is not None:
                        shard.task.cancel()
                    self._spawn(shard.close())
                for ch in list(shard.channels):
                    target = self._shard_for(ch)
                    if target is not shard:
                        await shard.unsubscribe(ch)
                        await target.subscribe(ch, wait=False)
        except _DOWN:
            return
        finally:
            self._shard_state_changed()

    def _moved(self, shard: _Shard, ch: str) -> None:
        shard.channels.discard(ch)

        async def follow() -> None:
            # The slot map may not show the move yet (a master asked may not know of
            # it): read it again until the channel's slot is served by another master.
            delay = 0.05
            for _ in range(MOVE_FOLLOW_TRIES):
                self._topology_at = 0.0
                await self._refresh_topology()
                try:
                    target = self._shard_for(ch)
                except BrokerUnavailable:
                    target = None
                if target is not None and target is not shard:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            await self._hold(ch)

        self._spawn(follow())

    # -- commands on the raw connections -------------------------------------------

    async def _call(self, key: str, *args: bytes | str | int) -> Any:
        """One command, to the shard owning `key`, on its publishing connection (in
        order with this instance's publishes); the reply. BrokerUnavailable when Redis
        does not answer, or answers with an error."""
        data = command(*args)
        (reply,) = await self._per_shard([key], lambda _shard, _idx: data)
        if isinstance(reply, BrokerUnavailable):
            raise reply
        if isinstance(reply, RespError):
            raise BrokerUnavailable(f"redis: {reply}")
        return reply

    async def _per_shard(self, keys: list[str], build: Callable[[_Shard, list[int]], bytes],
                         retry_moved: bool = True) -> list[Any]:
        """Commands about `keys` (keys or channels) on the publishing connections of
        the shards owning them: `build(shard, indices)` makes one shard's commands, one
        per index in order, sent in one write; every shard is written before any reply
        is awaited. The replies in the order of `keys`, error replies as RespError
        values and a shard that did not answer as BrokerUnavailable values. On a
        Cluster, commands answered MOVED or ASK (a slot changed masters) are sent once
        more after the slot map is read again."""
        results: list[Any] = [None] * len(keys)
        by_shard: dict[_Shard, list[int]] = {}
        for i, key in enumerate(keys):
            try:
                by_shard.setdefault(self._shard_for(key), []).append(i)
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
            except (*_DOWN, TimeoutError) as exc:
                conn.close()  # the shard's task connects again
                replies = [BrokerUnavailable(str(exc) or "redis did not answer")] * len(idx)
            for i, reply in zip(idx, replies, strict=True):
                results[i] = reply
        if retry_moved and self.cluster:
            moved = [i for i, r in enumerate(results)
                     if isinstance(r, RespError) and str(r).startswith(("MOVED", "ASK"))]
            if moved:
                self._topology_at = 0.0
                await self._refresh_topology()
                again = await self._per_shard(
                    [keys[i] for i in moved],
                    lambda shard, idx: build(shard, [moved[j] for j in idx]),
                    retry_moved=False)
                for i, reply in zip(moved, again, strict=True):
                    results[i] = reply
        return results

    # -- sequences ----------------------------------------------------------------

    def _seq_key(self, topic: str) -> str:
        return f"{self.prefix}seq:{topic}"

    async def _fresh_floor(self, topic: str) -> int:
        floor = await self._seed(topic) if self._seed is not None else 0
        if len(self._floors) >= 100_000:
            self._floors.clear()
        self._floors[topic] = floor
        return floor

    async def next_seq(self, topic: str) -> int:
        """Issued in call order: queued here, sent with this loop turn's pipeline."""
        self._check_up()
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._seq_batch.append((topic, fut))
        self._seq_wake.set()
        return await fut

    async def _seq_loop(self) -> None:
        while not self.closing:
            await self._seq_wake.wait()
            self._seq_wake.clear()
            await asyncio.sleep(0)
            batch, self._seq_batch = self._seq_batch, []
            if not batch:
                continue
            try:
                await self._issue(batch)
            except asyncio.CancelledError:
                for _, f in batch:
                    if not f.done():
                        f.set_exception(BrokerUnavailable("broker closed"))
                raise
            except Exception as exc:
                err = BrokerUnavailable(str(exc)) if isinstance(exc, _DOWN) else exc
                for _, f in batch:
                    if not f.done():
                        f.set_exception(err)

    async def _issue(self, batch: list[tuple[str, asyncio.Future[int]]]) -> None:
        floors: dict[str, int] = {}
        fresh: set[str] = set()
        for topic in {t for t, _ in batch}:
            cached = self._floors.get(topic)
            if cached is None:
                floors[topic] = await self._fresh_floor(topic)
                fresh.add(topic)
            else:
                floors[topic] = cached
        todo = batch
        while todo:
            results = await self._eval_next_seqs(
                [(self._seq_key(t), floors[t], t in fresh) for t, _ in todo])
            again: list[tuple[str, asyncio.Future[int]]] = []
            for (topic, fut), res in zip(todo, results, strict=True):
                if isinstance(res, Exception):
                    if not fut.done():
                        fut.set_exception(BrokerUnavailable(str(res)))
                elif int(res) < 0:
                    again.append((topic, fut))
                elif not fut.done():
                    fut.set_result(int(res))
            for topic in {t for t, _ in again}:
                floors[topic] = await self._fresh_floor(topic)
                fresh.add(topic)
            todo = again

    async def _eval_next_seqs(self, calls: list[tuple[str, int, bool]]) -> list[Any]:
        """_NEXT_SEQ for each (key, floor, floor just read); replies in call order."""
        return await self._per_shard([c[0] for c in calls], lambda _shard, idx: b"".join([
            command("EVAL", _NEXT_SEQ, 1, calls[i][0], calls[i][1], "1" if calls[i][2] else "0")
            for i in idx]))

    async def last_seq(self, topic: str) -> int:
        self._check_up()
        key = self._seq_key(topic)
        v = await self._call(key, "GET", key)
        if v is None:
            # Never published, or Redis lost the counter: the store knows.
            return await self._fresh_floor(topic)
        return int(v)

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
            await self._call(key, "SET", key, session_id, "EX", OWNER_TTL_S)
            await self._call(ch, "SPUBLISH" if self.cluster else "PUBLISH", ch, packb(
                [self.instance_id, [[_CONTROL, "replace", session_id]]]))
        except (BrokerUnavailable, *_DOWN) as exc:
            await self._hold(ch)
            raise BrokerUnavailable(str(exc)) from None
        await self._hold(ch, wait=True)

    async def release(self, node_id: str, session_id: str) -> None:
        handler = self._handler
        # The node may have reconnected here already: keep the channel then.
        if handler is not None and getattr(handler, "local", {}).get(node_id) is not None:
            return
        await self._let_go(self._node_channel(node_id))

    async def interest(self, topic: str, on: bool) -> None:
        ch = f"{self.prefix}t:{topic}"
        if on:
            await self._hold(ch, wait=True)
        else:
            await self._let_go(ch)

    async def _hold(self, ch: str, wait: bool = False) -> None:
        """Subscribe `ch` (now, or when Redis is reachable again)."""
        try:
            shard = self._shard_for(ch)
        except (BrokerUnavailable, *_DOWN):
            self._unplaced.add(ch)  # a Cluster not reached yet: placed by _discover
            return
        await shard.subscribe(ch, wait)

    async def _let_go(self, ch: str) -> None:
        self._unplaced.discard(ch)
        try:
            shard = self._shard_for(ch)
        except (BrokerUnavailable, *_DOWN):
            return
        await shard.unsubscribe(ch)

    async def owner(self, node_id: str) -> str | None:
        key = f"{self.prefix}owner:{node_id}"
        v = await self._call(key, "GET", key)
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
        replies = await self._per_shard(chans, lambda shard, idx: b"".join([
            command(shard.publish_cmd, chans[i], packb([origin, batch[chans[i]]]))
            for i in idx]))
        return dict(zip(chans, replies, strict=True))

    def _fail_waiters(self) -> None:
        for futs in self._waiters.values():
            for f in futs:
                if not f.done():
                    f.set_exception(BrokerUnavailable("broker closed"))
        self._waiters.clear()
        for _, seq_fut in self._seq_batch:
            if not seq_fut.done():
                seq_fut.set_exception(BrokerUnavailable("broker closed"))
        self._seq_batch.clear()

    # -- receiving ------------------------------------------------------------------

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        if channel.startswith(self._node_prefix):
            self._on_node(channel[len(self._node_prefix):].decode(), data)
        elif channel.startswith(self._topic_prefix):
            self._on_topic(channel[len(self._topic_prefix):].decode(), data)

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
        except (BrokerUnavailable, *_DOWN):
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
        self._check_up()
        channels = [self._node_channel(n) for n in ids]
        try:
            if self.cluster:
                # A shard channel is counted only by the master owning its slot.
                by_shard: dict[str, list[str]] = {}
                for ch in channels:
                    by_shard.setdefault(self._shard_for(ch).name, []).append(ch)
                async with self._limit:
                    parts = await asyncio.gather(*(
                        self._shards[name].client.execute_command("PUBSUB SHARDNUMSUB", *chs)
                        for name, chs in by_shard.items()))
                counts = [pair for part in parts for pair in _pairs(part)]
            else:
                async with self._limit:
                    counts = await self._redis.pubsub_numsub(*channels)
        except _DOWN as exc:
            raise BrokerUnavailable(str(exc)) from None
        by_channel = {(c.decode() if isinstance(c, bytes) else c): int(n) for c, n in counts}
        return {n: by_channel.get(ch, 0) > 0 for n, ch in zip(ids, channels, strict=True)}


def _pairs(reply: Any) -> list[tuple[Any, Any]]:
    """`PUBSUB SHARDNUMSUB` as (channel, count) pairs, parsed by redis-py or flat."""
    if reply and not isinstance(reply[0], (list, tuple)):
        return list(zip(reply[::2], reply[1::2], strict=True))
    return [tuple(p) for p in reply]
