"""`Client`: one node's session with the hub, an asyncio adapter over the sans-I/O
protocol core (`openred.protocol`).

Per connection it runs a reader (decodes with `decode_server`, batches included, and
dispatches replies, messages, receipts, presence events, `bye`) and a writer (drains one
bounded write queue in order, joining what waits into §1 batches). A supervisor across
connections reconnects with jittered exponential backoff (§9) and, before the client
counts as connected again, resends the QoS 1 outbox with the same `cid`s (§4.2), holds
every topic again with `since` (§5) and watches again (§6.1).

Behaviour, by docs/protocol.md section:

- §2 / §9: `connect()` retries (unless `reconnect=False`) until a session opens or
  `connect_timeout_s` passes; a refused hello (`AuthError`) is never retried. Close
  codes 4001, 4003, 4010 and the client-bug codes 1002, 1003, 1007, and a 4012 (kick)
  within a minute of the last, end the client; every other close and a drop reconnect.
  A `bye` with `retry_ms` sets the minimum delay before the next attempt; the backoff
  starts again from its minimum once a session has lasted a minute.
  Each step is a typed event (`Connected`, `Disconnected`, `Closed`).
- §3: requests carry an incrementing int `id`; replies are matched by `id`, in any
  order. A call waits for a connection at most `connect_timeout_s`, then for its reply
  at most `request_timeout_s`.
- §4 / §4.2: a QoS 1 `send` goes through the outbox: it carries a `cid`, stays until
  the hub's `ok` (or a refusal), and is written again with the same `cid` on every new
  connection, so the hub stores it once (`ok dup` for a repeat). Received repeats are
  dropped by `mid` and acked again.
- §4: QoS 1 messages are acked by the message (`msg.ack()`, `async with msg`) or, with
  `auto_ack`, when the same task asks for its next message: per task, never "the last
  message of the client".
- §4.3: `request()` / `reply()` / `on_request`, correlated by `meta.req` / `meta.re`.
- §5: `subscribe()` returns a `Subscription`; a `recovered: false` on a resubscribe is a
  `TopicGap`, a refusal a `SubscriptionRefused` (and `SubscriptionError` on the
  subscription). §5.2 `history()`. §6.1 `watch()`.
- §7: received messages wait in bounded queues (`max_queue`); when one is full the
  reader stops reading the socket, which is the backpressure the hub sees.
- §12: `sign`, `encrypt`, `keys`, `group_keys`; §13: OpenTelemetry context in `meta`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import os
import random
import ssl as ssl_module
import time
import weakref
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from openred.client import _otel
from openred.client.crypto import (
    ENC_BOX,
    ENC_SECRETBOX,
    GroupKeys,
    key_of,
    open_box,
    open_secretbox,
    seal_box,
    seal_secretbox,
    verify_direct,
    verify_topic,
)
from openred.client.errors import (
    AuthError,
    ClientError,
    ConnectError,
    ConnectionLost,
    ConnectTimeout,
    CryptoError,
    DecryptError,
    HubError,
    OutboxError,
    RemoteError,
    RequestTimeout,
    SubscriptionError,
)
from openred.client.events import (
    Closed,
    Connected,
    Disconnected,
    Event,
    PresenceChanged,
    Receipt,
    StateEvent,
    SubscriptionRefused,
    TopicGap,
)
from openred.client.message import Message
from openred.client.outbox import Outbox, OutboxEntry, new_cid
from openred.client.streams import History, PresenceWatch, Subscription
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
from openred.protocol.frames import (
    MAX_MSG_META_VALUE_CHARS,
    batch_of,
    decode_server,
    encode,
    is_cid,
    is_topic,
    msg_meta_problem,
)
from openred.protocol.handshake import ClientHandshake, Welcome
from openred.protocol.identity import Identity, is_node_id, load_key_file
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

__all__ = ["KICK_REPEAT_S", "NO_RECONNECT_CODES", "SESSION_STABLE_S", "Client", "backoff_delay"]

log = logging.getLogger("openred.client")

# §9: a refusal, a ban or a newer session: coming back would be refused again or would
# take the session back from its new owner; 1002, 1003 and 1007 say this client sent
# what no hub accepts ("do not loop"). An operator's kick (4012) is different: §9 says
# reconnect with backoff, and stop only when it repeats (KICK_REPEAT_S).
NO_RECONNECT_CODES: Final = frozenset({CLOSE_AUTH_FAILED, CLOSE_FORBIDDEN, CLOSE_REPLACED,
                                       1002, 1003, 1007})
KICK_REPEAT_S: Final = 60.0
# §9: the backoff starts again from its minimum once a session has lasted this long, so
# a hub that closes every session at once is not reconnected to every backoff_min_s.
SESSION_STABLE_S: Final = 60.0
_CLOSE_NORMAL: Final = 1000
_CLOSE_ABNORMAL: Final = 1006
_CLOSE_INTERNAL: Final = 1011
_MAX_WS_MESSAGE_BYTES: Final = 16 * 2**20  # the hub bounds its own frames
_DEFAULT_MAX_FRAME_BYTES: Final = 131072  # §1 defaults, until the welcome says otherwise
_DEFAULT_MAX_BODY_BYTES: Final = 65536
_BATCH_HEADER_BYTES: Final = 5
# Codes after which a request may succeed later (§8: the frame was not accepted).
_RETRY_CODES: Final = frozenset({"rate_limited", "unavailable", "internal"})
_RESUB_ROUNDS: Final = 4
_RESUB_PAUSE_S: Final = 0.25
_GAP_WAIT_S: Final = 0.5  # §5: kept messages follow the `ok` at once; then report
_OUTBOX_RETRY_MIN_S: Final = 0.25
_OUTBOX_RETRY_MAX_S: Final = 4.0
_MAX_REQUEST_HANDLERS: Final = 64

Callback = Callable[[Any], object]
RequestHandler = Callable[[Message], bytes | Awaitable[bytes]]


def backoff_delay(attempt: int, min_s: float, max_s: float,
                  rng: Callable[[float, float], float] = random.uniform) -> float:
    """Full jitter: uniform between `min_s` and a cap that doubles from `min_s` with
    every failed attempt (0, 1, 2, ...) up to `max_s` (§9)."""
    cap = min(max_s, min_s * 2.0 ** min(attempt, 64))
    return rng(min_s, max(min_s, cap))


def check_meta(meta: Mapping[str, str]) -> dict[str, str]:
    """§4.1: at most 16 entries, keys of `[A-Za-z0-9._-]{1,64}`, `str` values of at most
    512 chars, 1024 bytes encoded (the hub's own check, openred.protocol.frames).
    `ValueError` naming the rule, before anything is sent."""
    out = dict(meta)
    problem = msg_meta_problem(out)
    if problem is not None:
        raise ValueError(problem)
    return out


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

    def forget(self, mid: str) -> None:
        self._mids.pop(mid, None)


@dataclass(eq=False)
class _Pending:
    """A request awaiting its reply: `on_reply` gets the `ok` or `error` frame,
    `on_down` the `ConnectionLost` when the connection goes first."""

    on_reply: Callable[[dict[str, Any]], None]
    on_down: Callable[[ConnectionLost], None]


@dataclass(eq=False)
class _Conn:
    """One WebSocket connection, from welcome to close."""

    ws: ClientConnection
    welcome: Welcome
    max_frame_bytes: int
    max_body_bytes: int
    wq_max: int
    gone: asyncio.Future[None]
    pending: dict[int, _Pending] = field(default_factory=dict)
    wq: deque[bytes] = field(default_factory=deque)  # encoded frames to write
    out_ready: asyncio.Event = field(default_factory=asyncio.Event)
    out_room: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    retry_ms: int | None = None
    bye_reason: str | None = None
    down: ConnectionLost | None = None  # set once the connection is gone


@dataclass(eq=False)
class _Topic:
    """A topic held: the highest `seq` handled (§5 `since`), its subscription, and a
    gap reported by a `recovered: false` whose extent the next message tells."""

    last: int
    sub: Subscription
    gap_from: int | None = None
    gap_to: int = 0
    gap_timer: asyncio.TimerHandle | None = None


def _limit(limits: dict[str, Any], key: str, default: int) -> int:
    v = limits.get(key)
    return int(v) if type(v) is int and v > 0 else default


def _close_of(ws: ClientConnection) -> tuple[int, str]:
    code = ws.close_code
    return (code if code is not None else _CLOSE_ABNORMAL), (ws.close_reason or "")


def _binary(data: str | bytes) -> bytes:
    if isinstance(data, str):
        raise DecodeError("text message from the hub")
    return data


def _int(v: object) -> int:
    return int(v) if type(v) is int else 0


def _str_meta(meta: object) -> dict[str, str] | None:
    """A received `meta` as a str -> str map; anything else is ignored (§14: be liberal
    in what comes from a newer hub)."""
    if type(meta) is not dict:
        return None
    return {k: v for k, v in meta.items() if type(k) is str and type(v) is str}


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class _Consumer:
    """One reader of a client's direct messages, and the message it took last (to
    auto-ack when it asks again): never state shared between two readers."""

    __slots__ = ("_client", "last")

    def __init__(self, client: Client) -> None:
        self._client = client
        self.last: Message | None = None

    def __aiter__(self) -> _Consumer:
        return self

    async def __anext__(self) -> Message:
        return await self._client._next(self)


class Client:
    """A node's connection to the hub. See docs/sdk.md for the whole API.

    Authentication (§2): `key_file` or `identity` (an Ed25519 key; the node id is its
    public key), or `token` (a JWT). With `token`, an `identity` may be given as well:
    the token authenticates, the identity signs and opens end-to-end bodies (§12).
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
        connect_timeout_s: float | None = 30.0,
        open_timeout_s: float = 10.0,
        request_timeout_s: float = 10.0,
        max_queue: int = 10_000,
        recent_mids: int = 10_000,
        outbox_max: int = 10_000,
        outbox_file: str | os.PathLike[str] | None = None,
        sign: bool = False,
        encrypt: bool = False,
        keys: Mapping[str, bytes] | None = None,
        group_keys: GroupKeys | None = None,
        on_state: Callable[[StateEvent], object] | None = None,
        on_event: Callable[[Event], object] | None = None,
        on_receipt: Callable[[Receipt], object] | None = None,
        on_error: Callable[[HubError], object] | None = None,
        on_request: RequestHandler | None = None,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        if key_file is not None and identity is not None:
            raise ValueError("give key_file or identity, not both")
        if key_file is None and identity is None and token is None:
            raise ValueError("give key_file, identity or token")
        if key_file is not None:
            identity = load_key_file(key_file)
        if not 0 < backoff_min_s <= backoff_max_s:
            raise ValueError("backoff_min_s: must be > 0 and <= backoff_max_s")
        for name, value in (("request_timeout_s", request_timeout_s),
                            ("open_timeout_s", open_timeout_s)):
            if value <= 0:
                raise ValueError(f"{name}: must be > 0")
        if connect_timeout_s is not None and connect_timeout_s <= 0:
            raise ValueError("connect_timeout_s: must be > 0 or None")
        if max_queue < 1:
            raise ValueError("max_queue: must be >= 1")
        if recent_mids < 1:
            raise ValueError("recent_mids: must be >= 1")
        if (sign or encrypt) and identity is None:
            raise ValueError("sign / encrypt: need key_file or identity")
        self.url = url
        self.identity = identity
        self._token = token
        self._batch = batch
        self._hello_meta = meta
        self._auto_ack = auto_ack
        self._reconnect = reconnect
        self._backoff_min_s = backoff_min_s
        self._backoff_max_s = backoff_max_s
        self._connect_timeout_s = connect_timeout_s
        self._open_timeout_s = open_timeout_s
        self._request_timeout_s = request_timeout_s
        self._max_queue = max_queue
        self._sign = sign
        self._encrypt = encrypt
        self.keys: dict[str, bytes] = {k: bytes(v) for k, v in (keys or {}).items()}
        self.group_keys = group_keys if group_keys is not None else GroupKeys()
        self._on_state = on_state
        self._on_event = on_event
        self._on_receipt = on_receipt
        self._on_error = on_error
        self._on_request = on_request
        self._ssl = ssl
        self._outbox = Outbox(outbox_max, outbox_file)

        self._ids = itertools.count(1)
        self._conn: _Conn | None = None  # where requests go: set once resumed
        self._live: _Conn | None = None  # the open connection (acks go here at once)
        self._open_conns: set[_Conn] = set()  # not torn down yet
        self._ready = asyncio.Event()
        self._stopped = asyncio.Event()  # set with _final
        self._supervisor: asyncio.Task[None] | None = None
        self._welcome: Welcome | None = None
        self._started = False  # connect() was called
        self._closed = False  # close() was called
        self._final: ConnectionLost | None = None
        self.callbacks_dropped = 0  # async callbacks past `max_queue` (see _call)
        self._last_kick = -KICK_REPEAT_S  # monotonic time of the last 4012
        self._last_down = ConnectionLost(_CLOSE_ABNORMAL, "not connected")

        self._topics: dict[str, _Topic] = {}
        self._watches: list[PresenceWatch] = []
        self._watch_nodes: Counter[str] = Counter()
        self._watch_topics: Counter[str] = Counter()
        self._requests: dict[str, tuple[str, asyncio.Future[Message]]] = {}
        self._recent = _RecentMids(recent_mids)
        self._unacked: set[str] = set()  # QoS 1 mids handed out but not acked yet
        self._inbox: deque[Message] = deque()
        self._inbox_changed = asyncio.Event()
        self._room = asyncio.Event()  # the reader may go on
        self._full_streams: set[Subscription] = set()
        self._taken: weakref.WeakKeyDictionary[asyncio.Task[Any], _Consumer] = \
            weakref.WeakKeyDictionary()  # per task, for anext(client) called directly
        self._callbacks: asyncio.Queue[Awaitable[object]] | None = None
        self._callback_runner: asyncio.Task[None] | None = None
        self._aux: set[asyncio.Task[Any]] = set()  # handlers, persister
        self._timers: set[asyncio.TimerHandle] = set()
        self._persist_wake = asyncio.Event()

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
        """Topics held, each with the highest `seq` handled."""
        return {t: st.last for t, st in self._topics.items()}

    @property
    def outbox_size(self) -> int:
        """QoS 1 sends not yet confirmed by the hub (§4.2)."""
        return len(self._outbox)

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the first session. Retries with backoff (unless `reconnect=False`) until
        one opens or `connect_timeout_s` passes (`ConnectTimeout`, the last attempt's
        error chained); a refused hello raises `AuthError` at once."""
        if self._started:
            raise RuntimeError("connect() was already called on this client")
        self._started = True
        if self._outbox.path is not None:
            self._spawn(self._persist_loop(), "openred-client-outbox")
        attempt = 0
        last: ConnectError | None = None
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                while True:
                    try:
                        conn = await self._open()
                        break
                    except AuthError as exc:
                        self._emit(Disconnected(exc.close_code, exc.code, False, attempt))
                        raise
                    except ConnectError as exc:
                        last = exc
                        if not self._reconnect:
                            self._emit(Disconnected(_CLOSE_ABNORMAL, _short(exc), False,
                                                    attempt))
                            raise
                        delay = backoff_delay(attempt, self._backoff_min_s,
                                              self._backoff_max_s)
                        attempt += 1
                        self._emit(Disconnected(_CLOSE_ABNORMAL, _short(exc), True,
                                                attempt, delay))
                        await asyncio.sleep(delay)
        except TimeoutError as exc:
            await self._fail_start(_CLOSE_ABNORMAL, "connect timeout")
            raise ConnectTimeout(
                f"no session within {self._connect_timeout_s} s") from (last or exc)
        except BaseException as exc:
            code = exc.close_code if isinstance(exc, AuthError) else _CLOSE_ABNORMAL
            await self._fail_start(code, "connect failed")
            raise
        self._set_ready(conn)
        self._supervisor = asyncio.create_task(self._supervise(conn),
                                               name="openred-client-supervisor")

    async def _fail_start(self, code: int, reason: str) -> None:
        self._final = ConnectionLost(code, reason, final=True)
        self._stopped.set()
        self._emit(Closed(code, reason))
        await self._stop_aux()

    async def wait_connected(self, timeout_s: float | None = None) -> None:
        """Until a session is open (now, or after the reconnect under way). Raises the
        final `ConnectionLost` when the client stopped, `ConnectTimeout` after
        `timeout_s` (default `connect_timeout_s`)."""
        await self._ready_conn(timeout_s)

    async def close(self) -> None:
        """Close with 1000 and stop: pending calls fail with a final `ConnectionLost`,
        iterators end, callbacks still queued run (for a few seconds at most), a file
        outbox is written. Idempotent."""
        if self._closed:
            return
        self._closed = True
        was_final = self._final is not None
        final = ConnectionLost(_CLOSE_NORMAL, "closed by client", final=True)
        if self._final is None:
            self._final = final
        self._stopped.set()
        live = self._conn
        self._live = self._conn = None
        sup, self._supervisor = self._supervisor, None
        if sup is not None:
            sup.cancel()
            await asyncio.wait([sup])  # a cancel of close() itself still propagates
        for conn in list(self._open_conns):
            await self._teardown(conn, final)
        self._end_streams()
        if not was_final:
            if live is not None:
                self._emit(Disconnected(_CLOSE_NORMAL, "closed by client", False))
            self._emit(Closed(_CLOSE_NORMAL, "closed by client"))
        await self._stop_aux()

    async def _stop_aux(self) -> None:
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        for st in self._topics.values():
            if st.gap_timer is not None:
                st.gap_timer.cancel()
        for _req, fut in self._requests.values():
            if not fut.done():
                fut.set_exception(self._final or self._last_down)
        tasks = list(self._aux)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        # Callbacks queued before the end (the `Closed` event among them) still run.
        runner = self._callback_runner
        if runner is not None and self._callbacks is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await self._callbacks.join()
            runner.cancel()
            await asyncio.wait([runner])
            while not self._callbacks.empty():
                left = self._callbacks.get_nowait()
                if inspect.iscoroutine(left):
                    left.close()
        try:
            await self._outbox.persist()
        except ClientError:
            log.exception("outbox write failed", extra={"event": "outbox_write"})

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._aux.add(task)
        task.add_done_callback(self._aux.discard)
        return task

    # -- events and callbacks --------------------------------------------------------

    def _emit(self, ev: Event) -> None:
        if isinstance(ev, Connected | Disconnected | Closed):
            self._call(self._on_state, ev)
        elif isinstance(ev, Receipt):
            self._call(self._on_receipt, ev)
        self._call(self._on_event, ev)

    def _call(self, callback: Callback | None, arg: object) -> None:
        """Run a sync callback now, an async one on the callback runner (one at a time,
        in order). What they raise is logged: it must not stop the reader."""
        if callback is None:
            return
        try:
            result = callback(arg)
        except Exception:
            log.exception("client callback raised", extra={"event": "callback_error"})
            return
        if inspect.isawaitable(result):
            if self._callbacks is None:
                self._callbacks = asyncio.Queue()
            if self._callback_runner is None or self._callback_runner.done():
                self._callback_runner = asyncio.create_task(
                    self._run_callbacks(self._callbacks), name="openred-client-callbacks")
            if self._callbacks.qsize() >= self._max_queue:
                # Receipts and presence events come as fast as the hub sends them: an
                # async callback that cannot keep up loses the newest, it does not grow
                # the queue without bound (the same `max_queue` as received messages).
                if inspect.iscoroutine(result):
                    result.close()
                self.callbacks_dropped += 1
                log.warning("async callback dropped: %d already waiting", self._max_queue,
                            extra={"event": "callback_dropped"})
                return
            self._callbacks.put_nowait(result)

    @staticmethod
    async def _run_callbacks(queue: asyncio.Queue[Awaitable[object]]) -> None:
        while True:
            aw = await queue.get()
            try:
                await aw
            except Exception:
                log.exception("client callback raised", extra={"event": "callback_error"})
            finally:
                queue.task_done()

    # -- direct messages -------------------------------------------------------------

    async def send(self, to: str, body: bytes, *, qos: int = 0, ttl: int | None = None,
                   receipt: bool = False, cid: str | None = None,
                   meta: Mapping[str, str] | None = None, sign: bool | None = None,
                   encrypt: bool | None = None, timeout_s: float | None = None) -> str:
        """Send a direct message (§4); returns its `mid`.

        QoS 0 returns once the hub routed it (`HubError` `no_route` when `to` is
        offline). QoS 1 goes through the outbox (§4.2) with `cid` (given, or a fresh
        one) and returns once the hub stored it; across a reconnect it is sent again
        with the same `cid`, and a repeat is answered with the first `mid`. A timeout or
        a cancelled call leaves the message in the outbox: it is still delivered, once.
        `OutboxFull` when `outbox_max` sends are unconfirmed already.
        """
        frame, entry = self._prepare_send(to, body, qos, ttl, receipt, cid, meta, sign,
                                          encrypt)
        if entry is None:
            reply = await self._request(frame, timeout_s=timeout_s)
            return str(reply.get("mid", ""))
        kept = self._outbox.add(entry)
        if kept is entry:
            try:
                await self._outbox.persist()
            except OutboxError:
                # Not in the file: not sent either, so the caller's error is the truth.
                self._outbox.remove(entry.cid)
                raise
        mid, _dup = await self._deliver(kept, timeout_s)
        return mid

    def send_nowait(self, to: str, body: bytes, *, ttl: int | None = None,
                    meta: Mapping[str, str] | None = None, sign: bool | None = None,
                    encrypt: bool | None = None) -> None:
        """Queue a QoS 0 message without an `id`: no reply, no `no_route` (§3); errors
        about it reach `on_error`. Raises `ConnectionLost` when not connected and
        `asyncio.QueueFull` when the write queue is full."""
        frame, _ = self._prepare_send(to, body, 0, ttl, False, None, meta, sign, encrypt)
        conn = self._conn
        if conn is None:
            raise self._final or self._last_down
        if len(conn.wq) >= conn.wq_max:
            raise asyncio.QueueFull
        self._enqueue_nowait(conn, self._encode_checked(conn, frame))

    async def flush(self, timeout_s: float | None = None) -> None:
        """Until every QoS 1 send in the outbox is confirmed by the hub (§4.2).
        `RequestTimeout` after `timeout_s`; the final `ConnectionLost` if the client
        stops first (the outbox keeps them, in its file when it has one)."""
        drained = asyncio.ensure_future(self._outbox.wait_empty())
        stopped = asyncio.ensure_future(self._stopped.wait())
        try:
            done, _ = await asyncio.wait({drained, stopped}, timeout=timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            drained.cancel()
            stopped.cancel()
        if drained in done:
            return
        if stopped in done and len(self._outbox):
            raise self._final or self._last_down
        if not done:
            raise RequestTimeout(f"outbox not empty after {timeout_s} s "
                                 f"({len(self._outbox)} messages)")

    def _prepare_send(self, to: str, body: bytes, qos: int, ttl: int | None,
                      receipt: bool, cid: str | None, meta: Mapping[str, str] | None,
                      sign: bool | None, encrypt: bool | None,
                      ) -> tuple[dict[str, Any], OutboxEntry | None]:
        if not is_node_id(to):
            raise ValueError("to: not a node id")
        if qos not in (0, 1):
            raise ValueError("qos: must be 0 or 1")
        if ttl is not None and (type(ttl) is not int or ttl < 1):
            raise ValueError("ttl: must be an int >= 1")
        if cid is not None and not is_cid(cid):
            raise ValueError("cid: not 1..64 printable ASCII chars")
        headers = check_meta(meta or {})
        wire = bytes(body)
        if self._encrypt if encrypt is None else encrypt:
            me = self._need_identity("encrypt")
            peer = key_of(to, self.keys)
            if peer is None:
                raise CryptoError(f"no key known for {to}: add it to keys")
            wire = seal_box(me, peer, wire)
            headers["enc"] = ENC_BOX
        _otel.inject(headers)
        check_meta(headers)  # what the SDK added counts against §4.1 too
        sig = None
        if self._sign if sign is None else sign:
            sig = self._need_identity("sign").sign_body(to, wire)
        self._check_body(wire)
        if qos == 1:
            entry = OutboxEntry(cid or new_cid(), to, wire, ttl, sig, receipt,
                                headers or None)
            return entry.frame(), entry
        frame: dict[str, Any] = {"t": "send", "to": to, "body": wire, "qos": 0}
        if ttl is not None:
            frame["ttl"] = ttl
        if sig is not None:
            frame["sig"] = sig
        if headers:
            frame["meta"] = headers
        return frame, None

    def _need_identity(self, what: str) -> Identity:
        if self.identity is None:
            raise CryptoError(f"{what}: the client has no identity")
        return self.identity

    def _check_body(self, body: bytes) -> None:
        limit = _DEFAULT_MAX_BODY_BYTES
        if self._welcome is not None:
            limit = _limit(self._welcome.limits, "max_body_bytes", limit)
        if len(body) > limit:
            raise HubError(TOO_LARGE, f"body larger than {limit} bytes")

    async def _deliver(self, entry: OutboxEntry,
                       timeout_s: float | None) -> tuple[str, bool]:
        """Wait for `entry`'s `ok`, writing it to each new connection (§4.2)."""
        if entry.future is None:
            entry.future = asyncio.get_running_loop().create_future()
        fut = entry.future
        reply_s = self._request_timeout_s if timeout_s is None else timeout_s
        entry.waiting += 1
        try:
            while not fut.done():
                conn = await self._ready_conn()
                if entry.sent_on is not conn and entry.cid in self._outbox:
                    self._write_entry(conn, entry)
                waits: set[asyncio.Future[Any]] = {fut, conn.gone}
                await asyncio.wait(waits, timeout=reply_s,
                                   return_when=asyncio.FIRST_COMPLETED)
                if not fut.done() and not conn.gone.done():
                    raise RequestTimeout(f"no reply within {reply_s} s; the message "
                                         "stays in the outbox")
        finally:
            entry.waiting -= 1
        return fut.result()

    def _write_entry(self, conn: _Conn, entry: OutboxEntry) -> None:
        """Write an outbox entry with a fresh request `id` (the `cid` stays)."""
        rid = next(self._ids)
        frame = entry.frame()
        frame["id"] = rid
        try:
            data = self._encode_checked(conn, frame)
        except HubError as exc:
            self._entry_failed(entry, exc)
            return
        entry.sent_on = conn
        conn.pending[rid] = _Pending(lambda f: self._entry_reply(entry, f),
                                     lambda _down: self._entry_down(entry, conn))
        self._enqueue_nowait(conn, data)

    def _entry_reply(self, entry: OutboxEntry, frame: dict[str, Any]) -> None:
        if frame["t"] == "ok":
            self._outbox.remove(entry.cid)
            self._persist_wake.set()
            if entry.future is not None and not entry.future.done():
                entry.future.set_result((str(frame.get("mid", "")), frame.get("dup") is True))
            return
        err = HubError(str(frame.get("code", "")), str(frame.get("msg", "")))
        if err.code in _RETRY_CODES and entry.cid in self._outbox:
            # §8: not accepted; §7: back off, then the same cid again.
            entry.sent_on = None
            entry.retries += 1
            delay = backoff_delay(entry.retries, _OUTBOX_RETRY_MIN_S, _OUTBOX_RETRY_MAX_S)
            handle = asyncio.get_running_loop().call_later(delay, self._retry_entry, entry)
            self._timers.add(handle)
            return
        self._entry_failed(entry, err)

    def _entry_failed(self, entry: OutboxEntry, err: HubError) -> None:
        self._outbox.remove(entry.cid)
        self._persist_wake.set()
        fut = entry.future
        if fut is not None and not fut.done() and entry.waiting:
            fut.set_exception(err)
            fut.exception()  # retrieved: a caller that gave up meanwhile is no error
        else:
            log.warning("outbox message refused", extra={"event": "outbox_refused",
                                                         "code": err.code})
            self._call(self._on_error, err)

    def _entry_down(self, entry: OutboxEntry, conn: _Conn) -> None:
        if entry.sent_on is conn:
            entry.sent_on = None  # written again on the next connection

    def _retry_entry(self, entry: OutboxEntry) -> None:
        self._timers = {h for h in self._timers if not h.cancelled() and h.when() >
                        asyncio.get_running_loop().time()}
        conn = self._conn
        if conn is not None and entry.sent_on is None and entry.cid in self._outbox:
            self._write_entry(conn, entry)

    def _resend_outbox(self, conn: _Conn) -> None:
        """§4.2: every unconfirmed send again, in order, with its `cid`."""
        for entry in self._outbox:
            if entry.sent_on is not conn:
                self._write_entry(conn, entry)

    async def _persist_loop(self) -> None:
        """Write the outbox file after confirmations, coalesced."""
        while True:
            await self._persist_wake.wait()
            self._persist_wake.clear()
            try:
                await self._outbox.persist()
            except ClientError:
                log.exception("outbox write failed", extra={"event": "outbox_write"})
                await asyncio.sleep(1.0)

    # -- request / reply (§4.3) ------------------------------------------------------

    async def request(self, to: str, body: bytes, *, timeout_s: float | None = None,
                      qos: int = 0, meta: Mapping[str, str] | None = None,
                      sign: bool | None = None, encrypt: bool | None = None) -> Message:
        """Send a §4.3 request (`meta.req`) and return the reply `Message`. Raises
        `RemoteError` when the responder replied with `meta.err`, `RequestTimeout` when
        no reply came within `timeout_s` (default `request_timeout_s`), `HubError` when
        the hub refused the request (`no_route`: `to` is offline, at QoS 0)."""
        req = new_cid()
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._requests[req] = (to, fut)
        headers = dict(meta or {})
        headers["req"] = req
        limit_s = self._request_timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(limit_s):
                await self.send(to, body, qos=qos, meta=headers, sign=sign,
                                encrypt=encrypt)
                reply = await fut
        except TimeoutError as exc:
            if isinstance(exc, ClientError):
                raise
            raise RequestTimeout(f"no reply within {limit_s} s") from None
        finally:
            self._requests.pop(req, None)
        err = reply.meta.get("err")
        if err is not None:
            raise RemoteError(err, reply)
        return reply

    async def reply(self, msg: Message, body: bytes = b"", *, error: str | None = None,
                    meta: Mapping[str, str] | None = None, sign: bool | None = None,
                    encrypt: bool | None = None) -> str:
        """Answer the §4.3 request `msg` (same QoS as the request); with `error`, the
        reply carries `meta.err` and the requester's `request()` raises `RemoteError`.
        Returns the reply's `mid`."""
        req = msg.request_id
        if req is None:
            raise ValueError("msg: not a request (no meta.req)")
        headers = dict(meta or {})
        headers["re"] = req
        if error is not None:
            headers["err"] = error[:MAX_MSG_META_VALUE_CHARS] or "error"
        if encrypt is None and msg.enc == ENC_BOX:
            encrypt = True  # an encrypted request gets an encrypted reply
        return await self.send(msg.sender, body, qos=msg.qos, meta=headers, sign=sign,
                               encrypt=encrypt)

    async def _handle_request(self, handler: RequestHandler, msg: Message) -> None:
        """§4.3 for `on_request`: the handler's result is the reply, what it raises
        the reply's `meta.err`. A QoS 1 request is acked once answered, or once it is
        clear it cannot be (the requester is gone at QoS 0, it has no usable key)."""
        error: str | None = None
        body = b""
        try:
            result = handler(msg)
            body = bytes(await result if inspect.isawaitable(result) else result)
        except Exception as exc:
            log.info("request handler failed", extra={"event": "request_failed",
                                                      "error": type(exc).__name__})
            error = _short(exc)
        try:
            await self.reply(msg, body, error=error)
        except (ConnectionLost, ConnectTimeout, RequestTimeout):
            return  # unacked: a QoS 1 request comes again next session
        except (ClientError, ValueError) as exc:
            log.info("request not answered", extra={"event": "request_unanswered",
                                                    "error": type(exc).__name__})
        await msg.ack()

    # -- topics (§5) -----------------------------------------------------------------

    async def publish(self, topic: str, body: bytes, *, meta: Mapping[str, str] | None = None,
                      sign: bool | None = None, encrypt: bool | None = None,
                      timeout_s: float | None = None) -> tuple[str, int]:
        """Publish to a topic (§5); returns `(mid, seq)`. With a group key for the
        topic in `group_keys`, the body is encrypted (§12 `secretbox`) unless
        `encrypt=False`; `encrypt=True` without one raises `CryptoError`."""
        if not is_topic(topic):
            raise ValueError("topic: not 1..200 chars of [A-Za-z0-9._:/-]")
        headers = check_meta(meta or {})
        wire = bytes(body)
        if encrypt is not False:
            current = self.group_keys.current(topic)
            if current is None and encrypt:
                raise CryptoError(f"no group key for {topic}")
            if current is not None:
                kid, key = current
                wire = seal_secretbox(key, wire)
                headers["enc"] = ENC_SECRETBOX
                headers["kid"] = kid
        _otel.inject(headers)
        check_meta(headers)
        self._check_body(wire)
        frame: dict[str, Any] = {"t": "pub", "topic": topic, "body": wire}
        if self._sign if sign is None else sign:
            frame["sig"] = self._need_identity("sign").sign_topic(topic, wire)
        if headers:
            frame["meta"] = headers

        def own(reply: dict[str, Any]) -> None:
            # §5: a node never receives its own publication; count it as handled.
            st = self._topics.get(topic)
            seq = reply.get("seq")
            if st is not None and type(seq) is int and seq > st.last:
                st.last = seq

        reply = await self._request(frame, own, timeout_s=timeout_s)
        return str(reply.get("mid", "")), _int(reply.get("seq"))

    async def subscribe(self, topic: str, *, since: int | None = None) -> Subscription:
        """Hold `topic` (§5) and return its `Subscription`. With `since`, history after
        that `seq` is delivered first. The topic is held across reconnects (from the
        last `seq` handled) until `unsubscribe()` / `Subscription.close()`; subscribing
        a topic already held returns the same object (recovering again with `since`)."""
        if not is_topic(topic):
            raise ValueError("topic: not 1..200 chars of [A-Za-z0-9._:/-]")
        if since is not None and (type(since) is not int or since < 0):
            raise ValueError("since: must be an int >= 0")
        frame: dict[str, Any] = {"t": "sub", "topic": topic}
        if since is not None:
            frame["since"] = since
        held: list[Subscription] = []

        def on_ok(reply: dict[str, Any]) -> None:
            # Runs in the reader, before any message after this ok is dispatched.
            seq = _int(reply.get("seq"))
            recovered = reply.get("recovered")
            rec = recovered if type(recovered) is bool else None
            st = self._topics.get(topic)
            if st is None:
                sub = Subscription(topic, seq, rec, self._max_queue,
                                   lambda: self._stream_room(sub), self.unsubscribe)
                st = self._topics[topic] = _Topic(seq if since is None else since, sub)
            else:
                st.sub.seq, st.sub.recovered = seq, rec
                if since is not None:
                    st.last = since
            if rec is False and since is not None:
                self._gap_pending(topic, st, since, seq)
            held.append(st.sub)

        await self._request(frame, on_ok)
        return held[0]

    async def unsubscribe(self, topic: str) -> None:
        """Stop holding `topic` (§5). It is forgotten at once, so a reconnect does not
        subscribe it again even when this request fails; its `Subscription` ends."""
        if not is_topic(topic):
            raise ValueError("topic: not 1..200 chars of [A-Za-z0-9._:/-]")
        st = self._topics.pop(topic, None)
        if st is not None:
            self._drop_topic(st)
        await self._request({"t": "unsub", "topic": topic})

    def _drop_topic(self, st: _Topic, error: BaseException | None = None) -> None:
        if st.gap_timer is not None:
            st.gap_timer.cancel()
        st.sub._finish(error)
        if st.sub in self._full_streams:
            self._full_streams.discard(st.sub)
            self._room.set()

    def _stream_room(self, sub: Subscription) -> None:
        self._full_streams.discard(sub)
        self._room.set()

    def _gap_pending(self, topic: str, st: _Topic, since: int, seq: int) -> None:
        """§5 `recovered: false`: publications after `since` were lost. Their extent
        is known from the first message history still delivers; without one, from the
        topic's seq in the `ok`."""
        st.gap_from, st.gap_to = since + 1, seq
        if st.gap_timer is not None:
            st.gap_timer.cancel()
        st.gap_timer = asyncio.get_running_loop().call_later(
            _GAP_WAIT_S, self._gap_report, topic, st, None)

    def _gap_report(self, topic: str, st: _Topic, next_seq: int | None) -> None:
        if st.gap_from is None:
            return
        if st.gap_timer is not None:
            st.gap_timer.cancel()
            st.gap_timer = None
        # History delivers what it kept right after the `ok`: the first message tells
        # where the loss ends; a live one (nothing kept) ends it at the `ok`'s seq.
        to = st.gap_to if next_seq is None else min(next_seq - 1, st.gap_to)
        start, st.gap_from = st.gap_from, None
        if to < start:
            return
        gap = TopicGap(topic, start, to)
        log.warning("topic history lost messages", extra={
            "event": "topic_gap", "topic": topic, "from_seq": start, "to_seq": to})
        st.sub._put(gap)
        self._emit(gap)

    async def history(self, topic: str, *, limit: int = 100,
                      before: int | None = None) -> History:
        """The newest `limit` (1..1000) kept publications of `topic` below `before`,
        oldest first, without subscribing (§5.2)."""
        if not is_topic(topic):
            raise ValueError("topic: not 1..200 chars of [A-Za-z0-9._:/-]")
        if type(limit) is not int or not 1 <= limit <= 1000:
            raise ValueError("limit: must be an int in 1..1000")
        if before is not None and (type(before) is not int or before < 0):
            raise ValueError("before: must be an int >= 0")
        frame: dict[str, Any] = {"t": "history", "topic": topic, "limit": limit}
        if before is not None:
            frame["before"] = before
        reply = await self._request(frame)
        msgs: list[Message] = []
        raw = reply.get("msgs")
        for item in raw if type(raw) is list else []:
            if type(item) is dict:
                item.setdefault("topic", topic)
                item.setdefault("qos", 0)
                m = self._message_of(item)
                if m is not None and m.topic == topic:
                    msgs.append(m)
        return History(_int(reply.get("seq")), msgs, reply.get("more") is True)

    # -- presence (§6, §6.1) ---------------------------------------------------------

    async def presence(self, nodes: Iterable[str]) -> dict[str, bool]:
        """Which of `nodes` are online now (§6)."""
        reply = await self._request({"t": "presence", "nodes": list(nodes)})
        online = reply.get("online")
        if type(online) is not dict:
            return {}
        return {str(k): bool(v) for k, v in online.items()}

    async def watch(self, nodes: Iterable[str] = (), *,
                    topic: str | None = None) -> PresenceWatch:
        """Watch nodes coming and going, a topic's subscribers, or both (§6.1). The
        returned `PresenceWatch` has the `online` snapshot and yields `PresenceChanged`
        events (also given to `on_event`). Watched again after every reconnect."""
        wanted = frozenset(nodes)
        for n in wanted:
            if not is_node_id(n):
                raise ValueError("nodes: not node ids")
        if topic is not None and not is_topic(topic):
            raise ValueError("topic: not 1..200 chars of [A-Za-z0-9._:/-]")
        if not wanted and topic is None:
            raise ValueError("watch: give nodes, a topic, or both")
        frame: dict[str, Any] = {"t": "watch"}
        if wanted:
            frame["nodes"] = sorted(wanted)
        if topic is not None:
            frame["topic"] = topic
        made: list[PresenceWatch] = []

        def on_ok(reply: dict[str, Any]) -> None:
            # In the reader: events after this ok reach the watch.
            online = reply.get("online")
            snap = {str(k): bool(v) for k, v in online.items()} \
                if type(online) is dict else {}
            w = PresenceWatch(wanted, topic, {n: snap.get(n, False) for n in wanted},
                              self._max_queue, self._unwatch)
            self._watches.append(w)
            self._watch_nodes.update(wanted)
            if topic is not None:
                self._watch_topics[topic] += 1
            made.append(w)

        await self._request(frame, on_ok)
        return made[0]

    async def _unwatch(self, w: PresenceWatch) -> None:
        if w not in self._watches:
            return
        self._watches.remove(w)
        self._watch_nodes.subtract(w.nodes)
        gone = [n for n in w.nodes if self._watch_nodes[n] <= 0]
        for n in gone:
            del self._watch_nodes[n]
        frame: dict[str, Any] = {"t": "unwatch"}
        if gone:
            frame["nodes"] = sorted(gone)
        if w.topic is not None:
            self._watch_topics[w.topic] -= 1
            if self._watch_topics[w.topic] <= 0:
                del self._watch_topics[w.topic]
                frame["topic"] = w.topic
        if len(frame) > 1 and self._conn is not None:
            with contextlib.suppress(ClientError):
                await self._request(frame)

    async def _rewatch(self, conn: _Conn) -> None:
        """§6.1: watching ends with the session; watch again and report what changed
        meanwhile from the new snapshot."""
        nodes = sorted(self._watch_nodes)
        topics = sorted(self._watch_topics)
        if not nodes and not topics:
            return
        snap: dict[str, bool] = {}
        frames: list[dict[str, Any]] = []
        if nodes:
            frames.append({"t": "watch", "nodes": nodes})
        frames += [{"t": "watch", "topic": t} for t in topics]
        for frame in frames:
            try:
                reply = await self._request(frame, conn=conn)
            except HubError as exc:
                log.warning("watch refused", extra={"event": "watch_refused",
                                                    "code": exc.code})
                continue
            online = reply.get("online")
            if type(online) is dict:
                snap.update({str(k): bool(v) for k, v in online.items()})
        ts = time.time_ns() // 1_000_000  # the SDK's own time: the change has none
        for w in self._watches:
            for n in sorted(w.nodes):
                if n in snap and w.online.get(n) != snap[n]:
                    ev = PresenceChanged(n, snap[n], ts, None, snapshot=True)
                    w._deliver(ev)
                    self._emit(ev)

    # -- inbound ---------------------------------------------------------------------

    def __aiter__(self) -> _Consumer:
        """A new consumer of direct messages: each `async for msg in client` loop acks
        (with `auto_ack`) the message it took when it asks for its next one."""
        return _Consumer(self)

    async def __anext__(self) -> Message:
        """The next direct message, for `anext(client)` called directly: auto-ack is
        then per task (a task asking again acks the message it took before)."""
        task = asyncio.current_task()
        consumer = self._taken.get(task) if task is not None else None
        if consumer is None:
            consumer = _Consumer(self)
            if task is not None:
                self._taken[task] = consumer
        return await consumer.__anext__()

    async def _next(self, consumer: _Consumer) -> Message:
        """The next direct message (topic messages go to their `Subscription`).

        With `auto_ack`, a QoS 1 message is acked when its consumer asks for its next
        message, unless it was acked already or taken out of auto-ack by
        `async with msg`. Ends after `close()`; raises the final `ConnectionLost` once
        the queue is drained after a close the client does not recover from."""
        if not self._started:
            raise RuntimeError("connect() first")
        prev, consumer.last = consumer.last, None
        if prev is not None and not prev._manual and not prev.acked:
            await prev.ack()
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._inbox:
                msg = self._inbox.popleft()
                self._room.set()
                if self._auto_ack and msg.qos == 1:
                    consumer.last = msg
                return msg
            if self._final is not None:
                raise self._final
            self._inbox_changed.clear()
            await self._inbox_changed.wait()

    async def ack(self, msg: Message | str) -> None:
        """Ack a QoS 1 message by object or `mid` (§4); `msg.ack()` does the same."""
        if isinstance(msg, Message):
            await msg.ack()
            return
        await self._ack_mid(msg)

    async def _ack_message(self, msg: Message) -> None:
        await self._ack_mid(msg.mid)

    async def _ack_mid(self, mid: str) -> None:
        self._unacked.discard(mid)
        conn = self._live
        if conn is None or conn.down is not None:
            return  # best effort: the hub delivers it again and the repeat is acked
        with contextlib.suppress(ConnectionLost):
            await self._enqueue(conn, encode({"t": "ack", "mid": mid}))

    # -- request machinery -----------------------------------------------------------

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

    async def _ready_conn(self, timeout_s: float | None = None) -> _Conn:
        """The open connection, waiting for a (re)connect at most `timeout_s` (default
        `connect_timeout_s`, None: no limit)."""
        conn = self._conn
        if conn is not None and self._final is None:
            return conn
        limit = self._connect_timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(limit):
                while True:
                    if self._final is not None:
                        raise self._final
                    conn = self._conn
                    if conn is not None:
                        return conn
                    if not self._started:
                        raise ConnectionLost(_CLOSE_ABNORMAL, "not connected")
                    self._ready.clear()
                    await self._ready.wait()
        except TimeoutError as exc:
            if isinstance(exc, ClientError):
                raise
            raise ConnectTimeout(f"not connected within {limit} s") from None

    async def _request(self, frame: dict[str, Any],
                       on_ok: Callable[[dict[str, Any]], None] | None = None,
                       conn: _Conn | None = None,
                       timeout_s: float | None = None) -> dict[str, Any]:
        """Send `frame` with a fresh `id` and wait for its reply (§3): first for a
        connection (`connect_timeout_s`), then for the reply (`request_timeout_s`)."""
        if conn is None:
            conn = await self._ready_conn()
        if conn.down is not None:
            raise conn.down
        rid = next(self._ids)
        frame["id"] = rid
        data = self._encode_checked(conn, frame)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

        def on_reply(reply: dict[str, Any]) -> None:
            if future.done():
                return  # its caller gave up
            if reply["t"] == "ok":
                if on_ok is not None:
                    on_ok(reply)
                future.set_result(reply)
            else:
                future.set_exception(HubError(str(reply.get("code", "")),
                                              str(reply.get("msg", ""))))

        def on_down(down: ConnectionLost) -> None:
            if not future.done():
                future.set_exception(down)

        conn.pending[rid] = _Pending(on_reply, on_down)
        self._room.set()  # a reply is awaited: the reader may read on
        limit = self._request_timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(limit):
                await self._enqueue(conn, data)
                return await future
        except TimeoutError as exc:
            if isinstance(exc, ClientError):
                raise
            raise RequestTimeout(f"no reply within {limit} s") from None
        finally:
            conn.pending.pop(rid, None)

    async def _enqueue(self, conn: _Conn, data: bytes) -> None:
        while len(conn.wq) >= conn.wq_max:
            if conn.down is not None:
                raise conn.down
            conn.out_room.clear()
            await conn.out_room.wait()
        if conn.down is not None:
            raise conn.down
        self._enqueue_nowait(conn, data)

    def _enqueue_nowait(self, conn: _Conn, data: bytes) -> None:
        conn.wq.append(data)
        conn.out_ready.set()

    # -- connection ------------------------------------------------------------------

    async def _open(self) -> _Conn:
        """Connect, authenticate, start the reader and writer, resend the outbox, hold
        every topic and watch again. Raises `AuthError` or `ConnectError` (the cause
        chained), with nothing left open."""
        if self._token is not None:
            hs = ClientHandshake(token=self._token, batch=self._batch,
                                 meta=self._hello_meta)
        else:
            hs = ClientHandshake(identity=self.identity, batch=self._batch,
                                 meta=self._hello_meta)
        extra: dict[str, Any] = {} if self._ssl is None else {"ssl": self._ssl}
        try:
            ws = await connect(self.url, max_size=_MAX_WS_MESSAGE_BYTES, compression=None,
                               open_timeout=self._open_timeout_s,
                               close_timeout=min(self._open_timeout_s, 5.0), **extra)
        except (OSError, InvalidURI, InvalidHandshake, TimeoutError, ConnectionClosed,
                ValueError) as exc:
            raise ConnectError(f"cannot connect to {self.url}: {_short(exc)}") from exc
        conn: _Conn | None = None
        try:
            try:
                async with asyncio.timeout(self._open_timeout_s):
                    welcome, rest = await self._handshake(ws, hs)
            except HandshakeError as exc:
                raise AuthError(exc.code, exc.close_code, exc.reason) from exc
            except (TimeoutError, ConnectionClosed, ProtocolViolation, OSError) as exc:
                raise ConnectError(f"handshake failed: {_short(exc)}") from exc
            limits = welcome.limits
            conn = _Conn(ws, welcome,
                         _limit(limits, "max_frame_bytes", _DEFAULT_MAX_FRAME_BYTES),
                         _limit(limits, "max_body_bytes", _DEFAULT_MAX_BODY_BYTES),
                         self._max_queue, asyncio.get_running_loop().create_future())
            self._welcome = welcome
            self._live = conn
            self._open_conns.add(conn)
            conn.tasks.append(asyncio.create_task(self._read_loop(conn, rest),
                                                  name="openred-client-reader"))
            conn.tasks.append(asyncio.create_task(self._write_loop(conn),
                                                  name="openred-client-writer"))
            conn.tasks.append(asyncio.create_task(ws.wait_closed(),
                                                  name="openred-client-closed"))
            try:
                self._resend_outbox(conn)
                await self._resubscribe(conn)
                await self._rewatch(conn)
            except (ConnectionLost, RequestTimeout) as exc:
                raise ConnectError(f"session lost while resuming: {_short(exc)}") from exc
            log.info("connected", extra={"event": "client_connected", "node": welcome.node,
                                         "session": welcome.session,
                                         "pending": welcome.pending})
            return conn
        except BaseException as exc:
            if conn is not None:
                if self._live is conn:
                    self._live = None
                await self._teardown(conn, ConnectionLost(_CLOSE_ABNORMAL, "connect failed"))
            else:
                cause = exc.__cause__ if isinstance(exc, ConnectError) else exc
                code = CLOSE_UNDECODABLE if isinstance(cause, DecodeError) else _CLOSE_NORMAL
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
        welcome = hs.welcome(first)
        return welcome, frames[1:]

    async def _resubscribe(self, conn: _Conn) -> None:
        """§5: hold every topic again, recovering from the last seq handled."""
        topics = list(self._topics)
        # §7: every sub counts against the rate limit; stay within the burst, then pace
        # at the session's rate. Nothing else is sent meanwhile but acks (not counted)
        # and the outbox.
        burst = max(1, _limit(conn.welcome.limits, "burst", 100) // 2)
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
                    if res.code in _RETRY_CODES:
                        retry.append(topic)
                    else:
                        # forbidden, limit_exceeded, bad_frame: it would fail again.
                        st = self._topics.pop(topic, None)
                        log.warning("resubscribe refused", extra={
                            "event": "resubscribe_refused", "topic": topic,
                            "code": res.code})
                        if st is not None:
                            self._drop_topic(st, SubscriptionError(topic, res.code))
                            self._emit(SubscriptionRefused(topic, res.code))
                elif isinstance(res, BaseException):
                    raise res
            topics = retry
        if topics:
            # Kept: the next reconnect tries again.
            log.warning("resubscribe failed", extra={"event": "resubscribe_failed",
                                                     "topics": len(topics)})

    async def _resub_one(self, conn: _Conn, topic: str) -> None:
        st = self._topics.get(topic)
        if st is None:
            return  # unsubscribed meanwhile
        since = st.last

        def held(reply: dict[str, Any]) -> None:
            if reply.get("recovered") is False and self._topics.get(topic) is st:
                self._gap_pending(topic, st, since, _int(reply.get("seq")))

        await self._request({"t": "sub", "topic": topic, "since": since}, held, conn)

    def _set_ready(self, conn: _Conn) -> None:
        self._conn = conn
        self._ready.set()
        self._emit(Connected(conn.welcome.session, conn.welcome.pending, conn.welcome.node))

    async def _supervise(self, conn: _Conn) -> None:
        """Watch the connection; reconnect with backoff until a final close."""
        attempt = 0
        up_since = time.monotonic()
        try:
            while True:
                down = await self._wait_down(conn)
                if time.monotonic() - up_since >= SESSION_STABLE_S:
                    attempt = 0
                self._conn = self._live = None
                self._ready.clear()
                await self._teardown(conn, down)
                if down.final or not self._reconnect:
                    down.final = True
                    self._emit(Disconnected(down.code, down.reason, False))
                    self._finish(down)
                    return
                self._last_down = down
                floor_s = conn.retry_ms / 1000 if conn.retry_ms is not None else 0.0
                code, reason = down.code, down.reason
                while True:
                    delay = max(floor_s, backoff_delay(attempt, self._backoff_min_s,
                                                       self._backoff_max_s))
                    floor_s = 0.0
                    attempt += 1
                    self._emit(Disconnected(code, reason, True, attempt, delay))
                    log.info("reconnecting", extra={"event": "client_reconnecting",
                                                    "code": code, "delay_s": delay})
                    await asyncio.sleep(delay)
                    try:
                        conn = await self._open()
                    except AuthError as exc:
                        self._emit(Disconnected(exc.close_code, exc.code, False, attempt))
                        self._finish(ConnectionLost(exc.close_code, exc.reason, final=True))
                        return
                    except ConnectError as exc:
                        log.info("reconnect failed", extra={
                            "event": "client_reconnect_failed", "error": _short(exc)})
                        code, reason = _CLOSE_ABNORMAL, _short(exc)
                        continue
                    up_since = time.monotonic()
                    self._set_ready(conn)
                    break
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("client supervisor failed", extra={"event": "client_internal"})
            self._conn = self._live = None
            down = ConnectionLost(_CLOSE_INTERNAL, "internal", final=True)
            await self._teardown(conn, down)
            self._emit(Disconnected(down.code, down.reason, False))
            self._finish(down)

    async def _wait_down(self, conn: _Conn) -> ConnectionLost:
        """Until any of the connection's tasks ends; what ended it."""
        await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in conn.tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("client task failed", exc_info=task.exception(),
                          extra={"event": "client_internal"})
                with contextlib.suppress(Exception):
                    await conn.ws.close(_CLOSE_INTERNAL, "internal")
                return ConnectionLost(_CLOSE_INTERNAL, "internal")
        if conn.down is not None:
            return conn.down  # the reader saw the close first
        if conn.ws.close_code is None:
            # The writer ended first (it ends only on a close): let the closing
            # handshake finish so the hub's code is known.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._open_timeout_s):
                    await conn.ws.wait_closed()
        return self._down_of(conn)

    def _down_of(self, conn: _Conn) -> ConnectionLost:
        code, reason = _close_of(conn.ws)
        if conn.bye_reason and not reason:
            reason = conn.bye_reason
        final = code in NO_RECONNECT_CODES
        if code == CLOSE_KICKED:
            now = time.monotonic()
            final = now - self._last_kick < KICK_REPEAT_S
            self._last_kick = now
        return ConnectionLost(code, reason, final=final)

    def _mark_down(self, conn: _Conn, down: ConnectionLost) -> None:
        """The connection is gone: fail what waits on it, at once (also during the
        resume of `_open`, which the supervisor does not watch)."""
        if conn.down is None:
            conn.down = down
        for pending in list(conn.pending.values()):
            pending.on_down(conn.down)
        conn.pending.clear()
        conn.wq.clear()
        conn.out_room.set()
        conn.out_ready.set()
        if not conn.gone.done():
            conn.gone.set_result(None)

    async def _teardown(self, conn: _Conn, down: ConnectionLost) -> None:
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

    def _finish(self, down: ConnectionLost) -> None:
        """The client will not reconnect."""
        if self._final is None:
            self._final = down
        self._stopped.set()
        log.info("disconnected", extra={"event": "client_closed", "code": down.code,
                                        "reason": down.reason})
        self._end_streams()
        self._emit(Closed(down.code, down.reason))
        for _req, fut in self._requests.values():
            if not fut.done():
                fut.set_exception(down)

    def _end_streams(self) -> None:
        error = None if self._closed else self._final
        for st in self._topics.values():
            st.sub._finish(error)
        for w in self._watches:
            w._finish(error)
        self._ready.set()  # waiters re-check and see _final
        self._inbox_changed.set()
        self._room.set()

    # -- reader / writer -------------------------------------------------------------

    def _has_room(self, conn: _Conn) -> bool:
        # A reply awaited lets the reader go on to twice the bound, so a consumer that
        # awaits a reply in its loop body cannot deadlock against its own full queue.
        if self._full_streams and (not conn.pending or any(
                len(s._items) >= 2 * self._max_queue for s in self._full_streams)):
            return False
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
                self._room.clear()
                await self._room.wait()
            try:
                data = await ws.recv()
            except ConnectionClosed:
                self._mark_down(conn, self._down_of(conn))
                return
            try:
                frames = decode_server(_binary(data))
            except DecodeError:
                # §1 / §9, the other way round: the hub's bytes are not msgpack frames.
                self._mark_down(conn, ConnectionLost(CLOSE_UNDECODABLE, "undecodable frame"))
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
            if pending is not None:
                pending.on_reply(frame)
            elif t == "error":
                err = HubError(str(frame.get("code", "")), str(frame.get("msg", "")))
                log.debug("unsolicited error", extra={"event": "hub_error",
                                                      "code": err.code})
                self._call(self._on_error, err)
        elif t == "presence":
            self._on_presence(frame)
        elif t == "receipt":
            mid, to, ts = frame.get("mid"), frame.get("to"), frame.get("ts")
            if type(mid) is str and type(to) is str and type(ts) is int:
                self._emit(Receipt(mid, to, ts))
        elif t == "bye":
            reason = frame.get("reason")
            conn.bye_reason = reason if type(reason) is str else ""
            retry_ms = frame.get("retry_ms")
            if type(retry_ms) is int and retry_ms >= 0:
                conn.retry_ms = retry_ms
        # §14: unknown frame types are ignored: newer hubs may add some.

    def _on_presence(self, frame: dict[str, Any]) -> None:
        node, online, ts, topic = (frame.get("node"), frame.get("online"), frame.get("ts"),
                                   frame.get("topic"))
        if (type(node) is not str or type(online) is not bool
                or (topic is not None and type(topic) is not str)):
            log.warning("malformed presence from hub", extra={"event": "bad_presence"})
            return
        ev = PresenceChanged(node, online, ts if type(ts) is int else 0, topic)
        for w in self._watches:
            if w._matches(ev):
                w._deliver(ev)
        self._emit(ev)

    def _message_of(self, frame: dict[str, Any]) -> Message | None:
        """A `Message` from a `msg` frame (or a §5.2 history entry): checked, verified
        and opened (§12). None when malformed."""
        mid, sender, raw = frame.get("mid"), frame.get("from"), frame.get("body")
        ts, qos = frame.get("ts"), frame.get("qos", 0)
        topic, seq, sig = frame.get("topic"), frame.get("seq"), frame.get("sig")
        if (type(mid) is not str or type(sender) is not str or type(raw) is not bytes
                or type(ts) is not int or qos not in (0, 1)
                or (topic is not None and (type(topic) is not str or type(seq) is not int))
                or (sig is not None and type(sig) is not bytes)):
            return None
        meta = _str_meta(frame.get("meta")) or {}
        sender_key = key_of(sender, self.keys)
        if topic is None:
            verified = verify_direct(sender_key, self.node_id or "", raw, sig)
        else:
            verified = verify_topic(sender_key, topic, raw, sig)
        enc = meta.get("enc")
        body, error = raw, None
        if enc is not None:
            try:
                body = self._decrypt(enc, sender, sender_key, topic, meta, raw)
            except DecryptError as exc:
                body, error = b"", exc
        return Message(mid, sender, body, ts, int(qos), topic=topic,
                       seq=seq if topic is not None else None, sig=sig, meta=meta,
                       raw=raw, verified=verified, enc=enc, error=error,
                       trace_context=_otel.extract(meta), acker=self._ack_message)

    def _decrypt(self, enc: str, sender: str, sender_key: bytes | None, topic: str | None,
              meta: dict[str, str], raw: bytes) -> bytes:
        """§12: open a `box` with the `from` node's key, a `secretbox` with the group
        key its `kid` names."""
        if enc == ENC_BOX and topic is None:
            if self.identity is None:
                raise DecryptError("no identity to open a box")
            if sender_key is None:
                raise DecryptError(f"no key known for {sender}")
            try:
                return open_box(self.identity, sender_key, raw)
            except CryptoError as exc:
                if isinstance(exc, DecryptError):
                    raise
                raise DecryptError(str(exc)) from exc
        if enc == ENC_SECRETBOX and topic is not None:
            kid = meta.get("kid")
            key = self.group_keys.get(topic, kid) if kid is not None else None
            if key is None:
                raise DecryptError(f"no group key {kid!r} for {topic}")
            return open_secretbox(key, raw)
        raise DecryptError(f"unknown encryption {enc!r}")

    def _on_msg(self, conn: _Conn, frame: dict[str, Any]) -> None:
        msg = self._message_of(frame)
        if msg is None:
            log.warning("malformed msg from hub", extra={"event": "bad_msg"})
            return
        topic, seq = msg.topic, msg.seq
        st = self._topics.get(topic) if topic is not None else None
        if st is not None and seq is not None:
            if st.gap_from is not None:
                self._gap_report(msg.topic or "", st, seq)
            if seq > st.last:
                st.last = seq
        if not self._recent.add(msg.mid):
            # §4: a repeat. Ack it again unless the first copy still waits for its ack.
            if msg.qos == 1 and msg.mid not in self._unacked:
                if len(conn.wq) < conn.wq_max:
                    self._enqueue_nowait(conn, encode({"t": "ack", "mid": msg.mid}))
            return
        if msg.qos == 1:
            self._unacked.add(msg.mid)
            # A message dropped by the application without an ack (a loop left with
            # `break`) must come again next session (§4: at least once), not be taken
            # for a repeat of one still being handled.
            weakref.finalize(msg, self._dropped_unacked, msg.mid)
        if st is not None:
            st.sub._put(msg)
            if st.sub.full:
                self._full_streams.add(st.sub)
            return
        if topic is not None:
            return  # a topic no longer held (unsubscribed while in flight)
        re_id = msg.reply_to
        if re_id is not None:
            # §4.3: a reply is consumed by request(), acked here, never queued: one that
            # comes after its request gave up (or names no request of ours) would sit
            # in the inbox, unread by a client that only makes requests, until the SDK
            # stops reading and the hub cuts the session (§7).
            waiting = self._requests.get(re_id)
            if waiting is not None and waiting[0] == msg.sender:
                if not waiting[1].done():
                    waiting[1].set_result(msg)
            else:
                log.debug("reply to no open request dropped",
                          extra={"re": re_id, "from": msg.sender})
            if msg.qos == 1:
                self._spawn(msg.ack(), "openred-client-ack")
            return
        handler = self._on_request
        if handler is not None and msg.request_id is not None:
            if len(self._aux) < _MAX_REQUEST_HANDLERS:
                self._spawn(self._handle_request(handler, msg), "openred-client-request")
                return
        self._inbox.append(msg)
        self._inbox_changed.set()

    def _dropped_unacked(self, mid: str) -> None:
        if mid in self._unacked:
            self._unacked.discard(mid)
            self._recent.forget(mid)

    async def _write_loop(self, conn: _Conn) -> None:
        """Drain the write queue in order, joining what waits into one batch up to the
        frame limit (§1: a client may always send batches)."""
        ws = conn.ws
        budget = conn.max_frame_bytes - _BATCH_HEADER_BYTES
        wq = conn.wq
        while True:
            while not wq:
                conn.out_ready.clear()
                await conn.out_ready.wait()
            chunk = [wq.popleft()]
            size = len(chunk[0])
            while wq and size + len(wq[0]) <= budget:
                item = wq.popleft()
                size += len(item)
                chunk.append(item)
            conn.out_room.set()
            try:
                await ws.send(chunk[0] if len(chunk) == 1 else batch_of(chunk))
            except ConnectionClosed:
                return
