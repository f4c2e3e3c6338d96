"""Many instances are one hub (README "Many instances"): 2 or 3 real hub processes on one
Redis and one PostgreSQL, checked through raw protocol frames (docs/protocol.md section in
each test's docstring). Faults are real: a Redis process killed and restarted, a hub
process killed with SIGKILL."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from typing import Any

import aiohttp
import pytest
from openred.protocol.identity import Identity
from websockets.exceptions import ConnectionClosed

from tests.broker.conftest import LocalCluster, need_cluster
from tests.cluster.conftest import (
    ADMIN_TOKEN,
    ClusterFactory,
    HubProcess,
    RedisServer,
    eventually,
)
from tests.conftest import timeout
from tests.hub.nodes import RawNode, recv_msgs
from tests.persistence.test_postgres import Proxy  # a TCP link that can be cut

pytestmark = pytest.mark.slow

_ids = itertools.count(1)


def rid() -> str:
    return f"r{next(_ids)}"


async def presence(node: RawNode, ids: list[str]) -> dict[str, bool]:
    r = await node.request({"t": "presence", "id": rid(), "nodes": ids})
    assert r["t"] == "ok", r
    return dict(r["online"])


async def until_online(node: RawNode, *ids: str, online: bool = True,
                       wait: float = 5.0) -> None:
    """§6 through `node`'s instance: wait until every one of `ids` is (or is not) seen."""

    async def check() -> bool:
        seen = await presence(node, list(ids))
        return all(seen[i] is online for i in ids)

    await eventually(check, wait, what=f"presence {online} of {ids}")


async def recv_topic(node: RawNode, topic: str, wait: float = 10.0) -> dict[str, Any]:
    """The next message of `topic` (direct messages received meanwhile are skipped)."""
    while True:
        f = await node.recv(wait)
        if f["t"] == "msg" and f.get("topic") == topic:
            return f


async def no_msg(node: RawNode, wait: float = 0.3) -> None:
    try:
        while True:
            f = await node.recv(wait)
            assert f["t"] != "msg", f"unexpected {f}"
    except TimeoutError:
        pass


def num(body: bytes) -> int:
    return int.from_bytes(body, "big")


# -- direct messages (§4) --------------------------------------------------------------


async def test_direct_qos0_and_qos1_across_instances(make_cluster: ClusterFactory) -> None:
    """§4: QoS 0 `ok sent` and delivery to a node on another instance, `no_route` for a
    node online nowhere; QoS 1 `ok stored`, delivered at once across instances, and to a
    node offline everywhere on its next session, wherever it connects."""
    c = await make_cluster(2)
    a = await RawNode.connect(c[0])
    b = await RawNode.connect(c[1])
    await until_online(a, b.node_id)
    await until_online(b, a.node_id)

    r = await a.request({"t": "send", "id": 1, "to": b.node_id, "body": b"zero"})
    assert r["t"] == "ok" and r["status"] == "sent", r
    m = await b.recv_type("msg")
    assert (m["from"], m["body"], m["qos"], m["mid"]) == (a.node_id, b"zero", 0, r["mid"])

    r = await b.request({"t": "send", "id": 2, "to": a.node_id, "body": b"back"})
    assert r["t"] == "ok" and r["status"] == "sent", r
    m = await a.recv_type("msg")
    assert (m["from"], m["body"]) == (b.node_id, b"back")

    r = await a.request({"t": "send", "id": 3, "to": b.node_id, "body": b"one", "qos": 1})
    assert r["t"] == "ok" and r["status"] == "stored", r
    m = await b.recv_type("msg")
    assert (m["mid"], m["from"], m["body"], m["qos"]) == (r["mid"], a.node_id, b"one", 1)
    assert (await b.request({"t": "ack", "id": 4, "mid": m["mid"]}))["t"] == "ok"

    nobody = Identity.generate()
    r = await a.request({"t": "send", "id": 5, "to": nobody.node_id, "body": b"x"})
    assert r["t"] == "error" and r["code"] == "no_route", r
    # QoS 0 without an id to a node online nowhere: dropped silently (§3).
    await a.send({"t": "send", "to": nobody.node_id, "body": b"x"})

    r = await a.request({"t": "send", "id": 6, "to": nobody.node_id, "body": b"later",
                         "qos": 1})
    assert r["t"] == "ok" and r["status"] == "stored", r
    late = await RawNode.connect(c[1], nobody)
    assert late.welcome["pending"] == 1
    m = await late.recv_type("msg")
    assert (m["mid"], m["body"], m["qos"]) == (r["mid"], b"later", 1)
    # Acked on instance 2: never delivered again, on either instance.
    assert (await late.request({"t": "ack", "id": 7, "mid": m["mid"]}))["t"] == "ok"
    await late.close()
    again = await RawNode.connect(c[0], nobody)
    assert again.welcome["pending"] == 0
    await no_msg(again)
    await a.send({"t": "send", "to": again.node_id, "body": b"x"})  # no id, no reply


