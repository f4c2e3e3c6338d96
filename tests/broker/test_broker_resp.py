"""The broker's own RESP connection (hub/broker_resp.py): replies cut anywhere by TCP,
error replies, big replies, pipelines against the real Redis; and `broker.url`'s
credentials and TLS, honoured by it exactly as by redis-py, against a private
redis-server with a password, an ACL user and a TLS port."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from openred.hub.broker_redis import RedisBroker
from openred.hub.broker_resp import RespConnection, RespError, command, open_resp

from tests.broker.conftest import Recorder, until
from tests.cluster.conftest import _wait_port, free_port, need_binary
from tests.services import need_redis

REPLIES = (b"+OK\r\n:42\r\n$-1\r\n$0\r\n\r\n-ERR wrong kind\r\n"
           b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhe\r\nl\r\n*0\r\n")
EXPECTED = [b"OK", 42, None, b"", "ERR wrong kind", [b"message", b"ch", b"he\r\nl"], []]


def _plain(values: list[Any]) -> list[Any]:
    return [str(v) if isinstance(v, RespError) else v for v in values]


async def test_replies_cut_at_every_byte_parse_the_same() -> None:
    for cut in range(len(REPLIES) + 1):
        got: list[Any] = []
        conn = RespConnection(got.append)
        conn.data_received(REPLIES[:cut])
        conn.data_received(REPLIES[cut:])
        assert _plain(got) == EXPECTED, cut
    got = []
    conn = RespConnection(got.append)
    for i in range(len(REPLIES)):
        conn.data_received(REPLIES[i:i + 1])
    assert _plain(got) == EXPECTED


async def test_garbage_from_the_server_drops_the_connection() -> None:
    got: list[Any] = []
    conn = RespConnection(got.append)
    conn.data_received(b":1\r\n?what\r\n")
    assert got == [1]
    assert not conn.open


def test_command_encoding() -> None:
    assert command("PUBLISH", b"c\r\n", 7) == (
        b"*3\r\n$7\r\nPUBLISH\r\n$3\r\nc\r\n\r\n$1\r\n7\r\n")


@pytest.fixture
async def pool() -> AsyncIterator[Any]:
    p = redis.ConnectionPool.from_url(need_redis())
    yield p
    await p.aclose()


async def test_pipeline_against_real_redis(pool: Any) -> None:
    key = f"wire:{secrets.token_hex(4)}"
    big = secrets.token_bytes(3 * 1024 * 1024)  # arrives in many reads
    conn = await open_resp(pool)
    try:
        replies = await conn.send(b"".join([
            command("SET", key, "x"), command("INCR", key), command("ECHO", big),
            command("PUBLISH", f"{key}:nobody", "hi"), command("DEL", key)]), 5)
        assert replies[0] == b"OK"
        assert isinstance(replies[1], RespError) and "not an integer" in str(replies[1])
        assert replies[2] == big
        assert replies[3:] == [0, 1]
    finally:
        conn.close()
    assert not conn.open
    with pytest.raises(ConnectionError):
        await conn.send(command("PING"), 1)


async def test_pubsub_pushes_from_real_redis(pool: Any) -> None:
    pushes: list[Any] = []
    sub = await open_resp(pool, pushes.append)
    pub = await open_resp(pool)
    ch = f"wire:{secrets.token_hex(4)}"
    try:
        sub.write(command("SUBSCRIBE", ch))
        await until(lambda: [b"subscribe", ch.encode(), 1] in pushes, what="confirmation")
        frames = [secrets.token_bytes(n) for n in (0, 1, 70_000)]
        counts = await pub.send(b"".join(command("PUBLISH", ch, f) for f in frames), 3)
        assert counts == [1, 1, 1]
        await until(lambda: len(pushes) == 4, what="messages")
        assert pushes[1:] == [[b"message", ch.encode(), f] for f in frames]
    finally:
        sub.close()
        pub.close()


# -- credentials and TLS ---------------------------------------------------------------


def _tls_files(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "openred test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = d / "ca.pem", d / "server.pem", d / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def _spawn(binary: str, d: Path, port: int, password: str, alice: str, tls_port: int,
           ca: Path, cert: Path, key: Path) -> subprocess.Popen[bytes]:
    """redis-server with a password, the ACL user `alice` and a TLS port."""
    return subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no", "--dir", str(d), "--requirepass", password,
         "--user", "alice", "on", f">{alice}", "~*", "&*", "+@all",
         "--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file",
         str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


async def _two_brokers_route(url: str) -> None:
    hub_id = f"w{secrets.token_hex(4)}"
    a, b = RedisBroker(url, hub_id=hub_id), RedisBroker(url, hub_id=hub_id)
    rb = Recorder("b")
    await a.start("a", Recorder("a"))
    await b.start("b", rb)
    try:
        assert a.up and b.up
        await b.claim("n1", "s1")
        assert await a.publish_to_node("n1", b"frame", 1, "m1") is True
        await until(lambda: ("n1", b"frame", 1, "m1") in rb.node_frames, what="delivery")
    finally:
        await a.close()
        await b.close()


async def test_password_acl_user_and_tls(tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    need_binary("redis-server")
    binary = shutil.which("redis-server")
    assert binary is not None
    ca, cert, key = _tls_files(tmp_path)
    port, tls_port = free_port(), free_port()
    password, alice = secrets.token_hex(8), secrets.token_hex(8)
    proc = _spawn(binary, tmp_path, port, password, alice, tls_port, ca, cert, key)
    try:
        await _wait_port(port, proc, "redis-server")
        await _wait_port(tls_port, proc, "redis-server (TLS)")
        await _two_brokers_route(f"redis://:{password}@127.0.0.1:{port}/0")
        await _two_brokers_route(f"redis://alice:{alice}@127.0.0.1:{port}/0")
        await _two_brokers_route(
            f"rediss://:{password}@127.0.0.1:{tls_port}/0?ssl_ca_certs={ca}")

        wrong = "not-" + password
        caplog.set_level(logging.INFO, logger="openred")
        b = RedisBroker(f"redis://:{wrong}@127.0.0.1:{port}/0", hub_id="w")
        await b.start("b", Recorder("b"))
        try:
            assert not b.up
        finally:
            await b.close()
        assert wrong not in caplog.text  # secrets never in logs
        start = [r for r in caplog.records if r.getMessage().startswith("redis not reachable")]
        assert start and "refused the credentials" in getattr(start[0], "error", "")
    finally:
        proc.kill()
        proc.wait()
    await asyncio.sleep(0)
