"""Tests for protocol.identity: node ids, §2 / §4 signatures, key files."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from openred.protocol.identity import (
    AUTH_CONTEXT,
    BODY_CONTEXT,
    Identity,
    KeyFileError,
    auth_message,
    body_message,
    is_node_id,
    key_file_is_private,
    load_key_file,
    node_id_for_key,
    save_key_file,
    verify_signature,
)

HUB = "hub-test"
NONCE = bytes(range(32))

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


# --- node ids ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "s",
    ["a", "A", "0", "node-1", "a.b_c:d-e", "x" * 128, "a" * 64, "._:-"],
)
def test_is_node_id_accepts(s: str) -> None:
    assert is_node_id(s)


@pytest.mark.parametrize(
    "s",
    [
        "",
        "x" * 129,
        "$admin",
        "a b",
        "a/b",
        "a\n",
        "\na",
        "é",
        "a\x00",
        "١٢٣",  # Arabic-Indic digits: not [0-9]
        "a*",
    ],
)
def test_is_node_id_refuses_str(s: str) -> None:
    assert not is_node_id(s)


@pytest.mark.parametrize("v", [None, 1, 1.5, b"node", ["a"], {"a": 1}, True])
def test_is_node_id_refuses_non_str(v: object) -> None:
    assert not is_node_id(v)


def test_node_id_for_key_is_lowercase_hex() -> None:
    ident = Identity.generate()
    nid = ident.node_id
    assert nid == node_id_for_key(ident.public_key)
    assert len(nid) == 64
    assert nid == nid.lower()
    assert bytes.fromhex(nid) == ident.public_key
    assert is_node_id(nid)


@pytest.mark.parametrize("bad", [b"", b"x" * 31, b"x" * 33])
def test_node_id_for_key_refuses_bad_length(bad: bytes) -> None:
    with pytest.raises(ValueError):
        node_id_for_key(bad)


# --- messages and signatures -------------------------------------------------------------


def test_message_layouts() -> None:
    assert AUTH_CONTEXT == b"openred-hub/v1/auth\x00"
    assert BODY_CONTEXT == b"openred-hub/v1/body\x00"
    assert auth_message("h", b"\x01\x02") == b"openred-hub/v1/auth\x00h\x00\x01\x02"
    assert body_message("n1", b"hi") == b"openred-hub/v1/body\x00n1\x00hi"


def test_sign_auth_roundtrip() -> None:
    ident = Identity.generate()
    sig = ident.sign_auth(HUB, NONCE)
    assert isinstance(sig, bytes) and len(sig) == 64
    assert verify_signature(ident.public_key, auth_message(HUB, NONCE), sig)


def test_sign_auth_wrong_nonce_or_hub_fails() -> None:
    ident = Identity.generate()
    sig = ident.sign_auth(HUB, NONCE)
    other_nonce = bytes(31) + b"\x01"
    assert not verify_signature(ident.public_key, auth_message(HUB, other_nonce), sig)
    assert not verify_signature(ident.public_key, auth_message("other-hub", NONCE), sig)


def test_wrong_key_fails() -> None:
    a, b = Identity.generate(), Identity.generate()
    sig = a.sign_auth(HUB, NONCE)
    assert not verify_signature(b.public_key, auth_message(HUB, NONCE), sig)


def test_auth_and_body_signatures_are_not_interchangeable() -> None:
    ident = Identity.generate()
    # Same variable parts, different context: domain separation must hold.
    sig = ident.sign_auth("n1", b"payload")
    assert not verify_signature(ident.public_key, body_message("n1", b"payload"), sig)
    body_sig = ident.sign_body("n1", b"payload")
    assert verify_signature(ident.public_key, body_message("n1", b"payload"), body_sig)
    assert not verify_signature(ident.public_key, body_message("n2", b"payload"), body_sig)
    assert not verify_signature(ident.public_key, body_message("n1", b"payloaD"), body_sig)


def test_tampered_signature_fails() -> None:
    ident = Identity.generate()
    sig = bytearray(ident.sign_auth(HUB, NONCE))
    sig[0] ^= 1
    assert not verify_signature(ident.public_key, auth_message(HUB, NONCE), bytes(sig))


@pytest.mark.parametrize(
    ("key", "sig"),
    [
        (b"", b"x" * 64),
        (b"k" * 31, b"x" * 64),
        (b"k" * 33, b"x" * 64),
        (b"k" * 32, b""),
        (b"k" * 32, b"x" * 63),
        (b"k" * 32, b"x" * 65),
        (bytes(32), bytes(64)),  # small-order key, all-zero signature
        (b"\xff" * 32, b"\xff" * 64),  # not a curve point
    ],
)
def test_verify_signature_bad_inputs_return_false(key: bytes, sig: bytes) -> None:
    assert verify_signature(key, b"msg", sig) is False


@pytest.mark.parametrize(
    ("key", "msg", "sig"),
    [
        (None, b"m", b"x" * 64),
        ("k" * 32, b"m", b"x" * 64),
        (b"k" * 32, "m", b"x" * 64),
        (b"k" * 32, b"m", None),
        (b"k" * 32, None, b"x" * 64),
    ],
)
def test_verify_signature_wrong_types_return_false(key: object, msg: object, sig: object) -> None:
    assert verify_signature(key, msg, sig) is False  # type: ignore[arg-type]


def test_from_seed_is_deterministic() -> None:
    seed = bytes(range(32))
    a, b = Identity.from_seed(seed), Identity.from_seed(seed)
    assert a.public_key == b.public_key
    assert a.seed == seed
    assert a.sign(b"m") == b.sign(b"m")  # Ed25519 is deterministic


@pytest.mark.parametrize("seed", [b"", bytes(31), bytes(33)])
def test_from_seed_refuses_bad_length(seed: bytes) -> None:
    with pytest.raises(ValueError):
        Identity.from_seed(seed)


def test_identity_is_frozen_and_repr_hides_key() -> None:
    ident = Identity.from_seed(b"\x42" * 32)
    with pytest.raises(AttributeError):
        ident.signing_key = Identity.generate().signing_key  # type: ignore[misc]
    assert ident.seed.hex() not in repr(ident)


# --- key files -----------------------------------------------------------------------------


def test_key_file_roundtrip(tmp_path: Path) -> None:
    ident = Identity.generate()
    path = tmp_path / "node.key"
    save_key_file(ident, path)
    loaded = load_key_file(path)
    assert loaded.public_key == ident.public_key
    assert loaded.seed == ident.seed
    # It is a standard PKCS#8 PEM Ed25519 key.
    data = path.read_bytes()
    assert data.startswith(b"-----BEGIN PRIVATE KEY-----")
    key = serialization.load_pem_private_key(data, password=None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)


def test_key_file_accepts_str_path(tmp_path: Path) -> None:
    ident = Identity.generate()
    path = str(tmp_path / "node.key")
    save_key_file(ident, path)
    assert load_key_file(path).node_id == ident.node_id


@posix_only
def test_key_file_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    old = os.umask(0)  # even with a permissive umask the file is 0600
    try:
        save_key_file(Identity.generate(), path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key_file_is_private(path)


def test_key_file_exclusive_create(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    first = Identity.generate()
    save_key_file(first, path)
    with pytest.raises(KeyFileError, match=re.escape(str(path))):
        save_key_file(Identity.generate(), path)
    # The original key is untouched.
    assert load_key_file(path).public_key == first.public_key


@posix_only
def test_key_file_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    save_key_file(Identity.generate(), path)
    path.chmod(0o644)
    second = Identity.generate()
    save_key_file(second, path, overwrite=True)
    assert load_key_file(path).public_key == second.public_key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key"]  # no temp left


def test_key_file_overwrite_creates_when_missing(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    ident = Identity.generate()
    save_key_file(ident, path, overwrite=True)
    assert load_key_file(path).public_key == ident.public_key


def test_save_into_missing_dir_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "node.key"
    with pytest.raises(KeyFileError, match="nope"):
        save_key_file(Identity.generate(), path)


def test_load_missing_key_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "missing.key"
    with pytest.raises(KeyFileError, match=re.escape(str(path))):
        load_key_file(path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage",
        b"\x00\xff" * 50,
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ],
)
def test_load_garbage_key_file_names_path(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.key"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match=re.escape(str(path))) as info:
        load_key_file(path)
    assert isinstance(info.value, ValueError)


def test_load_non_ed25519_key_refused(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "ec.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(KeyFileError, match="Ed25519"):
        load_key_file(path)


def test_load_encrypted_key_refused(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    path = tmp_path / "enc.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    with pytest.raises(KeyFileError, match="encrypted"):
        load_key_file(path)


def test_load_directory_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=re.escape(str(tmp_path))):
        load_key_file(tmp_path)


@posix_only
def test_key_file_is_private_detects_group_readable(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    save_key_file(Identity.generate(), path)
    assert key_file_is_private(path)
    path.chmod(0o640)
    assert not key_file_is_private(path)
    # Still loadable: the CLI only warns.
    load_key_file(path)
    path.chmod(0o604)
    assert not key_file_is_private(path)


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX only")
def test_key_file_is_private_missing(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError):
        key_file_is_private(tmp_path / "missing.key")
