"""Node identity: node ids, Ed25519 keys, the signed messages of §2 and §4, key files.

This module owns what a node id is (§2: 1..128 chars of ``[A-Za-z0-9._:-]``), the exact
bytes a node signs to authenticate (§2 ``hello`` ``sig``) and to sign a body end to end
(§4 ``sig``, checked where ``auth.verify_body_sig = true``), signature checks that never
raise, and the on-disk key file format (an unencrypted PKCS#8 PEM Ed25519 private key,
mode 0600).

Sans-I/O apart from the two key file helpers, which the CLI and the client SDK call once
at start-up; nothing here touches sockets or asyncio.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

import nacl.exceptions
import nacl.signing

__all__ = [
    "AUTH_CONTEXT",
    "BODY_CONTEXT",
    "NODE_ID_MAX_CHARS",
    "NODE_ID_RE",
    "PUBLIC_KEY_BYTES",
    "SEED_BYTES",
    "SIGNATURE_BYTES",
    "TOPIC_CONTEXT",
    "Identity",
    "KeyFileError",
    "auth_message",
    "body_message",
    "is_node_id",
    "key_file_is_private",
    "load_key_file",
    "node_id_for_key",
    "save_key_file",
    "topic_message",
    "verify_signature",
]

NODE_ID_MAX_CHARS = 128
# §2: the node id alphabet. Explicit ASCII classes, so no Unicode digit sneaks in.
NODE_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

PUBLIC_KEY_BYTES = 32
SEED_BYTES = 32
SIGNATURE_BYTES = 64

# §2 / §4: domain separation, so an auth signature can never pass as a body signature
# and the other way round. The NUL ends the context and separates the variable parts.
AUTH_CONTEXT = b"openred-hub/v1/auth\x00"
BODY_CONTEXT = b"openred-hub/v1/body\x00"
# §5.1: a publication's signature; its own context, so that a direct message's signature
# can never pass as a publication's, nor the other way round.
TOPIC_CONTEXT = b"openred-hub/v1/topic\x00"


def is_node_id(s: object) -> bool:
    """True when ``s`` is a ``str`` of 1..128 chars of ``[A-Za-z0-9._:-]`` (§2)."""
    # The length check first: it is cheap and bounds the regex work on hostile input.
    return (
        isinstance(s, str)
        and 0 < len(s) <= NODE_ID_MAX_CHARS
        and NODE_ID_RE.fullmatch(s) is not None
    )


def auth_message(hub_id: str, nonce: bytes) -> bytes:
    """The bytes a node signs in ``hello`` (§2)."""
    return AUTH_CONTEXT + hub_id.encode() + b"\x00" + bytes(nonce)


def body_message(to: str, body: bytes) -> bytes:
    """The bytes a sender signs for an end-to-end ``sig`` on a ``send`` (§4)."""
    return BODY_CONTEXT + to.encode() + b"\x00" + bytes(body)


def topic_message(topic: str, body: bytes) -> bytes:
    """The bytes a publisher signs for an end-to-end ``sig`` on a ``pub`` (§5.1)."""
    return TOPIC_CONTEXT + topic.encode() + b"\x00" + bytes(body)


def node_id_for_key(public_key: bytes) -> str:
    """The node id of a key-authenticated node: lowercase hex of its public key (§2)."""
    if not isinstance(public_key, bytes | bytearray) or len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError("public key must be 32 bytes")
    return bytes(public_key).hex()


def verify_signature(public_key: bytes, message: bytes, sig: bytes) -> bool:
    """Check an Ed25519 detached signature. False on any bad input; never raises."""
    if (
        not isinstance(public_key, bytes | bytearray)
        or not isinstance(sig, bytes | bytearray)
        or not isinstance(message, bytes | bytearray)
        or len(public_key) != PUBLIC_KEY_BYTES
        or len(sig) != SIGNATURE_BYTES
    ):
        return False
    try:
        nacl.signing.VerifyKey(bytes(public_key)).verify(bytes(message), bytes(sig))
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        # BadSignatureError is a CryptoError; libsodium also refuses small-order keys.
        return False
    return True


@dataclass(frozen=True, slots=True)
class Identity:
    """An Ed25519 signing identity. ``repr`` never shows the private key."""

    signing_key: nacl.signing.SigningKey = field(repr=False)

    @classmethod
    def generate(cls) -> Identity:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if not isinstance(seed, bytes | bytearray) or len(seed) != SEED_BYTES:
            raise ValueError("seed must be 32 bytes")
        return cls(nacl.signing.SigningKey(bytes(seed)))

    @property
    def seed(self) -> bytes:
        """The 32-byte private seed. Secret: never log it."""
        return bytes(self.signing_key)

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def node_id(self) -> str:
        return node_id_for_key(self.public_key)

    def sign(self, message: bytes) -> bytes:
        """A 64-byte detached Ed25519 signature of ``message``."""
        return self.signing_key.sign(bytes(message)).signature

    def sign_auth(self, hub_id: str, nonce: bytes) -> bytes:
        """The ``sig`` of a key ``hello`` answering ``challenge`` (§2)."""
        return self.sign(auth_message(hub_id, nonce))

    def sign_body(self, to: str, body: bytes) -> bytes:
        """An end-to-end ``sig`` for a ``send`` of ``body`` to ``to`` (§4)."""
        return self.sign(body_message(to, body))

    def sign_topic(self, topic: str, body: bytes) -> bytes:
        """An end-to-end ``sig`` for a ``pub`` of ``body`` to ``topic`` (§5.1)."""
        return self.sign(topic_message(topic, body))


class KeyFileError(ValueError):
    """A key file that cannot be written, read or understood. The message names the path."""


# An Ed25519 PKCS#8 key has one DER encoding (RFC 8410 §7), so it is written and read
# as fixed bytes: the client package then needs no ASN.1 library (cryptography is a
# 20 MB dependency a node would carry for these 16 bytes). v1 is what OpenSSL and
# cryptography write; v2 (OneAsymmetricKey, RFC 5958) adds the public key.
_PKCS8_V1 = bytes.fromhex("302e020100300506032b657004220420")
_PKCS8_V2 = bytes.fromhex("3051020101300506032b657004220420")
_PKCS8_V2_PUB = bytes.fromhex("812100")
_PEM_BEGIN = b"-----BEGIN PRIVATE KEY-----"
_PEM_END = b"-----END PRIVATE KEY-----"


def _pem_for(identity: Identity) -> bytes:
    der = base64.b64encode(_PKCS8_V1 + identity.seed)
    return _PEM_BEGIN + b"\n" + der + b"\n" + _PEM_END + b"\n"


def _seed_from_pem(data: bytes, target: Path) -> bytes:
    if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data:
        raise KeyFileError(f"key file {target} is encrypted; an unencrypted key is needed")
    begin, end = data.find(_PEM_BEGIN), data.find(_PEM_END)
    if begin < 0 or end < begin:
        raise KeyFileError(f"key file {target} is not a PEM private key")
    try:
        der = base64.b64decode(b"".join(data[begin + len(_PEM_BEGIN):end].split()),
                               validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"key file {target} is not a PEM private key") from None
    if len(der) == 48 and der.startswith(_PKCS8_V1):
        return der[16:]
    if (len(der) == 83 and der.startswith(_PKCS8_V2)
            and der[48:51] == _PKCS8_V2_PUB):
        seed = der[16:48]
        if Identity.from_seed(seed).public_key != der[51:]:
            raise KeyFileError(f"key file {target}: its public key does not match its seed")
        return seed
    raise KeyFileError(f"key file {target} does not hold an Ed25519 private key")


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 (O_EXCL: fails if it exists) and write ``data``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, 0o600)
    try:
        try:
            # The umask can only remove bits from 0600; set it exactly all the same.
            if hasattr(os, "fchmod"):
                os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def save_key_file(
    identity: Identity, path: str | os.PathLike[str], *, overwrite: bool = False
) -> None:
    """Write ``identity`` as an unencrypted PKCS#8 PEM Ed25519 private key, mode 0600.

    Without ``overwrite`` the file is created with O_EXCL, so an existing key is never
    clobbered (``KeyFileError``). With ``overwrite`` the key is written to a fresh 0600
    file beside it and renamed over ``path``: readers see the old key or the new one,
    never a partial file, and the old file's permissions are not inherited.
    """
    target = Path(path)
    data = _pem_for(identity)
    try:
        if not overwrite:
            _write_new(target, data)
            return
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
        _write_new(tmp, data)
        try:
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except FileExistsError:
        raise KeyFileError(f"key file {target} already exists") from None
    except OSError as e:
        raise KeyFileError(f"cannot write key file {target}: {e.strerror or e}") from None


def load_key_file(path: str | os.PathLike[str]) -> Identity:
    """Read a key file written by ``save_key_file`` (any unencrypted PEM Ed25519 key).

    Raises ``KeyFileError`` naming ``path`` when the file is missing, unreadable, or not
    an unencrypted Ed25519 private key. Permissions are not enforced here; the CLI warns
    with ``key_file_is_private``.
    """
    target = Path(path)
    try:
        data = target.read_bytes()
    except OSError as e:
        raise KeyFileError(f"cannot read key file {target}: {e.strerror or e}") from None
    return Identity.from_seed(_seed_from_pem(data, target))


def key_file_is_private(path: str | os.PathLike[str]) -> bool:
    """True when no group or other permission bit is set on ``path``.

    Always True on platforms without POSIX modes (Windows). ``KeyFileError`` when the
    file cannot be examined.
    """
    target = Path(path)
    if os.name != "posix":
        return True
    try:
        mode = target.stat().st_mode
    except OSError as e:
        raise KeyFileError(f"cannot examine key file {target}: {e.strerror or e}") from None
    return stat.S_IMODE(mode) & 0o077 == 0
