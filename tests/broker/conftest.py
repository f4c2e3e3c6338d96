"""Fixtures of the broker conformance suite: `brokers` is parametrized over every
`Broker` implementation (memory; redis on the real Redis of the run; redis on a real
local 3-master Redis Cluster started once per session) and makes broker "instances"
sharing one unique `hub_id` (the Redis key and channel prefix), each with a recording
handler. Teardown closes them and deletes the test's Redis keys.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from openred.hub.broker import Broker, MemoryBroker

from tests.conftest import timeout
from tests.ports import free_port
from tests.services import missing, need_redis

KINDS = ["memory", "redis", "redis-cluster"]


@dataclass
class Recorder:
    """A `BrokerHandler` that keeps what it was given."""

    name: str
    node_frames: list[tuple[str, bytes, int, str]] = field(default_factory=list)
    topic_frames: list[tuple[str, int, bytes]] = field(default_factory=list)
    controls: list[tuple[str, str, str | None]] = field(default_factory=list)
    local: dict[str, object] = field(default_factory=dict)  # node ids held here
    # (node, online, ts, topic) of each presence event (docs/protocol.md §6.1)
    presence: list[tuple[str, bool, int, str | None]] = field(default_factory=list)

    def on_node_frame(self, node_id: str, frame: bytes, qos: int, mid: str) -> None:
        self.node_frames.append((node_id, frame, qos, mid))

    def on_topic_frame(self, topic: str, seq: int, frame: bytes) -> None:
        self.topic_frames.append((topic, seq, frame))

    def on_control(self, node_id: str, command: str, session_id: str | None) -> None:
        self.controls.append((node_id, command, session_id))

    def on_presence(self, node_id: str, online: bool, ts: int, topic: str | None) -> None:
        self.presence.append((node_id, online, ts, topic))


async def until(check: Callable[[], bool], wait: float = 5.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout(wait)
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not reached within {wait} s")
        await asyncio.sleep(0.01)




@dataclass
class Brokers:
    kind: str
    url: str | None
    hub_id: str
    made: list[Broker] = field(default_factory=list)

    @property
    def clustered(self) -> bool:
        """Whether another instance can be reached (false for the memory broker: one
        process, nobody else)."""
        return self.kind != "memory"

    async def make(self, name: str | None = None,
                   url: str | None = None) -> tuple[Any, Recorder]:
        name = name or f"i{len(self.made) + 1}"
        broker: Any
        if self.kind == "memory":
            broker = MemoryBroker()
        else:
            from openred.hub.broker_redis import RedisBroker

            broker = RedisBroker(url or self.url or "", hub_id=self.hub_id)
        rec = Recorder(name)
        await broker.start(name, rec)
        self.made.append(broker)
        return broker, rec


# -- a local Redis Cluster ---------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    """n free ports (tests/ports.py) whose cluster bus ports (+10000) are free too."""
    import socket

    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p + 10000 > 65535 or p in ports:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 10000))
        except OSError:
            continue
        ports.append(p)
    return ports


class LocalCluster:
    """Three `redis-server --cluster-enabled yes` masters joined by
    `redis-cli --cluster create` (with `replicas` replicas each): a real Redis Cluster
    on this machine."""

    def __init__(self, root: Path, replicas: int = 0) -> None:
        self.root = root
        self.replicas = replicas
        self.ports = _free_ports(3 * (1 + replicas))
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0?cluster=true"

    def start(self) -> None:
        import time

        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        assert server and cli
        for p in self.ports:
            d = self.root / str(p)
            d.mkdir()
            with open(d / "redis.log", "wb") as out:
                self.procs.append(subprocess.Popen(
                    [server, "--port", str(p), "--bind", "127.0.0.1", "--cluster-enabled",
                     "yes", "--cluster-config-file", str(d / "nodes.conf"),
                     "--cluster-node-timeout", "2000", "--save", "", "--appendonly", "no",
                     # replicas in sync at once, and allowed to take over whatever the
                     # time since they last heard of their master
                     "--repl-diskless-sync-delay", "0",
                     "--cluster-replica-validity-factor", "0",
                     "--dir", str(d)], stdout=out, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + 10
        for p in self.ports:
            while subprocess.run([cli, "-p", str(p), "ping"], capture_output=True,
                                 text=True).stdout.strip() != "PONG":
                assert time.monotonic() < deadline, f"redis-server on {p} did not start"
                time.sleep(0.05)
        created = subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True, text=True)
        assert created.returncode == 0, created.stdout + created.stderr
        deadline = time.monotonic() + 20
        for p in self.ports:
            while True:
                info = subprocess.run([cli, "-p", str(p), "cluster", "info"],
                                      capture_output=True, text=True).stdout
                if "cluster_state:ok" in info:
                    break
                assert time.monotonic() < deadline, info
                time.sleep(0.1)
            while True:
                repl = subprocess.run([cli, "-p", str(p), "info", "replication"],
                                      capture_output=True, text=True).stdout
                if "role:master" in repl or "master_link_status:up" in repl:
                    break
                assert time.monotonic() < deadline, repl
                time.sleep(0.1)

    def kill(self, port: int) -> None:
        proc = self.procs[self.ports.index(port)]
        proc.kill()
        proc.wait()

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster | str]:
    """A local Redis Cluster, or why there is none (the tests needing it skip, or fail
    under CI=true)."""
    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        yield "redis-server / redis-cli are not installed (apt-get install redis-server)"
        return
    cluster = LocalCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
    except AssertionError as exc:
        cluster.stop()
        yield f"could not start a local Redis Cluster: {exc}"
        return
    yield cluster
    cluster.stop()


def need_cluster(redis_cluster: LocalCluster | str) -> LocalCluster:
    if isinstance(redis_cluster, str):
        missing(redis_cluster)
    assert not isinstance(redis_cluster, str)
    return redis_cluster


async def delete_keys(url: str, prefix: str) -> None:
    """Delete every key under `prefix` (plain Redis or Cluster URL)."""
    from openred.hub.broker_redis import parse_redis_url

    plain, clustered = parse_redis_url(url)
    if clustered:
        import redis.asyncio as redis
        from redis.asyncio.cluster import RedisCluster

        rc = RedisCluster.from_url(plain)
        try:
            for node in (await rc.initialize()).get_primaries():
                r = redis.Redis(host=node.host, port=node.port)
                try:
                    keys = [k async for k in r.scan_iter(match=f"{prefix}*", count=1000)]
                    for k in keys:  # one slot per DEL
                        await r.delete(k)
                finally:
                    await r.aclose()
        finally:
            await rc.aclose()
        return
    import redis.asyncio as redis

    r = redis.Redis.from_url(plain)
    try:
        keys = [k async for k in r.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await r.delete(*keys)
    finally:
        await r.aclose()


@pytest.fixture(params=KINDS)
async def brokers(request: pytest.FixtureRequest) -> AsyncIterator[Brokers]:
    async for b in _brokers(request, request.param):
        yield b


@pytest.fixture(params=[k for k in KINDS if k != "memory"])
async def shared_brokers(request: pytest.FixtureRequest) -> AsyncIterator[Brokers]:
    """The brokers that several instances share (what the memory broker is not)."""
    async for b in _brokers(request, request.param):
        yield b


async def _brokers(request: pytest.FixtureRequest, kind: str) -> AsyncIterator[Brokers]:
    url: str | None = None
    if kind == "redis":
        url = need_redis()
    elif kind == "redis-cluster":
        url = need_cluster(request.getfixturevalue("redis_cluster")).url
    b = Brokers(kind, url, f"conf{secrets.token_hex(4)}")
    yield b
    for broker in b.made:
        await asyncio.wait_for(broker.close(), timeout(5))
    if url is not None:
        await delete_keys(url, f"openred:{b.hub_id}:")
