"""Tests for openred.hub.tokens: §2 token auth, the ``topics`` claim, issuing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from openred.hub.tokens import (
    MAX_TOKEN_CHARS,
    TOKEN_ERROR_REASONS,
    TokenClaims,
    TokenError,
    TokenIssuer,
    TokenVerifier,
    is_topic_pattern,
    topic_allowed,
)

SECRET = "s" * 32 + "-test-secret"
NOW = 1_700_000_000.0
NODE = "node-1"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def craft(
    header: dict[str, Any], payload: Any, sig: bytes = b"", *, key: bytes | None = None
) -> str:
    """Build a JWS by hand; with ``key`` the signature is HMAC-SHA256 over it."""
    h = b64(json.dumps(header).encode())
    p = b64(json.dumps(payload).encode())
    if key is not None:
        sig = hmac.new(key, f"{h}.{p}".encode(), hashlib.sha256).digest()
    return f"{h}.{p}.{b64(sig)}"


def hs_verifier(**kw: Any) -> TokenVerifier:
    return TokenVerifier(algorithms=["HS256"], secret=SECRET, **kw)


def hs_token(payload: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def reason(verifier: TokenVerifier, token: Any, now: float = NOW) -> str:
    with pytest.raises(TokenError) as info:
        verifier.verify(token, now=now)
    assert info.value.reason in TOKEN_ERROR_REASONS
    return info.value.reason


def pem_private(key: Any) -> bytes:
    return key.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def pem_public(key: Any) -> bytes:
    return key.public_key().public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# --- HS256 basics ----------------------------------------------------------------------


def test_valid_hs256() -> None:
    token = hs_token({"sub": NODE, "exp": int(NOW) + 60})
    claims = hs_verifier().verify(token, now=NOW)
    assert claims == TokenClaims(sub=NODE, exp=int(NOW) + 60, topics=None)


def test_default_now_is_wall_clock() -> None:
    token, exp = TokenIssuer(secret=SECRET).issue(NODE, 60)
    assert hs_verifier().verify(token).exp == exp


def test_wrong_secret_is_bad_signature() -> None:
    token = hs_token({"sub": NODE, "exp": int(NOW) + 60}, secret="x" * 40)
    assert reason(hs_verifier(), token) == "bad_signature"


def test_tampered_payload_is_bad_signature() -> None:
    token = hs_token({"sub": NODE, "exp": int(NOW) + 60})
    h, _, s = token.split(".")
    p = b64(json.dumps({"sub": "admin", "exp": int(NOW) + 60}).encode())
    assert reason(hs_verifier(), f"{h}.{p}.{s}") == "bad_signature"


def test_expired_beyond_leeway_refused() -> None:
    token = hs_token({"sub": NODE, "exp": int(NOW) - 31})
    assert reason(hs_verifier(leeway_s=30), token) == "expired"
    # exp exactly at now - leeway is expired too (as pyjwt: exp <= now - leeway).
    token = hs_token({"sub": NODE, "exp": int(NOW) - 30})
    assert reason(hs_verifier(leeway_s=30), token) == "expired"


def test_expired_within_leeway_accepted() -> None:
    token = hs_token({"sub": NODE, "exp": int(NOW) - 29})
    assert hs_verifier(leeway_s=30).verify(token, now=NOW).sub == NODE


def test_zero_leeway() -> None:
    v = hs_verifier(leeway_s=0)
    assert v.verify(hs_token({"sub": NODE, "exp": int(NOW) + 1}), now=NOW).sub == NODE
    assert reason(v, hs_token({"sub": NODE, "exp": int(NOW)})) == "expired"


def test_nbf_in_future_refused() -> None:
    token = hs_token({"sub": NODE, "exp": int(NOW) + 600, "nbf": int(NOW) + 31})
    assert reason(hs_verifier(leeway_s=30), token) == "not_yet_valid"


def test_nbf_within_leeway_accepted() -> None:
    token = hs_token({"sub": NODE, "exp": int(NOW) + 600, "nbf": int(NOW) + 29})
    assert hs_verifier(leeway_s=30).verify(token, now=NOW).sub == NODE


def test_iat_in_future_is_ignored() -> None:
    token = hs_token({"sub": NODE, "exp": int(NOW) + 600, "iat": int(NOW) + 3600})
    assert hs_verifier().verify(token, now=NOW).sub == NODE


def test_missing_exp_refused() -> None:
    assert reason(hs_verifier(), hs_token({"sub": NODE})) == "missing_exp"


@pytest.mark.parametrize("exp", ["1700000060", None, True, [1], {"a": 1}])
def test_bad_exp_type_refused(exp: Any) -> None:
    token = craft({"alg": "HS256", "typ": "JWT"}, {"sub": NODE, "exp": exp}, key=SECRET.encode())
    assert reason(hs_verifier(), token) == "bad_exp"


def test_nan_exp_refused() -> None:
    # Python's json accepts NaN/Infinity; they must not slip through comparisons.
    h = b64(b'{"alg":"HS256"}')
    for raw in (b'{"sub":"node-1","exp":NaN}', b'{"sub":"node-1","exp":Infinity}'):
        p = b64(raw)
        sig = hmac.new(SECRET.encode(), f"{h}.{p}".encode(), hashlib.sha256).digest()
        assert reason(hs_verifier(), f"{h}.{p}.{b64(sig)}") == "bad_exp"


def test_float_exp_floored() -> None:
    token = hs_token({"sub": NODE, "exp": NOW + 60.7})
    assert hs_verifier().verify(token, now=NOW).exp == int(NOW) + 60


def test_bad_nbf_type_refused() -> None:
    token = hs_token({"sub": NODE, "exp": int(NOW) + 60, "nbf": "soon"})
    assert reason(hs_verifier(), token) == "bad_nbf"


@pytest.mark.parametrize("sub", ["", "$admin", "a b", "x" * 129, 42, None, ["node-1"]])
def test_bad_sub_refused(sub: Any) -> None:
    token = hs_token({"sub": sub, "exp": int(NOW) + 60}) if sub is not None else None
    if token is None:
        token = hs_token({"exp": int(NOW) + 60})
    assert reason(hs_verifier(), token) == "bad_sub"


def test_sub_128_chars_accepted() -> None:
    token = hs_token({"sub": "x" * 128, "exp": int(NOW) + 60})
    assert hs_verifier().verify(token, now=NOW).sub == "x" * 128


# --- algorithms ----------------------------------------------------------------------------


def test_alg_none_refused() -> None:
    token = craft({"alg": "none", "typ": "JWT"}, {"sub": NODE, "exp": int(NOW) + 60})
    assert reason(hs_verifier(), token) == "bad_algorithm"
    token = craft({"alg": "None"}, {"sub": NODE, "exp": int(NOW) + 60})
    assert reason(hs_verifier(), token) == "bad_algorithm"


@pytest.mark.parametrize("header", [{}, {"alg": None}, {"alg": 5}, {"alg": ["HS256"]}])
def test_missing_or_ill_typed_alg_refused(header: dict[str, Any]) -> None:
    token = craft(header, {"sub": NODE, "exp": int(NOW) + 60}, key=SECRET.encode())
    assert reason(hs_verifier(), token) == "bad_algorithm"


def test_none_cannot_be_configured() -> None:
    with pytest.raises(ValueError, match="none"):
        TokenVerifier(algorithms=["HS256", "none"], secret=SECRET)


def test_unknown_algorithm_cannot_be_configured() -> None:
    with pytest.raises(ValueError, match="HS512"):
        TokenVerifier(algorithms=["HS512"], secret=SECRET)


def test_algorithms_must_not_be_a_str() -> None:
    with pytest.raises(TypeError):
        TokenVerifier(algorithms="HS256", secret=SECRET)


def test_unconfigured_algorithm_refused(ed_key: ed25519.Ed25519PrivateKey) -> None:
    # The verifier holds an HMAC secret AND an Ed25519 key, but only HS256 is configured.
    v = TokenVerifier(algorithms=["HS256"], secret=SECRET, public_key_pem=pem_public(ed_key))
    assert v.allowed_algorithms == {"HS256"}
    token, _ = TokenIssuer(private_key_pem=pem_private(ed_key)).issue(NODE, 60, now=NOW)
    assert reason(v, token) == "bad_algorithm"


def test_configured_but_keyless_algorithm_refused(ed_key: ed25519.Ed25519PrivateKey) -> None:
    # ES256 is configured but the key is Ed25519: ES256 is not usable.
    v = TokenVerifier(algorithms=["EdDSA", "ES256", "HS256"], public_key_pem=pem_public(ed_key))
    assert v.allowed_algorithms == {"EdDSA"}
    token = hs_token({"sub": NODE, "exp": int(NOW) + 60})
    assert reason(v, token) == "bad_algorithm"
    es_key = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode({"sub": NODE, "exp": int(NOW) + 60}, es_key, algorithm="ES256")
    assert reason(v, token) == "bad_algorithm"


def test_hs256_with_public_key_as_secret_refused(ed_key: ed25519.Ed25519PrivateKey) -> None:
    public_pem = pem_public(ed_key)
    payload = {"sub": NODE, "exp": int(NOW) + 60}
    token = craft({"alg": "HS256", "typ": "JWT"}, payload, key=public_pem)
    # EdDSA only: HS256 is refused before any verification.
    v = TokenVerifier(algorithms=["EdDSA"], public_key_pem=public_pem)
    assert reason(v, token) == "bad_algorithm"
    # HS256 configured (with its own secret) too: the public key is never the HMAC key.
    v2 = TokenVerifier(algorithms=["EdDSA", "HS256"], public_key_pem=public_pem, secret=SECRET)
    assert reason(v2, token) == "bad_signature"


def test_eddsa_header_with_hmac_signature_refused(ed_key: ed25519.Ed25519PrivateKey) -> None:
    v = TokenVerifier(
        algorithms=["EdDSA", "HS256"], public_key_pem=pem_public(ed_key), secret=SECRET
    )
    token = craft({"alg": "EdDSA"}, {"sub": NODE, "exp": int(NOW) + 60}, key=SECRET.encode())
    assert reason(v, token) == "bad_signature"


def test_no_usable_algorithm_is_a_config_error(ed_key: ed25519.Ed25519PrivateKey) -> None:
    with pytest.raises(ValueError):
        TokenVerifier(algorithms=["HS256"])
    with pytest.raises(ValueError):
        TokenVerifier(algorithms=["ES256"], public_key_pem=pem_public(ed_key))
    with pytest.raises(ValueError):
        TokenVerifier(algorithms=[], secret=SECRET)


def test_bad_key_material_is_a_config_error() -> None:
    with pytest.raises(ValueError):
        TokenVerifier(algorithms=["HS256"], secret="short")
    with pytest.raises(ValueError):
        TokenVerifier(algorithms=["EdDSA"], public_key_pem=b"not a pem")
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ValueError):
        TokenVerifier(algorithms=["ES256"], public_key_pem=pem_public(p384))
    small_rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError):
        TokenVerifier(algorithms=["RS256"], public_key_pem=pem_public(small_rsa))
    with pytest.raises(ValueError):
        hs_verifier(leeway_s=-1)
    with pytest.raises(ValueError):
        hs_verifier(audience="")


# --- audience --------------------------------------------------------------------------------


def test_audience_match() -> None:
    v = hs_verifier(audience="openred")
    ok = hs_token({"sub": NODE, "exp": int(NOW) + 60, "aud": "openred"})
    assert v.verify(ok, now=NOW).sub == NODE
    ok_list = hs_token({"sub": NODE, "exp": int(NOW) + 60, "aud": ["other", "openred"]})
    assert v.verify(ok_list, now=NOW).sub == NODE


@pytest.mark.parametrize("aud", ["other", ["other"], [], 5, None, "openred2", "OPENRED"])
def test_wrong_audience_refused(aud: Any) -> None:
    token = hs_token({"sub": NODE, "exp": int(NOW) + 60, "aud": aud})
    assert reason(hs_verifier(audience="openred"), token) == "bad_audience"


def test_missing_audience_refused_when_configured() -> None:
    token = hs_token({"sub": NODE, "exp": int(NOW) + 60})
    assert reason(hs_verifier(audience="openred"), token) == "bad_audience"


def test_audience_not_checked_when_not_configured() -> None:
    token = hs_token({"sub": NODE, "exp": int(NOW) + 60, "aud": "anything"})
    assert hs_verifier().verify(token, now=NOW).sub == NODE


# --- topics ----------------------------------------------------------------------------------


def test_topics_claim_parsed() -> None:
    token = hs_token({"sub": NODE, "exp": int(NOW) + 60, "topics": ["a/*", "b", "*"]})
    assert hs_verifier().verify(token, now=NOW).topics == ("a/*", "b", "*")


def test_empty_topics_claim_allows_nothing() -> None:
    token = hs_token({"sub": NODE, "exp": int(NOW) + 60, "topics": []})
    claims = hs_verifier().verify(token, now=NOW)
    assert claims.topics == ()
    assert not topic_allowed(claims.topics, "a")


@pytest.mark.parametrize(
    "topics",
    [
        "a/*",
        None,
        {"a": 1},
        [1],
        [""],
        ["a b"],
        ["a**"],
        ["*a"],
        ["a/*/b"],
        ["x" * 201],
        ["é"],
        [["a"]],
        ["ok", None],
    ],
)
def test_bad_topics_claim_refused(topics: Any) -> None:
    token = hs_token({"sub": NODE, "exp": int(NOW) + 60, "topics": topics})
    assert reason(hs_verifier(), token) == "bad_topics"


@pytest.mark.parametrize(
    ("pattern", "ok"),
    [
        ("a", True),
        ("*", True),
        ("a/*", True),
        ("x" * 200, True),
        ("x" * 200 + "*", True),
        ("x" * 201, False),
        ("x" * 201 + "*", False),
        ("a.b_c:d-e/f", True),
        ("", False),
        ("**", False),
        ("a*b", False),
        (None, False),
        (5, False),
    ],
)
def test_is_topic_pattern(pattern: object, ok: bool) -> None:
    assert is_topic_pattern(pattern) is ok


@pytest.mark.parametrize(
    ("patterns", "topic", "ok"),
    [
        (None, "anything", True),
        ((), "a", False),
        (("*",), "a/b/c", True),
        (("a/*",), "a/b", True),
        (("a/*",), "a/b/c", True),
        (("a/*",), "a/", True),
        (("a/*",), "a", False),
        (("a/*",), "ab", False),
        (("a/*",), "b/a", False),
        (("a*",), "ab", True),
        (("a",), "a", True),
        (("a",), "ab", False),
        (("a",), "A", False),
        (("x", "y/*"), "y/z", True),
        (("x", "y/*"), "z", False),
    ],
)
def test_topic_allowed(patterns: tuple[str, ...] | None, topic: str, ok: bool) -> None:
    assert topic_allowed(patterns, topic) is ok


# --- asymmetric roundtrips -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key_fixture", "alg"),
    [("ed_key", "EdDSA"), ("ec_key", "ES256"), ("rsa_key", "RS256")],
)
def test_asymmetric_roundtrip(key_fixture: str, alg: str, request: pytest.FixtureRequest) -> None:
    key = request.getfixturevalue(key_fixture)
    issuer = TokenIssuer(private_key_pem=pem_private(key))
    assert issuer.algorithm == alg
    token, exp = issuer.issue(NODE, 120, topics=["chat/*"], now=NOW, audience="openred")
    assert exp == int(NOW) + 120
    assert jwt.get_unverified_header(token)["alg"] == alg
    v = TokenVerifier(
        algorithms=["EdDSA", "ES256", "RS256"], public_key_pem=pem_public(key), audience="openred"
    )
    assert v.allowed_algorithms == {alg}
    assert v.verify(token, now=NOW) == TokenClaims(sub=NODE, exp=exp, topics=("chat/*",))
    # The same token against another key of the same type fails.
    if alg == "EdDSA":
        other_key: Any = ed25519.Ed25519PrivateKey.generate()
    elif alg == "ES256":
        other_key = ec.generate_private_key(ec.SECP256R1())
    else:
        other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    v2 = TokenVerifier(algorithms=[alg], public_key_pem=pem_public(other_key))
    assert reason(v2, token) == "bad_signature"


def test_issuer_explicit_algorithm_must_match_key(ed_key: ed25519.Ed25519PrivateKey) -> None:
    assert TokenIssuer(private_key_pem=pem_private(ed_key), algorithm="EdDSA").algorithm == "EdDSA"
    with pytest.raises(ValueError):
        TokenIssuer(private_key_pem=pem_private(ed_key), algorithm="RS256")
    with pytest.raises(ValueError):
        TokenIssuer(secret=SECRET, algorithm="EdDSA")


def test_issuer_config_errors(ed_key: ed25519.Ed25519PrivateKey) -> None:
    with pytest.raises(ValueError):
        TokenIssuer()
    with pytest.raises(ValueError):
        TokenIssuer(secret=SECRET, private_key_pem=pem_private(ed_key))
    with pytest.raises(ValueError):
        TokenIssuer(private_key_pem=b"garbage")
    with pytest.raises(ValueError):
        TokenIssuer(secret="short")


def test_issuer_hs256_roundtrip() -> None:
    issuer = TokenIssuer(secret=SECRET)
    assert issuer.algorithm == "HS256"
    token, exp = issuer.issue(NODE, 60, now=NOW)
    assert exp == int(NOW) + 60
    claims = hs_verifier().verify(token, now=NOW)
    assert claims == TokenClaims(sub=NODE, exp=exp, topics=None)
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload["iat"] == int(NOW)
    assert "aud" not in payload and "topics" not in payload


@pytest.mark.parametrize("sub", ["", "$admin", "x" * 129, "a b"])
def test_issuer_refuses_bad_sub(sub: str) -> None:
    with pytest.raises(ValueError):
        TokenIssuer(secret=SECRET).issue(sub, 60)


@pytest.mark.parametrize("ttl", [0, 0.5, -1, float("nan"), float("inf")])
def test_issuer_refuses_bad_ttl(ttl: float) -> None:
    with pytest.raises(ValueError):
        TokenIssuer(secret=SECRET).issue(NODE, ttl)


def test_issuer_refuses_bad_topics() -> None:
    with pytest.raises(ValueError):
        TokenIssuer(secret=SECRET).issue(NODE, 60, topics=["a b"])
    with pytest.raises(TypeError):
        TokenIssuer(secret=SECRET).issue(NODE, 60, topics="a/*")


# --- garbage ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        "",
        "a",
        "a.b",
        "a.b.c",
        "a.b.c.d",
        "...",
        "eyJ.eyJ.eyJ",
        b64(b"[1]") + "." + b64(b"{}") + ".",
        b64(b'"str"') + "." + b64(b"{}") + ".",
        b64(b"{") + "." + b64(b"{}") + ".",
        b64(b'{"alg":"HS256"}') + ".!!!." + b64(b"x"),
        b64(b'{"alg":"HS256"}') + "." + b64(b"{}") + ".%%%",
        "é.é.é",
        "\x00" * 10,
        "x" * (MAX_TOKEN_CHARS + 1),
        "a" * 100_000,
    ],
)
def test_garbage_is_malformed(token: str) -> None:
    assert reason(hs_verifier(), token) in {"malformed", "bad_algorithm"}


@pytest.mark.parametrize("token", [None, 1, b"x.y.z", ["a"], {"t": 1}])
def test_non_str_token_malformed(token: Any) -> None:
    assert reason(hs_verifier(), token) == "malformed"


def test_payload_not_an_object_is_malformed() -> None:
    for payload in ([1, 2], "str", 5, None):
        token = craft({"alg": "HS256"}, payload, key=SECRET.encode())
        assert reason(hs_verifier(), token) == "malformed"


def test_deeply_nested_payload_is_malformed_or_refused() -> None:
    h = b64(b'{"alg":"HS256"}')
    p = b64(b"[" * 5000 + b"]" * 5000)
    sig = hmac.new(SECRET.encode(), f"{h}.{p}".encode(), hashlib.sha256).digest()
    token = f"{h}.{p}.{b64(sig)}"
    if len(token) <= MAX_TOKEN_CHARS:
        assert reason(hs_verifier(), token) == "malformed"


def test_error_message_never_echoes_token() -> None:
    secret_looking = hs_token({"sub": NODE, "exp": int(NOW) - 3600})
    with pytest.raises(TokenError) as info:
        hs_verifier().verify(secret_looking, now=NOW)
    assert secret_looking not in str(info.value)
    assert info.value.reason == "expired"
    for part in secret_looking.split("."):
        assert part not in str(info.value)


_TOKEN_CHARS = st.sampled_from(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ "
)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=300),
        st.text(_TOKEN_CHARS, max_size=300),
        st.lists(st.text(_TOKEN_CHARS, max_size=80), min_size=1, max_size=5).map(".".join),
        st.tuples(
            st.dictionaries(st.text(max_size=5), st.none() | st.text(max_size=8), max_size=3),
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c),
                max_leaves=10,
            ),
        ).map(lambda hp: craft({**hp[0], "alg": "HS256"}, hp[1], key=SECRET.encode())),
    )
)
def test_verify_arbitrary_text_raises_only_token_error(token: str) -> None:
    v = TokenVerifier(algorithms=["HS256"], secret=SECRET, audience="openred")
    try:
        v.verify(token, now=NOW)
    except TokenError as e:
        assert e.reason in TOKEN_ERROR_REASONS
