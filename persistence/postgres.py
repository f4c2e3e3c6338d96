"""The PostgreSQL backend of `Store` (`store.url = "postgresql://..."`), for hubs that
share one database.

Owned here: `PostgresStore`, the parsing of `postgresql://` URLs (libpq forms, plus our
own `schema` query parameter), the PostgreSQL migration runner
(`persistence/migrations/postgres/NNNN_name.sql`, recorded in `schema_migrations`,
serialised across hub instances by an advisory lock), the day partitions of `messages`
and `audit` (`maintain`), and the group commit.

Design: an asyncpg pool; every connection is borrowed with `async with pool.acquire()`
for one query or one transaction. Writes (enqueue, ack, append_history and the
`*_nowait` calls) go on FIFO queues, each drained by ONE writer task (`_Lane`): it takes
everything queued and commits it as one transaction of set-based statements (`INSERT
... SELECT FROM unnest($1::text[], ...)`, one per kind of write), then resolves the
callers' futures. Calls made while a commit is in flight join the next one (group
commit), and each writer keeps its commit order equal to the call order. Acks and
delivered marks have a lane (and a connection) of their own, so a QoS 1 `ok` never waits
for the acks of other messages, nor acks for stores: the two never touch the same row
(a message is acked only once delivered, and delivered only once its enqueue committed).
Everything else (enqueues, session starts, history, audit) shares the other lane: the
queue bound, the cid rows and the node rows are written in call order. Reads run on
their own pooled connection, after the queued writes of the data they read
(`_barrier`); `ping()` waits for every queued write (a flush). Node writes are single
upserts, not queued.

Failure at the boundary: asyncpg and OS errors become `StoreUnavailable`, except bad
values and constraint violations, which fail the one caller that sent them (the batch
is rolled back and re-run one item per transaction). A connection lost while COMMIT is
in flight leaves the batch in doubt: its transaction id is checked with `txid_status()`
once the server answers again, and the callers learn the real outcome (never `ok` for a
batch that was rolled back, never `unavailable` for one that committed). Only if the
server stays away longer than `in_doubt_timeout_s` do they get `unavailable` unresolved;
should that batch turn out committed later, its messages are taken back (deleted) so
that none refused is delivered (except those sent with a `cid`: docs/protocol.md §4.2,
`_compensate`). The pool reconnects by itself when the server returns.

Read replica (`store.read_url`): a second pool, on a streaming replica of the same
database, for the reads that tolerate replication lag: `list_nodes` (admin lists),
`audit_query`, `message_state`, and the part of `history_since` older than
`replica_history_age_s`. Everything that decides delivery or access stays on the primary:
the QoS 1 queue (`pending`, `count_pending`, `enqueue`), acks, bans and authentication
(`get_node`), `last_seq`, and every write. A replica that cannot be reached or fails a
query is bypassed: that read, and the following ones for `replica_retry_s`, run on the
primary, and then the replica is tried again. Old history is read from the replica only
when it has replayed a transaction committed less than half of `replica_history_age_s`
ago, so the entries it is asked for were committed and replayed before (the rest of the
history, and everything when the replica lags or the primary is idle, comes from the
primary): the answer is then what the primary holds, except that entries the primary
trimmed within the lag may be returned too.

Needs PostgreSQL 12 or newer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from importlib.resources.abc import Traversable
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import asyncpg.exceptions
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

__all__ = ["PostgresStore", "parse_postgres_url"]

_log = logging.getLogger(__name__)

T = TypeVar("T")

DAY_MS = 86_400_000
_NEVER = 2**63 - 1

# Partitioned tables and their partition key (ms since the epoch, UTC days).
PARTITIONED = (("messages", "created"), ("audit", "ts"))
# maintain() keeps partitions for today and this many days ahead.
AHEAD_DAYS = 2
# ATTACH PARTITION without blocking writes to the parent, hashtextextended, txid_status.
MIN_SERVER_VERSION = 12

# Lower case only: search_path folds unquoted names to lower case.
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_SCHEMA_RULE = "1-63 lower-case letters, digits or '_', not a digit first"
_PARTITION_NAME = re.compile(r"^(?P<table>[a-z]+)_p(?P<day>\d{8})$")


def parse_postgres_url(url: str) -> tuple[str, str | None]:
    """Split a `postgresql://` URL into the DSN handed to asyncpg and the schema.

    Everything libpq/asyncpg accept passes through unchanged (libpq defaults fill what
    the URL leaves out); our own query parameter `schema=NAME` (see _SCHEMA_RULE) is
    taken out: the store's tables live in that schema (created by `migrate()`), through
    each connection's `search_path`. Bad values raise ValueError naming `store.url`
    (never echoing the URL: it may hold a password).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("store.url: expected postgresql://[user[:password]@]host[:port]/db"
                         "[?schema=NAME]")
    query = parse_qsl(parts.query, keep_blank_values=True)
    schemas = [value for key, value in query if key == "schema"]
    if not schemas:
        return url, None
    schema = schemas[-1]
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(f"store.url: schema must be {_SCHEMA_RULE}")
    rest = [(key, value) for key, value in query if key != "schema"]
    return urlunsplit(parts._replace(query=urlencode(rest))), schema


# -- error translation ----------------------------------------------------------------------

# Errors caused by one caller's values (a constraint, a value PostgreSQL or asyncpg will
# not take): that caller gets a StoreError, the rest of its batch commits. Everything
# else that asyncpg, the socket or a timeout raises means the store is unavailable.
_ITEM_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.IntegrityConstraintViolationError,
    asyncpg.exceptions.DataError,  # SQLSTATE class 22 (e.g. a NUL in text)
    asyncpg.exceptions._base.DataError,  # asyncpg could not encode an argument
)
_DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.PostgresError,
    asyncpg.exceptions.InterfaceError,
    OSError,
    TimeoutError,
)
# A COMMIT that failed with one of these got a definite answer from the server (rolled
# back); any other failure of COMMIT (connection lost, timeout) leaves it in doubt.
_CONNECTION_LOST: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InterfaceError,
    OSError,
    TimeoutError,
)


def _is_item_error(exc: BaseException) -> bool:
    return isinstance(exc, _ITEM_ERRORS)


def _item_error(exc: BaseException) -> StoreError:
    # asyncpg's encoding errors quote the value: say which kind of error, never the value.
    if isinstance(exc, asyncpg.exceptions.UniqueViolationError):
        err = _duplicate("key")
    elif isinstance(exc, asyncpg.exceptions.IntegrityConstraintViolationError):
        name = getattr(exc, "constraint_name", None) or type(exc).__name__
        err = StoreError(f"store: constraint failed: {name}")
    else:
        err = StoreError(f"store: invalid value ({type(exc).__name__})")
    err.__cause__ = exc
    return err


def _unavailable(exc: BaseException | str) -> StoreUnavailable:
    if isinstance(exc, BaseException):
        text = str(exc) or type(exc).__name__
        err = StoreUnavailable(f"store: postgresql unavailable: {text}")
        err.__cause__ = exc
        return err
    return StoreUnavailable(f"store: postgresql unavailable: {exc}")


def _copy(exc: StoreUnavailable) -> StoreUnavailable:
    err = StoreUnavailable(str(exc))
    err.__cause__ = exc.__cause__
    return err


def _translate(exc: BaseException) -> StoreError:
    return _item_error(exc) if _is_item_error(exc) else _unavailable(exc)


class _ItemFailure(Exception):
    """A statement of a batch failed because of some item's values (not the server)."""

    def __init__(self, error: StoreError) -> None:
        super().__init__(str(error))
        self.error = error


# -- text checks ----------------------------------------------------------------------------


def _text_ok(value: str) -> bool:
    """PostgreSQL text holds no NUL, and asyncpg sends UTF-8 (no lone surrogates)."""
    if "\x00" in value:
        return False
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_text(*values: str | None) -> None:
    for value in values:
        if value is not None and not _text_ok(value):
            raise StoreError("store: invalid value (text with NUL or a lone surrogate)")


def _check_message_text(msg: StoredMessage, cid: str | None) -> None:
    """`_check_text` of a message's ids, once per QoS 1 message: ASCII without NUL (all
    of them, in practice) is told in two C calls."""
    text = f"{msg.mid}{msg.sender}{msg.recipient}{cid or ''}"
    if not text.isascii() or "\x00" in text:
        _check_text(msg.mid, msg.sender, msg.recipient, cid)


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows to the `width` column lists an `unnest($1::..[], $2::..[], ...)` takes."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*rows, strict=True)]


def _dumps(value: dict[str, Any], default: Callable[[Any], Any] | None = None) -> str:
    # ensure_ascii: the JSON text is then valid UTF-8 whatever the strings hold.
    # allow_nan=False: NaN is not JSON, and PostgreSQL's json type refuses it.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True, allow_nan=False,
                      default=default)


# -- SQL ------------------------------------------------------------------------------------

_NODE_COLUMNS = "id, key, meta::text, banned, registered, first_seen, last_seen"
_MESSAGE_COLUMNS = "mid, sender, recipient, body, created, expires, sig, receipt, meta"
_HISTORY_COLUMNS = "topic, seq, mid, sender, body, ts, sig, meta"

_SQL_GET_NODE = f"SELECT {_NODE_COLUMNS} FROM nodes WHERE id = $1"
# session_start, per batch. The rows are locked in id order: two instances' batches that
# share nodes cannot deadlock on them.
_SQL_LOCK_NODES = (
    f"SELECT {_NODE_COLUMNS} FROM nodes WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE"
)
_SQL_NODES_SEEN = (
    "UPDATE nodes AS n SET last_seen = u.at, key = COALESCE(u.key, n.key),"
    " meta = COALESCE(u.meta::json, n.meta)"
    " FROM unnest($1::text[], $2::bytea[], $3::text[], $4::bigint[]) AS u(id, key, meta, at)"
    " WHERE n.id = u.id"
)
# New nodes; one another instance created meanwhile was seen there just now.
_SQL_NODES_NEW = (
    "INSERT INTO nodes (id, key, meta, first_seen, last_seen)"
    " SELECT id, key, COALESCE(meta::json, '{}'::json), at, at"
    " FROM unnest($1::text[], $2::bytea[], $3::text[], $4::bigint[]) AS u(id, key, meta, at)"
    " ORDER BY id ON CONFLICT (id) DO NOTHING"
)
_SQL_NODE_SEEN = (
    "INSERT INTO nodes (id, key, meta, first_seen, last_seen)"
    " VALUES ($1, $2, COALESCE($3::json, '{}'::json), $4, $4)"
    " ON CONFLICT (id) DO UPDATE SET last_seen = $4,"
    " key = COALESCE($2, nodes.key), meta = COALESCE($3::json, nodes.meta)"
)
# xmax = 0 only on a row this statement inserted (an upsert that updated sets xmax).
_SQL_PUT_NODE = (
    "INSERT INTO nodes (id, key, meta, registered, first_seen, last_seen)"
    " VALUES ($1, $2, $3::json, true, $4, $4)"
    " ON CONFLICT (id) DO UPDATE SET meta = $3::json, registered = true,"
    " key = COALESCE($2, nodes.key)"
    f" RETURNING {_NODE_COLUMNS}, (xmax = 0) AS created"
)
_SQL_SET_BANNED = (
    "INSERT INTO nodes (id, banned, first_seen, last_seen) VALUES ($1, $2, $3, $3)"
    f" ON CONFLICT (id) DO UPDATE SET banned = $2 RETURNING {_NODE_COLUMNS}"
)
_SQL_LIST_NODES = f"SELECT {_NODE_COLUMNS} FROM nodes ORDER BY id LIMIT $1"
_SQL_LIST_NODES_AFTER = f"SELECT {_NODE_COLUMNS} FROM nodes WHERE id > $2 ORDER BY id LIMIT $1"

