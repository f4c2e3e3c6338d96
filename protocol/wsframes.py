"""WebSocket framing after the upgrade (RFC 6455 §5, RFC 7692), sans-I/O.

This module owns every byte of WebSocket framing in the repo: the hub, the bench load
generator, the baselines and the tests all read and write frames through it.

- `FrameReader.feed(bytes)` turns what arrives into events: a whole binary message as
  plain `bytes`, `Text`, `Ping`, `Pong`, the peer's `Close`, or a `Failure` carrying the
  close code the caller sends before it stops. It enforces RFC 6455 as docs/protocol.md
  §11 ("WebSocket framing") promises: masking, reserved bits, opcodes, control frames,
  fragmentation, 64-bit lengths, close codes and UTF-8, and the message size limit
  (docs/protocol.md §1 "Sizes": over `max_frame_bytes` closes with 1009) across
  fragments, decided from a frame's header before its payload is buffered. The number
  of fragments per message is bounded as well as their bytes.
- `FrameWriter` encodes binary messages, pings, pongs and close frames; nothing is
  written after our own close frame (RFC 6455 §5.5.1).
- `Deflate` is permessage-deflate (RFC 7692) behind the same reader and writer: there is
  no second inbound path for compressed connections.
- `binary_header` / `client_message` are the hot-path encoders of one unfragmented
  binary frame, server to client and client to server.

No asyncio, no sockets: the caller feeds bytes and writes what it gets back.
"""

from __future__ import annotations

import os
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

__all__ = [
    "DEFAULT_MAX_FRAGMENTS",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONT",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "ZERO_MASK_KEY",
    "Close",
    "Deflate",
    "Event",
    "Failure",
    "FrameReader",
    "FrameWriter",
    "Ping",
    "Pong",
    "Text",
    "apply_mask",
    "binary_header",
    "client_message",
    "close_body",
    "frame_header",
    "valid_close_code",
]

# RFC 6455 §5.2 opcodes (§11.8). 3-7 and 11-15 are reserved: receiving one fails.
OP_CONT: Final = 0
OP_TEXT: Final = 1
OP_BINARY: Final = 2
OP_CLOSE: Final = 8
OP_PING: Final = 9
OP_PONG: Final = 10

# How many frames one message may span. Zero-length continuation frames add no bytes, so
# the byte bound alone lets one message span any number of frames (a red-team run sent
# three million). Fragments are gathered in one bytearray, so they hold no
# memory per frame; this bound caps the work one message may cost. Browsers never
# fragment what they send and libraries fragment in large chunks (websockets when given
# an iterator); 1024 still lets the hub's default 128 KiB message (docs/protocol.md §8,
# `limits.max_frame_bytes`) arrive in 128-byte pieces.
DEFAULT_MAX_FRAGMENTS: Final = 1024

ZERO_MASK_KEY: Final = b"\x00\x00\x00\x00"  # masks nothing: XOR with zero (RFC 6455 §5.3)

_MAX_CONTROL_BYTES: Final = 125  # RFC 6455 §5.5
_MAX_CLOSE_REASON_BYTES: Final = 123  # 125 minus the 2-byte code (§5.5.1)
_DEFLATE_TAIL: Final = b"\x00\x00\xff\xff"  # RFC 7692 §7.2.1 / §7.2.2


