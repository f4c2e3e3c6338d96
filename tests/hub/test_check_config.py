"""`check-config` (and `serve`, `token`) load every file the configuration names
(hub/preflight.py): a garbage TLS certificate or key, a key that does not match its
certificate, an encrypted key, a garbage or unusable JWT key, an empty secret file:
each is exit 2 with one line naming the key and the file, never the content."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from openred.hub.__main__ import main

from tests.broker.test_broker_resp import _tls_files
from tests.conftest import timeout
from tests.hub.test_cli import clean_env

GARBAGE = "-----BEGIN CERTIFICATE-----\nnot base64 at all: s3cr3t-looking-stuff\n"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    _ca, cert, key = _tls_files(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, _, other_key = _tls_files(other)
    ed = ed25519.Ed25519PrivateKey.generate()
    out = {"cert": cert, "key": key, "other_key": other_key,
           "garbage": tmp_path / "garbage.pem", "empty": tmp_path / "empty",
           "ed_pub": tmp_path / "ed.pub", "ed_priv": tmp_path / "ed.key",
           "rsa_pub": tmp_path / "rsa.pub", "enc_key": tmp_path / "enc.key"}
    out["garbage"].write_text(GARBAGE)
    out["empty"].write_text("\n")
    out["ed_pub"].write_bytes(ed.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    out["ed_priv"].write_bytes(ed.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    out["rsa_pub"].write_bytes(rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    out["enc_key"].write_bytes(rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw")))
    return out


def write_toml(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "hub.toml"
    path.write_text(body)
    return path


def check(tmp_path: Path, body: str, capsys: Any, monkeypatch: Any) -> tuple[int, str]:
    for name in [n for n in __import__("os").environ if n.startswith("OPENRED_HUB_")]:
        monkeypatch.delenv(name)
    code = main(["check-config", "--config", str(write_toml(tmp_path, body))])
    return code, capsys.readouterr().err


def test_good_files_are_ok(tmp_path: Path, files: dict[str, Path], capsys: Any,
                           monkeypatch: Any) -> None:
    body = (f'[server]\ntls_cert = "{files["cert"]}"\ntls_key = "{files["key"]}"\n'
            f'[admin]\ntls_cert = "{files["cert"]}"\ntls_key = "{files["key"]}"\n'
            f'[auth]\njwt_public_key_file = "{files["ed_pub"]}"\n'
            f'jwt_private_key_file = "{files["ed_priv"]}"\njwt_algorithms = ["EdDSA"]\n')
    code, err = check(tmp_path, body, capsys, monkeypatch)
    assert code == 0, err


CASES = [
    ("server", 'tls_cert = "{garbage}"\ntls_key = "{key}"', "server.tls_cert", "garbage",
     "not a PEM certificate chain"),
    ("server", 'tls_cert = "{cert}"\ntls_key = "{garbage}"', "server.tls_key", "garbage",
     "not a PEM private key"),
    ("admin", 'tls_cert = "{garbage}"\ntls_key = "{key}"', "admin.tls_cert", "garbage",
     "not a PEM certificate chain"),
    ("admin", 'tls_cert = "{cert}"\ntls_key = "{other_key}"', "admin.tls_key", "other_key",
     "does not match the certificate of admin.tls_cert"),
    ("admin", 'tls_cert = "{cert}"\ntls_key = "{enc_key}"', "admin.tls_key", "enc_key",
     "encrypted"),
    ("auth", 'jwt_public_key_file = "{garbage}"\njwt_algorithms = ["EdDSA"]',
     "auth.jwt_public_key_file", "garbage", "not a PEM public key"),
    ("auth", 'jwt_public_key_file = "{rsa_pub}"\njwt_algorithms = ["EdDSA"]',
     "auth.jwt_public_key_file", "rsa_pub", "suits none of auth.jwt_algorithms (EdDSA)"),
    ("auth", 'jwt_private_key_file = "{garbage}"', "auth.jwt_private_key_file", "garbage",
     "not an unencrypted PEM private key"),
    ("auth", 'jwt_secret = "file:{empty}"', "auth.jwt_secret", "empty", "is empty"),
    ("admin", 'tokens = ["file:{empty}"]', "admin.tokens", "empty", "is empty"),
]


@pytest.mark.parametrize(("section", "keys", "key", "bad", "problem"), CASES,
                         ids=[f"{c[2]}-{c[3]}" for c in CASES])
def test_bad_file_is_named_in_one_line(tmp_path: Path, files: dict[str, Path], capsys: Any,
                                       monkeypatch: Any, section: str, keys: str, key: str,
                                       bad: str, problem: str) -> None:
    body = f"[{section}]\n" + keys.format(**{k: str(v) for k, v in files.items()}) + "\n"
    code, err = check(tmp_path, body, capsys, monkeypatch)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"openred-hub: {key}: "), err
    assert str(files[bad]) in lines[0] and problem in lines[0], err
    assert "s3cr3t" not in err and "not base64" not in err


def test_serve_refuses_before_listening(tmp_path: Path, files: dict[str, Path]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    body = (f'[admin]\ntls_cert = "{files["cert"]}"\ntls_key = "{files["garbage"]}"\n'
            f"[server]\nadmin_port = {port}\nws_port = 0\n")
    write_toml(tmp_path, body)
    p = subprocess.run([sys.executable, "-m", "openred.hub", "serve"], cwd=tmp_path,
                       env=clean_env(), capture_output=True, text=True, timeout=timeout(30))
    assert p.returncode == 2
    assert p.stderr.strip() == (f"openred-hub: admin.tls_key: {files['garbage']}: "
                                "not a PEM private key")
    assert not (tmp_path / "openred-hub.db").exists()  # nothing was opened
