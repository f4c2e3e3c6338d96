"""Tests for protocol.handshake: the §2 challenge / hello / welcome exchange, sans-I/O.

The client and the server state machines talk through bytes only: every hello goes through
`decode_client`, every challenge and welcome through `decode_server`."""

from __future__ import annotations

from typing import Any

import msgpack
import nacl.signing
import pytest
from openred.hub.handshake import Authenticated, ServerHandshake
from openred.hub.tokens import TokenIssuer, TokenVerifier
from openred.protocol.errors import (
    AUTH_FAILED,
    CLOSE_AUTH_FAILED,
    CLOSE_FORBIDDEN,
    FORBIDDEN,
    HandshakeError,
    ProtocolViolation,
)
from openred.protocol.frames import (
    Hello,
    decode_client,
    decode_server,
    encode_error,
    encode_welcome,
)
from openred.protocol.handshake import ClientHandshake, Welcome
from openred.protocol.identity import Identity

HUB = "hub-test"
NONCE = bytes(range(32))
SECRET = "k" * 32  # HS256: at least 32 bytes
NOW = 1_700_000_000.0
AUTH_PREFIX = b"openred-hub/v1/auth\x00"


def issuer() -> TokenIssuer:
    return TokenIssuer(secret=SECRET)


def verifier(**kw: Any) -> TokenVerifier:
    return TokenVerifier(algorithms=["HS256"], secret=SECRET, **kw)


def challenge_of(server: ServerHandshake) -> dict[str, Any]:
    frames = decode_server(server.challenge())
    assert len(frames) == 1
    return frames[0]


def hello_of(data: bytes) -> Hello:
    frames = decode_client(data)
    assert len(frames) == 1
    assert type(frames[0]) is Hello, frames[0]
    return frames[0]


def refused(server: ServerHandshake, hello: Hello, now: float | None = None) -> HandshakeError:
    with pytest.raises(HandshakeError) as info:
        server.check(hello, now)
    exc = info.value
    assert exc.code == AUTH_FAILED
    assert exc.close_code == CLOSE_AUTH_FAILED
    assert isinstance(exc, ProtocolViolation)
    assert exc.reason
    return exc


def key_hello(identity: Identity, hub: str = HUB, nonce: bytes = NONCE, **kw: Any) -> Hello:
    fields: dict[str, Any] = {"key": identity.public_key, "sig": identity.sign_auth(hub, nonce),
                              "token": None, "batch": False, "meta": None, "v": 1}
    fields.update(kw)
    return Hello(**fields)


def token_hello(token: str, **kw: Any) -> Hello:
    fields: dict[str, Any] = {"key": None, "sig": None, "token": token, "batch": False,
                              "meta": None, "v": 1}
    fields.update(kw)
    return Hello(**fields)


# --- challenge ------------------------------------------------------------------------------


def test_challenge_shape() -> None:
    server = ServerHandshake(HUB, None, nonce=NONCE)
    frame = msgpack.unpackb(server.challenge(), raw=False)
    assert frame == {"t": "challenge", "v": 1, "hub": HUB, "nonce": NONCE}
    assert {k: type(v) for k, v in frame.items()} == {
        "t": str, "v": int, "hub": str, "nonce": bytes}


def test_default_nonce_is_32_fresh_random_bytes() -> None:
    nonces = {ServerHandshake(HUB, None).nonce for _ in range(50)}
    assert len(nonces) == 50
    assert all(type(n) is bytes and len(n) == 32 for n in nonces)
    server = ServerHandshake(HUB, None)
    assert challenge_of(server)["nonce"] == server.nonce


def test_challenge_is_stable_for_one_connection() -> None:
    server = ServerHandshake(HUB, None)
    assert server.challenge() == server.challenge()


# --- key auth -----------------------------------------------------------------------------


def test_key_hello_answering_the_challenge_is_accepted() -> None:
    identity = Identity.generate()
    server = ServerHandshake(HUB, None)
    client = ClientHandshake(identity=identity)
    hello = hello_of(client.hello(challenge_of(server)))
    assert hello.key == identity.public_key
    assert hello.token is None
    assert hello.v == 1
    auth = server.check(hello)
    assert auth == Authenticated(node_id=identity.public_key.hex(), key=identity.public_key,
                                 topics=None, batch=False, meta=None, method="key")
    assert auth.node_id == identity.node_id
    assert len(auth.node_id) == 64
    assert auth.node_id == auth.node_id.lower()
    assert client.hub_id == HUB


