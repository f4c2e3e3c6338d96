"""Configuration loading: defaults, file, environment, overrides, validation, secrets."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import pytest
from openred.hub.config import (
    AdminConfig,
    AuthConfig,
    Config,
    ConfigError,
    LimitsConfig,
    ServerConfig,
    config_keys,
    effective_limits,
    env_var_name,
    load_config,
    redact_url,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cret-value-that-is-long-enough-0123456789"
NO_ENV: dict[str, str] = {}


def without_instance_id(cfg: Config) -> Config:
    return dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, instance_id="x"))


def write(tmp_path: Path, text: str, name: str = "hub.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(**kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture(autouse=True)
def _in_empty_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No ./hub.toml is picked up by accident, and no OPENRED_HUB_* from the runner leaks in.
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("OPENRED_HUB_"):
            monkeypatch.delenv(name)


# --- defaults ------------------------------------------------------------------------


def test_defaults() -> None:
    cfg = load_config(env=NO_ENV)
    assert without_instance_id(cfg) == without_instance_id(Config())
    s = cfg.server
    assert (s.hub_id, s.ws_host, s.ws_port, s.admin_host, s.admin_port) == (
        "openred",
        "127.0.0.1",
        8765,
        "127.0.0.1",
        8766,
    )
    assert (s.tls_cert, s.tls_key, s.compression, s.shutdown_grace_s) == (None, None, False, 10)
    assert re.fullmatch(r"hub-[0-9a-f]{8}", s.instance_id)
    a = cfg.auth
    assert (a.mode, a.hello_timeout_s, a.clock_skew_s) == ("open", 5, 30)
    assert (a.jwt_secret, a.jwt_public_key_file, a.jwt_private_key_file) == (None, None, None)
    assert (a.jwt_algorithms, a.jwt_audience, a.verify_body_sig) == (("HS256",), None, False)
    assert cfg.admin.tokens == ()
    assert cfg.limits == LimitsConfig(131072, 65536, 1000, 2000, 10000, 1000, 100000, 200, 20)
    st = cfg.store
    assert (st.url, st.auto_migrate, st.pool_size) == ("sqlite:///openred-hub.db", True, 10)
    assert (st.message_ttl_s, st.topic_history, st.topic_history_ttl_s, st.retention_days) == (
        604800,
        100,
        86400,
        30,
    )
    assert cfg.broker.url == "memory://"
    assert (cfg.log.level, cfg.log.format) == ("info", "json")


def test_instance_id_generated_per_load_unless_set() -> None:
    assert load_config(env=NO_ENV).server.instance_id != load_config(env=NO_ENV).server.instance_id
    env = {"OPENRED_HUB_SERVER_INSTANCE_ID": "hub-a"}
    assert load_config(env=env).server.instance_id == "hub-a"


def test_config_is_frozen() -> None:
    cfg = load_config(env=NO_ENV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.ws_port = 1  # type: ignore[misc]


def test_config_keys_and_effective_limits() -> None:
    keys = config_keys()
    assert list(keys) == ["server", "auth", "admin", "limits", "store", "broker", "log",
                          "tracing"]
    assert keys["tracing"] == ["enabled", "endpoint", "service_name", "sample_ratio"]
    assert keys["server"][:4] == ["hub_id", "instance_id", "ws_host", "ws_port"]
    assert keys["broker"] == ["url", "breaker_failures", "breaker_window_s", "breaker_open_s"]
    assert effective_limits(Config()) == {
        "max_frame_bytes": 131072,
        "max_body_bytes": 65536,
        "msgs_per_s": 1000,
        "burst": 2000,
        "max_topics": 1000,
    }
    assert env_var_name("server.ws_port") == "OPENRED_HUB_SERVER_WS_PORT"


# --- file ------------------------------------------------------------------------------


def test_file_parsing(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [server]
        hub_id = "net-1"
        ws_port = 9000
        compression = true
        shutdown_grace_s = 2.5
        [auth]
        mode = "allowlist"
        jwt_algorithms = ["EdDSA", "HS256"]
        jwt_audience = "openred"
        [admin]
        tokens = ["tok-one", "tok-two"]
        [limits]
        msgs_per_s = 50
        [store]
        url = "postgresql://127.0.0.1/hub"
        auto_migrate = false
        [broker]
        url = "redis://127.0.0.1:6379/0"
        [log]
        level = "debug"
        format = "text"
        """,
    )
    cfg = load_config(path, env=NO_ENV)
    assert cfg.server.hub_id == "net-1"
    assert cfg.server.ws_port == 9000
    assert cfg.server.compression is True
    assert cfg.server.shutdown_grace_s == 2.5
    assert cfg.server.admin_port == 8766  # untouched keys keep defaults
    assert cfg.auth.mode == "allowlist"
    assert cfg.auth.jwt_algorithms == ("EdDSA", "HS256")
    assert cfg.auth.jwt_audience == "openred"
    assert cfg.admin.tokens == ("tok-one", "tok-two")
    assert cfg.limits.msgs_per_s == 50
    assert cfg.store.url == "postgresql://127.0.0.1/hub"
    assert cfg.store.auto_migrate is False
    assert cfg.broker.url == "redis://127.0.0.1:6379/0"
    assert (cfg.log.level, cfg.log.format) == ("debug", "text")


