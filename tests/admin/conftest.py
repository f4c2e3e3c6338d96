"""Fixtures for the admin HTTP tests: a real hub (tests/hub's `make_hub`) with admin
tokens and a JWT secret, and `Api`, a small aiohttp client for its admin port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.hub.conftest import hub, loop_guard, make_hub  # noqa: F401  (re-exported fixtures)

TOKEN = "tok-1"
OTHER_TOKEN = "tok-2"
JWT_SECRET = "s" * 40
ADMIN_CONFIG: dict[str, Any] = {
    "admin.tokens": (TOKEN, OTHER_TOKEN),
    "auth.jwt_secret": JWT_SECRET,
    # Out of the way of the functional tests (schemathesis sends hundreds of requests
    # a second, bad tokens included); test_abuse.py sets its own limits.
    "admin.requests_per_s": 1_000_000,
    "admin.requests_burst": 1_000_000,
    "admin.max_auth_failures": 1_000_000,
}


class Reply:
    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def content_type(self) -> str:
        return str(self.headers.get("Content-Type", "")).split(";")[0]

    def json(self) -> Any:
        import json

        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Reply {self.status} {self.body[:300]!r}>"


class Api:
    """Calls the admin surface of one hub; `token=None` sends no Authorization."""

    def __init__(self, session: aiohttp.ClientSession, running: Any) -> None:
        self.session = session
        self.hub = running
        self.base = f"http://127.0.0.1:{running.admin_port}"

    async def call(self, method: str, path: str, *, token: str | None = TOKEN,
                   headers: dict[str, str] | None = None, **kw: Any) -> Reply:
        h = dict(headers or {})
        if token is not None:
            h.setdefault("Authorization", f"Bearer {token}")
        async with self.session.request(method, self.base + path, headers=h, **kw) as r:
            return Reply(r.status, r.headers, await r.read())

    async def get(self, path: str, **kw: Any) -> Reply:
        return await self.call("GET", path, **kw)

    async def post(self, path: str, **kw: Any) -> Reply:
        return await self.call("POST", path, **kw)

    async def put(self, path: str, **kw: Any) -> Reply:
        return await self.call("PUT", path, **kw)

    async def delete(self, path: str, **kw: Any) -> Reply:
        return await self.call("DELETE", path, **kw)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def admin_hub(make_hub: Any) -> Any:  # noqa: F811
    return await make_hub(**ADMIN_CONFIG)


@pytest.fixture
async def api(http: aiohttp.ClientSession, admin_hub: Any) -> Api:
    return Api(http, admin_hub)


def assert_problem(r: Reply, status: int, field: str | None = None) -> dict[str, Any]:
    assert r.status == status, r
    assert r.content_type == "application/problem+json", r
    p = r.json()
    assert p["status"] == status and p["type"] and p["title"] and p["detail"], p
    if field is not None:
        assert p.get("field") == field, p
    return p  # type: ignore[no-any-return]
