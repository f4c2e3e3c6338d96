"""The embedded SQLite backend of `Store` (the default `store.url`).

Owned here: `SqliteStore`, the parsing of `sqlite://` URLs, the SQLite migration runner
(`persistence/migrations/sqlite/NNNN_name.sql`, recorded in `schema_migrations`) and the
group commit.

Design: one dedicated thread owns the only `sqlite3` connection. Async callers put an
item (operation, future) on a work queue; the thread takes *every* queued item at once
and runs them in ONE transaction (`BEGIN IMMEDIATE ... COMMIT`), then resolves the
callers' futures on their event loop. Every call made while a commit is in flight thus
joins the next commit (the `Store` contract's group commit), the queue keeps calls in
FIFO order, and the event loop never blocks on disk. Reads use the same queue: simple,
and ordered after the writes that preceded them.

Each operation runs under its own SAVEPOINT, so a per-item failure (`QueueFull`, a
duplicate key) rolls back and fails that caller only. A failure of the database itself
(disk I/O, locked, corrupt) rolls the whole batch back and fails every caller of the
batch with `StoreUnavailable`: nothing of it was committed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from importlib.resources.abc import Traversable
from typing import Any, TypeVar, cast

from openred.persistence.migrate import (
    Migration,
    check_applied,
    load_migrations,
    packaged_migrations,
)
from openred.persistence.store import (
    ACKED_KEEP_MS,
    AckResult,
    AuditEvent,
    DeliveredMarks,
    EnqueueArgs,
    HistoryEntry,
    MessageState,
    NodeRecord,
    QueueFull,
    Revocation,
    StoredMessage,
    StoreError,
    StoreUnavailable,
    Undelivered,
    outcomes_of,
)

__all__ = ["SqliteStore", "parse_sqlite_url"]

_log = logging.getLogger(__name__)

T = TypeVar("T")

MEMORY = ":memory:"
_URL_FORMS = "sqlite:///relative/path.db, sqlite:////absolute/path.db or sqlite://:memory:"

SWITCH_INTERVAL_S = 0.0005  # see _start

# sqlite3 errors that belong to one operation (bad input, a constraint): that caller gets
# the error, the rest of the batch commits. Every other sqlite3.Error is the database
# failing (I/O, locked, full, corrupt) and fails the whole batch.
_ITEM_SQLITE_ERRORS = (
    sqlite3.IntegrityError,
    sqlite3.ProgrammingError,
    sqlite3.DataError,
    sqlite3.InterfaceError,
)


def parse_sqlite_url(url: str) -> str:
    """Return the database path named by a `sqlite://` URL (absolute, or `:memory:`).

    Accepted: `sqlite:///relative/path.db` (relative to the working directory at the time
    of the call), `sqlite:////absolute/path.db` and `sqlite://:memory:`. No host, query or
    fragment: anything else raises ValueError naming `store.url`.
    """
    prefix = "sqlite://"
    if not url.startswith(prefix):
        raise ValueError(f"store.url: expected {_URL_FORMS}, got {url!r}")
    rest = url[len(prefix):]
    if rest == MEMORY:
        return MEMORY
    path = rest[1:]
    if (
        not rest.startswith("/")
        or not path
        or path.endswith("/")
        or path == MEMORY
        or any(c in path for c in "?#\x00")
    ):
        raise ValueError(f"store.url: expected {_URL_FORMS}, got {url!r}")
    # Resolved now so a later chdir cannot move the database.
    return os.path.abspath(path)


# -- migrations -----------------------------------------------------------------------


def split_statements(name: str, sql: str) -> list[str]:
    """Split a migration into single statements (sqlite3 executes one at a time)."""
    statements: list[str] = []
    buf = ""
    for line in sql.splitlines(keepends=True):
        buf += line
        # complete_statement knows about string literals, comments and trigger bodies.
        if sqlite3.complete_statement(buf):
            statements.append(buf)
            buf = ""
    leftover = [ln for ln in buf.splitlines() if ln.strip() and not ln.strip().startswith("--")]
    if leftover:
        raise StoreError(f"store: migration {name}: last statement lacks ';'")
    return statements


def _run_migrations(conn: sqlite3.Connection, migrations: list[Migration],
                    apply: bool) -> list[str]:
    """Check applied migrations, then apply the pending ones (all in one transaction).

    Returns the names applied now (`apply`) or the names pending (not `apply`).
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
            " checksum TEXT NOT NULL, applied_at INTEGER NOT NULL)"
        )
        pending = check_applied(
            migrations, conn.execute("SELECT version, name, checksum FROM schema_migrations"))
        if not apply:
            conn.execute("ROLLBACK")
            return [m.name for m in pending]
        now_ms = time.time_ns() // 1_000_000
        for migration in pending:
            for statement in split_statements(migration.name, migration.sql):
                try:
                    conn.execute(statement)
                except sqlite3.Error as exc:
                    raise StoreError(f"store: migration {migration.name} failed: {exc}") from exc
            conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum, applied_at)"
                " VALUES (?, ?, ?, ?)",
                (migration.version, migration.name, migration.checksum, now_ms),
            )
        conn.execute("COMMIT")
        return [m.name for m in pending]
    except BaseException:
        _rollback(conn)
        raise


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            # The connection is already in trouble; the next BEGIN reports it.
            pass


# -- operations: run on the store thread, inside the batch transaction ------------------

_NODE_COLUMNS = "id, key, meta, banned, registered, first_seen, last_seen"
_MESSAGE_COLUMNS = "mid, sender, recipient, body, created, expires, sig, receipt, meta"
_HISTORY_COLUMNS = "topic, seq, mid, sender, body, ts, sig, meta"


