"""Topic order with publishers on two instances (docs/protocol.md §6).

Each instance used to deliver its own publications to its local subscribers as soon as
they were stored, while a lower `seq` published on the other instance came later through
Redis: subscribers saw sequences out of order, and one that reconnected with `since` =
the highest seq it had handled (the client rule) silently missed messages while `sub`
answered `recovered: true`. Real hub processes, real Redis and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time

import aiohttp

from tests.cluster.conftest import ClusterFactory, RedisServer, eventually
from tests.conftest import timeout
from tests.hub.nodes import RawNode


async def _publish(node: RawNode, topic: str, n: int, tag: int, done: list[int]) -> None:
    """`n` publications, a few in flight at a time; the seq of each ok in `done`."""
    window = 8
    sent = 0
    acked = 0
    while acked < n:
        while sent < n and sent - acked < window:
            await node.send({"t": "pub", "id": sent, "topic": topic,
                             "body": bytes([tag]) + sent.to_bytes(4, "big")})
            sent += 1
        f = await node.recv(10)
        if f["t"] == "ok":
            done.append(f["seq"])
            acked += 1
            await asyncio.sleep(0.003)  # paced: the other subscriber reconnects meanwhile
        else:
            assert f["t"] == "msg", f


async def test_two_publishers_on_two_instances_arrive_in_seq_order(
        make_cluster: ClusterFactory) -> None:
    """A subscriber that never disconnects sees every seq once, in order; a subscriber
    that reconnects every ~150 ms with `since` = the highest seq it handled gets every
    seq once, and `recovered: true` never hides a gap."""
    c = await make_cluster(2, store_topic_history="100000")
    topic = "order/two-publishers"
    steady = await RawNode.connect(c[0])
    r = await steady.request({"t": "sub", "id": 1, "topic": topic})
    assert r["t"] == "ok"
    pubs = [await RawNode.connect(c[0]), await RawNode.connect(c[1])]
    await asyncio.sleep(0.3)  # the subscription reaches Redis
    per = 400
    seqs: list[list[int]] = [[], []]
    publishing = asyncio.gather(*(_publish(p, topic, per, j, seqs[j])
                                  for j, p in enumerate(pubs)))

    # The reconnecting subscriber, on alternating instances.
    handled: list[int] = []
    gaps_hidden = 0
    reconnects = 0
    since = 0
    deadline = time.monotonic() + timeout(60)
    rng = random.Random(7)
    while time.monotonic() < deadline:
        node = await RawNode.connect(c[reconnects % 2])
        reconnects += 1
        r = await node.request({"t": "sub", "id": "s", "topic": topic, "since": since})
        assert r["t"] == "ok", r
        first_after = None
        stop = time.monotonic() + rng.uniform(0.05, 0.25)
        try:
            while time.monotonic() < stop:
                f = await node.recv(max(0.01, stop - time.monotonic()))
                if f["t"] == "msg":
                    if first_after is None:
                        first_after = f["seq"]
                        if r["recovered"] and first_after != since + 1:
                            gaps_hidden += 1
                    handled.append(f["seq"])
                    since = max(since, f["seq"])
        except TimeoutError:
            pass
        await node.ws.close()
        if publishing.done() and since >= 2 * per:
            break
    await publishing
    assert sorted(seqs[0] + seqs[1]) == list(range(1, 2 * per + 1))

    got: list[int] = []
    while len(got) < 2 * per:
        f = await steady.recv(10)
        if f["t"] == "msg":
            got.append(f["seq"])
    out_of_order = sum(1 for a, b in itertools.pairwise(got) if b <= a)
    missing = sorted(set(range(1, 2 * per + 1)) - set(handled))
    dups = len(handled) - len(set(handled))
    print(f"published {2 * per} from two instances; steady subscriber: {len(got)} "
          f"received, {out_of_order} out of order; reconnecting subscriber: "
          f"{reconnects} sessions, {len(set(handled))} distinct, {len(missing)} missing, "
          f"{dups} duplicates, {gaps_hidden} gaps reported as recovered; missing: {missing[:10]}")
    assert out_of_order == 0 and got == list(range(1, 2 * per + 1))
    assert gaps_hidden == 0
    assert missing == [] and dups == 0
    for n in (steady, *pubs):
        await n.close()



async def test_topics_keep_working_while_redis_is_down(make_cluster: ClusterFactory,
                                                       redis_server: RedisServer) -> None:
    """Degraded, not down: with Redis gone, publishers on both instances keep getting
    `ok` with sequence numbers from the store (no gap, no collision), subscribers get
    every publication in order (the other instance's from history), `/readyz` says
    `degraded`; when Redis is back nothing has to reconnect."""
    c = await make_cluster(2, broker_url=redis_server.url)
    topic = "order/outage"
    subs = [await RawNode.connect(c[0]), await RawNode.connect(c[1])]
    for s in subs:
        assert (await s.request({"t": "sub", "id": 1, "topic": topic}))["t"] == "ok"
    pubs = [await RawNode.connect(c[0]), await RawNode.connect(c[1])]
    await asyncio.sleep(0.3)

    redis_server.kill()
    async with aiohttp.ClientSession() as http:
        for h in c.hubs:
            async with http.get(f"{h.admin}/readyz") as resp:
                assert resp.status == 200
                assert await resp.json() == {"status": "degraded", "failed": ["broker"]}
    per = 30
    seqs: list[list[int]] = [[], []]
    await asyncio.gather(*(_publish(p, topic, per, j, seqs[j]) for j, p in enumerate(pubs)))
    assert sorted(seqs[0] + seqs[1]) == list(range(1, 2 * per + 1))

    async def collect(node: RawNode, n: int) -> list[int]:
        got: list[int] = []
        while len(got) < n:
            f = await node.recv(15)
            if f["t"] == "msg":
                got.append(f["seq"])
        return got

    # Each subscriber is on the instance of one publisher: the other's publications
    # reach it from history, in order, while Redis is still down (the publisher's own
    # are not sent back to it; the subscribers are other nodes, so they get all).
    during = await asyncio.gather(*(collect(s, 2 * per) for s in subs))
    assert during == [list(range(1, 2 * per + 1))] * 2

    await redis_server.restart()
    async with aiohttp.ClientSession() as http:

        async def ready() -> bool:
            for h in c.hubs:
                async with http.get(f"{h.admin}/readyz") as resp:
                    if (await resp.json())["status"] != "ok":
                        return False
            return True

        await eventually(ready, 10.0, every=0.2, what="readyz ok after Redis is back")
    r = await pubs[1].request({"t": "pub", "id": "after", "topic": topic, "body": b"x"})
    assert r["t"] == "ok" and r["seq"] == 2 * per + 1, r
    after = await asyncio.gather(*(collect(s, 1) for s in subs))
    print(f"outage: {2 * per} published on two instances, seqs 1..{2 * per} with no gap "
          f"or collision; each subscriber got all in order; after Redis: {after}")
    assert after == [[2 * per + 1]] * 2
