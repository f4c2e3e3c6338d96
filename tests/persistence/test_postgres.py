"""What only the PostgreSQL backend has: day partitions and their maintenance, migrations
under concurrency, URL forms, error translation, and outages through a TCP proxy.

Every test runs on the real server of `need_pg()` in its own schema (`pg_factory`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from openred.persistence.backends import open_store
from openred.persistence.postgres import PostgresStore, parse_postgres_url
from openred.persistence.store import (
    HistoryEntry,
    QueueFull,
    StoredMessage,
    StoreError,
    StoreUnavailable,
)

from tests.conftest import timeout
from tests.persistence.conftest import PostgresFactory, with_schema
from tests.ports import free_port

NOW = 1_700_000_000_000  # ms: 2023-11-14 22:13:20 UTC
DAY_MS = 86_400_000
HOUR_MS = 3_600_000


def msg(i: int, to: str = "bob", *, created: int = NOW, ttl_ms: int = DAY_MS,
        mid: str | None = None) -> StoredMessage:
    return StoredMessage(mid=mid or f"m{i:08d}.{to}", sender="alice", recipient=to,
                         body=f"body {i}".encode(), created=created,
                         expires=created + ttl_ms)


def day_name(table: str, ms: int) -> str:
    return f"{table}_p{datetime.fromtimestamp(ms / 1000, UTC):%Y%m%d}"


async def sql(factory: PostgresFactory, query: str, *args: Any) -> list[Any]:
    """Run one query in the test's schema on a connection of its own."""
    conn = await asyncpg.connect(factory.dsn, server_settings={"search_path": factory.schema})
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


@asynccontextmanager
async def row_locked(factory: PostgresFactory, mid: str) -> AsyncIterator[Callable[[], Any]]:
    """A transaction of another connection holding message `mid`'s row lock; yields
    the call that rolls it back (the lock's release)."""
    conn = await asyncpg.connect(factory.dsn, server_settings={"search_path": factory.schema})
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("SELECT 1 FROM messages WHERE mid = $1 FOR UPDATE", mid)
        yield tx.rollback
    finally:
        await conn.close()


async def blocked_ack(store: PostgresStore, node: str, mid: str) -> asyncio.Future[Any]:
    """`store.ack` of a message whose row another transaction holds: still waiting."""
    ack = asyncio.ensure_future(store.ack(node, [mid], NOW + 1))
    await asyncio.sleep(0.2)
    assert not ack.done()  # waiting for the row
    return ack


async def partitions(factory: PostgresFactory, table: str) -> set[str]:
    rows = await sql(factory, "SELECT c.relname FROM pg_inherits i JOIN pg_class c"
                              " ON c.oid = i.inhrelid WHERE i.inhparent = $1::regclass", table)
    return {row[0] for row in rows}


@pytest.fixture
async def pg_store(pg_factory: PostgresFactory) -> AsyncIterator[PostgresStore]:
    store = pg_factory.make_pg()
    await store.open()
    yield store
    await store.close()


# -- URLs --------------------------------------------------------------------------------------


def test_url_schema_parameter_is_ours() -> None:
    dsn, schema = parse_postgres_url("postgresql://u:pw@db:5433/hub?schema=openred&sslmode=off")
    assert schema == "openred"
    assert dsn == "postgresql://u:pw@db:5433/hub?sslmode=off"
    assert parse_postgres_url("postgres://db/hub") == ("postgres://db/hub", None)


@pytest.mark.parametrize("url", [
    "postgresql://u:secret@db/hub?schema=a-b",
    "postgresql://u:secret@db/hub?schema=",
    "postgresql://u:secret@db/hub?schema=1abc",
    "postgresql://u:secret@db/hub?schema=Mixed",
    "mysql://u:secret@db/hub",
])
def test_bad_urls_name_the_key_not_the_password(url: str) -> None:
    with pytest.raises(ValueError, match=r"store\.url") as info:
        PostgresStore(url)
    assert "secret" not in str(info.value)