async def test_ordering_of_1000_messages_across_instances(make_cluster: ClusterFactory) -> None:
    """§4 order: 1,000 messages of mixed QoS 0 / QoS 1 from A (instance 1) to B
    (instance 2), sent back to back, arrive in the order sent, every one of them."""
    c = await make_cluster(2)
    a = await RawNode.connect(c[0])
    b = await RawNode.connect(c[1])
    await until_online(a, b.node_id)
    rng = random.Random(4)
    n = 1000
    qos = [1 if rng.random() < 0.4 else 0 for _ in range(n)]
    for i in range(n):
        await a.send({"t": "send", "id": i, "to": b.node_id, "body": i.to_bytes(4, "big"),
                      "qos": qos[i]})
    replies: dict[int, dict[str, Any]] = {}
    got: list[dict[str, Any]] = []

    async def read_replies() -> None:
        while len(replies) < n:
            f = await a.recv(15)
            if f["t"] in ("ok", "error"):
                replies[f["id"]] = f

    async def read_msgs() -> None:
        while len(got) < n:
            f = await b.recv(15)
            if f["t"] == "msg":
                got.append(f)
                if f["qos"] == 1:
                    await b.send({"t": "ack", "mid": f["mid"]})

    await asyncio.gather(read_replies(), read_msgs())
    bad = [r for r in replies.values() if r["t"] != "ok"]
    assert not bad, bad[:5]
    assert [r["status"] for _, r in sorted(replies.items())] == [
        "stored" if q else "sent" for q in qos]
    assert [num(m["body"]) for m in got] == list(range(n))
    assert [m["qos"] for m in got] == qos
    assert [m["mid"] for m in got] == [replies[i]["mid"] for i in range(n)]


# -- topics (§5) -----------------------------------------------------------------------