# An unknown (or purged) after_mid pages from the start: at least once (§4) means a
# repeat is acceptable, a silently skipped message is not.
_SQL_PENDING = (
    f"SELECT {_MESSAGE_COLUMNS} FROM messages"
    " WHERE recipient = $1 AND acked IS NULL AND expires > $2 AND seq > COALESCE("
    " (SELECT a.seq FROM messages AS a WHERE a.mid = $3 AND a.recipient = $1 LIMIT 1), 0)"
    " ORDER BY seq LIMIT $4"
)
_SQL_COUNT_PENDING = (
    "SELECT count(*) FROM messages WHERE recipient = $1 AND acked IS NULL AND expires > $2"
)
# The backlog gauge: an index-only scan of the partial messages_pending index.
_SQL_PENDING_TOTAL = "SELECT count(*) FROM messages WHERE acked IS NULL AND expires > $1"
# The queue bound of many recipients at once, each at its own time.
_SQL_COUNT_MANY = (
    "SELECT q.recipient, c.n, c.next_expiry"
    " FROM unnest($1::text[], $2::bigint[]) AS q(recipient, at)"
    " CROSS JOIN LATERAL (SELECT count(*) AS n, min(m.expires) AS next_expiry"
    " FROM messages AS m"
    " WHERE m.recipient = q.recipient AND m.acked IS NULL AND m.expires > q.at) AS c"
)
# ORDER BY ord: seq (the column default) is drawn in call order, after the sort.
_SQL_INSERT_MESSAGES = (
    "INSERT INTO messages (mid, sender, recipient, body, sig, receipt, created, expires,"
    " meta)"
    " SELECT mid, sender, recipient, body, sig, receipt, created, expires, meta"
    " FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::bytea[],"
    " $6::boolean[], $7::bigint[], $8::bigint[], $9::text[])"
    " WITH ORDINALITY AS t(mid, sender, recipient, body, sig, receipt, created, expires,"
    " meta, ord)"
    " ORDER BY ord"
)
# docs/protocol.md §4.2, one statement per batch that has cids (after the batch's own
# repeats are set aside): remember each (sender, cid) for the message first sent with
# it, and answer the mid remembered now, the new one or, for a repeat, the older one
# (a row past its window is taken over). DO UPDATE, not DO NOTHING, so that RETURNING
# answers for every key, and a key another instance is committing waits for that commit
# and answers its mid. Keys in order: two batches lock shared keys in the same order.
_SQL_DEDUP = (
    "INSERT INTO dedup AS d (sender, cid, mid, created, expires)"
    " SELECT sender, cid, mid, created, expires"
    " FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[])"
    " AS t(sender, cid, mid, created, expires) ORDER BY sender, cid"
    " ON CONFLICT (sender, cid) DO UPDATE SET"
    " mid = CASE WHEN d.expires <= excluded.created THEN excluded.mid ELSE d.mid END,"
    " created = CASE WHEN d.expires <= excluded.created THEN excluded.created"
    " ELSE d.created END,"
    " expires = CASE WHEN d.expires <= excluded.created THEN excluded.expires"
    " ELSE d.expires END"
    " RETURNING sender, cid, mid"
)
# Rare corrections within the same transaction, when the message a row was written for
# is not stored after all (refused: QueueFull, a duplicate mid), or a later one of the
# batch with the same cid is stored in its place.
_SQL_DEDUP_DROP = (
    "DELETE FROM dedup AS d USING unnest($1::text[], $2::text[], $3::text[]) AS k(sender,"
    " cid, mid) WHERE d.sender = k.sender AND d.cid = k.cid AND d.mid = k.mid"
)
_SQL_DEDUP_SET = (
    "UPDATE dedup AS d SET mid = k.mid, created = k.created, expires = k.expires"
    " FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[])"
    " AS k(sender, cid, mid, created, expires) WHERE d.sender = k.sender AND d.cid = k.cid"
)
_SQL_PURGE_DEDUP = "DELETE FROM dedup WHERE expires <= $1"
# After a duplicate key failed the batch: skip the duplicates, and tell which they were.
# (Not the first try: ON CONFLICT costs a fifth of the insert, and mids are unique.)
_SQL_INSERT_MESSAGES_CAREFUL = (
    _SQL_INSERT_MESSAGES + " ON CONFLICT DO NOTHING RETURNING mid, created"
)
# The first delivery time is kept; a redelivery does not move it.
_SQL_MARK_DELIVERED = (
    "UPDATE messages AS m SET delivered = d.at"
    " FROM unnest($1::text[], $2::bigint[]) AS d(mid, at)"
    " WHERE m.mid = d.mid AND m.delivered IS NULL"
)
# §4: only the recipient acks. An ack proves delivery even if the delivered mark was lost;
# it writes the mark held for it (`dlv`, DeliveredMarks) in the same row update.
_SQL_ACK = (
    "UPDATE messages AS m SET acked = a.at, delivered = COALESCE(m.delivered, a.dlv, a.at)"
    " FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])"
    " WITH ORDINALITY AS a(node, mid, at, dlv, ord)"
    " WHERE m.mid = a.mid AND m.recipient = a.node AND m.acked IS NULL"
    " RETURNING a.ord, m.sender, m.receipt, m.expires"
)
_SQL_MESSAGE_STATE = (
    "SELECT sender, recipient, created, expires, delivered, acked FROM messages"
    " WHERE mid = $1 ORDER BY created DESC LIMIT 1"
)
# In chunks (short transactions, bounded locks); each chunk's rows are found through the
# expires and acked indexes. Bulk retention is the partition drop of maintain().
_SQL_PURGE = (
    "DELETE FROM messages WHERE (mid, created) IN (SELECT mid, created FROM messages"
    " WHERE expires <= $1 OR (acked IS NOT NULL AND acked <= $2) LIMIT $3)"
)
_SQL_TAKE_BACK = (
    "DELETE FROM messages AS m USING unnest($1::text[], $2::bigint[]) AS k(mid, created)"
    " WHERE m.mid = k.mid AND m.created = k.created AND m.acked IS NULL"
)
# Sequence numbers taken in the transaction that appends the history: the topic's row
# stays locked until the commit, so a topic's sequences commit in order, cluster wide
# (docs/protocol.md §6), with or without a broker.
_SQL_TAKE_SEQS = (
    "INSERT INTO topics AS t (name, last_seq)"
    " SELECT name, n FROM unnest($1::text[], $2::bigint[]) AS e(name, n)"
    " ON CONFLICT (name) DO UPDATE SET last_seq = t.last_seq + excluded.last_seq"
    " RETURNING name, last_seq"
)
_SQL_CLEAR_HISTORY = "DELETE FROM history WHERE topic = ANY($1::text[])"
_SQL_INSERT_HISTORY = (
    f"INSERT INTO history ({_HISTORY_COLUMNS})"
    " SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::bytea[],"
    " $6::bigint[], $7::bytea[], $8::text[])"
)
_SQL_INSERT_HISTORY_CAREFUL = (
    _SQL_INSERT_HISTORY + " ON CONFLICT (topic, seq) DO NOTHING RETURNING topic, seq"
)
# Oldest first beyond `keep`, and anything at or before the ttl cutoff. The seq floor of
# each topic is computed once (MATERIALIZED), not once per history row.
_SQL_TRIM_HISTORY = (
    "WITH t AS MATERIALIZED (SELECT topic, cutoff, (SELECT s.seq FROM history AS s"
    " WHERE s.topic = u.topic ORDER BY s.seq DESC OFFSET u.keep LIMIT 1) AS floor"
    " FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS u(topic, keep, cutoff))"
    " DELETE FROM history AS h USING t"
    " WHERE h.topic = t.topic AND (h.ts <= t.cutoff OR h.seq <= t.floor)"
)
_SQL_HISTORY_SINCE = (
    f"SELECT {_HISTORY_COLUMNS} FROM history WHERE topic = $1 AND seq > $2 AND ts > $3"
    " ORDER BY seq"
)
# docs/protocol.md §5.2: the newest first, down the primary key (the caller reverses).
_SQL_HISTORY_BEFORE = (
    f"SELECT {_HISTORY_COLUMNS} FROM history WHERE topic = $1 AND seq < $2 AND ts > $3"
    " ORDER BY seq DESC LIMIT $4"
)
_SQL_LAST_SEQ = "SELECT last_seq FROM topics WHERE name = $1"
# On the replica: the entries at or before the age bound ($4), only when the replica has
# replayed a commit made at or after $5 (ms): one row with fresh = false otherwise.
_SQL_REPLICA_HISTORY = (
    "WITH f AS (SELECT COALESCE(pg_last_xact_replay_timestamp()"
    " >= to_timestamp($5::double precision / 1000), false) AS fresh)"
    f" SELECT f.fresh, {', '.join('h.' + c for c in _HISTORY_COLUMNS.split(', '))}"
    " FROM f LEFT JOIN history AS h ON f.fresh AND h.topic = $1 AND h.seq > $2"
    " AND h.ts > $3 AND h.ts <= $4 ORDER BY h.seq"
)
_SQL_HISTORY_RECENT = (
    f"SELECT {_HISTORY_COLUMNS} FROM history WHERE topic = $1 AND seq > $2 AND ts > $3"
    " ORDER BY seq"
)
_SQL_INSERT_AUDIT = (
    "INSERT INTO audit (ts, kind, node, ip, detail)"
    " SELECT ts, kind, node, ip, detail::json"
    " FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[])"
    " WITH ORDINALITY AS t(ts, kind, node, ip, detail, ord)"
    " ORDER BY ord"
)
# Delivery hints: one row per recipient. Rows are locked in recipient order (the caller
# sorts), so two instances marking the same recipients cannot deadlock.
_SQL_MARK_UNDELIVERED = (
    "INSERT INTO undelivered AS u (recipient, since, mark)"
    " SELECT recipient, $3, mark FROM unnest($1::text[], $2::text[]) AS m(recipient, mark)"
    " ON CONFLICT (recipient) DO UPDATE SET mark = excluded.mark"
)
_SQL_UNDELIVERED = (
    "SELECT recipient, since, mark FROM undelivered ORDER BY since, recipient LIMIT $1"
)
_SQL_CLEAR_UNDELIVERED = (
    "DELETE FROM undelivered AS u USING unnest($1::text[], $2::text[]) AS c(recipient, mark)"
    " WHERE u.recipient = c.recipient AND u.mark = c.mark"
)
_SQL_PARTITIONS = (
    "SELECT c.relname FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid"
    " WHERE i.inhparent = to_regclass($1)"
)
_SQL_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"

