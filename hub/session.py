"""One node connection: the WebSocket transport adapter and the session state machine.

`Session` is an `asyncio.Protocol` driving websockets' sans-I/O `ServerProtocol`
(PERF-NOTES.md: one write per frame is what makes the asyncio API slow). Frames bound
for a session during one event-loop iteration are queued in `_out` and written with
one `transport.write` by `_flush`, scheduled once per iteration. The queue is bounded by
`limits.send_queue_max`; past it the session is closed as a slow consumer (§7).

Inbound, every message is decoded once (`protocol.frames.decode_client`), rate limited
and handled: QoS 0 sends and topic fan-out are synchronous; what needs the store or the
broker runs as a task, with the number in flight bounded (reading pauses past it).
Routing beyond this session always goes through `HubNode` (hub/node.py).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from websockets.frames import Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol
from websockets.speedups import apply_mask

from hub.ratelimit import TokenBucket
from persistence.store import QueueFull, StoredMessage, StoreError, StoreUnavailable
from protocol import errors as E
from protocol.errors import DecodeError, FrameError
from protocol.frames import (
    Ack,
    Hello,
    Presence,
    Pub,
    Send,
    Sub,
    Unsub,
    batch_of,
    decode_client,
    encode_bye,
    encode_error,
    encode_msg,
    encode_ok,
    encode_topic_msg,
)
from protocol.identity import body_message, verify_signature
from protocol.tokens import topic_allowed

if TYPE_CHECKING:
    from hub.node import HubNode
    from protocol.handshake import Authenticated

__all__ = ["Session"]

log = logging.getLogger("openred.hub.session")
_ws_log = logging.getLogger("openred.hub.ws")
_ws_log.setLevel(logging.WARNING)  # websockets logs every open/close at info

HTTP, HELLO, AUTH, ACTIVE, CLOSING, CLOSED = range(6)
WS_PATH = "/v1/ws"
REPLAY_RETRY_S = 0.1  # first wait before a replay page is read again (store unavailable)
REPLAY_RETRY_MAX_S = 2.0
MAX_INFLIGHT = 1024  # async operations per session before reading pauses
RESUME_INFLIGHT = 512
CLOSE_GRACE_S = 2.0  # how long a closing peer may take before the socket is aborted
BACKLOG_PAGE = 500
_BIN = Opcode.BINARY
_TEXT = Opcode.TEXT
_CONT = Opcode.CONT


def _ws_header(n: int) -> bytes:
    """Header of an unmasked final binary frame (server to client, RFC 6455 §5.2)."""
    if n < 126:
        return bytes((0x82, n))
    if n < 65536:
        return b"\x82\x7e" + n.to_bytes(2, "big")
    return b"\x82\x7f" + n.to_bytes(8, "big")


class _Recovery:
    """Live topic messages held back while a `sub` reads history (§5: no gap, no dup)."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[tuple[int, bytes]] = []


