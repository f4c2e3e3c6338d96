"""Topics through a real hub (docs/protocol.md §5): sub/unsub/pub replies, sequences, fan-out,
recovery with `since` (no gap, no duplicate), history bounds, names, restarts."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import timeout
from tests.hub.nodes import RawNode, no_frame, recv_msgs


async def publish(node: RawNode, topic: str, n: int, start: int = 0) -> list[dict[str, Any]]:
    """Publish n messages (bodies start..start+n-1), each waiting for its ok."""
    oks = []
    for i in range(start, start + n):
        ok = await node.request({"t": "pub", "id": f"p{i}", "topic": topic,
                                 "body": b"%d" % i})
        assert ok["t"] == "ok", ok
        oks.append(ok)
    return oks


async def test_sub_ok_carries_current_seq(hub):
    a = await RawNode.connect(hub)
    b = await RawNode.connect(hub)
    ok = await b.request({"t": "sub", "id": 1, "topic": "s/q"})
    assert ok == {"t": "ok", "id": 1, "seq": 0}
    await publish(a, "s/q", 3)
    await recv_msgs(b, 3)
    c = await RawNode.connect(hub)
    ok = await c.request({"t": "sub", "id": "c", "topic": "s/q"})
    assert ok == {"t": "ok", "id": "c", "seq": 3}
    await no_frame(c, 0.1)  # no since: no history


async def test_pub_ok_and_msg_shape_and_seq(hub):
    a = await RawNode.connect(hub)
    b = await RawNode.connect(hub)
    await b.request({"t": "sub", "id": 1, "topic": "shape.t"})
    oks = await publish(a, "shape.t", 5)
    for i, ok in enumerate(oks, 1):
        assert set(ok) == {"t", "id", "mid", "seq"}
        assert ok["seq"] == i and isinstance(ok["mid"], str) and len(ok["mid"]) == 26
    msgs = await recv_msgs(b, 5)
    for i, (m, ok) in enumerate(zip(msgs, oks, strict=True), 1):
        assert set(m) == {"t", "mid", "from", "topic", "seq", "body", "ts", "qos"}
        assert (m["mid"], m["from"], m["topic"], m["seq"], m["qos"]) == (
            ok["mid"], a.node_id, "shape.t", i, 0)
        assert m["body"] == b"%d" % (i - 1) and isinstance(m["ts"], int)
    # sequences are per topic
    ok = await a.request({"t": "pub", "id": "o", "topic": "other.t", "body": b""})
    assert ok["seq"] == 1
    # a pub without id gets no ok but is published
    await a.send({"t": "pub", "topic": "shape.t", "body": b"noid"})
    m = await b.recv()
    assert (m["seq"], m["body"]) == (6, b"noid")
    await no_frame(a, 0.1)


async def test_publisher_does_not_receive_its_own(hub):
    a = await RawNode.connect(hub)
    b = await RawNode.connect(hub)
    for n in (a, b):
        await n.request({"t": "sub", "id": 1, "topic": "self"})
    ok = await a.request({"t": "pub", "id": 2, "topic": "self", "body": b"x"})
    assert ok["seq"] == 1
    assert (await b.recv())["seq"] == 1
    await no_frame(a)
    # b's publication reaches a
    await b.request({"t": "pub", "id": 3, "topic": "self", "body": b"y"})
    m = await a.recv()
    assert (m["seq"], m["from"]) == (2, b.node_id)


async def test_fanout_to_many(hub):
    pub = await RawNode.connect(hub)
    subs = [await RawNode.connect(hub) for _ in range(20)]
    for s in subs:
        await s.request({"t": "sub", "id": 1, "topic": "fan/out"})
    await publish(pub, "fan/out", 10)
    for s in subs:
        msgs = await recv_msgs(s, 10)
        assert [m["seq"] for m in msgs] == list(range(1, 11))
        assert [m["body"] for m in msgs] == [b"%d" % i for i in range(10)]


async def test_since_recovery_then_live(hub):
    a = await RawNode.connect(hub)
    b = await RawNode.connect(hub)
    oks = await publish(a, "rec", 10)
    await b.send({"t": "sub", "id": "s", "topic": "rec", "since": 4})
    first = await b.recv()
    assert first == {"t": "ok", "id": "s", "seq": 10, "recovered": True}
    rec = await recv_msgs(b, 6)
    assert [m["seq"] for m in rec] == [5, 6, 7, 8, 9, 10]
    assert [m["mid"] for m in rec] == [ok["mid"] for ok in oks[4:]]
    assert [m["body"] for m in rec] == [b"%d" % i for i in range(4, 10)]
    assert all(m["from"] == a.node_id and m["topic"] == "rec" for m in rec)
    await publish(a, "rec", 3, start=10)
    live = await recv_msgs(b, 3)
    assert [m["seq"] for m in live] == [11, 12, 13]
    await no_frame(b, 0.1)


async def test_since_zero_all_history_and_since_current(hub):
    a = await RawNode.connect(hub)
    await publish(a, "all", 7)
    b = await RawNode.connect(hub)
    ok = await b.request({"t": "sub", "id": 1, "topic": "all", "since": 0})
    assert (ok["seq"], ok["recovered"]) == (7, True)
    assert [m["seq"] for m in await recv_msgs(b, 7)] == list(range(1, 8))
    c = await RawNode.connect(hub)
    ok = await c.request({"t": "sub", "id": 1, "topic": "all", "since": 7})
    assert (ok["seq"], ok["recovered"]) == (7, True)
    await no_frame(c, 0.1)
    # since beyond the current sequence: nothing to recover, nothing lost
    d = await RawNode.connect(hub)
    ok = await d.request({"t": "sub", "id": 1, "topic": "all", "since": 100})
    assert (ok["seq"], ok["recovered"]) == (7, True)
    # since on a topic never published
    ok = await d.request({"t": "sub", "id": 2, "topic": "fresh", "since": 0})
    assert ok == {"t": "ok", "id": 2, "seq": 0, "recovered": True}
    await no_frame(d, 0.1)


async def test_history_trimmed(make_hub):
    h = await make_hub(**{"store.topic_history": 5})
    a = await RawNode.connect(h)
    await publish(a, "trim", 10)
    b = await RawNode.connect(h)
    ok = await b.request({"t": "sub", "id": 1, "topic": "trim", "since": 0})
    assert (ok["seq"], ok["recovered"]) == (10, False)
    msgs = await recv_msgs(b, 5)
    assert [m["seq"] for m in msgs] == [6, 7, 8, 9, 10]
    await no_frame(b, 0.1)
    c = await RawNode.connect(h)
    ok = await c.request({"t": "sub", "id": 1, "topic": "trim", "since": 5})
    assert (ok["seq"], ok["recovered"]) == (10, True)  # 6..10 all still held
    assert [m["seq"] for m in await recv_msgs(c, 5)] == [6, 7, 8, 9, 10]
    d = await RawNode.connect(h)
    ok = await d.request({"t": "sub", "id": 1, "topic": "trim", "since": 4})
    assert (ok["seq"], ok["recovered"]) == (10, False)  # 5 was dropped
    assert [m["seq"] for m in await recv_msgs(d, 5)] == [6, 7, 8, 9, 10]


async def test_history_off(make_hub):
    h = await make_hub(**{"store.topic_history": 0})
    a = await RawNode.connect(h)
    await publish(a, "nohist", 3)
    b = await RawNode.connect(h)
    ok = await b.request({"t": "sub", "id": 1, "topic": "nohist", "since": 0})
    assert (ok["seq"], ok["recovered"]) == (3, False)
    await no_frame(b, 0.1)
    ok = await b.request({"t": "sub", "id": 2, "topic": "nohist", "since": 3})
    assert (ok["seq"], ok["recovered"]) == (3, True)


async def test_gap_free_sub_during_publishing(make_hub):
    h = await make_hub(**{"store.topic_history": 1000})
    a = await RawNode.connect(h)
    n = 500

    async def publisher() -> None:
        for i in range(n):
            await a.send({"t": "pub", "topic": "live", "body": b"%d" % i})
            if i % 5 == 0:  # paced so that the sub lands mid-stream
                await asyncio.sleep(0.002)

    task = asyncio.create_task(publisher())
    await asyncio.sleep(0.02)
    b = await RawNode.connect(h)
    ok = await b.request({"t": "sub", "id": 1, "topic": "live", "since": 0})
    assert ok["recovered"] is True
    assert 0 < ok["seq"] < n, ok  # really mid-stream
    await task
    msgs = await recv_msgs(b, n, wait=10)
    assert [m["seq"] for m in msgs] == list(range(1, n + 1))
    assert [m["body"] for m in msgs] == [b"%d" % i for i in range(n)]
    await no_frame(b, 0.2)


async def test_gap_free_resub_during_publishing(make_hub):
    """A re-sub with since while publications keep coming: nothing missing, and once
    recovered every seq comes exactly once more (re-sub recovers again)."""
    h = await make_hub(**{"store.topic_history": 1000})
    a = await RawNode.connect(h)
    b = await RawNode.connect(h)
    await b.request({"t": "sub", "id": "s1", "topic": "re"})
    n = 300

    async def publisher() -> None:
        for i in range(n):
            await a.send({"t": "pub", "topic": "re", "body": b"%d" % i})
            if i % 5 == 0:
                await asyncio.sleep(0.002)

    task = asyncio.create_task(publisher())
    await asyncio.sleep(0.02)
    await b.send({"t": "sub", "id": "s2", "topic": "re", "since": 0})
    await task
    frames = []
    while True:
        f = await b.recv(5)
        frames.append(f)
        if f["t"] == "msg" and f["seq"] == n and any(
                g.get("id") == "s2" for g in frames):
            break
    k = next(i for i, f in enumerate(frames) if f.get("id") == "s2")
    before = [f["seq"] for f in frames[:k] if f["t"] == "msg"]
    after = [f["seq"] for f in frames[k + 1:] if f["t"] == "msg"]
    assert before == list(range(1, len(before) + 1))
    assert after == list(range(1, n + 1))
    await no_frame(b, 0.2)


async def test_seq_survives_restart(make_hub):
    h = await make_hub()
    a = await RawNode.connect(h)
    await publish(a, "persist", 3)
    await h.stop()
    h2 = await make_hub()
    a2 = await RawNode.connect(h2, a.identity)
    b = await RawNode.connect(h2)
    ok = await b.request({"t": "sub", "id": 1, "topic": "persist", "since": 1})
    assert (ok["seq"], ok["recovered"]) == (3, True)
    assert [m["seq"] for m in await recv_msgs(b, 2)] == [2, 3]
    ok = await a2.request({"t": "pub", "id": 1, "topic": "persist", "body": b"4"})
    assert ok["seq"] == 4
    m = await b.recv()
    assert (m["seq"], m["body"]) == (4, b"4")


async def test_resub_with_since_recovers_again(hub):
    a = await RawNode.connect(hub)
    b = await RawNode.connect(hub)
    await b.request({"t": "sub", "id": 1, "topic": "again"})
    await publish(a, "again", 4)
    assert [m["seq"] for m in await recv_msgs(b, 4)] == [1, 2, 3, 4]
    ok = await b.request({"t": "sub", "id": 2, "topic": "again", "since": 2})
    assert (ok["seq"], ok["recovered"]) == (4, True)
    assert [m["seq"] for m in await recv_msgs(b, 2)] == [3, 4]
    # still subscribed once: a new publication arrives once
    await publish(a, "again", 1, start=4)
    assert (await b.recv())["seq"] == 5
    await no_frame(b, 0.2)
    # a plain re-sub is ok and changes nothing
    ok = await b.request({"t": "sub", "id": 3, "topic": "again"})
    assert ok == {"t": "ok", "id": 3, "seq": 5}
    await no_frame(b, 0.1)


async def test_unsub(hub):
    a = await RawNode.connect(hub)
    b = await RawNode.connect(hub)
    await b.request({"t": "sub", "id": 1, "topic": "u"})
    await publish(a, "u", 1)
    assert (await b.recv())["seq"] == 1
    ok = await b.request({"t": "unsub", "id": 2, "topic": "u"})
    assert ok == {"t": "ok", "id": 2}
    await publish(a, "u", 2)
    await no_frame(b)
    ok = await b.request({"t": "unsub", "id": 3, "topic": "never.held"})
    assert ok == {"t": "ok", "id": 3}
    ok = await b.request({"t": "unsub", "id": 4, "topic": "u"})  # twice
    assert ok == {"t": "ok", "id": 4}
    await b.send({"t": "unsub", "topic": "u"})  # no id: no ok
    await no_frame(b, 0.1)
    assert "u" not in hub.node.topics


async def test_topic_names(hub):
    a = await RawNode.connect(hub)
    ok_name = "a" * 200
    assert (await a.request({"t": "sub", "id": 1, "topic": ok_name}))["t"] == "ok"
    assert (await a.request({"t": "pub", "id": 2, "topic": ok_name, "body": b""}))["seq"] == 1
    good = "Az09._:/-"
    assert (await a.request({"t": "sub", "id": 3, "topic": good}))["t"] == "ok"
    bad: list[Any] = ["a" * 201, "", "a b", "a#b", "é", "a\x00", "a*", "x+y", 5, None,
                      b"bytes", ["t"]]
    for i, name in enumerate(bad):
        for t in ("sub", "unsub", "pub"):
            frame = {"t": t, "id": f"{t}{i}", "topic": name, "body": b"x"}
            err = await a.request(frame)
            assert (err["t"], err["code"]) == ("error", "bad_frame"), (t, name, err)
    for t in ("sub", "unsub", "pub"):  # topic missing
        err = await a.request({"t": t, "id": t, "body": b"x"})
        assert err["code"] == "bad_frame"
    err = await a.request({"t": "sub", "id": "neg", "topic": "ok", "since": -1})
    assert err["code"] == "bad_frame"
    err = await a.request({"t": "pub", "id": "sb", "topic": "ok", "body": "str"})
    assert err["code"] == "bad_frame"


async def test_disconnect_removes_subscriptions(hub):
    a = await RawNode.connect(hub)
    b = await RawNode.connect(hub)
    await b.request({"t": "sub", "id": 1, "topic": "gone"})
    await b.request({"t": "sub", "id": 2, "topic": "gone2"})
    assert "gone" in hub.node.topics
    await b.close()
    async with asyncio.timeout(timeout(1)):
        while True:
            ok = await a.request({"t": "presence", "id": "p", "nodes": [b.node_id]})
            if ok["online"] == {b.node_id: False}:
                break
            await asyncio.sleep(0.02)
    assert "gone" not in hub.node.topics and "gone2" not in hub.node.topics
    ok = await a.request({"t": "pub", "id": 3, "topic": "gone", "body": b"x"})
    assert ok["seq"] == 1


async def test_abrupt_disconnect_removes_subscriptions(hub):
    a = await RawNode.connect(hub)
    b = await RawNode.connect(hub)
    await b.request({"t": "sub", "id": 1, "topic": "cut"})
    b.ws.transport.abort()  # no closing handshake
    async with asyncio.timeout(timeout(1)):
        while True:
            ok = await a.request({"t": "presence", "id": "p", "nodes": [b.node_id]})
            if ok["online"] == {b.node_id: False}:
                break
            await asyncio.sleep(0.02)
    assert "cut" not in hub.node.topics


async def test_max_topics(make_hub):
    h = await make_hub(**{"limits.max_topics": 3})
    a = await RawNode.connect(h)
    for i in range(3):
        assert (await a.request({"t": "sub", "id": i, "topic": f"m{i}"}))["t"] == "ok"
    err = await a.request({"t": "sub", "id": "x", "topic": "m3"})
    assert (err["t"], err["code"]) == ("error", "limit_exceeded")
    assert (await a.request({"t": "sub", "id": "y", "topic": "m1"}))["t"] == "ok"  # held
    await a.request({"t": "unsub", "id": "u", "topic": "m0"})
    assert (await a.request({"t": "sub", "id": "z", "topic": "m3"}))["t"] == "ok"
