"""Errors are problem+json with a useful detail: bad bodies, unknown members, bad
parameters and cursors, huge bodies, wrong content types and methods; the security
headers are on error responses too."""

from __future__ import annotations

from typing import Any

import pytest

from tests.admin.conftest import Api, assert_problem

JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(("raw", "words"), [
    (b"{", "not json"),
    (b"", "not json"),
    (b"[1, 2", "not json"),
    (b'{"meta": {}} trailing', "not json"),
    (b'{"meta": NaN}', "not json"),
    (b'{"meta": {"x": 1e400}}', "out of range"),
    (b'{"meta": {}, "meta": {}}', "duplicate"),
    (b"\xff\xfe{}", "utf-8"),
    (b"[" * 100_000, ""),  # nesting; larger than the bound, or too deep: never a 500
])
async def test_malformed_json(api: Api, raw: bytes, words: str) -> None:
    r = await api.put("/v1/nodes/n1", data=raw, headers=JSON)
    assert r.status in (400, 413), r
    p = assert_problem(r, r.status)
    assert words in p["detail"].lower()


async def test_deep_nesting_within_the_bound_is_400(api: Api) -> None:
    r = await api.put("/v1/nodes/n1", data=b"[" * 40_000 + b"]" * 40_000, headers=JSON)
    assert_problem(r, 400)


@pytest.mark.parametrize(("body", "field", "words"), [
    ([], "body", "object"),
    ("x", "body", "object"),
    ({}, "meta", "required"),
    ({"meta": [], "key": None}, "meta", "object"),
    ({"meta": {}, "nickname": "x"}, "nickname", "unknown field 'nickname'"),
    ({"meta": {}, "key": "zz"}, "key", "form"),
    ({"meta": {}, "key": "ab" * 31}, "key", "form"),
    ({"meta": {}, "key": 5}, "key", "string"),
    ({"meta": {"x": "y" * 5000}}, "meta", "4096"),
    ({"meta": {"x": 2**70}}, "meta", "64 bits"),
])
async def test_put_node_bad_bodies(api: Api, body: Any, field: str, words: str) -> None:
    p = assert_problem(await api.put("/v1/nodes/n1", json=body), 422, field)
    assert words in p["detail"]


@pytest.mark.parametrize(("body", "field"), [
    ({"body_b64": "aGk="}, "to"),
    ({"to": "a", "topic": "t", "body_b64": "aGk="}, "topic"),
    ({"to": "a"}, "body_b64"),
    ({"to": "a", "body_b64": "not base64!"}, "body_b64"),
    ({"to": "a", "body_b64": "aGk"}, "body_b64"),  # unpadded
    ({"to": "a", "body_b64": "aGk=", "qos": 2}, "qos"),
    ({"to": "a", "body_b64": "aGk=", "qos": True}, "qos"),
    ({"to": "a", "body_b64": "aGk=", "qos": 1, "ttl": 0}, "ttl"),
    ({"to": "a", "body_b64": "aGk=", "qos": 1, "ttl": 10**9}, "ttl"),
    ({"to": "no spaces", "body_b64": "aGk="}, "to"),
    ({"to": "$admin", "body_b64": "aGk="}, "to"),
    ({"topic": "t", "body_b64": "aGk=", "qos": 1}, "qos"),
    ({"topic": "bad topic", "body_b64": "aGk="}, "topic"),
    ({"topic": "t", "body_b64": "aGk=", "ttl": 5}, "ttl"),
    ({"to": "a", "body_b64": "aGk=", "from": "x"}, "from"),
])
async def test_send_bad_bodies(api: Api, body: Any, field: str) -> None:
    assert_problem(await api.post("/v1/messages", json=body), 422, field)


async def test_send_body_over_max_body_bytes(make_hub: Any, http: Any) -> None:
    from tests.admin.conftest import ADMIN_CONFIG

    h = await make_hub(**ADMIN_CONFIG, **{"limits.max_body_bytes": 100})
    api = Api(http, h)
    import base64

    ok = await api.post("/v1/messages", json={"to": "a", "body_b64":
                                              base64.b64encode(b"x" * 100).decode()})
    assert ok.status == 202, ok
    for n in (101, 102, 200):
        r = await api.post("/v1/messages", json={"to": "a", "body_b64":
                                                 base64.b64encode(b"x" * n).decode()})
        assert_problem(r, 422, "body_b64")


@pytest.mark.parametrize(("body", "field"), [
    ({}, "sub"),
    ({"sub": "a b"}, "sub"),
    ({"sub": "a", "ttl_s": 0}, "ttl_s"),
    ({"sub": "a", "ttl_s": "60"}, "ttl_s"),
    ({"sub": "a", "topics": "t"}, "topics"),
    ({"sub": "a", "topics": ["ok", "bad topic"]}, "topics[1]"),
    ({"sub": "a", "topics": ["t"] * 21}, "topics"),
    ({"sub": "a", "aud": "x"}, "aud"),
])
async def test_token_bad_bodies(api: Api, body: Any, field: str) -> None:
    assert_problem(await api.post("/v1/tokens", json=body), 422, field)


