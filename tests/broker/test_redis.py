"""What only the Redis broker has: a Redis that goes away and comes back (a private
redis-server killed and restarted on the same port), and a Redis Cluster's key and
channel spread over its masters (a real local 3-master cluster)."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis
from openred.hub.broker import BrokerUnavailable
from openred.hub.broker_redis import RedisBroker, parse_redis_url

from tests.broker.conftest import LocalCluster, Recorder, need_cluster, until
from tests.cluster.conftest import RedisServer
from tests.conftest import timeout

pytestmark = pytest.mark.slow


async def started(url: str, hub_id: str, name: str) -> tuple[Any, Recorder]:
    b = RedisBroker(url, hub_id=hub_id)
    rec = Recorder(name)
    await b.start(name, rec)
    return b, rec


def test_broker_url_forms() -> None:
    assert parse_redis_url("redis://h:1/0") == ("redis://h:1/0", False)
    assert parse_redis_url("rediss://u:p@h:1/0?cluster=true") == ("rediss://u:p@h:1/0", True)
    assert parse_redis_url("redis://h:1?cluster=false&ssl_cert_reqs=none") == (
        "redis://h:1?ssl_cert_reqs=none", False)
    with pytest.raises(ValueError, match=r"broker\.url"):
        parse_redis_url("redis://h:1?cluster=maybe")


async def test_redis_restart(redis_server: RedisServer) -> None:
    """Redis killed: calls fail fast with BrokerUnavailable (no waiting on timeouts).
    Restarted on the same port: the brokers reconnect and subscribe again by
    themselves, routing resumes within 5 s."""
    hub_id = f"rr{secrets.token_hex(4)}"
    a, _ra = await started(redis_server.url, hub_id, "a")
    b, rb = await started(redis_server.url, hub_id, "b")
    try:
        await b.claim("n1", "s-b")
        rb.local["n1"] = object()
        await b.interest("room", True)
        assert await a.publish_to_node("n1", b"before", 0, "m0") is True

        redis_server.kill()
        t0 = time.monotonic()

        async def fails() -> bool:
            try:
                await a.publish_to_node("n1", b"x", 0, "m")
            except BrokerUnavailable:
                return True
            return False

        assert await fails()
        assert time.monotonic() - t0 < timeout(2.0)
        for call in (a.presence(["n1"]), a.ping(), b.claim("n2", "s2")):
            with pytest.raises(BrokerUnavailable):
                await call
        rb.local["n2"] = object()  # the session goes on locally
        assert time.monotonic() - t0 < timeout(3.0)

        await redis_server.restart()
        t0 = time.monotonic()

        async def routed() -> bool:
            try:
                return await a.publish_to_node("n1", b"after", 0, "m1")
            except BrokerUnavailable:
                return False

        while not await routed():
            assert time.monotonic() - t0 < timeout(5.0), "routing did not resume in 5 s"
            await asyncio.sleep(0.05)
        await until(lambda: ("n1", b"after", 0, "m1") in rb.node_frames, what="delivery")
        # The node that connected while Redis was down is reachable now too.
        assert await a.publish_to_node("n2", b"late", 0, "m2") is True
        await until(lambda: ("n2", b"late", 0, "m2") in rb.node_frames, what="delivery")
        assert (await a.presence(["n1"]))["n1"] is True
        await a.publish_to_topic("room", 4, b"topic")
        await until(lambda: ("room", 4, b"topic") in rb.topic_frames, what="topic")
    finally:
        t0 = time.monotonic()
        await a.close()
        await b.close()
        assert time.monotonic() - t0 < timeout(3.0)


class UpCounter(Recorder):
    """A handler that counts the broker's down-to-up transitions."""

    ups = 0

    def on_broker_up(self) -> None:
        self.ups += 1


