"""Error and close codes of the wire protocol (docs/protocol.md §8, §9), and the exception tree.

Exception tree::

    ProtocolViolation          the peer broke the protocol; the session ends
    ├── DecodeError            bytes are not exactly one msgpack value -> close 1007
    └── HandshakeError         a refused hello -> error frame + close (4001 / 4003)

A `FrameError` is not an exception: it is a value the decoder returns in place of a frame
that was well-formed msgpack but wrong (§3: "a malformed frame never closes the session
by itself"); the hub answers it with one `error` frame and goes on.
"""

from __future__ import annotations

from typing import Final, NamedTuple

__all__ = [
    "AUTH_FAILED",
    "BAD_FRAME",
    "CLOSE_AUTH_FAILED",
    "CLOSE_FORBIDDEN",
    "CLOSE_HELLO_TIMEOUT",
    "CLOSE_IDLE",
    "CLOSE_INTERNAL",
    "CLOSE_KICKED",
    "CLOSE_POLICY",
    "CLOSE_REPLACED",
    "CLOSE_RESTART",
    "CLOSE_SLOW_CONSUMER",
    "CLOSE_TOO_BIG",
    "CLOSE_UNDECODABLE",
    "CLOSE_UNSUPPORTED_DATA",
    "ERROR_CODES",
    "FORBIDDEN",
    "INTERNAL",
    "LIMIT_EXCEEDED",
    "NOT_AUTHENTICATED",
    "NO_ROUTE",
    "QUEUE_FULL",
    "RATE_LIMITED",
    "TOO_LARGE",
    "UNAVAILABLE",
    "UNKNOWN_TYPE",
    "DecodeError",
    "FrameError",
    "HandshakeError",
    "ProtocolViolation",
]

BAD_FRAME: Final = "bad_frame"
UNKNOWN_TYPE: Final = "unknown_type"
NOT_AUTHENTICATED: Final = "not_authenticated"
AUTH_FAILED: Final = "auth_failed"
FORBIDDEN: Final = "forbidden"
TOO_LARGE: Final = "too_large"
RATE_LIMITED: Final = "rate_limited"
LIMIT_EXCEEDED: Final = "limit_exceeded"
NO_ROUTE: Final = "no_route"
QUEUE_FULL: Final = "queue_full"
UNAVAILABLE: Final = "unavailable"
INTERNAL: Final = "internal"

ERROR_CODES: Final = frozenset({
    BAD_FRAME, UNKNOWN_TYPE, NOT_AUTHENTICATED, AUTH_FAILED, FORBIDDEN, TOO_LARGE,
    RATE_LIMITED, LIMIT_EXCEEDED, NO_ROUTE, QUEUE_FULL, UNAVAILABLE, INTERNAL,
})

CLOSE_UNSUPPORTED_DATA: Final = 1003  # text message
CLOSE_UNDECODABLE: Final = 1007
CLOSE_POLICY: Final = 1008  # rate abuse
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL: Final = 1011
CLOSE_RESTART: Final = 1012
CLOSE_AUTH_FAILED: Final = 4001  # also: not authenticated
CLOSE_HELLO_TIMEOUT: Final = 4002
CLOSE_FORBIDDEN: Final = 4003  # banned, or unregistered in allowlist mode
CLOSE_SLOW_CONSUMER: Final = 4009
CLOSE_REPLACED: Final = 4010
CLOSE_IDLE: Final = 4011
CLOSE_KICKED: Final = 4012


class FrameError(NamedTuple):
    """A frame that is answered with `error` (§3); `id` is None when the frame had none
    or its `id` itself was invalid."""

    id: int | str | None
    code: str
    msg: str


class ProtocolViolation(Exception):
    """The peer broke the protocol in a way that ends the session."""

    close_code: int = CLOSE_UNDECODABLE


class DecodeError(ProtocolViolation):
    """The message is not exactly one msgpack value (§1): close 1007."""

    close_code = CLOSE_UNDECODABLE


class HandshakeError(ProtocolViolation):
    """A refused `hello` (§2). `reason` is short and safe to log; it never holds the
    token or key material."""

    def __init__(self, code: str, close_code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.close_code = close_code
        self.reason = reason