async def test_body_on_a_bodyless_route(api: Api) -> None:
    assert (await api.post("/v1/nodes/n1/ban", json={})).status == 200
    assert (await api.post("/v1/nodes/n1/ban", data=b"")).status == 200
    assert_problem(await api.post("/v1/nodes/n1/ban", json={"reason": "x"}), 422, "reason")


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
async def test_wrong_content_type_415(api: Api, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    r = await api.put("/v1/nodes/n1", data=b'{"meta": {}}', headers=headers)
    assert_problem(r, 415)
    # application/*+json and a charset are fine.
    r = await api.put("/v1/nodes/n1", data=b'{"meta": {}}',
                      headers={"Content-Type": "application/merge+json; charset=utf-8"})
    assert r.status in (200, 201), r


@pytest.mark.parametrize("path", ["/v1/nodes/n1", "/v1/messages", "/v1/tokens"])
async def test_huge_bodies_413(api: Api, path: str) -> None:
    method = "PUT" if path.startswith("/v1/nodes") else "POST"
    huge = b'{"meta": {"x": "' + b"a" * 200_000 + b'"}}'
    r = await api.call(method, path, data=huge, headers=JSON)
    p = assert_problem(r, 413)
    assert "too large" in p["detail"]
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    # Chunked (no Content-Length) is bounded as well.

    async def gen() -> Any:
        for _ in range(50):
            yield b"a" * 10_000

    r = await api.call(method, path, data=gen(), headers=JSON)
    assert_problem(r, 413)


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("POST", "/v1/stats", "GET"),
    ("DELETE", "/v1/nodes", "GET"),
    ("PATCH", "/v1/nodes/n1", "DELETE,GET,PUT"),
    ("GET", "/v1/nodes/n1/ban", "DELETE,POST"),
    ("GET", "/v1/nodes/n1/kick", "POST"),
    ("PUT", "/v1/messages", "POST"),
    ("DELETE", "/v1/messages/01ARZ3NDEKTSV4RRFFQ69G5FAV", "GET"),
    ("POST", "/v1/audit", "GET"),
    ("GET", "/v1/tokens", "POST"),
    ("POST", "/v1/openapi.json", "GET"),
    ("HEAD", "/v1/stats", "GET"),
])
async def test_wrong_methods_405(api: Api, method: str, path: str, allow: str) -> None:
    r = await api.call(method, path)
    assert r.status == 405, r
    assert sorted(r.headers["Allow"].split(",")) == allow.split(",")
    if method != "HEAD":
        p = assert_problem(r, 405)
        assert method in p["detail"]
    assert r.headers["Cache-Control"] == "no-store"


async def test_unknown_routes_404(api: Api) -> None:
    for path in ("/v1/nodez", "/v1/nodes/a/b/c", "/nope", "/v2/stats"):
        r = await api.get(path)
        assert_problem(r, 404)
        assert r.headers["X-Frame-Options"] == "DENY"
        assert "default-src 'none'" in r.headers["Content-Security-Policy"]


@pytest.mark.parametrize("query", [
    "limit=0", "limit=1001", "limit=-1", "limit=abc", "limit=1.5", "limit=99999999999999999999",
    "online=yes", "online=1", "online=", "cursor=", "cursor=@@@", "cursor=" + "A" * 600,
    "limit=5&limit=6", "onlin=true", "sort=id",
])
async def test_bad_node_list_params_400(api: Api, query: str) -> None:
    assert_problem(await api.get(f"/v1/nodes?{query}"), 400)


@pytest.mark.parametrize("query", [
    "node=a%20b", "kind=BAN", "kind=" + "a" * 33, "since=-1", "since=x",
    "since=99999999999999999999", "limit=0", "cursor=bm4xOmE",  # a nodes cursor
    "cursor=YTE6MA", "cursor=YTE6LTE", "cursor=YTE6eA", "extra=1",
])
async def test_bad_audit_params_400(api: Api, query: str) -> None:
    assert_problem(await api.get(f"/v1/audit?{query}"), 400)


@pytest.mark.parametrize("cursor", ["bm9wZQ", "YTE6NQ", "bjE6YSBi", "bjI6YQ", "!!", "bjE6"])
async def test_bad_node_cursors(api: Api, cursor: str) -> None:
    # "nope", an audit cursor, a bad node id, another version, not base64, empty id.
    assert_problem(await api.get(f"/v1/nodes?cursor={cursor}"), 400, "cursor")


@pytest.mark.parametrize("path", ["/v1/nodes/a%20b", "/v1/nodes/" + "a" * 129,
                                  "/v1/nodes/%24admin/kick", "/v1/messages/not-a-mid",
                                  "/v1/messages/" + "A" * 65])
async def test_bad_path_params_400(api: Api, path: str) -> None:
    assert_problem(await api.get(path) if "kick" not in path else await api.post(path), 400)


async def test_unknown_node_and_mid_404(api: Api) -> None:
    assert_problem(await api.get("/v1/nodes/nobody"), 404, "id")
    assert_problem(await api.post("/v1/nodes/nobody/kick"), 404, "id")
    assert_problem(await api.delete("/v1/nodes/nobody/ban"), 404, "id")
    assert_problem(await api.get("/v1/messages/01ARZ3NDEKTSV4RRFFQ69G5FAV"), 404, "mid")
