"""Watching presence on one instance (docs/protocol.md §6.1): `watch` / `unwatch` of
nodes and of a topic's subscribers, through raw frames on a real hub; the registry
(hub/presence_watch.py) is checked by its size, not only by behaviour."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest
from openred.hub.tokens import TokenIssuer
from openred.protocol.identity import Identity

from tests.hub.nodes import RawNode, eventually, no_frame

SECRET = "s" * 40
_ids = itertools.count(1)


def rid() -> int:
    return next(_ids)


def sizes(h: Any) -> tuple[int, int, int]:
    """(watched nodes, watched topics, watching sessions) of the hub's registry."""
    return h.node.presence_watch.size()  # type: ignore[no-any-return]


async def watch(node: RawNode, **fields: Any) -> dict[str, Any]:
    return await node.request({"t": "watch", "id": rid(), **fields})


async def event(node: RawNode, wait: float = 5.0) -> dict[str, Any]:
    return await node.recv_type("presence", wait)


async def test_snapshot_then_online_and_offline_events(make_hub):
    h = await make_hub()
    w = await RawNode.connect(h)
    a = await RawNode.connect(h)
    b_id = Identity.generate()
    r = await watch(w, nodes=[a.node_id, b_id.node_id])
    assert r == {"t": "ok", "id": r["id"], "online": {a.node_id: True, b_id.node_id: False}}
    t0 = time.time() * 1000
    b = await RawNode.connect(h, b_id)
    e = await event(w)
    assert (e["node"], e["online"]) == (b.node_id, True) and "topic" not in e
    assert t0 - 1000 <= e["ts"] <= time.time() * 1000 + 1000
    await a.close()
    e = await event(w)
    assert (e["node"], e["online"]) == (a.node_id, False)
    await b.close()
    e = await event(w)
    assert (e["node"], e["online"]) == (b.node_id, False)
    await no_frame(w)
    assert sizes(h) == (2, 0, 1)


async def test_replace_is_no_event(make_hub):
    h = await make_hub()
    w = await RawNode.connect(h)
    ident = Identity.generate()
    old = await RawNode.connect(h, ident)
    assert (await watch(w, nodes=[ident.node_id]))["online"] == {ident.node_id: True}
    new = await RawNode.connect(h, ident)
    code, frames = await old.closed()
    assert code == 4010 and {"t": "bye", "reason": "replaced"} in frames
    await no_frame(w, 0.5)
    await new.close()
    e = await event(w)
    assert (e["node"], e["online"]) == (ident.node_id, False)


async def test_unwatch_stops_events_and_empties_the_registry(make_hub):
    h = await make_hub()
    w = await RawNode.connect(h)
    ident = Identity.generate()
    await watch(w, nodes=[ident.node_id], topic="room")
    assert sizes(h) == (1, 1, 1)
    r = await w.request({"t": "unwatch", "id": rid(), "nodes": [ident.node_id]})
    assert r["t"] == "ok" and set(r) == {"t", "id"}
    assert sizes(h) == (0, 1, 1)
    x = await RawNode.connect(h, ident)
    await no_frame(w)
    # Unwatching what is not watched is no error.
    r = await w.request({"t": "unwatch", "id": rid(), "nodes": [ident.node_id],
                         "topic": "room"})
    assert r["t"] == "ok"
    assert sizes(h) == (0, 0, 0)
    await x.request({"t": "sub", "id": rid(), "topic": "room"})
    await no_frame(w)


async def test_max_watch_counts_nodes_and_topics_together(make_hub):
    h = await make_hub(**{"limits.max_watch": 3})
    w = await RawNode.connect(h)
    ids = [Identity.generate().node_id for _ in range(4)]
    r = await watch(w, nodes=ids[:2], topic="t1")
    assert r["t"] == "ok" and r["online"] == {ids[0]: False, ids[1]: False}
    # What is watched already does not count again.
    assert (await watch(w, nodes=ids[:2], topic="t1"))["t"] == "ok"
    r = await watch(w, nodes=[ids[0], ids[3]])
    assert (r["t"], r["code"]) == ("error", "limit_exceeded")
    r = await watch(w, topic="t2")
    assert (r["t"], r["code"]) == ("error", "limit_exceeded")
    assert sizes(h) == (2, 1, 1)  # nothing changed
    # Without an id the refusal still comes, with a nil id.
    await w.send({"t": "watch", "nodes": [ids[3]]})
    f = await w.recv()
    assert (f["t"], f["code"], f["id"]) == ("error", "limit_exceeded", None)
    await w.request({"t": "unwatch", "id": rid(), "topic": "t1"})
    assert (await watch(w, nodes=[ids[3]]))["t"] == "ok"
    assert sizes(h) == (3, 0, 1)
    # One request over the limit by itself.
    w2 = await RawNode.connect(h)
    r = await watch(w2, nodes=ids)
    assert (r["t"], r["code"]) == ("error", "limit_exceeded")
    assert (await watch(w2, nodes=ids[:3]))["t"] == "ok"


async def test_bad_watch_frames(make_hub):
    h = await make_hub()
    w = await RawNode.connect(h)
    good = Identity.generate().node_id
    for fields in ({"nodes": ["not a node id"]}, {"nodes": [good, 7]}, {"nodes": good},
                   {"nodes": [good, "x" * 129]}, {}, {"topic": "bad topic"},
                   {"topic": 5}, {"nodes": None, "topic": None}):
        for t in ("watch", "unwatch"):
            r = await w.request({"t": t, "id": rid(), **fields})
            assert (r["t"], r["code"]) == ("error", "bad_frame"), (t, fields, r)
    assert sizes(h) == (0, 0, 0)
    # Without id: no ok, and the events still come.
    await w.send({"t": "watch", "nodes": [good, good]})
    await eventually(lambda: sizes(h) == (1, 0, 1))
    await no_frame(w)