def _node(row: tuple[Any, ...]) -> NodeRecord:
    return NodeRecord(
        id=row[0],
        key=row[1],
        meta=json.loads(row[2]),
        banned=bool(row[3]),
        registered=bool(row[4]),
        first_seen=row[5],
        last_seen=row[6],
    )


def _message(row: tuple[Any, ...]) -> StoredMessage:
    return StoredMessage(
        mid=row[0], sender=row[1], recipient=row[2], body=row[3], created=row[4],
        expires=row[5], sig=row[6], receipt=bool(row[7]), meta=_meta_of(row[8]),
    )


def _history(row: tuple[Any, ...]) -> HistoryEntry:
    return HistoryEntry(topic=row[0], seq=row[1], mid=row[2], sender=row[3], body=row[4],
                        ts=row[5], sig=row[6], meta=_meta_of(row[7]))


def _meta_json(meta: dict[str, str] | None) -> str | None:
    """docs/protocol.md §4.1 meta as stored: JSON text, NULL for none."""
    return _dumps(meta) if meta else None


def _meta_of(text: str | None) -> dict[str, str] | None:
    return None if text is None else cast(dict[str, str], json.loads(text))


def _op_ping(conn: sqlite3.Connection, marks: DeliveredMarks) -> None:
    _op_mark_delivered(conn, *marks.take_due(everything=True))  # the flush: held marks too
    conn.execute("SELECT 1").fetchone()


def _op_get_node(conn: sqlite3.Connection, node_id: str) -> NodeRecord | None:
    row = conn.execute(f"SELECT {_NODE_COLUMNS} FROM nodes WHERE id = ?", (node_id,)).fetchone()
    return None if row is None else _node(row)


def _op_node_seen(conn: sqlite3.Connection, node_id: str, key: bytes | None,
                  meta_json: str | None, now_ms: int) -> None:
    conn.execute(
        "INSERT INTO nodes (id, key, meta, first_seen, last_seen)"
        " VALUES (:id, :key, COALESCE(:meta, '{}'), :now, :now)"
        " ON CONFLICT (id) DO UPDATE SET last_seen = :now,"
        " key = COALESCE(:key, nodes.key), meta = COALESCE(:meta, nodes.meta)",
        {"id": node_id, "key": key, "meta": meta_json, "now": now_ms},
    )


def _op_session_start(conn: sqlite3.Connection, node_id: str, key: bytes | None,
                      meta_json: str | None, now_ms: int,
                      registered_only: bool) -> tuple[NodeRecord | None, int]:
    rec = _op_get_node(conn, node_id)
    banned = rec is not None and rec.banned
    if not banned and not (registered_only and (rec is None or not rec.registered)):
        _op_node_seen(conn, node_id, key, meta_json, now_ms)
    # Counted, not kept in `counts`: an entry per connected node would cost every idle
    # session ~130 bytes (bench idle) for a count only enqueues need.
    return rec, _op_count_pending(conn, node_id, now_ms)


def _op_put_node(conn: sqlite3.Connection, node_id: str, meta_json: str, key: bytes | None,
                 now_ms: int) -> tuple[NodeRecord, bool]:
    created = conn.execute("SELECT 1 FROM nodes WHERE id = ?", (node_id,)).fetchone() is None
    # A node registered before it ever connected gets first/last_seen = registration time
    # (NodeRecord has no "never"). An omitted key keeps the known one.
    conn.execute(
        "INSERT INTO nodes (id, key, meta, registered, first_seen, last_seen)"
        " VALUES (:id, :key, :meta, 1, :now, :now)"
        " ON CONFLICT (id) DO UPDATE SET meta = :meta, registered = 1,"
        " key = COALESCE(:key, nodes.key)",
        {"id": node_id, "key": key, "meta": meta_json, "now": now_ms},
    )
    node = _op_get_node(conn, node_id)
    assert node is not None
    return node, created


def _op_set_banned(conn: sqlite3.Connection, node_id: str, banned: bool,
                   now_ms: int) -> NodeRecord:
    conn.execute(
        "INSERT INTO nodes (id, banned, first_seen, last_seen) VALUES (:id, :banned, :now, :now)"
        " ON CONFLICT (id) DO UPDATE SET banned = :banned",
        {"id": node_id, "banned": int(banned), "now": now_ms},
    )
    node = _op_get_node(conn, node_id)
    assert node is not None
    return node


def _op_list_nodes(conn: sqlite3.Connection, limit: int, after: str | None) -> list[NodeRecord]:
    if after is None:
        rows = conn.execute(f"SELECT {_NODE_COLUMNS} FROM nodes ORDER BY id LIMIT ?", (limit,))
    else:
        rows = conn.execute(
            f"SELECT {_NODE_COLUMNS} FROM nodes WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
        )
    return [_node(row) for row in rows]



def _op_forget_node(conn: sqlite3.Connection, counts: PendingCounts, node_id: str,
                    now_ms: int) -> bool:
    row = conn.execute("SELECT banned FROM nodes WHERE id = ?", (node_id,)).fetchone()
    if row is not None and row[0]:  # a ban outlives the forgetting
        conn.execute("UPDATE nodes SET registered = 0, meta = '{}', key = NULL WHERE id = ?",
                     (node_id,))
    elif row is not None:
        conn.execute("DELETE FROM nodes WHERE id = ?", (node_id,))
    expired = conn.execute(
        "UPDATE messages SET expires = ? WHERE recipient = ? AND acked IS NULL AND expires > ?",
        (now_ms, node_id, now_ms)).rowcount
    counts.clear()  # the recipient's cached count no longer holds
    return row is not None or expired > 0


_REVOCATION_COLUMNS = "id, kind, subject, issued_before, created, expires"


def _revocation(row: tuple[Any, ...]) -> Revocation:
    return Revocation(id=row[0], kind=row[1], subject=row[2], issued_before=row[3],
                      created=row[4], expires=row[5])


