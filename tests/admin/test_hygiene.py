"""HTTP hygiene of the admin listener (admin_http/hygiene.py), against a real socket:
the header-read timeout, problem+json with the security headers for what the parser
refuses (echoing nothing), no version in `Server`, 413 at once for a declared body
over the limit, the open document, and TLS with HSTS."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.admin.conftest import ADMIN_CONFIG, TOKEN, Api
from tests.broker.test_broker_resp import _tls_files
from tests.conftest import timeout


async def raw(port: int, data: bytes, *, wait: float = 5.0) -> bytes:
    """Send `data`, read until the server closes (or `wait` passes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        out = b""
        async with asyncio.timeout(timeout(wait)):
            while chunk := await reader.read(65536):
                out += chunk
        return out
    finally:
        writer.close()


def parse(resp: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = resp.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(lines[0].split()[1]), headers, body


def assert_hygienic(headers: dict[str, str]) -> None:
    assert headers["server"] == "openred-hub"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert "default-src 'none'" in headers["content-security-policy"]


@pytest.fixture
async def admin(make_hub: Any) -> Any:
    return await make_hub(**ADMIN_CONFIG, **{"admin.header_timeout_s": 1.0})


async def test_headers_that_never_end_are_cut_off(admin: Any) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", admin.admin_port)
    t0 = time.monotonic()
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        closed = False
        for _ in range(int(timeout(5) / 0.2)):  # a slowloris: a byte every 0.2 s
            try:
                writer.write(b"X")
                await writer.drain()
                data = await asyncio.wait_for(reader.read(1024), 0.2)
                if data == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except ConnectionError:
                closed = True
                break
        assert closed
        assert time.monotonic() - t0 < timeout(2.5)
    finally:
        writer.close()


async def test_a_silent_connection_is_closed(admin: Any) -> None:
    t0 = time.monotonic()
    assert await raw(admin.admin_port, b"", wait=5) == b""
    assert time.monotonic() - t0 < timeout(2.5)


@pytest.mark.parametrize("request_bytes", [
    b"GARBAGE<script>alert(1)</script> / HTTP/1.1\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"<b>" * 5000 + b"\r\n\r\n",
    b"GET /<script> HTTP/9.9\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS hello
])
async def test_parser_errors_are_problems_that_echo_nothing(admin: Any,
                                                            request_bytes: bytes) -> None:
    status, headers, body = parse(await raw(admin.admin_port, request_bytes))
    assert 400 <= status < 500
    assert headers["content-type"].startswith("application/problem+json")
    assert_hygienic(headers)
    problem = json.loads(body)
    assert problem["status"] == status and problem["detail"].startswith("malformed request")
    for echo in (b"script", b"GARBAGE", b"<b>", b"HTTP/9.9"):
        assert echo not in body


async def test_server_header_names_no_version(admin: Any, http: Any) -> None:
    api = Api(http, admin)
    for path, token in (("/healthz", None), ("/v1/stats", TOKEN), ("/v1/nope", TOKEN),
                        ("/v1/stats", None)):
        r = await api.get(path, token=token)
        assert r.headers["Server"] == "openred-hub", (path, r.headers)
        text = " ".join(f"{k}: {v}" for k, v in r.headers.items()).lower()
        assert "python" not in text and "aiohttp" not in text
        assert "Strict-Transport-Security" not in r.headers  # no TLS here


async def test_declared_huge_body_gets_413_at_once(admin: Any) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", admin.admin_port)
    try:
        writer.write(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 104857600\r\n\r\n"
                     b'{"to":')
        await writer.drain()
        t0 = time.monotonic()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout(2))
        assert time.monotonic() - t0 < timeout(1)
        status, headers, _ = parse(head)
        assert status == 413
        assert headers["content-type"].startswith("application/problem+json")
        assert headers.get("connection", "").lower() == "close"
        assert_hygienic(headers)
        # Then the socket closes: at once if the client sends nothing more, else after
        # lingering (hygiene.LINGER_S) so that it can read the answer.
        rest = await asyncio.wait_for(reader.read(), timeout(4))
        assert json.loads(rest)["status"] == 413
        assert time.monotonic() - t0 < timeout(3)
    finally:
        writer.close()


async def test_document_is_open(admin: Any, http: Any) -> None:
    r = await Api(http, admin).get("/v1/openapi.json", token=None)
    assert r.status == 200 and r.json()["openapi"].startswith("3.1")


async def test_admin_tls_and_hsts(make_hub: Any, tmp_path: Path) -> None:
    ca, cert, key = _tls_files(tmp_path)
    hub = await make_hub(**ADMIN_CONFIG, **{"admin.tls_cert": str(cert),
                                            "admin.tls_key": str(key)})
    ctx = ssl.create_default_context(cafile=str(ca))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"https://127.0.0.1:{hub.admin_port}/v1/stats", ssl=ctx,
                            headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 200
            assert r.headers["Strict-Transport-Security"] == "max-age=31536000"
            assert r.headers["Server"] == "openred-hub"
    # Plain HTTP on the TLS port gets nothing readable.
    reply = await raw(hub.admin_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", wait=3)
    assert not reply.startswith(b"HTTP/1.1 200")
    # A parser error over TLS carries HSTS too.
    r2, w2 = await asyncio.open_connection("127.0.0.1", hub.admin_port, ssl=ctx)
    try:
        w2.write(b"BAD REQUEST\r\n\r\n")
        status, headers, _ = parse(await asyncio.wait_for(r2.read(), timeout(3)))
        assert status == 400 and headers["strict-transport-security"] == "max-age=31536000"
    finally:
        w2.close()
