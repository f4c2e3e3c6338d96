"""Watching presence across instances (docs/protocol.md §6.1): two real hub processes
on one Redis and one PostgreSQL; a watcher on one instance follows nodes and topic
subscribers on the other, and a node whose instance is killed (SIGKILL) is reported
offline within 3 x hb."""

from __future__ import annotations

import time
from typing import Any

import pytest
from openred.protocol.identity import Identity

from tests.cluster.conftest import ClusterFactory, RedisServer, eventually
from tests.cluster.proxy import LinkProxy
from tests.cluster.test_cluster import rid, until_online
from tests.cluster.test_partition import until_broker_down
from tests.conftest import timeout
from tests.hub.nodes import RawNode

pytestmark = pytest.mark.slow


async def event(node: RawNode, wait: float = 10.0) -> dict[str, Any]:
    return await node.recv_type("presence", wait)


async def no_event(node: RawNode, wait: float = 0.5) -> None:
    try:
        while True:
            f = await node.recv(wait)
            assert f["t"] != "presence", f"unexpected {f}"
    except TimeoutError:
        pass


async def watch(node: RawNode, **fields: Any) -> dict[str, Any]:
    r = await node.request({"t": "watch", "id": rid(), **fields})
    assert r["t"] == "ok", r
    return r


async def test_node_events_across_instances_both_ways(make_cluster: ClusterFactory) -> None:
    c = await make_cluster(2)
    w0 = await RawNode.connect(c[0])
    w1 = await RawNode.connect(c[1])
    ident = Identity.generate()
    x_id = ident.node_id
    assert (await watch(w0, nodes=[x_id]))["online"] == {x_id: False}
    x = await RawNode.connect(c[1], ident)  # on the other instance
    e = await event(w0)
    assert (e["node"], e["online"]) == (x_id, True)
    assert (await watch(w1, nodes=[x_id, w0.node_id]))["online"] == {
        x_id: True, w0.node_id: True}
    await x.close()
    for w in (w0, w1):
        e = await event(w)
        assert (e["node"], e["online"]) == (x_id, False)
    x = await RawNode.connect(c[0], ident)  # now on the watcher's instance
    for w in (w0, w1):
        e = await event(w)
        assert (e["node"], e["online"]) == (x_id, True)
    # Replaced by a session on the other instance: no change (§6.1).
    newer = await RawNode.connect(c[1], ident)
    code, _ = await x.closed()
    assert code == 4010
    await no_event(w0)
    await no_event(w1)
    await newer.close()
    for w in (w0, w1):
        e = await event(w)
        assert (e["node"], e["online"]) == (x_id, False)
    # The watcher on instance 1 disconnects: instance 0's watcher is unaffected.
    await w1.close()
    x = await RawNode.connect(c[1], ident)
    assert (await event(w0))["online"] is True


async def test_close_of_a_node_watched_after_it_opened(make_cluster: ClusterFactory) -> None:
    """The holder publishes a close only when it knows of a watcher: one that began
    after the node's session opened tells it (hb is 20 s here, so the event is not the
    watcher's re-check)."""
    c = await make_cluster(2)
    xs = [await RawNode.connect(c[1]) for _ in range(5)]
    w = await RawNode.connect(c[0])
    ids = [x.node_id for x in xs]
    await until_online(w, *ids)
    assert (await watch(w, nodes=ids))["online"] == dict.fromkeys(ids, True)
    await no_event(w, 0.3)  # the holder has been told by now (it answered no event)
    for x in xs:
        t0 = time.monotonic()
        await x.close()
        e = await event(w, wait=5.0)
        assert (e["node"], e["online"]) == (x.node_id, False)
        assert time.monotonic() - t0 < timeout(5.0)


async def test_sigkill_of_the_instance_holding_a_watched_node(
        make_cluster: ClusterFactory) -> None:
    """§6.1: a node whose instance died is reported offline within 3 x hb (here hb is 2 s:
    the watching instance reads the presence of the remote nodes it watches every hb)."""
    hb = 2
    c = await make_cluster(2, limits_hb_s=str(hb))
    w = await RawNode.connect(c[0])
    xs = [await RawNode.connect(c[1]) for _ in range(3)]
    ids = [x.node_id for x in xs]
    await until_online(w, *ids)
    r = await watch(w, nodes=ids)
    assert r["online"] == dict.fromkeys(ids, True)
    c[1].kill()
    t0 = time.monotonic()
    seen: dict[str, bool] = {}
    while len(seen) < len(ids):
        e = await event(w, wait=3 * hb + 2)
        seen[e["node"]] = e["online"]
    elapsed = time.monotonic() - t0
    assert seen == dict.fromkeys(ids, False)
    assert elapsed < timeout(3 * hb), elapsed
    # And back on the surviving instance: online again, from the local session.
    x = await RawNode.connect(c[0], xs[0].identity)
    e = await event(w)
    assert (e["node"], e["online"]) == (ids[0], True)
    await x.close()


