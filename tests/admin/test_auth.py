"""Bearer auth on every /v1/ route but the open document (derived from the route
table, so a new route is covered the day it is added), the 401 shape, the no-token
configuration, and that a token is never logged nor audited. Scopes, limits and the
lockout: test_scopes.py, test_abuse.py."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

import pytest
from openred.admin_http.routes import ROUTES

from tests.admin.conftest import OTHER_TOKEN, TOKEN, Api, assert_problem

SAMPLE_BODIES: dict[str, Any] = {
    "putNode": {"meta": {"name": "a"}},
    "sendMessage": {"to": "node-a", "body_b64": "aGk="},
    "issueToken": {"sub": "node-a"},
    "revokeTokens": {"jti": "some-jti"},
}
V1 = [r for r in ROUTES if r.path.startswith("/v1/") and r.auth]


def concrete(path: str) -> str:
    return path.replace("{id}", "node-a").replace("{mid}", "01ARZ3NDEKTSV4RRFFQ69G5FAV")


def ids(r: Any) -> str:
    return f"{r.method} {r.path}"


async def test_every_v1_route_is_in_the_table() -> None:
    assert {ids(r) for r in V1} >= {
        "GET /v1/stats", "GET /v1/nodes", "GET /v1/nodes/{id}",
        "PUT /v1/nodes/{id}", "DELETE /v1/nodes/{id}", "POST /v1/nodes/{id}/ban",
        "DELETE /v1/nodes/{id}/ban", "POST /v1/nodes/{id}/kick", "POST /v1/messages",
        "GET /v1/messages/{mid}", "GET /v1/audit", "POST /v1/tokens",
        "POST /v1/tokens/revoke"}
    # The document is open, as documentation is.
    assert [ids(r) for r in ROUTES if r.path.startswith("/v1/") and not r.auth] == [
        "GET /v1/openapi.json"]


@pytest.mark.parametrize("route", V1, ids=ids)
async def test_route_needs_a_token(api: Api, route: Any) -> None:
    body = SAMPLE_BODIES.get(route.operation_id)
    kw = {"json": body} if body is not None else {}
    path = concrete(route.path)
    for token, headers, error in (
        (None, None, False),
        ("wrong", None, True),
        (TOKEN + "x", None, True),
        (None, {"Authorization": f"Basic {TOKEN}"}, True),
        (None, {"Authorization": "Bearer"}, True),
        (None, {"Authorization": f"bearer  {TOKEN[:-1]}"}, True),
    ):
        r = await api.call(route.method, path, token=token, headers=headers, **kw)
        p = assert_problem(r, 401)
        assert TOKEN not in p["detail"]
        challenge = r.headers["WWW-Authenticate"]
        assert challenge.startswith('Bearer realm="openred-hub"')
        assert ('error="invalid_token"' in challenge) == error
        assert r.headers["Cache-Control"] == "no-store"
        assert r.headers["X-Content-Type-Options"] == "nosniff"
    # With a token (either one; the scheme is case-insensitive), never a 401.
    for token, headers in ((TOKEN, None), (None, {"Authorization": f"bearer {OTHER_TOKEN}"})):
        r = await api.call(route.method, path, token=token, headers=headers, **kw)
        assert r.status != 401 and r.status < 500, r


async def test_unknown_v1_path_without_token_is_401_not_404(api: Api) -> None:
    assert_problem(await api.get("/v1/nope", token=None), 401)
    assert_problem(await api.get("/v1/nope"), 404)


@pytest.mark.parametrize("route", V1, ids=ids)
async def test_no_tokens_configured_every_route_401(make_hub: Any, http: Any,
                                                    route: Any) -> None:
    h = await make_hub()
    api = Api(http, h)
    body = SAMPLE_BODIES.get(route.operation_id)
    for token in (None, "", TOKEN):
        r = await api.call(route.method, concrete(route.path), token=token,
                           **({"json": body} if body is not None else {}))
        p = assert_problem(r, 401)
        assert "no admin tokens" in p["detail"]


async def test_probes_need_no_token(api: Api) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        r = await api.get(path, token=None)
        assert r.status == 200, r
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["X-Frame-Options"] == "DENY"
        assert "default-src 'none'" in r.headers["Content-Security-Policy"]


async def test_token_never_logged_nor_audited(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    assert (await api.get("/v1/stats")).status == 200
    assert (await api.get("/v1/stats", token="not-the-token-zzz")).status == 401
    assert (await api.put("/v1/nodes/n1", json={"meta": {}})).status == 201
    await asyncio.sleep(0.2)  # audit rows are written with the next commit
    r = await api.get("/v1/audit?limit=1000")
    text = r.body.decode() + "\n".join(
        f"{rec.getMessage()} {rec.__dict__}" for rec in caplog.records)
    for secret in (TOKEN, OTHER_TOKEN, "not-the-token-zzz"):
        assert secret not in text
    events = r.json()["items"]
    calls = [e for e in events if e["kind"] == "admin_call"]
    tid = hashlib.sha256(TOKEN.encode()).hexdigest()[:8]
    put = next(e for e in calls if e["detail"]["method"] == "PUT")
    assert put["detail"] == {"method": "PUT", "route": "/v1/nodes/{id}", "status": 201,
                             "token": tid, "request_id": put["detail"]["request_id"]}
    assert put["node"] == "n1" and put["ip"] == "127.0.0.1"
    failed = [e for e in events if e["kind"] == "admin_auth_failed"]
    assert failed and failed[0]["detail"]["reason"] == "invalid"
    assert failed[0]["ip"] == "127.0.0.1"
    logged = [rec for rec in caplog.records if getattr(rec, "event", None) == "admin_call"]
    assert logged and all(rec.token == tid for rec in logged)  # type: ignore[attr-defined]
    assert all(getattr(rec, "request_id", None) for rec in logged)


async def test_request_id_echoed_or_generated(api: Api) -> None:
    r = await api.get("/v1/stats", headers={"X-Request-Id": "abc-123"})
    assert r.headers["X-Request-Id"] == "abc-123"
    r = await api.get("/v1/stats", headers={"X-Request-Id": "bad id\twith spaces"})
    assert r.headers["X-Request-Id"] != "bad id\twith spaces"
    r1, r2 = await api.get("/v1/stats"), await api.get("/v1/nodes/x y", token=None)
    assert r1.headers["X-Request-Id"] and r2.headers["X-Request-Id"]
    assert r1.headers["X-Request-Id"] != r2.headers["X-Request-Id"]
