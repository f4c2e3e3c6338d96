"""One conformance suite for every `Broker` (the contract in hub/broker.py's docstring),
run against the memory broker, the Redis broker on a real Redis and the Redis broker on a
real local Redis Cluster (tests/broker/conftest.py). Several broker objects sharing one
`hub_id` are several hub instances. The memory broker is one process with no other
instance: what it must do there (nothing routed elsewhere, never unavailable)
is checked by the same tests that check cross-instance delivery on Redis."""

from __future__ import annotations

import asyncio
import time

import pytest
from openred.hub.broker import BrokerUnavailable

from tests.broker.conftest import Brokers, until
from tests.cluster.conftest import free_port
from tests.conftest import timeout

pytestmark = pytest.mark.slow


async def quiet(wait: float = 0.2) -> None:
    """Time for a frame that should not arrive to arrive anyway."""
    await asyncio.sleep(wait)


async def test_publish_to_node_nobody_holds(brokers: Brokers) -> None:
    a, _ = await brokers.make()
    assert await a.publish_to_node("nobody", b"f", 0, "m1") is False
    fut = a.publish_to_node_nowait("nobody", b"f", 1, "m2", want_result=True)
    assert fut is not None and await fut is False
    assert a.publish_to_node_nowait("nobody", b"f", 0, "m3") is None
    assert await a.control("nobody", "kick") is False


async def test_publish_to_node_reaches_only_the_holder(brokers: Brokers) -> None:
    """Route, don't broadcast: the holder's instance gets the frame with its qos and
    mid; a third instance gets nothing. The memory broker has no other instance."""
    a, ra = await brokers.make()
    b, rb = await brokers.make()
    _c, rc = await brokers.make()
    await b.claim("n1", "s-b")
    rb.local["n1"] = object()
    ok = await a.publish_to_node("n1", b"hello", 1, "m1")
    assert ok is brokers.clustered
    fut = a.publish_to_node_nowait("n1", b"again", 0, "m2", want_result=True)
    assert fut is not None and await fut is brokers.clustered
    if brokers.clustered:
        await until(lambda: len(rb.node_frames) == 2, what="frames at the holder")
        assert rb.node_frames == [("n1", b"hello", 1, "m1"), ("n1", b"again", 0, "m2")]
    await quiet()
    assert ra.node_frames == rc.node_frames == []
    if not brokers.clustered:
        assert rb.node_frames == []


async def test_order_of_1000_frames_to_one_node_is_kept(brokers: Brokers) -> None:
    a, _ = await brokers.make()
    b, rb = await brokers.make()
    await b.claim("n1", "s-b")
    futs = []
    for i in range(1000):
        frame = i.to_bytes(4, "big")
        if i % 100 == 99:  # awaited now and then: the rest goes in several pipelines
            futs.append(asyncio.get_running_loop().create_future())
            futs[-1].set_result(await a.publish_to_node("n1", frame, 1, f"m{i}"))
        elif i % 2:
            a.publish_to_node_nowait("n1", frame, i % 2, f"m{i}")
        else:
            fut = a.publish_to_node_nowait("n1", frame, 0, f"m{i}", want_result=True)
            assert fut is not None
            futs.append(fut)
    results = await asyncio.gather(*futs)
    assert all(r is brokers.clustered for r in results)
    if not brokers.clustered:
        return
    await until(lambda: len(rb.node_frames) == 1000, 10.0, what="1000 frames")
    assert [int.from_bytes(f[1], "big") for f in rb.node_frames] == list(range(1000))
    assert [f[3] for f in rb.node_frames] == [f"m{i}" for i in range(1000)]


async def test_claim_elsewhere_replaces_the_holder(brokers: Brokers) -> None:
    """§2: the previous holder hears `replace` with the new owner's session; the new
    holder does not close its own session; traffic then goes to the new holder."""
    a, ra = await brokers.make()
    b, rb = await brokers.make()
    await a.claim("n1", "s-a")
    ra.local["n1"] = object()
    await b.claim("n1", "s-b")
    rb.local["n1"] = object()
    if not brokers.clustered:
        await quiet()
        assert ra.controls == rb.controls == []
        return
    await until(lambda: ("n1", "replace", "s-b") in ra.controls, what="replace at A")
    # B may hear of A's claim only as "owner is s-b": it keeps its session.
    assert all(sid == "s-b" for node, cmd, sid in rb.controls if cmd == "replace")
    ra.local.pop("n1")
    await a.release("n1", "s-a")
    c, _ = await brokers.make()
    assert await c.publish_to_node("n1", b"x", 0, "m") is True
    await until(lambda: len(rb.node_frames) == 1, what="frame at the new holder")
    await quiet()
    assert ra.node_frames == []