def _op_add_revocation(conn: sqlite3.Connection, kind: str, subject: str,
                       issued_before: int | None, expires: int, now_ms: int) -> Revocation:
    conn.execute("DELETE FROM revocations WHERE expires <= ?", (now_ms,))
    old = conn.execute("SELECT issued_before, expires FROM revocations"
                       " WHERE kind = ? AND subject = ?", (kind, subject)).fetchone()
    if old is not None:
        # Delete and insert: AUTOINCREMENT gives the merged row an id above every other.
        conn.execute("DELETE FROM revocations WHERE kind = ? AND subject = ?", (kind, subject))
        if old[0] is not None:
            issued_before = old[0] if issued_before is None else max(old[0], issued_before)
        expires = max(old[1], expires)
    row = conn.execute(
        "INSERT INTO revocations (kind, subject, issued_before, created, expires)"
        f" VALUES (?, ?, ?, ?, ?) RETURNING {_REVOCATION_COLUMNS}",
        (kind, subject, issued_before, now_ms, expires)).fetchone()
    return _revocation(row)


def _op_revocations_since(conn: sqlite3.Connection, after_id: int, now_ms: int,
                          limit: int) -> list[Revocation]:
    rows = conn.execute(f"SELECT {_REVOCATION_COLUMNS} FROM revocations"
                        " WHERE id > ? AND expires > ? ORDER BY id LIMIT ?",
                        (after_id, now_ms, limit))
    return [_revocation(row) for row in rows]


_NEVER = 2**63 - 1


class PendingCounts:
    """Per-recipient count of unacked, unexpired messages, for the `QueueFull` check.

    Counting a recipient's queue on every enqueue costs O(queue): with 100,000 pending
    messages (the default bound) for one offline node that is milliseconds per enqueue,
    on the one thread every writer waits for. So the store thread counts once and then
    keeps the count: an entry counted at `as_of` (message time, ms) is exact for any time
    in [as_of, next_expiry) — next_expiry being the earliest expiry among the counted —
    given +1 per enqueue and -1 per ack of a counted message. Outside that window it is
    counted again. Only the store thread touches it; it relies on this store being the
    only writer of `messages` (one hub per SQLite file), and is cleared whenever a
    transaction fails or rows are purged.
    """

    max_entries = 100_000  # bounded memory: cleared beyond this many recipients

    def __init__(self) -> None:
        # recipient -> [count, as_of, next_expiry]
        self._entries: dict[str, list[int]] = {}

    def count(self, conn: sqlite3.Connection, recipient: str, now_ms: int) -> int:
        entry = self._entries.get(recipient)
        if entry is None or not entry[1] <= now_ms < entry[2]:
            count, next_expiry = conn.execute(
                "SELECT COUNT(*), MIN(expires) FROM messages"
                " WHERE recipient = ? AND acked IS NULL AND expires > ?",
                (recipient, now_ms),
            ).fetchone()
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            entry = [count, now_ms, _NEVER if next_expiry is None else next_expiry]
            self._entries[recipient] = entry
        return entry[0]

    def added(self, recipient: str, expires: int) -> None:
        entry = self._entries.get(recipient)
        if entry is not None:
            entry[0] += 1
            entry[2] = min(entry[2], expires)

    def acked(self, recipient: str, expires: int) -> None:
        entry = self._entries.get(recipient)
        # Messages already expired at as_of were not counted.
        if entry is not None and expires > entry[1]:
            entry[0] -= 1

    def clear(self) -> None:
        self._entries.clear()


def _op_enqueue(conn: sqlite3.Connection, counts: PendingCounts, msg: StoredMessage,
                max_pending: int, cid: str | None, dedup_window_ms: int) -> str | None:
    if cid is not None:
        # docs/protocol.md §4.2: a remembered (sender, cid) is answered with the first
        # message's mid, before the queue bound (the first was accepted). The calls of
        # a batch run in order on one connection: a repeat in the same batch sees the
        # row its first wrote, and none if the first was rolled back.
        row = conn.execute("SELECT mid FROM dedup WHERE sender = ? AND cid = ? AND expires > ?",
                           (msg.sender, cid, msg.created)).fetchone()
        if row is not None:
            return cast(str, row[0])
    # The bound counts unacked messages unexpired at the message's creation time (enqueue
    # has no clock of its own).
    if counts.count(conn, msg.recipient, msg.created) >= max_pending:
        raise QueueFull("queue full")
    conn.execute(
        "INSERT INTO messages (mid, sender, recipient, body, sig, receipt, created, expires,"
        " meta) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (msg.mid, msg.sender, msg.recipient, msg.body, msg.sig, int(msg.receipt),
         msg.created, msg.expires, _meta_json(msg.meta)),
    )
    if cid is not None:
        # Same savepoint as the message: both or neither. An expired row is replaced.
        conn.execute(
            "INSERT INTO dedup (sender, cid, mid, created, expires) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (sender, cid) DO UPDATE SET mid = excluded.mid,"
            " created = excluded.created, expires = excluded.expires",
            (msg.sender, cid, msg.mid, msg.created, msg.created + dedup_window_ms))
    counts.added(msg.recipient, msg.expires)
    return None


def _op_pending(conn: sqlite3.Connection, node_id: str, now_ms: int, after_mid: str | None,
                limit: int) -> list[StoredMessage]:
    after_seq = 0
    if after_mid is not None:
        row = conn.execute(
            "SELECT seq FROM messages WHERE mid = ? AND recipient = ?", (after_mid, node_id)
        ).fetchone()
        # An unknown (or purged) after_mid pages from the start: at least once (§4) means
        # a repeat is acceptable, a silently skipped message is not.
        if row is not None:
            after_seq = row[0]
    rows = conn.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages"
        " WHERE recipient = ? AND acked IS NULL AND seq > ? AND expires > ?"
        " ORDER BY seq LIMIT ?",
        (node_id, after_seq, now_ms, limit),
    )
    return [_message(row) for row in rows]


