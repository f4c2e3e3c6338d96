"""Admin token scopes (admin_http/tokens.py): named tokens with a scope, hashed secrets,
old-style tokens as scope admin, 403 problem+json (audited) out of scope, for every
route of the table; and the configuration errors of each token form."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest
from openred.admin_http.routes import ROUTES
from openred.admin_http.tokens import SCOPES, scope_allows
from openred.hub.config import ConfigError, load_config

from tests.admin.conftest import JWT_SECRET, Api, assert_problem
from tests.admin.test_auth import SAMPLE_BODIES, concrete, ids

READ = "reader-secret-0123456789"
WRITE = "writer-secret-0123456789"
ADMIN = "admin-secret-0123456789ab"
OLD = "old-style-token"
SCOPED = {
    "admin.tokens": (
        f"dash:read:{READ}",
        f"ops:write:sha256:{hashlib.sha256(WRITE.encode()).hexdigest()}",
        f"root:admin:{ADMIN}",
        OLD,
    ),
    "auth.jwt_secret": JWT_SECRET,
}
SECRETS = {"read": READ, "write": WRITE, "admin": ADMIN}
V1 = [r for r in ROUTES if r.path.startswith("/v1/") and r.auth]


@pytest.fixture
async def scoped(make_hub: Any, http: Any) -> Api:
    return Api(http, await make_hub(**SCOPED))


def test_scopes_nest() -> None:
    assert [[scope_allows(h, n) for n in SCOPES] for h in SCOPES] == [
        [True, False, False], [True, True, False], [True, True, True]]


@pytest.mark.parametrize("route", V1, ids=ids)
async def test_each_route_enforces_its_scope(scoped: Api, route: Any) -> None:
    body = SAMPLE_BODIES.get(route.operation_id)
    kw = {"json": body} if body is not None else {}
    for scope, secret in SECRETS.items():
        r = await scoped.call(route.method, concrete(route.path), token=secret, **kw)
        if scope_allows(scope, route.scope):
            assert r.status not in (401, 403) and r.status < 500, (scope, r)
        else:
            p = assert_problem(r, 403)
            assert scope in p["detail"] and route.scope in p["detail"]
            assert secret not in r.body.decode()
            assert r.headers["X-Content-Type-Options"] == "nosniff"
    # An old-style token is scope admin: everything.
    r = await scoped.call(route.method, concrete(route.path), token=OLD, **kw)
    assert r.status not in (401, 403) and r.status < 500, r


async def test_out_of_scope_is_audited_by_name(scoped: Api) -> None:
    assert_problem(await scoped.put("/v1/nodes/n1", json={"meta": {}}, token=READ), 403)
    assert_problem(await scoped.post("/v1/tokens", json={"sub": "n1"}, token=WRITE), 403)
    await asyncio.sleep(0.2)  # audit rows ride with the next commit
    r = await scoped.get("/v1/audit?kind=admin_forbidden", token=ADMIN)
    events = {e["detail"]["token"]: e for e in r.json()["items"]}
    assert events["dash"]["detail"] | {"request_id": ""} == {
        "method": "PUT", "route": "/v1/nodes/{id}", "token": "dash", "scope": "read",
        "needs": "write", "request_id": ""}
    assert events["dash"]["node"] == "n1"
    assert events["ops"]["detail"]["needs"] == "admin"
    assert READ not in r.body.decode() and WRITE not in r.body.decode()
    # Calls in scope are attributed to the token's name.
    assert (await scoped.get("/v1/stats", token=READ)).status == 200
    await asyncio.sleep(0.2)
    calls = (await scoped.get("/v1/audit?kind=admin_call", token=ADMIN)).json()["items"]
    assert "dash" in {e["detail"]["token"] for e in calls}


async def test_hashed_secret_is_not_itself_a_token(scoped: Api) -> None:
    digest = hashlib.sha256(WRITE.encode()).hexdigest()
    assert_problem(await scoped.get("/v1/stats", token=digest), 401)
    assert (await scoped.get("/v1/stats", token=WRITE)).status == 200


def _error(tmp_path: Path, tokens: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, env={}, overrides={"admin.tokens": tokens})
    return str(info.value)


def test_token_config_errors_name_the_entry_never_the_secret(tmp_path: Path) -> None:
    cases = {
        "a:read:short": "token #1 token 'a': the secret must be at least 16",
        "a:read:sha256:abc": "sha256: must be followed by 64 hex digits",
        "a:read:has space in it 123": "token #1",
    }
    for entry, expected in cases.items():
        msg = _error(tmp_path, [entry])
        assert msg.startswith("admin.tokens:") and expected in msg, msg
        assert entry.split(":")[-1] not in msg or entry.endswith("abc")
    assert "same name" in _error(tmp_path, [f"a:read:{READ}", f"a:write:{WRITE}"])
    assert "same secret" in _error(tmp_path, [f"a:read:{READ}", f"b:write:{READ}"])
    # A scoped secret may live in a file; a plain old token still works.
    path = tmp_path / "secret"
    path.write_text(ADMIN + "\n")
    cfg = load_config(None, env={}, overrides={"admin.tokens": [f"x:admin:file:{path}",
                                                                "tok-1"]})
    assert cfg.admin.tokens == (f"x:admin:{ADMIN}", "tok-1")
    assert ADMIN not in repr(cfg)