async def test_topic_watch_join_leave_and_disconnect(make_hub):
    h = await make_hub()
    w = await RawNode.connect(h)
    r = await watch(w, topic="room")
    assert r["t"] == "ok" and "online" not in r
    s = await RawNode.connect(h)
    assert (await s.request({"t": "sub", "id": rid(), "topic": "room"}))["t"] == "ok"
    e = await event(w)
    assert (e["node"], e["online"], e["topic"]) == (s.node_id, True, "room")
    # A repeated sub is no new join; another topic is not watched.
    await s.request({"t": "sub", "id": rid(), "topic": "room"})
    await s.request({"t": "sub", "id": rid(), "topic": "hall"})
    await no_frame(w)
    await s.request({"t": "unsub", "id": rid(), "topic": "room"})
    e = await event(w)
    assert (e["node"], e["online"], e["topic"]) == (s.node_id, False, "room")
    await s.request({"t": "sub", "id": rid(), "topic": "room"})
    assert (await event(w))["online"] is True
    await s.close()
    e = await event(w)
    assert (e["node"], e["online"], e["topic"]) == (s.node_id, False, "room")
    # The watcher's own subscription is not reported to itself.
    await w.request({"t": "sub", "id": rid(), "topic": "room"})
    await no_frame(w)
    # No snapshot: watching a topic with subscribers says nothing about them.
    w2 = await RawNode.connect(h)
    r = await watch(w2, topic="room")
    assert r["t"] == "ok"
    await no_frame(w2)
    await w.close()
    e = await event(w2)
    assert (e["node"], e["online"], e["topic"]) == (w.node_id, False, "room")


async def test_topic_watch_outside_the_token_claim_is_forbidden(make_hub):
    h = await make_hub(**{"auth.jwt_secret": SECRET})
    token, _ = TokenIssuer(secret=SECRET).issue("n1", 60, topics=["a/*"])
    node = await RawNode.connect(h, token=token)
    other = Identity.generate().node_id
    r = await watch(node, topic="b/x", nodes=[other])
    assert (r["t"], r["code"]) == ("error", "forbidden")
    assert sizes(h) == (0, 0, 0)
    r = await watch(node, topic="a/x", nodes=[other])
    assert r["t"] == "ok" and r["online"] == {other: False}
    # Nodes are not limited by the claim (§2.4: it limits topics).
    assert (await watch(node, nodes=["n2"]))["t"] == "ok"


async def test_a_watcher_that_disconnects_leaves_the_registry(make_hub):
    h = await make_hub()
    watched = await RawNode.connect(h)
    watchers = [await RawNode.connect(h) for _ in range(3)]
    for i, w in enumerate(watchers):
        await watch(w, nodes=[watched.node_id, Identity.generate().node_id],
                    topic=f"t{i % 2}")
    assert sizes(h) == (4, 2, 3)
    await watchers[0].close()
    await eventually(lambda: sizes(h) == (3, 2, 2))
    await watchers[1].close()
    await eventually(lambda: sizes(h) == (2, 1, 1))
    await watchers[2].close()
    await eventually(lambda: sizes(h) == (0, 0, 0))
    await watched.close()


async def test_many_watchers_of_one_node(make_hub):
    h = await make_hub()
    ident = Identity.generate()
    watchers = await asyncio.gather(*(RawNode.connect(h) for _ in range(40)))
    oks = await asyncio.gather(*(watch(w, nodes=[ident.node_id]) for w in watchers))
    assert all(r["online"] == {ident.node_id: False} for r in oks)
    assert sizes(h) == (1, 0, 40)
    x = await RawNode.connect(h, ident)
    events = await asyncio.gather(*(event(w) for w in watchers))
    assert {(e["node"], e["online"]) for e in events} == {(ident.node_id, True)}
    await x.close()
    events = await asyncio.gather(*(event(w) for w in watchers))
    assert {(e["node"], e["online"]) for e in events} == {(ident.node_id, False)}
    await asyncio.gather(*(w.close() for w in watchers))
    await eventually(lambda: sizes(h) == (0, 0, 0))


async def test_watching_oneself_and_batches(make_hub):
    """A watch in a batch with other frames is handled in order; a node may watch
    itself (it is online while it asks)."""
    h = await make_hub()
    w = await RawNode.connect(h)
    await w.send([{"t": "sub", "id": 1, "topic": "x"},
                  {"t": "watch", "id": 2, "nodes": [w.node_id], "topic": "x"},
                  {"t": "unwatch", "id": 3, "topic": "x"}])
    got = [await w.recv() for _ in range(3)]
    assert [(f["t"], f["id"]) for f in got] == [("ok", 1), ("ok", 2), ("ok", 3)]
    assert got[1]["online"] == {w.node_id: True}
    assert sizes(h) == (1, 0, 1)


def test_max_watch_config() -> None:
    """limits.max_watch (§7): default 1000, at least 1, named when wrong."""
    from openred.hub.config import ConfigError, load_config

    assert load_config(None, env={}).limits.max_watch == 1000
    cfg = load_config(None, env={"OPENRED_HUB_LIMITS_MAX_WATCH": "5"})
    assert cfg.limits.max_watch == 5
    for bad in (0, -1, "many", 1.5):
        with pytest.raises(ConfigError, match=r"limits\.max_watch"):
            load_config(None, env={}, overrides={"limits.max_watch": bad})
