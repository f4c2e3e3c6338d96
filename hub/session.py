"""One node session: the state machine between a WebSocket connection (hub/transport.py)
and the router (hub/node.py).

A `Session` receives whole messages from its `Connection`, decodes each once
(`protocol.frames.decode_client`), applies the per-session rate limit and dispatches:
the hello goes to hub/admission.py, QoS 0 sends and topic fan-out are synchronous, what
needs the store or the broker runs as a task with the number in flight bounded (reading
pauses past it). Everything beyond this session goes through `HubNode`: the session
never calls the store or the broker itself. QoS 1 delivery to this session, replay and
resync belong to its `Inbox` (hub/inbox.py).

Why this module is over 500 lines: it is one state machine and the handler of each frame
type it dispatches to (send, pub, sub with its recovery, unsub, presence, history, ack); splitting
the handlers from the machine would only move the same calls between two files.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any

from openred.hub.inbox import Inbox
from openred.hub.meta import direct_msg, topic_msg_of
from openred.hub.ratelimit import TokenBucket
from openred.hub.tokens import topic_allowed
from openred.protocol import errors as E
from openred.protocol.errors import DecodeError, FrameError
from openred.protocol.frames import (
    Ack,
    Hello,
    History,
    Presence,
    Pub,
    Send,
    Sub,
    Unsub,
    Unwatch,
    Watch,
    decode_client,
    encode_error,
    encode_ok,
)
from openred.protocol.identity import body_message, topic_message, verify_signature

if TYPE_CHECKING:
    from openred.hub.handshake import Authenticated, ServerHandshake
    from openred.hub.node import HubNode
    from openred.hub.transport import Connection

__all__ = ["Session", "State"]

log = logging.getLogger("openred.hub.session")

MAX_INFLIGHT = 1024  # async operations per session before reading pauses
RESUME_INFLIGHT = 512
# Bodies held by those operations (a pub or QoS 1 send waiting for the store): past this
# many bytes reading pauses too, so 1,024 operations cannot hold 1,024 x 64 KiB.
MAX_INFLIGHT_BYTES = 4 * 1024 * 1024


class State(enum.IntEnum):
    HELLO = 0  # challenge sent, waiting for the hello (docs/protocol.md §2)
    AUTH = 1  # hello received, being checked; frames routed to it queue behind welcome
    ACTIVE = 2  # welcome sent
    CLOSED = 3  # closing or closed: out of the registry, nothing more is handled


HELLO, AUTH, ACTIVE, CLOSED = State.HELLO, State.AUTH, State.ACTIVE, State.CLOSED

# A QoS 1 send on its way (HubNode.send_q1): the frame, its mid and time, the `routed`
# future of the sender's previous QoS 1 message (None: none) and its own.
Q1Send = tuple[Send, str, int, "asyncio.Future[Any] | None", "asyncio.Future[None]"]


class _Recovery:
    """Live topic messages held back while a `sub` reads history (§6: no gap, no dup)."""

    __slots__ = ("items", "nbytes")

    def __init__(self) -> None:
        self.items: list[tuple[int, bytes]] = []
        self.nbytes = 0


class Session:
    # Slots: thousands of idle sessions per process, each without an instance dict.
    __slots__ = (
        "_bucket", "_ctl", "_ctl_task", "_handshake", "_hello_timer", "_inflight",
        "_inflight_bytes", "_q1_batch", "_q1_tail", "_read_paused", "_refused", "_refused_since",
        "_tasks", "conn", "hub", "inbox", "ip", "key", "loop", "node_id",
        "registered", "rx_time", "session_id", "state", "topics", "topics_allowed",
    )

    def __init__(self, hub: HubNode, conn: Connection) -> None:
        self.hub = hub
        self.conn = conn
        self.loop = hub.loop
        self.state = HELLO
        self.ip = conn.ip
        self.node_id = ""
        self.session_id = ""
        self.registered = False
        self.key: bytes | None = None
        self.topics_allowed: tuple[str, ...] | None = None
        self.topics: dict[str, _Recovery | None] = {}
        self.rx_time = self.loop.time()  # when the frames being handled were read
        # Made when needed (the replay at welcome, a QoS 1 message, a resync) and dropped
        # when it has nothing to remember: idle sessions stay small.
        self.inbox: Inbox | None = None
        self._handshake: ServerHandshake | None = None
        self._hello_timer: asyncio.TimerHandle | None = None
        self._bucket = TokenBucket(hub.cfg.limits.msgs_per_s, hub.cfg.limits.burst, self.rx_time)
        self._refused = 0
        self._refused_since = 0.0
        self._inflight = 0
        self._inflight_bytes = 0
        self._read_paused = False
        self._tasks: set[asyncio.Task[Any]] | None = None  # made by the first spawn
        self._q1_tail: asyncio.Future[Any] | None = None
        self._q1_batch: list[Q1Send] | None = None  # this read's QoS 1 sends
        self._ctl: deque[Callable[[], Coroutine[Any, Any, None]]] | None = None
        self._ctl_task: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        return self.state is ACTIVE

    def push(self, frame: bytes) -> None:
        """Queue one frame for the node (hub/transport.py; routing's hot paths call
        `session.conn.push` directly)."""
        self.conn.push(frame)

    @property
    def handshake(self) -> ServerHandshake:
        assert self._handshake is not None
        return self._handshake

    def start(self) -> None:
        """The WebSocket is open: send the challenge; the hello timeout counts from
        now (docs/protocol.md §2)."""
        self._handshake = self.hub.new_handshake()
        self.push(self._handshake.challenge())
        self.conn.flush()
        self._hello_timer = self.loop.call_later(self.hub.cfg.auth.hello_timeout_s,
                                                 self._hello_timeout)

    def _hello_timeout(self) -> None:
        self._hello_timer = None
        if self.state is HELLO:
            self.hub.metrics.handshakes["timeout"] += 1
            self.close(E.CLOSE_HELLO_TIMEOUT, "hello timeout")

    # -- replies and closing ------------------------------------------------------------

    def reply_error(self, fid: int | str | None, code: str, msg: str) -> None:
        self.hub.metrics.frames_out["error"] += 1
        self.hub.metrics.error_frames[code] += 1
        self.push(encode_error(fid, code, msg))

    def reply_ok(self, fid: int | str | None, **fields: Any) -> None:
        if fid is not None:
            self.hub.metrics.frames_out["ok"] += 1
            self.push(encode_ok(fid, **fields))

    def close(self, code: int, reason: str, *, bye: bytes | None = None,
              error: bytes | None = None) -> None:
        """End the session: optional `error`/`bye` frame after what is queued, then the
        close frame (hub/transport.py)."""
        self.conn.close(code, reason, tuple(f for f in (error, bye) if f is not None))

    def closing(self) -> None:
        """The connection is closing: leave the registry (routing and presence stop at
        once) and handle nothing more."""
        if self.state is ACTIVE:  # one info line per session (hub/admission.py)
            self.hub.admission.disconnected(self)
        self.state = CLOSED
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        if self.registered:
            self.registered = False
            self.hub.detach(self)

    def connection_lost(self) -> None:
        self.closing()
        for task in self._tasks or ():
            task.cancel()
        if self._ctl_task is not None:
            self._ctl_task.cancel()

    def has_room(self) -> bool:
        return self.conn.has_room()

    async def wait_room(self) -> bool:
        return await self.conn.wait_room()

    def pending_tasks(self) -> list[asyncio.Task[Any]]:
        """What this session has in flight (a graceful shutdown waits for it)."""
        return [t for t in self._tasks or () if not t.done()]

    # -- inbound ------------------------------------------------------------------------

    def on_message(self, data: bytes) -> None:
        """One WebSocket message from the node."""
        if self.state is ACTIVE:
            try:
                frames = decode_client(data, self.hub.decode_limits)
            except DecodeError as exc:
                self.close(E.CLOSE_UNDECODABLE, str(exc))  # §1: 1007
                return
            self._handle_frames(frames)
        elif self.state is HELLO:
            self._on_hello_message(data)
        elif self.state is AUTH:
            try:  # §1: undecodable is 1007 here too; §4: the refusal carries the id
                frames = decode_client(data, self.hub.decode_limits)
            except DecodeError as exc:
                self.close(E.CLOSE_UNDECODABLE, str(exc))
                return
            self._not_authenticated(getattr(frames[0], "id", None) if frames else None)

    def _not_authenticated(self, fid: int | str | None) -> None:
        """§2: any frame but hello before welcome (also one sent after the hello while
        it is being checked) is refused with not_authenticated and close 4001."""
        self.hub.metrics.handshakes["not_authenticated"] += 1
        self.close(E.CLOSE_AUTH_FAILED, "not authenticated",
                   error=encode_error(fid, E.NOT_AUTHENTICATED, "hello expected"))

    def _on_hello_message(self, data: bytes) -> None:
        try:
            frames = decode_client(data, self.hub.decode_limits)
        except DecodeError as exc:
            self.close(E.CLOSE_UNDECODABLE, str(exc))
            return
        first = frames[0] if frames else None
        admission = self.hub.admission
        if type(first) is Hello:
            hello = first
        elif type(first) is FrameError and _is_hello(data):
            admission.refuse_hello(self, first, data)
            return
        else:
            self._not_authenticated(getattr(first, "id", None))
            return
        if len(frames) > 1:  # a batch [hello, ...]: the rest would come before welcome
            self._not_authenticated(getattr(frames[1], "id", None))
            return
        self.state = AUTH
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        tracing = self.hub.tracing
        if tracing is None:
            self.spawn(admission.authenticate(self, hello))
        else:  # a `handshake` span around it, its store and broker calls inside
            self.spawn(tracing.handshake(self, hello, admission.authenticate(self, hello)))

    def register(self, node_id: str, session_id: str) -> None:
        """Admission made this session routable (still before welcome): frames for it
        queue up behind the welcome, live QoS 1 is held until the queue is replayed."""
        self.node_id = node_id
        self.session_id = session_id
        self.registered = True
        self.get_inbox().hold_live()

    def get_inbox(self) -> Inbox:
        """The session's QoS 1 inbox, made if it has none."""
        inbox = self.inbox
        if inbox is None:
            hub = self.hub
            # With tracing on, each QoS 1 write is a `deliver` span (hub/tracing.py).
            sink = self if hub.tracing is None else hub.tracing.sink(self)
            inbox = self.inbox = Inbox(
                self.node_id, hub.store, sink, hub.metrics.frames_out,
                max_unacked=hub.max_unacked, max_backlog=hub.send_queue_max,
                max_backlog_bytes=hub.cfg.limits.send_queue_max_bytes)
        return inbox

    def drop_idle_inbox(self, _task: Any = None) -> None:
        """Forget the inbox once it has nothing to remember (usable as a done callback)."""
        inbox = self.inbox
        if inbox is not None and inbox.idle:
            self.inbox = None

    async def replay_queue(self) -> None:
        """§5: the stored QoS 1 queue, then live delivery (at welcome)."""
        try:
            await self.get_inbox().replay()
        finally:
            self.drop_idle_inbox()

    def activate(self, auth: Authenticated, welcome: bytes) -> None:
        """The node is accepted: the welcome goes out before anything routed to the
        session while it was being checked."""
        self.key = auth.key
        self.topics_allowed = auth.topics
        self.conn.batch_out = auth.batch
        self._handshake = None
        self.conn.push_front(welcome)
        self.state = ACTIVE

    def _handle_frames(self, frames: list[Any]) -> None:
        hub = self.hub
        frames_in = hub.metrics.frames_in
        now = self.loop.time()
        self.rx_time = now
        bucket = self._bucket
        tracing = hub.tracing  # hub/tracing.py, None when off: a check, no call, per frame
        for f in frames:
            if self.state is not ACTIVE:
                return
            t = type(f)
            if t is Ack:
                frames_in["ack"] += 1
                self._on_ack(f)
                continue
            if not bucket.take(now):
                self._rate_refused(f, now)
                continue
            if t is Send:
                frames_in["send"] += 1
                if tracing is None or f.meta is None:
                    self._on_send(f)
                else:  # docs/protocol.md §13: continue the node's trace
                    tracing.on_send(self, f)
            elif t is Pub:
                frames_in["pub"] += 1
                if tracing is None or f.meta is None:
                    self._on_pub(f)
                else:
                    tracing.on_pub(self, f)
            elif t is FrameError:
                frames_in["invalid"] += 1
                self.reply_error(f.id, f.code, f.msg)
            elif t is Sub:
                frames_in["sub"] += 1
                self._control(partial(self._sub, f))
            elif t is Unsub:
                frames_in["unsub"] += 1
                self._control(partial(self._unsub, f))
            elif t is Presence:
                frames_in["presence"] += 1
                self._control(partial(self._presence, f))
            elif t is Watch:  # §6.1, hub/presence_watch.py
                frames_in["watch"] += 1
                self._control(partial(hub.presence_watch.watch, self, f))
            elif t is Unwatch:
                frames_in["unwatch"] += 1
                self._control(partial(hub.presence_watch.unwatch, self, f))
            elif t is History:  # §5.2
                frames_in["history"] += 1
                self._control(partial(self._history, f))
            else:  # Hello after welcome
                frames_in["hello"] += 1
                self.reply_error(f.id, E.BAD_FRAME, "already authenticated")

    def _rate_refused(self, f: Any, now: float) -> None:
        self.hub.metrics.rate_limited += 1
        if now - self._refused_since >= 1.0:
            self._refused_since = now
            self._refused = 0
        self._refused += 1
        if self._refused > 10 * self.hub.cfg.limits.msgs_per_s:
            self.close(E.CLOSE_POLICY, "rate limit abuse")  # §8
            return
        self.reply_error(getattr(f, "id", None), E.RATE_LIMITED, "rate limit exceeded")

    # -- async work, bounded ------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any], nbytes: int = 0,
              ops: int = 1) -> asyncio.Task[Any]:
        """Run `coro` as this session's task; `nbytes`: the bodies it holds, `ops`: the
        operations it carries (messages of a batch)."""
        task = self.loop.create_task(coro)
        tasks = self._tasks
        if tasks is None:
            tasks = self._tasks = set()
        tasks.add(task)
        self._work_added(nbytes, ops)
        task.add_done_callback(partial(self._task_done, nbytes, ops) if nbytes or ops != 1
                               else self._task_done0)
        return task

    def _work_added(self, nbytes: int = 0, ops: int = 1) -> None:
        """Count async operations (a task, a queued control frame, the messages of a
        batch) and the bodies they hold; past MAX_INFLIGHT or MAX_INFLIGHT_BYTES the
        socket stops being read, so a client cannot grow them without bound."""
        self._inflight += ops
        self._inflight_bytes += nbytes
        if not self._read_paused and (self._inflight >= MAX_INFLIGHT
                                      or self._inflight_bytes >= MAX_INFLIGHT_BYTES):
            self._read_paused = True
            self.conn.pause_reading()

    def _work_done(self, nbytes: int = 0, ops: int = 1) -> None:
        self._inflight -= ops
        self._inflight_bytes -= nbytes
        if (self._read_paused and self._inflight <= RESUME_INFLIGHT
                and self._inflight_bytes <= MAX_INFLIGHT_BYTES // 2):
            self._read_paused = False
            self.conn.resume_reading()

    def _task_done0(self, task: asyncio.Task[Any]) -> None:
        self._task_done(0, 1, task)

    def _task_done(self, nbytes: int, ops: int, task: asyncio.Task[Any]) -> None:
        tasks = self._tasks
        if tasks is not None:
            tasks.discard(task)
            if not tasks:
                self._tasks = None  # an idle session holds no empty set (216 bytes)
        self._work_done(nbytes, ops)
        if not task.cancelled():
            exc = task.exception()
            if exc is not None:
                log.error("session task failed", exc_info=exc,
                          extra={"event": "session_task_failed", "node": self.node_id})

    def _control(self, op: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """sub, unsub and presence run one at a time, in the order received."""
        if self._ctl is None:
            self._ctl = deque()
        self._ctl.append(op)
        self._work_added()
        if self._ctl_task is None:
            self._ctl_task = self.spawn(self._run_control())

    async def _run_control(self) -> None:
        try:
            ctl = self._ctl
            while ctl and self.state is ACTIVE:
                op = ctl.popleft()
                try:
                    await op()
                finally:
                    self._work_done()
        finally:
            self._ctl_task = None

    # -- direct messages (§5) -----------------------------------------------------------

    def _on_send(self, f: Send) -> None:
        hub = self.hub
        if f.ttl is not None and f.ttl > hub.message_ttl_s:
            self.reply_error(f.id, E.BAD_FRAME, f"ttl: must be 1..{hub.message_ttl_s}")
            return
        if hub.verify_body_sig:
            key = self.key
            if key is None:
                self.reply_error(f.id, E.FORBIDDEN, "sig: this node has no key to verify")
                return
            if f.sig is None or not verify_signature(key, body_message(f.to, f.body), f.sig):
                self.reply_error(f.id, E.FORBIDDEN, "sig: does not verify")
                return
        ts = time.time_ns() // 1_000_000
        mid = hub.mid(ts)
        if f.qos == 0:
            frame = direct_msg(mid, self.node_id, f.body, ts, 0, f.sig, f.meta)
            tail = self._q1_tail
            if tail is not None and not tail.done():
                # §5 order: a QoS 0 message waits for earlier QoS 1 ones to be routed,
                # so that all messages of one sender keep their order. The chain link is
                # done only once this message is routed (a later QoS 1 waits). It holds
                # its body meanwhile: counted in flight, like a task.
                done: asyncio.Future[None] = self.loop.create_future()
                nbytes = len(f.body)
                self._work_added(nbytes)

                def route(_t: Any, f: Send = f, mid: str = mid, frame: bytes = frame,
                          done: asyncio.Future[None] = done) -> None:
                    try:
                        if self.state is ACTIVE:
                            hub.route0(self, f, mid, frame)
                    finally:
                        done.set_result(None)
                        self._work_done(nbytes)

                tail.add_done_callback(route)
                self._q1_tail = done
            else:
                hub.route0(self, f, mid, frame)
            return
        routed: asyncio.Future[None] = self.loop.create_future()
        item: Q1Send = (f, mid, ts, self._q1_tail, routed)
        self._q1_tail = routed
        if f.meta is not None and hub.tracing is not None:
            # A task of its own: the trace context of a traced send (§13) is its task's.
            self.spawn(hub.send_q1(self, [item]), len(f.body))
            return
        batch = self._q1_batch
        if batch is None:
            batch = self._q1_batch = []
            # Runs once this read is handled (the loop's next callbacks): nothing to do
            # per read for reads without QoS 1 sends.
            self.loop.call_soon(self.flush_q1)
        batch.append(item)  # stored with the read's others (flush_q1)

    def flush_q1(self) -> None:
        """The QoS 1 sends of a read, all read: one task and one store call for them
        (they share a group commit anyway), each counted in flight with its body."""
        batch = self._q1_batch
        self._q1_batch = None
        if not batch:
            return
        if self.state is not ACTIVE:  # closed meanwhile: none was accepted
            for item in batch:
                item[4].set_result(None)
            return
        self.spawn(self.hub.send_q1(self, batch), sum(len(item[0].body) for item in batch),
                   ops=len(batch))

    def push_q1(self, mid: str, frame: bytes) -> None:
        """A live QoS 1 message for this session (already stored)."""
        if self.state is not CLOSED:
            self.get_inbox().live(mid, frame)

    def _on_ack(self, f: Ack) -> None:
        inbox = self.inbox
        if inbox is not None:
            inbox.acked(f.mids)
            if inbox.idle:
                self.inbox = None
        tracing = self.hub.tracing
        if tracing is None:
            self.spawn(self.hub.ack(self, f.mids, f.id))
        else:  # an `ack` span per traced mid, child of its delivery (hub/tracing.py)
            self.spawn(tracing.ack(f.mids, self.hub.ack(self, f.mids, f.id)))

    # -- topics (§6) --------------------------------------------------------------------

    def _on_pub(self, f: Pub) -> None:
        if not topic_allowed(self.topics_allowed, f.topic):
            self.reply_error(f.id, E.FORBIDDEN, "topic not allowed by token")
            return
        if self.hub.verify_body_sig:  # §5.1: checked as for send (§4)
            key = self.key
            if key is None:
                self.reply_error(f.id, E.FORBIDDEN, "sig: this node has no key to verify")
                return
            if f.sig is None or not verify_signature(key, topic_message(f.topic, f.body),
                                                     f.sig):
                self.reply_error(f.id, E.FORBIDDEN, "sig: does not verify")
                return
        self.spawn(self.hub.publish(self, f.id, f.topic, f.body, sig=f.sig, meta=f.meta),
                   len(f.body))

    def push_topic(self, topic: str, seq: int, frame: bytes) -> None:
        rec = self.topics.get(topic)
        if rec is None:
            self.conn.push(frame)
            return
        rec.items.append((seq, frame))
        rec.nbytes += len(frame)
        conn = self.conn
        # §8: what is held counts with what is queued, in frames and in bytes.
        if (len(rec.items) > conn.max_frames
                or rec.nbytes + conn.out_bytes > conn.max_bytes):
            conn.slow_consumer()

    async def _sub(self, f: Sub) -> None:
        hub = self.hub
        topic = f.topic
        if not topic_allowed(self.topics_allowed, topic):
            self.reply_error(f.id, E.FORBIDDEN, "topic not allowed by token")
            return
        held = topic in self.topics
        if not held and len(self.topics) >= hub.cfg.limits.max_topics:
            self.reply_error(f.id, E.LIMIT_EXCEEDED,
                             f"at most {hub.cfg.limits.max_topics} subscriptions")
            return
        rec = _Recovery()
        self.topics[topic] = rec  # live messages are held from now on
        pending = None if held else hub.subscribe(self, topic)
        try:
            if pending is not None:
                try:
                    await asyncio.shield(pending)
                except Exception:
                    # Broker down: local subscribers still get local publications; the
                    # broker subscribes the topic when it is back.
                    pass
            entries = [] if f.since is None else await hub.history_since(topic, f.since)
            seq = await hub.topic_seq(topic)
            # Where the topic's cursor starts on this instance, if this is its first
            # subscription (hub/topic_order.py): after the unbroken run of history this
            # `sub` read, so that what is still being stored (a hole in that run, or
            # after it) comes live, in order; a plain `sub` wants what comes after `seq`.
            if f.since is not None and hub.cfg.store.topic_history > 0:
                run = entries[0].seq - 1 if entries else f.since
                for e in entries:
                    if e.seq != run + 1:
                        break
                    run = e.seq
                hub.topic_baseline(topic, min(seq, max(f.since, run)))
            else:
                hub.topic_baseline(topic, seq)
        except Exception:
            if not held:
                self.topics.pop(topic, None)
                hub.unsubscribe(self, topic)
            else:
                self._go_live(topic, rec, 0)
            self.reply_error(f.id, E.UNAVAILABLE, "history unavailable")
            return
        if self.state is not ACTIVE or self.topics.get(topic) is not rec:
            return
        if f.since is None:
            self.reply_ok(f.id, seq=seq)
            self._go_live(topic, rec, seq)  # what comes after the `seq` of the ok
            return
        since = f.since
        if entries:
            first = entries[0].seq
        elif rec.items:
            first = rec.items[0][0]
        else:
            first = seq + 1
        recovered = seq <= since or first <= since + 1
        self.reply_ok(f.id, seq=seq, recovered=recovered)
        # One ordered stream (§6): history below the topic's cursor (a hole there is for
        # good: the cursor hands out nothing it skipped) merged with what the cursor
        # handed out since `rec` was set; what history holds at or past the cursor comes
        # through the cursor, in order, with whatever is still being stored elsewhere.
        cursor = hub.topic_cursor(topic)
        me = self.node_id
        merged: dict[int, bytes] = {}
        for e in entries:
            if e.seq < cursor and e.sender != me:  # §6: never one's own publication
                merged[e.seq] = topic_msg_of(e)
        live = rec.items
        rec.items = [(s, fr) for s, fr in live if s >= cursor]
        rec.nbytes = sum(len(fr) for _, fr in rec.items)
        for s, fr in live:
            if since < s < cursor:
                merged[s] = fr
        last = since
        conn = self.conn
        for s in sorted(merged):
            if not conn.has_room() and not await conn.wait_room():
                return
            if self.topics.get(topic) is not rec:
                return  # unsubscribed meanwhile (cannot be: control runs in order)
            self.push(merged[s])
            last = s
        hub.metrics.frames_out["msg"] += len(merged)
        self._go_live(topic, rec, max(last, cursor - 1))

    def _go_live(self, topic: str, rec: _Recovery, last: int) -> None:
        for seq, frame in rec.items:
            if seq > last:
                self.push(frame)
        self.topics[topic] = None

    async def _unsub(self, f: Unsub) -> None:
        if self.topics.pop(f.topic, 0) != 0:
            self.hub.unsubscribe(self, f.topic)
        self.reply_ok(f.id)

    # -- presence (§7) ------------------------------------------------------------------

    async def _presence(self, f: Presence) -> None:
        try:
            online = await self.hub.presence(f.nodes)
        except Exception:
            self.reply_error(f.id, E.UNAVAILABLE, "presence unavailable")
            return
        self.reply_ok(f.id, online=online)

    # -- history (§5.2) -----------------------------------------------------------------

    async def _history(self, f: History) -> None:
        if not topic_allowed(self.topics_allowed, f.topic):
            self.reply_error(f.id, E.FORBIDDEN, "topic not allowed by token")
            return
        reply = await self.hub.history(f)
        if reply is None:
            self.reply_error(f.id, E.UNAVAILABLE, "history unavailable")
            return
        self.hub.metrics.frames_out["ok"] += 1
        self.push(reply)


def _is_hello(data: bytes) -> bool:
    """Whether a message that failed validation was meant as a hello (a refused hello
    is auth_failed; any other frame before welcome is not_authenticated)."""
    import msgpack

    try:
        v = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:
        return False
    if type(v) is list and v:
        v = v[0]
    return type(v) is dict and v.get("t") == "hello"
