"""Every file the configuration names, loaded before anything listens (`check-config`,
`serve` and `token` run this; hub/__main__.py).

hub/config.py checks that such files exist and reads the secret files (`file:/path`);
this module loads what needs a parser: the TLS certificate chains and keys of
`server.*` and `admin.*` (each parsed, then the pair loaded together), the JWT public key
(of a type that one of `auth.jwt_algorithms` can use) and the JWT private key. The first
bad file stops it with a `ConfigError` of one line naming the key and the file, never
the file's content.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from openred.hub.config import Config, ConfigError
from openred.hub.tokens import TokenIssuer, TokenVerifier

__all__ = ["check_files"]


def _fail(key: str, path: str, problem: str) -> ConfigError:
    return ConfigError(f"{key}: {path}: {problem}", key=key)


def _read(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise _fail(key, path, f"cannot read: {(exc.strerror or 'error').lower()}") from None


def _tls_pair(section: str, cert: str | None, key: str | None) -> None:
    if cert is None or key is None:
        return  # both or neither: hub/config.py
    try:
        certs = x509.load_pem_x509_certificates(_read(f"{section}.tls_cert", cert))
    except ValueError:
        certs = []
    if not certs:
        raise _fail(f"{section}.tls_cert", cert, "not a PEM certificate chain")
    try:
        serialization.load_pem_private_key(_read(f"{section}.tls_key", key), password=None)
    except TypeError:
        raise _fail(f"{section}.tls_key", key, "an encrypted private key (the hub cannot "
                                               "ask for its password)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise _fail(f"{section}.tls_key", key, "not a PEM private key") from None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or "unusable"
        problem = ("does not match the certificate of " f"{section}.tls_cert"
                   if reason == "KEY_VALUES_MISMATCH" else f"refused by TLS ({reason.lower()})")
        raise _fail(f"{section}.tls_key", key, problem) from None


def check_files(cfg: Config) -> None:
    """Load every file `cfg` names; raise ConfigError at the first bad one."""
    _tls_pair("server", cfg.server.tls_cert, cfg.server.tls_key)
    _tls_pair("admin", cfg.admin.tls_cert, cfg.admin.tls_key)
    a = cfg.auth
    if a.jwt_public_key_file:
        pem = _read("auth.jwt_public_key_file", a.jwt_public_key_file)
        try:
            verifier = TokenVerifier(algorithms=a.jwt_algorithms, public_key_pem=pem)
        except ValueError as exc:
            msg = str(exc)
            if msg.startswith("no usable token algorithm"):
                msg = (f"its key type suits none of auth.jwt_algorithms "
                       f"({', '.join(a.jwt_algorithms)})")
            raise _fail("auth.jwt_public_key_file", a.jwt_public_key_file, msg) from None
        if not verifier.allowed_algorithms:  # pragma: no cover - the verifier refuses it
            raise _fail("auth.jwt_public_key_file", a.jwt_public_key_file, "unusable")
    if a.jwt_private_key_file:
        pem = _read("auth.jwt_private_key_file", a.jwt_private_key_file)
        try:
            TokenIssuer(private_key_pem=pem)
        except ValueError as exc:
            raise _fail("auth.jwt_private_key_file", a.jwt_private_key_file,
                        str(exc)) from None
    if cfg.tracing.enabled:
        # The OpenTelemetry packages are the `tracing` extra: missing, say so before
        # anything listens (hub/tracing.py imports them only when tracing is on).
        from openred.hub.tracing import check_available

        check_available()