def test_open_store_picks_postgres() -> None:
    store = open_store("postgresql://db/hub?schema=s1", auto_migrate=False, pool_size=3)
    assert isinstance(store, PostgresStore)
    assert (store.schema, store.pool_size, store.auto_migrate) == ("s1", 3, False)


# -- partitions ----------------------------------------------------------------------------------


async def test_open_creates_partitions_for_today_and_ahead(pg_factory: PostgresFactory,
                                                           pg_store: PostgresStore) -> None:
    now = time.time_ns() // 1_000_000
    for table in ("messages", "audit"):
        names = await partitions(pg_factory, table)
        assert f"{table}_default" in names
        for ahead in range(3):
            assert day_name(table, now + ahead * DAY_MS) in names
    # A message of now lands in today's partition, not in the default one.
    await pg_store.enqueue(msg(1, created=now), 10)
    [row] = await sql(pg_factory, "SELECT tableoid::regclass::text FROM messages")
    assert row[0] == day_name("messages", now)


async def test_maintain_creates_ahead_and_drops_old(pg_factory: PostgresFactory,
                                                    pg_store: PostgresStore) -> None:
    store = pg_store
    # A day without a partition: its rows wait in the DEFAULT partition.
    await store.enqueue(msg(1), 10)
    await store.enqueue(msg(2, created=NOW + DAY_MS), 10)
    store.audit_nowait("ban", "bob", None, {}, NOW)
    await store.ping()
    rows = await sql(pg_factory, "SELECT tableoid::regclass::text FROM messages")
    assert {r[0] for r in rows} == {"messages_default"}

    created, dropped = await store.maintain(NOW, 30)
    days = [day_name(t, NOW + d * DAY_MS) for t in ("messages", "audit") for d in range(3)]
    assert sorted(created) == sorted(days) and dropped == []
    # The waiting rows moved into their day's partition; nothing was lost.
    rows = await sql(pg_factory, "SELECT mid, tableoid::regclass::text FROM messages ORDER BY 1")
    assert [tuple(r) for r in rows] == [(msg(1).mid, day_name("messages", NOW)),
                                        (msg(2).mid, day_name("messages", NOW + DAY_MS))]
    [row] = await sql(pg_factory, "SELECT tableoid::regclass::text FROM audit")
    assert row[0] == day_name("audit", NOW)
    assert [m.mid for m in await store.pending("bob", NOW, None, 10)] == [msg(1).mid,
                                                                          msg(2).mid]
    assert await store.maintain(NOW, 30) == ([], [])  # idempotent

    # 31 days later: NOW's day is past retention, NOW + 1 day not yet.
    later = NOW + 31 * DAY_MS
    created, dropped = await store.maintain(later, 30)
    assert dropped == [day_name("messages", NOW), day_name("audit", NOW)]
    assert len(created) == 6
    assert await store.message_state(msg(1).mid, NOW) is None
    assert [m.mid for m in await store.pending("bob", NOW, None, 10)] == [msg(2).mid]
    assert await store.audit_query(None, None, None, 10, None) == []
    names = await partitions(pg_factory, "messages")
    assert day_name("messages", NOW) not in names
    assert day_name("messages", NOW + DAY_MS) in names

    # Far in the future: every dated partition goes; inserts still work (DEFAULT).
    far = NOW + 400 * DAY_MS
    _, dropped = await store.maintain(far + 100 * DAY_MS, 30)
    assert day_name("messages", later) in dropped
    await store.enqueue(msg(3, created=far), 10)
    assert [m.mid for m in await store.pending("bob", far, None, 10)] == [msg(3).mid]


async def test_concurrent_maintain_does_not_race(pg_factory: PostgresFactory) -> None:
    stores = [pg_factory.make_pg() for _ in range(3)]
    for store in stores:
        await store.migrate()
    try:
        results = await asyncio.gather(*(s.maintain(NOW, 30) for s in stores))
        created = [name for made, _ in results for name in made]
        assert len(created) == len(set(created)) == 6  # each made once, none failed
    finally:
        for store in stores:
            await store.close()


