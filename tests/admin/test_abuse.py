"""Abuse limits of the admin surface on one instance (admin_http/guard.py): the lockout
after bad tokens (429 + Retry-After, a good token included, concurrent guesses
included), per-IP and per-token rates at each route's cost, the counters, and the
local fallback when the Redis broker is unreachable. Two instances on real Redis:
tests/cluster/test_admin_abuse.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.admin.conftest import ADMIN_CONFIG, TOKEN, Api, assert_problem
from tests.cluster.conftest import free_port

PROXY = {"server.trusted_proxies": ("127.0.0.1",)}  # X-Forwarded-For picks the client


def xff(ip: str) -> dict[str, str]:
    return {"X-Forwarded-For": ip}


@pytest.fixture
async def strict(make_hub: Any, http: Any) -> Api:
    return Api(http, await make_hub(**{
        **ADMIN_CONFIG, **PROXY, "admin.max_auth_failures": 3, "admin.lockout_s": 60,
        "admin.requests_per_s": 1, "admin.requests_burst": 12}))


async def test_lockout_after_bad_tokens(strict: Api) -> None:
    ip = xff("203.0.113.7")
    statuses = [(await strict.get("/v1/stats", token=f"bad-{i}", headers=ip)).status
                for i in range(8)]
    assert statuses == [401] * 3 + [429] * 5
    r = await strict.get("/v1/stats", token="bad-9", headers=ip)
    p = assert_problem(r, 429)
    assert "locked out" in p["detail"] and "bad-9" not in r.body.decode()
    assert 55 <= int(r.headers["Retry-After"]) <= 60
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    # Locked out means locked out: a good token from there is no oracle either.
    assert_problem(await strict.get("/v1/stats", headers=ip), 429)
    # Another client is not affected; the open document is not behind the lockout.
    assert (await strict.get("/v1/stats", headers=xff("203.0.113.8"))).status == 200
    assert (await strict.get("/v1/openapi.json", token=None, headers=ip)).status == 200


async def test_concurrent_guesses_get_at_most_the_configured_401s(strict: Api) -> None:
    ip = xff("198.51.100.1")
    replies = await asyncio.gather(*(strict.get("/v1/nodes", token=f"guess-{i}", headers=ip)
                                     for i in range(40)))
    assert sorted(r.status for r in replies) == [401] * 3 + [429] * 37


async def test_requests_without_a_token_are_not_failures(strict: Api) -> None:
    ip = xff("198.51.100.2")
    for _ in range(5):
        assert_problem(await strict.get("/v1/stats", token=None, headers=ip), 401)
    assert (await strict.get("/v1/stats", headers=ip)).status == 200


async def test_per_ip_rate_at_route_cost(strict: Api) -> None:
    ip = xff("198.51.100.3")
    # burst 12: two writes (5 each) and two reads, then nothing.
    assert (await strict.put("/v1/nodes/a", json={"meta": {}}, headers=ip)).status == 201
    assert (await strict.put("/v1/nodes/b", json={"meta": {}}, headers=ip)).status == 201
    assert (await strict.get("/v1/nodes/a", headers=ip)).status == 200
    assert (await strict.get("/v1/nodes/b", headers=ip)).status == 200
    r = await strict.get("/v1/stats", headers=ip)
    p = assert_problem(r, 429)
    assert p["detail"] == "too many requests from this address"
    assert int(r.headers["Retry-After"]) == 1
    # A write waits for 5 units, at 1 a second.
    r = await strict.put("/v1/nodes/c", json={"meta": {}}, headers=ip)
    assert_problem(r, 429)
    assert 4 <= int(r.headers["Retry-After"]) <= 5


async def test_per_token_rate_across_addresses(strict: Api) -> None:
    for i in range(12):
        r = await strict.get("/v1/stats", headers=xff(f"192.0.2.{i}"))
        assert r.status == 200, r
    r = await strict.get("/v1/stats", headers=xff("192.0.2.200"))
    assert assert_problem(r, 429)["detail"] == "too many requests with this token"


async def test_ipv6_clients_count_by_slash_64(strict: Api) -> None:
    for i in range(3):
        await strict.get("/v1/stats", token="bad", headers=xff(f"2001:db8:1:2::{i + 1}"))
    r = await strict.get("/v1/stats", token="bad", headers=xff("2001:db8:1:2:ffff::9"))
    assert_problem(r, 429)
    r = await strict.get("/v1/stats", headers=xff("2001:db8:1:3::1"))
    assert r.status == 200


async def test_refusals_are_counted(strict: Api) -> None:
    ip = xff("198.51.100.9")
    for i in range(5):
        await strict.get("/v1/stats", token=f"bad{i}", headers=ip)
    text = (await strict.get("/metrics", token=None)).body.decode()
    assert 'openred_hub_admin_auth_failures_total{reason="invalid"} 3.0' in text
    assert 'openred_hub_admin_refused_total{reason="lockout"} 2.0' in text


async def test_redis_unreachable_falls_back_to_local_limits(make_hub: Any, http: Any) -> None:
    """Never unlimited, never refusing everything: each instance holds the limits."""
    hub = await make_hub(**{**ADMIN_CONFIG, **PROXY, "admin.max_auth_failures": 2,
                            "broker.url": f"redis://127.0.0.1:{free_port()}/0"})
    api = Api(http, hub)
    ip = xff("203.0.113.50")
    statuses = [(await api.get("/v1/nodes", token="nope", headers=ip)).status
                for _ in range(4)]
    assert statuses == [401, 401, 429, 429]
    assert (await api.get("/v1/nodes", token=TOKEN, headers=xff("203.0.113.51"))).status \
        == 200