def test_float_keys_accept_integers(tmp_path: Path) -> None:
    path = write(tmp_path, "[auth]\nhello_timeout_s = 1\n")
    cfg = load_config(path, env=NO_ENV)
    assert cfg.auth.hello_timeout_s == 1.0
    assert isinstance(cfg.auth.hello_timeout_s, float)


def test_dot_hub_toml_loaded_when_present(tmp_path: Path) -> None:
    write(tmp_path, "[server]\nws_port = 9100\n")
    assert load_config(env=NO_ENV).server.ws_port == 9100


def test_missing_given_path_is_an_error(tmp_path: Path) -> None:
    message = error_of(path=tmp_path / "nope.toml", env=NO_ENV)
    assert "nope.toml" in message and "not found" in message


def test_invalid_toml_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\nws_port = 1\n")
    assert "invalid TOML" in error_of(path=path, env=NO_ENV)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[server]\nwsport = 1\n", "unknown key 'server.wsport'"),
        ("[server]\nwsport = 1\n", "did you mean 'server.ws_port'"),
        ("[servers]\nws_port = 1\n", "unknown section [servers]"),
        ("ws_port = 1\n", "unknown key 'ws_port'"),
        ("[server.tls]\ncert = 'x'\n", "unknown key 'server.tls'"),
        ("[server]\ninstance = 'x'\n", "known keys in [server]: hub_id, instance_id"),
    ],
)
def test_unknown_key_in_file_names_it(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error_of(path=write(tmp_path, text), env=NO_ENV)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[server]\nws_port = "9000"\n', "server.ws_port: must be an integer 0..65535, got '9000'"),
        ("[server]\nws_port = 70000\n", "server.ws_port: must be an integer 0..65535, got 70000"),
        ("[server]\nws_port = -1\n", "server.ws_port: must be an integer 0..65535"),
        ("[server]\nws_port = true\n", "server.ws_port: must be an integer 0..65535, got true"),
        ("[server]\ncompression = 1\n", "server.compression: must be true or false, got 1"),
        ('[server]\ncompression = "true"\n', "server.compression: must be true or false"),
        ('[server]\nhub_id = "a b"\n', "server.hub_id: must be 1..64 characters"),
        ('[server]\nhub_id = ""\n', "server.hub_id:"),
        ("[server]\nshutdown_grace_s = -1\n", "server.shutdown_grace_s: must be a number >= 0"),
        ('[server]\ntls_cert = "/nonexistent/c.pem"\n', "server.tls_cert: must name an existing"),
        ('[server]\ntrusted_proxies = "10.0.0.1"\n',
         "server.trusted_proxies: must be a list of IP addresses or CIDR networks"),
        ('[server]\ntrusted_proxies = ["nginx"]\n',
         "server.trusted_proxies: must be a list of IP addresses or CIDR networks (e.g. "
         "10.0.0.0/8), got 'nginx'"),
        ('[server]\ntrusted_proxies = ["10.1.2.3/8"]\n',
         "server.trusted_proxies: must be a list of IP addresses or CIDR networks (e.g. "
         "10.0.0.0/8), got '10.1.2.3/8' (host bits set)"),
        ("[auth]\nhello_timeout_s = 0\n", "auth.hello_timeout_s: must be a number > 0"),
        ("[auth]\nhello_timeout_s = nan\n", "auth.hello_timeout_s:"),
        ('[auth]\nmode = "closed"\n', "auth.mode: must be one of 'open', 'allowlist'"),
        ("[auth]\nclock_skew_s = 1.5\n", "auth.clock_skew_s: must be an integer >= 0, got 1.5"),
        ('[auth]\njwt_algorithms = ["none"]\n', "auth.jwt_algorithms: 'none' is never allowed"),
        ('[auth]\njwt_algorithms = ["HS512"]\n', "auth.jwt_algorithms: must be a list of"),
        ('[auth]\njwt_algorithms = "HS256"\n', "auth.jwt_algorithms: must be a list of"),
        ('[auth]\njwt_secret = "short"\n', "auth.jwt_secret: must be at least 32 bytes"),
        ("[admin]\ntokens = [1]\n", "admin.tokens: must be a list"),
        ('[admin]\ntokens = ["has space"]\n', "admin.tokens: token #1 must be"),
        ("[limits]\nmsgs_per_s = 0\n", "limits.msgs_per_s: must be an integer >= 1, got 0"),
        ('[limits]\nmsgs_per_s = "abc"\n', "limits.msgs_per_s: must be an integer >= 1, got 'abc'"),
        ("[limits]\nburst = 0\n", "limits.burst: must be an integer >= 1"),
        ("[limits]\nhb_s = 0\n", "limits.hb_s: must be an integer >= 1"),
        ("[limits]\nmax_body_bytes = 200000\n", "limits.max_body_bytes: must be <= limits.max_"),
        ("[store]\ntopic_history = -1\n", "store.topic_history: must be an integer >= 0"),
        (
            "[store]\ntopic_history_ttl_s = 0\n",
            "store.topic_history_ttl_s: must be an integer >= 1",
        ),
        ('[store]\nurl = "mysql://h/db"\n', "store.url: must be sqlite:///"),
        ('[store]\nurl = "sqlite://"\n', "store.url:"),
        ('[broker]\nurl = "kafka://h"\n', "broker.url: must be memory:// or redis://"),
        ('[log]\nlevel = "verbose"\n', "log.level: must be one of 'debug', 'info'"),
        ('[log]\nformat = "xml"\n', "log.format: must be one of 'json', 'text', 'ecs'"),
        ("[store]\ntimeout_s = 0\n", "store.timeout_s: must be a number > 0 and <= 60"),
        ("[store]\nbreaker_open_s = -1\n", "store.breaker_open_s: must be a number > 0"),
        ("[broker]\nbreaker_failures = 0\n", "broker.breaker_failures: must be an integer >= 1"),
        ("server = 1\n", "server: must be a table"),
    ],
)
def test_bad_values_in_file_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    message = error_of(path=write(tmp_path, text), env=NO_ENV)
    if expected.startswith("unknown"):
        assert expected in message
    else:
        assert message.startswith(expected)