def _op_count_pending(conn: sqlite3.Connection, node_id: str, now_ms: int) -> int:
    (count,) = conn.execute(
        "SELECT COUNT(*) FROM messages WHERE recipient = ? AND acked IS NULL AND expires > ?",
        (node_id, now_ms),
    ).fetchone()
    return int(count)


def _op_pending_total(conn: sqlite3.Connection, now_ms: int) -> int:
    (count,) = conn.execute(
        "SELECT COUNT(*) FROM messages WHERE acked IS NULL AND expires > ?", (now_ms,)
    ).fetchone()
    return int(count)


def _op_hold_delivered(conn: sqlite3.Connection, mids: list[str], now_ms: int) -> None:
    """Marker operation of `mark_delivered_nowait`: the store thread holds the marks
    (`DeliveredMarks`) instead of running it."""


def _op_mark_delivered(conn: sqlite3.Connection, mids: list[str], times: list[int]) -> None:
    # The first delivery time is kept; a redelivery does not move it.
    conn.executemany(
        "UPDATE messages SET delivered = ? WHERE mid = ? AND delivered IS NULL",
        zip(times, mids, strict=True),
    )


def _op_ack(conn: sqlite3.Connection, counts: PendingCounts, marks: DeliveredMarks,
            node_id: str, mids: list[str], now_ms: int) -> list[AckResult]:
    # One statement per ack frame (not per mid: a quarter less time per mid). §4: only
    # the recipient acks; an unknown mid or another node's changes nothing. An ack
    # proves delivery even if the best-effort delivered mark was lost; it writes the
    # mark held for it (DeliveredMarks) in the same row update.
    acked: dict[str, AckResult] = {}
    for start in range(0, len(mids), _ACK_CHUNK):
        chunk = dict.fromkeys(mids[start:start + _ACK_CHUNK])  # a mid named twice: once
        args: list[Any] = [now_ms]
        for mid in chunk:
            at = marks.get(mid)  # taken below only if this ack acks it
            args += (mid, now_ms if at is None else at)
        args.append(node_id)
        rows = conn.execute(
            "UPDATE messages SET acked = ?, delivered = COALESCE(messages.delivered, v.column2)"
            f" FROM (VALUES {', '.join(['(?, ?)'] * len(chunk))}) AS v"
            " WHERE messages.mid = v.column1 AND messages.recipient = ?"
            " AND messages.acked IS NULL RETURNING messages.mid, sender, receipt, expires",
            args,
        ).fetchall()
        for mid, sender, receipt, expires in rows:
            counts.acked(node_id, expires)
            marks.take(mid)
            acked[mid] = AckResult(mid=mid, sender=sender, receipt=bool(receipt))
    return [acked[mid] for mid in dict.fromkeys(mids) if mid in acked]  # in the ack's order


# Mids per ack statement: 2 parameters each, within SQLite's 32,766 (and few distinct
# statement texts for the statement cache).
_ACK_CHUNK = 256

# Operations that write with one statement at most (besides _op_enqueue without a cid):
# they run without a savepoint of their own.
_ONE_WRITE = frozenset({_op_mark_delivered})


def _op_message_state(conn: sqlite3.Connection, marks: DeliveredMarks, mid: str,
                      now_ms: int) -> MessageState | None:
    row = conn.execute(
        "SELECT sender, recipient, created, expires, delivered, acked FROM messages"
        " WHERE mid = ?",
        (mid,),
    ).fetchone()
    if row is None:
        return None
    sender, recipient, created, expires, delivered, acked = row
    if delivered is None and acked is None:
        delivered = marks.get(mid)
    if acked is not None:
        state = "acked"
    elif expires <= now_ms:
        state = "expired"
    elif delivered is not None:
        state = "delivered"
    else:
        state = "stored"
    return MessageState(mid=mid, sender=sender, recipient=recipient, qos=1, state=state,
                        created=created, delivered=delivered, acked=acked)


def _op_purge_expired(conn: sqlite3.Connection, counts: PendingCounts, now_ms: int) -> int:
    counts.clear()
    cur = conn.execute(
        "DELETE FROM messages WHERE expires <= ? OR acked <= ?",
        (now_ms, now_ms - ACKED_KEEP_MS),
    )
    # docs/protocol.md §4.2: a cid is remembered for its window only.
    cids = conn.execute("DELETE FROM dedup WHERE expires <= ?", (now_ms,))
    return cur.rowcount + cids.rowcount


def _op_mark_undelivered(conn: sqlite3.Connection, marks: list[tuple[str, str]],
                         now_ms: int) -> None:
    conn.executemany(
        "INSERT INTO undelivered (recipient, since, mark) VALUES (?, ?, ?)"
        " ON CONFLICT (recipient) DO UPDATE SET mark = excluded.mark",
        [(recipient, now_ms, mark) for recipient, mark in marks],
    )


def _op_undelivered(conn: sqlite3.Connection, limit: int) -> list[Undelivered]:
    rows = conn.execute(
        "SELECT recipient, since, mark FROM undelivered ORDER BY since, recipient LIMIT ?",
        (limit,),
    )
    return [Undelivered(recipient=r[0], since=r[1], mark=r[2]) for r in rows]


def _op_clear_undelivered(conn: sqlite3.Connection, marks: list[tuple[str, str]]) -> int:
    cleared = 0
    for recipient, mark in marks:
        cur = conn.execute("DELETE FROM undelivered WHERE recipient = ? AND mark = ?",
                           (recipient, mark))
        cleared += cur.rowcount
    return cleared