def _py_apply_mask(data: bytes | bytearray, mask: bytes | bytearray) -> bytes:
    """XOR `data` with the 4-byte `mask` repeated (RFC 6455 §5.3), as one big integer."""
    n = len(data)
    if not n:
        return b""
    key = (bytes(mask) * ((n >> 2) + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


apply_mask: Callable[[bytes | bytearray, bytes | bytearray], bytes]
try:  # the C version websockets ships; the pure one is the same function, slower
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets is installed with the hub
    apply_mask = _py_apply_mask


def valid_close_code(code: int) -> bool:
    """Whether `code` may travel in a close frame (RFC 6455 §7.4.1, §7.4.2): 1000-1003,
    1007-1014 (registered), 3000-4999 (libraries, applications). 1004 is reserved; 1005,
    1006 and 1015 are for reporting only and never sent; 0-999 and 5000+ are not used."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


# -- events -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Text:
    """A complete text message whose bytes are valid UTF-8 (RFC 6455 §5.6, §8.1)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Ping:
    """A ping (§5.5.2); answer it with `FrameWriter.pong(data)`."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    """A pong (§5.5.3), solicited or not."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """The peer's valid close frame (§5.5.1): code 1005 and reason "" when its body is
    empty (§7.1.5). The reader is `done` after it."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Failure:
    """The peer broke RFC 6455 (§7.1.7 "Fail the WebSocket Connection"): the caller
    sends a close frame with `code` and stops reading. The reader is `done` after it."""

    code: int
    reason: str


# A complete binary message is plain `bytes` (the hot path tests `type(ev) is bytes`).
Event: TypeAlias = bytes | Text | Ping | Pong | Close | Failure


def _close_event(body: bytes) -> Close | Failure:
    """Validate a close frame's body (RFC 6455 §5.5.1, §7.4, §8.1)."""
    if not body:
        return Close(1005, "")
    if len(body) == 1:
        return Failure(1002, "close frame too short")
    code = (body[0] << 8) | body[1]
    if not valid_close_code(code):
        return Failure(1002, "invalid close code")
    try:
        reason = body[2:].decode()
    except UnicodeDecodeError:
        return Failure(1007, "close reason is not utf-8")
    return Close(code, reason)


# -- permessage-deflate ---------------------------------------------------------------


class Deflate:
    """permessage-deflate (RFC 7692) state of one connection, shared by its reader
    (inflating) and writer (compressing). "remote" is the peer's side: its compressor's
    window and whether it resets its context per message (§7.1.1, §7.1.2)."""

    __slots__ = ("_decoder", "_encoder", "compress_level", "local_max_window_bits",
                 "local_no_context_takeover", "mem_level", "remote_max_window_bits",
                 "remote_no_context_takeover", "server")

    def __init__(self, *, server: bool, remote_no_context_takeover: bool = False,
                 local_no_context_takeover: bool = False, remote_max_window_bits: int = 15,
                 local_max_window_bits: int = 15, compress_level: int = 6,
                 mem_level: int = 8) -> None:
        if not 8 <= remote_max_window_bits <= 15:
            raise ValueError("remote_max_window_bits must be 8..15")
        # zlib refuses a raw deflate window of 8 bits when compressing (it silently means
        # 9 in the format), so 9 is the smallest window we can promise to keep (§7.1.2).
        if not 9 <= local_max_window_bits <= 15:
            raise ValueError("local_max_window_bits must be 9..15")
        self.server = server
        self.remote_no_context_takeover = remote_no_context_takeover
        self.local_no_context_takeover = local_no_context_takeover
        self.remote_max_window_bits = remote_max_window_bits
        self.local_max_window_bits = local_max_window_bits
        self.compress_level = compress_level
        self.mem_level = mem_level
        self._decoder = zlib.decompressobj(wbits=-remote_max_window_bits)
        self._encoder = self._new_encoder()

    @classmethod
    def from_extension(cls, ext: Any, *, server: bool) -> Deflate:
        """From the `PerMessageDeflate` object websockets negotiated at the upgrade (its
        attributes only: `protocol/` does not import websockets' types)."""
        settings = getattr(ext, "compress_settings", None) or {}
        return cls(server=server,
                   remote_no_context_takeover=bool(ext.remote_no_context_takeover),
                   local_no_context_takeover=bool(ext.local_no_context_takeover),
                   remote_max_window_bits=int(ext.remote_max_window_bits),
                   local_max_window_bits=int(ext.local_max_window_bits),
                   compress_level=int(settings.get("level", 6)),
                   mem_level=int(settings.get("memLevel", 8)))

    def __repr__(self) -> str:
        return (f"Deflate(server={self.server}, "
                f"remote_no_context_takeover={self.remote_no_context_takeover}, "
                f"local_no_context_takeover={self.local_no_context_takeover}, "
                f"remote_max_window_bits={self.remote_max_window_bits}, "
                f"local_max_window_bits={self.local_max_window_bits})")

    def _new_encoder(self) -> Any:
        return zlib.compressobj(self.compress_level, zlib.DEFLATED,
                                -self.local_max_window_bits, self.mem_level)

    def compress(self, payload: bytes) -> bytes:
        """One whole message compressed: sync flush, its 00 00 ff ff tail removed
        (RFC 7692 §7.2.1); a fresh context per message with local_no_context_takeover."""
        enc = self._new_encoder() if self.local_no_context_takeover else self._encoder
        data: bytes = enc.compress(payload) + enc.flush(zlib.Z_SYNC_FLUSH)
        return data[:-4]

    def decompress(self, data: bytes | bytearray, max_bytes: int) -> bytes | None:
        """One whole message inflated with the 00 00 ff ff tail put back (§7.2.2), or
        None when it would exceed `max_bytes`: zlib is never asked for more than
        max_bytes + 1 bytes, so a zip bomb costs no more than a message at the limit.
        Raises zlib.error on data that is not deflate."""
        dec = self._decoder
        if self.remote_no_context_takeover or dec.eof:
            # A fresh context per message; also after a block with BFINAL set, which
            # ends the peer's stream (§7.2.3.4).
            dec = self._decoder = zlib.decompressobj(wbits=-self.remote_max_window_bits)
        out: bytes = dec.decompress(bytes(data) + _DEFLATE_TAIL,
                                    min(max_bytes + 1, sys.maxsize))
        if len(out) > max_bytes:
            return None
        return out


# -- reading --------------------------------------------------------------------------


class FrameReader:
    """RFC 6455 §5 frames in, events out, for one direction of one connection.

    `server=True` reads a client's frames (each must be masked, §5.1); `server=False`
    reads a server's (none may be). A message whose payload across its fragments exceeds
    `max_message_bytes` fails with 1009 as soon as the header that crosses the limit has
    arrived, so at most about `max_message_bytes + 14` bytes are ever held (`buffered`).
    After a `Close` or `Failure` event `done` is set, everything held is dropped and
    `feed` returns [].
    """

    __slots__ = ("_buf", "_deflate", "_deflated", "_frag", "_max", "_max_fragments",
                 "_msg_op", "_need", "_nfrag", "_server", "done")

    def __init__(self, *, server: bool = True, max_message_bytes: int,
                 max_fragments: int = DEFAULT_MAX_FRAGMENTS,
                 deflate: Deflate | None = None) -> None:
        if max_message_bytes < 0:
            raise ValueError("max_message_bytes must be >= 0")
        if max_fragments < 1:
            raise ValueError("max_fragments must be >= 1")
        if deflate is not None and deflate.server != server:
            raise ValueError("deflate state is for the other side")
        self._server = server
        self._max = max_message_bytes
        self._max_fragments = max_fragments
        self._deflate = deflate
        self.done = False
        # Both buffers are b"" while empty (most of the time, for an idle connection):
        # a bytearray only while it holds something, so idle readers stay small.
        self._buf: bytes | bytearray = b""  # the partial frame at the end of the last feed
        self._need = 0  # bytes _buf must hold before parsing can progress
        self._frag: bytes | bytearray = b""  # the fragmented message so far (unmasked)
        self._msg_op = 0  # OP_TEXT or OP_BINARY while a fragmented message is open
        self._nfrag = 0
        self._deflated = False  # the open fragmented message had RSV1 (RFC 7692 §6.1)

    @property
    def buffered(self) -> int:
        """Bytes held: the partial frame plus the fragments of an open message."""
        return len(self._buf) + len(self._frag)

    def _fail(self, events: list[Event], code: int, reason: str) -> list[Event]:
        events.append(Failure(code, reason))
        self._stop()
        return events

    def _stop(self) -> None:
        self.done = True
        self._buf = b""
        self._frag = b""
        self._need = 0

    def _message(self, events: list[Event], op: int, payload: bytes | bytearray,
                 deflated: bool) -> bool:
        """Append one complete data message; False (after a Failure) if it is bad."""
        data: bytes
        if deflated:
            assert self._deflate is not None
            try:
                out = self._deflate.decompress(payload, self._max)
            except zlib.error:
                # RFC 7692 §8 says fail, without a code; 1002 as websockets does.
                self._fail(events, 1002, "bad compressed data")
                return False
            if out is None:  # inflated past the limit (docs/protocol.md §1 "Sizes")
                self._fail(events, 1009, "message too big")
                return False
            data = out
        else:
            data = bytes(payload) if isinstance(payload, bytearray) else payload
        if op == OP_BINARY:
            events.append(data)
            return True
        try:
            data.decode()
        except UnicodeDecodeError:
            self._fail(events, 1007, "text message is not utf-8")  # RFC 6455 §8.1
            return False
        events.append(Text(data))
        return True

    def feed(self, data: bytes | bytearray) -> list[Event]:
        """Parse what arrived; return the events it completes, in order."""
        if self.done:
            return []
        server = self._server
        buf = self._buf
        view: bytes | bytearray
        if buf:
            assert type(buf) is bytearray
            buf += data
            if len(buf) < self._need:  # the pending frame is still incomplete
                return []
            # A server's payloads come out of apply_mask as bytes; a client's are slices
            # of what it reads, so they must be slices of bytes.
            view = buf if server else bytes(buf)
        else:
            # Usually a read holds only whole frames: parse it in place, no copy.
            view = data if server or type(data) is bytes else bytes(data)
        events: list[Event] = []
        n = len(view)
        pos = 0
        need = 0
        mask_bit = 0x80 if server else 0
        key_len = 4 if server else 0
        small_end = mask_bit + 126  # b1 below this: a length under 126 (§5.2)
        max_bytes = self._max
        msg_op = self._msg_op
        payload: bytes | bytearray
        while True:
            avail = n - pos
            if avail < 2:
                need = 2
                break
            b0 = view[pos]
            b1 = view[pos + 1]
            # The common case first: a final binary frame under 64 KiB, no message open,
            # masked if and only if it comes from a client (§5.1, §5.2, §5.3).
            if b0 == 0x82 and not msg_op:
                if mask_bit <= b1 < small_end:
                    length = b1 - mask_bit
                    start = pos + 2 + key_len
                elif b1 == small_end and avail >= 4:  # 16-bit length
                    length = (view[pos + 2] << 8) | view[pos + 3]
                    start = pos + 4 + key_len
                else:
                    start = 0  # anything else: the general path below
                if start:
                    if length > max_bytes:
                        return self._fail(events, 1009, "message too big")
                    end = start + length
                    if end > n:
                        need = end - pos
                        break
                    if server:
                        events.append(apply_mask(view[start:end], view[start - 4:start]))
                    else:
                        events.append(view[start:end])  # type: ignore[arg-type]  # bytes
                    pos = end
                    continue
            if (b1 & 0x80) != mask_bit:  # §5.1: clients mask every frame, servers none
                return self._fail(events, 1002,
                                  "unmasked client frame" if server else "masked server frame")
            length = b1 & 0x7F
            if length < 126:
                head = 2 + key_len
            elif length == 126:
                if avail < 4:
                    need = 4
                    break
                length = (view[pos + 2] << 8) | view[pos + 3]
                head = 4 + key_len
            else:
                if avail < 10:
                    need = 10
                    break
                length = int.from_bytes(view[pos + 2:pos + 10], "big")
                if length >> 63:  # §5.2: the most significant bit MUST be 0
                    return self._fail(events, 1002, "frame length over 2^63")
                head = 10 + key_len
            op = b0 & 0x0F
            # The whole header is checked before its payload is waited for.
            if b0 & 0x70:
                # RSV2/RSV3 are never negotiated; RSV1 is permessage-deflate's "compressed"
                # bit, only on the first frame of a data message (RFC 7692 §6, §6.1).
                if (b0 & 0x30 or self._deflate is None or not (op == 1 or op == 2)
                        or msg_op):
                    return self._fail(events, 1002, "reserved bits set")
            if op == OP_BINARY or op == OP_TEXT:
                if msg_op:  # §5.4: the fragments of two messages never interleave
                    return self._fail(events, 1002, "expected a continuation frame")
                if length > max_bytes:  # docs/protocol.md §1 "Sizes"
                    return self._fail(events, 1009, "message too big")
            elif op == OP_CONT:
                if not msg_op:
                    return self._fail(events, 1002, "unexpected continuation frame")
                if length + len(self._frag) > max_bytes:  # docs/protocol.md §11: as a whole
                    return self._fail(events, 1009, "message too big")
                if self._nfrag >= self._max_fragments:
                    # 1008 (policy violation, §7.4.1): every frame is valid and the bytes
                    # are within the limit (so not 1009); it is our own bound that is hit.
                    return self._fail(events, 1008, "too many fragments")
            elif OP_CLOSE <= op <= OP_PONG:
                if not b0 & 0x80:  # §5.5: control frames are never fragmented
                    return self._fail(events, 1002, "fragmented control frame")
                if length > _MAX_CONTROL_BYTES:
                    return self._fail(events, 1002, "control frame too long")
            else:
                return self._fail(events, 1002, "reserved opcode")
            end = pos + head + length
            if end > n:
                need = head + length
                break
            start = pos + head
            if not length:
                payload = b""
            elif server:
                payload = apply_mask(view[start:end], view[start - 4:start])
            else:
                payload = view[start:end]
            pos = end
            if op == OP_BINARY or op == OP_TEXT:
                if b0 & 0x80:
                    if not self._message(events, op, payload, bool(b0 & 0x40)):
                        return events
                else:  # §5.4: the first fragment; control frames may come between
                    msg_op = op
                    self._deflated = bool(b0 & 0x40)
                    self._frag = bytearray(payload)
                    self._nfrag = 1
            elif op == OP_CONT:
                # One bytearray for all fragments: an empty one costs no memory.
                frag = self._frag
                assert type(frag) is bytearray  # made by the first fragment
                frag += payload
                self._nfrag += 1
                if b0 & 0x80:
                    whole = bytes(frag)
                    self._frag = b""
                    self._nfrag = 0
                    if not self._message(events, msg_op, whole, self._deflated):
                        return events
                    msg_op = 0
            elif op == OP_PING:
                events.append(Ping(bytes(payload)))
            elif op == OP_PONG:
                events.append(Pong(bytes(payload)))
            else:
                # RFC 6455 §1.4: after a close frame nothing more is read.
                events.append(_close_event(bytes(payload)))
                self._stop()
                return events
        self._msg_op = msg_op
        self._need = need
        if buf:
            if pos:
                assert type(buf) is bytearray
                del buf[:pos]
                if not buf:
                    self._buf = b""
        elif pos < n:
            self._buf = bytearray(memoryview(view)[pos:])  # the caller's buffer is not kept
        return events


# -- writing --------------------------------------------------------------------------

_SERVER_HEADERS: Final = tuple(bytes((0x82, n)) for n in range(126))
_CLIENT_ZERO_HEADERS: Final = tuple(bytes((0x82, 0x80 | n)) + ZERO_MASK_KEY
                                    for n in range(126))


def frame_header(b0: int, n: int, *, masked: bool = False) -> bytes:
    """A frame header up to its masking key (RFC 6455 §5.2): `b0` (FIN, RSV1-3, opcode),
    the mask bit and `n` in the shortest length form. Any header, valid or not: tests
    build broken frames with it."""
    m = 0x80 if masked else 0
    if n < 126:
        return bytes((b0, m | n))
    if n < 65536:
        return bytes((b0, m | 126)) + n.to_bytes(2, "big")
    return bytes((b0, m | 127)) + n.to_bytes(8, "big")


def binary_header(n: int) -> bytes:
    """The header of an unmasked final binary frame of `n` payload bytes (server to
    client, RFC 6455 §5.2): the hub writes it, then the payload."""
    if n < 126:
        return _SERVER_HEADERS[n]
    if n < 65536:  # the hot path's other case: spelt out, a call costs as much
        return b"\x82\x7e" + n.to_bytes(2, "big")
    return b"\x82\x7f" + n.to_bytes(8, "big")


def client_message(payload: bytes, mask_key: bytes = ZERO_MASK_KEY) -> bytes:
    """One masked final binary frame (client to server, RFC 6455 §5.3). A zero key
    leaves the payload as is, so the bench can encode frames once ahead of time."""
    n = len(payload)
    if mask_key is ZERO_MASK_KEY or mask_key == ZERO_MASK_KEY:
        if n < 126:
            return _CLIENT_ZERO_HEADERS[n] + payload
        if n < 65536:
            return b"\x82\xfe" + n.to_bytes(2, "big") + ZERO_MASK_KEY + payload
        return b"\x82\xff" + n.to_bytes(8, "big") + ZERO_MASK_KEY + payload
    return frame_header(0x82, n, masked=True) + mask_key + apply_mask(payload, mask_key)


def close_body(code: int, reason: str = "") -> bytes:
    """A close frame's body: the code, then the reason cut to 123 bytes on a UTF-8
    boundary (RFC 6455 §5.5, §5.5.1). Raises ValueError for a code never sent (§7.4)."""
    if not valid_close_code(code):
        raise ValueError(f"close code {code} may not be sent")
    raw = reason.encode("utf-8", "replace")
    if len(raw) > _MAX_CLOSE_REASON_BYTES:
        raw = raw[:_MAX_CLOSE_REASON_BYTES].decode("utf-8", "ignore").encode()
    return code.to_bytes(2, "big") + raw


class FrameWriter:
    """Frames out for one connection. `server=True` writes unmasked frames; a client
    (`server=False`) masks each with `mask_key`, or a fresh random key per frame when it
    is None (§5.3; a fixed zero key is for the bench only). After `close()` every method
    returns b"": nothing follows our close frame (§5.5.1)."""

    __slots__ = ("_deflate", "_mask_key", "_server", "closed")

    def __init__(self, *, server: bool = True, deflate: Deflate | None = None,
                 mask_key: bytes | None = None) -> None:
        if deflate is not None and deflate.server != server:
            raise ValueError("deflate state is for the other side")
        if mask_key is not None and (server or len(mask_key) != 4):
            raise ValueError("mask_key is a client's 4-byte key")
        self._server = server
        self._deflate = deflate
        self._mask_key = mask_key
        self.closed = False

    def _frame(self, b0: int, payload: bytes) -> bytes:
        if self._server:
            return frame_header(b0, len(payload)) + payload
        key = self._mask_key if self._mask_key is not None else os.urandom(4)
        return frame_header(b0, len(payload), masked=True) + key + (
            payload if key == ZERO_MASK_KEY else apply_mask(payload, key))

    def frame(self, opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
        """One raw frame, never compressed: text, fragments, anything the message API
        does not make (for tests and tools; the hub sends only binary messages)."""
        if self.closed:
            return b""
        return self._frame((0x80 if fin else 0) | opcode, payload)

    def message(self, payload: bytes) -> bytes:
        """One binary message, header and payload (compressed with deflate, RSV1 set,
        RFC 7692 §6)."""
        if self.closed:
            return b""
        if self._deflate is not None:
            return self._frame(0xC2, self._deflate.compress(payload))
        if self._server:
            return binary_header(len(payload)) + payload
        return self._frame(0x82, payload)

    def messages(self, payloads: list[bytes]) -> bytes:
        """Many binary messages joined, for one transport write."""
        if self.closed:
            return b""
        if self._server and self._deflate is None:
            parts: list[bytes] = []
            append = parts.append
            headers = _SERVER_HEADERS
            for p in payloads:
                n = len(p)
                append(headers[n] if n < 126 else binary_header(n))
                append(p)
            return b"".join(parts)
        return b"".join([self.message(p) for p in payloads])

    def ping(self, data: bytes = b"") -> bytes:
        if len(data) > _MAX_CONTROL_BYTES:
            raise ValueError("a ping carries at most 125 bytes")
        return b"" if self.closed else self._frame(0x89, data)

    def pong(self, data: bytes) -> bytes:
        if len(data) > _MAX_CONTROL_BYTES:
            raise ValueError("a pong carries at most 125 bytes")
        return b"" if self.closed else self._frame(0x8A, data)

    def close(self, code: int, reason: str = "") -> bytes:
        """Our close frame (once): `code` must be one that may be sent (§7.4), the reason
        is cut to fit. Sets `closed`."""
        body = close_body(code, reason)
        if self.closed:
            return b""
        self.closed = True
        return self._frame(0x88, body)
