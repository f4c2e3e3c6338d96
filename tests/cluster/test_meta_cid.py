"""Message meta and client message ids across instances (docs/protocol.md §4.1, §4.2,
§5.1, §5.2): two hub processes on one Redis and one PostgreSQL. Meta (and a
publication's sig) crosses the broker with the message, direct and topic, and a `cid`
repeated through the other instance is answered `dup` with the first mid and not
delivered again."""

from __future__ import annotations

import pytest
from openred.protocol.identity import Identity

from tests.cluster.conftest import ClusterFactory
from tests.cluster.test_cluster import no_msg, recv_topic, until_online
from tests.hub.nodes import RawNode

pytestmark = pytest.mark.slow

META = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "app": "x"}


async def test_meta_crosses_instances_and_a_cid_repeat_via_the_other_is_dup(
        make_cluster: ClusterFactory) -> None:
    c = await make_cluster(2)
    aid = Identity.generate()
    a = await RawNode.connect(c[0], aid)
    b = await RawNode.connect(c[1])
    await until_online(a, b.node_id)
    await until_online(b, a.node_id)

    r = await a.request({"t": "send", "id": 1, "to": b.node_id, "body": b"zero",
                         "meta": META})
    assert (r["t"], r["status"]) == ("ok", "sent"), r
    m = await b.recv_type("msg")
    assert (m["mid"], m["qos"], m["meta"]) == (r["mid"], 0, META)

    q1 = {"t": "send", "to": b.node_id, "body": b"one", "qos": 1, "cid": "outbox-1",
          "meta": {"k": "v"}}
    first = await a.request({**q1, "id": 2})
    assert (first["t"], first["status"]) == ("ok", "stored") and "dup" not in first, first
    m = await b.recv_type("msg")
    assert (m["mid"], m["qos"], m["meta"]) == (first["mid"], 1, {"k": "v"})

    await b.request({"t": "sub", "id": 3, "topic": "x/meta"})
    pub = await a.request({"t": "pub", "id": 4, "topic": "x/meta", "body": b"p",
                           "meta": META, "sig": b"s" * 64})
    assert pub["t"] == "ok", pub
    tm = await recv_topic(b, "x/meta")
    assert (tm["seq"], tm["meta"], tm["sig"]) == (pub["seq"], META, b"s" * 64)

    # The sender's connection drops before it saw its ok; it comes back through the
    # other instance and sends its outbox again, with the same cid.
    await a.close()
    a = await RawNode.connect(c[1], aid)
    again = await a.request({**q1, "id": 2})
    assert again == {"t": "ok", "id": 2, "mid": first["mid"], "status": "stored",
                     "dup": True}, again
    await no_msg(b, 0.5)
    assert (await b.request({"t": "ack", "id": 5, "mid": first["mid"]}))["t"] == "ok"
    # Acked, and still remembered on the first instance too.
    await a.close()
    a = await RawNode.connect(c[0], aid)
    third = await a.request({**q1, "id": 6})
    assert (third["mid"], third.get("dup")) == (first["mid"], True), third
    await no_msg(b, 0.3)

    # History read through either instance has the publication's meta and sig.
    for hub in (c[0], c[1]):
        reader = await RawNode.connect(hub)
        h = await reader.request({"t": "history", "id": 7, "topic": "x/meta"})
        assert [(x["seq"], x["meta"], x["sig"]) for x in h["msgs"]] == [
            (pub["seq"], META, b"s" * 64)]
        await reader.close()