def test_tls_both_or_neither(tmp_path: Path) -> None:
    cert = write(tmp_path, "cert", "c.pem")
    key = write(tmp_path, "key", "k.pem")
    message = error_of(env={"OPENRED_HUB_SERVER_TLS_CERT": str(cert)})
    assert message.startswith("server.tls_key: must be set")
    message = error_of(env=NO_ENV, overrides={"server.tls_key": str(key)})
    assert message.startswith("server.tls_cert: must be set")
    env = {"OPENRED_HUB_SERVER_TLS_CERT": str(cert), "OPENRED_HUB_SERVER_TLS_KEY": str(key)}
    cfg = load_config(env=env)
    assert (cfg.server.tls_cert, cfg.server.tls_key) == (str(cert), str(key))


def test_ports_zero_allowed_and_clash_refused() -> None:
    cfg = load_config(env=NO_ENV, overrides={"server.ws_port": 0, "server.admin_port": 0})
    assert (cfg.server.ws_port, cfg.server.admin_port) == (0, 0)
    message = error_of(env=NO_ENV, overrides={"server.admin_port": 8765})
    assert message.startswith("server.admin_port: must differ from server.ws_port")
    cfg = load_config(
        env=NO_ENV, overrides={"server.admin_port": 8765, "server.admin_host": "10.0.0.1"}
    )
    assert cfg.server.admin_port == cfg.server.ws_port == 8765