def _op_append_history(conn: sqlite3.Connection, entry: HistoryEntry, keep: int,
                       ttl_ms: int) -> int:
    # The sequence number is taken in the transaction that keeps the entry (entry.seq
    # is ignored): docs/protocol.md §6, numbered by the store, with or without a broker.
    seq = int(conn.execute(
        "INSERT INTO topics (name, last_seq) VALUES (?, 1)"
        " ON CONFLICT (name) DO UPDATE SET last_seq = topics.last_seq + 1"
        " RETURNING last_seq",
        (entry.topic,),
    ).fetchone()[0])
    if keep <= 0:
        conn.execute("DELETE FROM history WHERE topic = ?", (entry.topic,))
        return seq
    conn.execute(
        f"INSERT INTO history ({_HISTORY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (entry.topic, seq, entry.mid, entry.sender, entry.body, entry.ts, entry.sig,
         _meta_json(entry.meta)),
    )
    # Oldest first beyond `keep`, and anything older than the ttl (entry.ts is "now").
    conn.execute(
        "DELETE FROM history WHERE topic = :topic AND (ts <= :cutoff OR seq <= ("
        " SELECT seq FROM history WHERE topic = :topic ORDER BY seq DESC LIMIT 1 OFFSET :keep))",
        {"topic": entry.topic, "cutoff": entry.ts - ttl_ms, "keep": keep},
    )
    return seq


def _op_history_since(conn: sqlite3.Connection, topic: str, since: int, now_ms: int,
                      ttl_ms: int) -> list[HistoryEntry]:
    rows = conn.execute(
        f"SELECT {_HISTORY_COLUMNS} FROM history WHERE topic = ? AND seq > ? AND ts > ?"
        " ORDER BY seq",
        (topic, since, now_ms - ttl_ms),
    )
    return [_history(r) for r in rows]


def _op_history_before(conn: sqlite3.Connection, topic: str, before: int | None, limit: int,
                       now_ms: int, ttl_ms: int) -> list[HistoryEntry]:
    rows = conn.execute(
        f"SELECT {_HISTORY_COLUMNS} FROM history WHERE topic = ? AND seq < ? AND ts > ?"
        " ORDER BY seq DESC LIMIT ?",
        (topic, _NEVER if before is None else before, now_ms - ttl_ms, limit),
    )
    return [_history(r) for r in reversed(rows.fetchall())]


def _op_last_seq(conn: sqlite3.Connection, topic: str) -> int:
    row = conn.execute("SELECT last_seq FROM topics WHERE name = ?", (topic,)).fetchone()
    return 0 if row is None else int(row[0])


def _op_audit(conn: sqlite3.Connection, kind: str, node: str | None, ip: str | None,
              detail_json: str, now_ms: int) -> None:
    conn.execute(
        "INSERT INTO audit (ts, kind, node, ip, detail) VALUES (?, ?, ?, ?, ?)",
        (now_ms, kind, node, ip, detail_json),
    )


def _op_audit_query(conn: sqlite3.Connection, node: str | None, kind: str | None,
                    since: int | None, limit: int, before_id: int | None) -> list[AuditEvent]:
    clauses: list[str] = []
    params: list[Any] = []
    for clause, value in (("node = ?", node), ("kind = ?", kind), ("ts >= ?", since),
                          ("id < ?", before_id)):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
    rows = conn.execute(
        f"SELECT id, ts, kind, node, ip, detail FROM audit {where}ORDER BY id DESC LIMIT ?",
        (*params, limit),
    )
    return [AuditEvent(id=r[0], ts=r[1], kind=r[2], node=r[3], ip=r[4], detail=json.loads(r[5]))
            for r in rows]


# -- the store ----------------------------------------------------------------------------


class _Item:
    """One queued operation. `future` None: fire-and-forget (a `*_nowait` call)."""

    __slots__ = ("args", "fn", "future", "raw")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...],
                 future: asyncio.Future[Any] | None, raw: bool = False) -> None:
        self.fn = fn
        self.args = args
        self.future = future
        # raw: runs alone, outside the batch transaction (migrations manage their own;
        # the close item stops the thread).
        self.raw = raw


def _stop(conn: sqlite3.Connection) -> None:
    """Marker operation of `close()`: the thread stops after it."""


_Outcome = tuple[_Item, Any, BaseException | None]


