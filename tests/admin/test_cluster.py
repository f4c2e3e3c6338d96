"""Operator actions across instances: two hubs sharing Redis (broker) and PostgreSQL
(store); every call goes to instance A's admin surface while the nodes hold their
sessions on instance B. Needs the real services (tests/services.py)."""

from __future__ import annotations

import base64
import secrets
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from openred.protocol.identity import Identity

from tests.admin.conftest import ADMIN_CONFIG, Api
from tests.admin.test_operator_actions import eventually, refused
from tests.hub.nodes import RawNode
from tests.services import need_pg, need_redis


def with_schema(dsn: str, schema: str) -> str:
    parts = urlsplit(dsn)
    query = f"{parts.query}&schema={schema}" if parts.query else f"schema={schema}"
    return urlunsplit(parts._replace(query=query))


@pytest.fixture
async def pair(make_hub: Any, http: Any) -> AsyncIterator[tuple[Api, Any, Any]]:
    redis_url, dsn = need_redis(), need_pg()
    schema = f"t_{secrets.token_hex(6)}"
    common = {**ADMIN_CONFIG, "server.hub_id": f"adm-{secrets.token_hex(4)}",
              "broker.url": redis_url, "store.url": with_schema(dsn, schema),
              "store.pool_size": 4}
    a = await make_hub(**common, **{"server.instance_id": "hub-a"})
    b = await make_hub(**common, **{"server.instance_id": "hub-b"})
    yield Api(http, a), a, b
    import asyncpg

    # make_hub stops the hubs after this fixture's teardown; drop the schema then.
    await a.stop()
    await b.stop()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def test_kick_and_ban_reach_the_other_instance(pair: tuple[Api, Any, Any]) -> None:
    api, _a, b = pair
    ident = Identity.generate()
    node = await RawNode.connect(b, ident)

    async def seen_online() -> bool:
        v = (await api.get(f"/v1/nodes/{ident.node_id}")).json()
        return v.get("online") is True

    await eventually(seen_online)
    view = (await api.get(f"/v1/nodes/{ident.node_id}")).json()
    assert view["instance"] is None  # online elsewhere; presence does not say where
    r = await api.post(f"/v1/nodes/{ident.node_id}/kick")
    assert r.status == 200, r
    code, frames = await node.closed()
    assert code == 4012 and any(f.get("reason") == "kicked" for f in frames)

    node = await RawNode.connect(b, ident)
    await eventually(seen_online)
    r = await api.post(f"/v1/nodes/{ident.node_id}/ban")
    assert r.status == 200 and r.json()["banned"] is True, r
    code, _ = await node.closed()
    assert code == 4003
    assert (await refused(b, ident))[0] == 4003
    assert (await refused(pair[1], ident))[0] == 4003
    assert (await api.delete(f"/v1/nodes/{ident.node_id}/ban")).status == 200
    again = await RawNode.connect(b, ident)
    await again.close()


async def test_send_and_publish_reach_the_other_instance(pair: tuple[Api, Any, Any]) -> None:
    api, _a, b = pair
    node = await RawNode.connect(b)
    assert (await node.request({"t": "sub", "id": 1, "topic": "ops/all"}))["t"] == "ok"

    async def seen_online() -> bool:
        # The node is reachable from other instances once B's broker claim is done,
        # which may be just after its welcome.
        return bool((await api.get(f"/v1/nodes/{node.node_id}")).json()["online"])

    await eventually(seen_online)
    topic_body = base64.b64encode(b"t").decode()

    async def publish() -> bool:
        r = await api.post("/v1/messages", json={"topic": "ops/all", "body_b64": topic_body})
        assert r.status == 202, r
        try:
            msg = await node.recv_type("msg", wait=0.5)
        except TimeoutError:
            return False  # the interest may not have reached the broker yet
        assert (msg["from"], msg["topic"], msg["body"]) == ("$admin", "ops/all", b"t")
        return True

    # An operator's usual mix, a few rounds: publish to a topic, then send to the node
    # (QoS 0 and 1). Rounds, because a lost frame here showed up in about 1 run in 3.
    for i in range(5):
        await eventually(publish)
        for qos, status in ((0, "sent"), (1, "stored")):
            body = base64.b64encode(b"%d-%d" % (i, qos)).decode()
            r = await api.post("/v1/messages", json={"to": node.node_id, "body_b64": body,
                                                     "qos": qos})
            assert r.status == 202 and r.json()["status"] == status, r
            msg = await node.recv_type("msg")
            assert (msg["from"], msg["qos"], msg["mid"]) == ("$admin", qos, r.json()["mid"])
            if qos == 1:
                await node.send({"t": "ack", "mid": msg["mid"]})
    await node.close()
