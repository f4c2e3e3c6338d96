"""`store.read_url` against a real streaming replica that the test makes itself.

A private primary (initdb in a temporary folder, wal_level=replica, on a free port) and a
`pg_basebackup -R` of it started as a hot standby on another port, from the PostgreSQL
server binaries (/usr/lib/postgresql/*/bin; as the postgres user when run as root, like
scripts/test). Without them the tests skip, and fail under CI=true.

What is shown (persistence/postgres.py, "Read replica"):
- stale-tolerant reads (admin node lists, the audit trail, message state, old topic
  history) are served by the replica: with its WAL replay paused they return the old
  state while the primary has the new one;
- what decides delivery or access (get_node, the QoS 1 queue, last_seq) stays on the
  primary, even while the replica is paused;
- old history is taken from the replica only while it has replayed recent commits;
- a replica that is stopped is bypassed (reads go to the primary, nothing fails) and
  used again after `replica_retry_s` once it is back.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from openred.persistence.postgres import PostgresStore
from openred.persistence.store import HistoryEntry, StoredMessage

from tests.conftest import timeout
from tests.ports import free_port
from tests.services import missing

pytestmark = pytest.mark.slow


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                   key=lambda p: [int(x) for x in p.parent.name.split(".") if x.isdigit()])
    for path in reversed(found):
        if all((path / tool).exists() for tool in ("initdb", "pg_ctl", "pg_basebackup")):
            return path
    return None


@dataclass
class Server:
    bin: Path
    data: Path
    port: int
    user: str | None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def run(self, *args: str | Path) -> None:
        subprocess.run([str(a) for a in args], check=True, capture_output=True,
                       user=self.user, timeout=timeout(60))

    def start(self) -> None:
        self.run(self.bin / "pg_ctl", "-D", self.data, "-w", "-l", f"{self.data}.log",
                 "-o", f"-p {self.port} -k {self.data.parent} "
                       "-c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self) -> None:
        subprocess.run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                        "stop"], capture_output=True, user=self.user, timeout=timeout(60))


@dataclass
class Pair:
    primary: Server
    replica: Server


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    pg_bin = _pg_bin()
    if pg_bin is None:
        missing("PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup) are not "
                "installed (apt-get install postgresql)")
    assert pg_bin is not None
    user = "postgres" if os.geteuid() == 0 else None
    # Not under pytest's tmp_path: its root-only parents would shut the postgres user out.
    base = Path(tempfile.mkdtemp(prefix="openred-replica-"))
    if user is not None:
        shutil.chown(base, user)
    primary = Server(pg_bin, base / "primary", free_port(), user)
    replica = Server(pg_bin, base / "replica", free_port(), user)
    try:
        primary.run(pg_bin / "initdb", "-D", primary.data, "-A", "trust", "-U", "postgres",
                    "--no-sync")
        with open(primary.data / "postgresql.conf", "a") as conf:
            conf.write("wal_level = replica\nmax_wal_senders = 4\n"
                       # Replay state visible at once, also to pg_last_xact_replay_timestamp.
                       "wal_receiver_status_interval = 1s\n")
        primary.start()
        # -R writes standby.signal and primary_conninfo: a streaming hot standby.
        primary.run(pg_bin / "pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port),
                    "-U", "postgres", "-D", replica.data, "-R", "-X", "stream", "-c", "fast",
                    "--no-sync")
        replica.start()
        yield Pair(primary, replica)
    finally:
        replica.stop()
        primary.stop()
        shutil.rmtree(base, ignore_errors=True)


async def _sql(dsn: str, query: str) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


async def _replayed(replica: Server, query: str) -> bool:
    """Whether the replica answers `query` with true (False while it has not replayed
    the tables yet)."""
    try:
        return bool(await _sql(replica.dsn, query))
    except asyncpg.exceptions.UndefinedTableError:
        return False


async def _eventually(check: Any, what: str, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout(limit_s)
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def _pause_replay(replica: Server) -> None:
    await _sql(replica.dsn, "SELECT pg_wal_replay_pause()")
    await _eventually(lambda: _sql(replica.dsn, "SELECT pg_get_wal_replay_pause_state()"
                                   " = 'paused'"), "replay paused")


def _store(pair: Pair, schema: str) -> PostgresStore:
    store = PostgresStore(f"{pair.primary.dsn}?schema={schema}", pool_size=2,
                          read_url=pair.replica.dsn)
    # A read that reaches the replica before it has replayed the new schema fails there
    # and benches the replica for this long: short, so the tests need not wait.
    store.replica_retry_s = 0.2
    return store


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def test_stale_tolerant_reads_are_served_by_the_replica(pair: Pair) -> None:
    assert await _sql(pair.replica.dsn, "SELECT pg_is_in_recovery()") is True
    store = _store(pair, "t_served")
    await store.open()  # migrations on the primary; the replica replays them
    try:
        now = _now_ms()
        await store.node_seen("node-a", None, {"n": 1}, now)
        await store.enqueue(StoredMessage(mid="m1", sender="node-a", recipient="node-b",
                                          body=b"x", created=now, expires=now + 60_000), 100)
        store.audit_nowait("auth_failed", "node-a", "203.0.113.7", {}, now)
        await store.ping()
        await _eventually(lambda: _replayed(pair.replica, "SELECT count(*) = 1 FROM"
                                            " t_served.audit"), "the audit on the replica")
        await asyncio.sleep(store.replica_retry_s)  # past any earlier fallback

        served = store.replica_reads
        assert [n.id for n in await store.list_nodes(10, None)] == ["node-a"]
        assert store.replica_reads == served + 1
        served += 1

        # Replay paused: the replica is frozen where it is; the primary moves on.
        await _pause_replay(pair.replica)
        try:
            now = _now_ms()
            await store.node_seen("node-c", None, None, now)
            await store.set_banned("node-a", True, now)
            await store.enqueue(StoredMessage(mid="m2", sender="node-a",
                                              recipient="node-b", body=b"y", created=now,
                                              expires=now + 60_000), 100)
            assert await store.ack("node-b", ["m1"], now) != []
            store.audit_nowait("kicked", "node-c", None, {}, now)
            await store.ping()

            # Stale-tolerant reads: the replica's (old) state.
            nodes = await store.list_nodes(10, None)
            assert [(n.id, n.banned) for n in nodes] == [("node-a", False)]
            assert await store.message_state("m2", now) is None
            state = await store.message_state("m1", now)
            assert state is not None and state.state == "stored"
            assert [e.kind for e in await store.audit_query(None, None, None, 10, None)] \
                == ["auth_failed"]
            assert store.replica_reads == served + 4

            # Access and delivery: the primary's (current) state.
            rec = await store.get_node("node-a")
            assert rec is not None and rec.banned
            assert await store.get_node("node-c") is not None
            assert [m.mid for m in await store.pending("node-b", now, None, 10)] == ["m2"]
            assert await store.count_pending("node-b", now) == 1
            assert store.replica_reads == served + 4
        finally:
            await _sql(pair.replica.dsn, "SELECT pg_wal_replay_resume()")

        async def caught_up() -> bool:
            return [n.id for n in await store.list_nodes(10, None)] == ["node-a", "node-c"]
        await _eventually(caught_up, "the replica to replay the new nodes")
        state = await store.message_state("m1", _now_ms())
        assert state is not None and state.state == "acked"
    finally:
        await store.close()


async def test_old_topic_history_from_the_replica_recent_from_the_primary(pair: Pair) -> None:
    store = _store(pair, "t_history")
    store.replica_history_age_s = 60.0
    await store.open()
    try:
        now = _now_ms()
        ttl = 3_600_000
        old, recent = now - 120_000, now  # before and after the 60 s bound

        def entry(seq: int, ts: int) -> HistoryEntry:
            return HistoryEntry(topic="room/1", seq=seq, mid=f"h{seq}", sender="node-a",
                                body=b"%d" % seq, ts=ts)
        for seq, ts in ((1, old), (2, old), (3, recent)):
            await store.append_history(entry(seq, ts), 100, ttl)
        await store.node_seen("marker", None, None, now)
        await _eventually(lambda: _replayed(pair.replica, "SELECT count(*) = 1 FROM"
                                            " t_history.nodes WHERE id = 'marker'"),
                          "the history on the replica")
        await asyncio.sleep(store.replica_retry_s)  # past any earlier fallback

        await _pause_replay(pair.replica)
        try:
            # Written while the replica is frozen: an old entry (only the primary has it)
            # and a recent one (served by the primary in any case).
            await store.append_history(entry(4, old), 100, ttl)
            await store.append_history(entry(5, recent), 100, ttl)
            reads = store.replica_reads
            got = await store.history_since("room/1", 0, _now_ms(), ttl)
            # Entries at or before the bound came from the (stale) replica, which has not
            # seen seq 4; the recent ones from the primary.
            assert [e.seq for e in got] == [1, 2, 3, 5]
            assert store.replica_reads == reads + 1
            assert [e.seq for e in await store.history_since("room/1", 2, _now_ms(), ttl)] \
                == [3, 5]

            # A replica whose last replayed commit is older than half the bound is not
            # trusted for history: everything comes from the primary.
            store.replica_history_age_s = 1.0
            await asyncio.sleep(0.6)
            got = await store.history_since("room/1", 0, _now_ms(), ttl)
            assert [e.seq for e in got] == [1, 2, 3, 4, 5]
        finally:
            await _sql(pair.replica.dsn, "SELECT pg_wal_replay_resume()")
        assert await store.last_seq("room/1") == 5
    finally:
        await store.close()


async def test_a_stopped_replica_falls_back_to_the_primary(pair: Pair) -> None:
    store = _store(pair, "t_fallback")
    store.replica_retry_s = 1.0
    await store.open()
    try:
        await store.node_seen("node-a", None, None, _now_ms())
        await _eventually(lambda: _replayed(pair.replica, "SELECT count(*) = 1 FROM"
                                            " t_fallback.nodes"), "node-a on the replica")
        await asyncio.sleep(store.replica_retry_s)  # past any earlier fallback
        reads = store.replica_reads
        assert [n.id for n in await store.list_nodes(10, None)] == ["node-a"]
        assert (store.replica_reads, store.replica_fallbacks) == (reads + 1, 0)
        reads += 1

        pair.replica.stop()
        await store.node_seen("node-b", None, None, _now_ms())
        # The replica is gone: the read runs on the primary (which has node-b), and the
        # next ones skip the replica for replica_retry_s.
        assert [n.id for n in await store.list_nodes(10, None)] == ["node-a", "node-b"]
        assert store.replica_fallbacks == 1
        assert await store.audit_query(None, None, None, 10, None) == []
        assert (store.replica_fallbacks, store.replica_reads) == (1, reads)

        pair.replica.start()

        async def back() -> bool:
            await store.list_nodes(10, None)
            return store.replica_reads > reads
        await _eventually(back, "reads served by the replica again", limit_s=20.0)
        assert await _sql(pair.replica.dsn, "SELECT pg_is_in_recovery()") is True
    finally:
        await store.close()


async def test_a_hub_configured_with_read_url_serves_admin_lists_from_the_replica(
        pair: Pair) -> None:
    """store.read_url end to end: `openred-hub serve`'s config reaches the store, and
    GET /v1/nodes is answered from the replica (replay paused: the replica's view)."""
    import aiohttp
    from openred.hub.app import RunningHub
    from openred.hub.config import load_config

    token = "replica-test-token-0123456789abcdef"
    cfg = load_config(None, env={}, overrides={
        "server.ws_port": 0, "server.admin_port": 0, "admin.tokens": [token],
        "store.url": f"{pair.primary.dsn}?schema=t_hub", "store.pool_size": 2,
        "store.read_url": pair.replica.dsn})
    async with RunningHub(cfg) as h:
        assert h.node is not None
        store = h.store  # the store itself (h.node.store is its guard, hub/breaker.py)
        assert isinstance(store, PostgresStore) and store.read_url == pair.replica.dsn
        store.replica_retry_s = 0.2
        await store.node_seen("node-old", None, None, _now_ms())
        await store.ping()
        url = f"http://127.0.0.1:{h.admin_port}/v1/nodes"
        headers = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(headers=headers) as http:

            async def listed() -> bool:
                async with http.get(url) as r:
                    return [n["id"] for n in (await r.json())["items"]] == ["node-old"]

            await _eventually(listed, "node-old on the replica")
            await _pause_replay(pair.replica)
            try:
                await store.node_seen("node-new", None, None, _now_ms())
                reads = store.replica_reads
                async with http.get(url) as r:
                    assert [n["id"] for n in (await r.json())["items"]] == ["node-old"]
                assert store.replica_reads == reads + 1
                assert await store.get_node("node-new") is not None  # the primary's view
            finally:
                await _sql(pair.replica.dsn, "SELECT pg_wal_replay_resume()")
