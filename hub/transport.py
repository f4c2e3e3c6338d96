"""The WebSocket edge of one TCP connection: `Connection`, an `asyncio.Protocol`.

It owns everything between the socket and a node session (hub/session.py):
- the HTTP upgrade (websockets' sans-I/O `ServerProtocol`, dropped once it is done),
  with its deadline `server.open_timeout_s` and the admission checks of hub/admission.py
  (connection caps, per-IP handshake bucket, `Origin`);
- RFC 6455 framing through `protocol.wsframes` (one reader, one writer per connection;
  permessage-deflate sits behind the same interface);
- the send queue: frames pushed during one loop iteration are written by one
  `transport.write` at its end (HubNode.mark_dirty). The queue is bounded in frames
  (`limits.send_queue_max`) and bytes (`limits.send_queue_max_bytes`); past either
  while the socket does not drain, the session is cut off as a slow consumer
  (docs/protocol.md §8);
- write pressure: pongs wait while the socket does not drain, and only the latest
  ping is answered (RFC 6455 §5.5.3), so a peer that pings and never reads grows
  nothing here;
- the closing handshake, with a grace period after which the socket is aborted.

Messages go to the session as `bytes`; everything else the frame layer reports is
handled here.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
from typing import TYPE_CHECKING, Any, cast

from openred.protocol import errors as E
from openred.protocol.frames import batch_of, encode_bye
from openred.protocol.wsframes import Close, Deflate, Failure, FrameReader, FrameWriter, Ping, Text
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

if TYPE_CHECKING:
    from openred.hub.node import HubNode
    from openred.hub.session import Session

__all__ = ["CLOSE_GRACE_S", "Connection", "Phase"]

log = logging.getLogger("openred.hub.transport")
_ws_log = logging.getLogger("openred.hub.ws")
_ws_log.setLevel(logging.WARNING)  # websockets logs every open/close at info

WS_PATH = "/v1/ws"
CLOSE_GRACE_S = 2.0  # how long a closing peer may take before the socket is aborted
WRITE_HIGH_WATER = 256 * 1024  # transport buffer above which writing pauses


class Phase(enum.IntEnum):
    UPGRADE = 0  # reading the HTTP request
    OPEN = 1  # WebSocket frames flow
    CLOSING = 2  # our close frame (or an HTTP refusal) is out; waiting for the peer
    CLOSED = 3  # the TCP connection is gone


UPGRADE, OPEN, CLOSING, CLOSED = Phase.UPGRADE, Phase.OPEN, Phase.CLOSING, Phase.CLOSED


class Connection(asyncio.Protocol):
    # Slots: tens of thousands of idle connections per process, none with a dict.
    __slots__ = (
        "_flush_scheduled", "_flushes", "_grace", "_pong", "_reading_paused", "_room",
        "_timer", "batch_out", "close_code", "counted_ip", "hub", "ip", "last_ping",
        "last_rx", "loop", "max_bytes", "max_frames", "out", "out_bytes", "paused_at",
        "phase", "reader", "refusal", "session", "sweep_at", "transport", "write_paused",
        "writer", "ws",
    )

    def __init__(self, hub: HubNode) -> None:
        self.hub = hub
        self.loop = hub.loop
        self.transport: asyncio.Transport | None = None
        self.phase = UPGRADE
        self.ip = "?"
        self.counted_ip: str | None = None  # the IP whose connection count holds this one
        self.refusal: tuple[int, str] | None = None  # decided at connect, said at request
        # The close code sent or received (the disconnect log); 1006: none, the TCP
        # connection just ended.
        self.close_code = 1006
        cfg = hub.cfg
        self.ws: ServerProtocol | None = ServerProtocol(
            max_size=cfg.limits.max_frame_bytes, extensions=hub.ws_extensions, logger=_ws_log)
        self.reader: FrameReader | None = None
        self.writer: FrameWriter | None = None
        self.session: Session | None = None
        self.out: list[bytes] = []
        self.out_bytes = 0
        self.max_frames = hub.send_queue_max
        self.max_bytes = cfg.limits.send_queue_max_bytes
        self.batch_out = False
        self.write_paused = False
        self.paused_at = 0.0  # loop time writing last paused (HubNode's write deadline)
        self._reading_paused = 0  # reasons reading is paused (hub/session.py, shutdown)
        self._flush_scheduled = False
        self._flushes = 0
        self._pong: bytes | None = None  # payload of the latest unanswered ping
        self._timer: asyncio.TimerHandle | None = None  # open deadline, then close grace
        self._grace = False  # _timer is the close grace
        self._room: asyncio.Event | None = None
        self.last_rx = self.loop.time()
        self.last_ping = self.last_rx
        self.sweep_at = -1  # the housekeeping second that visits it (HubNode._visit)

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        t = cast(asyncio.Transport, transport)
        self.transport = t
        peer = t.get_extra_info("peername")
        if peer:
            self.ip = str(peer[0])
        t.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        sock = t.get_extra_info("socket")
        if sock is not None:
            try:  # small frames must not wait for the peer's delayed ACK (Nagle)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        hub = self.hub
        hub.connection_opened(self)
        # A connection over a cap is refused when its request has come (an HTTP client
        # reads the response only after sending it); until then it counts against
        # limits.max_connections like any other, and the open timeout still holds.
        self.refusal = hub.admission.on_connect(self)
        self._timer = self.loop.call_later(hub.cfg.server.open_timeout_s, self._open_timeout)

    def data_received(self, data: bytes) -> None:
        self.last_rx = self.loop.time()
        reader = self.reader
        if reader is not None:
            events = reader.feed(data)
            if events:
                session = self.session
                assert session is not None
                on_message = session.on_message
                for ev in events:
                    if type(ev) is bytes:
                        if self.phase is OPEN:  # nothing is handled once closing
                            on_message(ev)
                    else:
                        self._control(ev)
        elif self.phase is UPGRADE:
            self._upgrade_data(data)
        # else: a closing connection; what it sends is dropped.

    def eof_received(self) -> bool | None:
        """The peer half-closed: it will send nothing more, the close frame included.
        The session ends now (out of the registry, nothing more routed to it) and the
        socket closes, aborted after the grace period if what is queued never drains."""
        if self.phase is OPEN:
            self.phase = CLOSING
            if self.session is not None:
                self.session.closing()
            self.out = []
            self.out_bytes = 0
            self._wake_room()
        self._abort_later()
        return None  # the transport closes itself; connection_lost cleans up

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        session = self.session
        if session is not None:
            session.connection_lost()
        self.hub.admission.on_disconnect(self)
        self.hub.connection_closed(self)
        self.out = []
        self.out_bytes = 0
        self._wake_room()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.paused_at = self.loop.time()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.out or self._pong is not None:
            self.flush()

    # -- the HTTP upgrade ---------------------------------------------------------------

    def _upgrade_data(self, data: bytes) -> None:
        ws = self.ws
        assert ws is not None
        ws.receive_data(data)
        for ev in ws.events_received():
            if type(ev) is Request and self.phase is UPGRADE:
                self._on_request(ev)
        if self.phase is not OPEN:
            self._write_ws()

    def _write_ws(self) -> None:
        """Write what the upgrade produced: a refusal, or websockets' own 400."""
        transport, ws = self.transport, self.ws
        if transport is None or ws is None:
            return
        for data in ws.data_to_send():
            if data:
                if not transport.is_closing():
                    transport.write(data)
            else:  # SEND_EOF: the server closes the TCP connection (RFC 6455 §7.1.1)
                self.phase = CLOSING
                self._abort_later()  # a peer that does not read the refusal: gone anyway
                transport.close()

    def _on_request(self, request: Request) -> None:
        ws = self.ws
        assert ws is not None
        if self.refusal is not None:
            ws.send_response(_plain(ws.reject(*self.refusal)))
            return
        if request.path.split("?", 1)[0] != WS_PATH:
            ws.send_response(_plain(ws.reject(404, "Not Found\n")))
            return
        refusal = self.hub.admission.on_request(self, request)
        if refusal is not None:
            ws.send_response(_plain(ws.reject(*refusal)))
            return
        response = _plain(ws.accept(request))
        ws.send_response(response)
        if response.status_code != 101:
            return
        self._write_ws()
        self._stop_timer()
        deflate = None
        if ws.extensions:
            deflate = Deflate.from_extension(ws.extensions[0], server=True)
        limits = self.hub.cfg.limits
        self.reader = FrameReader(server=True, max_message_bytes=limits.max_frame_bytes,
                                  deflate=deflate)
        self.writer = FrameWriter(server=True, deflate=deflate)
        rest = bytes(ws.reader.buffer)  # frames that came in the same read as the request
        self.ws = None  # frees websockets' parser and buffers
        self.phase = OPEN
        session = self.session = self.hub.new_session(self)
        session.start()
        if rest:
            self.data_received(rest)

    def _open_timeout(self) -> None:
        """docs/protocol.md §1: the upgrade did not complete within open_timeout_s."""
        self._timer = None
        if self.phase is UPGRADE:
            self.hub.metrics.handshakes["open_timeout"] += 1
            self.phase = CLOSING
            if self.transport is not None:
                self.transport.abort()

    def _abort_later(self) -> None:
        """From now on the connection has CLOSE_GRACE_S to be gone (the open-timeout
        timer, if any, is replaced; an earlier grace timer is kept)."""
        transport = self.transport
        if transport is None or self.phase is CLOSED:
            return
        if self._timer is not None:
            if self._grace:
                return
            self._timer.cancel()
        self._timer = self.loop.call_later(CLOSE_GRACE_S, transport.abort)
        self._grace = True

    def _wake_room(self) -> None:
        """Wake every waiter of wait_room (they share one event)."""
        room = self._room
        if room is not None:
            self._room = None
            room.set()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- frames from the peer other than data messages ------------------------------------

    def _control(self, ev: Any) -> None:
        t = type(ev)
        if t is Ping:
            # RFC 6455 §5.5.3: answering only the latest ping is allowed; while the
            # socket does not drain, one pending pong is all a pinging peer can cause.
            if self.writer is not None and not self.writer.closed:
                self._pong = ev.data
                self._schedule_flush()
        elif t is Close:
            self._peer_closed(ev.code)
        elif t is Failure:
            self.fail(ev.code, ev.reason)
        elif t is Text:
            self.close(E.CLOSE_UNSUPPORTED_DATA, "text message")  # docs/protocol.md §1
        # Pong: last_rx is already refreshed, which is all a pong is for.

    def _peer_closed(self, code: int) -> None:
        """The peer's close frame: answer it (echoing its code) unless we started the
        close, then end the TCP connection (RFC 6455 §5.5.1, §7.1.1)."""
        transport = self.transport
        if self.phase is OPEN:
            self.phase = CLOSING
            self.close_code = code
            if self.session is not None:
                self.session.closing()
            self.out = []
            self.out_bytes = 0
            assert self.writer is not None
            # 1005 means the peer sent no code: answer with a plain normal closure.
            data = self.writer.close(1000 if code == 1005 else code)
            if transport is not None and not transport.is_closing():
                transport.write(data)
            self._wake_room()
        if transport is not None:
            # close() waits for the buffer to drain: a peer that closed and stopped
            # reading would keep it (and its per-IP slot) forever without the deadline.
            self._abort_later()
            transport.close()

    def fail(self, code: int, reason: str) -> None:
        """RFC 6455 §7.1.7: a protocol violation; the close frame, then the TCP close
        without waiting for the peer's."""
        self.close(code, reason)
        if self.transport is not None:
            self._abort_later()
            self.transport.close()

    # -- outgoing -----------------------------------------------------------------------

    def push(self, frame: bytes) -> None:
        """Queue one encoded protocol frame; written with the others at the end of this
        loop iteration. Never blocks; past the queue's bounds while the socket does not
        drain, the session is closed as a slow consumer (docs/protocol.md §8)."""
        if self.phase is not OPEN:
            return  # RFC 6455 §5.5.1: no data frame after the close frame
        out = self.out
        out.append(frame)
        self.out_bytes += len(frame)
        if self.write_paused:
            # Only a socket that does not drain makes a slow consumer; what one loop
            # iteration queues for a writable socket is written at its end.
            if len(out) > self.max_frames or self.out_bytes > self.max_bytes:
                self.slow_consumer()
            return
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.hub.mark_dirty(self)

    def push_front(self, frame: bytes) -> None:
        """Queue `frame` before everything queued so far (the welcome, ahead of what was
        routed to the session while it was being checked)."""
        if self.phase is not OPEN:
            return
        self.out.insert(0, frame)
        self.out_bytes += len(frame)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.hub.mark_dirty(self)

    def flush(self) -> None:
        """Write the queue with one `transport.write` (HubNode's end-of-iteration
        callback, or at once)."""
        self._flush_scheduled = False
        transport = self.transport
        if self.write_paused or transport is None or self.phase is not OPEN:
            return
        writer = self.writer
        assert writer is not None
        out = self.out
        pong = self._pong
        data = b""
        if pong is not None:
            self._pong = None
            data = writer.pong(pong)
        if out:
            self.out = []
            self.out_bytes = 0
            self._flushes += 1
            if self._flushes & 31 == 0:
                self.hub.metrics.send_queue_frames.observe(len(out))
            if self.batch_out and len(out) > 1:
                out = self._batches(out)
            data = data + writer.messages(out) if data else writer.messages(out)
        if data:
            transport.write(data)
        self._wake_room()

    def _batches(self, frames: list[bytes]) -> list[bytes]:
        """docs/protocol.md §1: frames as msgpack arrays, each within max_frame_bytes."""
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

    def has_room(self) -> bool:
        """Whether the queue is at most half full (in frames and in bytes)."""
        return len(self.out) <= self.max_frames // 2 and self.out_bytes <= self.max_bytes // 2

    async def wait_room(self) -> bool:
        """Wait until the queue is at most half full (flow control for those who push
        many frames at once: a replay, a topic recovery). False once the connection
        is closing."""
        while self.phase is OPEN and not self.has_room():
            room = self._room
            if room is None:
                room = self._room = asyncio.Event()
            await room.wait()
        return self.phase is OPEN

    def send_ping(self) -> None:
        transport, writer = self.transport, self.writer
        if (self.phase is OPEN and writer is not None and transport is not None
                and not self.write_paused):
            transport.write(writer.ping())

    def pause_reading(self) -> None:
        self._reading_paused += 1
        if self._reading_paused == 1 and self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused == 0:
            return  # close() resumed reading for the peer's close frame already
        self._reading_paused -= 1
        if self._reading_paused == 0 and self.transport is not None and self.phase is OPEN:
            self.transport.resume_reading()

    # -- closing ------------------------------------------------------------------------

    def close(self, code: int, reason: str, last: tuple[bytes, ...] = ()) -> None:
        """End the connection: what is queued and `last` (an error or bye frame), then
        the close frame; the socket is aborted if the peer does not finish the closing
        handshake within CLOSE_GRACE_S."""
        if self.phase is not OPEN:
            if self.phase is UPGRADE and self.transport is not None:
                self.phase = CLOSING
                self.transport.abort()
            return
        self.phase = CLOSING
        self.close_code = code
        if self.session is not None:
            self.session.closing()
        transport, writer = self.transport, self.writer
        assert writer is not None
        out = self.out
        self.out = []
        self.out_bytes = 0
        if transport is not None and not transport.is_closing():
            if self.write_paused:
                out = []  # a full socket: only the short last words go
            out.extend(last)
            data = writer.messages(out) if out else b""
            transport.write(data + writer.close(code, reason))
            # Read on, whatever paused it: the peer's close frame ends the handshake.
            if self._reading_paused:
                self._reading_paused = 0
                transport.resume_reading()
        self._abort_later()
        self._wake_room()

    def slow_consumer(self) -> None:
        self.hub.metrics.slow_consumer_disconnects += 1
        self.out = []
        self.out_bytes = 0
        session = self.session
        bye = (encode_bye("slow_consumer"),) if session is not None and session.active else ()
        # The bye cannot jump a full socket buffer; it goes behind it (bounded: a few
        # bytes once per connection).
        self.write_paused = False
        self.close(E.CLOSE_SLOW_CONSUMER, "slow consumer", bye)


def _plain(response: Response) -> Response:
    """No software versions on the wire: websockets names itself and Python in `Server`."""
    if "Server" in response.headers:
        del response.headers["Server"]
    response.headers["Server"] = "openred-hub"
    return response
