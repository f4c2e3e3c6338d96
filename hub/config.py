"""Hub configuration: parsed once, at start-up, into frozen dataclasses.

Longer than ~500 lines on purpose: it is one table of every key with its default and its
rule side by side (STYLE.md "Names, errors, config"), and splitting the table would put a
key's default and its check in different files.

This module owns README.md "Configuration": the sections and keys of
`hub.toml`, their defaults (the dataclass defaults below, and nowhere else), the
`OPENRED_HUB_<SECTION>_<KEY>` environment variables and the command-line overrides.
Precedence, highest first: overrides (flags), environment, file, defaults.

Everything that comes from outside is validated here, so nothing downstream re-checks a
value. A bad value or an unknown key raises `ConfigError`, whose text is one line naming
the key (`section.key`) or the environment variable and what is allowed; the command
line prints it and exits with code 2.

Secrets (`auth.jwt_secret`, each of `admin.tokens`) may be written as `file:/path`: the
value is then the file's content without its trailing newline. They never appear in a
repr, a str or an error message. Database and Redis URLs are shown with their password
masked (`redact_url`).

Relative paths (TLS files, key files, `file:` secrets, SQLite databases) are relative to
the working directory of the process, not to the configuration file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import secrets
import tomllib
import typing
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from openred.hub.forwarded import parse_network

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ENV_PREFIX",
    "JWT_ALGORITHMS",
    "AdminConfig",
    "AuthConfig",
    "BrokerConfig",
    "Config",
    "ConfigError",
    "LimitsConfig",
    "LogConfig",
    "ServerConfig",
    "StoreConfig",
    "TracingConfig",
    "config_keys",
    "effective_limits",
    "env_var_name",
    "load_config",
    "new_instance_id",
    "redact_url",
]

ENV_PREFIX: Final = "OPENRED_HUB_"
DEFAULT_CONFIG_PATH: Final = "hub.toml"
SECRET_FILE_PREFIX: Final = "file:"
# docs/protocol.md §2: the algorithms a node token may be signed with. "none" never is.
JWT_ALGORITHMS: Final = ("HS256", "EdDSA", "ES256", "RS256")
# RFC 7518 §3.2: an HS256 key MUST be at least as long as the hash output (256 bits);
# PyJWT warns below that too.
MIN_JWT_SECRET_BYTES: Final = 32


class ConfigError(Exception):
    """The configuration cannot be used: unknown key, bad value, unreadable file.

    `str(error)` is one line naming the key (`section.key`) or the environment variable
    and what is allowed. `key` holds that name (None for whole-file problems).
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class _Bad(Exception):
    """A value failed a check; the caller adds the key's name."""


# --- rules attached to each field ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Rule:
    """What a key accepts, beyond its type (which comes from the annotation)."""

    ge: float | None = None  # value >= ge
    gt: float | None = None  # value > gt
    le: float | None = None  # value <= le
    choices: tuple[str, ...] | None = None  # case-insensitive, stored lower-case
    check: Callable[[Any], Any] | None = None  # returns the (normalised) value or raises _Bad
    allowed: str | None = None  # what to say is allowed, when `check` decides
    secret: bool = False  # never echo the value
    show: Callable[[Any], str] | None = None  # how to echo the value in an error


_T = TypeVar("_T")


def _key(default: _T, **rule: Any) -> _T:
    result: _T = field(default=default, metadata={"rule": _Rule(**rule)})
    return result


# --- per-key checks ----------------------------------------------------------------------

_IDENT_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_IDENT_ALLOWED: Final = "must be 1..64 characters of letters, digits, '.', '_', ':', '-'"


def new_instance_id() -> str:
    """A fresh instance id: "hub-" and 8 hex digits."""
    return "hub-" + secrets.token_hex(4)


def _check_ident(value: str) -> str:
    if not _IDENT_RE.fullmatch(value):
        raise _Bad(_IDENT_ALLOWED)
    return value