async def test_topic_fanout_one_sequence_and_since_recovery(
        make_cluster: ClusterFactory) -> None:
    """§5 across three instances: publishers on two instances, subscribers on all three;
    one `seq` sequence cluster wide (unique, gap-free, increasing per publisher and, for
    publications one after the other, for every subscriber); `since` recovers on another
    instance what a subscriber missed, then goes live with no gap and no duplicate."""
    c = await make_cluster(3)
    topic = "room/cluster"
    subs = [await RawNode.connect(c[i]) for i in range(3)]
    for s in subs:
        r = await s.request({"t": "sub", "id": rid(), "topic": topic})
        assert r["t"] == "ok" and r["seq"] == 0, r
    pubs = [await RawNode.connect(c[0]), await RawNode.connect(c[1])]
    await asyncio.sleep(0.2)  # interest travels to Redis with the sub (not awaited)

    # Concurrent publishers on two instances.
    per = 40
    for k in range(per):
        for j, p in enumerate(pubs):
            await p.send({"t": "pub", "id": f"{j}-{k}", "topic": topic,
                          "body": bytes([j]) + k.to_bytes(4, "big")})
    oks: dict[str, int] = {}
    for p in pubs:
        while sum(1 for i in oks if i[0] == str(pubs.index(p))) < per:
            f = await p.recv()
            if f["t"] == "ok":
                oks[f["id"]] = f["seq"]
            else:
                assert f["t"] == "msg", f
    total = 2 * per
    assert sorted(oks.values()) == list(range(1, total + 1))
    for j in range(2):
        mine = [oks[f"{j}-{k}"] for k in range(per)]
        assert mine == sorted(mine), f"publisher {j}: seqs not in publication order"
    for s in subs:
        got = await recv_msgs(s, total)
        seqs = [m["seq"] for m in got]
        assert sorted(seqs) == list(range(1, total + 1)), "a seq missing or repeated"
        for j in range(2):
            from_j = [m for m in got if m["body"][0] == j]
            assert [num(m["body"][1:]) for m in from_j] == list(range(per))
            assert [m["seq"] for m in from_j] == [oks[f"{j}-{k}"] for k in range(per)]
        assert all(m["topic"] == topic and m["qos"] == 0 for m in got)

    # One after the other, alternating instances: every subscriber sees seq order.
    for k in range(10):
        p = pubs[k % 2]
        r = await p.request({"t": "pub", "id": rid(), "topic": topic, "body": b"s"})
        assert r["t"] == "ok" and r["seq"] == total + 1 + k, r
    for s in subs:
        got = await recv_msgs(s, 10)
        assert [m["seq"] for m in got] == list(range(total + 1, total + 11))
    total += 10

    # Subscriber 3 leaves; more is published; it comes back on another instance with
    # `since` = the last seq it saw.
    await subs[2].close()
    for k in range(15):
        await pubs[k % 2].request({"t": "pub", "id": rid(), "topic": topic,
                                   "body": b"m" + k.to_bytes(4, "big")})
    back = await RawNode.connect(c[1], subs[2].identity)
    r = await back.request({"t": "sub", "id": rid(), "topic": topic, "since": total})
    assert r["t"] == "ok" and r["seq"] == total + 15 and r["recovered"] is True, r
    got = await recv_msgs(back, 15)
    assert [m["seq"] for m in got] == list(range(total + 1, total + 16))
    assert [num(m["body"][1:]) for m in got] == list(range(15))
    r = await pubs[0].request({"t": "pub", "id": rid(), "topic": topic, "body": b"live"})
    assert r["seq"] == total + 16
    m = (await recv_msgs(back, 1))[0]
    assert (m["seq"], m["body"]) == (total + 16, b"live")
    await no_msg(back)

    # A fresh node on the third instance recovers from 0: all that history holds.
    fresh = await RawNode.connect(c[2])
    r = await fresh.request({"t": "sub", "id": rid(), "topic": topic, "since": 0})
    assert r["t"] == "ok" and r["seq"] == total + 16, r
    got = await recv_msgs(fresh, min(100, total + 16))
    assert [m["seq"] for m in got] == list(range(total + 17 - len(got), total + 17))


# -- sessions and presence (§2, §6) ----------------------------------------------------


async def test_replace_across_instances(make_cluster: ClusterFactory) -> None:
    """§2: one session per node in the whole cluster; the old one, on another instance,
    gets `bye replaced` and close 4010; traffic then reaches the new one only."""
    c = await make_cluster(2)
    ident = Identity.generate()
    other = await RawNode.connect(c[0])
    old = await RawNode.connect(c[0], ident)
    await until_online(other, ident.node_id)
    new = await RawNode.connect(c[1], ident)
    code, frames = await old.closed()
    assert code == 4010, (code, frames)
    assert {"t": "bye", "reason": "replaced"} in frames
    await until_online(other, ident.node_id)
    r = await other.request({"t": "send", "id": 1, "to": ident.node_id, "body": b"to-new"})
    assert r["t"] == "ok", r
    assert (await new.recv_type("msg"))["body"] == b"to-new"

    # And back: the session on instance 2 is replaced by one on instance 1.
    newer = await RawNode.connect(c[0], ident)
    code, frames = await new.closed()
    assert code == 4010 and {"t": "bye", "reason": "replaced"} in frames
    r = await other.request({"t": "send", "id": 2, "to": ident.node_id, "body": b"again"})
    assert r["t"] == "ok", r
    assert (await newer.recv_type("msg"))["body"] == b"again"
    # Instance 2 let go of the node: no copy is delivered there any more.
    await until_online(other, ident.node_id)
    third = await RawNode.connect(c[1])
    r = await third.request({"t": "send", "id": 3, "to": ident.node_id, "body": b"x"})
    assert r["t"] == "ok", r
    assert (await newer.recv_type("msg"))["body"] == b"x"