async def test_changes_missed_during_a_partition_are_reported(
        make_cluster: ClusterFactory, redis_server: RedisServer) -> None:
    """§6.1: the watcher's instance is cut off from Redis (only its link) while one
    watched node leaves and another comes; once the link is back both changes are
    reported within 3 x hb (hb 2 s), and nothing is reported about the node that
    stayed."""
    hb = 2
    link = LinkProxy("127.0.0.1", redis_server.port)
    await link.start()
    try:
        h1 = (await make_cluster(1, broker_url=link.url(), limits_hb_s=str(hb)))[0]
        h2 = (await make_cluster(1, broker_url=redis_server.url, limits_hb_s=str(hb)))[0]
        w = await RawNode.connect(h1)
        leaves, stays = await RawNode.connect(h2), await RawNode.connect(h2)
        comes = Identity.generate()
        ids = [leaves.node_id, stays.node_id, comes.node_id]
        await until_online(w, leaves.node_id, stays.node_id)
        r = await watch(w, nodes=ids)
        assert r["online"] == {leaves.node_id: True, stays.node_id: True,
                               comes.node_id: False}
        link.set_mode("reset")
        await until_broker_down(w, stays.node_id)
        await leaves.close()
        came = await RawNode.connect(h2, comes)
        await no_event(w, 1.0)  # cut off: nothing is known, nothing is made up
        link.set_mode("forward")
        t0 = time.monotonic()
        seen: dict[str, bool] = {}
        while len(seen) < 2:
            e = await event(w, wait=3 * hb + 2)
            seen[e["node"]] = e["online"]
        assert seen == {leaves.node_id: False, comes.node_id: True}
        assert time.monotonic() - t0 < timeout(3 * hb)
        await no_event(w, 0.5)
        # Events flow again once the link is back.
        await came.close()
        e = await event(w, wait=5.0)
        assert (e["node"], e["online"]) == (comes.node_id, False)
    finally:
        await link.close()


async def test_topic_watch_across_instances(make_cluster: ClusterFactory) -> None:
    c = await make_cluster(2)
    w = await RawNode.connect(c[0])
    r = await watch(w, topic="room")
    assert "online" not in r
    s = await RawNode.connect(c[1])
    local = await RawNode.connect(c[0])
    assert (await s.request({"t": "sub", "id": rid(), "topic": "room"}))["t"] == "ok"
    e = await event(w)
    assert (e["node"], e["online"], e["topic"]) == (s.node_id, True, "room")
    assert (await local.request({"t": "sub", "id": rid(), "topic": "room"}))["t"] == "ok"
    e = await event(w)
    assert (e["node"], e["online"], e["topic"]) == (local.node_id, True, "room")
    await s.request({"t": "unsub", "id": rid(), "topic": "room"})
    e = await event(w)
    assert (e["node"], e["online"], e["topic"]) == (s.node_id, False, "room")
    await s.request({"t": "sub", "id": rid(), "topic": "room"})
    assert (await event(w))["online"] is True
    await s.close()  # a session that ends while subscribed leaves the topic
    e = await event(w)
    assert (e["node"], e["online"], e["topic"]) == (s.node_id, False, "room")
    # Watchers on the other instance too; the watcher's own subscription is not told to it.
    w1 = await RawNode.connect(c[1])
    await watch(w1, topic="room")
    assert (await w.request({"t": "sub", "id": rid(), "topic": "room"}))["t"] == "ok"
    e = await event(w1)
    assert (e["node"], e["online"], e["topic"]) == (w.node_id, True, "room")
    await no_event(w)
    # Unwatched: no more events.
    await w1.request({"t": "unwatch", "id": rid(), "topic": "room"})
    await local.close()
    e = await event(w)
    assert (e["node"], e["online"]) == (local.node_id, False)
    await no_event(w1)


async def test_watch_while_redis_is_down_is_unavailable(
        make_cluster: ClusterFactory, redis_server: RedisServer) -> None:
    """§6.1 with §6's rule: a node watch whose presence cannot be read gets
    `unavailable` and changes nothing; a topic watch alone does not need the read."""
    h = (await make_cluster(1, broker_url=redis_server.url))[0]
    w = await RawNode.connect(h)
    other = Identity.generate().node_id
    redis_server.kill()
    await until_broker_down(w, other)
    r = await w.request({"t": "watch", "id": rid(), "nodes": [other], "topic": "room"})
    assert (r["t"], r["code"]) == ("error", "unavailable")
    assert (await watch(w, topic="hall"))["t"] == "ok"
    await redis_server.restart()
    ident = Identity.generate()

    async def watched() -> bool:
        r = await w.request({"t": "watch", "id": rid(), "nodes": [ident.node_id]})
        return bool(r["t"] == "ok" and r["online"] == {ident.node_id: False})

    await eventually(watched, 10.0, every=0.2, what="watch accepted again")
    x = await RawNode.connect(h, ident)
    assert (await event(w))["online"] is True
    await x.close()