def _resolve(results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, value, exc in results:
        if future.done():  # the caller gave up (cancelled); the work was done anyway
            continue
        if exc is None:
            future.set_result(value)
        else:
            future.set_exception(exc)


def _unavailable(exc: BaseException | str) -> StoreUnavailable:
    err = StoreUnavailable(f"store: sqlite unavailable: {exc}")
    if isinstance(exc, BaseException):
        err.__cause__ = exc
    return err


class SqliteStore:
    """`Store` on one SQLite file (or `:memory:`), group-committed by one thread.

    Durability: `journal_mode=WAL` with `synchronous=FULL`. With NORMAL, WAL is synced only
    at checkpoints, so a power cut could lose commits whose `enqueue` already returned,
    i.e. messages already answered `ok stored` (§4). FULL syncs the WAL at every commit;
    the group commit makes that one fsync per batch, not per message.

    Attributes for operators and tests (set the tunables before `open()`):
    - `commits`: transactions committed so far (one per batch; shows the group commit).
    - `nowait_dropped`: `*_nowait` items dropped (queue bound reached, store closed or
      failing).
    - `max_nowait` (100,000): bound on queued fire-and-forget items, so outside input
      cannot grow memory without bound.
    - `nowait_linger_s` (0.05): fire-and-forget items alone wait this long for an awaited
      call to ride with, instead of committing on their own.
    - `delivered_marks`: delivered marks held for the ack to write (`DeliveredMarks`:
      `hold_s` 1, `max_held` 100,000).
    - `busy_timeout_ms` (5,000): how long to wait for another process holding the write
      lock (e.g. `openred-hub migrate`) before the batch fails with StoreUnavailable.
    """

    max_nowait: int = 100_000
    nowait_linger_s: float = 0.05
    busy_timeout_ms: int = 5_000

    def __init__(self, url: str, *, auto_migrate: bool = True,
                 migrations_dir: Traversable | None = None) -> None:
        self.url = url
        self.path = parse_sqlite_url(url)
        self.auto_migrate = auto_migrate
        # None: the packaged migrations; tests point this elsewhere.
        self._migrations_dir = migrations_dir
        self.commits = 0
        self._counts = PendingCounts()  # store thread only
        self.delivered_marks = DeliveredMarks()  # store thread only
        self._dropped_loop = 0  # counted under _cond (event loop side)
        self._dropped_thread = 0  # counted by the store thread only
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[_Item] = deque()
        self._awaited = 0  # awaited items in _queue
        self._nowait = 0  # fire-and-forget items in _queue
        self._thread: threading.Thread | None = None
        self._closed = False
        self._dead = False  # the thread stopped (close, or a crash)
        self._busy = False  # the store thread is running a batch (pool_usage)

    @property
    def nowait_dropped(self) -> int:
        return self._dropped_loop + self._dropped_thread

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        await self._start()
        try:
            if self.auto_migrate:
                await self.migrate()
            else:
                pending = await self._call_raw(self._migrations, False)
                if pending:
                    raise StoreError(f"store: {len(pending)} migration(s) pending "
                                     f"({', '.join(pending)}); run openred-hub migrate")
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            if thread is None or self._dead:
                return
            # FIFO: everything queued before this item is committed first.
            done: asyncio.Future[Any] = loop.create_future()
            self._queue.append(_Item(_stop, (), done, raw=True))
            self._awaited += 1
            self._cond.notify()
        try:
            await done
        finally:
            # The thread resolves `done` as its last act; this join is immediate.
            thread.join(timeout=5)

    async def migrate(self) -> list[str]:
        """Apply pending migrations; may be called before `open()` (it connects then)."""
        await self._start()
        return await self._call_raw(self._migrations, True)

    async def ping(self) -> None:
        await self._call(_op_ping, self.delivered_marks)

    # -- nodes ----------------------------------------------------------------------------

    async def get_node(self, node_id: str) -> NodeRecord | None:
        return await self._call(_op_get_node, node_id)

    async def node_seen(self, node_id: str, key: bytes | None, meta: dict[str, Any] | None,
                        now_ms: int) -> None:
        meta_json = None if meta is None else _dumps(meta)
        await self._call(_op_node_seen, node_id, key, meta_json, now_ms)

    async def session_start(self, node_id: str, key: bytes | None,
                            meta: dict[str, Any] | None, now_ms: int, *,
                            registered_only: bool = False) -> tuple[NodeRecord | None, int]:
        meta_json = None if meta is None else _dumps(meta)
        return await self._call(_op_session_start, node_id, key, meta_json, now_ms,
                                registered_only)

    async def put_node(self, node_id: str, meta: dict[str, Any], key: bytes | None,
                       now_ms: int) -> tuple[NodeRecord, bool]:
        return await self._call(_op_put_node, node_id, _dumps(meta), key, now_ms)

    async def set_banned(self, node_id: str, banned: bool, now_ms: int) -> NodeRecord:
        return await self._call(_op_set_banned, node_id, banned, now_ms)

    async def list_nodes(self, limit: int, after: str | None) -> list[NodeRecord]:
        # max(): SQLite reads a negative LIMIT as "no limit".
        return await self._call(_op_list_nodes, max(limit, 0), after)

    async def forget_node(self, node_id: str, now_ms: int) -> bool:
        return await self._call(_op_forget_node, self._counts, node_id, now_ms)

    # -- token revocations ------------------------------------------------------------------

    async def add_revocation(self, kind: str, subject: str, issued_before: int | None,
                             expires: int, now_ms: int) -> Revocation:
        return await self._call(_op_add_revocation, kind, subject, issued_before, expires,
                                now_ms)

    async def revocations_since(self, after_id: int, now_ms: int,
                                limit: int) -> list[Revocation]:
        return await self._call(_op_revocations_since, after_id, now_ms, max(limit, 0))

    # -- QoS 1 queues -----------------------------------------------------------------------

    async def enqueue(self, msg: StoredMessage, max_pending: int, *, cid: str | None = None,
                      dedup_window_ms: int = 0) -> str | None:
        return await self._call(_op_enqueue, self._counts, msg, max_pending, cid,
                                dedup_window_ms)

    async def enqueue_many(self, items: list[EnqueueArgs]) -> list[str | StoreError | None]:
        return await outcomes_of([self._submit(_op_enqueue, (self._counts, *args))
                                  for args in items])

    async def pending(self, node_id: str, now_ms: int, after_mid: str | None,
                      limit: int) -> list[StoredMessage]:
        return await self._call(_op_pending, node_id, now_ms, after_mid, max(limit, 0))

    async def count_pending(self, node_id: str, now_ms: int) -> int:
        return await self._call(_op_count_pending, node_id, now_ms)

    async def pending_total(self, now_ms: int) -> int:
        return await self._call(_op_pending_total, now_ms)

    def pool_usage(self) -> tuple[int, int]:
        return (1 if self._busy else 0), 1  # one connection, owned by the store thread

    def mark_delivered_nowait(self, mids: list[str], now_ms: int) -> None:
        if mids:
            self._submit_nowait(_op_hold_delivered, (list(mids), now_ms))

    async def ack(self, node_id: str, mids: list[str], now_ms: int) -> list[AckResult]:
        if not mids:
            self._check_usable()
            return []
        return await self._call(_op_ack, self._counts, self.delivered_marks, node_id,
                                list(mids), now_ms)

    async def message_state(self, mid: str, now_ms: int) -> MessageState | None:
        return await self._call(_op_message_state, self.delivered_marks, mid, now_ms)

    async def purge_expired(self, now_ms: int) -> int:
        return await self._call(_op_purge_expired, self._counts, now_ms)

    # -- delivery hints -----------------------------------------------------------------------

    async def mark_undelivered(self, marks: list[tuple[str, str]], now_ms: int) -> None:
        if marks:
            await self._call(_op_mark_undelivered, list(marks), now_ms)
        else:
            self._check_usable()

    async def undelivered(self, limit: int) -> list[Undelivered]:
        return await self._call(_op_undelivered, max(limit, 0))

    async def clear_undelivered(self, marks: list[tuple[str, str]]) -> int:
        if not marks:
            self._check_usable()
            return 0
        return await self._call(_op_clear_undelivered, list(marks))

    # -- topic history ------------------------------------------------------------------------

    async def append_history(self, entry: HistoryEntry, keep: int, ttl_ms: int) -> int:
        seq: int = await self._call(_op_append_history, entry, keep, ttl_ms)
        return seq

    async def history_since(self, topic: str, since: int, now_ms: int,
                            ttl_ms: int) -> list[HistoryEntry]:
        return await self._call(_op_history_since, topic, since, now_ms, ttl_ms)

    async def history_before(self, topic: str, before: int | None, limit: int, now_ms: int,
                             ttl_ms: int) -> list[HistoryEntry]:
        return await self._call(_op_history_before, topic, before, max(limit, 0), now_ms,
                                ttl_ms)

    async def last_seq(self, topic: str) -> int:
        return await self._call(_op_last_seq, topic)

    # -- audit ----------------------------------------------------------------------------------

    def audit_nowait(self, kind: str, node: str | None, ip: str | None,
                     detail: dict[str, Any], now_ms: int) -> None:
        try:
            # default=str: an odd value in `detail` is recorded as text, never raises here.
            detail_json = _dumps(detail, default=str)
        except (TypeError, ValueError):  # e.g. a circular structure
            with self._cond:
                self._dropped_loop += 1
            return
        self._submit_nowait(_op_audit, (kind, node, ip, detail_json, now_ms))

    async def audit_query(self, node: str | None, kind: str | None, since: int | None,
                          limit: int, before_id: int | None) -> list[AuditEvent]:
        return await self._call(_op_audit_query, node, kind, since, max(limit, 0), before_id)

    # -- the queue (event loop side) -----------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise StoreUnavailable("store: closed")
        if self._thread is None:
            raise StoreUnavailable("store: not open")
        if self._dead:
            raise StoreUnavailable("store: sqlite thread stopped")

    def _submit(self, fn: Callable[..., Any], args: tuple[Any, ...],
                raw: bool = False) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        with self._cond:
            self._check_usable()
            self._queue.append(_Item(fn, args, future, raw))
            self._awaited += 1
            self._cond.notify()
        return future

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return cast(T, await self._submit(fn, args))

    async def _call_raw(self, fn: Callable[..., T], *args: Any) -> T:
        return cast(T, await self._submit(fn, args, raw=True))

    def _submit_nowait(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        with self._cond:
            if (self._closed or self._thread is None or self._dead
                    or self._nowait >= self.max_nowait):
                self._dropped_loop += 1
                return
            self._queue.append(_Item(fn, args, None))
            self._nowait += 1
            # Only an idle thread (waiting without timeout on an empty queue) needs waking;
            # otherwise the item rides with the batch being formed.
            if len(self._queue) == 1:
                self._cond.notify()

    async def _start(self) -> None:
        with self._cond:
            if self._closed:
                raise StoreUnavailable("store: closed")
            if self._thread is not None:
                return
            ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            # The store thread takes the GIL back after every sqlite3 call. While the
            # loop is busy in C (a flush of 10,000 socket writes), each take waits for
            # the switch interval: at the default 5 ms a group commit was measured to
            # wait up to 155 ms, at 0.5 ms under 5 ms (bench fanout, 10 publishes/s).
            if sys.getswitchinterval() > SWITCH_INTERVAL_S:
                sys.setswitchinterval(SWITCH_INTERVAL_S)
            # daemon: a store never closed must not keep the process alive at exit.
            self._thread = threading.Thread(
                target=self._run, args=(ready,), name="openred-store-sqlite", daemon=True
            )
            self._thread.start()
        try:
            await ready
        except BaseException:
            self._thread.join(timeout=5)
            raise

    # -- the store thread ------------------------------------------------------------------------

    def _migrations(self, conn: sqlite3.Connection, apply: bool) -> list[str]:
        directory = self._migrations_dir
        if directory is None:
            directory = packaged_migrations("sqlite")
        return _run_migrations(conn, load_migrations(directory), apply)

    def _connect(self) -> sqlite3.Connection:
        if sqlite3.sqlite_version_info < (3, 24, 0):  # UPSERT
            raise StoreUnavailable(f"store: sqlite {sqlite3.sqlite_version} is too old "
                                   "(3.24 or newer needed)")
        try:
            # isolation_level=None: no implicit transactions; the batch loop issues
            # BEGIN IMMEDIATE / SAVEPOINT / COMMIT itself.
            conn = sqlite3.connect(self.path, isolation_level=None, cached_statements=256)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"store: cannot open {self.path!r}: {exc}") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            conn.execute("PRAGMA journal_mode = WAL").fetchone()
            conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as exc:
            conn.close()
            raise StoreUnavailable(f"store: cannot open {self.path!r}: {exc}") from exc
        return conn

    def _run(self, ready: asyncio.Future[None]) -> None:
        try:
            conn = self._connect()
        except StoreError as exc:
            with self._cond:
                self._dead = True
                # Calls queued meanwhile (a concurrent open/migrate) fail with it.
                left = list(self._queue)
                self._queue.clear()
            self._post([(_Item(_stop, (), ready), None, exc)])
            self._post([(item, None, StoreUnavailable(str(exc))) for item in left])
            return
        self._post([(_Item(_stop, (), ready), None, None)])
        stop: _Item | None = None
        batch: list[_Item] = []
        try:
            while stop is None:
                batch = self._take()
                self._busy = True
                stop = self._process(conn, batch)
                self._busy = False
                batch = []
        except BaseException as exc:  # a bug: fail loudly, never leave a caller waiting
            _log.exception("store_thread_crashed")
            self._post([(item, None, _unavailable(exc)) for item in batch])
        finally:
            with self._cond:
                self._dead = True
                left = list(self._queue)
                self._queue.clear()
            self._post([(item, None, _unavailable("store closed")) for item in left])
            conn.close()
            if stop is not None:
                self._post([(stop, None, None)])

    def _take(self) -> list[_Item]:
        """Wait for work, then take all of it (the batch)."""
        marks = self.delivered_marks
        with self._cond:
            deadline: float | None = None
            while self._awaited == 0:
                if not self._queue:
                    deadline = None
                    due_in = marks.due_in()
                    if due_in is None:
                        self._cond.wait()
                        continue
                    if due_in <= 0:
                        return []  # no work, but held delivered marks are due
                    self._cond.wait(due_in)
                    continue
                # Only fire-and-forget items: linger for an awaited call to ride with.
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.nowait_linger_s
                if now >= deadline:
                    break
                self._cond.wait(deadline - now)
            batch = list(self._queue)
            self._queue.clear()
            self._awaited = 0
            self._nowait = 0
            return batch

    def _process(self, conn: sqlite3.Connection, batch: list[_Item]) -> _Item | None:
        """Run a batch: runs of ordinary items as one transaction each, raw items alone.

        Returns the close item if the batch holds one (the thread stops after it).
        """
        outcomes: list[_Outcome] = []
        run: list[_Item] = []
        stop: _Item | None = None
        marks = self.delivered_marks
        for item in batch:  # held first: an ack of this batch may write its mark
            if item.fn is _op_hold_delivered:
                marks.hold(*item.args)
        for item in batch:
            if stop is not None:  # nothing is queued after close(); be safe anyway
                outcomes.append((item, None, StoreUnavailable("store: closed")))
            elif item.fn is _op_hold_delivered:
                continue
            elif not item.raw:
                run.append(item)
            else:
                if item.fn is _stop:  # closing: the held marks are written first
                    self._add_due_marks(run, everything=True)
                outcomes.extend(self._transaction(conn, run))
                run = []
                if item.fn is _stop:
                    stop = item
                else:
                    outcomes.append(self._run_raw(conn, item))
        self._add_due_marks(run)
        outcomes.extend(self._transaction(conn, run))
        self._post(outcomes)
        return stop

    def _add_due_marks(self, run: list[_Item], everything: bool = False) -> None:
        mids, times = self.delivered_marks.take_due(everything)
        if mids:
            run.append(_Item(_op_mark_delivered, (mids, times), None))

    def _run_raw(self, conn: sqlite3.Connection, item: _Item) -> _Outcome:
        try:
            return item, item.fn(conn, *item.args), None
        except Exception as exc:
            return item, None, _unavailable(exc) if _is_batch_error(exc) else _item_error(exc)

    def _transaction(self, conn: sqlite3.Connection, items: list[_Item]) -> list[_Outcome]:
        """Run `items` in one transaction: the group commit."""
        if not items:
            return []
        outcomes: list[_Outcome] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for item in items:
                # A savepoint per item that writes more than one statement; SQLite
                # undoes a failed single statement by itself.
                savepoint = not (item.fn in _ONE_WRITE
                                 or (item.fn is _op_enqueue and item.args[3] is None))
                if savepoint:
                    conn.execute("SAVEPOINT op")
                try:
                    value = item.fn(conn, *item.args)
                except Exception as exc:
                    if _is_batch_error(exc):
                        raise
                    if savepoint:
                        conn.execute("ROLLBACK TO op")
                    if not isinstance(exc, QueueFull):  # QueueFull changed nothing
                        self._counts.clear()
                    outcomes.append((item, None, _item_error(exc)))
                else:
                    outcomes.append((item, value, None))
                if savepoint:
                    conn.execute("RELEASE op")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(conn)
            self._counts.clear()  # it may count rows that were rolled back
            _log.warning("store_batch_failed", extra={"error": str(exc), "items": len(items)})
            # One exception object per caller: each await appends its own traceback.
            return [(item, None, _unavailable(exc)) for item in items]
        self.commits += 1
        return outcomes

    def _post(self, outcomes: Iterable[_Outcome]) -> None:
        """Hand results to the callers' loops: one wake-up per loop per batch."""
        by_loop: dict[asyncio.AbstractEventLoop,
                      list[tuple[asyncio.Future[Any], Any, BaseException | None]]] = {}
        for item, value, exc in outcomes:
            if item.future is None:
                if exc is not None:
                    self._dropped_thread += 1
                continue
            by_loop.setdefault(item.future.get_loop(), []).append((item.future, value, exc))
        for loop, results in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, results)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass


def _dumps(value: dict[str, Any], default: Callable[[Any], Any] | None = None) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=default)


def _is_batch_error(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.Error) and not isinstance(exc, _ITEM_SQLITE_ERRORS)


def _item_error(exc: Exception) -> Exception:
    if isinstance(exc, sqlite3.IntegrityError):
        # e.g. a duplicate mid: sqlite's text names the constraint, never the values.
        err = StoreError(f"store: constraint failed: {exc}")
        err.__cause__ = exc
        return err
    return exc