# forget_node (Store contract): a ban outlives the forgetting; unacked messages expire.
_SQL_FORGET_NODE = (
    "WITH f AS (SELECT id, banned FROM nodes WHERE id = $1 FOR UPDATE),"
    " u AS (UPDATE nodes AS n SET registered = false, meta = '{}'::json, key = NULL"
    " FROM f WHERE n.id = f.id AND f.banned),"
    " d AS (DELETE FROM nodes AS n USING f WHERE n.id = f.id AND NOT f.banned)"
    " SELECT count(*) FROM f"
)
_SQL_EXPIRE_QUEUE = (
    "UPDATE messages SET expires = $2 WHERE recipient = $1 AND acked IS NULL AND expires > $2"
)
_REVOCATION_COLUMNS = "id, kind, subject, issued_before, created, expires"
# Writers serialize on the table lock, so ids commit in id order (readers page by id).
_SQL_LOCK_REVOCATIONS = "LOCK TABLE revocations IN SHARE ROW EXCLUSIVE MODE"
_SQL_DROP_REVOCATIONS = "DELETE FROM revocations WHERE expires <= $1"
_SQL_ADD_REVOCATION = (
    "INSERT INTO revocations AS r (kind, subject, issued_before, created, expires)"
    " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (kind, subject) DO UPDATE SET"
    " id = nextval('revocations_id_seq'), created = excluded.created,"
    " issued_before = GREATEST(r.issued_before, excluded.issued_before),"
    " expires = GREATEST(r.expires, excluded.expires)"
    f" RETURNING {_REVOCATION_COLUMNS}"
)
_SQL_REVOCATIONS_SINCE = (
    f"SELECT {_REVOCATION_COLUMNS} FROM revocations WHERE id > $1 AND expires > $2"
    " ORDER BY id LIMIT $3"
)


def _node(row: Any) -> NodeRecord:
    return NodeRecord(id=row[0], key=row[1], meta=json.loads(row[2]), banned=row[3],
                      registered=row[4], first_seen=row[5], last_seen=row[6])


def _message(row: Any) -> StoredMessage:
    return StoredMessage(mid=row[0], sender=row[1], recipient=row[2], body=row[3],
                         created=row[4], expires=row[5], sig=row[6], receipt=row[7],
                         meta=_meta_of(row[8]))


def _history(row: Any) -> HistoryEntry:
    return HistoryEntry(topic=row[0], seq=row[1], mid=row[2], sender=row[3], body=row[4],
                        ts=row[5], sig=row[6], meta=_meta_of(row[7]))


def _meta_json(meta: dict[str, str] | None) -> str | None:
    """docs/protocol.md §4.1 meta as stored: JSON text (ASCII: no NUL, valid UTF-8),
    NULL for none."""
    return _dumps(meta) if meta else None


def _meta_of(text: str | None) -> dict[str, str] | None:
    return None if text is None else cast(dict[str, str], json.loads(text))


# -- the queue bound ----------------------------------------------------------------------


class PendingCounts:
    """Per-recipient count of unacked, unexpired messages, for the `QueueFull` check.

    As in `persistence/sqlite.py`: counting a queue costs O(queue), so the writer counts
    once and then keeps the count, exact for message times in [as_of, next_expiry) given
    +1 per enqueue and -1 per ack of a counted message. PostgreSQL is shared by several
    hub instances, whose enqueues and acks this cache does not see, so an entry is also
    re-counted after `max_age_s`, and a recipient that looks full is re-counted (inside
    the batch transaction) before a message is refused: the bound may be overshot by what
    other instances enqueued within `max_age_s`, and a message is never refused for a
    queue that is not full. Only the writer tasks touch it (the acks' lane takes its -1s
    once their commit returned: `acked`); it is cleared whenever a transaction fails, and
    after purges and partition drops.
    """

    max_entries = 100_000  # bounded memory: cleared beyond this many recipients

    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        # recipient -> [count, as_of, next_expiry, counted_at (monotonic s), batch]
        self._entries: dict[str, list[Any]] = {}

    def get(self, recipient: str, at_ms: int, now_s: float) -> list[Any] | None:
        entry = self._entries.get(recipient)
        if entry is None or not entry[1] <= at_ms < entry[2] or now_s - entry[3] > self.max_age_s:
            return None
        return entry

    def put(self, recipient: str, count: int, as_of: int, next_expiry: int | None,
            now_s: float, batch: int) -> list[Any]:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        entry = [count, as_of, _NEVER if next_expiry is None else next_expiry, now_s, batch]
        self._entries[recipient] = entry
        return entry

    def added(self, recipient: str, expires: int) -> None:
        entry = self._entries.get(recipient)
        if entry is not None:
            entry[0] += 1
            entry[2] = min(entry[2], expires)

    def acked(self, recipient: str, expires: int, committing_s: float) -> None:
        """After the commit of an ack sent to the server at `committing_s` (monotonic)."""
        entry = self._entries.get(recipient)
        if entry is None:
            return
        if entry[3] >= committing_s:
            # Counted (by the other lane) while the ack was committing: the count may have
            # seen it or not.
            del self._entries[recipient]
        elif expires > entry[1]:  # messages already expired at as_of were not counted
            entry[0] -= 1

    def forget(self, recipient: str) -> None:
        self._entries.pop(recipient, None)

    def clear(self) -> None:
        self._entries.clear()


# -- the write queue ------------------------------------------------------------------------

_ENQUEUE, _DELIVERED, _ACK, _HISTORY, _AUDIT, _SESSION = range(6)


class _Item:
    """One queued write. `future` None: fire-and-forget (a `*_nowait` call)."""

    __slots__ = ("args", "future", "kind", "no")

    def __init__(self, kind: int, args: tuple[Any, ...], future: asyncio.Future[Any] | None,
                 no: int) -> None:
        self.kind = kind
        self.args = args
        self.future = future
        self.no = no  # submission number: barriers wait for every item up to theirs


_Outcome = tuple[_Item, Any, BaseException | None]

# Which lane each kind of write goes to (`_Lane`): acks and delivered marks, or the rest.
_ACK_LANE = 1
_LANE_OF = (0, _ACK_LANE, _ACK_LANE, 0, 0, 0)  # by kind: _ENQUEUE .. _AUDIT


class _Lane:
    """One writer task and its FIFO queue of items (module docstring)."""

    __slots__ = ("awaited", "barriers", "done_no", "kinds", "no", "nowait", "queue", "task",
                 "wake")

    def __init__(self, no: int) -> None:
        self.no = no
        self.kinds = [kind for kind, lane in enumerate(_LANE_OF) if lane == no]
        self.queue: deque[_Item] = deque()
        self.wake = asyncio.Event()
        self.awaited = 0  # awaited items in queue
        self.nowait = 0  # fire-and-forget items in queue
        self.done_no = 0  # every item of this lane up to this number is finished
        self.barriers: list[tuple[int, asyncio.Future[None]]] = []
        self.task: asyncio.Task[None] | None = None


def _duplicate(what: str) -> StoreError:
    return StoreError(f"store: constraint failed: duplicate {what}")


class _Batch:
    """The items of one transaction, split by kind (each kind is one statement)."""

    def __init__(self, items: list[_Item], careful: bool) -> None:
        self.items = items
        self.careful = careful
        # (recipient, expires) of each message acked: the pending counts, once committed.
        self.acked: list[tuple[str, int]] = []
        self.by_kind: list[list[_Item]] = [[], [], [], [], [], []]
        for item in items:
            self.by_kind[item.kind].append(item)


async def _keep_session(conn: Any) -> None:
    """Pool `reset` hook: nothing to reset (the store sets no session state, and ends
    every transaction itself), which saves a round trip per borrowed connection."""


