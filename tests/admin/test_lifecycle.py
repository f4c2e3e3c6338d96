"""Credential lifecycle on one instance: DELETE /v1/nodes/{id} (registration, meta and
key forgotten, the node kicked, its queued QoS 1 expired, a ban kept), token
revocation by jti or by node (checked at every JWT handshake, durable across a restart),
and key rotation by PUT. Two instances: tests/cluster/test_admin_abuse.py."""

from __future__ import annotations

import time
from typing import Any

import jwt
from openred.hub.app import RunningHub
from openred.protocol.identity import Identity

from tests.admin.conftest import ADMIN_CONFIG, Api, assert_problem
from tests.hub.conftest import hub_config
from tests.hub.nodes import RawNode


async def token_hello(hub: Any, token: str) -> tuple[int | None, list[dict[str, Any]]]:
    """A token hello that is refused: the close code and the frames before it."""
    node = await RawNode.open(hub)
    await node.send({"t": "hello", "v": 1, "token": token})
    return await node.closed()


async def issue(api: Api, sub: str) -> str:
    r = await api.post("/v1/tokens", json={"sub": sub, "ttl_s": 600})
    assert r.status == 201, r
    return str(r.json()["token"])


async def test_delete_node_forgets_kicks_and_expires_its_queue(make_hub: Any,
                                                               http: Any) -> None:
    h = await make_hub(**ADMIN_CONFIG, **{"auth.mode": "allowlist"})
    api = Api(http, h)
    ident = Identity.generate()
    nid = ident.node_id
    assert (await api.put(f"/v1/nodes/{nid}", json={"meta": {"a": 1}})).status == 201
    node = await RawNode.connect(h, ident)
    sent = await api.post("/v1/messages", json={"to": nid, "body_b64": "aGk=", "qos": 1})
    mid = sent.json()["mid"]
    assert (await node.recv_type("msg"))["mid"] == mid  # delivered, never acked

    r = await api.delete(f"/v1/nodes/{nid}")
    assert r.status == 204 and r.body == b""
    code, frames = await node.closed()
    assert code == 4012 and {"t": "bye", "reason": "kicked"} in frames
    assert_problem(await api.get(f"/v1/nodes/{nid}"), 404, "id")
    assert (await api.get(f"/v1/messages/{mid}")).json()["state"] == "expired"
    # Unregistered now: allowlist mode refuses it, and nothing is pending for it.
    again = await RawNode.open(h, ident)
    await again.send({"t": "hello", "v": 1, "key": ident.public_key,
                      "sig": ident.sign_auth(again.challenge["hub"], again.challenge["nonce"])})
    assert (await again.closed())[0] == 4003
    assert_problem(await api.delete(f"/v1/nodes/{nid}"), 404, "id")
    kinds = [e["kind"] for e in (await api.get(f"/v1/audit?node={nid}")).json()["items"]]
    assert "node_deleted" in kinds


async def test_delete_keeps_a_ban(make_hub: Any, http: Any) -> None:
    api = Api(http, await make_hub(**ADMIN_CONFIG))
    await api.put("/v1/nodes/n-b", json={"meta": {"x": 1}, "key": "ab" * 32})
    await api.post("/v1/nodes/n-b/ban")
    assert (await api.delete("/v1/nodes/n-b")).status == 204
    view = (await api.get("/v1/nodes/n-b")).json()
    assert (view["banned"], view["meta"], view["key"]) == (True, {}, None)


async def test_revoke_by_jti(make_hub: Any, http: Any) -> None:
    h = await make_hub(**ADMIN_CONFIG)
    api = Api(http, h)
    token = await issue(api, "sensor-1")
    other = await issue(api, "sensor-1")
    live = await RawNode.connect(h, token=token)
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]

    r = await api.post("/v1/tokens/revoke", json={"jti": jti})
    assert r.status == 200, r
    body = r.json()
    assert (body["kind"], body["subject"], body["issued_before"]) == ("jti", jti, None)
    assert body["expires"] > time.time() * 1000 + 300 * 86400 * 1000
    code, frames = await token_hello(h, token)
    assert code == 4001
    assert frames == [{"t": "error", "id": None, "code": "auth_failed",
                       "msg": "authentication failed"}]
    # The open session was not touched; another token of the same node still works.
    assert (await live.request({"t": "sub", "id": 1, "topic": "a"}))["t"] == "ok"
    await live.close()
    await (await RawNode.connect(h, token=other)).close()
    stats = (await api.get("/v1/stats")).json()["instances"][0]
    assert stats["auth_failures"].get("revoked") == 1


async def test_revoke_by_node_and_restart(make_hub: Any, http: Any, tmp_path: Any) -> None:
    h = await make_hub(**ADMIN_CONFIG)
    api = Api(http, h)
    old = await issue(api, "sensor-2")
    live = await RawNode.connect(h, token=old)
    r = await api.post("/v1/tokens/revoke", json={"node": "sensor-2", "kick": True})
    assert r.status == 200, r
    assert r.json()["kind"] == "node" and r.json()["issued_before"] <= time.time() * 1000
    assert (await live.closed())[0] == 4012
    assert (await token_hello(h, old))[0] == 4001
    new = await issue(api, "sensor-2")  # issued after: accepted, even within the same second
    fresh = await RawNode.connect(h, token=new)
    await fresh.close()
    kinds = [e["kind"] for e in (await api.get("/v1/audit?node=sensor-2")).json()["items"]]
    assert "token_revoked" in kinds

    # Durable: a restarted hub on the same store refuses it too.
    await h.stop()
    h2 = RunningHub(hub_config(tmp_path, **ADMIN_CONFIG))
    await h2.start()
    try:
        assert (await token_hello(h2, old))[0] == 4001
        await (await RawNode.connect(h2, token=new)).close()
    finally:
        await h2.stop()


async def test_revoke_bodies(make_hub: Any, http: Any) -> None:
    api = Api(http, await make_hub(**ADMIN_CONFIG))
    assert_problem(await api.post("/v1/tokens/revoke", json={"jti": "a", "node": "b"}), 422)
    assert_problem(await api.post("/v1/tokens/revoke", json={}), 422)
    assert_problem(await api.post("/v1/tokens/revoke", json={"node": "b", "x": 1}), 422, "x")
    future = int(time.time() * 1000) + 60_000
    assert_problem(await api.post("/v1/tokens/revoke", json={"node": "b", "before": future}),
                   422, "before")
    assert_problem(await api.post("/v1/tokens/revoke", json={"jti": ""}), 422, "jti")


async def test_key_rotation_is_an_operator_put(make_hub: Any, http: Any) -> None:
    api = Api(http, await make_hub(**ADMIN_CONFIG))
    r = await api.put("/v1/nodes/tok-node", json={"meta": {}, "key": "11" * 32})
    assert r.json()["key"] == "11" * 32
    r = await api.put("/v1/nodes/tok-node", json={"meta": {}, "key": "22" * 32})
    assert r.status == 200 and r.json()["key"] == "22" * 32