async def test_up_only_after_ping_and_backoff_grows(redis_server: RedisServer) -> None:
    """A shard is up once Redis answers PING on its new connections, not on a TCP
    connect: an endpoint that accepts and resets, or accepts and says nothing, is never
    "back". While connections keep failing the reconnect wait grows (capped at 2 s, not
    reset by each connect): a few connections in 6 s, not dozens. Once Redis answers
    again the broker is up within the cap, and says so once."""
    from tests.cluster.proxy import LinkProxy

    proxy = LinkProxy("127.0.0.1", redis_server.port)
    await proxy.start()
    b = RedisBroker(proxy.url(), hub_id=f"hp{secrets.token_hex(4)}")
    rec = UpCounter("b")
    await b.start("b", rec)
    try:
        assert b.up and rec.ups == 1
        ups: list[bool] = []
        proxy.set_mode("reset")
        await until(lambda: not b.up, what="down")
        before = proxy.accepted
        t0 = time.monotonic()
        while time.monotonic() - t0 < 6.0:
            ups.append(b.up)
            await asyncio.sleep(0.01)
        attempts = proxy.accepted - before
        print(f"\nreset endpoint: {attempts} connections in 6 s, up {sum(ups)} times")
        assert not any(ups) and rec.ups == 1
        # Two connections per attempt; waits of 0.05..2 s growing: at most ~12 attempts.
        assert attempts <= 24, attempts

        proxy.set_mode("blackhole")  # accepts, never answers
        await asyncio.sleep(4.0)
        assert not b.up and rec.ups == 1

        proxy.set_mode("forward")
        t0 = time.monotonic()
        await until(lambda: b.up, wait=6.0, what="up again")
        print(f"up {time.monotonic() - t0:.2f} s after redis answered again")
        assert time.monotonic() - t0 < timeout(4.5)  # a 2 s wait + a PING timeout
        assert rec.ups == 2
        await b.claim("n1", "s1")
        assert (await b.presence(["n1"]))["n1"] is True  # routing works again
    finally:
        await b.close()
        await proxy.close()


async def test_close_is_prompt_while_redis_is_down(redis_server: RedisServer) -> None:
    b, _ = await started(redis_server.url, f"cd{secrets.token_hex(4)}", "b")
    await b.claim("n1", "s")
    redis_server.kill()
    await asyncio.sleep(0.3)
    t0 = time.monotonic()
    await b.close()
    assert time.monotonic() - t0 < timeout(2.0)


async def test_cluster_spreads_keys_and_channels_over_every_master(
        redis_cluster: LocalCluster | str) -> None:
    """No hash-slot skew: owner keys and the sharded node and topic
    channels of one hub land on all three masters, evenly."""
    cluster = need_cluster(redis_cluster)
    hub_id = f"sp{secrets.token_hex(4)}"
    b, _ = await started(cluster.url, hub_id, "b")
    n = 300
    try:
        await asyncio.gather(*(b.claim(f"node-{i}", f"s{i}") for i in range(n)))
        await asyncio.gather(*(b.interest(f"room/{i}", True) for i in range(n)))
        keys, channels = [], []
        for port in cluster.ports:
            r = redis.Redis(port=port)
            try:
                keys.append(len([k async for k in r.scan_iter(match=f"openred:{hub_id}:*")]))
                channels.append(len(await r.execute_command(
                    "PUBSUB SHARDCHANNELS", f"openred:{hub_id}:*")))
            finally:
                await r.aclose()
        assert sum(keys) == n and sum(channels) == 2 * n, (keys, channels)
        for count in keys:
            assert 0.2 * n < count < 0.47 * n, (keys, channels)
        for count in channels:
            assert 0.2 * 2 * n < count < 0.47 * 2 * n, (keys, channels)
        # Presence asks each channel's own master.
        online = await b.presence([f"node-{i}" for i in range(n)] + ["nobody"])
        assert sum(online.values()) == n and online["nobody"] is False
    finally:
        await b.close()
        for port in cluster.ports:
            r = redis.Redis(port=port)
            try:
                for k in [k async for k in r.scan_iter(match=f"openred:{hub_id}:*")]:
                    await r.delete(k)
            finally:
                await r.aclose()