async def test_presence_across_instances(make_cluster: ClusterFactory) -> None:
    """§6: a node on another instance is online; one that closed its session is offline
    cluster wide within 1 s."""
    c = await make_cluster(2)
    a = await RawNode.connect(c[0])
    b = await RawNode.connect(c[1])
    nobody = Identity.generate().node_id
    await until_online(a, b.node_id)
    assert await presence(a, [b.node_id, nobody, a.node_id]) == {
        b.node_id: True, nobody: False, a.node_id: True}
    assert (await presence(b, [a.node_id]))[a.node_id] is True
    await b.close()
    t0 = time.monotonic()
    await until_online(a, b.node_id, online=False, wait=1.0)
    assert time.monotonic() - t0 < timeout(1.0)


# -- operator actions across instances -------------------------------------------------


async def test_kick_and_ban_across_instances(make_cluster: ClusterFactory) -> None:
    """Admin surface of instance 1 acting on a session held by instance 2: kick closes it
    with 4012, ban with 4003 and refuses it on every instance until lifted."""
    c = await make_cluster(2)
    ident = Identity.generate()
    node = await RawNode.connect(c[1], ident)
    watcher = await RawNode.connect(c[0])
    await until_online(watcher, ident.node_id)
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession(headers=auth) as http:
        async with http.post(f"{c[0].admin}/v1/nodes/{ident.node_id}/kick") as r:
            assert r.status == 200, await r.text()
        code, frames = await node.closed()
        assert code == 4012 and {"t": "bye", "reason": "kicked"} in frames, (code, frames)

        node = await RawNode.connect(c[1], ident)
        await until_online(watcher, ident.node_id)
        async with http.post(f"{c[0].admin}/v1/nodes/{ident.node_id}/ban") as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["banned"] is True
        code, _ = await node.closed()
        assert code == 4003
        for h in c.hubs:
            with pytest.raises(AssertionError):
                await RawNode.connect(h, ident)
        async with http.delete(f"{c[1].admin}/v1/nodes/{ident.node_id}/ban") as r:
            assert r.status == 200, await r.text()
    back = await RawNode.connect(c[0], ident)
    await until_online(watcher, ident.node_id)
    await back.close()


# -- faults ----------------------------------------------------------------------------