def _check_host(value: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise _Bad("must be a host name or IP address")
    return value


_PROXIES_ALLOWED: Final = "must be a list of IP addresses or CIDR networks (e.g. 10.0.0.0/8)"


_ORIGINS_ALLOWED: Final = (
    "must be a list of origins (scheme://host[:port], e.g. https://app.example.com), "
    "'null', or '*' for any"
)
_ORIGIN_RE: Final = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s?#@]+")


def _check_origins(value: tuple[str, ...]) -> tuple[str, ...]:
    """Browsers send `Origin` as scheme://host[:port], lower-case scheme and host
    (RFC 6454 §6.2): entries are compared as given after lower-casing."""
    result: list[str] = []
    for item in value:
        origin = item.strip().lower().rstrip("/")
        if origin not in ("*", "null") and not _ORIGIN_RE.fullmatch(origin):
            raise _Bad(f"{_ORIGINS_ALLOWED}, got {item!r}")
        result.append(origin)
    return tuple(result)


def _check_trusted_proxies(value: tuple[str, ...]) -> tuple[str, ...]:
    result: list[str] = []
    for item in value:
        try:
            net = parse_network(item)
        except ValueError as exc:
            # 10.1.2.3/8 is a typo for 10.0.0.0/8 or for 10.1.2.3: refuse to guess.
            hint = " (host bits set)" if "host bits" in str(exc) else ""
            raise _Bad(f"{_PROXIES_ALLOWED}, got {item!r}{hint}") from None
        result.append(str(net))
    return tuple(result)


def _check_file(value: str | None) -> str | None:
    if value is not None and not os.path.isfile(value):
        raise _Bad("must name an existing file")
    return value


def _read_secret(value: str) -> str:
    """Resolve `file:/path` to the file's content without its trailing newline."""
    if not value.startswith(SECRET_FILE_PREFIX):
        return value
    path = value[len(SECRET_FILE_PREFIX) :]
    if not path:
        raise _Bad("'file:' must be followed by a path")
    try:
        content = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise _Bad(f"cannot read secret file {path!r}: {reason.lower()}") from None
    content = content.rstrip("\r\n")
    if not content:
        raise _Bad(f"secret file {path!r} is empty")
    return content


def _check_jwt_secret(value: str | None) -> str | None:
    if value is None:
        return None
    value = _read_secret(value)
    length = len(value.encode("utf-8"))
    if length < MIN_JWT_SECRET_BYTES:
        raise _Bad(f"must be at least {MIN_JWT_SECRET_BYTES} bytes (got {length} bytes)")
    return value


def _check_jwt_algorithms(value: tuple[str, ...]) -> tuple[str, ...]:
    canonical = {alg.lower(): alg for alg in JWT_ALGORITHMS}
    result: list[str] = []
    for alg in value:
        if alg.strip().lower() == "none":
            raise _Bad(f"'none' is never allowed (allowed: {', '.join(JWT_ALGORITHMS)})")
        name = canonical.get(alg.strip().lower())
        if name is None:
            raise _Bad(f"must be a list of {', '.join(JWT_ALGORITHMS)}, got {alg!r}")
        if name not in result:
            result.append(name)
    return tuple(result)


def _check_tokens(value: tuple[str, ...]) -> tuple[str, ...]:
    """Each entry resolved (`file:/path`, whole or as a named token's secret) and parsed
    by admin_http/tokens.py: `NAME:SCOPE:SECRET`, `NAME:SCOPE:sha256:HEX` or an old-style
    token (scope admin). Errors name the entry's position, never its secret."""
    from openred.admin_http.tokens import TokenTable, inline_file_secret, parse_token

    result: list[str] = []
    parsed = []
    for position, raw in enumerate(value, start=1):
        try:
            token = inline_file_secret(_read_secret(raw), _read_secret)
            parsed.append(parse_token(token))
        except ValueError as exc:
            raise _Bad(f"token #{position} {exc}") from None
        result.append(token)
    try:
        TokenTable(parsed)
    except ValueError as exc:
        raise _Bad(str(exc)) from None
    return tuple(result)


def redact_url(url: str) -> str:
    """`url` with any password (in the authority or a `password=` query) masked.

    Safe to log; a URL without a password comes back unchanged.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparsable url>"
    netloc, query = parts.netloc, parts.query
    if password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = userinfo.split(":", 1)[0] + ":***@" + hostport
    if query:
        pairs = [pair.partition("=") for pair in query.split("&")]
        query = "&".join(
            f"{k}=***" if k.lower() == "password" else f"{k}{eq}{v}" for k, eq, v in pairs
        )
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    text = f"{parts.scheme}://{netloc}{parts.path}"
    if query:
        text += "?" + query
    if parts.fragment:
        text += "#" + parts.fragment
    return text


def _show_url(value: Any) -> str:
    return repr(redact_url(value)) if isinstance(value, str) else _show(value)


_STORE_ALLOWED: Final = (
    "must be sqlite:///relative/path.db, sqlite:////absolute/path.db, "
    "sqlite://:memory: or postgresql://..."
)


def _check_store_url(value: str) -> str:
    if value == "sqlite://:memory:":
        return value
    if value.startswith("sqlite:///") and len(value) > len("sqlite:///"):
        return value
    if value.startswith(("postgresql://", "postgres://")):
        return value
    raise _Bad(_STORE_ALLOWED)


_READ_URL_ALLOWED: Final = "must be postgresql://... (a read replica of store.url), or empty"


def _check_read_url(value: str | None) -> str | None:
    if value is None or value.startswith(("postgresql://", "postgres://")):
        return value
    raise _Bad(_READ_URL_ALLOWED)


_BROKER_ALLOWED: Final = "must be memory:// or redis://... or rediss://..."


def _check_broker_url(value: str) -> str:
    if value.startswith("memory://"):
        return value
    if value.startswith(("redis://", "rediss://")):
        # `?cluster=true` names a Redis Cluster (any node as the seed): sharded pub/sub.
        from urllib.parse import parse_qsl, urlsplit

        for key, v in parse_qsl(urlsplit(value).query, keep_blank_values=True):
            if key == "cluster" and v.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise _Bad(_BROKER_ALLOWED)
        return value
    raise _Bad(_BROKER_ALLOWED)


# --- the sections ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """[server]: identity and listening sockets of this instance."""

    hub_id: str = _key("openred", check=_check_ident, allowed=_IDENT_ALLOWED)
    instance_id: str = field(
        default_factory=new_instance_id,
        metadata={"rule": _Rule(check=_check_ident, allowed=_IDENT_ALLOWED)},
    )
    ws_host: str = _key("127.0.0.1", check=_check_host)
    ws_port: int = _key(8765, ge=0, le=65535)
    admin_host: str = _key("127.0.0.1", check=_check_host)
    admin_port: int = _key(8766, ge=0, le=65535)
    tls_cert: str | None = _key(None, check=_check_file)
    tls_key: str | None = _key(None, check=_check_file)
    compression: bool = _key(False)
    shutdown_grace_s: float = _key(10.0, ge=0)
    # Reverse proxies whose X-Forwarded-For is believed (hub/forwarded.py).
    trusted_proxies: tuple[str, ...] = _key(
        (), check=_check_trusted_proxies, allowed=_PROXIES_ALLOWED
    )
    # docs/protocol.md §1: the HTTP upgrade must be complete this long after the TCP
    # connect (slowloris); the hello timer starts only after it.
    open_timeout_s: float = _key(10.0, gt=0)
    # docs/protocol.md §1: a request carrying `Origin` (a browser) is refused with 403
    # unless its origin is listed; requests without one (non-browser nodes) pass.
    allowed_origins: tuple[str, ...] = _key((), check=_check_origins, allowed=_ORIGINS_ALLOWED)


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """[auth]: how nodes authenticate (docs/protocol.md §2)."""

    mode: str = _key("open", choices=("open", "allowlist"))
    hello_timeout_s: float = _key(5.0, gt=0)
    clock_skew_s: int = _key(30, ge=0)
    jwt_secret: str | None = _key(
        None,
        check=_check_jwt_secret,
        secret=True,
        allowed=f"must be a secret of at least {MIN_JWT_SECRET_BYTES} bytes, or file:/path",
    )
    jwt_public_key_file: str | None = _key(None, check=_check_file)
    jwt_private_key_file: str | None = _key(None, check=_check_file)
    jwt_algorithms: tuple[str, ...] = _key(
        ("HS256",),
        check=_check_jwt_algorithms,
        allowed=f"must be a list of {', '.join(JWT_ALGORITHMS)}",
    )
    jwt_audience: str | None = _key(None)
    verify_body_sig: bool = _key(False)

    def __repr__(self) -> str:
        secret = None if self.jwt_secret is None else "<redacted>"
        return (
            f"AuthConfig(mode={self.mode!r}, hello_timeout_s={self.hello_timeout_s!r}, "
            f"clock_skew_s={self.clock_skew_s!r}, jwt_secret={secret!s}, "
            f"jwt_public_key_file={self.jwt_public_key_file!r}, "
            f"jwt_private_key_file={self.jwt_private_key_file!r}, "
            f"jwt_algorithms={self.jwt_algorithms!r}, jwt_audience={self.jwt_audience!r}, "
            f"verify_body_sig={self.verify_body_sig!r})"
        )


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """[admin]: the admin HTTP surface: bearer tokens and their scopes for the `/v1/`
    routes (none: all answer 401), its TLS, and its abuse limits (admin_http/guard.py)."""

    tokens: tuple[str, ...] = _key(
        (),
        check=_check_tokens,
        secret=True,
        allowed="must be a list of tokens (each NAME:SCOPE:SECRET, NAME:SCOPE:sha256:HEX, "
                "an old-style token, or file:/path)",
    )
    # TLS for the admin listener (PEM certificate chain and key); then responses carry
    # Strict-Transport-Security. Both or neither.
    tls_cert: str | None = _key(None, check=_check_file)
    tls_key: str | None = _key(None, check=_check_file)
    # A connection whose request headers are not complete this long after the connect,
    # or after its previous response, is closed (slowloris; also the keep-alive idle).
    header_timeout_s: float = _key(5.0, gt=0)
    # Per client IP and, once authenticated, per token: cost units a second and at once
    # (a read costs 1, a write more: x-openred-cost in the OpenAPI document). Shared by
    # every instance through Redis with the Redis broker.
    requests_per_s: int = _key(50, ge=1)
    requests_burst: int = _key(200, ge=1)
    # Bad tokens one client IP may present before it is locked out (429 with
    # Retry-After on every /v1/ route, a good token included); failures are then
    # forgiven one per lockout_s.
    max_auth_failures: int = _key(10, ge=1)
    lockout_s: int = _key(300, ge=1)

    def __repr__(self) -> str:
        return (f"AdminConfig(tokens=<{len(self.tokens)} redacted>, "
                f"tls_cert={self.tls_cert!r}, tls_key={self.tls_key!r}, "
                f"header_timeout_s={self.header_timeout_s!r}, "
                f"requests_per_s={self.requests_per_s!r}, "
                f"requests_burst={self.requests_burst!r}, "
                f"max_auth_failures={self.max_auth_failures!r}, lockout_s={self.lockout_s!r})")


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """[limits]: per-frame, per-session and per-IP limits (docs/protocol.md §1, §6, §8)."""

    max_frame_bytes: int = _key(131072, ge=1)
    max_body_bytes: int = _key(65536, ge=1)
    msgs_per_s: int = _key(1000, ge=1)
    burst: int = _key(2000, ge=1)
    send_queue_max: int = _key(10000, ge=1)
    max_topics: int = _key(1000, ge=1)
    max_pending_per_node: int = _key(100000, ge=1)
    handshakes_per_s: int = _key(200, ge=1)
    hb_s: int = _key(20, ge=1)
    # docs/protocol.md §8: a slow consumer is cut off past either bound; bytes bound
    # what 10,000 large frames would otherwise hold (1.3 GB at 128 KiB each).
    send_queue_max_bytes: int = _key(8 * 1024 * 1024, ge=1)
    # Open TCP connections, upgraded or not: past the total the upgrade gets 503, past
    # the per-IP count 429 (0: no per-IP cap).
    max_connections: int = _key(100_000, ge=1)
    max_connections_per_ip: int = _key(1000, ge=0)
    # docs/protocol.md §6.1: nodes and topics one session watches, together (last, so
    # that the positional order of the keys above stays).
    max_watch: int = _key(1000, ge=1)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """[store]: the durable store (SQLite or PostgreSQL) and its retention."""

    url: str = _key(
        "sqlite:///openred-hub.db", check=_check_store_url, allowed=_STORE_ALLOWED, show=_show_url
    )
    auto_migrate: bool = _key(True)
    pool_size: int = _key(10, ge=1)
    message_ttl_s: int = _key(604800, ge=1)
    topic_history: int = _key(100, ge=0)
    topic_history_ttl_s: int = _key(86400, ge=1)
    # docs/protocol.md §4.2: how long a QoS 1 send's (sender, cid) is remembered, from
    # the first send; a repeat within it gets the first's mid (`dup`) and is not stored.
    dedup_window_s: int = _key(600, ge=1)
    retention_days: int = _key(30, ge=1)
    # A streaming replica of `url` for reads that tolerate staleness (admin lists, the
    # audit, message state, old topic history); None: every read on `url`.
    # persistence/postgres.py says which reads go there and how it falls back.
    read_url: str | None = _key(
        None, check=_check_read_url, allowed=_READ_URL_ALLOWED, show=_show_url
    )
    # docs/protocol.md §9 `unavailable`: how long one store call may wait for the
    # database before it fails (PostgreSQL connect, pool and statement timeouts, the
    # in-doubt COMMIT check; SQLite's busy timeout; reads are cut at it too). A QoS 1
    # send is answered within about this long, also when the database stops answering.
    timeout_s: float = _key(2.0, gt=0, le=60)
    # The store's circuit breaker (hub/breaker.py): after `breaker_failures` consecutive
    # failures or timeouts within `breaker_window_s`, store calls fail at once
    # (`unavailable`) for `breaker_open_s`; then one call at a time probes.
    breaker_failures: int = _key(5, ge=1)
    breaker_window_s: float = _key(10.0, gt=0)
    breaker_open_s: float = _key(5.0, gt=0, le=300)

    def __repr__(self) -> str:
        read_url = None if self.read_url is None else redact_url(self.read_url)
        return (
            f"StoreConfig(url={redact_url(self.url)!r}, auto_migrate={self.auto_migrate!r}, "
            f"pool_size={self.pool_size!r}, message_ttl_s={self.message_ttl_s!r}, "
            f"topic_history={self.topic_history!r}, "
            f"topic_history_ttl_s={self.topic_history_ttl_s!r}, "
            f"dedup_window_s={self.dedup_window_s!r}, "
            f"retention_days={self.retention_days!r}, read_url={read_url!r}, "
            f"timeout_s={self.timeout_s!r}, breaker_failures={self.breaker_failures!r}, "
            f"breaker_window_s={self.breaker_window_s!r}, "
            f"breaker_open_s={self.breaker_open_s!r})"
        )


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """[broker]: cross-instance routing (memory:// for one process, redis:// for many)."""

    url: str = _key("memory://", check=_check_broker_url, allowed=_BROKER_ALLOWED, show=_show_url)
    # The Redis broker's circuit breaker (hub/breaker.py), as the store's; it also
    # closes as soon as the broker's connections are back.
    breaker_failures: int = _key(5, ge=1)
    breaker_window_s: float = _key(10.0, gt=0)
    breaker_open_s: float = _key(5.0, gt=0, le=300)

    def __repr__(self) -> str:
        return (f"BrokerConfig(url={redact_url(self.url)!r}, "
                f"breaker_failures={self.breaker_failures!r}, "
                f"breaker_window_s={self.breaker_window_s!r}, "
                f"breaker_open_s={self.breaker_open_s!r})")


@dataclass(frozen=True, slots=True)
class LogConfig:
    """[log]: structured logging."""

    level: str = _key("info", choices=("debug", "info", "warning", "error"))
    # "ecs": JSON lines in Elastic Common Schema fields (hub/log.py).
    format: str = _key("json", choices=("json", "text", "ecs"))


_ENDPOINT_ALLOWED: Final = "must be an http:// or https:// URL (an OTLP/HTTP traces endpoint)"


def _check_endpoint(value: str) -> str:
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Bad(_ENDPOINT_ALLOWED)
    return value


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """[tracing]: OpenTelemetry spans exported over OTLP/HTTP (hub/tracing.py,
    docs/tracing.md); docs/protocol.md §13 trace context. Off: no OpenTelemetry package
    is imported and no message pays for it."""

    enabled: bool = _key(False)
    # The collector's OTLP/HTTP traces URL (Jaeger, the OpenTelemetry Collector, ...).
    endpoint: str = _key("http://127.0.0.1:4318/v1/traces", check=_check_endpoint,
                         allowed=_ENDPOINT_ALLOWED)
    service_name: str = _key("openred-hub", check=_check_ident, allowed=_IDENT_ALLOWED)
    # Parent-based: a message whose node sent a sampled `traceparent` is traced
    # whatever this says; this is the share of the traces the hub starts itself
    # (handshakes, admin requests, housekeeping).
    sample_ratio: float = _key(0.1, ge=0, le=1)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole hub configuration, one attribute per section of hub.toml."""

    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    log: LogConfig = field(default_factory=LogConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)


# --- the schema, derived from the dataclasses above --------------------------------------


@dataclass(frozen=True, slots=True)
class _Spec:
    section: str
    key: str
    kind: str  # "str", "opt_str", "int", "float", "bool", "list"
    rule: _Rule

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"

    def allowed(self) -> str:
        rule = self.rule
        if rule.allowed is not None:
            return rule.allowed
        if rule.choices is not None:
            return "must be one of " + ", ".join(repr(c) for c in rule.choices)
        if self.kind in ("int", "float"):
            noun = "an integer" if self.kind == "int" else "a number"
            lo = rule.ge if rule.ge is not None else rule.gt
            lo_text = _num(lo) if lo is not None else ""
            if lo is not None and rule.le is not None and rule.gt is None:
                return f"must be {noun} {lo_text}..{_num(rule.le)}"
            bounds = []
            if rule.ge is not None:
                bounds.append(f">= {lo_text}")
            if rule.gt is not None:
                bounds.append(f"> {lo_text}")
            if rule.le is not None:
                bounds.append(f"<= {_num(rule.le)}")
            return f"must be {noun} " + " and ".join(bounds) if bounds else f"must be {noun}"
        return {
            "bool": "must be true or false",
            "list": "must be a list of strings",
            "str": "must be a string",
            "opt_str": "must be a string",
        }[self.kind]


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _kind(annotation: Any) -> str:
    if annotation is str:
        return "str"
    if annotation is bool:
        return "bool"
    if annotation is int:
        return "int"
    if annotation is float:
        return "float"
    if annotation == (str | None):
        return "opt_str"
    if annotation == tuple[str, ...]:
        return "list"
    raise TypeError(f"unsupported config annotation {annotation!r}")  # pragma: no cover


def _build_schema() -> tuple[dict[str, type[Any]], dict[str, dict[str, _Spec]]]:
    sections: dict[str, type[Any]] = {}
    specs: dict[str, dict[str, _Spec]] = {}
    for section_field in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section_field.name]
        hints = typing.get_type_hints(cls)
        sections[section_field.name] = cls
        specs[section_field.name] = {
            f.name: _Spec(section_field.name, f.name, _kind(hints[f.name]), f.metadata["rule"])
            for f in dataclasses.fields(cls)
        }
    return sections, specs


_SECTIONS, _SPECS = _build_schema()
_ENV_NAMES: Final = {
    f"{ENV_PREFIX}{section.upper()}_{key.upper()}": spec
    for section, keys in _SPECS.items()
    for key, spec in keys.items()
}


def config_keys() -> dict[str, list[str]]:
    """Every section and its keys, in hub.toml order."""
    return {section: list(keys) for section, keys in _SPECS.items()}


def env_var_name(key: str) -> str:
    """The environment variable for `section.key`, e.g. OPENRED_HUB_SERVER_WS_PORT."""
    section, _, name = key.partition(".")
    return f"{ENV_PREFIX}{section.upper()}_{name.upper()}"


def effective_limits(cfg: Config) -> dict[str, int]:
    """The limits announced in `welcome` (docs/protocol.md §2 step 3)."""
    limits = cfg.limits
    return {
        "max_frame_bytes": limits.max_frame_bytes,
        "max_body_bytes": limits.max_body_bytes,
        "msgs_per_s": limits.msgs_per_s,
        "burst": limits.burst,
        "max_topics": limits.max_topics,
    }


# --- parsing -----------------------------------------------------------------------------


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _fail(spec: _Spec, origin: str, problem: str | None = None, value: Any = None) -> ConfigError:
    message = problem if problem is not None else spec.allowed()
    if problem is None and not spec.rule.secret:
        shown = spec.rule.show(value) if spec.rule.show is not None else _show(value)
        message = f"{message}, got {shown}"
    return ConfigError(f"{origin}: {message}", key=origin)


def _from_typed(spec: _Spec, value: Any, origin: str) -> Any:
    """A value from TOML or a typed override, type-checked for its key."""
    kind = spec.kind
    if kind in ("str", "opt_str"):
        if not isinstance(value, str):
            raise _fail(spec, origin, value=value)
        return None if kind == "opt_str" and value == "" else value
    if kind == "bool":
        if not isinstance(value, bool):
            raise _fail(spec, origin, value=value)
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(spec, origin, value=value)
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _fail(spec, origin, value=value)
        if not math.isfinite(value):
            raise _fail(spec, origin, value=value)
        return float(value)
    # list
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise _fail(spec, origin, value=value)
    return tuple(value)


_INT_RE: Final = re.compile(r"-?[0-9]+")
_FLOAT_RE: Final = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def _from_text(spec: _Spec, text: str, origin: str) -> Any:
    """A value from an environment variable (or a string override), parsed strictly."""
    kind = spec.kind
    if kind == "str":
        return text
    if kind == "opt_str":
        return text or None
    if kind == "bool":
        lowered = text.lower()
        if lowered not in ("true", "false"):
            raise _fail(spec, origin, value=text)
        return lowered == "true"
    if kind == "int":
        if not _INT_RE.fullmatch(text):
            raise _fail(spec, origin, value=text)
        return int(text)
    if kind == "float":
        if not _FLOAT_RE.fullmatch(text):
            raise _fail(spec, origin, value=text)
        return float(text)
    # list: comma-separated, items stripped; the empty string is the empty list
    if text.strip() == "":
        return ()
    items = [item.strip() for item in text.split(",")]
    if any(not item for item in items):
        problem = "must be a comma-separated list without empty items"
        raise ConfigError(f"{origin}: {problem}", key=origin)
    return tuple(items)


def _validate(spec: _Spec, value: Any, origin: str) -> Any:
    """Range, choice and custom checks on a value of the right type."""
    rule = spec.rule
    if rule.choices is not None and isinstance(value, str):
        lowered = value.lower()
        if lowered not in rule.choices:
            raise _fail(spec, origin, value=value)
        value = lowered
    if spec.kind in ("int", "float"):
        too_low = (rule.ge is not None and value < rule.ge) or (
            rule.gt is not None and value <= rule.gt
        )
        too_high = rule.le is not None and value > rule.le
        if too_low or too_high:
            raise _fail(spec, origin, value=value)
    if rule.check is not None:
        try:
            value = rule.check(value)
        except _Bad as exc:
            problem = str(exc)
            if not rule.secret and spec.kind != "list":
                shown = rule.show(value) if rule.show is not None else _show(value)
                problem = f"{problem}, got {shown}"
            raise ConfigError(f"{origin}: {problem}", key=origin) from None
    return value


def _unknown_key(section: str, key: str) -> ConfigError:
    name = f"{section}.{key}"
    known = list(_SPECS[section])
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean '{section}.{close[0]}'? " if close else ""
    return ConfigError(
        f"unknown key '{name}' ({hint}known keys in [{section}]: {', '.join(known)})", key=name
    )


def _unknown_section(section: str) -> ConfigError:
    close = difflib.get_close_matches(section, list(_SPECS), n=1)
    hint = f"did you mean [{close[0]}]? " if close else ""
    return ConfigError(
        f"unknown section [{section}] ({hint}known sections: {', '.join(_SPECS)})", key=section
    )


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fp:
            data = tomllib.load(fp)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except OSError as exc:
        reason = (exc.strerror or type(exc).__name__).lower()
        raise ConfigError(f"{path}: cannot read configuration file: {reason}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return data


def _file_layer(data: Mapping[str, Any]) -> dict[tuple[str, str], tuple[Any, str]]:
    layer: dict[tuple[str, str], tuple[Any, str]] = {}
    for section, table in data.items():
        if section not in _SPECS:
            if not isinstance(table, dict):
                raise ConfigError(
                    f"unknown key '{section}' (settings belong in a section: "
                    f"{', '.join(f'[{s}]' for s in _SPECS)})",
                    key=section,
                )
            raise _unknown_section(section)
        if not isinstance(table, dict):
            raise ConfigError(f"{section}: must be a table ([{section}])", key=section)
        for key, value in table.items():
            spec = _SPECS[section].get(key)
            if spec is None:
                raise _unknown_key(section, key)
            layer[(section, key)] = (_from_typed(spec, value, spec.name), spec.name)
    return layer


def _env_layer(env: Mapping[str, str]) -> dict[tuple[str, str], tuple[Any, str]]:
    layer: dict[tuple[str, str], tuple[Any, str]] = {}
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        spec = _ENV_NAMES.get(name)
        if spec is None:
            close = difflib.get_close_matches(name, list(_ENV_NAMES), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{name}: names no configuration key{hint}", key=name)
        layer[(spec.section, spec.key)] = (_from_text(spec, env[name], name), name)
    return layer


def _override_layer(overrides: Mapping[str, object]) -> dict[tuple[str, str], tuple[Any, str]]:
    layer: dict[tuple[str, str], tuple[Any, str]] = {}
    for name, value in overrides.items():
        section, _, key = name.partition(".")
        if section not in _SPECS:
            raise _unknown_section(section)
        spec = _SPECS[section].get(key)
        if spec is None:
            raise _unknown_key(section, key)
        if value is None:  # a flag that was not given
            continue
        if isinstance(value, str):
            parsed = _from_text(spec, value, spec.name)
        else:
            parsed = _from_typed(spec, value, spec.name)
        layer[(section, key)] = (parsed, spec.name)
    return layer


def _cross_checks(values: dict[tuple[str, str], Any], origins: dict[tuple[str, str], str]) -> None:
    def fail(section: str, key: str, problem: str) -> ConfigError:
        origin = origins.get((section, key), f"{section}.{key}")
        return ConfigError(f"{origin}: {problem}", key=origin)

    for section in ("server", "admin"):
        cert, key = values[(section, "tls_cert")], values[(section, "tls_key")]
        if cert is not None and key is None:
            raise fail(section, "tls_key",
                       f"must be set when {section}.tls_cert is (both or neither)")
        if key is not None and cert is None:
            raise fail(section, "tls_cert",
                       f"must be set when {section}.tls_key is (both or neither)")

    ws_port, admin_port = values[("server", "ws_port")], values[("server", "admin_port")]
    same_host = values[("server", "ws_host")] == values[("server", "admin_host")]
    if same_host and ws_port == admin_port != 0:
        raise fail("server", "admin_port", f"must differ from server.ws_port ({ws_port})")

    frame, body = values[("limits", "max_frame_bytes")], values[("limits", "max_body_bytes")]
    if body > frame:
        raise fail(
            "limits",
            "max_body_bytes",
            f"must be <= limits.max_frame_bytes ({frame}), got {body}",
        )

    queue_bytes = values[("limits", "send_queue_max_bytes")]
    if queue_bytes < 2 * frame:
        # A queue must hold at least two of the largest frames, or one big reply would
        # make any session a slow consumer.
        raise fail("limits", "send_queue_max_bytes",
                   f"must be >= 2 x limits.max_frame_bytes ({2 * frame}), got {queue_bytes}")

    if values[("store", "read_url")] is not None and not values[("store", "url")].startswith(
            ("postgresql://", "postgres://")):
        raise fail("store", "read_url", "needs a postgresql:// store.url (a replica of it)")

    ttl, days = values[("store", "message_ttl_s")], values[("store", "retention_days")]
    if days * 86400 <= ttl:
        # Partitions older than retention are dropped whole: an unacked message must
        # expire before its day's partition goes.
        raise fail("store", "retention_days",
                   f"must cover store.message_ttl_s ({ttl} s), got {days} days")


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Load, merge and validate the configuration; raise `ConfigError` when unusable.

    `path`: the TOML file; None means `./hub.toml` when it exists, else defaults only. A
    path that is given but missing is an error. `env`: the environment (None:
    `os.environ`); every `OPENRED_HUB_*` variable must name a key. `overrides`: flat
    `"section.key"` -> value from command-line flags; a None value means "flag not
    given"; a str value is parsed like an environment variable, others must have the
    key's type. Precedence: overrides, env, file, defaults.
    """
    if path is None:
        default = Path(DEFAULT_CONFIG_PATH)
        file_data: dict[str, Any] = _read_file(default) if default.is_file() else {}
    else:
        file_data = _read_file(Path(path))

    layers = [
        _file_layer(file_data),
        _env_layer(os.environ if env is None else env),
        _override_layer(overrides or {}),
    ]

    values: dict[tuple[str, str], Any] = {}
    origins: dict[tuple[str, str], str] = {}
    for layer in layers:  # lowest precedence first; later layers win
        for where, (value, origin) in layer.items():
            values[where] = value
            origins[where] = origin

    built: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        defaults = cls()
        kwargs: dict[str, Any] = {}
        for key, spec in _SPECS[section].items():
            if (section, key) in values:
                value = _validate(spec, values[(section, key)], origins[(section, key)])
            else:
                value = getattr(defaults, key)
            values[(section, key)] = value
            kwargs[key] = value
        built[section] = cls(**kwargs)

    _cross_checks(values, origins)
    return Config(**built)