def test_key_hello_with_batch_and_meta() -> None:
    identity = Identity.generate()
    server = ServerHandshake(HUB, None)
    client = ClientHandshake(identity=identity, batch=True, meta={"name": "n1", "n": [1, 2]})
    hello = hello_of(client.hello(challenge_of(server)))
    auth = server.check(hello)
    assert auth.batch is True
    assert auth.meta == {"name": "n1", "n": [1, 2]}
    assert auth.method == "key"


def test_client_hello_without_batch_or_meta_omits_them() -> None:
    client = ClientHandshake(identity=Identity.generate())
    frame = msgpack.unpackb(client.hello(challenge_of(ServerHandshake(HUB, None))), raw=False)
    assert set(frame) == {"t", "v", "key", "sig"}
    assert type(frame["key"]) is bytes and len(frame["key"]) == 32
    assert type(frame["sig"]) is bytes and len(frame["sig"]) == 64


def test_signature_is_over_the_documented_bytes() -> None:
    # §2: sig = Ed25519(b"openred-hub/v1/auth\0" + HUB_ID + b"\0" + nonce), built here
    # with nacl directly so the test pins the wire contract, not identity.py.
    sk = nacl.signing.SigningKey(bytes(range(100, 132)))
    key = bytes(sk.verify_key)
    sig = sk.sign(AUTH_PREFIX + HUB.encode() + b"\x00" + NONCE).signature
    server = ServerHandshake(HUB, None, nonce=NONCE)
    data = msgpack.packb({"t": "hello", "key": key, "sig": sig}, use_bin_type=True)
    auth = server.check(hello_of(data))
    assert auth.node_id == key.hex()
    assert auth.key == key


def test_unicode_hub_id() -> None:
    identity = Identity.generate()
    server = ServerHandshake("hüb-✓", None)
    auth = server.check(hello_of(ClientHandshake(identity=identity).hello(challenge_of(server))))
    assert auth.node_id == identity.node_id


def test_forged_signature_refused() -> None:
    identity = Identity.generate()
    server = ServerHandshake(HUB, None, nonce=NONCE)
    refused(server, key_hello(identity, sig=bytes(64)))
    refused(server, key_hello(identity, sig=b"\xff" * 64))
    good = identity.sign_auth(HUB, NONCE)
    flipped = bytes([good[0] ^ 1]) + good[1:]
    refused(server, key_hello(identity, sig=flipped))


def test_signature_by_another_key_refused() -> None:
    a, b = Identity.generate(), Identity.generate()
    server = ServerHandshake(HUB, None, nonce=NONCE)
    refused(server, key_hello(a, sig=b.sign_auth(HUB, NONCE)))


def test_signature_over_another_hub_id_refused() -> None:
    identity = Identity.generate()
    server = ServerHandshake(HUB, None, nonce=NONCE)
    refused(server, key_hello(identity, hub="other-hub"))
    refused(server, key_hello(identity, hub=HUB + "x"))
    refused(server, key_hello(identity, hub=""))


def test_signature_over_another_nonce_refused() -> None:
    identity = Identity.generate()
    server = ServerHandshake(HUB, None, nonce=NONCE)
    refused(server, key_hello(identity, nonce=bytes(32)))
    refused(server, key_hello(identity, nonce=NONCE[:31]))


def test_replayed_hello_refused_by_a_new_connection() -> None:
    identity = Identity.generate()
    first = ServerHandshake(HUB, None)
    data = ClientHandshake(identity=identity).hello(challenge_of(first))
    assert first.check(hello_of(data)).node_id == identity.node_id
    second = ServerHandshake(HUB, None)  # a fresh nonce
    assert second.nonce != first.nonce
    refused(second, hello_of(data))


def test_body_signature_does_not_pass_as_auth_signature() -> None:
    identity = Identity.generate()
    server = ServerHandshake(HUB, None, nonce=NONCE)
    refused(server, key_hello(identity, sig=identity.sign_body(HUB, NONCE)))


def test_both_key_and_token_refused() -> None:
    identity = Identity.generate()
    token, _ = issuer().issue("node-1", 60, now=NOW)
    server = ServerHandshake(HUB, verifier(), nonce=NONCE)
    refused(server, key_hello(identity, token=token), NOW)
    data = msgpack.packb({"t": "hello", "key": identity.public_key,
                          "sig": identity.sign_auth(HUB, NONCE), "token": token},
                         use_bin_type=True)
    refused(server, hello_of(data), NOW)


def test_neither_key_nor_token_refused() -> None:
    server = ServerHandshake(HUB, verifier())
    refused(server, Hello(None, None, None, False, None, None))
    refused(server, hello_of(msgpack.packb({"t": "hello"})))
    refused(server, Hello(None, bytes(64), None, True, {"a": 1}, 1))  # a sig alone


