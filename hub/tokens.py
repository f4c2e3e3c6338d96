"""Token auth (§2 ``hello`` with ``token``): JWT verification, issuing, topic patterns.

This module owns which JWTs the hub accepts: the algorithms (only those configured and
backed by a key; never ``none``), the claims (``sub`` a node id, ``exp`` required,
``nbf`` honoured, ``aud`` when configured, the optional ``topics`` claim) and the leeway
(``auth.clock_skew_s``). ``jti`` and ``iat`` are read (never refused) for revocation,
which the hub checks (hub/revocations.py); tokens issued here always carry both, ``iat``
to the millisecond, so that "every token of a node issued before now" is exact. Every
refusal is one ``TokenError`` whose ``reason`` is a short label from
``TOKEN_ERROR_REASONS``, fit for a metrics label; no message echoes a token.

Sans-I/O: pure functions of the token, the keys and the clock value passed in.
"""

from __future__ import annotations

import math
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.types import Options
from openred.protocol.identity import is_node_id

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "MAX_TOKEN_CHARS",
    "MIN_HMAC_SECRET_BYTES",
    "MIN_RSA_KEY_BITS",
    "SUPPORTED_ALGORITHMS",
    "TOKEN_ERROR_REASONS",
    "TOPIC_PATTERN_RE",
    "TokenClaims",
    "TokenError",
    "TokenIssuer",
    "TokenVerifier",
    "is_topic_pattern",
    "topic_allowed",
]

MAX_TOKEN_CHARS: Final = 8192
# Below these sizes pyjwt warns on every use; we refuse at start-up instead.
MIN_HMAC_SECRET_BYTES: Final = 32
MIN_RSA_KEY_BITS: Final = 2048

HMAC_ALGORITHM: Final = "HS256"
ASYMMETRIC_ALGORITHMS: Final = frozenset({"EdDSA", "ES256", "RS256"})
SUPPORTED_ALGORITHMS: Final = frozenset({HMAC_ALGORITHM}) | ASYMMETRIC_ALGORITHMS

TOKEN_ERROR_REASONS: Final = frozenset(
    {
        "malformed",
        "bad_algorithm",
        "bad_signature",
        "expired",
        "not_yet_valid",
        "missing_exp",
        "bad_exp",
        "bad_nbf",
        "bad_audience",
        "bad_sub",
        "bad_topics",
        "revoked",  # the hub's revocation list (hub/revocations.py), not a token check
    }
)

# §5 topic alphabet; a pattern is a topic name, or a (possibly empty) prefix plus one
# trailing "*" (so "*" alone matches every topic).
TOPIC_PATTERN_RE = re.compile(r"[A-Za-z0-9._:/\-]{1,200}|[A-Za-z0-9._:/\-]{0,200}\*")


