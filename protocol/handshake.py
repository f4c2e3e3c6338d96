"""The node's side of the handshake (docs/protocol.md §2.2): `ClientHandshake` answers a
challenge with a signed (or token) `hello` and reads the `welcome`. Sans-I/O: bytes and
frames only. The hub's side is `openred.hub.handshake`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from openred.protocol.errors import (
    AUTH_FAILED,
    CLOSE_AUTH_FAILED,
    CLOSE_FORBIDDEN,
    FORBIDDEN,
    HandshakeError,
    ProtocolViolation,
)
from openred.protocol.frames import encode
from openred.protocol.identity import Identity

__all__ = ["ClientHandshake", "Welcome"]

@dataclass(frozen=True, slots=True)
class Welcome:
    node: str
    session: str
    hb: int
    pending: int
    limits: dict[str, Any]


class ClientHandshake:
    """Answers the challenge with a signed (or token) hello and reads the welcome."""

    def __init__(self, *, identity: Identity | None = None, token: str | None = None,
                 batch: bool = False, meta: dict[str, Any] | None = None) -> None:
        if (identity is None) == (token is None):
            raise ValueError("give exactly one of identity or token")
        self.identity = identity
        self.token = token
        self.batch = batch
        self.meta = meta
        self.hub_id: str | None = None

    def hello(self, challenge: dict[str, Any]) -> bytes:
        if challenge.get("t") != "challenge":
            raise HandshakeError(AUTH_FAILED, CLOSE_AUTH_FAILED, "expected a challenge")
        hub = challenge.get("hub")
        nonce = challenge.get("nonce")
        if type(hub) is not str or type(nonce) is not bytes:
            raise HandshakeError(AUTH_FAILED, CLOSE_AUTH_FAILED, "malformed challenge")
        self.hub_id = hub
        frame: dict[str, Any] = {"t": "hello", "v": 1}
        if self.identity is not None:
            frame["key"] = self.identity.public_key
            frame["sig"] = self.identity.sign_auth(hub, nonce)
        else:
            frame["token"] = self.token
        if self.batch:
            frame["batch"] = True
        if self.meta is not None:
            frame["meta"] = self.meta
        return encode(frame)

    def welcome(self, frame: dict[str, Any]) -> Welcome:
        if frame.get("t") == "error":
            code = str(frame.get("code", AUTH_FAILED))
            close = CLOSE_FORBIDDEN if code == FORBIDDEN else CLOSE_AUTH_FAILED  # §2.4
            raise HandshakeError(code, close, str(frame.get("msg", "")))
        if frame.get("t") != "welcome":
            raise HandshakeError(AUTH_FAILED, CLOSE_AUTH_FAILED, "expected welcome")
        node, session = frame.get("node"), frame.get("session")
        hb, pending = frame.get("hb"), frame.get("pending")
        limits = frame.get("limits") or {}
        if (type(node) is not str or type(session) is not str or type(hb) is not int
                or type(pending) is not int or type(limits) is not dict):
            # A broken welcome is the hub's fault, not an auth refusal.
            raise ProtocolViolation("malformed welcome")
        return Welcome(node, session, hb, pending, limits)