@pytest.mark.parametrize("size", [0, 1, 31, 33, 64])
def test_key_not_32_bytes_refused(size: int) -> None:
    identity = Identity.generate()
    server = ServerHandshake(HUB, None, nonce=NONCE)
    key = (identity.public_key * 3)[:size]
    refused(server, key_hello(identity, key=key))


def test_key_of_31_bytes_through_the_decoder_refused() -> None:
    identity = Identity.generate()
    server = ServerHandshake(HUB, None, nonce=NONCE)
    data = msgpack.packb({"t": "hello", "key": identity.public_key[:31],
                          "sig": identity.sign_auth(HUB, NONCE)}, use_bin_type=True)
    refused(server, hello_of(data))


@pytest.mark.parametrize("sig", [None, b"", bytes(63), bytes(65)])
def test_missing_or_wrong_size_sig_refused(sig: bytes | None) -> None:
    identity = Identity.generate()
    server = ServerHandshake(HUB, None, nonce=NONCE)
    refused(server, key_hello(identity, sig=sig))


def test_small_order_key_refused() -> None:
    server = ServerHandshake(HUB, None, nonce=NONCE)
    refused(server, Hello(bytes(32), bytes(64), None, False, None, None))
    refused(server, Hello(b"\x01" + bytes(31), bytes(64), None, False, None, None))


# --- token auth -----------------------------------------------------------------------------


def test_token_hello_accepted_with_topics() -> None:
    token, _ = issuer().issue("node-1", 60, topics=["a/*", "b"], now=NOW)
    server = ServerHandshake(HUB, verifier(), nonce=NONCE)
    client = ClientHandshake(token=token, batch=True, meta={"x": 1})
    hello = hello_of(client.hello(challenge_of(server)))
    assert hello.token == token
    assert hello.key is None
    auth = server.check(hello, NOW)
    assert auth == Authenticated(node_id="node-1", key=None, topics=("a/*", "b"), batch=True,
                                 meta={"x": 1}, method="token")


def test_token_without_topics_claim_is_unrestricted() -> None:
    token, _ = issuer().issue("node-2", 60, now=NOW)
    auth = ServerHandshake(HUB, verifier()).check(token_hello(token), NOW)
    assert auth.node_id == "node-2"
    assert auth.topics is None


def test_token_with_empty_topics_allows_none() -> None:
    token, _ = issuer().issue("node-3", 60, topics=[], now=NOW)
    assert ServerHandshake(HUB, verifier()).check(token_hello(token), NOW).topics == ()


def test_expired_token_refused() -> None:
    token, exp = issuer().issue("node-1", 60, now=NOW)
    server = ServerHandshake(HUB, verifier(leeway_s=0))
    assert server.check(token_hello(token), exp - 1).node_id == "node-1"
    exc = refused(server, token_hello(token), exp + 1)
    assert token not in str(exc)
    assert token not in exc.reason


def test_expired_token_refused_past_the_default_leeway() -> None:
    token, exp = issuer().issue("node-1", 60, now=NOW)
    server = ServerHandshake(HUB, verifier())  # §2: 30 s of leeway by default
    assert server.check(token_hello(token), exp + 29).node_id == "node-1"
    refused(server, token_hello(token), exp + 31)


def test_token_when_no_verifier_configured_refused() -> None:
    token, _ = issuer().issue("node-1", 60, now=NOW)
    refused(ServerHandshake(HUB, None), token_hello(token), NOW)


def test_token_signed_with_another_secret_refused() -> None:
    token, _ = TokenIssuer(secret="z" * 40).issue("node-1", 60, now=NOW)
    exc = refused(ServerHandshake(HUB, verifier()), token_hello(token), NOW)
    assert token not in str(exc)


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "x" * 9000])
def test_malformed_token_refused(token: str) -> None:
    refused(ServerHandshake(HUB, verifier()), token_hello(token), NOW)


def test_token_with_audience() -> None:
    good, _ = issuer().issue("node-1", 60, now=NOW, audience="hub")
    bad, _ = issuer().issue("node-1", 60, now=NOW, audience="other")
    none, _ = issuer().issue("node-1", 60, now=NOW)
    server = ServerHandshake(HUB, verifier(audience="hub"))
    assert server.check(token_hello(good), NOW).node_id == "node-1"
    refused(server, token_hello(bad), NOW)
    refused(server, token_hello(none), NOW)


# --- client side ----------------------------------------------------------------------------


def test_client_needs_exactly_one_of_identity_or_token() -> None:
    with pytest.raises(ValueError):
        ClientHandshake()
    with pytest.raises(ValueError):
        ClientHandshake(identity=Identity.generate(), token="t")


