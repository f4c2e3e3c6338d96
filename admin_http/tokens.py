"""Admin bearer tokens: their configured forms, their scopes, and the constant-time match.

Owned here: the grammar of each `admin.tokens` entry (hub/config.py calls `parse_token`
at start-up, so a bad entry stops the hub naming its position, never its secret), the
scope order, and `TokenTable.match`.

Forms of an entry (README "Operator surface"):

- `NAME:SCOPE:SECRET`: a named token with scope `read`, `write` or `admin`. The secret
  is at least 16 characters; `NAME:SCOPE:file:/path` reads it from a file.
- `NAME:SCOPE:sha256:HEX`: the same, configured by the SHA-256 of the secret (64 hex
  digits), so the configuration never holds the secret. Admin tokens are random (say
  `openssl rand -hex 32`): for a secret with that much entropy a plain SHA-256 is as
  good as a slow hash. argon2 would only help low-entropy passwords, and would add a
  dependency and ~50 ms of CPU to every admin request, so it is not offered.
- anything else: an old-style token (as before scopes existed), with scope `admin`,
  named by the first 8 hex digits of its SHA-256 (the id audit events gave it before).

A NAME is 1..64 of `[A-Za-z0-9._-]`. Scopes nest: `admin` may do what `write` may, and
`write` what `read` may. Tokens are compared by their SHA-256 digests with
`hmac.compare_digest`, against every configured token, so the time taken does not tell
which one (or whether any) matched.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

__all__ = ["MIN_SECRET_CHARS", "SCOPES", "AdminToken", "TokenTable", "inline_file_secret",
           "parse_token", "scope_allows"]

SCOPES: Final = ("read", "write", "admin")  # in order: each includes those before it
MIN_SECRET_CHARS: Final = 16
_NAMED: Final = re.compile(r"([A-Za-z0-9._-]{1,64}):(read|write|admin):(.*)", re.S)
_HEX64: Final = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True, slots=True)
class AdminToken:
    name: str
    scope: str
    digest: bytes  # SHA-256 of the secret


def scope_allows(have: str, need: str) -> bool:
    return SCOPES.index(have) >= SCOPES.index(need)


def _printable(secret: str) -> bool:
    return bool(secret) and secret.isascii() and secret.isprintable() and " " not in secret


def parse_token(entry: str, read_file: Callable[[str], str] | None = None) -> AdminToken:
    """One `admin.tokens` entry (already resolved when it was `file:/path` as a whole).
    Raises ValueError saying what is wrong, never quoting the secret. `read_file`
    resolves `NAME:SCOPE:file:/path` (hub/config.py's secret reader)."""
    m = _NAMED.fullmatch(entry)
    if m is None:
        if not _printable(entry):
            raise ValueError("must be non-empty printable ASCII without whitespace")
        digest = hashlib.sha256(entry.encode()).digest()
        return AdminToken(digest.hex()[:8], "admin", digest)
    name, scope, rest = m.groups()
    if rest.startswith("sha256:"):
        hexdigest = rest[len("sha256:"):]
        if not _HEX64.fullmatch(hexdigest):
            raise ValueError(f"token {name!r}: sha256: must be followed by 64 hex digits")
        return AdminToken(name, scope, bytes.fromhex(hexdigest))
    if rest.startswith("file:"):
        if read_file is None:
            raise ValueError(f"token {name!r}: file: secrets are not allowed here")
        rest = read_file(rest)
    if not _printable(rest):
        raise ValueError(f"token {name!r}: the secret must be non-empty printable ASCII "
                         "without whitespace")
    if len(rest) < MIN_SECRET_CHARS:
        raise ValueError(f"token {name!r}: the secret must be at least {MIN_SECRET_CHARS} "
                         "characters")
    return AdminToken(name, scope, hashlib.sha256(rest.encode()).digest())


def inline_file_secret(entry: str, read_file: Callable[[str], str]) -> str:
    """`NAME:SCOPE:file:/path` with the file's secret in place (config time); any other
    entry unchanged."""
    m = _NAMED.fullmatch(entry)
    if m is None or not m.group(3).startswith("file:"):
        return entry
    return f"{m.group(1)}:{m.group(2)}:{read_file(m.group(3))}"


class TokenTable:
    """The configured admin tokens; `match` finds the one a request presents."""

    def __init__(self, tokens: Iterable[AdminToken]) -> None:
        self.tokens = tuple(tokens)
        names = [t.name for t in self.tokens]
        if len(set(names)) != len(names):
            raise ValueError("two admin tokens have the same name")
        if len({t.digest for t in self.tokens}) != len(self.tokens):
            raise ValueError("two admin tokens have the same secret")

    def __bool__(self) -> bool:
        return bool(self.tokens)

    def match(self, given: bytes) -> AdminToken | None:
        digest = hashlib.sha256(given).digest()
        found: AdminToken | None = None
        for t in self.tokens:  # every token compared: the time does not say which matched
            if hmac.compare_digest(digest, t.digest):
                found = t
        return found