def test_store_urls_accepted() -> None:
    for url in (
        "sqlite:///rel.db",
        "sqlite:////abs/path.db",
        "sqlite://:memory:",
        "postgresql://u@h:5432/db",
        "postgres://h/db",
    ):
        assert load_config(env={"OPENRED_HUB_STORE_URL": url}).store.url == url
    for url in ("memory://", "redis://h:6379/0", "rediss://h"):
        assert load_config(env={"OPENRED_HUB_BROKER_URL": url}).broker.url == url


def test_choices_are_case_insensitive_and_normalised() -> None:
    env = {
        "OPENRED_HUB_LOG_LEVEL": "WARNING",
        "OPENRED_HUB_AUTH_MODE": "Allowlist",
        "OPENRED_HUB_AUTH_JWT_ALGORITHMS": "eddsa,hs256,EdDSA",
    }
    cfg = load_config(env=env)
    assert cfg.log.level == "warning"
    assert cfg.auth.mode == "allowlist"
    assert cfg.auth.jwt_algorithms == ("EdDSA", "HS256")


# --- environment ---------------------------------------------------------------------


def test_env_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nws_port = 9000\nhub_id = "from-file"\n')
    cfg = load_config(path, env={"OPENRED_HUB_SERVER_WS_PORT": "9001"})
    assert cfg.server.ws_port == 9001
    assert cfg.server.hub_id == "from-file"


def test_overrides_beat_env_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nws_port = 9000\nadmin_port = 9100\n")
    env = {"OPENRED_HUB_SERVER_WS_PORT": "9001", "OPENRED_HUB_SERVER_ADMIN_PORT": "9101"}
    cfg = load_config(path, env=env, overrides={"server.ws_port": 9002, "server.admin_port": None})
    assert cfg.server.ws_port == 9002
    assert cfg.server.admin_port == 9101  # None means "flag not given"
    # a string override is parsed like an environment value
    assert load_config(env=NO_ENV, overrides={"limits.burst": "7"}).limits.burst == 7


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENRED_HUB_LIMITS_HB_S", "3")
    assert load_config().limits.hb_s == 3


def test_unknown_env_var_is_an_error() -> None:
    message = error_of(env={"OPENRED_HUB_SERVER_WS_PORTT": "9000"})
    assert message.startswith("OPENRED_HUB_SERVER_WS_PORTT: names no configuration key")
    assert "OPENRED_HUB_SERVER_WS_PORT?" in message
    assert error_of(env={"OPENRED_HUB_": "x"}).startswith("OPENRED_HUB_:")
    # other variables are none of our business
    assert load_config(env={"OPENRED_HUBX": "1", "PATH": "/bin"}).server.ws_port == 8765


def test_unknown_override_is_an_error() -> None:
    assert "unknown key 'server.wsport'" in error_of(env=NO_ENV, overrides={"server.wsport": 1})
    assert "unknown section [srv]" in error_of(env=NO_ENV, overrides={"srv.ws_port": 1})


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("OPENRED_HUB_SERVER_WS_PORT", "abc", "must be an integer 0..65535, got 'abc'"),
        ("OPENRED_HUB_SERVER_WS_PORT", " 9000", "must be an integer"),
        ("OPENRED_HUB_SERVER_WS_PORT", "9_000", "must be an integer"),
        ("OPENRED_HUB_SERVER_WS_PORT", "9000.0", "must be an integer"),
        ("OPENRED_HUB_SERVER_WS_PORT", "", "must be an integer"),
        ("OPENRED_HUB_LIMITS_MSGS_PER_S", "abc", "must be an integer >= 1, got 'abc'"),
        ("OPENRED_HUB_SERVER_SHUTDOWN_GRACE_S", "inf", "must be a number >= 0"),
        ("OPENRED_HUB_SERVER_COMPRESSION", "yes", "must be true or false, got 'yes'"),
        ("OPENRED_HUB_SERVER_COMPRESSION", "1", "must be true or false"),
        ("OPENRED_HUB_STORE_AUTO_MIGRATE", "", "must be true or false"),
        ("OPENRED_HUB_ADMIN_TOKENS", "a,,b", "must be a comma-separated list without empty"),
        ("OPENRED_HUB_AUTH_JWT_ALGORITHMS", "HS256,none", "'none' is never allowed"),
        ("OPENRED_HUB_SERVER_TRUSTED_PROXIES", "10.0.0.0/8,,::1",
         "must be a comma-separated list without empty"),
        ("OPENRED_HUB_SERVER_TRUSTED_PROXIES", "10.0.0.0/8,1.2.3.4/33",
         "must be a list of IP addresses or CIDR networks (e.g. 10.0.0.0/8), got '1.2.3.4/33'"),
    ],
)
def test_bad_env_values_name_the_variable(name: str, value: str, expected: str) -> None:
    assert error_of(env={name: value}).startswith(f"{name}: {expected}")