async def test_cluster_failover_moves_subscriptions_to_the_new_master(
        tmp_path: Path, redis_cluster: LocalCluster | str) -> None:
    """A master of a Cluster with replicas dies: once its replica has taken over, the
    broker reads the new slot map, drops the dead shard, subscribes the channels it
    held on the new master, and routing to those nodes works again."""
    need_cluster(redis_cluster)  # the binaries are there
    cluster = LocalCluster(tmp_path, replicas=1)
    cluster.start()
    hub_id = f"fo{secrets.token_hex(4)}"
    a, _ = await started(cluster.url, hub_id, "a")
    b, rb = await started(cluster.url, hub_id, "b")
    try:
        nodes = [f"node-{i}" for i in range(30)]
        for n in nodes:
            await b.claim(n, "s")
            rb.local[n] = object()
        assert all((await a.presence(nodes)).values())
        victim = b.shards.shard_for(b._node_channel(nodes[0])).name
        port = int(victim.rsplit(":", 1)[1])
        on_victim = [n for n in nodes if b.shards.shard_for(b._node_channel(n)).name == victim]
        cluster.kill(port)

        async def all_routed() -> bool:
            try:
                return all([await a.publish_to_node(n, b"x", 0, "m") for n in nodes])
            except BrokerUnavailable:
                return False

        t0 = time.monotonic()
        while not await all_routed():
            assert time.monotonic() - t0 < timeout(20.0), "no recovery after the failover"
            await asyncio.sleep(0.2)
        assert victim not in b.shards.by_name
        await until(lambda: {f[0] for f in rb.node_frames} >= set(on_victim),
                    what="frames for the nodes of the dead master")
        assert b.up and a.up
    finally:
        await a.close()
        await b.close()
        cluster.stop()



async def _move_slot(ports: list[int], key: str) -> None:
    """Give the slot of `key` (holding no keys) to another master, as the last step of
    a resharding does (`CLUSTER SETSLOT <slot> NODE <id>` on every master)."""
    clients = {p: redis.Redis(port=p) for p in ports}
    try:
        any_client = clients[ports[0]]
        slot = int(await any_client.execute_command("CLUSTER KEYSLOT", key))
        owner = next(int(r[2][1]) for r in await any_client.execute_command("CLUSTER SLOTS")
                     if int(r[0]) <= slot <= int(r[1]))
        target = next(p for p in ports if p != owner)
        target_id = await clients[target].execute_command("CLUSTER MYID")
        assert int(await clients[owner].execute_command("CLUSTER COUNTKEYSINSLOT", slot)) == 0
        for p in [target, owner] + [p for p in ports if p not in (target, owner)]:
            await clients[p].execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
    finally:
        for c in clients.values():
            await c.aclose()


async def test_cluster_slot_moved_to_another_master(tmp_path: Path,
                                                    redis_cluster: LocalCluster | str) -> None:
    """A slot moves to another master (a resharding) under a running hub: the holder
    follows its node channel there (Redis sunsubscribes it), and an instance whose
    slot map is stale gets MOVED for its publish, its sequence script and its owner
    write, reads the map again and succeeds, without the caller seeing an error."""
    need_cluster(redis_cluster)
    cluster = LocalCluster(tmp_path)  # its own: the slot map changes
    cluster.start()
    hub_id = f"mv{secrets.token_hex(4)}"
    a, _ = await started(cluster.url, hub_id, "a")
    b, rb = await started(cluster.url, hub_id, "b")
    try:
        await b.claim("n1", "s1")
        rb.local["n1"] = object()
        assert await a.publish_to_node("n1", b"before", 0, "m0") is True
        await _move_slot(cluster.ports, b._node_channel("n1"))
        await _move_slot(cluster.ports, f"{a.prefix}owner:n2")

        t0 = time.monotonic()
        while not await a.publish_to_node("n1", b"after", 0, "m1"):
            # False only until the holder has followed its channel to the new master.
            assert time.monotonic() - t0 < timeout(5.0), "the channel was not followed"
            await asyncio.sleep(0.05)
        await until(lambda: ("n1", b"after", 0, "m1") in rb.node_frames, what="delivery")
        await a.claim("n2", "s2")
        assert await b.owner("n2") == "s2"
        assert a.up and b.up
    finally:
        await a.close()
        await b.close()
        cluster.stop()
