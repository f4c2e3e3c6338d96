"""A delivered message (docs/protocol.md §4 direct, §5 topic, §5.2 history) and its
acknowledgement.

A QoS 1 message is acked through the message itself (`await msg.ack()`, or
`async with msg:`, which acks when the block ends without an exception), so several
tasks consuming one client each ack their own message: nothing is shared between them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from openred.client.errors import DecryptError

__all__ = ["Message"]

Acker = Callable[["Message"], Awaitable[None]]


class Message:
    """One `msg` from the hub.

    - `mid`, `sender` (the `from` node id, or `$admin`), `ts` (ms), `qos` (0 or 1).
    - `topic` and `seq` for a publication (§5), None for a direct message.
    - `body`: the plaintext. For an encrypted body (§12, `enc` is `"box"` or
      `"secretbox"`) the SDK opened it; when it could not, reading `body` raises
      `DecryptError`. `raw` is always the bytes on the wire.
    - `meta` (§4.1, a copy), `sig` as sent, `verified` (§12: True or False when a `sig`
      was checked against the sender's key, None when there is no `sig` or no key).
    - `trace_context`: the OpenTelemetry context of `meta` (§13), or None.
    """

    __slots__ = ("__weakref__", "_acked", "_acker", "_body", "_error", "_manual", "enc",
                 "meta", "mid", "qos", "raw", "sender", "seq", "sig", "topic",
                 "trace_context", "ts", "verified")

    def __init__(self, mid: str, sender: str, body: bytes, ts: int, qos: int = 0, *,
                 topic: str | None = None, seq: int | None = None,
                 sig: bytes | None = None, meta: dict[str, str] | None = None,
                 raw: bytes | None = None, verified: bool | None = None,
                 enc: str | None = None, error: DecryptError | None = None,
                 trace_context: Any = None, acker: Acker | None = None) -> None:
        self.mid = mid
        self.sender = sender
        self._body = body
        self.ts = ts
        self.qos = qos
        self.topic = topic
        self.seq = seq
        self.sig = sig
        self.meta: dict[str, str] = dict(meta) if meta else {}
        self.raw = body if raw is None else raw
        self.verified = verified
        self.enc = enc
        self._error = error
        self.trace_context = trace_context
        self._acker = acker
        self._acked = qos != 1 or acker is None
        self._manual = False

    @property
    def body(self) -> bytes:
        if self._error is not None:
            raise DecryptError(str(self._error)) from self._error
        return self._body

    @property
    def decrypted(self) -> bool:
        """True when an encrypted body was opened, False when it could not be, and
        False for a body that was not encrypted."""
        return self.enc is not None and self._error is None

    @property
    def request_id(self) -> str | None:
        """§4.3: `meta.req` of a request, else None."""
        return self.meta.get("req") if self.topic is None else None

    @property
    def reply_to(self) -> str | None:
        """§4.3: `meta.re` of a reply, else None."""
        return self.meta.get("re") if self.topic is None else None

    @property
    def acked(self) -> bool:
        """True once acked (and always for QoS 0)."""
        return self._acked

    async def ack(self) -> None:
        """Ack this QoS 1 message (§4); a no-op for QoS 0 and when already acked. Best
        effort: an ack lost with its connection makes the hub deliver the message again
        next session, and the SDK acks that repeat without delivering it."""
        self._manual = True
        if self._acked:
            return
        self._acked = True
        assert self._acker is not None
        await self._acker(self)

    async def __aenter__(self) -> Message:
        # Taken out of auto-ack: the block decides.
        self._manual = True
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            await self.ack()

    def __repr__(self) -> str:
        where = f"topic={self.topic!r} seq={self.seq}" if self.topic else "direct"
        return (f"Message(mid={self.mid!r} from={self.sender!r} {where} qos={self.qos} "
                f"bytes={len(self.raw)})")
