"""Ban, kick, server-side send and publish on live sessions of a real hub (single
instance); message state; node registration and listing; token issuing that the hub
then accepts."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import pytest
from openred.protocol.identity import Identity
from websockets.exceptions import ConnectionClosed

from tests.admin.conftest import ADMIN_CONFIG, Api, assert_problem
from tests.hub.nodes import RawNode

NODE_KEYS = {"id", "key", "online", "instance", "meta", "banned", "first_seen", "last_seen"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def refused(hub: Any, identity: Identity) -> tuple[int | None, list[dict[str, Any]]]:
    node = await RawNode.open(hub, identity)
    await node.send({"t": "hello", "v": 1, "key": identity.public_key,
                     "sig": identity.sign_auth(node.challenge["hub"], node.challenge["nonce"])})
    return await node.closed()


async def eventually(predicate: Any, wait: float = 5.0) -> None:
    deadline = time.monotonic() + wait
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_ban_closes_live_session_4003_and_refuses_until_unban(api: Api) -> None:
    hub = api.hub
    ident = Identity.generate()
    node = await RawNode.connect(hub, ident)
    r = await api.get(f"/v1/nodes/{node.node_id}")
    view = r.json()
    assert set(view) == NODE_KEYS
    assert view["online"] is True and view["instance"] == hub.cfg.server.instance_id
    assert view["key"] == ident.public_key.hex()

    r = await api.post(f"/v1/nodes/{node.node_id}/ban")
    assert r.status == 200, r
    assert r.json()["banned"] is True and r.json()["online"] is False
    code, frames = await node.closed()
    assert code == 4003
    assert {"t": "bye", "reason": "banned"} in [
        {k: f[k] for k in ("t", "reason") if k in f} for f in frames]

    code, frames = await refused(hub, ident)
    assert code == 4003
    assert frames and frames[-1]["t"] == "error" and frames[-1]["code"] == "forbidden"

    r = await api.delete(f"/v1/nodes/{node.node_id}/ban")
    assert r.status == 200 and r.json()["banned"] is False
    again = await RawNode.connect(hub, ident)
    assert again.node_id == node.node_id
    await again.close()

    async def audited() -> bool:
        items = (await api.get(f"/v1/audit?node={node.node_id}")).json()["items"]
        kinds = [e["kind"] for e in items]
        return {"ban", "unban", "auth_ok", "auth_refused", "admin_call"} <= set(kinds)

    await eventually(audited)


async def test_ban_of_a_node_never_seen(api: Api) -> None:
    ident = Identity.generate()
    r = await api.post(f"/v1/nodes/{ident.node_id}/ban")
    assert r.status == 200 and r.json()["banned"] is True and r.json()["online"] is False
    code, _ = await refused(api.hub, ident)
    assert code == 4003


async def test_kick_closes_live_session_4012_and_it_may_reconnect(api: Api) -> None:
    hub = api.hub
    ident = Identity.generate()
    node = await RawNode.connect(hub, ident)
    r = await api.post(f"/v1/nodes/{node.node_id}/kick")
    assert r.status == 200, r
    assert r.json()["online"] is False and r.json()["banned"] is False
    code, frames = await node.closed()
    assert code == 4012
    assert any(f.get("t") == "bye" and f.get("reason") == "kicked" for f in frames)
    with pytest.raises(ConnectionClosed):
        await node.ws.send(b"x")

    # Offline but known: 200 with the node, nothing to close.
    async def gone() -> bool:
        return (await api.get(f"/v1/nodes/{node.node_id}")).json()["online"] is False

    await eventually(gone)
    r = await api.post(f"/v1/nodes/{node.node_id}/kick")
    assert r.status == 200 and r.json()["id"] == node.node_id
    again = await RawNode.connect(hub, ident)
    await again.close()
    items = (await api.get(f"/v1/audit?node={node.node_id}&kind=kick")).json()["items"]
    assert len(items) == 2 and items[0]["detail"]["token"]


async def test_server_send_qos0_to_live_node_from_admin(api: Api) -> None:
    node = await RawNode.connect(api.hub)
    r = await api.post("/v1/messages", json={"to": node.node_id, "body_b64": b64(b"\x00hi")})
    assert r.status == 202, r
    accepted = r.json()
    assert accepted["status"] == "sent" and len(accepted["mid"]) == 26
    msg = await node.recv_type("msg")
    assert (msg["from"], msg["body"], msg["qos"], msg["mid"]) == ("$admin", b"\x00hi", 0,
                                                                   accepted["mid"])
    # QoS 0 is not kept: no state to report.
    assert_problem(await api.get(f"/v1/messages/{accepted['mid']}"), 404)
    await node.close()


async def test_server_send_qos0_to_offline_node_is_no_route(api: Api) -> None:
    r = await api.post("/v1/messages", json={"to": "nobody-here", "body_b64": ""})
    assert r.status == 202 and r.json()["status"] == "no_route"


async def test_server_send_qos1_state_through_ack(api: Api) -> None:
    ident = Identity.generate()
    r = await api.post("/v1/messages", json={"to": ident.node_id, "body_b64": b64(b"q1"),
                                             "qos": 1, "ttl": 60})
    assert r.status == 202 and r.json()["status"] == "stored", r
    mid = r.json()["mid"]
    st = (await api.get(f"/v1/messages/{mid}")).json()
    assert st["mid"] == mid and st["from"] == "$admin" and st["to"] == ident.node_id
    assert st["qos"] == 1 and st["state"] == "stored" and st["delivered"] is None
    assert st["created"] > 0 and st["acked"] is None

    node = await RawNode.connect(api.hub, ident)
    msg = await node.recv_type("msg")
    assert (msg["mid"], msg["from"], msg["body"], msg["qos"]) == (mid, "$admin", b"q1", 1)

    async def state_is(s: str) -> Any:
        async def check() -> bool:
            return bool((await api.get(f"/v1/messages/{mid}")).json()["state"] == s)
        return check

    await eventually(await state_is("delivered"))
    await node.send({"t": "ack", "mid": mid})
    await eventually(await state_is("acked"))
    st = (await api.get(f"/v1/messages/{mid}")).json()
    assert st["delivered"] and st["acked"]
    await node.close()


async def test_server_send_qos1_queue_full_409(make_hub: Any, http: Any) -> None:
    api = Api(http, await make_hub(**ADMIN_CONFIG, **{"limits.max_pending_per_node": 2}))
    for _ in range(2):
        r = await api.post("/v1/messages", json={"to": "n1", "body_b64": "", "qos": 1})
        assert r.status == 202, r
    r = await api.post("/v1/messages", json={"to": "n1", "body_b64": "", "qos": 1})
    assert_problem(r, 409, "to")


async def test_server_publish_reaches_subscribers(api: Api) -> None:
    a = await RawNode.connect(api.hub)
    b = await RawNode.connect(api.hub)
    c = await RawNode.connect(api.hub)
    for n in (a, b):
        assert (await n.request({"t": "sub", "id": 1, "topic": "ops/news"}))["t"] == "ok"
    r = await api.post("/v1/messages", json={"topic": "ops/news", "body_b64": b64(b"hey")})
    assert r.status == 202, r
    assert r.json()["status"] == "sent" and r.json()["seq"] == 1
    for n in (a, b):
        msg = await n.recv_type("msg")
        assert (msg["from"], msg["topic"], msg["seq"], msg["body"]) == ("$admin", "ops/news",
                                                                         1, b"hey")
    with pytest.raises(TimeoutError):
        await c.recv(0.3)
    for n in (a, b, c):
        await n.close()


async def test_allowlist_registration_and_qos1_to_unregistered(make_hub: Any,
                                                               http: Any) -> None:
    h = await make_hub(**ADMIN_CONFIG, **{"auth.mode": "allowlist"})
    api = Api(http, h)
    ident = Identity.generate()
    code, _ = await refused(h, ident)
    assert code == 4003
    r = await api.post("/v1/messages", json={"to": ident.node_id, "body_b64": "", "qos": 1})
    assert_problem(r, 404, "to")
    r = await api.put(f"/v1/nodes/{ident.node_id}",
                      json={"meta": {"site": "lab"}, "key": ident.public_key.hex().upper()})
    assert r.status == 201, r
    assert r.headers["Location"] == f"/v1/nodes/{ident.node_id}"
    assert r.json()["key"] == ident.public_key.hex() and r.json()["meta"] == {"site": "lab"}
    r = await api.put(f"/v1/nodes/{ident.node_id}", json={"meta": {"site": "lab2"}})
    assert r.status == 200 and r.json()["meta"] == {"site": "lab2"}
    assert r.json()["key"] == ident.public_key.hex()  # omitted key: kept
    node = await RawNode.connect(h, ident)
    assert node.node_id == ident.node_id
    r = await api.post("/v1/messages", json={"to": ident.node_id, "body_b64": "", "qos": 1})
    assert r.status == 202, r
    await node.close()


async def test_list_nodes_pages_and_online_filter(api: Api) -> None:
    hub = api.hub
    for i in range(7):
        assert (await api.put(f"/v1/nodes/n{i}", json={"meta": {"i": i}})).status == 201
    live = [await RawNode.connect(hub) for _ in range(3)]
    live_ids = {n.node_id for n in live}

    async def collect(query: str, limit: int) -> tuple[list[str], int]:
        out: list[str] = []
        pages = 0
        cursor = None
        while True:
            q = f"/v1/nodes?limit={limit}" + (f"&{query}" if query else "")
            if cursor:
                q += f"&cursor={cursor}"
            r = await api.get(q)
            assert r.status == 200, r
            page = r.json()
            assert len(page["items"]) <= limit
            assert all(set(it) == NODE_KEYS for it in page["items"])
            out.extend(it["id"] for it in page["items"])
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                return out, pages

    everyone, pages = await collect("", 3)
    assert everyone == sorted(everyone) and len(everyone) == 10 and pages == 4
    every_single, _ = await collect("", 1000)
    assert every_single == everyone
    online, _ = await collect("online=true", 2)
    assert set(online) == live_ids
    offline, _ = await collect("online=false", 4)
    assert offline == [f"n{i}" for i in range(7)]
    _, pages = await collect("", 10)
    assert pages == 1  # a full last page says there is no more
    for n in live:
        await n.close()


async def test_issued_token_is_accepted_by_the_hub(api: Api) -> None:
    r = await api.post("/v1/tokens", json={"sub": "sensor-7", "ttl_s": 120,
                                           "topics": ["plant/*"]})
    assert r.status == 201, r
    body = r.json()
    now_ms = time.time() * 1000
    assert now_ms + 100_000 < body["expires"] <= now_ms + 121_000
    node = await RawNode.connect(api.hub, token=body["token"])
    assert node.node_id == "sensor-7"
    ok = await node.request({"t": "sub", "id": 1, "topic": "plant/a"})
    assert ok["t"] == "ok"
    no = await node.request({"t": "sub", "id": 2, "topic": "other"})
    assert (no["t"], no["code"]) == ("error", "forbidden")
    await node.close()
    items = (await api.get("/v1/audit?kind=token_issued")).json()["items"]
    assert items and items[0]["node"] == "sensor-7" and "eyJ" not in str(items)


async def test_token_without_signing_key_409(make_hub: Any, http: Any) -> None:
    api = Api(http, await make_hub(**{"admin.tokens": ("tok-1",)}))
    p = assert_problem(await api.post("/v1/tokens", json={"sub": "a"}), 409)
    assert "auth.jwt_secret" in p["detail"]


async def test_stats(api: Api) -> None:
    node = await RawNode.connect(api.hub)
    r = await api.get("/v1/stats")
    inst = r.json()["instances"]
    assert len(inst) == 1 and inst[0]["instance"] == api.hub.cfg.server.instance_id
    assert inst[0]["connections"] == 1 and inst[0]["handshakes"]["ok"] >= 1
    await node.close()


async def test_audit_filters_and_pages(api: Api) -> None:
    for i in range(5):
        await api.post(f"/v1/nodes/a{i}/ban")
    await asyncio.sleep(0.01)
    t_mid = time.time_ns() // 1_000_000
    for i in range(3):
        await api.delete(f"/v1/nodes/a{i}/ban")

    async def all_written() -> bool:
        return len((await api.get("/v1/audit?kind=unban")).json()["items"]) == 3

    await eventually(all_written)
    seen: list[int] = []
    cursor = None
    while True:
        r = await api.get("/v1/audit?kind=ban&limit=2" + (f"&cursor={cursor}" if cursor else ""))
        page = r.json()
        seen.extend(e["id"] for e in page["items"])
        assert all(e["kind"] == "ban" for e in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 5 and seen == sorted(seen, reverse=True)
    since = (await api.get(f"/v1/audit?since={t_mid}&kind=ban")).json()["items"]
    assert since == []
    a0 = (await api.get("/v1/audit?node=a0")).json()["items"]
    assert {e["kind"] for e in a0} >= {"ban", "unban", "admin_call"}
    assert all(e["node"] == "a0" for e in a0)