# -- migrations ----------------------------------------------------------------------------------


async def test_concurrent_migrations_apply_once(pg_factory: PostgresFactory) -> None:
    stores = [pg_factory.make_pg(auto_migrate=False) for _ in range(4)]
    try:
        # The schema does not exist yet: all four race to create it and migrate.
        results = await asyncio.gather(*(s.migrate() for s in stores))
        from openred.persistence.migrate import load_migrations, packaged_migrations

        shipped = load_migrations(packaged_migrations("postgres"))
        assert sorted(results) == [[], [], [], [m.name for m in shipped]]
        rows = await sql(pg_factory, "SELECT version, name, checksum, applied_at"
                                     " FROM schema_migrations ORDER BY version")
        assert [(r[0], r[1]) for r in rows] == [(m.version, m.name) for m in shipped]
        assert len(rows[0][2]) == 64 and rows[0][3] is not None  # sha256 hex, a time
    finally:
        for store in stores:
            await store.close()
    # Opening many at once on a migrated schema is fine too.
    stores = [pg_factory.make_pg() for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
    finally:
        for store in stores:
            await store.close()


async def test_concurrent_opens_on_a_fresh_schema(pg_factory: PostgresFactory) -> None:
    stores = [pg_factory.make_pg() for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        await stores[0].enqueue(msg(1), 10)
        assert [m.mid for m in await stores[3].pending("bob", NOW, None, 10)] == [msg(1).mid]
    finally:
        for store in stores:
            await store.close()


async def test_changed_migration_is_refused_with_its_name(pg_factory: PostgresFactory) -> None:
    migrations = pg_factory.copy_migrations()
    store = pg_factory.make_pg(migrations_dir=migrations)
    await store.open()
    await store.close()
    first = migrations / "0001_init.sql"
    first.write_text(first.read_text().replace("-- 0001_init", "-- 0001_init (edited)"))
    for auto_migrate in (True, False):
        changed = pg_factory.make_pg(migrations_dir=migrations, auto_migrate=auto_migrate)
        with pytest.raises(StoreError, match=r"0001_init changed .*checksum mismatch"):
            await changed.open()


async def test_unknown_applied_migration_is_refused(pg_factory: PostgresFactory,
                                                    pg_store: PostgresStore) -> None:
    await sql(pg_factory, "INSERT INTO schema_migrations (version, name, checksum)"
                          " VALUES (9998, '9998_future', 'x')")
    store = pg_factory.make_pg()
    with pytest.raises(StoreError, match="9998_future, unknown to this hub version"):
        await store.open()


async def test_failed_migration_applies_nothing(pg_factory: PostgresFactory) -> None:
    migrations = pg_factory.copy_migrations()
    (migrations / "0099_broken.sql").write_text(
        "CREATE TABLE fine_so_far (x integer);\nTHIS IS NOT SQL;\n")
    store = pg_factory.make_pg(migrations_dir=migrations)
    with pytest.raises(StoreError, match="migration 0099_broken failed"):
        await store.open()
    # One transaction: 0001 was rolled back with it.
    rows = await sql(pg_factory, "SELECT to_regclass('schema_migrations'),"
                                 " to_regclass('fine_so_far')")
    assert tuple(rows[0]) == (None, None)


# -- errors at the boundary ----------------------------------------------------------------------


async def test_bad_values_fail_only_their_caller(pg_store: PostgresStore) -> None:
    store = pg_store
    await store.enqueue(msg(1), 10)
    before = store.commits
    results = await asyncio.gather(
        store.enqueue(msg(2), 10),
        store.enqueue(msg(1), 10),  # already stored: same mid and time
        store.enqueue(msg(3), 10),
        store.enqueue(msg(3), 10),  # twice in one batch
        store.enqueue(StoredMessage("big", "alice", "bob", b"x", NOW, 2**64), 10),
        store.enqueue(msg(4, mid="nul\x00mid"), 10),
        store.enqueue(msg(5), 10),
        return_exceptions=True,
    )
    kinds = [type(r).__name__ for r in results]
    assert kinds == ["NoneType", "StoreError", "NoneType", "StoreError", "StoreError",
                     "StoreError", "NoneType"]
    assert "duplicate" in str(results[1]) and "duplicate" in str(results[3])
    assert str(2**64) not in str(results[4])  # the value is not echoed
    assert store.commits > before
    assert [m.mid for m in await store.pending("bob", NOW, None, 10)] == [
        msg(1).mid, msg(2).mid, msg(3).mid, msg(5).mid]
    # History cannot collide: the store numbers entries (their own seq is ignored).
    entry = HistoryEntry("news", 1, "h1", "alice", b"x", NOW)
    assert [await store.append_history(entry, 10, HOUR_MS) for _ in range(2)] == [1, 2]
    assert [e.seq for e in await store.history_since("news", 0, NOW, HOUR_MS)] == [1, 2]


async def test_a_duplicate_does_not_split_the_batch(pg_store: PostgresStore) -> None:
    store = pg_store
    await store.enqueue(msg(1), 10)
    await store.append_history(HistoryEntry("news", 1, "h1", "alice", b"x", NOW), 10, HOUR_MS)
    before = store.commits
    results = await asyncio.gather(
        store.enqueue(msg(2), 10),
        store.enqueue(msg(1), 10),  # stored already: the insert fails on the key...
        store.append_history(HistoryEntry("news", 1, "h1", "alice", b"x", NOW), 10, HOUR_MS),
        store.append_history(HistoryEntry("news", 2, "h2", "alice", b"y", NOW), 10, HOUR_MS),
        store.enqueue(msg(3), 10),
        return_exceptions=True,
    )
    assert [type(r).__name__ for r in results] == ["NoneType", "StoreError", "int", "int",
                                                   "NoneType"]
    assert "duplicate" in str(results[1])
    assert store.commits - before == 1  # ...and the batch commits again without it
    assert [m.mid for m in await store.pending("bob", NOW, None, 10)] == [
        msg(1).mid, msg(2).mid, msg(3).mid]
    # The history entries are numbered by the store, in call order, once each.
    assert results[2:4] == [2, 3]
    assert [e.seq for e in await store.history_since("news", 0, NOW, HOUR_MS)] == [1, 2, 3]


async def test_group_commit_mixes_kinds_of_a_lane_in_one_transaction(
        pg_store: PostgresStore) -> None:
    store = pg_store
    for i in range(3):
        await store.enqueue(msg(i), 10)
    before = store.commits
    await asyncio.gather(
        store.enqueue(msg(10, to="carol"), 10),
        store.ack("bob", [msg(0).mid], NOW + 1),
        store.append_history(HistoryEntry("news", 1, "h1", "alice", b"x", NOW), 10, HOUR_MS),
        store.enqueue(msg(11, to="carol"), 10),
    )
    store.mark_delivered_nowait([msg(1).mid], NOW + 2)
    store.audit_nowait("kick", "bob", None, {}, NOW)
    await store.ping()
    # The enqueues and the history append commit together; the ack in the acks' lane;
    # the audit event, queued after they returned, on its own.
    assert store.commits - before <= 3
    state = await store.message_state(msg(1).mid, NOW + 3)
    assert state is not None and state.state == "delivered"
    assert [m.mid for m in await store.pending("carol", NOW, None, 10)] == [
        msg(10, to="carol").mid, msg(11, to="carol").mid]


async def test_acks_have_a_lane_of_their_own(pg_factory: PostgresFactory,
                                              pg_store: PostgresStore) -> None:
    """An ack held up (here: a row lock another transaction holds) delays no enqueue:
    QoS 1 `ok`s do not wait for other messages' acks. The enqueues' pending counts then
    take the ack once it commits."""
    store = pg_store
    await store.enqueue(msg(0), 10)
    await store.enqueue(msg(1, to="carol"), 10)
    async with row_locked(pg_factory, msg(0).mid) as release:
        ack = await blocked_ack(store, "bob", msg(0).mid)
        async with asyncio.timeout(5):
            await store.enqueue(msg(2), 10)
            await store.enqueue(msg(3, to="carol"), 10)
        assert not ack.done()
        await release()
        assert [a.mid for a in await asyncio.wait_for(ack, 5)] == [msg(0).mid]
    assert [m.mid for m in await store.pending("bob", NOW, None, 10)] == [msg(2).mid]
    assert await store.count_pending("bob", NOW) == 1
    # The queue bound counts bob's queue without the acked message: 1 of 2 taken.
    await store.enqueue(msg(4), 2)
    with pytest.raises(QueueFull):
        await store.enqueue(msg(5), 2)


async def test_a_full_queue_counts_the_acks_submitted_before(
        pg_factory: PostgresFactory, pg_store: PostgresStore) -> None:
    """With acks in their own lane, an ack submitted before an enqueue may commit after
    it: a queue that looks full waits for its recipient's acks in flight and counts
    again, as one queue did. Another recipient's full queue is refused at once, whatever
    acks are blocked (only a node's own acks can make its senders wait)."""
    store = pg_store
    await store.enqueue(msg(0), 1)
    await store.enqueue(msg(1, to="carol"), 1)
    async with row_locked(pg_factory, msg(0).mid) as release:
        ack = await blocked_ack(store, "bob", msg(0).mid)
        with pytest.raises(QueueFull):
            await asyncio.wait_for(store.enqueue(msg(2, to="carol"), 1), 5)
        send = asyncio.ensure_future(store.enqueue(msg(3), 1))
        await asyncio.sleep(0.2)
        assert not send.done()  # waits for bob's ack, not refused
        await release()
        assert [a.mid for a in await asyncio.wait_for(ack, 5)] == [msg(0).mid]
        assert await asyncio.wait_for(send, 5) is None  # stored
    assert [m.mid for m in await store.pending("bob", NOW, None, 10)] == [msg(3).mid]


async def test_queue_bound_sees_other_instances(pg_factory: PostgresFactory) -> None:
    one = pg_factory.make_pg()
    two = pg_factory.make_pg()
    await one.open()
    await two.open()
    try:
        for i in range(3):
            await one.enqueue(msg(i), 3)
        with pytest.raises(QueueFull):
            await one.enqueue(msg(3), 3)
        # Another instance acks: the first one's cached count is stale, yet a queue that
        # is no longer full is re-counted rather than refused.
        assert len(await two.ack("bob", [msg(0).mid], NOW)) == 1
        await one.enqueue(msg(3), 3)
        with pytest.raises(QueueFull):
            await two.enqueue(msg(4), 3)
    finally:
        await one.close()
        await two.close()


async def test_session_starts_of_two_instances_on_the_same_nodes(pg_factory: PostgresFactory
                                                                    ) -> None:
    """Two instances' batches of session starts that share nodes, called in opposite
    orders, new and known nodes mixed, at once: every call is answered (a deadlock or a
    unique violation would fail a whole batch) and every node ends seen. (Removing the
    id order of the locks did not make this deadlock here: the locking scan returns
    rows in index order anyway; the order is kept so that no plan can change that.)"""
    one = pg_factory.make_pg()
    two = pg_factory.make_pg()
    await one.open()
    await two.open()
    try:
        ids = [f"node-{i:03d}" for i in range(300)]
        for node in ids[::2]:  # half known already
            await one.node_seen(node, None, None, NOW)
        for rnd in range(3):
            results = await asyncio.gather(
                *(one.session_start(n, None, None, NOW + 10 + rnd) for n in ids),
                *(two.session_start(n, None, {"r": rnd}, NOW + 10 + rnd)
                  for n in reversed(ids)))
            assert len(results) == 2 * len(ids)
        for node in ids:
            rec = await one.get_node(node)
            assert rec is not None and rec.last_seen == NOW + 12 and rec.meta == {"r": 2}
    finally:
        await one.close()
        await two.close()


# -- outages -------------------------------------------------------------------------------------


async def test_unreachable_server_fails_fast(pg_factory: PostgresFactory) -> None:
    parts = urlsplit(pg_factory.dsn)
    user = f"{parts.username}@" if parts.username else ""
    dead = urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{free_port()}"))
    store = PostgresStore(dead)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="postgresql unavailable"):
        await store.open()
    assert time.monotonic() - started < timeout(5)
    with pytest.raises(StoreUnavailable):
        await store.ping()


class Proxy:
    """A TCP proxy to PostgreSQL that can be cut (every connection closed, new ones
    refused) and restored: a network failure between the hub and its database."""

    # The writer's COMMIT: a simple-protocol Query message.
    COMMIT = b"Q\x00\x00\x00\x0bCOMMIT\x00"

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.cut = False
        # "forward": the next COMMIT reaches the server, then the client's connection is
        # cut before the answer; "drop": the connection is cut with the COMMIT unsent.
        self.trap_commit: str | None = None
        self.port = 0
        self._links: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def dsn(self, dsn: str) -> str:
        parts = urlsplit(dsn)
        user = f"{parts.username}@" if parts.username else ""
        return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{self.port}"))

    def cut_all(self) -> None:
        self.cut = True
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()

    def restore(self) -> None:
        self.cut = False

    async def close(self) -> None:
        self.cut_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        if self.cut:  # cut while connecting
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self._links.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer, client=writer),
                             self._pipe(up_reader, writer))
        self._links.discard(writer)
        self._links.discard(up_writer)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    client: asyncio.StreamWriter | None = None) -> None:
        try:
            while data := await reader.read(65536):
                if client is not None and self.trap_commit and self.COMMIT in data:
                    trap, self.trap_commit = self.trap_commit, None
                    if trap == "forward":
                        writer.write(data)
                        await writer.drain()
                    client.transport.abort()
                    if trap == "drop":
                        return  # `finally` closes the server side too
                    continue
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()