def test_client_token_hello_shape() -> None:
    client = ClientHandshake(token="tok", batch=True, meta={"m": 1})
    frame = msgpack.unpackb(client.hello({"t": "challenge", "v": 1, "hub": HUB,
                                          "nonce": NONCE}), raw=False)
    assert frame == {"t": "hello", "v": 1, "token": "tok", "batch": True, "meta": {"m": 1}}


@pytest.mark.parametrize(
    "challenge",
    [
        {"t": "welcome", "hub": HUB, "nonce": NONCE},
        {"hub": HUB, "nonce": NONCE},
        {"t": "challenge", "nonce": NONCE},
        {"t": "challenge", "hub": HUB},
        {"t": "challenge", "hub": 5, "nonce": NONCE},
        {"t": "challenge", "hub": HUB, "nonce": "not-bin"},
        {"t": "error", "id": None, "code": "forbidden", "msg": "banned"},
    ],
)
def test_client_refuses_a_malformed_challenge(challenge: dict[str, Any]) -> None:
    with pytest.raises(HandshakeError):
        ClientHandshake(identity=Identity.generate()).hello(challenge)


LIMITS = {"max_frame_bytes": 131072, "max_body_bytes": 65536, "msgs_per_s": 100, "burst": 200,
          "max_topics": 1000}


def test_client_parses_welcome() -> None:
    client = ClientHandshake(identity=Identity.generate())
    [frame] = decode_server(encode_welcome("abc", "sess-9", 20, 4, LIMITS))
    assert client.welcome(frame) == Welcome(node="abc", session="sess-9", hb=20, pending=4,
                                            limits=LIMITS)


def test_client_welcome_without_limits() -> None:
    client = ClientHandshake(token="t")
    w = client.welcome({"t": "welcome", "node": "n", "session": "s", "hb": 5, "pending": 0})
    assert w.limits == {}


def test_client_raises_on_auth_failed_error() -> None:
    client = ClientHandshake(token="t")
    [frame] = decode_server(encode_error(None, AUTH_FAILED, "expired"))
    with pytest.raises(HandshakeError) as info:
        client.welcome(frame)
    assert info.value.code == AUTH_FAILED
    assert info.value.close_code == CLOSE_AUTH_FAILED
    assert "expired" in str(info.value)


def test_client_raises_on_forbidden_error_with_close_4003() -> None:
    # §2.4: a banned node, or an unregistered one in allowlist mode, gets
    # `error forbidden` then close 4003, not 4001.
    client = ClientHandshake(token="t")
    [frame] = decode_server(encode_error(None, FORBIDDEN, "banned"))
    with pytest.raises(HandshakeError) as info:
        client.welcome(frame)
    assert info.value.code == FORBIDDEN
    assert info.value.close_code == CLOSE_FORBIDDEN


@pytest.mark.parametrize("frame", [{"t": "ok", "id": 1}, {"t": "challenge"}, {},
                                   {"t": "msg", "mid": "m"}])
def test_client_raises_on_a_frame_that_is_not_welcome(frame: dict[str, Any]) -> None:
    with pytest.raises(HandshakeError):
        ClientHandshake(token="t").welcome(frame)


@pytest.mark.parametrize(
    "frame",
    [
        {"t": "welcome"},
        {"t": "welcome", "node": "n", "hb": 5, "pending": 0},  # no session
        {"t": "welcome", "node": "n", "session": "s", "hb": "soon", "pending": 0},
        {"t": "welcome", "node": "n", "session": "s", "hb": 5, "pending": None},
        {"t": "welcome", "node": "n", "session": "s", "hb": 5, "pending": 0, "limits": 7},
    ],
)
def test_client_raises_protocol_violation_on_a_malformed_welcome(frame: dict[str, Any]) -> None:
    # A sans-I/O state machine raises its own exception tree (errors.py), not KeyError /
    # ValueError / TypeError: a malformed welcome is the hub breaking the protocol.
    with pytest.raises(ProtocolViolation):
        ClientHandshake(token="t").welcome(frame)


# --- full exchange, bytes only ------------------------------------------------------------


def test_full_exchange_over_bytes() -> None:
    identity = Identity.generate()
    server = ServerHandshake(HUB, None)
    client = ClientHandshake(identity=identity, batch=True)
    wire_challenge = server.challenge()
    wire_hello = client.hello(decode_server(wire_challenge)[0])
    auth = server.check(decode_client(wire_hello)[0])  # type: ignore[arg-type]
    wire_welcome = encode_welcome(auth.node_id, "s1", 20, 0, LIMITS)
    welcome = client.welcome(decode_server(wire_welcome)[0])
    assert welcome.node == identity.node_id
    assert auth.batch is True