async def test_reassert_keeps_the_newer_session(brokers: Brokers) -> None:
    """§2 after a partition: a claim asserted again takes the node only from an older
    session (claim time orders session ids: "s2" > "s1"); the previous holder then hears
    `replace`, and the answer names the owner either way. An owner already in place is
    not announced again."""
    a, ra = await brokers.make()
    b, rb = await brokers.make()
    await a.claim("n1", "s2")
    ra.local["n1"] = object()
    if not brokers.clustered:
        assert await b.reassert([("n1", "s1")]) == ["s1"]  # nobody else to ask
        return
    assert await b.reassert([("n1", "s1")]) == ["s2"]  # older: it lost, nobody told
    await quiet()
    assert ra.controls == []
    assert await b.reassert([("n1", "s3"), ("n2", "s1")]) == ["s3", "s1"]
    rb.local["n1"] = rb.local["n2"] = object()
    await until(lambda: ("n1", "replace", "s3") in ra.controls, what="replace at A")
    assert await b.reassert([("n1", "s3")]) == ["s3"]
    assert await a.reassert([("n2", "s0")]) == ["s1"]
    await quiet()
    assert ra.controls == [("n1", "replace", "s3")] and rb.controls == []
    ra.local.pop("n1")
    await a.release("n1", "s2")
    assert await a.publish_to_node("n1", b"x", 0, "m") is True
    await until(lambda: len(rb.node_frames) == 1, what="frame at the new holder")


async def test_control_reaches_the_holder(brokers: Brokers) -> None:
    a, ra = await brokers.make()
    b, rb = await brokers.make()
    await b.claim("n1", "s-b")
    assert await a.control("n1", "kick") is brokers.clustered
    assert await a.control("n1", "ban") is brokers.clustered
    if brokers.clustered:
        await until(lambda: len(rb.controls) == 2, what="controls at the holder")
        assert rb.controls == [("n1", "kick", None), ("n1", "ban", None)]
    await quiet()
    assert ra.controls == []


# -- topics -------------------------------------------------------------------------------


async def test_publish_to_topic_reaches_only_interested_instances(brokers: Brokers) -> None:
    a, ra = await brokers.make()
    b, rb = await brokers.make()
    c, rc = await brokers.make()
    await b.interest("room", True)
    await c.interest("other", True)
    await a.publish_to_topic("room", 1, b"one")
    if brokers.clustered:
        await until(lambda: rb.topic_frames == [("room", 1, b"one")], what="topic at B")
    await quiet()
    assert ra.topic_frames == [] and rc.topic_frames == []  # not even the publisher
    await b.interest("room", False)
    await a.publish_to_topic("room", 2, b"two")
    await quiet()
    assert [f[1] for f in rb.topic_frames] == ([1] if brokers.clustered else [])


# -- presence -------------------------------------------------------------------------------


async def test_presence_of_nodes_on_other_instances(brokers: Brokers) -> None:
    a, _ = await brokers.make()
    b, rb = await brokers.make()
    assert not any((await a.presence(["n1", "n2"])).values())
    assert await a.presence([]) == {}
    await b.claim("n1", "s-b")
    rb.local["n1"] = object()
    seen = await a.presence(["n1", "n2"])
    assert seen.get("n1", False) is brokers.clustered and seen.get("n2", False) is False
    # Released while the node is (again) held here: the channel stays.
    await b.release("n1", "s-old")
    assert (await a.presence(["n1"])).get("n1", False) is brokers.clustered
    rb.local.pop("n1")
    await b.release("n1", "s-b")
    assert (await a.presence(["n1"])).get("n1", False) is False


# -- availability ---------------------------------------------------------------------------


async def test_ping(brokers: Brokers) -> None:
    a, _ = await brokers.make()
    await a.ping()


async def test_unreachable_backend_is_unavailable_fast(brokers: Brokers) -> None:
    """A broker whose backend cannot be reached raises BrokerUnavailable at once, on
    every call that needs it (the memory broker has no backend: never)."""
    if not brokers.clustered:
        a, _ = await brokers.make()
        await a.ping()
        assert await a.presence(["n"]) == {}
        return
    port = free_port()  # nothing listens there
    url = f"redis://127.0.0.1:{port}/0"
    if brokers.kind == "redis-cluster":
        url += "?cluster=true"
    t0 = time.monotonic()
    a, _ = await brokers.make(url=url)
    calls = [a.ping(), a.publish_to_node("n", b"", 0, "m"),
             a.presence(["n"]), a.claim("n", "s"), a.reassert([("n", "s")]),
             a.control("n", "kick")]
    for call in calls:
        with pytest.raises(BrokerUnavailable):
            await call
    with pytest.raises(BrokerUnavailable):
        a.publish_to_node_nowait("n", b"", 0, "m")
    assert time.monotonic() - t0 < timeout(3.0)
    t0 = time.monotonic()
    await a.close()
    assert time.monotonic() - t0 < timeout(3.0)


async def test_many_concurrent_claims_on_a_fresh_instance(brokers: Brokers) -> None:
    """Claims racing on a just-started instance (a reconnect storm) all end in one
    subscription that is read: every node gets its frame."""
    a, _ = await brokers.make()
    b, rb = await brokers.make()
    n = 200
    await asyncio.gather(*(b.claim(f"n{i}", f"s{i}") for i in range(n)))
    results = await asyncio.gather(*(a.publish_to_node(f"n{i}", b"x", 0, f"m{i}")
                                     for i in range(n)))
    assert results == [brokers.clustered] * n
    if brokers.clustered:
        await until(lambda: len(rb.node_frames) == n, what="a frame at every node")
        assert {f[0] for f in rb.node_frames} == {f"n{i}" for i in range(n)}