class Session(asyncio.Protocol):
    # Slots: thousands of idle sessions per process, each without an instance dict.
    __slots__ = (
        "_acked_in_replay", "_backlog", "_backlog_overflow", "_bucket", "_close_sent",
        "_close_timer", "_ctl", "_ctl_task", "_drained", "_fast", "_flush_scheduled",
        "_flushes", "_frag", "_frag_size", "_handshake", "_hello_timer", "_inflight", "_out",
        "_q1_tail", "_rbuf", "_read_paused", "_refused", "_refused_since", "_replay_again",
        "_replaying", "_tasks", "_unacked", "_unacked_lost", "_write_paused",
        "batch_out", "hub", "ip", "key", "last_ping", "last_rx", "loop",
        "node_id", "registered", "rx_time", "session_id", "state", "topics",
        "topics_allowed",
        "transport", "ws",
    )

    def __init__(self, hub: HubNode) -> None:
        self.hub = hub
        cfg = hub.cfg
        # The sans-I/O protocol object does the HTTP upgrade; in fast mode it is
        # dropped right after (so the attribute is typed Any rather than Optional).
        self.ws: Any = ServerProtocol(
            max_size=cfg.limits.max_frame_bytes,
            extensions=hub.ws_extensions,
            logger=_ws_log,
        )
        self.loop = hub.loop
        self.transport: asyncio.Transport | None = None
        self.state = HTTP
        self.ip = "?"
        self.node_id = ""
        self.session_id = ""
        self.registered = False
        self.key: bytes | None = None
        self.topics_allowed: tuple[str, ...] | None = None
        self.batch_out = False
        self.topics: dict[str, _Recovery | None] = {}
        self.last_rx = self.loop.time()
        self.last_ping = self.last_rx
        self.rx_time = self.last_rx  # when the frames being handled were read
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._write_paused = False
        self._read_paused = False
        self._drained: asyncio.Event | None = None
        self._frag: list[bytes] | None = None
        self._handshake: Any = None
        self._hello_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._bucket = TokenBucket(cfg.limits.msgs_per_s, cfg.limits.burst, self.last_rx)
        self._refused = 0
        self._refused_since = 0.0
        self._inflight = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._q1_tail: asyncio.Future[Any] | None = None
        self._ctl: deque[Callable[[], Coroutine[Any, Any, None]]] | None = None
        self._ctl_task: asyncio.Task[None] | None = None
        self._backlog: dict[str, bytes] | None = None  # QoS 1 held while the queue replays
        self._backlog_overflow = False
        # QoS 1 mids written to this session and not acked by it: a resync (HubNode.resync)
        # must not write them again. Created on the first QoS 1 message (idle sessions
        # stay small); None with `_unacked_lost` once it outgrew what a queue can hold.
        self._unacked: set[str] | None = None
        self._unacked_lost = False
        self._acked_in_replay: set[str] | None = None  # see _on_ack
        self._replaying = False  # a replay of the stored queue is queued or running
        self._replay_again = False  # ... and one more pass is wanted after it
        self._flushes = 0
        # After the upgrade, frames are parsed here rather than by the protocol object
        # (PERF-NOTES: websockets' generator-based Frame.parse is the largest cost of a
        # relay). permessage-deflate sessions keep the protocol object's parser.
        self._fast = hub.ws_extensions is None
        self._rbuf = bytearray()
        self._frag_size = 0
        self._close_sent = False

    # -- transport callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        t = cast(asyncio.Transport, transport)
        self.transport = t
        peer = t.get_extra_info("peername")
        if peer:
            self.ip = str(peer[0])
        t.set_write_buffer_limits(high=256 * 1024)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:  # small frames must not wait for the peer's delayed ACK (Nagle)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.hub.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.last_rx = self.loop.time()
        if self._fast and self.state != HTTP:
            self._read_frames(data)
            return
        ws = self.ws
        ws.receive_data(data)
        events = ws.events_received()
        if events:
            self._events(events)
        self._write_ws()

    def eof_received(self) -> bool | None:
        if not (self._fast and self.state != HTTP):
            self.ws.receive_eof()
            self._write_ws()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._detach()
        self.state = CLOSED
        self.hub.connection_closed(self)
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        if self._close_timer is not None:
            self._close_timer.cancel()
        for task in self._tasks:
            task.cancel()
        if self._ctl_task is not None:
            self._ctl_task.cancel()
        self._out.clear()
        if self._drained is not None:
            self._drained.set()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._out:
            self._flush()

    # -- websocket layer ----------------------------------------------------------

    def _write_ws(self) -> None:
        """Write what the sans-I/O protocol produced (handshake, pongs, close frames)."""
        transport = self.transport
        if transport is None or self.ws is None:
            return
        for data in self.ws.data_to_send():
            if data:
                if not transport.is_closing():
                    transport.write(data)
            else:  # SEND_EOF: the server closes the TCP connection (RFC 6455 §7.1.1)
                transport.close()

    def _events(self, events: list[Any]) -> None:
        for ev in events:
            if self.state >= CLOSING:
                return
            if type(ev) is Request:
                self._on_request(ev)
                continue
            op = ev.opcode
            if op is _BIN:
                if ev.fin:
                    self._on_message(ev.data)
                else:
                    self._frag = [ev.data]
            elif op is _CONT:
                if self._frag is None:  # continuation of a text message (already closing)
                    continue
                self._frag.append(ev.data)
                if ev.fin:
                    data = b"".join(self._frag)
                    self._frag = None
                    self._on_message(data)
            elif op is _TEXT:
                self._close(E.CLOSE_UNSUPPORTED_DATA, "text message")  # §1
            # PING is answered by the protocol object; PONG only refreshes last_rx.

    def _on_request(self, request: Request) -> None:
        ws = self.ws
        hub = self.hub
        path = request.path.split("?", 1)[0]
        if path != WS_PATH:
            ws.send_response(ws.reject(404, "Not Found\n"))
            return
        if hub.trusted_proxies:
            # Behind a trusted proxy the peer is the proxy: limit and audit the client
            # it names (hub/forwarded.py), never a header from anyone else.
            self.ip = hub.trusted_proxies.client_ip(
                self.ip, request.headers.get_all("X-Forwarded-For"))
        if not hub.ip_limiter.allow(self.ip, self.loop.time()):
            hub.metrics.handshakes["rate_limited"] += 1
            ws.send_response(ws.reject(429, "Too Many Requests\n"))
            return
        response = ws.accept(request)
        ws.send_response(response)
        if response.status_code != 101:
            return
        self.state = HELLO
        self._handshake = hub.new_handshake()
        self._write_ws()
        if self._fast:
            # Bytes that followed the request in the same read are frames: take them.
            reader_buf = ws.reader.buffer
            self._rbuf = bytearray(reader_buf)
            reader_buf.clear()
            self.ws = None  # not needed any more: frees its parser and buffers
        self._write_now(self._handshake.challenge())
        self._hello_timer = self.loop.call_later(hub.cfg.auth.hello_timeout_s,
                                                 self._hello_timeout)

    def _hello_timeout(self) -> None:
        self._hello_timer = None
        if self.state == HELLO:
            self.hub.metrics.handshakes["timeout"] += 1
            self._close(E.CLOSE_HELLO_TIMEOUT, "hello timeout")

    # -- outgoing -----------------------------------------------------------------

    def push(self, frame: bytes) -> None:
        """Queue one encoded frame; written with the others at the end of this loop
        iteration. Never blocks; a full queue closes the session as a slow consumer."""
        if self.state >= CLOSING:
            return  # RFC 6455 §5.5.1: no data frame after the close frame
        out = self._out
        out.append(frame)
        if len(out) > self.hub.send_queue_max and self._write_paused:
            # §7: only a socket that does not drain makes a slow consumer; what one loop
            # iteration queues for a writable socket is written at its end.
            if self.state == ACTIVE:
                self._slow_consumer()
            return
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.hub.mark_dirty(self)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if not out or self._write_paused or self.transport is None:
            return
        self._out = []
        self._flushes += 1
        if self._flushes & 31 == 0:
            self.hub.metrics.send_queue_frames.observe(len(out))
        self._write_frames(out)
        if self._drained is not None:
            self._drained.set()

    def _write_frames(self, frames: list[bytes]) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.batch_out and len(frames) > 1:
            frames = self._batches(frames)
        if self.hub.ws_extensions:  # permessage-deflate: frames go through the protocol
            for f in frames:
                self.ws.send_binary(f)
            self._write_ws()
            return
        parts: list[bytes] = []
        for f in frames:
            parts.append(_ws_header(len(f)))
            parts.append(f)
        transport.write(b"".join(parts))

    def _batches(self, frames: list[bytes]) -> list[bytes]:
        limit = self.hub.cfg.limits.max_frame_bytes - 5  # room for the array header
        out: list[bytes] = []
        group: list[bytes] = []
        size = 0
        for f in frames:
            if group and size + len(f) > limit:
                out.append(batch_of(group) if len(group) > 1 else group[0])
                group, size = [], 0
            group.append(f)
            size += len(f)
        if group:
            out.append(batch_of(group) if len(group) > 1 else group[0])
        return out

    def _write_now(self, frame: bytes) -> None:
        self._out.append(frame)
        self._flush()

    def reply_error(self, fid: int | str | None, code: str, msg: str) -> None:
        self.hub.metrics.frames_out["error"] += 1
        self.push(encode_error(fid, code, msg))

    def reply_ok(self, fid: int | str | None, **fields: Any) -> None:
        if fid is not None:
            self.hub.metrics.frames_out["ok"] += 1
            self.push(encode_ok(fid, **fields))

    # -- closing ----------------------------------------------------------------------

    def close(self, code: int, reason: str, *, bye: bytes | None = None,
              error: bytes | None = None) -> None:
        """End the session: optional `error`/`bye` frame, then the close frame. Queued
        frames go out first; the socket is aborted if the peer does not finish the
        closing handshake in time."""
        self._close(code, reason, bye=bye, error=error)

    def _close(self, code: int, reason: str, *, bye: bytes | None = None,
               error: bytes | None = None) -> None:
        if self.state >= CLOSING:
            return
        was_open = self.state != HTTP
        self._detach()
        self.state = CLOSING
        if error is not None:
            self._out.append(error)
        if bye is not None:
            self._out.append(bye)
        if self._out and not self._write_paused:
            out, self._out = self._out, []
            self._write_frames(out)
        self._out = []
        if was_open:
            self._send_close(code, reason)
        if self.transport is not None:
            self._close_timer = self.loop.call_later(CLOSE_GRACE_S, self.transport.abort)

    def _send_close(self, code: int, reason: str) -> None:
        if self._close_sent:
            return
        self._close_sent = True
        if not self._fast:
            try:
                self.ws.send_close(code, reason)
            except Exception:  # the protocol may already be closing (peer's close frame)
                pass
            self._write_ws()
            return
        payload = code.to_bytes(2, "big") + reason.encode()[:123]
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(bytes((0x88, len(payload))) + payload)

    def send_ping(self) -> None:
        if self._fast:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(b"\x89\x00")
            return
        try:
            self.ws.send_ping(b"")
        except Exception:
            return
        self._write_ws()

    def _read_frames(self, data: bytes) -> None:
        """RFC 6455 §5.2 framing of client messages (masked), after the upgrade."""
        buf = self._rbuf
        if buf:
            buf += data
        else:
            buf = bytearray(data)
        n = len(buf)
        pos = 0
        max_size = self.hub.cfg.limits.max_frame_bytes
        while n - pos >= 2 and self.state < CLOSED:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            if b0 & 0x70:
                self._fail(1002, "reserved bits set")
                return
            if not b1 & 0x80:
                self._fail(1002, "unmasked client frame")
                return
            length = b1 & 0x7F
            if length < 126:
                head = 6
            elif length == 126:
                if n - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 8
            else:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 10], "big")
                head = 14
            op = b0 & 0x0F
            if op >= 8:
                if length > 125 or not b0 & 0x80:
                    self._fail(1002, "bad control frame")
                    return
            elif length + self._frag_size > max_size:
                self._fail(E.CLOSE_TOO_BIG, "message too big")  # §1: 1009
                return
            end = pos + head + length
            if end > n:
                break
            mask = bytes(buf[pos + head - 4:pos + head])
            payload = apply_mask(buf[pos + head:end], mask) if length else b""
            pos = end
            if op == 2:
                if self._frag is not None:
                    self._fail(1002, "expected a continuation frame")
                    return
                if b0 & 0x80:
                    if self.state == ACTIVE:
                        self._handle(payload)
                    elif self.state < CLOSING:
                        self._on_message(payload)
                else:
                    self._frag = [payload]
                    self._frag_size = length
            elif op == 0:
                if self._frag is None:
                    self._fail(1002, "unexpected continuation frame")
                    return
                self._frag.append(payload)
                self._frag_size += length
                if b0 & 0x80:
                    message = b"".join(self._frag)
                    self._frag = None
                    self._frag_size = 0
                    if self.state < CLOSING:
                        self._on_message(message)
            elif op == 1:
                self._close(E.CLOSE_UNSUPPORTED_DATA, "text message")  # §1
            elif op == 9:  # ping: pong with the same data
                if self.transport is not None and not self.transport.is_closing():
                    self.transport.write(bytes((0x8A, length)) + payload)
            elif op == 8:
                self._on_close_frame(payload)
                return
            elif op != 10:
                self._fail(1002, "unknown opcode")
                return
        if pos:
            del buf[:pos]
        self._rbuf = buf

    def _on_close_frame(self, payload: bytes) -> None:
        """The peer's close: answer it (echoing its code) unless we started the close,
        then end the TCP connection (RFC 6455 §5.5.1, §7.1.1)."""
        if not self._close_sent:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1000
            self._detach()
            self.state = CLOSING
            self._send_close(code if code >= 1000 else 1000, "")
        self._rbuf = bytearray()
        if self.transport is not None:
            self.transport.close()

    def _fail(self, code: int, reason: str) -> None:
        self._close(code, reason)
        self._rbuf = bytearray()
        if self.transport is not None:
            self.transport.close()

    def _slow_consumer(self) -> None:
        self.hub.metrics.slow_consumer_disconnects += 1
        self._out.clear()
        # The bye cannot jump a full socket buffer; it is written when there is room.
        self._write_paused = False
        self._close(E.CLOSE_SLOW_CONSUMER, "slow consumer", bye=encode_bye("slow_consumer"))

    def _detach(self) -> None:
        """Leave the registry (so routing and presence stop at once) exactly once."""
        if self.registered:
            self.registered = False
            self.hub.detach(self)

    # -- inbound ------------------------------------------------------------------

    def _on_message(self, data: bytes) -> None:
        state = self.state
        if state == ACTIVE:
            self._handle(data)
        elif state == HELLO:
            self._on_hello_message(data)
        elif state == AUTH:
            try:  # §1: undecodable is 1007 here too; §3: the refusal carries the id
                frames = decode_client(data, self.hub.decode_limits)
            except DecodeError as exc:
                self._close(E.CLOSE_UNDECODABLE, str(exc))
                return
            self._not_authenticated(getattr(frames[0], "id", None) if frames else None)

    def _not_authenticated(self, fid: int | str | None) -> None:
        """§2: any frame but hello before welcome (also one sent after the hello while
        it is being checked) is refused with not_authenticated and close 4001."""
        self.hub.metrics.handshakes["not_authenticated"] += 1
        self._close(E.CLOSE_AUTH_FAILED, "not authenticated",
                    error=encode_error(fid, E.NOT_AUTHENTICATED, "hello expected"))

    def _on_hello_message(self, data: bytes) -> None:
        try:
            frames = decode_client(data, self.hub.decode_limits)
        except DecodeError as exc:
            self._close(E.CLOSE_UNDECODABLE, str(exc))
            return
        first = frames[0] if frames else None
        if type(first) is Hello:
            hello = first
        elif type(first) is FrameError and _is_hello(data):
            self.hub.auth_refused(self, first.msg)
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
        self.spawn(self.hub.authenticate(self, hello))

    def register(self, node_id: str, session_id: str) -> None:
        """The hub made this session routable (still before welcome): frames for it
        queue up behind the welcome, live QoS 1 is held until the queue is replayed."""
        self.node_id = node_id
        self.session_id = session_id
        self.registered = True
        self.hold_live_q1()

    def activate(self, auth: Authenticated, welcome: bytes) -> None:
        """Called by the hub when the node is accepted: the welcome goes out before
        anything routed to the session while it was being checked."""
        self.key = auth.key
        self.topics_allowed = auth.topics
        self.batch_out = auth.batch
        self._handshake = None
        self._out.insert(0, welcome)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.hub.mark_dirty(self)
        self.state = ACTIVE

    def _handle(self, data: bytes) -> None:
        try:
            frames = decode_client(data, self.hub.decode_limits)
        except DecodeError as exc:
            self._close(E.CLOSE_UNDECODABLE, str(exc))
            return
        self._handle_frames(frames)

    def _handle_frames(self, frames: list[Any]) -> None:
        hub = self.hub
        frames_in = hub.metrics.frames_in
        now = self.loop.time()
        self.rx_time = now
        bucket = self._bucket
        for f in frames:
            if self.state != ACTIVE:
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
                self._on_send(f)
            elif t is Pub:
                frames_in["pub"] += 1
                self._on_pub(f)
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
            self._close(E.CLOSE_POLICY, "rate limit abuse")  # §7
            return
        self.reply_error(getattr(f, "id", None), E.RATE_LIMITED, "rate limit exceeded")

    # -- async work, bounded -------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        self._work_added()
        task.add_done_callback(self._task_done)
        return task

    def _work_added(self) -> None:
        """Count one async operation (task or queued control frame); past MAX_INFLIGHT
        the socket stops being read, so a client cannot grow them without bound."""
        self._inflight += 1
        if self._inflight >= MAX_INFLIGHT and not self._read_paused and self.transport:
            self._read_paused = True
            self.transport.pause_reading()

    def _work_done(self) -> None:
        self._inflight -= 1
        if self._read_paused and self._inflight <= RESUME_INFLIGHT and self.transport:
            self._read_paused = False
            if self.state < CLOSING:
                self.transport.resume_reading()

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._work_done()
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
            while ctl and self.state == ACTIVE:
                op = ctl.popleft()
                try:
                    await op()
                finally:
                    self._work_done()
        finally:
            self._ctl_task = None

    # -- direct messages (§4) ---------------------------------------------------------

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
            frame = encode_msg(mid, self.node_id, f.body, ts, 0, f.sig)
            tail = self._q1_tail
            if tail is not None and not tail.done():
                # §4 order: a QoS 0 message waits for earlier QoS 1 ones to this hub's
                # store, so that all messages of one sender keep their order. The chain
                # link is done only once this message is routed (a later QoS 1 waits).
                done: asyncio.Future[None] = self.loop.create_future()

                def route(_t: Any, f: Send = f, mid: str = mid, frame: bytes = frame,
                          done: asyncio.Future[None] = done) -> None:
                    try:
                        self._route0(f, mid, frame)
                    finally:
                        done.set_result(None)

                tail.add_done_callback(route)
                self._q1_tail = done
            else:
                self._route0(f, mid, frame)
            return
        self._q1_tail = self.spawn(self._send_q1(f, mid, ts, self._q1_tail))

    def _route0(self, f: Send, mid: str, frame: bytes) -> None:
        if self.state != ACTIVE:
            return
        hub = self.hub
        target = hub.local.get(f.to)
        if target is not None:
            metrics = hub.metrics
            metrics.routed["local"] += 1
            metrics.frames_out["msg"] += 1
            target.push(frame)
            hub.sample_route(self.rx_time)
            if f.id is not None:
                self.reply_ok(f.id, mid=mid, status="sent")
        elif hub.clustered:
            try:
                fut = hub.broker.publish_to_node_nowait(f.to, frame, 0, mid, f.id is not None)
            except Exception:
                if f.id is not None:
                    self.reply_error(f.id, E.UNAVAILABLE, "broker unavailable")
                return
            hub.metrics.routed["remote"] += 1
            if fut is not None:
                fut.add_done_callback(partial(self._remote_result, f.id, mid))
        else:
            hub.metrics.routed["dropped"] += 1
            if f.id is not None:
                self.reply_error(f.id, E.NO_ROUTE, "node is offline")

    def _remote_result(self, fid: int | str | None, mid: str, fut: asyncio.Future[bool]) -> None:
        """§4 QoS 0 across instances: `ok sent` if an instance held the node."""
        if self.state != ACTIVE:
            return
        if fut.cancelled() or fut.exception() is not None:
            self.reply_error(fid, E.UNAVAILABLE, "broker unavailable")
        elif fut.result():
            self.reply_ok(fid, mid=mid, status="sent")
        else:
            self.reply_error(fid, E.NO_ROUTE, "node is offline")

    async def _send_q1(self, f: Send, mid: str, ts: int,
                       prev: asyncio.Future[Any] | None = None) -> None:
        hub = self.hub
        store = hub.store
        try:
            if hub.allowlist:
                rec = await store.get_node(f.to)
                if rec is None or not rec.registered:
                    self.reply_error(f.id, E.NO_ROUTE, "node is not registered")
                    return
            ttl = f.ttl if f.ttl is not None else hub.cfg.store.message_ttl_s
            msg = StoredMessage(mid, self.node_id, f.to, f.body, ts, ts + ttl * 1000, f.sig,
                                f.receipt)
            t0 = time.perf_counter()
            await store.enqueue(msg, hub.cfg.limits.max_pending_per_node)
            hub.metrics.store_write_seconds.observe(time.perf_counter() - t0)
        except QueueFull:
            self.reply_error(f.id, E.QUEUE_FULL, "recipient queue is full")
            return
        except StoreUnavailable:
            self.reply_error(f.id, E.UNAVAILABLE, "store unavailable")
            return
        except StoreError:  # refused for this message alone (e.g. a duplicate mid)
            log.exception("qos 1 store write refused", extra={"event": "store_refused"})
            self.reply_error(f.id, E.INTERNAL, "message not stored")
            return
        self.reply_ok(f.id, mid=mid, status="stored")  # §4: stored before ok
        frame = encode_msg(mid, self.node_id, f.body, ts, 1, f.sig)
        if prev is not None and not prev.done():
            await asyncio.wait((prev,))  # §4 order: this sender's earlier messages first
        await hub.deliver_q1(f.to, mid, frame)

    def push_q1(self, mid: str, frame: bytes) -> None:
        """A live QoS 1 message for this session (already stored)."""
        backlog = self._backlog
        if backlog is not None:
            if len(backlog) >= self.hub.send_queue_max:
                # Too much arrived during the replay: drop the copies; the replay reads
                # them from the store (they are durable) before it ends.
                backlog.clear()
                self._backlog_overflow = True
            elif not self._backlog_overflow:
                backlog[mid] = frame
            return
        if not self._in_flight(mid):
            return  # a resync wrote it already (and may have been overtaken by the broker)
        self.hub.metrics.frames_out["msg"] += 1
        self.push(frame)
        self.hub.store.mark_delivered_nowait([mid], time.time_ns() // 1_000_000)

    def _in_flight(self, mid: str) -> bool:
        """Record that `mid` is being written to this session; False when it already was
        and is not acked: docs/protocol.md §4, the hub does not retransmit within a
        session (a client may take a repeat for a lost ack and process it twice)."""
        unacked = self._unacked
        if unacked is None:
            if self._unacked_lost:
                return True
            unacked = self._unacked = set()
        elif mid in unacked:
            return False
        if len(unacked) >= self.hub.max_unacked:
            # More than the store lets a node have pending (some of these expired
            # unacked, and which ones cannot be told here), or more than is worth the
            # memory: stop tracking and, with it, resyncs of this session
            # (request_resync); its stored messages come at its next session.
            self._unacked = None
            self._unacked_lost = True
            return True
        unacked.add(mid)
        return True

    def hold_live_q1(self) -> None:
        """Hold live QoS 1 messages until `replay_queue` has delivered the stored ones."""
        self._backlog = {}
        self._backlog_overflow = False

    async def replay_queue(self) -> None:
        """§4: deliver stored QoS 1 messages in their original order, then switch to
        live delivery with no gap and no duplicate."""
        self._replaying = True
        await self._replay()

    def request_resync(self) -> bool:
        """The stored queue may hold messages that never reached this session (stored
        while the broker could not bring them): hold live QoS 1 from now on, so that
        they come first (§4 order) when the queue is read again. True when the hub
        should schedule that read (`start_resync`); False when none is needed or one is
        coming anyway."""
        if self.state != ACTIVE or self._unacked_lost:
            return False
        if self._replaying:
            # The replay running now may have read past them already: one more pass.
            self._replay_again = True
            return False
        if self._backlog is None:
            self.hold_live_q1()
        return True

    def start_resync(self) -> asyncio.Task[Any] | None:
        """Read the stored queue again and write what this session has not got in
        flight (its turn in HubNode's bounded resync queue has come)."""
        if self.state != ACTIVE:
            return None
        if self._replaying:
            self._replay_again = True
            return None
        self._replaying = True  # now, not when the task starts: no second pass meanwhile
        return self.spawn(self._replay())

    async def _replay(self) -> None:
        try:
            while True:
                await self._replay_pass()
                if not self._replay_again or self.state != ACTIVE:
                    return
                # Asked for while this pass ran: hold live QoS 1 again before any of it
                # can be written (no await since the pass ended).
                self._replay_again = False
                if self._backlog is None:
                    self.hold_live_q1()
        finally:
            self._replaying = False
            self._replay_again = False
            acked, self._acked_in_replay = self._acked_in_replay, None
            if acked and self._unacked is not None:
                self._unacked.difference_update(acked)

    async def _replay_pass(self) -> None:
        hub = self.hub
        store = hub.store
        if self._backlog is None:
            self._backlog = {}
        after: str | None = None
        # §7: a page never fills the send queue by itself (a backlog larger than
        # send_queue_max is flow controlled, not taken for a slow consumer).
        page_size = max(1, min(BACKLOG_PAGE, hub.send_queue_max // 2))
        delay = REPLAY_RETRY_S
        try:
            while self.state == ACTIVE:
                await self._wait_drained()
                now = time.time_ns() // 1_000_000
                try:
                    page = await store.pending(self.node_id, now, after, page_size)
                except StoreUnavailable:
                    # §4: redelivered until acked, not until the next session. The store
                    # is busy (a reconnect storm) or away: read the page again later,
                    # live QoS 1 still held behind it (bounded: _backlog_overflow).
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, REPLAY_RETRY_MAX_S)
                    continue
                delay = REPLAY_RETRY_S
                backlog = self._backlog
                mids = []
                for m in page:
                    backlog.pop(m.mid, None)
                    if self._in_flight(m.mid):  # a resync skips what is unacked in flight
                        self.push(encode_msg(m.mid, m.sender, m.body, m.created, 1, m.sig))
                        mids.append(m.mid)
                hub.metrics.frames_out["msg"] += len(mids)
                if mids:
                    store.mark_delivered_nowait(mids, now)
                if page:
                    after = page[-1].mid
                if (len(page) < page_size and not self._backlog_overflow
                        and len(self._out) + len(backlog) <= hub.send_queue_max):
                    # Everything stored before this read was in the pages; what arrived
                    # since is in the backlog, in commit order.
                    rest = []
                    for mid, frame in backlog.items():
                        if self._in_flight(mid):
                            rest.append((mid, frame))
                    self._backlog = None
                    for _mid, frame in rest:
                        self.push(frame)
                    if rest:
                        store.mark_delivered_nowait([m for m, _ in rest], now)
                    return
                self._backlog_overflow = False
        except BaseException:
            self._backlog = None
            raise

    async def _wait_drained(self) -> None:
        """Wait until the send queue has room for another page (flow control)."""
        while self.state == ACTIVE and len(self._out) > self.hub.send_queue_max // 2:
            self._drained = asyncio.Event()
            await self._drained.wait()
        self._drained = None

    def _on_ack(self, f: Ack) -> None:
        unacked = self._unacked
        if unacked is not None:
            if self._replaying:
                # A replay may have read these from the store before the ack reached
                # it: they stay in flight for it, or it would write them again.
                acked = [m for m in f.mids if m in unacked]
                if acked:
                    if self._acked_in_replay is None:
                        self._acked_in_replay = set()
                    self._acked_in_replay.update(acked)
            else:
                # Not in flight any more, even if the store misses the ack (then the
                # message comes again: at least once). A replay started later reads the
                # store after the ack below was submitted, so it sees it.
                unacked.difference_update(f.mids)
        self.spawn(self.hub.ack(self, f.mids, f.id))

    # -- topics (§5) ------------------------------------------------------------------

    def _on_pub(self, f: Pub) -> None:
        if not topic_allowed(self.topics_allowed, f.topic):
            self.reply_error(f.id, E.FORBIDDEN, "topic not allowed by token")
            return
        self.spawn(self.hub.publish(self, f.id, f.topic, f.body))

    def push_topic(self, topic: str, seq: int, frame: bytes) -> None:
        rec = self.topics.get(topic)
        if rec is None:
            self.push(frame)
            return
        rec.items.append((seq, frame))
        if len(rec.items) > self.hub.send_queue_max:
            self._slow_consumer()

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
            entries = []
            if f.since is not None:
                now = time.time_ns() // 1_000_000
                entries = await hub.store.history_since(
                    topic, f.since, now, hub.cfg.store.topic_history_ttl_s * 1000)
            seq = await hub.broker.last_seq(topic)
        except Exception:
            if not held:
                self.topics.pop(topic, None)
                hub.unsubscribe(self, topic)
            else:
                self._go_live(topic, rec, 0)
            self.reply_error(f.id, E.UNAVAILABLE, "history unavailable")
            return
        if self.state != ACTIVE or self.topics.get(topic) is not rec:
            return
        if f.since is None:
            self.reply_ok(f.id, seq=seq)
            self._go_live(topic, rec, 0)
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
        last = since
        me = self.node_id
        for e in entries:
            last = e.seq
            if e.sender != me:  # §5: a publisher never receives its own publication
                self.push(encode_topic_msg(e.mid, e.sender, topic, e.seq, e.body, e.ts))
        hub.metrics.frames_out["msg"] += len(entries)
        self._go_live(topic, rec, last)

    def _go_live(self, topic: str, rec: _Recovery, last: int) -> None:
        for seq, frame in rec.items:
            if seq > last:
                self.push(frame)
        self.topics[topic] = None

    async def _unsub(self, f: Unsub) -> None:
        if self.topics.pop(f.topic, 0) != 0:
            self.hub.unsubscribe(self, f.topic)
        self.reply_ok(f.id)

    # -- presence (§6) ----------------------------------------------------------------

    async def _presence(self, f: Presence) -> None:
        try:
            online = await self.hub.presence(f.nodes)
        except Exception:
            self.reply_error(f.id, E.UNAVAILABLE, "presence unavailable")
            return
        self.reply_ok(f.id, online=online)


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