class TokenError(Exception):
    """A refused token. ``reason`` is one of ``TOKEN_ERROR_REASONS``."""

    def __init__(self, reason: str, msg: str | None = None) -> None:
        super().__init__(msg or reason.replace("_", " "))
        self.reason = reason


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What the hub keeps from a verified token.

    ``topics`` None means no restriction; an empty tuple allows no topic at all.
    ``jti`` (a str, else None) and ``iat`` (seconds, possibly fractional, else None) only
    serve revocation; they take no part in equality.
    """

    sub: str
    exp: int
    topics: tuple[str, ...] | None
    jti: str | None = field(default=None, compare=False)
    iat: float | None = field(default=None, compare=False)


def is_topic_pattern(s: object) -> bool:
    """True for a valid ``topics`` claim entry: a topic name, optionally ending in ``*``."""
    return isinstance(s, str) and len(s) <= 201 and TOPIC_PATTERN_RE.fullmatch(s) is not None


def topic_allowed(patterns: tuple[str, ...] | None, topic: str) -> bool:
    """Whether ``topic`` is allowed by a token's ``topics`` claim (§2, §5).

    None allows everything; ``"a/*"`` allows every topic starting with ``"a/"``; ``"*"``
    allows everything; any other pattern allows exactly that topic.
    """
    if patterns is None:
        return True
    for p in patterns:
        if p.endswith("*"):
            if topic.startswith(p[:-1]):
                return True
        elif p == topic:
            return True
    return False


def _algorithms_for_public_key(key: object) -> frozenset[str]:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return frozenset({"EdDSA"})
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return frozenset({"ES256"})
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_KEY_BITS:
            raise ValueError(f"token RSA public key must have at least {MIN_RSA_KEY_BITS} bits")
        return frozenset({"RS256"})
    raise ValueError("token public key must be Ed25519, EC P-256 or RSA")


def _algorithm_for_private_key(key: object) -> str:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_KEY_BITS:
            raise ValueError(f"token RSA private key must have at least {MIN_RSA_KEY_BITS} bits")
        return "RS256"
    raise ValueError("token private key must be Ed25519, EC P-256 or RSA")


def _check_secret(secret: str) -> None:
    if not isinstance(secret, str) or len(secret.encode()) < MIN_HMAC_SECRET_BYTES:
        raise ValueError(f"token secret must be a str of at least {MIN_HMAC_SECRET_BYTES} bytes")


def _numeric_date(payload: Mapping[str, Any], name: str) -> float | None:
    """A NumericDate claim: absent -> None; a finite int/float -> it; else TokenError."""
    if name not in payload:
        return None
    value = payload[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TokenError(f"bad_{name}")
    return float(value)


# Claims are validated here, not by pyjwt: pyjwt has no injectable clock, and one place
# maps every failure to a reason label.
_DECODE_OPTIONS: Final[Options] = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,
    "verify_jti": False,
    "require": [],
    "enforce_minimum_key_length": True,
}


class TokenVerifier:
    """Verifies ``hello`` tokens (§2). Immutable after construction; safe to share."""

    __slots__ = ("_allowed", "_audience", "_leeway_s", "_public_key", "_secret")

    def __init__(
        self,
        *,
        algorithms: Sequence[str],
        secret: str | None = None,
        public_key_pem: bytes | None = None,
        audience: str | None = None,
        leeway_s: float = 30,
    ) -> None:
        if isinstance(algorithms, str):
            raise TypeError("algorithms must be a sequence of names, not a str")
        configured = frozenset(algorithms)
        unknown = configured - SUPPORTED_ALGORITHMS
        if unknown:
            # "none" lands here too: it is never allowed.
            raise ValueError(f"unsupported token algorithms: {', '.join(sorted(unknown))}")
        if not math.isfinite(leeway_s) or leeway_s < 0:
            raise ValueError("token leeway must be a finite number >= 0")
        if audience is not None and (not isinstance(audience, str) or not audience):
            raise ValueError("token audience must be a non-empty str")

        allowed: set[str] = set()
        self._secret: bytes | None = None
        if secret is not None:
            _check_secret(secret)
            self._secret = secret.encode()
            if HMAC_ALGORITHM in configured:
                allowed.add(HMAC_ALGORITHM)
        self._public_key: object | None = None
        if public_key_pem is not None:
            try:
                self._public_key = serialization.load_pem_public_key(public_key_pem)
            except (ValueError, TypeError, UnsupportedAlgorithm):
                raise ValueError("token public key is not a PEM public key") from None
            allowed |= _algorithms_for_public_key(self._public_key) & configured
        if not allowed:
            raise ValueError(
                "no usable token algorithm: HS256 needs a secret, EdDSA/ES256/RS256 a "
                "public key of the matching type"
            )
        self._allowed = frozenset(allowed)
        self._audience = audience
        self._leeway_s = float(leeway_s)

    @property
    def allowed_algorithms(self) -> frozenset[str]:
        return self._allowed

    def verify(self, token: str, now: float | None = None) -> TokenClaims:
        """Verify ``token`` at time ``now`` (default: the wall clock).

        Raises only ``TokenError``.
        """
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            raise TokenError("malformed")
        if not token.isascii():
            raise TokenError("malformed")
        payload = self._decode(token)
        return self._claims(payload, time.time() if now is None else now)

    def _decode(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except Exception:  # DecodeError, and anything else hostile input may provoke
            raise TokenError("malformed") from None
        alg = header.get("alg")
        # Refused before any key is touched: "none", an unconfigured algorithm, or one
        # whose key type we do not hold (§2).
        if not isinstance(alg, str) or alg not in self._allowed:
            raise TokenError("bad_algorithm")
        # The key is chosen by algorithm family, so a public key can never be used as an
        # HMAC secret (the classic alg confusion).
        key: Any = self._secret if alg == HMAC_ALGORITHM else self._public_key
        try:
            payload = jwt.decode(token, key, algorithms=[alg], options=_DECODE_OPTIONS)
        except jwt.InvalidSignatureError:
            raise TokenError("bad_signature") from None
        except jwt.InvalidAlgorithmError:
            raise TokenError("bad_algorithm") from None
        except jwt.PyJWTError:
            raise TokenError("malformed") from None
        except Exception:  # e.g. RecursionError or ValueError from a crafted payload
            raise TokenError("malformed") from None
        if not isinstance(payload, dict):
            raise TokenError("malformed")
        return payload

    def _claims(self, payload: dict[str, Any], now: float) -> TokenClaims:
        leeway = self._leeway_s
        exp = _numeric_date(payload, "exp")
        if exp is None:
            raise TokenError("missing_exp")
        if exp <= now - leeway:
            raise TokenError("expired")
        nbf = _numeric_date(payload, "nbf")
        if nbf is not None and nbf > now + leeway:
            raise TokenError("not_yet_valid")

        if self._audience is not None:
            aud = payload.get("aud")
            if isinstance(aud, str):
                ok = aud == self._audience
            elif isinstance(aud, list):
                ok = self._audience in aud
            else:
                ok = False
            if not ok:
                raise TokenError("bad_audience")
        # Without a configured audience, aud is not checked (as Centrifugo does).

        sub = payload.get("sub")
        if not is_node_id(sub):
            raise TokenError("bad_sub")
        assert isinstance(sub, str)

        topics: tuple[str, ...] | None = None
        if "topics" in payload:
            raw = payload["topics"]
            # null is refused too: only an absent claim means "no restriction".
            if not isinstance(raw, list) or not all(is_topic_pattern(p) for p in raw):
                raise TokenError("bad_topics")
            topics = tuple(raw)

        # Revocation metadata: read leniently (a token from another issuer may use
        # another form); absent or odd values are None (docs/protocol.md §2.4).
        jti = payload.get("jti")
        iat = payload.get("iat")
        if isinstance(iat, bool) or not isinstance(iat, int | float) or not math.isfinite(iat):
            iat = None
        return TokenClaims(sub=sub, exp=math.floor(exp), topics=topics,
                           jti=jti if isinstance(jti, str) and jti else None,
                           iat=None if iat is None else float(iat))


class TokenIssuer:
    """Issues tokens the hub accepts: for operators, tests and the bench."""

    __slots__ = ("_algorithm", "_key")

    def __init__(
        self,
        *,
        secret: str | None = None,
        private_key_pem: bytes | None = None,
        algorithm: str | None = None,
    ) -> None:
        if (secret is None) == (private_key_pem is None):
            raise ValueError("give exactly one of secret and private_key_pem")
        self._key: Any
        if secret is not None:
            _check_secret(secret)
            if algorithm not in (None, HMAC_ALGORITHM):
                raise ValueError(f"a secret signs {HMAC_ALGORITHM} only")
            self._key = secret.encode()
            self._algorithm = HMAC_ALGORITHM
            return
        assert private_key_pem is not None
        try:
            key = serialization.load_pem_private_key(private_key_pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise ValueError("token private key is not an unencrypted PEM private key") from None
        inferred = _algorithm_for_private_key(key)
        if algorithm is not None and algorithm != inferred:
            raise ValueError(f"the private key signs {inferred}, not {algorithm}")
        self._key = key
        self._algorithm = inferred

    @property
    def algorithm(self) -> str:
        return self._algorithm

    def issue(
        self,
        sub: str,
        ttl_s: float,
        topics: Sequence[str] | None = None,
        now: float | None = None,
        audience: str | None = None,
    ) -> tuple[str, int]:
        """Return ``(token, exp)`` for node ``sub``, valid for ``ttl_s`` seconds. The token
        carries a fresh random ``jti`` and ``iat`` to the millisecond (an integer when
        the millisecond part is 0)."""
        if not is_node_id(sub):
            raise ValueError("sub must be a node id")
        if (
            isinstance(ttl_s, bool)
            or not isinstance(ttl_s, int | float)
            or not math.isfinite(ttl_s)
            or ttl_s < 1
        ):
            raise ValueError("ttl_s must be a number >= 1")
        if topics is not None:
            if isinstance(topics, str):
                raise TypeError("topics must be a sequence of patterns, not a str")
            if not all(is_topic_pattern(p) for p in topics):
                raise ValueError("topics must be topic names, optionally ending in '*'")
        t = time.time() if now is None else now
        iat_ms = math.floor(t * 1000)
        iat: int | float = iat_ms // 1000 if iat_ms % 1000 == 0 else iat_ms / 1000
        exp = math.floor(t + ttl_s)
        payload: dict[str, Any] = {"sub": sub, "iat": iat, "exp": exp,
                                   "jti": secrets.token_urlsafe(16)}
        if audience is not None:
            payload["aud"] = audience
        if topics is not None:
            payload["topics"] = list(topics)
        token = jwt.encode(payload, self._key, algorithm=self._algorithm)
        return token, exp
