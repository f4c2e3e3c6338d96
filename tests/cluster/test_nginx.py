"""A real nginx (Debian package) with the config shipped in deploy/nginx/nginx.conf,
load-balancing WebSocket upgrades over two real hub processes (README "Many instances").
Without nginx these tests skip, and fail under CI=true (tests/cluster/conftest.py)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import pytest
from openred.client import Client, Disconnected, StateEvent
from openred.protocol.identity import Identity
from websockets.exceptions import InvalidStatus

from tests.cluster.conftest import (
    ADMIN_TOKEN,
    NGINX_CONF,
    ClusterFactory,
    HubProcess,
    Nginx,
    eventually,
    render_nginx,
)
from tests.cluster.test_cluster import presence, until_online
from tests.hub.nodes import RawNode

pytestmark = pytest.mark.slow


async def connections(hub: HubProcess) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"{hub.admin}/metrics") as r:
        text = await r.text()
    m = re.search(r"^openred_hub_connections ([0-9.e+]+)$", text, re.M)
    assert m is not None, "openred_hub_connections missing from /metrics"
    return int(float(m.group(1)))


def test_shipped_config_proxies_websockets_as_documented(tmp_path: Any) -> None:
    """What the deploy file must keep: HTTP/1.1 upgrades with the Upgrade/Connection
    headers, X-Forwarded-For, a read timeout beyond 3 x hb (default hb 20 s), both
    instances in the upstream, and only the WebSocket path in public."""
    text = NGINX_CONF.read_text()
    ws = text[text.index("location = /v1/ws"):]
    ws = ws[:ws.index("}")]
    assert "proxy_http_version 1.1;" in ws
    assert "proxy_set_header Upgrade $http_upgrade;" in ws
    assert "proxy_set_header Connection $connection_upgrade;" in ws
    assert "X-Forwarded-For $proxy_add_x_forwarded_for;" in ws
    read = re.search(r"proxy_read_timeout (\d+)s;", ws)
    assert read is not None and int(read.group(1)) > 3 * 20
    upstream = re.search(r"upstream openred_hub_ws \{([^}]*)\}", text)
    assert upstream is not None and len(re.findall(r"^\s*server ", upstream.group(1),
                                                   re.M)) == 2
    rendered = render_nginx(text, listen=1, admin_listen=2, ws_ports=[3, 4],
                            admin_ports=[5, 6], prefix=tmp_path)
    assert "server 127.0.0.1:3 " in rendered and "server 127.0.0.1:4 " in rendered
    assert "listen 127.0.0.1:1;" in rendered and "daemon off;" in rendered


async def test_nginx_balances_nodes_over_two_instances(make_cluster: ClusterFactory,
                                                       make_nginx: Any) -> None:
    """Two nodes connected through nginx land on different instances (least_conn),
    and direct messages, QoS 0 and 1, and presence work through it; the admin surface
    answers through its own listener; other paths are 404."""
    c = await make_cluster(2)
    nginx: Nginx = await make_nginx([h.ws_port for h in c.hubs], [h.admin_port for h in c.hubs])
    a = await RawNode.connect(nginx)
    b = await RawNode.connect(nginx)
    assert [await connections(h) for h in c.hubs] == [1, 1]
    await until_online(a, b.node_id)
    r = await a.request({"t": "send", "id": 1, "to": b.node_id, "body": b"via nginx"})
    assert r["t"] == "ok" and r["status"] == "sent", r
    assert (await b.recv_type("msg"))["body"] == b"via nginx"
    r = await b.request({"t": "send", "id": 2, "to": a.node_id, "body": b"q1", "qos": 1})
    assert r["t"] == "ok" and r["status"] == "stored", r
    m = await a.recv_type("msg")
    assert (m["body"], m["qos"], m["from"]) == (b"q1", 1, b.node_id)
    await a.send({"t": "ack", "mid": m["mid"]})
    assert await presence(b, [a.node_id]) == {a.node_id: True}

    base = f"http://127.0.0.1:{nginx.admin_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/readyz") as resp:
            assert resp.status == 200
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        for _ in range(2):  # whichever instance answers, it sees the whole cluster
            async with http.get(f"{base}/v1/nodes/{a.node_id}", headers=auth) as resp:
                assert resp.status == 200 and (await resp.json())["online"] is True
        async with http.get(f"http://127.0.0.1:{nginx.port}/other") as resp:
            assert resp.status == 404


async def test_sdk_through_nginx_survives_sigkill_of_its_instance(
        make_cluster: ClusterFactory, make_nginx: Any) -> None:
    """A node on the SDK connects through nginx; its instance is SIGKILLed while QoS 1
    messages flow to it. The SDK reconnects with its backoff, nginx sends it to the
    surviving instance, and it gets every message that was `ok stored`: zero loss."""
    c = await make_cluster(2)
    nginx: Nginx = await make_nginx([h.ws_port for h in c.hubs], [h.admin_port for h in c.hubs])
    ident = Identity.generate()
    states: list[StateEvent] = []
    client = Client(nginx.url, identity=ident, backoff_min_s=0.05, backoff_max_s=0.5,
                    on_state=states.append)
    await client.connect()
    counts = [await connections(h) for h in c.hubs]
    assert sorted(counts) == [0, 1]
    holder = counts.index(1)
    dead, survivor = c[holder], c[1 - holder]
    sender = await RawNode.connect(survivor)
    await until_online(sender, ident.node_id)

    stored: list[str] = []
    got: list[str] = []
    stop = asyncio.Event()

    async def send() -> None:
        k = 0
        while not stop.is_set():
            r = await sender.request({"t": "send", "id": k, "to": ident.node_id,
                                      "body": k.to_bytes(4, "big"), "qos": 1})
            assert r["t"] == "ok" and r["status"] == "stored", r
            stored.append(r["mid"])
            k += 1
            await asyncio.sleep(0.002)

    async def receive() -> None:
        async for msg in client:
            got.append(msg.mid)

    sending = asyncio.create_task(send())
    receiving = asyncio.create_task(receive())
    await eventually(lambda: _true(len(got) > 20), 5.0, what="traffic before the kill")
    dead.kill()
    before = len(stored)
    await eventually(lambda: _true(client.connected and len(stored) > before + 50), 10.0,
                     what="the SDK back through nginx, with traffic")
    stop.set()
    await sending
    assert [await connections(survivor)] == [2]  # the sender and the node

    await eventually(lambda: _true(set(stored) <= set(got)), 10.0,
                     what="every stored message delivered")
    assert any(isinstance(s, Disconnected) and s.will_retry for s in states)
    firsts = list(dict.fromkeys(got))
    assert firsts == stored, "a message lost, repeated out of order or out of order"
    await client.close()
    receiving.cancel()
    try:
        await receiving
    except asyncio.CancelledError:
        pass


async def test_hubs_behind_nginx_limit_and_audit_each_client(make_cluster: ClusterFactory,
                                                             make_nginx: Any) -> None:
    """docs/protocol.md §8 per-IP handshake limit (rate and burst both handshakes_per_s)
    behind the shipped nginx config, with nginx's address in `server.trusted_proxies`:
    the X-Forwarded-For nginx sets reaches the hub, which limits and audits each client,
    not nginx. Every test client connects from
    127.0.0.1, as nginx does, so each names an address of its own in an X-Forwarded-For
    of its own: nginx appends 127.0.0.1, which the hub skips as trusted (a client on a
    trusted address can do that; one on any other address cannot)."""
    c = await make_cluster(1, server_trusted_proxies="127.0.0.1",
                           limits_handshakes_per_s="2")
    nginx: Nginx = await make_nginx([c[0].ws_port], [c[0].admin_port])

    async def status(client: str) -> int:
        try:
            node = await RawNode.open(nginx, additional_headers={"X-Forwarded-For": client})
        except InvalidStatus as exc:
            return exc.response.status_code
        await node.close()
        return 101

    assert [await status("203.0.113.1") for _ in range(3)] == [101, 101, 429]
    assert await status("203.0.113.2") == 101  # another client: its own bucket

    ident = Identity.generate()
    node = await RawNode.open(nginx, ident, additional_headers={"X-Forwarded-For":
                                                                  "203.0.113.3"})
    await node.send({"t": "hello", "key": ident.public_key,
                     "sig": ident.sign_auth(node.challenge["hub"], node.challenge["nonce"])})
    assert (await node.recv())["t"] == "welcome"
    async with aiohttp.ClientSession() as http, http.get(
            f"{c[0].admin}/v1/audit", params={"node": ident.node_id, "kind": "auth_ok"},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
        assert resp.status == 200
        assert [e["ip"] for e in (await resp.json())["items"]] == ["203.0.113.3"]
    await node.close()


async def _true(value: bool) -> bool:
    return value
