"""The node client SDK: an asyncio adapter over the sans-I/O protocol core.

Owned here: one `Client` per node. It opens the WebSocket, runs the §2 handshake through
`ClientHandshake`, and then runs three tasks per connection: a reader (decodes with
`decode_server`, batches included, and dispatches replies, messages, receipts, `bye`), a
writer (drains one bounded outbox, so every frame leaves in the order it was queued, and
coalesces what is waiting into §1 batches), and a supervisor across connections that
reconnects with jittered exponential backoff and resubscribes.

A node is a few lines::

    async with Client("ws://127.0.0.1:8765/v1/ws", key_file="node.key") as c:
        await c.subscribe("room/1")
        async for msg in c:
            await c.send(msg.sender, msg.body)

Exception tree (besides `HandshakeError` from `protocol.errors`, raised by `connect()`
when the hub refuses the `hello`, and `TimeoutError` when a request got no reply in
`request_timeout_s`)::

    ClientError
    ├── HubError        an `error` reply to one request (§3, §8); the session goes on
    └── Disconnected    the connection ended (close code, reason); `final` when the
                        client will not reconnect (4001, 4003, 4010, 4012, close())

Behaviour (docs/protocol.md section in brackets):

- Requests carry an incrementing int `id`; replies are matched by `id`, in any order (§3).
  A request in flight when its connection drops fails with `Disconnected` and is never
  resent: a QoS 1 `send` may or may not have been stored, the caller decides (§4).
- Inbound messages wait in one bounded queue (`max_queue`). When it is full the reader
  stops reading the socket, which is the backpressure the hub sees (§7); nothing is
  dropped. The one exception: while a request of this client awaits its reply, the reader
  goes on up to twice `max_queue`, so a loop body that awaits a reply (an echo node)
  cannot deadlock against its own full queue.
- Repeated `mid`s are dropped (a bounded set of recent mids, §4). A repeated QoS 1
  message that was already acked is acked again, since the first ack may have been lost
  with the connection that carried it.
- QoS 1 messages are acked when the consumer asks for the next one (`auto_ack=True`), or
  by `ack()`. Acks are best effort: one lost with a connection makes the hub deliver the
  message again, and the repeat is acked as above. A message taken but never followed by
  a request for the next one (a loop left by `break` or an exception) is not acked, so it
  comes again next session: at least once.
- After a reconnect every topic is subscribed again with `since` = the last `seq` seen
  on it (or the topic's `seq` in the `ok` of the subscribe), so history fills the gap
  (§5). Close codes 4001, 4003, 4010 and 4012 end the client; every other close, and a
  drop, reconnects unless `reconnect=False` (§9). A `bye` with `retry_ms` sets the
  minimum delay before the next attempt (§7).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
import ssl as ssl_module
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NamedTuple

from openred.protocol.errors import (
    AUTH_FAILED,
    CLOSE_AUTH_FAILED,
    CLOSE_FORBIDDEN,
    CLOSE_KICKED,
    CLOSE_REPLACED,
    CLOSE_UNDECODABLE,
    FORBIDDEN,
    TOO_LARGE,
    DecodeError,
    HandshakeError,
    ProtocolViolation,
)
from openred.protocol.frames import batch_of, decode_server, encode, is_topic
from openred.protocol.handshake import ClientHandshake, Welcome
from openred.protocol.identity import Identity, is_node_id, load_key_file
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

__all__ = [
    "NO_RECONNECT_CODES",
    "Client",
    "ClientError",
    "Disconnected",
    "HubError",
    "Message",
    "Receipt",
    "State",
    "Subscribed",
    "backoff_delay",
]

log = logging.getLogger("openred.client")

# §9: a refusal, a ban, a newer session or an operator's kick: coming back would be
# refused again or would take the session back from its new owner.
NO_RECONNECT_CODES: Final = frozenset({CLOSE_AUTH_FAILED, CLOSE_FORBIDDEN, CLOSE_REPLACED,
                                       CLOSE_KICKED})
_CLOSE_NORMAL: Final = 1000
_CLOSE_ABNORMAL: Final = 1006
_CLOSE_INTERNAL: Final = 1011
_MAX_WS_MESSAGE_BYTES: Final = 16 * 2**20  # the hub bounds its own frames
_DEFAULT_MAX_FRAME_BYTES: Final = 131072  # §1 defaults, until the welcome says otherwise
_DEFAULT_MAX_BODY_BYTES: Final = 65536
_BATCH_HEADER_BYTES: Final = 5
# Resubscribing many topics at once can meet the rate limit (§7); these retry.
_RESUB_RETRY_CODES: Final = frozenset({"rate_limited", "unavailable", "internal"})
_RESUB_ROUNDS: Final = 4
_RESUB_PAUSE_S: Final = 0.25

State = Literal["connected", "reconnecting", "closed"]


# -- public types --------------------------------------------------------------------


class ClientError(Exception):
    """Base of the exceptions this module raises."""


class HubError(ClientError):
    """An `error` frame answering one request (§3, §8). The session goes on."""

    def __init__(self, code: str, msg: str) -> None:
        super().__init__(f"{code}: {msg}" if msg else code)
        self.code = code
        self.msg = msg


class Disconnected(ClientError):
    """The connection ended. `final` is True when the client will not reconnect."""

    def __init__(self, code: int, reason: str, *, final: bool = False) -> None:
        super().__init__(f"disconnected ({code}{': ' + reason if reason else ''})")
        self.code = code
        self.reason = reason
        self.final = final


class Message(NamedTuple):
    """A delivered `msg` (§4 direct, §5 topic: `topic` and `seq` set)."""

    mid: str
    sender: str
    body: bytes
    ts: int
    qos: int
    topic: str | None = None
    seq: int | None = None
    sig: bytes | None = None


class Receipt(NamedTuple):
    """§4: the recipient acked a QoS 1 message sent with `receipt=True`."""

    mid: str
    to: str
    ts: int


class Subscribed(NamedTuple):
    """The `ok` of a `sub` (§5): the topic's current `seq`; `recovered` is None without
    `since`, False when history had already lost messages after `since`."""

    seq: int
    recovered: bool | None


def backoff_delay(attempt: int, min_s: float, max_s: float,
                  rng: Callable[[float, float], float] = random.uniform) -> float:
    """Full jitter: uniform between `min_s` and a cap that doubles from `min_s` with
    every failed attempt (0, 1, 2, ...) up to `max_s`."""
    cap = min(max_s, min_s * 2.0 ** min(attempt, 64))
    return rng(min_s, max(min_s, cap))


# -- internals -----------------------------------------------------------------------


class _RecentMids:
    """The last `size` mids seen, oldest forgotten first."""

    __slots__ = ("_mids", "_size")

    def __init__(self, size: int) -> None:
        self._size = size
        self._mids: OrderedDict[str, None] = OrderedDict()

    def add(self, mid: str) -> bool:
        """Remember `mid`; False when it was already there."""
        if mid in self._mids:
            return False
        self._mids[mid] = None
        if len(self._mids) > self._size:
            self._mids.popitem(last=False)
        return True


@dataclass(eq=False)
class _Pending:
    future: asyncio.Future[dict[str, Any]]
    on_ok: Callable[[dict[str, Any]], None] | None = None


@dataclass(eq=False)
class _Conn:
    """One WebSocket connection, from welcome to close."""

    ws: ClientConnection
    welcome: Welcome
    max_frame_bytes: int
    max_body_bytes: int
    outbox_max: int
    pending: dict[int, _Pending] = field(default_factory=dict)
    outbox: deque[bytes] = field(default_factory=deque)
    out_ready: asyncio.Event = field(default_factory=asyncio.Event)
    out_room: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    retry_ms: int | None = None
    bye_reason: str | None = None
    down: Disconnected | None = None  # set once the connection is gone


def _limit(limits: dict[str, Any], key: str, default: int) -> int:
    v = limits.get(key)
    return int(v) if type(v) is int and v > 0 else default


def _close_of(ws: ClientConnection) -> tuple[int, str]:
    code = ws.close_code
    return (code if code is not None else _CLOSE_ABNORMAL), (ws.close_reason or "")


def _call(callback: Callable[..., None] | None, *args: Any) -> None:
    """User callbacks must not kill the reader: log what they raise."""
    if callback is None:
        return
    try:
        callback(*args)
    except Exception:
        log.exception("client callback raised", extra={"event": "callback_error"})


class Client:
    """A node's connection to the hub; see the module docstring for the behaviour.

    Exactly one of `key_file`, `identity` or `token` authenticates the node (§2).
    """

    def __init__(
        self,
        url: str = "ws://127.0.0.1:8765/v1/ws",
        *,
        key_file: str | os.PathLike[str] | None = None,
        identity: Identity | None = None,
        token: str | None = None,
        batch: bool = False,
        meta: dict[str, Any] | None = None,
        auto_ack: bool = True,
        reconnect: bool = True,
        backoff_min_s: float = 0.2,
        backoff_max_s: float = 30.0,
        request_timeout_s: float = 10.0,
        max_queue: int = 10_000,
        recent_mids: int = 10_000,
        on_receipt: Callable[[Receipt], None] | None = None,
        on_state: Callable[[State], None] | None = None,
        on_error: Callable[[HubError], None] | None = None,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        if sum(x is not None for x in (key_file, identity, token)) != 1:
            raise ValueError("give exactly one of key_file, identity or token")
        if key_file is not None:
            identity = load_key_file(key_file)
        if not 0 < backoff_min_s <= backoff_max_s:
            raise ValueError("backoff_min_s: must be > 0 and <= backoff_max_s")
        if request_timeout_s <= 0:
            raise ValueError("request_timeout_s: must be > 0")
        if max_queue < 1:
            raise ValueError("max_queue: must be >= 1")
        if recent_mids < 1:
            raise ValueError("recent_mids: must be >= 1")
        self.url = url
        self.identity = identity
        self._token = token
        self._batch = batch
        self._meta = meta
        self._auto_ack = auto_ack
        self._reconnect = reconnect
        self._backoff_min_s = backoff_min_s
        self._backoff_max_s = backoff_max_s
        self._request_timeout_s = request_timeout_s
        self._max_queue = max_queue
        self._on_receipt = on_receipt
        self._on_state = on_state
        self._on_error = on_error
        self._ssl = ssl

        self._ids = itertools.count(1)
        self._conn: _Conn | None = None  # where requests go: set once resubscribed
        self._live: _Conn | None = None  # the open connection (acks go here at once)
        self._open_conns: set[_Conn] = set()  # not torn down yet
        self._ready = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._welcome: Welcome | None = None
        self._started = False  # connect() was called
        self._closed = False  # close() was called
        self._final: Disconnected | None = None
        self._last_down = Disconnected(_CLOSE_ABNORMAL, "not connected")

        self._subs: dict[str, int] = {}  # topic -> last seq seen (§5 since)
        self._recent = _RecentMids(recent_mids)
        self._unacked: set[str] = set()  # QoS 1 mids taken in but not acked yet
        self._inbox: deque[Message] = deque()
        self._inbox_changed = asyncio.Event()
        self._inbox_room = asyncio.Event()
        self._to_ack: Message | None = None

    # -- state -----------------------------------------------------------------------

    @property
    def welcome(self) -> Welcome | None:
        """The `welcome` of the current (or last) session."""
        return self._welcome

    @property
    def node_id(self) -> str | None:
        if self._welcome is not None:
            return self._welcome.node
        return self.identity.node_id if self.identity is not None else None

    @property
    def session(self) -> str | None:
        return self._welcome.session if self._welcome is not None else None

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def subscriptions(self) -> dict[str, int]:
        """Topics held, each with the last `seq` seen on it."""
        return dict(self._subs)

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect and authenticate once. Raises `HandshakeError` when the hub refuses
        the hello (auth_failed, forbidden), and `OSError`, `TimeoutError` or
        websockets' `InvalidHandshake` when the hub cannot be reached; reconnecting
        only starts after a first success."""
        if self._started:
            raise RuntimeError("connect() was already called on this client")
        self._started = True
        try:
            conn = await self._open()
        except BaseException:
            self._final = Disconnected(_CLOSE_ABNORMAL, "connect failed", final=True)
            raise
        self._set_ready(conn)
        self._supervisor = asyncio.create_task(self._supervise(conn),
                                               name="openred-client-supervisor")

    async def close(self) -> None:
        """Close with 1000, stop every task, fail pending requests with a final
        `Disconnected` and end `async for`. Idempotent."""
        if self._closed:
            return
        self._closed = True
        was_final = self._final is not None
        final = Disconnected(_CLOSE_NORMAL, "closed by client", final=True)
        if self._final is None:
            self._final = final
        self._live = self._conn = None
        sup, self._supervisor = self._supervisor, None
        if sup is not None:
            sup.cancel()
            await asyncio.wait([sup])  # a cancel of close() itself still propagates
        for conn in list(self._open_conns):
            await self._teardown(conn, final)
        self._wake_all()
        if not was_final:
            _call(self._on_state, "closed")

    # -- requests --------------------------------------------------------------------

    async def send(self, to: str, body: bytes, *, qos: int = 0, ttl: int | None = None,
                   sig: bytes | None = None, receipt: bool = False) -> str:
        """Send a direct message (§4) and return its `mid`. QoS 0 returns once the hub
        routed it (`HubError` no_route when `to` is offline); QoS 1 once the hub stored
        it."""
        frame = self._send_frame(to, body, qos, ttl, sig, receipt)
        reply = await self._request(frame)
        return str(reply.get("mid", ""))

    def send_nowait(self, to: str, body: bytes, *, ttl: int | None = None,
                    sig: bytes | None = None) -> None:
        """Queue a QoS 0 message without an `id`: no reply, no `no_route` (§3). Raises
        `Disconnected` when not connected and `asyncio.QueueFull` when the outbox is."""
        frame = self._send_frame(to, body, 0, ttl, sig, False)
        conn = self._conn
        if conn is None:
            raise self._final or self._last_down
        if len(conn.outbox) >= conn.outbox_max:
            raise asyncio.QueueFull
        self._enqueue_nowait(conn, self._encode_checked(conn, frame))

    async def publish(self, topic: str, body: bytes) -> tuple[str, int]:
        """Publish to a topic (§5); returns `(mid, seq)`."""
        if not is_topic(topic):
            raise ValueError("topic: not 1..200 chars of [A-Za-z0-9._:/-]")
        reply = await self._request({"t": "pub", "topic": topic, "body": bytes(body)})
        return str(reply.get("mid", "")), int(reply.get("seq", 0))

    async def subscribe(self, topic: str, *, since: int | None = None) -> Subscribed:
        """Subscribe (§5). With `since`, history after it is delivered first. The topic
        is held across reconnects from the moment the hub answers `ok`."""
        if not is_topic(topic):
            raise ValueError("topic: not 1..200 chars of [A-Za-z0-9._:/-]")
        if since is not None and (type(since) is not int or since < 0):
            raise ValueError("since: must be an int >= 0")
        frame: dict[str, Any] = {"t": "sub", "topic": topic}
        if since is not None:
            frame["since"] = since

        def held(reply: dict[str, Any]) -> None:
            # Runs in the reader, before any message after this ok is dispatched.
            if since is not None:
                self._subs[topic] = since
            elif topic not in self._subs:
                self._subs[topic] = _int(reply.get("seq"))

        reply = await self._request(frame, held)
        return _subscribed(reply)

    async def unsubscribe(self, topic: str) -> None:
        """Unsubscribe (§5). The topic is forgotten at once, so a reconnect does not
        subscribe it again even when this request fails."""
        if not is_topic(topic):
            raise ValueError("topic: not 1..200 chars of [A-Za-z0-9._:/-]")
        self._subs.pop(topic, None)
        await self._request({"t": "unsub", "topic": topic})

    async def presence(self, nodes: Iterable[str]) -> dict[str, bool]:
        """Which of `nodes` are online (§6)."""
        reply = await self._request({"t": "presence", "nodes": list(nodes)})
        online = reply.get("online")
        if type(online) is not dict:
            return {}
        return {str(k): bool(v) for k, v in online.items()}

    async def ack(self, msg: Message | str) -> None:
        """Ack a QoS 1 message (§4). Best effort: when the connection is down the ack
        is skipped and the hub's redelivery is acked instead (see the module doc)."""
        mid = msg if isinstance(msg, str) else msg.mid
        self._unacked.discard(mid)
        if self._to_ack is not None and self._to_ack.mid == mid:
            self._to_ack = None
        await self._send_ack(mid)

    # -- inbound ---------------------------------------------------------------------

    def __aiter__(self) -> Client:
        return self

    async def __anext__(self) -> Message:
        """The next message. Ends after `close()`; raises the final `Disconnected`
        once the queue is drained after a close the client does not recover from."""
        if not self._started:
            raise RuntimeError("connect() first")
        prev, self._to_ack = self._to_ack, None
        if prev is not None and prev.mid in self._unacked:
            await self.ack(prev)
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._inbox:
                msg = self._inbox.popleft()
                self._inbox_room.set()
                if self._auto_ack and msg.qos == 1:
                    self._to_ack = msg
                return msg
            if self._final is not None:
                raise self._final
            self._inbox_changed.clear()
            await self._inbox_changed.wait()

    # -- request machinery -----------------------------------------------------------

    def _send_frame(self, to: str, body: bytes, qos: int, ttl: int | None,
                    sig: bytes | None, receipt: bool) -> dict[str, Any]:
        if not is_node_id(to):
            raise ValueError("to: not a node id")
        if qos not in (0, 1):
            raise ValueError("qos: must be 0 or 1")
        frame: dict[str, Any] = {"t": "send", "to": to, "body": bytes(body), "qos": qos}
        if ttl is not None:
            frame["ttl"] = ttl
        if sig is not None:
            frame["sig"] = bytes(sig)
        if receipt:
            frame["receipt"] = True
        return frame

    def _encode_checked(self, conn: _Conn, frame: dict[str, Any]) -> bytes:
        # §1: a body over the limit is refused, a frame over the limit closes the
        # connection: refuse both here rather than lose the session.
        body = frame.get("body")
        if isinstance(body, bytes) and len(body) > conn.max_body_bytes:
            raise HubError(TOO_LARGE, f"body larger than {conn.max_body_bytes} bytes")
        data = encode(frame)
        if len(data) > conn.max_frame_bytes:
            raise HubError(TOO_LARGE, f"frame larger than {conn.max_frame_bytes} bytes")
        return data

    async def _ready_conn(self) -> _Conn:
        while True:
            if self._final is not None:
                raise self._final
            conn = self._conn
            if conn is not None:
                return conn
            if not self._started:
                raise Disconnected(_CLOSE_ABNORMAL, "not connected")
            await self._ready.wait()

    async def _request(self, frame: dict[str, Any],
                       on_ok: Callable[[dict[str, Any]], None] | None = None,
                       conn: _Conn | None = None) -> dict[str, Any]:
        """Send `frame` with a fresh `id` and wait for its reply (§3). Waits for a
        connection first (during a reconnect); the whole takes at most
        `request_timeout_s`."""
        async with asyncio.timeout(self._request_timeout_s):
            if conn is None:
                conn = await self._ready_conn()
            if conn.down is not None:
                raise conn.down
            rid = next(self._ids)
            frame["id"] = rid
            data = self._encode_checked(conn, frame)
            future: asyncio.Future[dict[str, Any]] = \
                asyncio.get_running_loop().create_future()
            conn.pending[rid] = _Pending(future, on_ok)
            self._inbox_room.set()  # a reply is awaited: the reader may read on
            try:
                await self._enqueue(conn, data)
                return await future
            finally:
                conn.pending.pop(rid, None)

    async def _enqueue(self, conn: _Conn, data: bytes) -> None:
        while len(conn.outbox) >= conn.outbox_max:
            if conn.down is not None:
                raise conn.down
            conn.out_room.clear()
            await conn.out_room.wait()
        if conn.down is not None:
            raise conn.down
        self._enqueue_nowait(conn, data)

    def _enqueue_nowait(self, conn: _Conn, data: bytes) -> None:
        conn.outbox.append(data)
        conn.out_ready.set()

    async def _send_ack(self, mid: str) -> None:
        conn = self._live
        if conn is None or conn.down is not None:
            return
        with contextlib.suppress(Disconnected):
            await self._enqueue(conn, encode({"t": "ack", "mid": mid}))

    # -- connection ------------------------------------------------------------------

    async def _open(self) -> _Conn:
        """Connect, authenticate, start the reader and writer, and hold every topic
        again. Raises on any failure, with nothing left open."""
        hs = ClientHandshake(identity=self.identity, token=self._token, batch=self._batch,
                             meta=self._meta)
        extra: dict[str, Any] = {} if self._ssl is None else {"ssl": self._ssl}
        ws = await connect(self.url, max_size=_MAX_WS_MESSAGE_BYTES, compression=None,
                           open_timeout=self._request_timeout_s,
                           close_timeout=min(self._request_timeout_s, 5.0), **extra)
        conn: _Conn | None = None
        try:
            async with asyncio.timeout(self._request_timeout_s):
                welcome, rest = await self._handshake(ws, hs)
            limits = welcome.limits
            conn = _Conn(ws, welcome,
                         _limit(limits, "max_frame_bytes", _DEFAULT_MAX_FRAME_BYTES),
                         _limit(limits, "max_body_bytes", _DEFAULT_MAX_BODY_BYTES),
                         self._max_queue)
            self._welcome = welcome
            self._live = conn
            self._open_conns.add(conn)
            conn.tasks.append(asyncio.create_task(self._read_loop(conn, rest),
                                                  name="openred-client-reader"))
            conn.tasks.append(asyncio.create_task(self._write_loop(conn),
                                                  name="openred-client-writer"))
            conn.tasks.append(asyncio.create_task(ws.wait_closed(),
                                                  name="openred-client-closed"))
            await self._resubscribe(conn)
            log.info("connected", extra={"event": "client_connected", "node": welcome.node,
                                         "session": welcome.session,
                                         "pending": welcome.pending})
            return conn
        except BaseException as exc:
            if conn is not None:
                if self._live is conn:
                    self._live = None
                await self._teardown(conn, Disconnected(_CLOSE_ABNORMAL, "connect failed"))
            else:
                code = CLOSE_UNDECODABLE if isinstance(exc, DecodeError) else _CLOSE_NORMAL
                with contextlib.suppress(Exception):
                    await ws.close(code)
            raise

    async def _handshake(self, ws: ClientConnection,
                         hs: ClientHandshake) -> tuple[Welcome, list[dict[str, Any]]]:
        """§2: challenge -> hello -> welcome. Returns the welcome and any frames that
        came in the same batch after it."""
        try:
            challenge = decode_server(_binary(await ws.recv()))[0]
            try:
                hello = hs.hello(challenge)
            except HandshakeError as exc:
                # A malformed challenge is the hub's fault, not a refusal of this node.
                raise ProtocolViolation(exc.reason) from None
            await ws.send(hello)
            frames = decode_server(_binary(await ws.recv()))
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else _CLOSE_ABNORMAL
            reason = exc.rcvd.reason if exc.rcvd is not None else ""
            if code == CLOSE_AUTH_FAILED:
                raise HandshakeError(AUTH_FAILED, code, reason or "closed 4001") from None
            if code == CLOSE_FORBIDDEN:
                raise HandshakeError(FORBIDDEN, code, reason or "closed 4003") from None
            raise
        first = frames[0]
        if first["t"] not in ("welcome", "error"):
            raise ProtocolViolation("expected welcome")
        if first["t"] == "error" and first.get("code") == FORBIDDEN:
            raise HandshakeError(FORBIDDEN, CLOSE_FORBIDDEN, str(first.get("msg", "")))
        try:
            welcome = hs.welcome(first)
        except (KeyError, TypeError, ValueError):
            raise ProtocolViolation("malformed welcome") from None
        return welcome, frames[1:]

    async def _resubscribe(self, conn: _Conn) -> None:
        """§5: hold every topic again, recovering from the last seq seen."""
        topics = list(self._subs)
        # §7: every sub counts against the rate limit; stay within the burst, then pace
        # at the session's rate. Nothing else is sent meanwhile but acks (not counted).
        burst = _limit(conn.welcome.limits, "burst", 100)
        rate = _limit(conn.welcome.limits, "msgs_per_s", 100)
        for round_no in range(_RESUB_ROUNDS):
            if not topics:
                return
            if round_no:
                await asyncio.sleep(_RESUB_PAUSE_S * round_no)
            results: list[BaseException | None] = []
            for start in range(0, len(topics), burst):
                if start:
                    await asyncio.sleep(burst / rate)
                results += await asyncio.gather(
                    *(self._resub_one(conn, t) for t in topics[start:start + burst]),
                    return_exceptions=True)
            retry: list[str] = []
            for topic, res in zip(topics, results, strict=True):
                if isinstance(res, HubError):
                    if res.code in _RESUB_RETRY_CODES:
                        retry.append(topic)
                    else:
                        # forbidden, limit_exceeded, bad_frame: it would fail again.
                        self._subs.pop(topic, None)
                        log.warning("resubscribe refused", extra={
                            "event": "resubscribe_refused", "topic": topic,
                            "code": res.code})
                elif isinstance(res, BaseException):
                    raise res
            topics = retry
        if topics:
            # Kept in _subs: the next reconnect tries again.
            log.warning("resubscribe failed", extra={"event": "resubscribe_failed",
                                                     "topics": len(topics)})

    async def _resub_one(self, conn: _Conn, topic: str) -> None:
        since = self._subs.get(topic)
        if since is None:
            return  # unsubscribed meanwhile

        def held(reply: dict[str, Any]) -> None:
            if reply.get("recovered") is False:
                log.warning("topic history lost messages", extra={
                    "event": "topic_gap", "topic": topic, "since": since})

        await self._request({"t": "sub", "topic": topic, "since": since}, held, conn)

    def _set_ready(self, conn: _Conn) -> None:
        self._conn = conn
        self._ready.set()
        _call(self._on_state, "connected")

    async def _supervise(self, conn: _Conn) -> None:
        """Watch the connection; reconnect with backoff until a final close."""
        attempt = 0
        try:
            while True:
                down = await self._wait_down(conn)
                self._conn = self._live = None
                self._ready.clear()
                await self._teardown(conn, down)
                if down.final or not self._reconnect:
                    down.final = True
                    self._finish(down)
                    return
                self._last_down = down
                _call(self._on_state, "reconnecting")
                floor_s = conn.retry_ms / 1000 if conn.retry_ms is not None else 0.0
                while True:
                    delay = max(floor_s, backoff_delay(attempt, self._backoff_min_s,
                                                       self._backoff_max_s))
                    floor_s = 0.0
                    attempt += 1
                    log.info("reconnecting", extra={"event": "client_reconnecting",
                                                    "code": down.code, "delay_s": delay})
                    await asyncio.sleep(delay)
                    try:
                        conn = await self._open()
                    except HandshakeError as exc:
                        if exc.code in (AUTH_FAILED, FORBIDDEN):
                            self._finish(Disconnected(exc.close_code, exc.reason,
                                                      final=True))
                            return
                        continue
                    except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed,
                            ProtocolViolation, Disconnected, HubError) as exc:
                        log.info("reconnect failed", extra={
                            "event": "client_reconnect_failed", "error": type(exc).__name__})
                        continue
                    attempt = 0
                    self._set_ready(conn)
                    break
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("client supervisor failed", extra={"event": "client_internal"})
            self._conn = self._live = None
            down = Disconnected(_CLOSE_INTERNAL, "internal", final=True)
            await self._teardown(conn, down)
            self._finish(down)

    async def _wait_down(self, conn: _Conn) -> Disconnected:
        """Until any of the connection's tasks ends; what ended it."""
        await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in conn.tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("client task failed", exc_info=task.exception(),
                          extra={"event": "client_internal"})
                with contextlib.suppress(Exception):
                    await conn.ws.close(_CLOSE_INTERNAL, "internal")
                return Disconnected(_CLOSE_INTERNAL, "internal")
        if conn.down is not None:
            return conn.down  # the reader saw the close first
        if conn.ws.close_code is None:
            # The writer ended first (it ends only on a close): let the closing
            # handshake finish so the hub's code is known.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._request_timeout_s):
                    await conn.ws.wait_closed()
        return self._down_of(conn)

    def _down_of(self, conn: _Conn) -> Disconnected:
        code, reason = _close_of(conn.ws)
        if conn.bye_reason and not reason:
            reason = conn.bye_reason
        return Disconnected(code, reason, final=code in NO_RECONNECT_CODES)

    def _mark_down(self, conn: _Conn, down: Disconnected) -> None:
        """The connection is gone: fail what waits on it, at once (also during the
        resubscribe of `_open`, which the supervisor does not watch)."""
        if conn.down is None:
            conn.down = down
        for pending in list(conn.pending.values()):
            if not pending.future.done():
                pending.future.set_exception(conn.down)
        conn.pending.clear()
        conn.outbox.clear()
        conn.out_room.set()
        conn.out_ready.set()

    async def _teardown(self, conn: _Conn, down: Disconnected) -> None:
        """Stop the connection's tasks, close it, fail what waits on it."""
        # First what needs no waiting, so that a cancel (close()) in the middle
        # leaves no request hanging.
        self._mark_down(conn, down)
        for task in conn.tasks:
            task.cancel()
        # asyncio.wait, not `await task` under a suppress: a cancel of the caller (a
        # close() during teardown) must not be swallowed.
        if conn.tasks:
            await asyncio.wait(conn.tasks)
        for task in conn.tasks:
            if not task.cancelled():
                task.exception()  # retrieved: _wait_down reported it
        with contextlib.suppress(Exception):
            await conn.ws.close(_CLOSE_NORMAL)
        self._open_conns.discard(conn)

    def _finish(self, down: Disconnected) -> None:
        """The client will not reconnect."""
        if self._final is None:
            self._final = down
        log.info("disconnected", extra={"event": "client_closed", "code": down.code,
                                        "reason": down.reason})
        self._wake_all()
        _call(self._on_state, "closed")

    def _wake_all(self) -> None:
        self._ready.set()  # waiters re-check and see _final
        self._inbox_changed.set()
        self._inbox_room.set()

    # -- reader / writer -------------------------------------------------------------

    def _has_room(self, conn: _Conn) -> bool:
        n = len(self._inbox)
        return n < self._max_queue or (bool(conn.pending) and n < 2 * self._max_queue)

    async def _read_loop(self, conn: _Conn, first: list[dict[str, Any]]) -> None:
        """Decode and dispatch until the connection closes (or the hub sends bytes
        that are not frames: close 1007)."""
        for frame in first:
            self._dispatch(conn, frame)
        ws = conn.ws
        while True:
            while not self._has_room(conn):
                # §7 backpressure: not reading makes the hub see a slow consumer.
                self._inbox_room.clear()
                await self._inbox_room.wait()
            try:
                data = await ws.recv()
            except ConnectionClosed:
                self._mark_down(conn, self._down_of(conn))
                return
            try:
                frames = decode_server(_binary(data))
            except DecodeError:
                # §1 / §9, the other way round: the hub's bytes are not msgpack frames.
                self._mark_down(conn, Disconnected(CLOSE_UNDECODABLE, "undecodable frame"))
                with contextlib.suppress(Exception):
                    await ws.close(CLOSE_UNDECODABLE, "undecodable")
                return
            for frame in frames:
                self._dispatch(conn, frame)

    def _dispatch(self, conn: _Conn, frame: dict[str, Any]) -> None:
        t = frame["t"]
        if t == "msg":
            self._on_msg(conn, frame)
        elif t == "ok" or t == "error":
            rid = frame.get("id")
            pending = conn.pending.pop(rid, None) if type(rid) is int else None
            if pending is None:
                if t == "error":
                    err = HubError(str(frame.get("code", "")), str(frame.get("msg", "")))
                    log.debug("unsolicited error", extra={"event": "hub_error",
                                                          "code": err.code})
                    _call(self._on_error, err)
                return
            if pending.future.done():
                return  # cancelled by its caller
            if t == "ok":
                if pending.on_ok is not None:
                    pending.on_ok(frame)
                pending.future.set_result(frame)
            else:
                pending.future.set_exception(
                    HubError(str(frame.get("code", "")), str(frame.get("msg", ""))))
        elif t == "receipt":
            mid, to, ts = frame.get("mid"), frame.get("to"), frame.get("ts")
            if type(mid) is str and type(to) is str and type(ts) is int:
                _call(self._on_receipt, Receipt(mid, to, ts))
        elif t == "bye":
            reason = frame.get("reason")
            conn.bye_reason = reason if type(reason) is str else ""
            retry_ms = frame.get("retry_ms")
            if type(retry_ms) is int and retry_ms >= 0:
                conn.retry_ms = retry_ms
        # Unknown frame types are ignored: newer hubs may add some.

    def _on_msg(self, conn: _Conn, frame: dict[str, Any]) -> None:
        mid, sender, body = frame.get("mid"), frame.get("from"), frame.get("body")
        ts, qos = frame.get("ts"), frame.get("qos", 0)
        topic, seq, sig = frame.get("topic"), frame.get("seq"), frame.get("sig")
        if (type(mid) is not str or type(sender) is not str or type(body) is not bytes
                or type(ts) is not int or qos not in (0, 1)
                or (topic is not None and (type(topic) is not str or type(seq) is not int))
                or (sig is not None and type(sig) is not bytes)):
            log.warning("malformed msg from hub", extra={"event": "bad_msg"})
            return
        if type(seq) is int and topic in self._subs and seq > self._subs[topic]:
            self._subs[topic] = int(seq)
        if not self._recent.add(mid):
            # §4: a repeat. Ack it again unless the first copy still waits for its ack.
            if qos == 1 and mid not in self._unacked:
                if len(conn.outbox) < conn.outbox_max:
                    self._enqueue_nowait(conn, encode({"t": "ack", "mid": mid}))
            return
        if qos == 1:
            self._unacked.add(mid)
        self._inbox.append(Message(mid, sender, body, ts, qos, topic, seq, sig))
        self._inbox_changed.set()

    async def _write_loop(self, conn: _Conn) -> None:
        """Drain the outbox in order, joining what waits into one batch up to the
        frame limit (§1: a client may always send batches)."""
        ws = conn.ws
        budget = conn.max_frame_bytes - _BATCH_HEADER_BYTES
        outbox = conn.outbox
        while True:
            while not outbox:
                conn.out_ready.clear()
                await conn.out_ready.wait()
            chunk = [outbox.popleft()]
            size = len(chunk[0])
            while outbox and size + len(outbox[0]) <= budget:
                item = outbox.popleft()
                size += len(item)
                chunk.append(item)
            conn.out_room.set()
            try:
                await ws.send(chunk[0] if len(chunk) == 1 else batch_of(chunk))
            except ConnectionClosed:
                return


def _binary(data: str | bytes) -> bytes:
    if isinstance(data, str):
        raise DecodeError("text message from the hub")
    return data


def _int(v: object) -> int:
    return int(v) if type(v) is int else 0


def _subscribed(reply: dict[str, Any]) -> Subscribed:
    recovered = reply.get("recovered")
    return Subscribed(_int(reply.get("seq")), recovered if type(recovered) is bool else None)

