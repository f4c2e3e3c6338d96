"""The `Store` contract: what the hub keeps durably, and what each backend guarantees.

Owned here: the `Store` protocol (nodes, QoS 1 queues, topic history, audit events), the
record types it returns and the errors it raises. Implementations live beside it
(`sqlite.py`, `postgres.py`; `backends.py` picks one from `store.url`) and are held to
this docstring by one conformance suite (`tests/persistence/`), run against each.

Guarantees every implementation gives:

- **Durability before return.** `enqueue` returns only after the messages are committed;
  the hub sends `ok stored` (PROTOCOL.md §4) only then. Writes from many concurrent
  callers are group-committed: every call made while a commit is in flight joins the
  next commit, so durability costs one round trip per batch, not per message.
- **Order.** Writes are committed in the order the calls were made (FIFO), and
  `pending()` returns a recipient's messages in the order they were enqueued. A read of
  queues, history or audit sees every write of that data submitted before it, also one
  still waiting for its commit and the `*_nowait` ones (`ping()` flushes them all).
  Reads may complete in any order among themselves (PostgreSQL runs them concurrently).
- **Ack ownership.** `ack(node, mids)` only acks messages addressed to `node`; other
  mids are ignored, never an error.
- **Expiry.** A message whose `expires` (ms) is <= now is never returned by `pending()`
  nor counted by `count_pending()`; its state reads `expired`.
- **Bounded history.** `append_history` keeps at most `topic_history` entries per topic
  (oldest dropped first) and entries older than `topic_history_ttl_s` are dropped.
  The last sequence number of a topic survives trimming (`last_seq`), so a restarted
  single instance never reuses a `seq`.
- **Failure.** A backend that cannot be reached raises `StoreUnavailable` (the hub
  answers `error unavailable`: the frame was NOT accepted), promptly (seconds at most),
  and the store recovers by itself when the backend returns. A call whose commit was cut
  off waits until the backend tells whether it committed, so `StoreUnavailable` always
  means "not stored". A recipient queue already at `max_pending` raises `QueueFull` for
  the message that would exceed it; other messages of the same batch are unaffected. A
  value the backend refuses (a duplicate mid; in PostgreSQL, text with NUL) raises
  `StoreError` for that call only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "ACKED_KEEP_MS",
    "AckResult",
    "AuditEvent",
    "HistoryEntry",
    "MessageState",
    "NodeRecord",
    "QueueFull",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "StoredMessage",
]

# Acked rows are kept this long so `message_state` can still answer "acked"; every
# backend's `purge_expired` deletes them afterwards.
ACKED_KEEP_MS = 86_400_000


class StoreError(Exception):
    """Base of every error the persistence layer raises."""


class StoreUnavailable(StoreError):
    """The backend cannot be reached or failed; nothing of the call was committed."""


class QueueFull(StoreError):
    """The recipient already has `max_pending` unacked, unexpired messages."""


@dataclass(frozen=True, slots=True)
class NodeRecord:
    id: str
    key: bytes | None
    meta: dict[str, Any]
    banned: bool
    registered: bool  # registered by an operator (allowlist mode)
    first_seen: int  # ms
    last_seen: int  # ms


@dataclass(frozen=True, slots=True)
class StoredMessage:
    mid: str
    sender: str
    recipient: str
    body: bytes
    created: int  # ms
    expires: int  # ms
    sig: bytes | None = None
    receipt: bool = False


@dataclass(frozen=True, slots=True)
class MessageState:
    mid: str
    sender: str
    recipient: str
    qos: int
    state: str  # "stored" | "delivered" | "acked" | "expired"
    created: int
    delivered: int | None
    acked: int | None


@dataclass(frozen=True, slots=True)
class AckResult:
    """One message that an `ack` call moved from unacked to acked."""

    mid: str
    sender: str
    receipt: bool


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    topic: str
    seq: int
    mid: str
    sender: str
    body: bytes
    ts: int


@dataclass(frozen=True, slots=True)
class AuditEvent:
    id: int
    ts: int
    kind: str
    node: str | None
    ip: str | None
    detail: dict[str, Any] = field(default_factory=dict)


class Store(Protocol):
    """Durable state of the hub. All methods may raise `StoreUnavailable`."""

    async def open(self) -> None:
        """Connect (and apply migrations when the store was built with auto_migrate)."""

    async def close(self) -> None:
        """Flush pending group commits, then release every connection."""

    async def migrate(self) -> list[str]:
        """Apply pending migrations; return the names of those applied now."""

    async def ping(self) -> None:
        """Return when the backend answers a trivial query; raise StoreUnavailable if not."""

    # -- nodes ---------------------------------------------------------------------

    async def get_node(self, node_id: str) -> NodeRecord | None: ...

    async def node_seen(self, node_id: str, key: bytes | None, meta: dict[str, Any] | None,
                        now_ms: int) -> None:
        """Record a successful authentication: create the node if new (first_seen),
        update last_seen, and key/meta when given."""

    async def put_node(self, node_id: str, meta: dict[str, Any], key: bytes | None,
                       now_ms: int) -> tuple[NodeRecord, bool]:
        """Register (or update) a node as an operator; returns (record, created)."""

    async def set_banned(self, node_id: str, banned: bool, now_ms: int) -> NodeRecord:
        """Ban or unban; a node never seen is created (a ban may precede the first
        connection)."""

    async def list_nodes(self, limit: int, after: str | None) -> list[NodeRecord]:
        """Nodes ordered by id, those with id > `after`, at most `limit`."""

    # -- QoS 1 queues ---------------------------------------------------------------

    async def enqueue(self, msg: StoredMessage, max_pending: int) -> None:
        """Store one message durably (group-committed); raise QueueFull when the
        recipient already holds `max_pending` unexpired unacked messages."""

    async def pending(self, node_id: str, now_ms: int, after_mid: str | None,
                      limit: int) -> list[StoredMessage]:
        """Unacked, unexpired messages for `node_id` in enqueue order, those enqueued
        after the message `after_mid` (None: from the start), at most `limit`."""

    async def count_pending(self, node_id: str, now_ms: int) -> int: ...

    def mark_delivered_nowait(self, mids: list[str], now_ms: int) -> None:
        """Record that these messages were written to the recipient (state
        `delivered`). Best effort, batched with the next commit; never raises."""

    async def ack(self, node_id: str, mids: list[str], now_ms: int) -> list[AckResult]:
        """Ack the listed messages that are addressed to `node_id` and not acked yet;
        return those acked now."""

    async def message_state(self, mid: str, now_ms: int) -> MessageState | None: ...

    async def purge_expired(self, now_ms: int) -> int:
        """Delete expired and long-acked rows (housekeeping); return how many."""

    # -- topic history ----------------------------------------------------------------

    async def append_history(self, entry: HistoryEntry, keep: int, ttl_ms: int) -> None:
        """Keep `entry` (group-committed) and trim the topic to `keep` entries; record
        `entry.seq` as the topic's last sequence. `keep` = 0 keeps only the sequence."""

    async def history_since(self, topic: str, since: int, now_ms: int,
                            ttl_ms: int) -> list[HistoryEntry]:
        """Kept entries with seq > since, in seq order (entries older than ttl_ms are
        not returned)."""

    async def last_seq(self, topic: str) -> int:
        """The highest seq ever appended for `topic` (0 when none)."""

    # -- audit --------------------------------------------------------------------

    def audit_nowait(self, kind: str, node: str | None, ip: str | None,
                     detail: dict[str, Any], now_ms: int) -> None:
        """Record an audit event with the next commit. Never raises; events are dropped
        (and counted) only when the store is unavailable."""

    async def audit_query(self, node: str | None, kind: str | None, since: int | None,
                          limit: int, before_id: int | None) -> list[AuditEvent]:
        """Newest first, id < before_id when given."""
