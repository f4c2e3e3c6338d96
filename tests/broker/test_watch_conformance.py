"""The presence-event part of the `Broker` contract (hub/broker.py; docs/protocol.md
§6.1), run against every broker like tests/broker/test_conformance.py: events reach the
instances that watch the node or topic, never the publisher, in order, and nobody once
the watch ends. The memory broker has no other instance: nothing is delivered, nothing
raises."""

from __future__ import annotations

import time

import pytest
from openred.hub.broker import BrokerUnavailable

from tests.broker.conftest import Brokers, until
from tests.broker.test_conformance import quiet
from tests.cluster.conftest import free_port
from tests.conftest import timeout

pytestmark = pytest.mark.slow


async def test_node_events_reach_only_watching_instances(brokers: Brokers) -> None:
    a, ra = await brokers.make()
    b, rb = await brokers.make()
    c, rc = await brokers.make()
    await b.watch_node("n1", True)
    await c.watch_node("n2", True)
    for i in range(50):  # in order, per publisher
        a.publish_presence_nowait("n1", i % 2 == 0, i)
    a.publish_presence_nowait("n2", True, 100)
    a.publish_presence_nowait("n3", True, 101)  # nobody watches it
    expected_b = [("n1", i % 2 == 0, i, None) for i in range(50)]
    if brokers.clustered:
        await until(lambda: rb.presence == expected_b, what="events at B")
        await until(lambda: rc.presence == [("n2", True, 100, None)], what="event at C")
    await quiet()
    assert ra.presence == []  # never the publisher
    assert rb.presence == (expected_b if brokers.clustered else [])
    assert rc.presence == ([("n2", True, 100, None)] if brokers.clustered else [])
    # A watching instance's own events do not come back to it.
    b.publish_presence_nowait("n1", False, 200)
    await quiet()
    assert len(rb.presence) == (50 if brokers.clustered else 0)
    # The watch ends: no more events.
    await b.watch_node("n1", False)
    a.publish_presence_nowait("n1", True, 300)
    c.publish_presence_nowait("n2", False, 301)  # C watches n2 itself: not to C
    await quiet()
    assert len(rb.presence) == (50 if brokers.clustered else 0)
    assert len(rc.presence) == (1 if brokers.clustered else 0)


async def test_topic_events_reach_only_watching_instances(brokers: Brokers) -> None:
    a, ra = await brokers.make()
    b, rb = await brokers.make()
    await b.watch_topic("room", True)
    await b.watch_node("room", True)  # a node of the same name is another watch
    a.publish_presence_nowait("x", True, 1, "room")
    a.publish_presence_nowait("x", False, 2, "room")
    a.publish_presence_nowait("x", True, 3, "hall")
    want = [("x", True, 1, "room"), ("x", False, 2, "room")]
    if brokers.clustered:
        await until(lambda: rb.presence == want, what="topic events at B")
    await quiet()
    assert rb.presence == (want if brokers.clustered else [])
    assert ra.presence == []
    await b.watch_topic("room", False)
    a.publish_presence_nowait("y", True, 4, "room")
    await quiet()
    assert len(rb.presence) == (2 if brokers.clustered else 0)
    # Watch channels are not node channels: presence and routing do not see them.
    assert (await a.presence(["room"])).get("room", False) is False
    assert await a.publish_to_node("room", b"f", 0, "m") is False


async def test_want_result_tells_whether_an_instance_watches(brokers: Brokers) -> None:
    a, _ = await brokers.make()
    b, rb = await brokers.make()
    assert a.publish_presence_nowait("n1", True, 1) is None
    assert await a.publish_presence_nowait("n1", True, 2, want_result=True) is False
    await b.watch_node("n1", True)
    assert await a.publish_presence_nowait("n1", True, 3, want_result=True) is (
        brokers.clustered)
    # The publisher's own watch counts too (it is told nothing, though).
    assert await b.publish_presence_nowait("n1", True, 4, want_result=True) is (
        brokers.clustered)
    assert await a.publish_presence_nowait("n2", True, 5, "t", want_result=True) is False
    await b.watch_topic("t", True)
    assert await a.publish_presence_nowait("n2", True, 6, "t", want_result=True) is (
        brokers.clustered)
    await b.watch_node("n1", False)
    assert await a.publish_presence_nowait("n1", True, 7, want_result=True) is False
    if brokers.clustered:
        await until(lambda: len(rb.presence) == 2, what="events at B")
    assert [e[2] for e in rb.presence] == ([3, 6] if brokers.clustered else [])


async def test_unreachable_backend_refuses_events_at_once(brokers: Brokers) -> None:
    if not brokers.clustered:
        a, _ = await brokers.make()
        a.publish_presence_nowait("n", True, 1)
        await a.watch_node("n", True)
        await a.watch_topic("t", False)
        return
    url = f"redis://127.0.0.1:{free_port()}/0"
    if brokers.kind == "redis-cluster":
        url += "?cluster=true"
    t0 = time.monotonic()
    a, _ = await brokers.make(url=url)
    with pytest.raises(BrokerUnavailable):
        a.publish_presence_nowait("n", True, 1)
    with pytest.raises(BrokerUnavailable):
        a.publish_presence_nowait("n", True, 1, "t")
    # A watch made while Redis is away is taken when it is back (like `interest`).
    await a.watch_node("n", True)
    await a.watch_node("n", False)
    assert time.monotonic() - t0 < timeout(3.0)
