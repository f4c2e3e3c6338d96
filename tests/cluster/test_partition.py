"""Partitions: real hub processes, a private real Redis the test kills and
restarts or reaches through a `LinkProxy` it breaks (tests/cluster/proxy.py), real
PostgreSQL (one schema per test). Each scenario counts what was sent, `ok`'d and
delivered (duplicates, order) and the sessions per node, prints the counts, and asserts
zero loss of `ok`'d QoS 1 messages, one session per node and no flapping.

- An instance cut off from Redis accepts QoS 1 for nodes online on another instance,
  then is restarted (SIGTERM, or SIGKILL) before its link is back: docs/protocol.md §5,
  §11 "Cluster" (durable delivery hints, hub/resync.py).
- A node's link to one instance goes silent during a Redis outage and the node comes
  back on another: §2, one session per node (hub/claims.py).
- A Redis endpoint that accepts and resets: no "up" without a PING, a bounded reconnect
  rate (hub/broker_redis_shards.py).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
import pytest
from openred.protocol.identity import Identity
from websockets.exceptions import ConnectionClosed

from tests.cluster.conftest import (
    ADMIN_TOKEN,
    ClusterFactory,
    HubProcess,
    RedisServer,
    eventually,
)
from tests.cluster.proxy import LinkProxy
from tests.cluster.test_cluster import rid
from tests.conftest import timeout
from tests.hub.nodes import RawNode

pytestmark = pytest.mark.slow



@dataclass
class Via:
    """Something `RawNode.connect` can dial: a proxy in front of a hub."""

    ws_port: int


async def until_online(node: RawNode, *ids: str, wait: float = 5.0) -> None:
    async def check() -> bool:
        r = await node.request({"t": "presence", "id": rid(), "nodes": list(ids)})
        return bool(r["t"] == "ok" and all(r["online"][i] is True for i in ids))

    await eventually(check, wait, what=f"presence of {len(ids)} nodes")


async def until_broker_down(node: RawNode, to: str) -> None:
    """Until `node`'s instance knows its broker is gone: a cross-instance QoS 0 with an
    id fails fast with `unavailable` (§5)."""

    async def down() -> bool:
        r = await node.request({"t": "send", "id": rid(), "to": to, "body": b"probe"})
        return bool(r["t"] == "error" and r["code"] == "unavailable")

    await eventually(down, 5.0, every=0.1, what="broker down")


async def until_broker_back(hub: HubProcess, wait: float = 10.0) -> None:
    """Until `hub`'s `/readyz` says `ok`: its own broker connections are up again
    (`degraded` while they are not)."""
    async with aiohttp.ClientSession() as http:
        async def back() -> bool:
            async with http.get(f"{hub.admin}/readyz") as r:
                return bool(r.status == 200 and (await r.json())["status"] == "ok")

        await eventually(back, wait, every=0.1, what=f"{hub.name}'s broker back")


async def send_stored(sender: RawNode, to: str, body: bytes) -> str:
    r = await sender.request({"t": "send", "id": rid(), "to": to, "body": body, "qos": 1})
    assert r["t"] == "ok" and r["status"] == "stored", r
    return str(r["mid"])


async def wait_live(hub: HubProcess, wait: float = 20.0) -> None:
    """Until `/healthz` answers (the process serves; `/readyz` may say the broker is
    down, which is the point here)."""
    assert hub.proc is not None
    deadline = asyncio.get_running_loop().time() + timeout(wait)
    async with aiohttp.ClientSession() as http:
        while True:
            assert hub.proc.poll() is None, hub.log.read_text()[-3000:]
            try:
                async with http.get(f"{hub.admin}/healthz") as r:
                    if r.status == 200:
                        return
            except (OSError, aiohttp.ClientError):
                pass
            assert asyncio.get_running_loop().time() < deadline, "hub not serving"
            await asyncio.sleep(0.05)


async def holders(hubs: list[HubProcess], node_id: str) -> list[str]:
    """The instances whose admin API says they hold a session of `node_id`."""
    out = []
    async with aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as http:
        for h in hubs:
            async with http.get(f"{h.admin}/v1/nodes/{node_id}") as r:
                assert r.status == 200, await r.text()
                view = await r.json()
            if view["instance"] is not None:
                out.append(view["instance"])
    return out


class Inbox:
    """What one node received: QoS 1 mids in arrival order (acked as they come)."""

    def __init__(self, node: RawNode) -> None:
        self.node = node
        self.mids: list[str] = []
        self.closed: int | None = None
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                f = await self.node.recv(120)
                if f["t"] == "msg" and f["qos"] == 1:
                    self.mids.append(f["mid"])
                    await self.node.send({"t": "ack", "mid": f["mid"]})
        except ConnectionClosed as exc:
            self.closed = exc.rcvd.code if exc.rcvd is not None else None
        except TimeoutError:
            pass

    def duplicates(self) -> int:
        return len(self.mids) - len(set(self.mids))

    async def stop(self) -> None:
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass


def out_of_order(expected: list[str], got: list[str]) -> int:
    """How many of `expected` (one sender's mids to one node, in send order) arrived,
    at their first arrival, after a later one."""
    first = list(dict.fromkeys(m for m in got if m in set(expected)))
    rank = {m: i for i, m in enumerate(expected)}
    late, top = 0, -1
    for m in first:
        if rank[m] < top:
            late += 1
        top = max(top, rank[m])
    return late


def log_count(hub: HubProcess, text: str, since: int = 0) -> int:
    return hub.log.read_text()[since:].count(text)


# -- (a) accepted while cut off, then restarted ------------------------------------------


async def test_ready_only_once_its_own_broker_connections_are_back(
        make_cluster: ClusterFactory, redis_server: RedisServer) -> None:
    """An instance cut off from Redis long enough for its reconnect backoff to grow
    answers `/readyz` `degraded`; once the link is back, it says `ok` only when it can
    use Redis again, not as soon as a fresh connection would answer while its own are
    still waiting out the backoff. Polled every 50 ms from the moment the link is back,
    each `/readyz` followed by an admin read that needs Redis (presence of a node on
    the other instance): never `ok` with that read refused."""
    link = LinkProxy("127.0.0.1", redis_server.port)
    await link.start()
    try:
        h1 = (await make_cluster(1, broker_url=link.url()))[0]
        h2 = (await make_cluster(1, broker_url=redis_server.url))[0]
        node = await RawNode.connect(h2)
        link.set_mode("reset")
        await asyncio.sleep(4.0)  # the backoff doubles to RECONNECT_MAX_S (2 s, jittered)
        seen: list[tuple[str, int]] = []
        async with aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as http:

            async def probe() -> tuple[str, int]:
                async with http.get(f"{h1.admin}/readyz") as r:
                    ready = (await r.json())["status"]
                async with http.get(f"{h1.admin}/v1/nodes/{node.node_id}") as r:
                    return ready, r.status

            assert await probe() == ("degraded", 503)
            link.set_mode("forward")
            deadline = time.monotonic() + timeout(10.0)
            while not seen or seen[-1] != ("ok", 200):
                assert time.monotonic() < deadline, seen
                seen.append(await probe())
                await asyncio.sleep(0.05)
        print(f"\n[readyz] probes after the link came back: {len(seen)}, "
              f"first ok at probe {[r for r, _ in seen].index('ok') + 1}")
        assert ("ok", 503) not in seen, seen
        await node.close()
    finally:
        await link.close()


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
async def test_accepted_while_cut_off_reaches_online_nodes_after_a_restart(
        make_cluster: ClusterFactory, redis_server: RedisServer, stop: str) -> None:
    """§5, §11: instance 1 is cut off from Redis (only its link: instance 2 never sees
    an outage) and accepts 240 QoS 1 messages for 6 nodes online on instance 2, then is
    restarted (SIGTERM, or SIGKILL) while still cut off. Once its link is back (or
    sooner: the marks are in the shared store) every `ok`'d message reaches its online
    recipient on the same session, within seconds, each sender's in order."""
    t_start = time.monotonic()
    link = LinkProxy("127.0.0.1", redis_server.port)
    await link.start()
    try:
        c1 = await make_cluster(1, broker_url=link.url())
        c2 = await make_cluster(1, broker_url=redis_server.url)
        h1, h2 = c1[0], c2[0]
        senders = [await RawNode.connect(h1) for _ in range(2)]
        nodes = [await RawNode.connect(h2) for _ in range(6)]
        ids = [n.node_id for n in nodes]
        await until_online(senders[0], *ids)
        inboxes = {n.node_id: Inbox(n) for n in nodes}

        link.set_mode("reset")
        await until_broker_down(senders[0], ids[0])
        sent = 0
        stored: dict[tuple[int, str], list[str]] = {}  # (sender, recipient) -> mids
        for k in range(20):
            for j, s in enumerate(senders):
                for to in ids:
                    sent += 1
                    stored.setdefault((j, to), []).append(
                        await send_stored(s, to, b"%d-%d" % (j, k)))
        oked = sum(len(v) for v in stored.values())
        t_cut_done = time.monotonic()

        if stop == "sigterm":
            await h1.stop()
        else:
            h1.kill()
        h1.spawn()
        await wait_live(h1)
        await asyncio.sleep(2.5)  # still cut off: its reconnects back off meanwhile
        early = sum(len(set(i.mids)) for i in inboxes.values())

        link.set_mode("forward")
        t_back = time.monotonic()

        def delivered() -> int:
            return sum(len(set(inboxes[to].mids) & set(mids))
                       for (_, to), mids in stored.items())

        async def all_delivered() -> bool:
            return delivered() == oked

        await eventually(all_delivered, 10.0, every=0.05, what="every ok'd message")
        after_s = time.monotonic() - t_back
        await asyncio.sleep(0.5)  # duplicates, if any, would come now
        late = sum(out_of_order(mids, inboxes[to].mids) for (_, to), mids in stored.items())
        dups = sum(i.duplicates() for i in inboxes.values())
        # Instance 2 may have delivered everything from the marks (its scan) before
        # instance 1's own reconnect backoff (up to 2 s) ended; instance 1's admin API
        # answers presence only with its broker up (503 until then), so wait for it.
        await until_broker_back(h1)
        sessions = {n.node_id: await holders([h1, h2], n.node_id) for n in nodes}
        print(f"\n[{stop}] sent={sent} ok={oked} delivered={delivered()} "
              f"before_link_back={early} duplicates={dups} out_of_order={late} "
              f"all_in={after_s:.2f}s_after_link_back (cut for "
              f"{t_back - t_cut_done:.1f}s after the last ok) "
              f"sessions_per_node={sorted({len(v) for v in sessions.values()})} "
              f"test={time.monotonic() - t_start:.1f}s")
        assert delivered() == oked == sent
        assert after_s < timeout(6.0)
        assert late == 0 and dups == 0
        assert all(v == [h2.instance_id] for v in sessions.values()), sessions
        assert all(i.closed is None for i in inboxes.values())  # never reconnected
        for i in inboxes.values():
            await i.stop()
    finally:
        await link.close()


# -- (b) one session per node after a partition ---------------------------------------


@pytest.mark.parametrize("outage", ["redis", "link"])
async def test_one_session_per_node_after_a_partition(
        make_cluster: ClusterFactory, redis_server: RedisServer, outage: str) -> None:
    """§2 after a partition: a node's link to instance 2 goes silent while Redis is
    down ("redis": killed, restarted empty) or while only instance 2 is cut off from
    Redis ("link": instance 1's claim goes through, its `replace` never reaches
    instance 2), and the node comes back on instance 1. Once Redis is reachable again,
    within seconds, the old session is replaced (`bye replaced`, 4010), the newer stays,
    presence and both admin APIs show one instance; what a sender on instance 2 sent
    meanwhile (written into the dead link) and afterwards reaches the live session,
    none of the later ones the dead one."""
    t_start = time.monotonic()
    redis_link = LinkProxy("127.0.0.1", redis_server.port)
    await redis_link.start()
    c1 = await make_cluster(1, broker_url=redis_server.url)
    c2 = await make_cluster(1, broker_url=redis_link.url())
    h1, h2 = c1[0], c2[0]
    link = LinkProxy("127.0.0.1", h2.ws_port)
    await link.start()
    try:
        ident = Identity.generate()
        x = ident.node_id
        old = await RawNode.connect(Via(link.port), ident)
        sender = await RawNode.connect(h2)
        watcher = await RawNode.connect(h1)
        await until_online(watcher, x, sender.node_id)
        first = await send_stored(sender, x, b"before")
        assert (await old.recv_type("msg"))["mid"] == first
        await old.send({"t": "ack", "mid": first})

        if outage == "redis":
            redis_server.kill()
        else:
            redis_link.set_mode("reset")
        link.set_mode("blackhole")
        await until_broker_down(sender, watcher.node_id)
        new = await RawNode.connect(h1, ident)  # its claim's replace cannot reach h2
        live = Inbox(new)
        during = [await send_stored(sender, x, b"during-%d" % i) for i in range(20)]
        assert await holders([h1, h2], x) == [h1.instance_id, h2.instance_id]

        if outage == "redis":
            await redis_server.restart()
        else:
            redis_link.set_mode("forward")
        t_back = time.monotonic()

        async def one_holder() -> bool:
            return await holders([h1, h2], x) == [h1.instance_id]

        await eventually(one_holder, 10.0, every=0.1, what="one session")
        replaced_s = time.monotonic() - t_back
        await until_online(sender, x)
        after = [await send_stored(sender, x, b"after-%d" % i) for i in range(200)]

        async def all_live() -> bool:
            return set(during + after) <= set(live.mids)

        await eventually(all_live, 10.0, every=0.05, what="every message at the live session")
        all_in_s = time.monotonic() - t_back
        await asyncio.sleep(0.5)
        views = await holders([h1, h2], x)
        r = await sender.request({"t": "presence", "id": rid(), "nodes": [x]})
        online = r["online"][x]

        # The silent link heals: the old session's last words were `bye replaced`, 4010.
        link.set_mode("forward")
        code, frames = await old.closed(10)
        dead = [f["mid"] for f in frames if f["t"] == "msg"]
        dups = live.duplicates()
        late = out_of_order(during + after, live.mids)
        print(f"\n[{outage}] sent={1 + len(during) + len(after)} ok={1 + len(during) + len(after)} "
              f"delivered={1 + len(set(live.mids) & set(during + after))} (1 to the old "
              f"session before the cut, acked; the rest to the live one) "
              f"written_to_dead_link={len(dead)} (during={len(set(dead) & set(during))} "
              f"after={len(set(dead) & set(after))}) duplicates={dups} out_of_order={late} "
              f"replaced_in={replaced_s:.2f}s all_in={all_in_s:.2f}s "
              f"sessions_per_node={len(views)} old_close={code} "
              f"test={time.monotonic() - t_start:.1f}s")
        assert code == 4010 and {"t": "bye", "reason": "replaced"} in frames, (code, frames)
        assert replaced_s < timeout(5.0)
        assert views == [h1.instance_id] and online is True
        assert live.closed is None  # the newer session stays
        assert not set(dead) & set(after)
        assert dups == 0 and late == 0
        await live.stop()
    finally:
        await link.close()
        await redis_link.close()


# -- (c) a flapping Redis endpoint -------------------------------------------------------


async def test_a_redis_endpoint_that_resets_does_not_flap_the_hub(
        make_cluster: ClusterFactory, redis_server: RedisServer) -> None:
    """An endpoint that accepts TCP and resets it at once (Redis crashing on every
    connect, a balancer without a backend) must not make the hub flap: no "redis back"
    without a PING answered, a reconnect rate that falls to one every 2 s (not ten a
    second), local routing on throughout, and one "redis back" when Redis answers
    again, with cross-instance routing back within seconds."""
    t_start = time.monotonic()
    link = LinkProxy("127.0.0.1", redis_server.port)
    await link.start()
    try:
        c1 = await make_cluster(1, broker_url=link.url(), log_level="info")
        c2 = await make_cluster(1, broker_url=redis_server.url)
        h1, h2 = c1[0], c2[0]
        a = await RawNode.connect(h1)
        b = await RawNode.connect(h1)
        z = await RawNode.connect(h2)
        await until_online(a, z.node_id)
        mark = len(h1.log.read_text())

        link.set_mode("reset")
        await until_broker_down(a, z.node_id)
        before = link.accepted
        window = 8.0
        t0 = time.monotonic()
        sent = oked = 0
        while time.monotonic() - t0 < window:
            sent += 1
            r = await a.request({"t": "send", "id": rid(), "to": b.node_id, "body": b"l"})
            oked += r["t"] == "ok"
            await asyncio.sleep(0.1)
        attempts = link.accepted - before
        ups = log_count(h1, "event=broker_up", mark)
        lost = log_count(h1, "event=broker_down", mark)
        got = 0
        try:
            while True:
                f = await b.recv(0.2)
                got += f["t"] == "msg"
        except TimeoutError:
            pass

        link.set_mode("forward")
        t_back = time.monotonic()

        async def routed() -> bool:
            r = await a.request({"t": "send", "id": rid(), "to": z.node_id, "body": b"x"})
            return bool(r["t"] == "ok")

        await eventually(routed, 6.0, every=0.1, what="cross-instance routing")
        back_s = time.monotonic() - t_back
        await asyncio.sleep(0.5)
        ups_after = log_count(h1, "event=broker_up", mark)
        print(f"\nreset window {window:.0f}s: connections={attempts} "
              f"({attempts / window:.1f}/s) redis_back={ups} connection_lost={lost} "
              f"local sent={sent} ok={oked} delivered={got}; routing back in {back_s:.2f}s, "
              f"redis_back after={ups_after} test={time.monotonic() - t_start:.1f}s")
        assert ups == 0 and lost == 1
        # Two connections per attempt, waits growing to 2 s: about a dozen attempts.
        assert attempts <= 30, attempts
        assert oked == got == sent
        assert back_s < timeout(4.5)
        assert ups_after == 1
    finally:
        await link.close()
