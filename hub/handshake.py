"""The hub's side of the handshake (docs/protocol.md §2.2, §2.4): `ServerHandshake` issues
the challenge and checks a `hello` (key signature or JWT). The hub adds what needs
storage (bans, allowlist, one session per node) in `openred.hub.admission`. Sans-I/O.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from openred.hub.tokens import TokenError, TokenVerifier
from openred.protocol.errors import AUTH_FAILED, CLOSE_AUTH_FAILED, HandshakeError
from openred.protocol.frames import Hello, encode_challenge
from openred.protocol.identity import auth_message, node_id_for_key, verify_signature

__all__ = ["Authenticated", "ServerHandshake"]

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