async def test_redis_restart_mid_traffic(make_cluster: ClusterFactory,
                                         redis_server: RedisServer) -> None:
    """Redis goes away: local routing keeps working on each instance, a cross-instance
    QoS 0 with an id fails fast with `unavailable`, QoS 1 is still stored (and delivered
    on the recipient's next session). Redis comes back on the same address: the brokers
    reconnect and resubscribe by themselves and cluster routing resumes within 5 s;
    topics go on during the outage (numbered by the store) and subscribers on the other
    instance catch up when Redis is back."""
    c = await make_cluster(2, broker_url=redis_server.url)
    x = await RawNode.connect(c[0])
    y = await RawNode.connect(c[0])
    z = await RawNode.connect(c[1])
    w = await RawNode.connect(c[1])
    await until_online(x, z.node_id, w.node_id)
    topic = "t/restart"
    assert (await z.request({"t": "sub", "id": rid(), "topic": topic}))["t"] == "ok"
    await asyncio.sleep(0.2)
    for i in range(3):
        r = await x.request({"t": "pub", "id": rid(), "topic": topic, "body": b"p"})
        assert r["seq"] == i + 1, r
    assert [m["seq"] for m in await recv_msgs(z, 3)] == [1, 2, 3]
    r = await x.request({"t": "send", "id": rid(), "to": z.node_id, "body": b"before"})
    assert r["t"] == "ok" and r["status"] == "sent", r
    assert (await z.recv_type("msg"))["body"] == b"before"

    redis_server.kill()

    # Cross-instance QoS 0 with an id: `error unavailable`, fast.
    t0 = time.monotonic()
    r = await x.request({"t": "send", "id": rid(), "to": z.node_id, "body": b"lost"})
    assert r["t"] == "error" and r["code"] == "unavailable", r
    r = await x.request({"t": "send", "id": rid(), "to": z.node_id, "body": b"lost"})
    assert r["t"] == "error" and r["code"] == "unavailable", r
    assert time.monotonic() - t0 < timeout(2.0), "cross-instance send did not fail fast"

    # Local routing goes on, on both instances, QoS 0 and QoS 1.
    for src, dst in ((x, y), (z, w)):
        r = await src.request({"t": "send", "id": rid(), "to": dst.node_id, "body": b"l0"})
        assert r["t"] == "ok" and r["status"] == "sent", r
        assert (await dst.recv_type("msg"))["body"] == b"l0"
        r = await src.request({"t": "send", "id": rid(), "to": dst.node_id, "body": b"l1",
                               "qos": 1})
        assert r["t"] == "ok" and r["status"] == "stored", r
        m = await dst.recv_type("msg")
        assert m["body"] == b"l1"
        await dst.send({"t": "ack", "mid": m["mid"]})

    # QoS 1 across instances is still accepted: it is stored.
    stored = []
    for i in range(3):
        r = await x.request({"t": "send", "id": rid(), "to": z.node_id,
                             "body": b"q1-%d" % i, "qos": 1})
        assert r["t"] == "ok" and r["status"] == "stored", r
        stored.append(r["mid"])
    # Topic publication goes on: the store numbers it (docs/protocol.md §6); the
    # subscriber on the other instance gets it once Redis is back, without reconnecting.
    r = await x.request({"t": "pub", "id": rid(), "topic": topic, "body": b"during"})
    assert r["t"] == "ok" and r["seq"] == 4, r
    # A node connecting meanwhile gets its session (local routing only, for now).
    v = await RawNode.connect(c[1])

    await redis_server.restart()
    t0 = time.monotonic()

    async def routed() -> bool:
        r = await x.request({"t": "send", "id": rid(), "to": z.node_id, "body": b"again"})
        return r["t"] == "ok"

    await eventually(routed, 5.0, every=0.1, what="cross-instance routing after restart")
    assert time.monotonic() - t0 < timeout(5.0)
    r = await z.request({"t": "send", "id": rid(), "to": y.node_id, "body": b"rev"})
    assert r["t"] == "ok" and r["status"] == "sent", r
    assert (await y.recv_type("msg"))["body"] == b"rev"
    # ... and once Redis is back, the node that connected during the outage is
    # reachable from the other instance too.
    r = await x.request({"t": "send", "id": rid(), "to": v.node_id, "body": b"hi v"})
    assert r["t"] == "ok" and r["status"] == "sent", r
    assert (await v.recv_type("msg"))["body"] == b"hi v"

    # What was published during the outage comes first (caught up from history), then
    # the sequence goes on: the store numbers topics, Redis never did the counting.
    m = await recv_topic(z, topic)
    assert (m["seq"], m["body"]) == (4, b"during")
    r = await y.request({"t": "pub", "id": rid(), "topic": topic, "body": b"after"})
    assert r["t"] == "ok" and r["seq"] == 5, r
    m = await recv_topic(z, topic)
    assert (m["seq"], m["body"]) == (5, b"after")
    r = await w.request({"t": "pub", "id": rid(), "topic": topic, "body": b"after2"})
    assert r["t"] == "ok" and r["seq"] == 6, r

    # The QoS 1 stored while Redis was down reach z (at the latest on its next session).
    z_id = z.identity
    got: list[str] = []
    try:
        while True:
            f = await z.recv(0.5)
            if f["t"] == "msg" and f["qos"] == 1:
                got.append(f["mid"])
    except TimeoutError:
        pass
    await z.close()
    z2 = await RawNode.connect(c[0], z_id)
    assert z2.welcome["pending"] >= len(set(stored) - set(got))
    for m in await recv_msgs(z2, z2.welcome["pending"]):
        got.append(m["mid"])
    assert set(stored) <= set(got)