def test_trusted_proxies() -> None:
    assert load_config(env=NO_ENV).server.trusted_proxies == ()
    env = {"OPENRED_HUB_SERVER_TRUSTED_PROXIES": " 10.0.0.0/8, 127.0.0.1,2001:DB8::/32"}
    # Normalised: one spelling per network, a lone address as its /32 or /128.
    assert load_config(env=env).server.trusted_proxies == (
        "10.0.0.0/8", "127.0.0.1/32", "2001:db8::/32")
    cfg = load_config(env=NO_ENV, overrides={"server.trusted_proxies": ["::1"]})
    assert cfg.server.trusted_proxies == ("::1/128",)


def test_env_lists() -> None:
    env = {"OPENRED_HUB_ADMIN_TOKENS": "tok-a, tok-b ,tok-c"}
    assert load_config(env=env).admin.tokens == ("tok-a", "tok-b", "tok-c")
    env = {"OPENRED_HUB_AUTH_JWT_ALGORITHMS": ""}
    assert load_config(env=env).auth.jwt_algorithms == ()
    env = {"OPENRED_HUB_AUTH_JWT_ALGORITHMS": "EdDSA"}
    assert load_config(env=env).auth.jwt_algorithms == ("EdDSA",)


@pytest.mark.parametrize(
    ("value", "expected"), [("true", True), ("false", False), ("TRUE", True), ("False", False)]
)
def test_env_booleans(value: str, expected: bool) -> None:
    env = {"OPENRED_HUB_SERVER_COMPRESSION": value, "OPENRED_HUB_STORE_AUTO_MIGRATE": value}
    cfg = load_config(env=env)
    assert cfg.server.compression is expected
    assert cfg.store.auto_migrate is expected


def test_env_numbers_and_empty_optional(tmp_path: Path) -> None:
    path = write(tmp_path, '[auth]\njwt_audience = "aud"\n')
    env = {
        "OPENRED_HUB_AUTH_HELLO_TIMEOUT_S": "0.25",
        "OPENRED_HUB_SERVER_SHUTDOWN_GRACE_S": "3",
        "OPENRED_HUB_AUTH_JWT_AUDIENCE": "",  # empty unsets an optional key
    }
    cfg = load_config(path, env=env)
    assert cfg.auth.hello_timeout_s == 0.25
    assert cfg.server.shutdown_grace_s == 3.0
    assert cfg.auth.jwt_audience is None


# --- secrets -------------------------------------------------------------------------


def test_secrets_not_in_repr_or_str() -> None:
    token = "admin-token-abcdefgh"
    env = {
        "OPENRED_HUB_AUTH_JWT_SECRET": SECRET,
        "OPENRED_HUB_ADMIN_TOKENS": token,
        "OPENRED_HUB_STORE_URL": "postgresql://hub:dbpassword@db/hub",
        "OPENRED_HUB_BROKER_URL": "redis://:redispassword@redis:6379/0",
    }
    cfg = load_config(env=env)
    assert cfg.auth.jwt_secret == SECRET
    assert cfg.admin.tokens == (token,)
    assert cfg.store.url == "postgresql://hub:dbpassword@db/hub"
    for text in (repr(cfg), str(cfg), repr(cfg.auth), repr(cfg.admin), f"{cfg}"):
        for secret in (SECRET, token, "dbpassword", "redispassword"):
            assert secret not in text
    assert "jwt_secret=<redacted>" in repr(cfg.auth)
    assert "postgresql://hub:***@db/hub" in repr(cfg.store)


