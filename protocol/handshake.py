"""The handshake of PROTOCOL.md §2 as two small state machines, one per side.

`ServerHandshake` issues the challenge and checks a `hello` (key signature or JWT); the
hub adds what needs storage (bans, allowlist, one session per node). `ClientHandshake`
answers a challenge and reads the welcome. Both are sans-I/O: bytes and frames only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from protocol.errors import (
    AUTH_FAILED,
    CLOSE_AUTH_FAILED,
    CLOSE_FORBIDDEN,
    FORBIDDEN,
    HandshakeError,
    ProtocolViolation,
)
from protocol.frames import Hello, encode, encode_challenge
from protocol.identity import Identity, auth_message, node_id_for_key, verify_signature
from protocol.tokens import TokenError, TokenVerifier

__all__ = ["Authenticated", "ClientHandshake", "ServerHandshake", "Welcome"]

NONCE_BYTES = 32


@dataclass(frozen=True, slots=True)
class Authenticated:
    """Who a `hello` proved to be."""

    node_id: str
    key: bytes | None
    topics: tuple[str, ...] | None  # None: no topic restriction
    batch: bool
    meta: dict[str, Any] | None
    method: str  # "key" | "token"
    # Token auth: the token's jti and iat, for the hub's revocation check; not identity.
    jti: str | None = field(default=None, compare=False)
    iat: float | None = field(default=None, compare=False)


def _refuse(reason: str) -> HandshakeError:
    return HandshakeError(AUTH_FAILED, CLOSE_AUTH_FAILED, reason)


class ServerHandshake:
    """One per connection: a fresh nonce, so a hello from another connection (a replay)
    never verifies."""

    __slots__ = ("hub_id", "nonce", "verifier")

    def __init__(self, hub_id: str, verifier: TokenVerifier | None,
                 nonce: bytes | None = None) -> None:
        self.hub_id = hub_id
        self.verifier = verifier
        self.nonce = nonce if nonce is not None else os.urandom(NONCE_BYTES)

    def challenge(self) -> bytes:
        return encode_challenge(self.hub_id, self.nonce)

    def check(self, hello: Hello, now: float | None = None) -> Authenticated:
        """Verify `hello`; raise HandshakeError (auth_failed, 4001) with a short reason."""
        if hello.key is not None and hello.token is not None:
            raise _refuse("both key and token")
        if hello.key is not None:
            if len(hello.key) != 32:
                raise _refuse("key: not 32 bytes")
            if hello.sig is None or len(hello.sig) != 64:
                raise _refuse("sig: missing or not 64 bytes")
            if not verify_signature(hello.key, auth_message(self.hub_id, self.nonce),
                                    hello.sig):
                raise _refuse("bad_signature")
            return Authenticated(node_id_for_key(hello.key), hello.key, None, hello.batch,
                                 hello.meta, "key")
        if hello.token is not None:
            if self.verifier is None:
                raise _refuse("token auth not configured")
            try:
                claims = self.verifier.verify(hello.token, now)
            except TokenError as exc:
                raise _refuse(exc.reason) from None
            return Authenticated(claims.sub, None, claims.topics, hello.batch, hello.meta,
                                 "token", claims.jti, claims.iat)
        raise _refuse("no key or token")


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