async def recv_q1(node: RawNode, n: int, wait: float = 10.0) -> list[dict[str, Any]]:
    """The next `n` QoS 1 messages (anything else received meanwhile is skipped)."""
    out: list[dict[str, Any]] = []
    while len(out) < n:
        f = await node.recv(wait)
        if f["t"] == "msg" and f["qos"] == 1:
            out.append(f)
    return out


async def until_broker_down(node: RawNode, to: str) -> None:
    """Until `node`'s instance knows the broker is gone: a cross-instance QoS 0 with an
    id fails fast with `unavailable` (§4)."""

    async def down() -> bool:
        r = await node.request({"t": "send", "id": rid(), "to": to, "body": b"probe"})
        return r["t"] == "error" and r["code"] == "unavailable"

    await eventually(down, 5.0, every=0.1, what="broker down")


async def send_stored(sender: RawNode, to: str, body: bytes) -> str:
    """A QoS 1 send that must be answered `ok stored`; its mid."""
    r = await sender.request({"t": "send", "id": rid(), "to": to, "body": body, "qos": 1})
    assert r["t"] == "ok" and r["status"] == "stored", r
    return str(r["mid"])


async def message_state(hub: HubProcess, mid: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(
            f"{hub.admin}/v1/messages/{mid}",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
        assert r.status == 200, await r.text()
        return str((await r.json())["state"])


async def test_qos1_stored_while_redis_down_reaches_the_online_node(
        make_cluster: ClusterFactory, redis_server: RedisServer) -> None:
    """§4 at least once, with the recipient online the whole time: Redis dies, a node on
    instance 1 sends QoS 1 to a node online on instance 2 (`ok stored`); when Redis is
    back the recipient gets them within seconds on the same session, in order, and acks
    them (as an MQTT broker or Centrifugo would). A message it had before the outage
    and not acked yet is not written to it again (docs/protocol.md: no retransmission
    within a session)."""
    c = await make_cluster(2, broker_url=redis_server.url)
    a = await RawNode.connect(c[0])
    b = await RawNode.connect(c[1])
    await until_online(a, b.node_id)
    before = await send_stored(a, b.node_id, b"before")
    assert (await b.recv_type("msg"))["mid"] == before  # in flight: not acked

    redis_server.kill()
    await until_broker_down(a, b.node_id)
    stored = [await send_stored(a, b.node_id, b"during-%d" % i) for i in range(3)]
    await no_msg(b, 0.5)

    await redis_server.restart()
    t0 = time.monotonic()
    msgs = await recv_q1(b, 3)
    assert time.monotonic() - t0 < timeout(5.0), "stored messages came late"
    assert [m["mid"] for m in msgs] == stored
    assert [(m["from"], m["body"]) for m in msgs] == [
        (a.node_id, b"during-%d" % i) for i in range(3)]
    await b.send({"t": "ack", "mids": [before, *stored]})
    await no_msg(b, 1.0)  # `before` was in flight: not again; nothing twice

    async def acked() -> bool:
        return all([await message_state(c[0], mid) == "acked" for mid in [before, *stored]])

    await eventually(acked, 5.0, every=0.1, what="acked")
    # The session never changed: b is still the one that was connected all along.
    r = await a.request({"t": "send", "id": rid(), "to": b.node_id, "body": b"after"})
    assert r["t"] == "ok" and r["status"] == "sent", r
    assert (await b.recv_type("msg"))["body"] == b"after"


async def test_qos1_stored_by_an_instance_cut_off_from_redis(
        make_cluster: ClusterFactory, redis_server: RedisServer) -> None:
    """Only instance 1 loses Redis (a network cut): instance 2, holding the recipient,
    never sees an outage of its own. What instance 1 stores meanwhile still reaches the
    online recipient once instance 1 is back: it tells the recipient's instance to read
    its queue again. A message sent right after the cut heals keeps its place (§4
    order)."""
    proxy = Proxy("127.0.0.1", redis_server.port)
    await proxy.start()
    try:
        c1 = await make_cluster(1, broker_url=f"redis://127.0.0.1:{proxy.port}/0")
        c2 = await make_cluster(1, broker_url=redis_server.url)
        a = await RawNode.connect(c1[0])
        b = await RawNode.connect(c2[0])
        await until_online(a, b.node_id)
        await until_online(b, a.node_id)

        proxy.cut_all()
        await until_broker_down(a, b.node_id)
        r = await b.request({"t": "presence", "id": rid(), "nodes": [a.node_id]})
        assert r["t"] == "ok", r  # instance 2's broker is fine
        stored = [await send_stored(a, b.node_id, b"cut-%d" % i) for i in range(2)]
        await no_msg(b, 0.5)

        proxy.restore()

        # Right away: stored, and routed behind the earlier ones.
        stored.append(await send_stored(a, b.node_id, b"x"))
        msgs = await recv_q1(b, 3)
        assert [m["mid"] for m in msgs] == stored
        await b.send({"t": "ack", "mids": stored})
        await no_msg(b, 1.0)
    finally:
        await proxy.close()


async def test_sigkill_of_an_instance_mid_traffic(make_cluster: ClusterFactory) -> None:
    """An instance dies with SIGKILL while QoS 1 messages flow to its nodes: their
    presence is gone at once (Redis dropped the dead instance's subscriptions), they
    reconnect to the surviving instance and get every message that was `ok stored`:
    zero QoS 1 loss, and each sender's messages in order."""
    c = await make_cluster(2)
    receivers = [await RawNode.connect(c[1]) for _ in range(4)]
    idents = [r.identity for r in receivers]
    ids = [r.node_id for r in receivers]
    senders = [await RawNode.connect(c[0]) for _ in range(2)]
    watcher = await RawNode.connect(c[0])
    await until_online(watcher, *ids)
    stored: dict[str, list[str]] = {i: [] for i in ids}  # recipient -> mids, sent order
    sender_of: dict[str, int] = {}
    got: dict[str, list[str]] = {i: [] for i in ids}
    stop = asyncio.Event()

    phase = [0]  # 0 before the kill, 1 while the receivers are away, 2 after
    per_phase = [0, 0, 0]

    async def send_loop(j: int, s: RawNode) -> None:
        k = 0
        while not stop.is_set():
            # One message to every receiver, back to back: several in flight at once.
            burst = {}
            for to in ids:
                burst[f"s{j}-{k}"] = to
                await s.send({"t": "send", "id": f"s{j}-{k}", "to": to,
                              "body": bytes([j]) + k.to_bytes(4, "big"), "qos": 1})
                k += 1
            replies: dict[str, dict[str, Any]] = {}
            while len(replies) < len(burst):
                f = await s.recv()
                if f["t"] in ("ok", "error") and f["id"] in burst:
                    replies[f["id"]] = f
            for fid, to in burst.items():  # in send order
                r = replies[fid]
                assert r["t"] == "ok" and r["status"] == "stored", r
                stored[to].append(r["mid"])
                sender_of[r["mid"]] = j
                per_phase[phase[0]] += 1
            await asyncio.sleep(0.005)

    async def receive(node: RawNode) -> None:
        try:
            while True:
                f = await node.recv(30)
                if f["t"] == "msg":
                    got[node.node_id].append(f["mid"])
                    await node.send({"t": "ack", "mid": f["mid"]})
        except (ConnectionClosed, TimeoutError):
            pass

    readers = [asyncio.create_task(receive(r)) for r in receivers]
    sending = [asyncio.create_task(send_loop(j, s)) for j, s in enumerate(senders)]
    await asyncio.sleep(0.7)
    assert all(got[i] for i in ids), "no traffic before the kill"
    c[1].kill()
    phase[0] = 1
    await asyncio.gather(*readers)
    # §6: the dead instance's nodes are offline at once (well within 3 x hb).
    await until_online(watcher, *ids, online=False, wait=3.0)
    await asyncio.sleep(0.3)  # messages for the offline nodes are stored meanwhile
    back = [await RawNode.connect(c[0], ident) for ident in idents]
    phase[0] = 2
    readers = [asyncio.create_task(receive(r)) for r in back]
    await asyncio.sleep(0.7)  # traffic to the reconnected nodes, now local to instance 1
    stop.set()
    await asyncio.gather(*sending)

    async def all_delivered() -> bool:
        return all(set(stored[i]) <= set(got[i]) for i in ids)

    await eventually(all_delivered, 10.0, every=0.1, what="every stored message delivered")
    for r in back:
        await r.close()
    await asyncio.gather(*readers)
    assert all(per_phase), per_phase
    # The dead instance comes back on its ports and serves again, as one of the cluster.
    await c[1].restart()
    again = await RawNode.connect(c[1])
    await until_online(watcher, again.node_id)
    r = await watcher.request({"t": "send", "id": rid(), "to": again.node_id, "body": b"back"})
    assert r["t"] == "ok" and r["status"] == "sent", r
    assert (await again.recv_type("msg"))["body"] == b"back"
    for i in ids:
        first: list[str] = []
        for mid in got[i]:
            if mid not in first:
                first.append(mid)
        for j in range(len(senders)):
            mine = [m for m in stored[i] if sender_of[m] == j]
            assert [m for m in first if sender_of.get(m) == j] == mine, \
                f"sender {j} -> {i[:8]}: order lost"


# -- Redis Cluster -----------------------------------------------------------------------


async def test_hubs_on_a_redis_cluster(make_cluster: ClusterFactory,
                                       redis_cluster: LocalCluster | str) -> None:
    """`broker.url = "redis://...?cluster=true"`: two hubs on a real local 3-master Redis
    Cluster (sharded pub/sub) behave as one hub: direct QoS 0 / QoS 1, replace,
    presence, and a topic's one sequence across instances."""
    rc = need_cluster(redis_cluster)
    c = await make_cluster(2, broker_url=rc.url)
    a = await RawNode.connect(c[0])
    b = await RawNode.connect(c[1])
    await until_online(a, b.node_id)
    r = await a.request({"t": "send", "id": 1, "to": b.node_id, "body": b"zero"})
    assert r["t"] == "ok" and r["status"] == "sent", r
    assert (await b.recv_type("msg"))["body"] == b"zero"
    r = await b.request({"t": "send", "id": 2, "to": a.node_id, "body": b"one", "qos": 1})
    assert r["t"] == "ok" and r["status"] == "stored", r
    assert (await a.recv_type("msg"))["mid"] == r["mid"]
    nobody = Identity.generate().node_id
    r = await a.request({"t": "send", "id": 3, "to": nobody, "body": b"x"})
    assert r["t"] == "error" and r["code"] == "no_route", r

    assert (await b.request({"t": "sub", "id": 4, "topic": "rc/t"}))["t"] == "ok"
    await asyncio.sleep(0.2)
    for i in range(1, 4):
        r = await a.request({"t": "pub", "id": 10 + i, "topic": "rc/t", "body": b"p"})
        assert r["seq"] == i, r
    assert [m["seq"] for m in await recv_msgs(b, 3)] == [1, 2, 3]

    again = await RawNode.connect(c[0], b.identity)
    code, frames = await b.closed()
    assert code == 4010 and {"t": "bye", "reason": "replaced"} in frames
    r = await a.request({"t": "send", "id": 5, "to": again.node_id, "body": b"new"})
    assert r["t"] == "ok", r
    assert (await again.recv_type("msg"))["body"] == b"new"
    await again.close()
    await until_online(a, again.node_id, online=False, wait=1.0)
