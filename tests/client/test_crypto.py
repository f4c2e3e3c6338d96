"""§12 end-to-end signatures and encryption (openred.client.crypto), and §13 trace
context (openred.client._otel), without a hub: the bytes signed, boxes that open only
for their recipient and from their sender, tampering seen, keys found."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
from openred.client import CryptoError, DecryptError, GroupKeys, Message, _otel
from openred.client.crypto import (
    key_of,
    open_box,
    open_secretbox,
    seal_box,
    seal_secretbox,
    topic_message,
    verify_direct,
    verify_topic,
)
from openred.protocol.identity import Identity

SEED = bytes(range(32))


def test_topic_signature_message_layout() -> None:
    assert topic_message("room/1", b"hi") == b"openred-hub/v1/topic\x00room/1\x00hi"
    me = Identity.from_seed(SEED)
    sig = me.sign(topic_message("room/1", b"hi"))
    assert verify_topic(me.public_key, "room/1", b"hi", sig) is True
    assert verify_topic(me.public_key, "room/1", b"hI", sig) is False  # tampered body
    assert verify_topic(me.public_key, "room/2", b"hi", sig) is False
    # A topic signature never passes as a direct one, nor the other way round (§5.1).
    assert verify_direct(me.public_key, "room/1", b"hi", sig) is False
    direct = me.sign_body("bob", b"hi")
    assert verify_direct(me.public_key, "bob", b"hi", direct) is True
    assert verify_topic(me.public_key, "bob", b"hi", direct) is False
    assert verify_direct(None, "bob", b"hi", direct) is None  # no key: unknown
    assert verify_direct(me.public_key, "bob", b"hi", None) is None  # no sig: unknown


def test_body_signature_test_vector() -> None:
    # docs/protocol.md §15: the seed 00..1f signs `hi` to `bob`.
    sig = Identity.from_seed(SEED).sign_body("bob", b"hi")
    assert sig.hex() == (
        "f13b7a2f8745c2703ff5fca96f708e1a1573fec85c4583fb2d0e96ca467defb2"
        "d2284904507e938997cd3b9534b89f84d08da64a935c79a85a89b4b613644606")


def test_key_of_node_id_and_known_keys() -> None:
    me = Identity.generate()
    assert key_of(me.node_id) == me.public_key
    assert key_of("token-node") is None
    assert key_of("token-node", {"token-node": me.public_key}) == me.public_key
    assert key_of(me.node_id.upper()) is None  # ids are lowercase hex (§2.1)


def test_box_opens_only_for_the_recipient_from_the_sender() -> None:
    alice, bob, carol = Identity.generate(), Identity.generate(), Identity.generate()
    sealed = seal_box(alice, bob.public_key, b"for bob only")
    assert b"for bob only" not in sealed
    assert len(sealed) == 24 + 16 + len(b"for bob only")  # nonce, tag, ciphertext
    assert open_box(bob, alice.public_key, sealed) == b"for bob only"
    with pytest.raises(DecryptError):  # the wrong recipient cannot open it
        open_box(carol, alice.public_key, sealed)
    with pytest.raises(DecryptError):  # nor can the recipient as if from someone else
        open_box(bob, carol.public_key, sealed)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(DecryptError):
        open_box(bob, alice.public_key, tampered)
    with pytest.raises(DecryptError):
        open_box(bob, alice.public_key, b"short")
    assert seal_box(alice, bob.public_key, b"x") != seal_box(alice, bob.public_key, b"x")


def test_box_interoperates_with_plain_nacl() -> None:
    """§12 as written: crypto_box with X25519 keys converted from the Ed25519 ones."""
    import nacl.bindings
    import nacl.public

    alice, bob = Identity.generate(), Identity.generate()
    sealed = seal_box(alice, bob.public_key, b"interop")
    bob_sk = nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(
        bytes(bob.signing_key._signing_key))
    alice_pk = nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(alice.public_key)
    plain = nacl.bindings.crypto_box_open(sealed[24:], sealed[:24], alice_pk, bob_sk)
    assert plain == b"interop"
    with pytest.raises(CryptoError):
        seal_box(alice, b"\x00" * 31, b"x")


def test_secretbox_and_group_keys() -> None:
    keys = GroupKeys()
    k1, k2 = b"\x01" * 32, b"\x02" * 32
    keys.add("room/1", "k1", k1)
    sealed = seal_secretbox(k1, b"members only")
    assert b"members only" not in sealed
    assert open_secretbox(k1, sealed) == b"members only"
    with pytest.raises(DecryptError):
        open_secretbox(k2, sealed)
    keys.add("room/1", "k2", k2)  # rotation: k2 current, k1 kept to open old ones
    assert keys.current("room/1") == ("k2", k2)
    assert keys.get("room/1", "k1") == k1
    keys.remove("room/1", "k2")
    assert keys.current("room/1") == ("k1", k1)
    assert keys.current("room/2") is None
    with pytest.raises(ValueError):
        keys.add("room/1", "bad kid", k1)
    with pytest.raises(ValueError):
        keys.add("room/1", "k3", b"short")


def test_undecryptable_message_raises_on_body_access() -> None:
    m = Message("m", "peer", b"", 1, 0, raw=b"cipher", enc="box",
                error=DecryptError("box does not open"))
    assert m.raw == b"cipher" and not m.decrypted
    with pytest.raises(DecryptError):
        _ = m.body


# -- §13 trace context ---------------------------------------------------------------


@pytest.fixture
def fake_otel(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A stand-in `opentelemetry.propagate` (the real one is not a dependency)."""
    state: dict[str, Any] = {"current": {"traceparent":
                                         "00-" + "a" * 32 + "-" + "b" * 16 + "-01",
                                         "tracestate": "k=v", "baggage": "x=1"}}
    pkg = types.ModuleType("opentelemetry")
    prop = types.ModuleType("opentelemetry.propagate")

    def inject(carrier: dict[str, str]) -> None:
        carrier.update(state["current"])

    def extract(carrier: dict[str, str]) -> Any:
        return ("context", dict(carrier))

    prop.inject = inject  # type: ignore[attr-defined]
    prop.extract = extract  # type: ignore[attr-defined]
    pkg.propagate = prop  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "opentelemetry", pkg)
    monkeypatch.setitem(sys.modules, "opentelemetry.propagate", prop)
    _otel.reset()
    yield state
    _otel.reset()


def test_trace_context_injected_and_extracted(fake_otel: dict[str, Any]) -> None:
    meta: dict[str, str] = {"app": "1"}
    _otel.inject(meta)
    assert meta == {"app": "1", "traceparent": fake_otel["current"]["traceparent"],
                    "tracestate": "k=v"}  # §13 keys only, no baggage
    own = {"traceparent": "00-" + "c" * 32 + "-" + "d" * 16 + "-01"}
    _otel.inject(own)  # the application's own context wins
    assert own == {"traceparent": "00-" + "c" * 32 + "-" + "d" * 16 + "-01"}
    assert _otel.extract(meta) == ("context", {"traceparent": meta["traceparent"],
                                               "tracestate": "k=v"})
    assert _otel.extract({"app": "1"}) is None


def test_no_opentelemetry_no_trace_context(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # import fails
    monkeypatch.setitem(sys.modules, "opentelemetry.propagate", None)
    _otel.reset()
    try:
        meta: dict[str, str] = {}
        _otel.inject(meta)
        assert meta == {}
        assert _otel.extract({"traceparent": "00-x"}) is None
    finally:
        _otel.reset()