def test_secret_never_echoed_in_errors() -> None:
    message = error_of(env={"OPENRED_HUB_AUTH_JWT_SECRET": "tiny-secret"})
    assert message.startswith("OPENRED_HUB_AUTH_JWT_SECRET: must be at least 32 bytes")
    assert "tiny-secret" not in message
    message = error_of(env={"OPENRED_HUB_ADMIN_TOKENS": "ok-token,bad\x01token"})
    assert "bad" not in message and "token #2" in message
    message = error_of(env={"OPENRED_HUB_STORE_URL": "mysql://u:hunter2@h/db"})
    assert "hunter2" not in message


def test_file_secret_indirection(tmp_path: Path) -> None:
    secret_file = write(tmp_path, SECRET + "\n", "jwt.secret")
    token_file = write(tmp_path, "token-from-file\r\n", "admin.token")
    path = write(
        tmp_path,
        f'[auth]\njwt_secret = "file:{secret_file}"\n'
        f'[admin]\ntokens = ["literal-token", "file:{token_file}"]\n',
        "conf.toml",
    )
    cfg = load_config(path, env=NO_ENV)
    assert cfg.auth.jwt_secret == SECRET
    assert cfg.admin.tokens == ("literal-token", "token-from-file")
    env = {"OPENRED_HUB_ADMIN_TOKENS": f"file:{token_file},other-token"}
    assert load_config(env=env).admin.tokens == ("token-from-file", "other-token")


def test_file_secret_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.secret"
    message = error_of(env={"OPENRED_HUB_AUTH_JWT_SECRET": f"file:{missing}"})
    assert message.startswith("OPENRED_HUB_AUTH_JWT_SECRET: cannot read secret file")
    empty = write(tmp_path, "\n", "empty.secret")
    message = error_of(env=NO_ENV, overrides={"admin.tokens": [f"file:{empty}"]})
    assert message.startswith("admin.tokens:") and "is empty" in message
    short = write(tmp_path, "tinysecret\n", "s.secret")
    message = error_of(env={"OPENRED_HUB_AUTH_JWT_SECRET": f"file:{short}"})
    assert "at least 32 bytes" in message and "tinysecret" not in message


# --- the repository's hub.toml -------------------------------------------------------


def test_repo_hub_toml_yields_exactly_the_defaults() -> None:
    cfg = load_config(REPO_ROOT / "hub.toml", env=NO_ENV)
    assert without_instance_id(cfg) == without_instance_id(Config())
    assert re.fullmatch(r"hub-[0-9a-f]{8}", cfg.server.instance_id)


def test_repo_hub_toml_documents_every_key() -> None:
    text = (REPO_ROOT / "hub.toml").read_text(encoding="utf-8")
    documented: dict[str, set[str]] = {}
    section = ""
    for line in text.splitlines():
        header = re.fullmatch(r"\[(\w+)\]\s*", line)
        if header:
            section = header.group(1)
            documented[section] = set()
            continue
        entry = re.match(r"#?\s*(\w+)\s*=", line)
        if entry and section:
            documented[section].add(entry.group(1))
    expected = {section: set(keys) for section, keys in config_keys().items()}
    assert documented == expected


def test_repo_hub_toml_defaults_match_dataclasses_directly() -> None:
    # The dataclass defaults are the one source; constructing sections by hand gives them.
    assert AuthConfig().jwt_algorithms == ("HS256",)
    assert AdminConfig().tokens == ()
    assert ServerConfig().ws_port == 8765


def test_redact_url() -> None:
    assert redact_url("sqlite:///openred-hub.db") == "sqlite:///openred-hub.db"
    assert redact_url("memory://") == "memory://"
    assert redact_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("postgresql:///db?password=pw&sslmode=require") == (
        "postgresql:///db?password=***&sslmode=require"
    )
