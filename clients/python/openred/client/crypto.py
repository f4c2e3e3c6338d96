"""End-to-end signatures and encryption (docs/protocol.md §12), sans-I/O.

Owned here (the signed bytes of §4 and §5.1 are `openred.protocol.identity`'s, re-exported
here): signature checks reported as
`verified` (True, False, or None when unknown), where a peer's Ed25519 key comes from
(the node id itself for key-authenticated nodes, else a map the application gives),
NaCl `box` for direct bodies (Ed25519 keys converted to X25519) and `secretbox` under
a topic's group key, and `GroupKeys`, the group keys a client knows per topic.

Only pynacl: the client carries no other cryptography library.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import nacl.exceptions
import nacl.public
import nacl.secret
import nacl.signing
import nacl.utils
from openred.client.errors import CryptoError, DecryptError
from openred.protocol.identity import (
    TOPIC_CONTEXT,
    Identity,
    body_message,
    topic_message,
    verify_signature,
)

__all__ = [
    "ENC_BOX",
    "ENC_SECRETBOX",
    "GROUP_KEY_BYTES",
    "NONCE_BYTES",
    "TOPIC_CONTEXT",
    "GroupKeys",
    "key_of",
    "open_box",
    "open_secretbox",
    "seal_box",
    "seal_secretbox",
    "topic_message",
    "verify_direct",
    "verify_topic",
]

ENC_BOX = "box"  # §12 meta.enc of a direct body
ENC_SECRETBOX = "secretbox"  # §12 meta.enc of a topic body under a group key
NONCE_BYTES = 24
GROUP_KEY_BYTES = 32
_HEX_KEY_ID = re.compile(r"[0-9a-f]{64}")
_MAC_BYTES = 16  # Poly1305 tag of box and secretbox
_KID = re.compile(r"[\x21-\x7e]{1,64}")


def key_of(node: str, keys: Mapping[str, bytes] | None = None) -> bytes | None:
    """A peer's Ed25519 public key: from `keys` when listed (token nodes, §12), else
    the node id itself when it is one (64 lowercase hex chars, §2.1), else None."""
    if keys is not None:
        key = keys.get(node)
        if key is not None:
            return bytes(key)
    if _HEX_KEY_ID.fullmatch(node):
        return bytes.fromhex(node)
    return None


def verify_direct(sender_key: bytes | None, to: str, body: bytes,
                  sig: bytes | None) -> bool | None:
    """§12 `verified` of a direct message: None without `sig` or key."""
    if sig is None or sender_key is None:
        return None
    return verify_signature(sender_key, body_message(to, body), sig)


def verify_topic(sender_key: bytes | None, topic: str, body: bytes,
                 sig: bytes | None) -> bool | None:
    """§12 `verified` of a publication: None without `sig` or key."""
    if sig is None or sender_key is None:
        return None
    return verify_signature(sender_key, topic_message(topic, body), sig)


def _curve_public(ed_key: bytes) -> nacl.public.PublicKey:
    try:
        return nacl.signing.VerifyKey(bytes(ed_key)).to_curve25519_public_key()
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
        raise CryptoError("not a usable ed25519 public key") from exc


def _box(me: Identity, peer_key: bytes) -> nacl.public.Box:
    # §12: X25519 keys converted from the Ed25519 ones (crypto_sign_ed25519_*_to_curve25519).
    return nacl.public.Box(me.signing_key.to_curve25519_private_key(),
                           _curve_public(peer_key))


def seal_box(me: Identity, recipient_key: bytes, plaintext: bytes) -> bytes:
    """`nonce ‖ crypto_box(plaintext)` from `me` to the recipient's Ed25519 key (§12)."""
    nonce = nacl.utils.random(NONCE_BYTES)
    return bytes(_box(me, recipient_key).encrypt(bytes(plaintext), nonce))


def open_box(me: Identity, sender_key: bytes, data: bytes) -> bytes:
    """Open a §12 box sent to `me` by the holder of `sender_key` (the `from` node's
    key, never one named inside the message). `DecryptError` when it does not open."""
    if len(data) < NONCE_BYTES + _MAC_BYTES:
        raise DecryptError("box too short")
    try:
        return bytes(_box(me, sender_key).decrypt(bytes(data)))
    except nacl.exceptions.CryptoError as exc:
        raise DecryptError("box does not open") from exc


def seal_secretbox(key: bytes, plaintext: bytes) -> bytes:
    """`nonce ‖ crypto_secretbox(plaintext)` under a 32-byte group key (§12)."""
    nonce = nacl.utils.random(NONCE_BYTES)
    return bytes(nacl.secret.SecretBox(bytes(key)).encrypt(bytes(plaintext), nonce))


def open_secretbox(key: bytes, data: bytes) -> bytes:
    """Open a §12 secretbox; `DecryptError` when it does not open."""
    if len(data) < NONCE_BYTES + nacl.secret.SecretBox.MACBYTES:
        raise DecryptError("secretbox too short")
    try:
        return bytes(nacl.secret.SecretBox(bytes(key)).decrypt(bytes(data)))
    except nacl.exceptions.CryptoError as exc:
        raise DecryptError("secretbox does not open") from exc


@dataclass
class _TopicKeys:
    current: str | None = None
    keys: dict[str, bytes] = field(default_factory=dict)


class GroupKeys:
    """The group keys of topics (§12 `secretbox`): per topic, keys by `kid`, and the
    current one, used to encrypt. Older keys stay for opening what was sent under them
    (history, messages in flight during a rotation) until `remove()`."""

    def __init__(self) -> None:
        self._topics: dict[str, _TopicKeys] = {}

    def add(self, topic: str, kid: str, key: bytes, *, current: bool = True) -> None:
        if not _KID.fullmatch(kid):
            raise ValueError("kid: must be 1..64 printable ASCII chars")
        if not isinstance(key, bytes | bytearray) or len(key) != GROUP_KEY_BYTES:
            raise ValueError("key: must be 32 bytes")
        tk = self._topics.setdefault(topic, _TopicKeys())
        tk.keys[kid] = bytes(key)
        if current or tk.current is None:
            tk.current = kid

    def remove(self, topic: str, kid: str | None = None) -> None:
        """Forget one key of `topic`, or all of them (`kid` None)."""
        tk = self._topics.get(topic)
        if tk is None:
            return
        if kid is None:
            del self._topics[topic]
            return
        tk.keys.pop(kid, None)
        if tk.current == kid:
            tk.current = next(iter(tk.keys), None)

    def current(self, topic: str) -> tuple[str, bytes] | None:
        """The (kid, key) publications to `topic` are encrypted with, if any."""
        tk = self._topics.get(topic)
        if tk is None or tk.current is None:
            return None
        return tk.current, tk.keys[tk.current]

    def get(self, topic: str, kid: str) -> bytes | None:
        tk = self._topics.get(topic)
        return None if tk is None else tk.keys.get(kid)