@pytest.fixture
async def proxy(pg_factory: PostgresFactory) -> AsyncIterator[Proxy]:
    parts = urlsplit(pg_factory.dsn)
    proxy = Proxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    yield proxy
    await proxy.close()


async def test_ping_and_reads_while_cut_then_recover(pg_factory: PostgresFactory,
                                                     proxy: Proxy) -> None:
    store = pg_factory.make_pg(url=proxy.dsn(pg_factory.dsn))
    await store.open()
    try:
        await store.enqueue(msg(1), 10)
        proxy.cut_all()
        started = time.monotonic()
        for call in (store.ping(), store.pending("bob", NOW, None, 10),
                     store.enqueue(msg(2), 10), store.ack("bob", [msg(1).mid], NOW)):
            with pytest.raises(StoreUnavailable):
                await call
        assert time.monotonic() - started < timeout(5)  # quickly, not after a long hang
        store.audit_nowait("kick", "bob", None, {}, NOW)  # never raises
        proxy.restore()
        await store.ping()  # the same store, not reopened
        assert [m.mid for m in await store.pending("bob", NOW, None, 10)] == [msg(1).mid]
    finally:
        await store.close()


@pytest.mark.slow
async def test_cut_under_full_rate_loses_nothing_accepted(pg_factory: PostgresFactory,
                                                          proxy: Proxy) -> None:
    """§4: every enqueue that returned is stored; none that raised StoreUnavailable is;
    new calls fail fast during the cut; the same store recovers by itself."""
    store = pg_factory.make_pg(url=proxy.dsn(pg_factory.dsn))
    await store.open()
    ok: list[str] = []
    failed: list[str] = []
    fail_times: list[float] = []
    in_flight = asyncio.Semaphore(2000)
    calls: set[asyncio.Task[None]] = set()

    async def send(i: int) -> None:
        m = msg(i, to=f"r{i % 4}", mid=f"o{i:07d}")
        try:
            await store.enqueue(m, 10**6)
            ok.append(m.mid)
        except StoreUnavailable:
            failed.append(m.mid)
            fail_times.append(time.monotonic())
        finally:
            in_flight.release()

    async def produce(seconds: float) -> None:
        """Open loop, as nodes do: a new send every tick whatever earlier ones wait for
        (a batch whose COMMIT was cut holds its callers until its outcome is known)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(4):
                await in_flight.acquire()
                task = asyncio.create_task(send(len(calls)))
                calls.add(task)
            await asyncio.sleep(0.001)

    await produce(1.0)
    stored_before = len(ok)
    assert stored_before > 0, "nothing was stored before the cut"
    proxy.cut_all()
    cut_at = time.monotonic()
    await produce(2.0)
    assert failed, "no call failed during the cut"
    assert fail_times[0] - cut_at < timeout(3)  # fast, not after a long hang
    proxy.restore()
    restored = len(ok)
    async with asyncio.timeout(timeout(30)):
        while len(ok) < restored + 200:  # the same store recovers by itself
            await produce(0.1)
    await asyncio.gather(*calls)  # in-doubt callers get their real outcome
    try:
        stored: set[str] = set()
        for r in range(4):
            stored.update(m.mid for m in await store.pending(f"r{r}", NOW, None, 10**6))
        assert set(ok) <= stored
        assert not set(failed) & stored
        assert len(stored) == len(ok) and len(ok) + len(failed) == len(calls)
    finally:
        await store.close()


async def test_commit_cut_after_the_server_got_it_answers_ok(pg_factory: PostgresFactory,
                                                              proxy: Proxy) -> None:
    store = pg_factory.make_pg(url=proxy.dsn(pg_factory.dsn))
    await store.open()
    try:
        proxy.trap_commit = "forward"
        # The answer to COMMIT is lost; the store asks the server, which committed.
        await store.enqueue(msg(1), 10)
        assert store.in_doubt == 1 and proxy.trap_commit is None
        assert [m.mid for m in await store.pending("bob", NOW, None, 10)] == [msg(1).mid]
    finally:
        await store.close()


async def test_commit_lost_before_the_server_got_it_is_unavailable(
        pg_factory: PostgresFactory, proxy: Proxy) -> None:
    store = pg_factory.make_pg(url=proxy.dsn(pg_factory.dsn))
    await store.open()
    try:
        proxy.trap_commit = "drop"
        with pytest.raises(StoreUnavailable, match="rolled back"):
            await store.enqueue(msg(1), 10)
        assert store.in_doubt == 1 and proxy.trap_commit is None
        assert await store.pending("bob", NOW, None, 10) == []
        await store.enqueue(msg(2), 10)  # and the store goes on
    finally:
        await store.close()


async def test_close_while_cut_does_not_hang(pg_factory: PostgresFactory,
                                             proxy: Proxy) -> None:
    store = pg_factory.make_pg(url=proxy.dsn(pg_factory.dsn))
    await store.open()
    await store.enqueue(msg(1), 10)
    proxy.cut_all()
    store.audit_nowait("kick", "bob", None, {}, NOW)
    pending = asyncio.ensure_future(store.enqueue(msg(2), 10))
    await asyncio.sleep(0)  # submitted before close()
    async with asyncio.timeout(timeout(15)):
        await store.close()
    with pytest.raises(StoreUnavailable):
        await pending


def test_with_schema_helper() -> None:
    assert with_schema("postgresql://h/db", "s") == "postgresql://h/db?schema=s"
    assert with_schema("postgresql://h/db?a=1", "s") == "postgresql://h/db?a=1&schema=s"