_POOL_TAKES_RESET = "reset" in inspect.signature(asyncpg.create_pool).parameters


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _day_name(table: str, day: int) -> str | None:
    try:
        date = datetime.fromtimestamp(day * 86_400, UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return f"{table}_p{date:%Y%m%d}"


def _name_day(name: str) -> int | None:
    match = _PARTITION_NAME.match(name)
    if match is None:
        return None
    try:
        date = datetime.strptime(match.group("day"), "%Y%m%d").replace(tzinfo=UTC)
    except ValueError:
        return None
    return int(date.timestamp()) // 86_400


def _resolve(outcomes: list[_Outcome]) -> int:
    """Hand results to the callers; return how many fire-and-forget items failed."""
    dropped = 0
    for item, value, exc in outcomes:
        future = item.future
        if future is None:
            if exc is not None:
                dropped += 1
            continue
        if future.done():  # the caller gave up (cancelled); the work was done anyway
            continue
        if exc is None:
            future.set_result(value)
        else:
            future.set_exception(exc)
    return dropped


class PostgresStore:
    """`Store` on PostgreSQL through an asyncpg pool, group-committed by two writer tasks
    (the module docstring: acks in a lane of their own).

    `url`: `postgresql://...` (libpq defaults for what it leaves out), optionally with
    `?schema=NAME`; the `schema` keyword does the same (it wins over the URL). Tables live
    in that schema through each connection's `search_path` (default: the server's,
    usually `public`). `pool_size` is the most connections held (`store.pool_size`).
    `retention_days` is what the maintenance task keeps of messages and audit events;
    keep it above the longest message ttl: an unacked message older than that is dropped
    with its day partition.

    Attributes for operators and tests (set the tunables before `open()`):
    - `commits`: batch transactions committed so far (shows the group commit).
    - `in_doubt`: batches whose COMMIT was cut off (their outcome was asked afterwards).
    - `nowait_dropped`: `*_nowait` items dropped (queue bound reached, store closed or
      failing, a value PostgreSQL refused).
    - `max_nowait` (100,000): bound on queued fire-and-forget items, in each lane.
    - `max_batch` (5,000): most items committed in one transaction.
    - `nowait_linger_s` (0.05): fire-and-forget items alone wait this long for an awaited
      call to ride with, instead of committing on their own.
    - `delivered_marks`: delivered marks held for the ack to write (`DeliveredMarks`:
      `hold_s` 1, `max_held` 100,000).
    - `connect_timeout_s` (5), `command_timeout_s` (10), `acquire_timeout_s` (5): how
      long a call may wait before it fails with StoreUnavailable. The hub sets them,
      and `in_doubt_timeout_s`, from `store.timeout_s` (2 s: persistence/backends.py).
    - `ddl_lock_timeout_s` (2): partition changes give up (and retry at the next run)
      rather than queue behind long queries while blocking everyone else.
    - `maintain_interval_s` (3600): how often the maintenance task runs `maintain()`.
    - `pending_count_max_age_s` (2): see `PendingCounts`.
    - `purge_chunk_rows` (10,000): `purge_expired` deletes in transactions of at most
      this many rows.
    - `in_doubt_timeout_s` (30): how long after sending a COMMIT that was cut off to keep
      asking the server about its batch before failing its callers with
      StoreUnavailable regardless.
    - `read_url`: the read replica (module docstring); `replica_reads` counts the reads
      it served, `replica_fallbacks` those it failed (run on the primary instead).
    - `replica_connect_timeout_s` (2): a replica that does not answer is bypassed fast.
    - `replica_retry_s` (5): after a failure, reads skip the replica this long.
    - `replica_history_age_s` (60): history entries older than this may come from the
      replica (when it has replayed a commit of the last half of this).
    """

    max_nowait: int = 100_000
    max_batch: int = 5_000
    nowait_linger_s: float = 0.05
    connect_timeout_s: float = 5.0
    command_timeout_s: float = 10.0
    acquire_timeout_s: float = 5.0
    migrate_timeout_s: float = 600.0
    ddl_lock_timeout_s: float = 2.0
    maintain_interval_s: float = 3600.0
    pending_count_max_age_s: float = 2.0
    in_doubt_timeout_s: float = 30.0
    purge_chunk_rows: int = 10_000
    replica_connect_timeout_s: float = 2.0
    replica_retry_s: float = 5.0
    replica_history_age_s: float = 60.0

    def __init__(self, url: str, *, auto_migrate: bool = True, pool_size: int = 10,
                 migrations_dir: Traversable | None = None, schema: str | None = None,
                 retention_days: int = 30, read_url: str | None = None) -> None:
        dsn, url_schema = parse_postgres_url(url)
        # The replica holds the same database: the store's schema applies there too.
        read_dsn = None if read_url is None else parse_postgres_url(read_url)[0]
        if schema is not None and not _SCHEMA_NAME.match(schema):
            raise ValueError(f"store schema must be {_SCHEMA_RULE}")
        if pool_size < 1:
            raise ValueError("store.pool_size: must be at least 1")
        self.url = url
        self.schema = schema if schema is not None else url_schema
        self.auto_migrate = auto_migrate
        self.pool_size = pool_size
        self.retention_days = retention_days
        self._dsn = dsn
        # None: the packaged migrations; tests point this elsewhere.
        self._migrations_dir = migrations_dir
        self.commits = 0
        self._dropped = 0
        self._pool: Any = None
        self._start_lock = asyncio.Lock()
        self._closed = False
        self._dead = False  # the writer task stopped unexpectedly
        self._maintainer: asyncio.Task[None] | None = None
        self.in_doubt = 0
        self._resolvers: set[asyncio.Task[None]] = set()
        self._compensators: set[asyncio.Task[None]] = set()
        self._lanes = (_Lane(0), _Lane(_ACK_LANE))
        self._acking: dict[str, int] = {}  # node -> its ack calls not finished yet
        self._next_no = 0  # number of the last item submitted
        self._last_no = [0] * 6  # number of the last item submitted, by kind
        self._batch_no = 0
        self._counts = PendingCounts(self.pending_count_max_age_s)
        self.delivered_marks = DeliveredMarks()
        self.read_url = read_url
        self._read_dsn = read_dsn
        self._read_pool: Any = None
        self._replica_down_until = 0.0  # monotonic s; reads skip the replica until then
        self.replica_reads = 0
        self.replica_fallbacks = 0

    @property
    def nowait_dropped(self) -> int:
        return self._dropped

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        await self._start()
        try:
            if self.auto_migrate:
                await self.migrate()
            else:
                pending = await self._migrations(apply=False)
                if pending:
                    raise StoreError(f"store: {len(pending)} migration(s) pending "
                                     f"({', '.join(pending)}); run openred-hub migrate")
            # Today's partitions (and the next days') before the first insert; a failure
            # here is not fatal: the DEFAULT partitions take the rows meanwhile.
            try:
                await self.maintain(_now_ms(), self.retention_days)
            except StoreUnavailable:
                raise
            except StoreError as exc:
                _log.warning("store_maintain_failed", extra={"error": str(exc)})
        except BaseException:
            await self.close()
            raise
        if self._maintainer is None:
            self._maintainer = asyncio.get_running_loop().create_task(
                self._maintain_forever(), name="openred-store-maintain")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for lane in self._lanes:
            lane.wake.set()
        if self._maintainer is not None:
            self._maintainer.cancel()
            try:
                await self._maintainer
            except asyncio.CancelledError:
                pass
        for lane in self._lanes:
            if lane.task is not None:
                # FIFO: each writer commits everything queued before it stops.
                try:
                    await lane.task
                except Exception:  # already logged; nothing is left waiting
                    pass
        if self._resolvers:
            await asyncio.wait(set(self._resolvers), timeout=self.in_doubt_timeout_s)
        for task in [*self._resolvers, *self._compensators]:
            task.cancel()  # a resolver's callers get StoreUnavailable
            try:
                await task
            except asyncio.CancelledError:
                pass
        for lane in self._lanes:
            self._release_barriers(lane, all_=True)
        for name in ("_read_pool", "_pool"):
            pool = getattr(self, name)
            setattr(self, name, None)
            if pool is not None:
                try:
                    await asyncio.wait_for(pool.close(), timeout=self.command_timeout_s)
                except (Exception, asyncio.CancelledError):
                    pool.terminate()

    async def migrate(self) -> list[str]:
        """Apply pending migrations; may be called before `open()` (it connects then)."""
        await self._start()
        return await self._migrations(apply=True)

    async def ping(self) -> None:
        await self._barrier()
        async with self._conn() as conn:
            mids, times = self.delivered_marks.take_due(everything=True)
            if mids:  # the flush: held delivered marks too
                await conn.execute(_SQL_MARK_DELIVERED, mids, times)
            else:
                await conn.fetchval("SELECT 1")

    async def _start(self) -> None:
        async with self._start_lock:
            if self._closed:
                raise StoreUnavailable("store: closed")
            if self._pool is not None:
                return
            settings = {"application_name": "openred-hub",
                        # JIT compiling the batch statements costs far more than it saves.
                        "jit": "off",
                        # After five runs a prepared statement may switch to a generic
                        # plan; for the batch UPDATEs over unnest() arrays it picked one
                        # 15 times slower (the ack of 1,500 rows: 22 ms -> 330 ms), so
                        # every run is planned for its own arrays (~0.3 ms each).
                        "plan_cache_mode": "force_custom_plan"}
            if self.schema is not None:
                settings["search_path"] = self.schema
            kwargs: dict[str, Any] = {
                # min_size 0: connections are made on demand, so no background task
                # retries (and logs) while the server is down; a call then fails at once.
                "min_size": 0,
                "max_size": self.pool_size,
                "timeout": self.connect_timeout_s,
                "command_timeout": self.command_timeout_s,
                "server_settings": settings,
            }
            if _POOL_TAKES_RESET:
                kwargs["reset"] = _keep_session
            try:
                self._pool = await asyncpg.create_pool(self._dsn, **kwargs)
            except _DRIVER_ERRORS as exc:
                raise _unavailable(exc) from exc
            if self._read_dsn is not None:
                # min_size 0: nothing connects here, so a replica that is down delays
                # nothing; the first read finds out (and falls back).
                replica = {**kwargs, "timeout": self.replica_connect_timeout_s,
                           "server_settings": {**settings,
                                               "application_name": "openred-hub-read"}}
                try:
                    self._read_pool = await asyncpg.create_pool(self._read_dsn, **replica)
                except _DRIVER_ERRORS as exc:  # a bad DSN: run without the replica
                    _log.warning("store_replica_unavailable",
                                 extra={"error": str(exc) or type(exc).__name__})
            loop = asyncio.get_running_loop()
            for lane in self._lanes:
                lane.task = loop.create_task(self._run_writer(lane),
                                             name=f"openred-store-writer-{lane.no}")

    # -- migrations ----------------------------------------------------------------------------

    def _load_migrations(self) -> list[Migration]:
        directory = self._migrations_dir
        if directory is None:
            directory = packaged_migrations("postgres")
        return load_migrations(directory)

    async def _lock_name(self, conn: Any, what: str) -> str:
        schema = self.schema or await conn.fetchval("SELECT current_schema()") or ""
        return f"openred-hub {what} {schema}"

    async def _migrations(self, apply: bool) -> list[str]:
        """Check applied migrations, then apply the pending ones (all in one transaction,
        under an advisory lock so concurrent hub instances apply them once).

        Returns the names applied now (`apply`) or the names pending (not `apply`).
        """
        migrations = self._load_migrations()
        timeout = self.migrate_timeout_s
        async with self._conn() as conn:
            version = conn.get_server_version()
            if version.major < MIN_SERVER_VERSION:
                raise StoreError(f"store: postgresql {version.major} is too old "
                                 f"({MIN_SERVER_VERSION} or newer needed)")
            if not apply:
                if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
                    return [m.name for m in migrations]
                applied = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
                return [m.name for m in check_applied(migrations, applied)]
            async with conn.transaction():
                await conn.execute(_SQL_LOCK, await self._lock_name(conn, "migrate"),
                                   timeout=timeout)
                if self.schema is not None and await conn.fetchval(
                        "SELECT 1 FROM pg_namespace WHERE nspname = $1", self.schema) is None:
                    # The name is checked against _SCHEMA_NAME: quoting is enough.
                    await conn.execute(f'CREATE SCHEMA "{self.schema}"')
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())")
                applied = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
                pending = check_applied(migrations, applied)
                for migration in pending:
                    try:
                        # No arguments: the simple query protocol runs the whole file.
                        await conn.execute(migration.sql, timeout=timeout)
                    except asyncpg.exceptions.PostgresError as exc:
                        if isinstance(exc, _CONNECTION_LOST):
                            raise
                        raise StoreError(f"store: migration {migration.name} failed: "
                                         f"{exc}") from exc
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum)"
                        " VALUES ($1, $2, $3)",
                        migration.version, migration.name, migration.checksum)
                return [m.name for m in pending]

    # -- partitions ----------------------------------------------------------------------------

    async def maintain(self, now_ms: int, retention_days: int) -> tuple[list[str], list[str]]:
        """Create the day partitions (UTC) of `messages` and `audit` for the day of `now_ms`
        and the next AHEAD_DAYS days, and drop every partition whose whole day is more than
        `retention_days` before `now_ms` (a DROP TABLE, not a DELETE). Rows already in the
        DEFAULT partition for a day being created are moved into it. Safe to run from
        several hub instances at once (advisory lock). Returns (created, dropped) names.
        """
        self._check_open()
        today = now_ms // DAY_MS
        cutoff = now_ms - retention_days * DAY_MS
        created: list[str] = []
        dropped: list[str] = []
        for table, column in PARTITIONED:
            async with self._conn() as conn:
                names = [row[0] for row in await conn.fetch(_SQL_PARTITIONS, table)]
            existing: dict[int, str] = {}
            for name in names:
                day = _name_day(name)
                if day is not None and name.startswith(f"{table}_p"):
                    existing[day] = name
            for day in range(today, today + AHEAD_DAYS + 1):
                name = _day_name(table, day)
                if day not in existing and name is not None:
                    if await self._create_partition(table, column, name, day):
                        created.append(name)
            for day, name in sorted(existing.items()):
                if (day + 1) * DAY_MS <= cutoff and await self._drop_partition(name):
                    dropped.append(name)
        if dropped:
            _log.info("store_partitions_dropped", extra={"partitions": dropped})
        return created, dropped

    async def _ddl(self, conn: Any) -> None:
        """Start a partition change: short lock timeout, then the maintenance lock."""
        await conn.execute("SELECT set_config('lock_timeout', $1, true)",
                           f"{int(self.ddl_lock_timeout_s * 1000)}ms")
        await conn.execute(_SQL_LOCK, await self._lock_name(conn, "maintain"))

    async def _create_partition(self, table: str, column: str, name: str, day: int) -> bool:
        low, high = day * DAY_MS, (day + 1) * DAY_MS
        # Identifiers and bounds are built here from constants and integers (DDL takes no
        # parameters). Created apart and then attached: ATTACH locks the parent only in
        # SHARE UPDATE EXCLUSIVE mode, so queries and inserts keep flowing.
        async with self._conn() as conn:
            try:
                async with conn.transaction():
                    await self._ddl(conn)
                    if await conn.fetchval("SELECT to_regclass($1)", name) is not None:
                        return False  # another instance was first
                    # Taken first: ATTACH needs it anyway, and no row may reach the
                    # default partition for this day between the move and the attach.
                    await conn.execute(f"LOCK TABLE {table}_default IN ACCESS EXCLUSIVE MODE")
                    await conn.execute(f"CREATE TABLE {name} (LIKE {table})")
                    await conn.execute(
                        f"WITH moved AS (DELETE FROM {table}_default"
                        f" WHERE {column} >= $1 AND {column} < $2 RETURNING *)"
                        f" INSERT INTO {name} SELECT * FROM moved", low, high)
                    await conn.execute(f"ALTER TABLE {table} ATTACH PARTITION {name}"
                                       f" FOR VALUES FROM ({int(low)}) TO ({int(high)})")
            except asyncpg.exceptions.PostgresError as exc:
                if isinstance(exc, _CONNECTION_LOST):
                    raise
                raise StoreError(f"store: cannot create partition {name}: {exc}") from exc
        return True

    async def _drop_partition(self, name: str) -> bool:
        async with self._conn() as conn:
            try:
                async with conn.transaction():
                    await self._ddl(conn)
                    await conn.execute(f"DROP TABLE IF EXISTS {name}")
            except asyncpg.exceptions.PostgresError as exc:
                if isinstance(exc, _CONNECTION_LOST):
                    raise
                raise StoreError(f"store: cannot drop partition {name}: {exc}") from exc
        if name.startswith("messages_"):
            self._counts.clear()
        return True

    async def _maintain_forever(self) -> None:
        while True:
            await asyncio.sleep(self.maintain_interval_s)
            try:
                await self.maintain(_now_ms(), self.retention_days)
            except StoreError as exc:
                _log.warning("store_maintain_failed", extra={"error": str(exc)})
            except Exception:  # housekeeping must outlive any one failure
                _log.exception("store_maintain_crashed")

    # -- nodes -------------------------------------------------------------------------------

    async def get_node(self, node_id: str) -> NodeRecord | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(_SQL_GET_NODE, node_id)
        return None if row is None else _node(row)

    async def node_seen(self, node_id: str, key: bytes | None, meta: dict[str, Any] | None,
                        now_ms: int) -> None:
        meta_json = None if meta is None else self._json(meta)
        async with self._conn() as conn:
            await conn.execute(_SQL_NODE_SEEN, node_id, key, meta_json, now_ms)

    async def session_start(self, node_id: str, key: bytes | None,
                            meta: dict[str, Any] | None, now_ms: int, *,
                            registered_only: bool = False) -> tuple[NodeRecord | None, int]:
        _check_text(node_id)
        meta_json = None if meta is None else self._json(meta)
        # The count it answers sees the acks submitted before it (the other lane).
        await self._barrier(_ACK)
        result: tuple[NodeRecord | None, int] = await self._submit(
            _SESSION, (node_id, key, meta_json, now_ms, registered_only))
        return result

    async def put_node(self, node_id: str, meta: dict[str, Any], key: bytes | None,
                       now_ms: int) -> tuple[NodeRecord, bool]:
        meta_json = self._json(meta)
        # A node registered before it ever connected gets first/last_seen = registration
        # time (NodeRecord has no "never"). An omitted key keeps the known one.
        async with self._conn() as conn:
            row = await conn.fetchrow(_SQL_PUT_NODE, node_id, key, meta_json, now_ms)
        return _node(row), bool(row[7])

    async def set_banned(self, node_id: str, banned: bool, now_ms: int) -> NodeRecord:
        async with self._conn() as conn:
            row = await conn.fetchrow(_SQL_SET_BANNED, node_id, banned, now_ms)
        return _node(row)

    async def list_nodes(self, limit: int, after: str | None) -> list[NodeRecord]:
        # Admin lists: stale-tolerant, on the replica when there is one.
        if after is None:
            rows = await self._read(lambda conn: conn.fetch(_SQL_LIST_NODES, max(limit, 0)))
        else:
            rows = await self._read(
                lambda conn: conn.fetch(_SQL_LIST_NODES_AFTER, max(limit, 0), after))
        return [_node(row) for row in rows]

    async def forget_node(self, node_id: str, now_ms: int) -> bool:
        _check_text(node_id)
        await self._barrier(_ENQUEUE)  # messages enqueued before this call expire too
        async with self._conn() as conn, conn.transaction():
            known = await conn.fetchval(_SQL_FORGET_NODE, node_id)
            status = await conn.execute(_SQL_EXPIRE_QUEUE, node_id, now_ms)
        return bool(known) or int(status.split()[-1]) > 0

    # -- token revocations ------------------------------------------------------------------

    async def add_revocation(self, kind: str, subject: str, issued_before: int | None,
                             expires: int, now_ms: int) -> Revocation:
        _check_text(kind, subject)
        async with self._conn() as conn, conn.transaction():
            await conn.execute(_SQL_LOCK_REVOCATIONS)
            await conn.execute(_SQL_DROP_REVOCATIONS, now_ms)
            row = await conn.fetchrow(_SQL_ADD_REVOCATION, kind, subject, issued_before,
                                      now_ms, expires)
        return Revocation(*row)

    async def revocations_since(self, after_id: int, now_ms: int,
                                limit: int) -> list[Revocation]:
        # On the primary: a replica's lag would delay a revocation past its promise.
        async with self._conn() as conn:
            rows = await conn.fetch(_SQL_REVOCATIONS_SINCE, after_id, now_ms, max(limit, 0))
        return [Revocation(*row) for row in rows]

    @staticmethod
    def _json(value: dict[str, Any]) -> str:
        try:
            return _dumps(value)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"store: invalid value ({type(exc).__name__})") from exc

    # -- QoS 1 queues --------------------------------------------------------------------------

    async def enqueue(self, msg: StoredMessage, max_pending: int, *, cid: str | None = None,
                      dedup_window_ms: int = 0) -> str | None:
        _check_message_text(msg, cid)
        first: str | None = await self._submit(_ENQUEUE, (msg, max_pending, cid,
                                                          dedup_window_ms))
        return first

    async def enqueue_many(self, items: list[EnqueueArgs]) -> list[str | StoreError | None]:
        self._check_writable()
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = []
        for msg, max_pending, cid, window_ms in items:
            try:
                _check_message_text(msg, cid)
            except StoreError as exc:  # this one alone is refused
                refused = loop.create_future()
                refused.set_exception(exc)
                futures.append(refused)
                continue
            futures.append(self._submit(_ENQUEUE, (msg, max_pending, cid, window_ms)))
        return await outcomes_of(futures)

    async def pending(self, node_id: str, now_ms: int, after_mid: str | None,
                      limit: int) -> list[StoredMessage]:
        await self._barrier(_ENQUEUE, _ACK)
        async with self._conn() as conn:
            rows = await conn.fetch(_SQL_PENDING, node_id, now_ms, after_mid, max(limit, 0))
        return [_message(row) for row in rows]

    async def count_pending(self, node_id: str, now_ms: int) -> int:
        await self._barrier(_ENQUEUE, _ACK)
        async with self._conn() as conn:
            return int(await conn.fetchval(_SQL_COUNT_PENDING, node_id, now_ms))

    async def pending_total(self, now_ms: int) -> int:
        async with self._conn() as conn:
            return int(await conn.fetchval(_SQL_PENDING_TOTAL, now_ms))

    def pool_usage(self) -> tuple[int, int]:
        pool = self._pool
        if pool is None:
            return 0, self.pool_size
        return pool.get_size() - pool.get_idle_size(), pool.get_max_size()

    def mark_delivered_nowait(self, mids: list[str], now_ms: int) -> None:
        mids = [mid for mid in mids if _text_ok(mid)]
        if mids:
            self._submit_nowait(_DELIVERED, (mids, now_ms))

    async def ack(self, node_id: str, mids: list[str], now_ms: int) -> list[AckResult]:
        # Text PostgreSQL cannot hold names no stored message: nothing to ack.
        mids = [mid for mid in mids if _text_ok(mid)]
        if not mids or not _text_ok(node_id):
            self._check_writable()
            return []
        future = self._submit(_ACK, (node_id, mids, now_ms))
        self._acking[node_id] = self._acking.get(node_id, 0) + 1
        return cast(list[AckResult], await future)

    async def message_state(self, mid: str, now_ms: int) -> MessageState | None:
        await self._barrier(_ENQUEUE, _DELIVERED, _ACK)
        # Operators' view of a message: stale-tolerant, on the replica when there is one.
        row = await self._read(lambda conn: conn.fetchrow(_SQL_MESSAGE_STATE, mid))
        if row is None:
            return None
        sender, recipient, created, expires, delivered, acked = row
        if delivered is None and acked is None:
            delivered = self.delivered_marks.get(mid)
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

    async def purge_expired(self, now_ms: int) -> int:
        await self._barrier()
        purged = 0
        try:
            while True:
                async with self._conn() as conn:
                    status = await conn.execute(_SQL_PURGE, now_ms, now_ms - ACKED_KEEP_MS,
                                                self.purge_chunk_rows)
                count = int(status.split()[-1])
                purged += count
                if count < self.purge_chunk_rows:
                    break
            # docs/protocol.md §4.2: a cid is remembered for its window only.
            async with self._conn() as conn:
                status = await conn.execute(_SQL_PURGE_DEDUP, now_ms)
            return purged + int(status.split()[-1])
        finally:
            self._counts.clear()

    # -- delivery hints ---------------------------------------------------------------------------
    # Single statements on a pooled connection, not queued: the hub writes a mark only
    # after the messages it names are committed (it awaits their enqueue first).

    async def mark_undelivered(self, marks: list[tuple[str, str]], now_ms: int) -> None:
        latest: dict[str, str] = {}
        for recipient, mark in marks:
            _check_text(recipient, mark)
            latest[recipient] = mark  # one row per recipient and statement: the last mark
        if not latest:
            self._check_writable()
            return
        recipients = sorted(latest)
        async with self._conn() as conn:
            await conn.execute(_SQL_MARK_UNDELIVERED, recipients,
                               [latest[r] for r in recipients], now_ms)

    async def undelivered(self, limit: int) -> list[Undelivered]:
        async with self._conn() as conn:
            rows = await conn.fetch(_SQL_UNDELIVERED, max(limit, 0))
        return [Undelivered(recipient=r[0], since=r[1], mark=r[2]) for r in rows]

    async def clear_undelivered(self, marks: list[tuple[str, str]]) -> int:
        marks = [(r, m) for r, m in marks if _text_ok(r) and _text_ok(m)]
        if not marks:
            self._check_writable()
            return 0
        marks.sort()
        async with self._conn() as conn:
            status = await conn.execute(_SQL_CLEAR_UNDELIVERED, [r for r, _ in marks],
                                        [m for _, m in marks])
        return int(status.split()[-1])

    # -- topic history ------------------------------------------------------------------------

    async def append_history(self, entry: HistoryEntry, keep: int, ttl_ms: int) -> int:
        _check_text(entry.topic, entry.mid, entry.sender)
        seq: int = await self._submit(_HISTORY, (entry, keep, ttl_ms))
        return seq

    async def history_since(self, topic: str, since: int, now_ms: int,
                            ttl_ms: int) -> list[HistoryEntry]:
        await self._barrier(_HISTORY)
        cutoff = now_ms - ttl_ms
        age_ms = int(self.replica_history_age_s * 1000)
        old = await self._replica_history(topic, since, cutoff, now_ms - age_ms,
                                          now_ms - age_ms // 2)
        if old is None:  # no replica, or it lags: everything from the primary
            async with self._conn() as conn:
                rows = await conn.fetch(_SQL_HISTORY_SINCE, topic, since, cutoff)
        else:
            # The entries newer than the bound, from the primary (those at or before it
            # came from the replica), merged in seq order.
            async with self._conn() as conn:
                recent = await conn.fetch(_SQL_HISTORY_RECENT, topic, since,
                                          max(cutoff, now_ms - age_ms))
            rows = sorted([*old, *recent], key=lambda r: r[1])
        return [_history(r) for r in rows]

    async def history_before(self, topic: str, before: int | None, limit: int, now_ms: int,
                             ttl_ms: int) -> list[HistoryEntry]:
        # On the primary: the newest entries are the ones asked for, and a replica may
        # not have them yet.
        await self._barrier(_HISTORY)
        async with self._conn() as conn:
            rows = await conn.fetch(_SQL_HISTORY_BEFORE, topic,
                                    _NEVER if before is None else before, now_ms - ttl_ms,
                                    max(limit, 0))
        return [_history(r) for r in reversed(rows)]

    async def _replica_history(self, topic: str, since: int, cutoff: int, bound: int,
                               fresh_ms: int) -> list[Any] | None:
        """History entries with ts in (cutoff, bound] from the replica, or None when there
        is no replica (or it is bypassed), the range is empty, or the replica has not
        replayed a commit made at or after `fresh_ms`."""
        if bound <= cutoff or not self._replica_up():
            return None
        rows = await self._read(
            lambda conn: conn.fetch(_SQL_REPLICA_HISTORY, topic, since, cutoff, bound,
                                    fresh_ms), replica_only=True)
        if rows is None or not rows or not rows[0][0]:
            return None
        return [tuple(r)[1:] for r in rows if r[1] is not None]

    async def last_seq(self, topic: str) -> int:
        await self._barrier(_HISTORY)
        async with self._conn() as conn:
            value = await conn.fetchval(_SQL_LAST_SEQ, topic)
        return 0 if value is None else int(value)

    # -- audit -----------------------------------------------------------------------------------

    def audit_nowait(self, kind: str, node: str | None, ip: str | None,
                     detail: dict[str, Any], now_ms: int) -> None:
        try:
            # default=str: an odd value in `detail` is recorded as text, never raises here.
            detail_json = _dumps(detail, default=str)
            _check_text(kind, node, ip)
        except (TypeError, ValueError, StoreError):  # circular, NaN, NUL in a name
            self._dropped += 1
            return
        self._submit_nowait(_AUDIT, (kind, node, ip, detail_json, now_ms))

    async def audit_query(self, node: str | None, kind: str | None, since: int | None,
                          limit: int, before_id: int | None) -> list[AuditEvent]:
        clauses: list[str] = []
        params: list[Any] = []
        for column, op, value in (("node", "=", node), ("kind", "=", kind),
                                  ("ts", ">=", since), ("id", "<", before_id)):
            if value is not None:
                params.append(value)
                clauses.append(f"{column} {op} ${len(params)}")
        where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
        params.append(max(limit, 0))
        sql = (f"SELECT id, ts, kind, node, ip, detail::text FROM audit {where}"
               f"ORDER BY id DESC LIMIT ${len(params)}")
        await self._barrier(_AUDIT)
        # The audit trail: stale-tolerant, on the replica when there is one.
        rows = await self._read(lambda conn: conn.fetch(sql, *params))
        return [AuditEvent(id=r[0], ts=r[1], kind=r[2], node=r[3], ip=r[4],
                           detail=json.loads(r[5])) for r in rows]

    # -- connections -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable("store: closed")
        if self._pool is None:
            raise StoreUnavailable("store: not open")

    def _check_writable(self) -> None:
        self._check_open()
        if self._dead:
            raise StoreUnavailable("store: postgresql writer stopped")

    @asynccontextmanager
    async def _conn(self, internal: bool = False) -> AsyncIterator[Any]:
        """Borrow a connection; driver errors leave as StoreUnavailable (or StoreError for
        a caller's bad value). `internal`: the writer and the in-doubt resolver, which
        finish their work while the store closes."""
        pool = self._pool
        if pool is None or (self._closed and not internal):
            raise StoreUnavailable("store: closed" if self._closed else "store: not open")
        try:
            async with pool.acquire(timeout=self.acquire_timeout_s) as conn:
                yield conn
        except _DRIVER_ERRORS as exc:
            raise _translate(exc) from exc

    def _replica_up(self) -> bool:
        return (self._read_pool is not None and not self._closed
                and time.monotonic() >= self._replica_down_until)

    async def _read(self, run: Callable[[Any], Any], *, replica_only: bool = False) -> Any:
        """`await run(conn)` on a replica connection when the replica is up, else (or if it
        fails there) on the primary. `replica_only`: None instead of the primary."""
        if self._replica_up():
            try:
                async with self._read_pool.acquire(timeout=self.acquire_timeout_s) as conn:
                    result = await run(conn)
                self.replica_reads += 1
                return result
            except _DRIVER_ERRORS as exc:
                if _is_item_error(exc):  # the caller's value: the primary would refuse it too
                    raise _item_error(exc) from exc
                self.replica_fallbacks += 1
                # A query cancelled by a conflict with recovery (40001) says nothing about
                # the replica's health: only this read goes to the primary.
                if not isinstance(exc, asyncpg.exceptions.SerializationError):
                    if self._replica_down_until <= time.monotonic():
                        _log.warning("store_replica_unavailable",
                                     extra={"error": str(exc) or type(exc).__name__,
                                            "retry_s": self.replica_retry_s})
                    self._replica_down_until = time.monotonic() + self.replica_retry_s
        if replica_only:
            return None
        async with self._conn() as conn:
            return await run(conn)

    # -- the write queue (callers' side) -----------------------------------------------------------

    def _submit(self, kind: int, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        self._check_writable()
        future = asyncio.get_running_loop().create_future()
        self._next_no += 1
        self._last_no[kind] = self._next_no
        lane = self._lanes[_LANE_OF[kind]]
        lane.queue.append(_Item(kind, args, future, self._next_no))
        lane.awaited += 1
        lane.wake.set()
        return future

    def _submit_nowait(self, kind: int, args: tuple[Any, ...]) -> None:
        lane = self._lanes[_LANE_OF[kind]]
        if (self._closed or self._pool is None or self._dead
                or lane.nowait >= self.max_nowait):
            self._dropped += 1
            return
        self._next_no += 1
        self._last_no[kind] = self._next_no
        lane.queue.append(_Item(kind, args, None, self._next_no))
        lane.nowait += 1
        # Only an idle writer needs waking; otherwise the item rides with the batch being
        # formed (and a lingering writer keeps waiting for an awaited call).
        if len(lane.queue) == 1:
            lane.wake.set()

    async def _barrier(self, *kinds: int) -> None:
        """Wait until the writes submitted so far (of these kinds; none named: all) are
        finished, so that a read sees every write of its data submitted before it, as
        if reads and writes shared one queue (the hub relies on it: a `sub` reads the
        history after the appends of the publications sequenced before it). Node reads
        and writes need none (node writes do not go through the queue); `ping` and
        `purge_expired` wait for everything (`ping` is the flush).
        """
        self._check_open()
        # Per lane, the number of its last item of these kinds submitted so far (taken
        # for both lanes before waiting for either): each lane commits in order.
        targets = [max((self._last_no[k] for k in (kinds or lane.kinds)
                        if _LANE_OF[k] == lane.no), default=0) for lane in self._lanes]
        for lane, target in zip(self._lanes, targets, strict=True):
            await self._wait_lane(lane, target)

    async def _wait_lane(self, lane: _Lane, target: int) -> None:
        """Until `lane` has finished its items up to number `target`."""
        if lane.done_no >= target or lane.task is None or self._dead:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        lane.barriers.append((target, future))
        lane.wake.set()
        await future

    @staticmethod
    def _release_barriers(lane: _Lane, all_: bool = False) -> None:
        keep: list[tuple[int, asyncio.Future[None]]] = []
        for target, future in lane.barriers:
            if all_ or target <= lane.done_no:
                if not future.done():
                    future.set_result(None)
            else:
                keep.append((target, future))
        lane.barriers = keep

    # -- the writer task -----------------------------------------------------------------------

    async def _run_writer(self, lane: _Lane) -> None:
        loop = asyncio.get_running_loop()
        batch: list[_Item] = []
        marks = self.delivered_marks if lane.no == _ACK_LANE else None
        try:
            while True:
                if not lane.queue:
                    due_in = None if marks is None else marks.due_in()
                    if due_in is not None and (due_in <= 0 or self._closed):
                        await self._flush(lane, [])  # held delivered marks due (or closing)
                        continue
                    if self._closed:
                        return
                    lane.wake.clear()
                    if due_in is None:
                        await lane.wake.wait()
                        continue
                    try:
                        async with asyncio.timeout(due_in):
                            await lane.wake.wait()
                    except TimeoutError:
                        pass
                    continue
                if not self._urgent(lane):
                    # Only fire-and-forget items: linger for an awaited call to ride with.
                    deadline = loop.time() + self.nowait_linger_s
                    while not self._urgent(lane):
                        remaining = deadline - loop.time()
                        if remaining <= 0:
                            break
                        lane.wake.clear()
                        try:
                            async with asyncio.timeout(remaining):
                                await lane.wake.wait()
                        except TimeoutError:
                            break
                batch = self._take(lane)
                await self._flush(lane, batch)
                lane.done_no = batch[-1].no
                if lane.no == _ACK_LANE:
                    self._acks_done(batch)
                batch = []
                self._release_barriers(lane)
        except BaseException as exc:  # a bug or a cancelled loop: never leave a caller waiting
            if not isinstance(exc, asyncio.CancelledError):
                _log.exception("store_writer_crashed")
            self._dead = True
            left = batch + list(lane.queue)
            lane.queue.clear()
            self._acks_done(left)
            self._dropped += _resolve([(item, None, _unavailable("writer stopped"))
                                       for item in left])
            for each in self._lanes:  # the other lane's waiting readers too
                self._release_barriers(each, all_=True)
            raise
        finally:
            if self._closed:
                self._release_barriers(lane, all_=True)

    def _acks_done(self, items: list[_Item]) -> None:
        acking = self._acking
        for item in items:
            if item.kind == _ACK:
                node_id = item.args[0]
                left = acking[node_id] - 1
                if left:
                    acking[node_id] = left
                else:
                    del acking[node_id]

    def _urgent(self, lane: _Lane) -> bool:
        return lane.awaited > 0 or bool(lane.barriers) or self._closed

    def _take(self, lane: _Lane) -> list[_Item]:
        """Take the batch: everything queued (at most max_batch items)."""
        queue = lane.queue
        if len(queue) <= self.max_batch:
            batch = list(queue)
            queue.clear()
            lane.awaited = 0
            lane.nowait = 0
            return batch
        batch = [queue.popleft() for _ in range(self.max_batch)]
        awaited = sum(1 for item in batch if item.future is not None)
        lane.awaited -= awaited
        lane.nowait -= len(batch) - awaited
        return batch

    def _fold_marks(self, items: list[_Item]) -> list[_Item]:
        """The items to commit: delivered marks are held (`DeliveredMarks`; an ack that
        acks its message writes it, `_apply_acks`), and the marks due are written with
        this batch."""
        marks = self.delivered_marks
        work: list[_Item] = []
        for item in items:
            if item.kind == _DELIVERED:
                marks.hold(*item.args)
            else:
                work.append(item)
        mids, times = marks.take_due(everything=self._closed)
        if mids:  # no future, no number: not a caller's, and barriers do not count it
            work.append(_Item(_DELIVERED, (mids, times), None, 0))
        return work

    async def _flush(self, lane: _Lane, items: list[_Item]) -> None:
        """Commit `items` (the group commit) and resolve their callers."""
        work = self._fold_marks(items) if lane.no == _ACK_LANE else items
        if not work:
            return
        try:
            outcomes = await self._commit(work)
        except StoreUnavailable as exc:
            _log.warning("store_batch_failed", extra={"error": str(exc), "items": len(items)})
            # One exception object per caller: each await appends its own traceback.
            outcomes = [(item, None, _copy(exc)) for item in work]
            if isinstance(exc.__cause__, TimeoutError) and lane.queue:
                # The server did not answer in time: what queued meanwhile would wait as
                # long again, batch after batch, for the same answer. It fails with this
                # batch, so a call waits about one timeout at most (hub/breaker.py stops
                # new calls). `items` grows: the writer's `batch[-1].no` covers them.
                behind = list(lane.queue)
                lane.queue.clear()
                lane.awaited = lane.nowait = 0
                items.extend(behind)
                outcomes += [(item, None, _copy(exc)) for item in behind]
        except Exception as exc:  # a bug: fail this batch loudly, keep the writer alive
            _log.exception("store_batch_crashed")
            outcomes = [(item, None, _unavailable(exc)) for item in work]
        self._dropped += _resolve(outcomes)

    async def _commit(self, items: list[_Item]) -> list[_Outcome]:
        """Commit `items` as one transaction if their values allow, else fail only the
        callers whose values the server refused."""
        try:
            return await self._transaction(items)
        except _ItemFailure as failure:
            if isinstance(failure.error.__cause__, asyncpg.exceptions.UniqueViolationError):
                try:  # a duplicate: again, skipping duplicates (they fail their callers)
                    return await self._transaction(items, careful=True)
                except _ItemFailure:
                    pass
        # Some item's values broke a statement: run each alone so only its caller fails.
        outcomes: list[_Outcome] = []
        for item in items:
            try:
                outcomes.extend(await self._transaction([item], careful=True))
            except _ItemFailure as failure:
                outcomes.append((item, None, failure.error))
            except StoreUnavailable as exc:
                outcomes.append((item, None, exc))
        return outcomes

    async def _transaction(self, items: list[_Item], careful: bool = False) -> list[_Outcome]:
        """Run `items` as one transaction. Returns their outcomes; an in-doubt commit
        returns [] (a resolver task resolves them later). `careful`: inserts skip rows
        whose key exists (their callers get a duplicate error) instead of failing.

        Raises _ItemFailure (an item's values broke a statement) or StoreUnavailable;
        nothing of the batch is committed then.
        """
        batch = _Batch(items, careful)
        self._batch_no += 1
        async with self._conn(internal=True) as conn:
            try:
                await conn.execute("BEGIN")
                xid = await conn.fetchval("SELECT txid_current()")
                outcomes = await self._apply(conn, batch)
            except BaseException as exc:
                self._counts.clear()  # it may count rows that are rolled back now
                if isinstance(exc, TimeoutError):
                    # No answer in command_timeout_s: a ROLLBACK would wait as long again
                    # (a 2 s timeout became 4 s). Dropping the connection rolls back too.
                    _terminate(conn)
                else:
                    await _rollback(conn)
                if _is_item_error(exc):
                    raise _ItemFailure(_item_error(exc)) from exc
                raise
            committing = time.monotonic()
            try:
                await conn.execute("COMMIT")
                for recipient, expires in batch.acked:
                    self._counts.acked(recipient, expires, committing)
            except BaseException as exc:
                self._counts.clear()
                if isinstance(exc, asyncpg.exceptions.PostgresError) and not isinstance(
                        exc, _CONNECTION_LOST):
                    raise  # the server answered: rolled back
                # The COMMIT may or may not have happened: ask the server once it answers.
                _log.warning("store_commit_in_doubt", extra={"error": repr(exc),
                                                             "items": len(items)})
                self._spawn_resolver(xid, outcomes, committing)
                _terminate(conn)  # whatever state it is in, it is not reused
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return []
        self.commits += 1
        return outcomes

    def _spawn(self, coro: Any, tasks: set[asyncio.Task[None]]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def _spawn_resolver(self, xid: int, outcomes: list[_Outcome], since: float) -> None:
        self.in_doubt += 1
        self._spawn(self._resolve_in_doubt(xid, outcomes, since), self._resolvers)

    async def _txid_status(self, xid: int) -> str | None:
        try:
            async with self._conn(internal=True) as conn:
                return cast(str | None, await conn.fetchval("SELECT txid_status($1)", xid))
        except StoreError:
            return None  # still unreachable

    async def _resolve_in_doubt(self, xid: int, outcomes: list[_Outcome],
                                since: float) -> None:
        """Learn whether transaction `xid` committed, then answer its callers: their
        results if it did, StoreUnavailable if it did not, or is still unknown
        `in_doubt_timeout_s` after the COMMIT was sent (`since`, monotonic: the callers
        cannot wait forever, and a COMMIT that timed out used that time already)."""
        deadline = since + self.in_doubt_timeout_s
        status: str | None = None
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    async with asyncio.timeout(remaining):
                        status = await self._txid_status(xid)
                except TimeoutError:
                    break
                if status in ("committed", "aborted"):
                    break
                # Unreachable, or "in progress": the server has not yet noticed the lost
                # connection (it rolls back then, as the COMMIT never arrived).
                await asyncio.sleep(0.1)
        except asyncio.CancelledError:  # close(): the answer is still unknown
            status = None
            raise
        finally:
            if status == "committed":
                self.commits += 1
                self._dropped += _resolve(outcomes)
            else:
                reason = ("connection lost during commit; the batch was rolled back"
                          if status == "aborted" else "connection lost during commit")
                self._dropped += _resolve([(item, None, _unavailable(reason))
                                           for item, _, _ in outcomes])
        if status is None or status == "in progress":
            _log.error("store_commit_unresolved", extra={"xid": xid})
            self._spawn(self._compensate(xid, outcomes), self._compensators)

    async def _compensate(self, xid: int, outcomes: list[_Outcome]) -> None:
        """Its callers were told "unavailable": if transaction `xid` turns out committed,
        take its messages back (those not acked yet), so that a message refused is not
        delivered. Best effort, until the store closes."""
        while True:
            status = await self._txid_status(xid)
            if status == "aborted":
                return
            if status == "committed":
                break
            await asyncio.sleep(1.0)
        # docs/protocol.md §4.2: a message sent with a cid is kept, with its cid. Its
        # sender resends it with the same cid (it was told "unavailable"), and that
        # resend may already have been answered `ok dup` with this message's mid: taking
        # the message back now would lose one the sender was told is stored.
        keys = [(item.args[0].mid, item.args[0].created) for item, _, exc in outcomes
                if item.kind == _ENQUEUE and exc is None and item.args[2] is None]
        if not keys:
            return
        try:
            async with self._conn(internal=True) as conn:
                result = await conn.execute(_SQL_TAKE_BACK, [k[0] for k in keys],
                                            [k[1] for k in keys])
        except StoreError as exc:
            _log.error("store_in_doubt_not_taken_back", extra={"xid": xid, "error": str(exc)})
            return
        finally:
            self._counts.clear()
        _log.warning("store_in_doubt_taken_back", extra={"xid": xid, "result": result})

    async def _apply(self, conn: Any, batch: _Batch) -> list[_Outcome]:
        """Run the statements of one batch (inside its transaction). Kinds go in the
        order a message lives: stored, delivered, acked; then history, then audit."""
        outcomes: list[_Outcome] = []
        if batch.by_kind[_ENQUEUE]:
            await self._apply_enqueues(conn, batch.by_kind[_ENQUEUE], outcomes, batch.careful)
        if batch.by_kind[_DELIVERED]:  # the marks due (_fold_marks): one item
            for item in batch.by_kind[_DELIVERED]:
                await conn.execute(_SQL_MARK_DELIVERED, *item.args)
                outcomes.append((item, None, None))
        if batch.by_kind[_ACK]:
            await self._apply_acks(conn, batch, outcomes)
        if batch.by_kind[_SESSION]:  # after the queue writes: the counts see them
            await self._apply_sessions(conn, batch.by_kind[_SESSION], outcomes)
        if batch.by_kind[_HISTORY]:
            await self._apply_history(conn, batch.by_kind[_HISTORY], outcomes, batch.careful)
        if batch.by_kind[_AUDIT]:
            audit = batch.by_kind[_AUDIT]
            outcomes.extend((item, None, None) for item in audit)
            # item.args: kind, node, ip, detail_json, now_ms
            await conn.execute(_SQL_INSERT_AUDIT, *_columns(
                [(a[4], a[0], a[1], a[2], a[3]) for a in (item.args for item in audit)], 5))
        return outcomes

    async def _apply_enqueues(self, conn: Any, items: list[_Item],
                              outcomes: list[_Outcome], careful: bool) -> None:
        counts = self._counts
        counts.max_age_s = self.pending_count_max_age_s
        now_s = time.monotonic()
        batch_no = self._batch_no
        # Count, in one query, every recipient whose cached count does not hold.
        need: dict[str, int] = {}
        for item in items:
            msg: StoredMessage = item.args[0]
            if counts.get(msg.recipient, msg.created, now_s) is None:
                need.setdefault(msg.recipient, msg.created)
        if need:
            rows = await conn.fetch(_SQL_COUNT_MANY, list(need), list(need.values()))
            counted = time.monotonic()  # after the count's snapshot (PendingCounts.acked)
            for row in rows:
                counts.put(row[0], row[1], need[row[0]], row[2], counted, batch_no)
        # docs/protocol.md §4.2: a (sender, cid) remembered already names its message;
        # a repeat is answered with that mid, neither counted nor stored. Only batches
        # with cids pay for it (one statement, whatever their size).
        firsts: dict[tuple[str, str], _Item] = {}
        for item in items:
            cid = item.args[2]
            if cid is not None:
                firsts.setdefault((item.args[0].sender, cid), item)
        remembered = await self._remember_cids(conn, firsts) if firsts else {}
        accepted: list[_Item] = []
        keys: set[tuple[str, int]] = set()
        batch_new: dict[str, list[int]] = {}  # recipient -> expires of accepted messages
        winners: dict[tuple[str, str], _Item] = {}  # (sender, cid) -> accepted item
        repeats: list[tuple[_Item, _Item]] = []  # (repeat, accepted item of its cid)
        for item in items:
            msg, max_pending, cid, _ = item.args
            key = None if cid is None else (msg.sender, cid)
            if key is not None:
                mid = remembered[key]
                if mid != firsts[key].args[0].mid:  # stored before this batch
                    outcomes.append((item, mid, None))
                    continue
                winner = winners.get(key)
                if winner is not None:  # a repeat within the batch: its first's outcome
                    repeats.append((item, winner))
                    continue
            if (msg.mid, msg.created) in keys:
                outcomes.append((item, None, _duplicate("mid")))
                continue
            # The bound counts unacked messages unexpired at the message's creation time
            # (enqueue has no clock of its own).
            entry = counts.get(msg.recipient, msg.created, now_s)
            if entry is None or (entry[0] >= max_pending and entry[4] != batch_no):
                # Not held, or full by a count other instances' acks may have changed.
                entry = await self._recount(conn, msg, batch_new.get(msg.recipient, ()))
            if entry[0] >= max_pending and self._acking.get(msg.recipient):
                # Full, but acks of this recipient's submitted before (in the other lane)
                # are not committed yet: they count first, as with one queue. Only the
                # recipient acks its queue, so nobody else can make an enqueue wait here.
                await self._wait_lane(self._lanes[_ACK_LANE], self._last_no[_ACK])
                entry = await self._recount(conn, msg, batch_new.get(msg.recipient, ()))
            if entry[0] >= max_pending:
                outcomes.append((item, None, QueueFull("queue full")))
                continue
            counts.added(msg.recipient, msg.expires)
            batch_new.setdefault(msg.recipient, []).append(msg.expires)
            keys.add((msg.mid, msg.created))
            accepted.append(item)
            if key is not None:
                winners[key] = item
        inserted: set[tuple[str, int]] = set()
        if accepted:
            columns = _columns([(m.mid, m.sender, m.recipient, m.body, m.sig, m.receipt,
                                 m.created, m.expires, _meta_json(m.meta))
                                for m in (item.args[0] for item in accepted)], 9)
            if careful:
                rows = await conn.fetch(_SQL_INSERT_MESSAGES_CAREFUL, *columns)
                inserted = {(row[0], row[1]) for row in rows}
            else:  # all of them, or a UniqueViolationError
                await conn.execute(_SQL_INSERT_MESSAGES, *columns)
                inserted = keys
            for item in accepted:
                m = item.args[0]
                if (m.mid, m.created) in inserted:
                    outcomes.append((item, None, None))
                else:  # a message with this mid (and time) is stored already
                    counts.forget(m.recipient)
                    outcomes.append((item, None, _duplicate("mid")))
        for item, winner in repeats:
            m = winner.args[0]
            if (m.mid, m.created) in inserted:
                outcomes.append((item, m.mid, None))
            else:
                outcomes.append((item, None, _duplicate("mid")))
        if firsts:
            await self._settle_cids(conn, firsts, remembered, winners, inserted)

    async def _recount(self, conn: Any, msg: StoredMessage, accepted: Iterable[int]
                       ) -> list[Any]:
        """Count `msg.recipient`'s queue at `msg.created` (inside the batch transaction)
        and keep the count; `accepted`: expiries of the batch's messages for it, not
        inserted yet."""
        row = await conn.fetchrow(_SQL_COUNT_MANY, [msg.recipient], [msg.created])
        extra = [e for e in accepted if e > msg.created]
        expiries = extra if row[2] is None else [row[2], *extra]
        return self._counts.put(msg.recipient, row[1] + len(extra), msg.created,
                                min(expiries, default=None), time.monotonic(),
                                self._batch_no)

    async def _remember_cids(self, conn: Any, firsts: dict[tuple[str, str], _Item]
                             ) -> dict[tuple[str, str], str]:
        """Remember each (sender, cid) for the first item of the batch naming it (a row
        past its window is taken over); return the mid each key names now: that item's,
        or an older message's (docs/protocol.md §4.2)."""
        ordered = sorted(firsts)
        rows_: list[tuple[Any, ...]] = []
        for key in ordered:
            m: StoredMessage = firsts[key].args[0]
            window_ms: int = firsts[key].args[3]
            rows_.append((key[0], key[1], m.mid, m.created, m.created + window_ms))
        rows = await conn.fetch(_SQL_DEDUP, *_columns(rows_, 5))
        return {(row[0], row[1]): row[2] for row in rows}

    async def _settle_cids(self, conn: Any, firsts: dict[tuple[str, str], _Item],
                           remembered: dict[tuple[str, str], str],
                           winners: dict[tuple[str, str], _Item],
                           inserted: set[tuple[str, int]]) -> None:
        """After the insert: a row written for a message that is not stored goes, or
        names the later message of the batch stored in its place (both rare: the queue
        bound, a duplicate mid)."""
        drop: list[tuple[str, str, str]] = []
        moved: list[tuple[str, str, str, int, int]] = []
        for key, first in firsts.items():
            mid = first.args[0].mid
            if remembered[key] != mid:
                continue  # an older message's row: not this batch's
            winner = winners.get(key)
            if winner is None or (winner.args[0].mid, winner.args[0].created) not in inserted:
                drop.append((key[0], key[1], mid))
            elif winner.args[0].mid != mid:
                w: StoredMessage = winner.args[0]
                moved.append((key[0], key[1], w.mid, w.created, w.created + winner.args[3]))
        if drop:
            await conn.execute(_SQL_DEDUP_DROP, *_columns(drop, 3))
        if moved:
            await conn.execute(_SQL_DEDUP_SET, *_columns(moved, 5))

    async def _apply_acks(self, conn: Any, batch: _Batch, outcomes: list[_Outcome]) -> None:
        items = batch.by_kind[_ACK]
        # Each (node, mid) goes to the first call that names it: a later call of the same
        # batch finds it acked already, as if the calls had run one after another.
        owner: dict[tuple[str, str], tuple[_Item, int]] = {}
        for item in items:
            node_id, mids, now_ms = item.args
            for mid in mids:
                owner.setdefault((node_id, mid), (item, now_ms))
        keys = list(owner)
        mids_ = [key[1] for key in keys]
        marks = self.delivered_marks
        rows = await conn.fetch(_SQL_ACK, [key[0] for key in keys], mids_,
                                [value[1] for value in owner.values()],
                                [marks.get(mid) for mid in mids_])
        acked: dict[tuple[str, str], AckResult] = {}
        for ordinal, sender, receipt, expires in rows:  # the rows come by input position
            key = keys[ordinal - 1]
            if key not in acked:
                acked[key] = AckResult(mid=key[1], sender=sender, receipt=receipt)
                # Written by this ack; an ack that acks nothing (another node's, a
                # repeat) leaves the mark held for the right one.
                marks.take(key[1])
            batch.acked.append((key[0], expires))
        for item in items:
            node_id, mids, _ = item.args
            result: list[AckResult] = []
            for mid in mids:
                key = (node_id, mid)
                if owner[key][0] is item and key in acked:
                    result.append(acked.pop(key))
            outcomes.append((item, result, None))

    async def _apply_sessions(self, conn: Any, items: list[_Item],
                              outcomes: list[_Outcome]) -> None:
        ids = sorted({item.args[0] for item in items})
        before = {row[0]: _node(row) for row in await conn.fetch(_SQL_LOCK_NODES, ids)}
        # node -> (key, meta, time): a node twice in a batch is seen with the later
        # call's time, keeping an earlier key or meta the later one leaves out.
        seen: dict[str, tuple[bytes | None, str | None, int]] = {}
        at: dict[str, int] = {}
        for item in items:
            node_id, key, meta_json, now_ms, registered_only = item.args
            at.setdefault(node_id, now_ms)
            rec = before.get(node_id)
            if rec is not None and rec.banned:
                continue
            if registered_only and (rec is None or not rec.registered):
                continue
            old = seen.get(node_id)
            if old is not None:
                key = key if key is not None else old[0]
                meta_json = meta_json if meta_json is not None else old[1]
            seen[node_id] = (key, meta_json, now_ms)
        ordered = sorted(seen.items())  # inserts too take their keys in id order
        for rows, sql in (([(n, *v) for n, v in ordered if n in before], _SQL_NODES_SEEN),
                          ([(n, *v) for n, v in ordered if n not in before], _SQL_NODES_NEW)):
            if rows:
                await conn.execute(sql, *_columns(rows, 4))
        counts = {row[0]: row[1] for row in await conn.fetch(_SQL_COUNT_MANY, list(at),
                                                              list(at.values()))}
        for item in items:
            node_id = item.args[0]
            outcomes.append((item, (before.get(node_id), int(counts.get(node_id, 0))), None))

    async def _apply_history(self, conn: Any, items: list[_Item],
                             outcomes: list[_Outcome], careful: bool) -> None:
        # Per topic, in call order: an entry with keep <= 0 empties the topic's history
        # (and keeps nothing), so only the entries after the last such one are inserted;
        # then the topic is trimmed to the keep of its last entry and the latest ttl
        # cutoff (keep and ttl are configuration: the same for every call in practice).
        # The sequence numbers first, in call order per topic (entry.seq is ignored).
        counts: dict[str, int] = {}
        for item in items:
            topic = item.args[0].topic
            counts[topic] = counts.get(topic, 0) + 1
        rows = await conn.fetch(_SQL_TAKE_SEQS, list(counts), list(counts.values()))
        next_seq = {row[0]: row[1] - counts[row[0]] + 1 for row in rows}
        for item in items:
            entry, keep, ttl_ms = item.args
            item.args = (dataclasses.replace(entry, seq=next_seq[entry.topic]), keep, ttl_ms)
            next_seq[entry.topic] += 1
        groups: dict[str, list[_Item]] = {}
        for item in items:
            groups.setdefault(item.args[0].topic, []).append(item)
        clear: list[str] = []
        rows_in: list[_Item] = []
        trim: dict[str, tuple[int, int]] = {}
        for topic, group in groups.items():
            last_zero = max((i for i, it in enumerate(group) if it.args[1] <= 0), default=-1)
            if last_zero >= 0:
                clear.append(topic)
            kept = group[last_zero + 1:]
            rows_in.extend(kept)
            if kept:
                cutoff = max(it.args[0].ts - it.args[2] for it in kept)
                trim[topic] = (kept[-1].args[1], cutoff)
        if clear:
            await conn.execute(_SQL_CLEAR_HISTORY, clear)
        inserted: set[tuple[str, int]] = set()
        if rows_in:
            rows_: list[tuple[Any, ...]] = []
            seen: set[tuple[str, int]] = set()
            for item in rows_in:
                e: HistoryEntry = item.args[0]
                if (e.topic, e.seq) in seen:
                    continue
                seen.add((e.topic, e.seq))
                rows_.append((e.topic, e.seq, e.mid, e.sender, e.body, e.ts, e.sig,
                              _meta_json(e.meta)))
            columns = _columns(rows_, 8)
            if careful:
                rows = await conn.fetch(_SQL_INSERT_HISTORY_CAREFUL, *columns)
                inserted = {(row[0], row[1]) for row in rows}
            else:  # all of them, or a UniqueViolationError
                await conn.execute(_SQL_INSERT_HISTORY, *columns)
                inserted = seen
            await conn.execute(_SQL_TRIM_HISTORY, list(trim),
                               [value[0] for value in trim.values()],
                               [value[1] for value in trim.values()])
        taken: set[tuple[str, int]] = set()
        in_rows = {id(item) for item in rows_in}
        for item in items:
            e = item.args[0]
            key = (e.topic, e.seq)
            if id(item) in in_rows and (key not in inserted or key in taken):
                outcomes.append((item, None, _duplicate("history seq")))
            else:
                taken.add(key)
                outcomes.append((item, e.seq, None))


def _terminate(conn: Any) -> None:
    try:
        conn.terminate()
    except asyncpg.exceptions.InterfaceError:
        # A lost connection is already back in the pool (asyncpg released its proxy).
        pass


async def _rollback(conn: Any) -> None:
    try:
        if conn.is_closed():
            return
        await conn.execute("ROLLBACK")
    except (Exception, asyncio.CancelledError):
        # The connection is in trouble (or lost and already released): drop it; the
        # server rolls back the transaction of a lost session.
        _terminate(conn)
