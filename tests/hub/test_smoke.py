"""End-to-end smoke test: two raw nodes through a real hub."""

from __future__ import annotations

from tests.hub.nodes import RawNode


async def test_two_nodes_direct_topic_presence(hub):
    a = await RawNode.connect(hub)
    b = await RawNode.connect(hub)
    assert (await b.request({"t": "sub", "id": 1, "topic": "demo/x"}))["t"] == "ok"
    ok = await a.request({"t": "send", "id": 1, "to": b.node_id, "body": b"hi"})
    assert ok["status"] == "sent"
    msg = await b.recv()
    assert (msg["t"], msg["from"], msg["body"], msg["qos"]) == ("msg", a.node_id, b"hi", 0)
    ok = await a.request({"t": "pub", "id": 2, "topic": "demo/x", "body": b"t"})
    assert ok["seq"] == 1
    msg = await b.recv()
    assert (msg["topic"], msg["seq"], msg["body"]) == ("demo/x", 1, b"t")
    ok = await a.request({"t": "presence", "id": 3, "nodes": [b.node_id, "nobody"]})
    assert ok["online"] == {b.node_id: True, "nobody": False}
    await a.close()
    await b.close()
