"""The `Store` contract: what the hub keeps durably, and what each backend guarantees.

Owned here: the `Store` protocol (nodes, QoS 1 queues, topic history, audit events), the
record types it returns and the errors it raises. Implementations live beside it
(`sqlite.py`, `postgres.py`; `backends.py` picks one from `store.url`) and are held to
this docstring by one conformance suite (`tests/persistence/`), run against each.

Guarantees every implementation gives:

- **Durability before return.** `enqueue` returns only after the messages are committed;
  the hub sends `ok stored` (docs/protocol.md §4) only then. Writes from many concurrent
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
  The last sequence number of a topic survives trimming (`last_seq`), so no `seq` is
  ever reused. Sequences are taken by the store, atomically with the append.
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

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "ACKED_KEEP_MS",
    "AckResult",
    "AuditEvent",
    "DeliveredMarks",
    "EnqueueArgs",
    "HistoryEntry",
    "MessageState",
    "NodeRecord",
    "QueueFull",
    "Revocation",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "StoredMessage",
    "Undelivered",
    "outcomes_of",
]

# Acked rows are kept this long so `message_state` can still answer "acked"; every
# backend's `purge_expired` deletes them afterwards.
ACKED_KEEP_MS = 86_400_000


# One message for `Store.enqueue_many`: (message, max_pending, cid, dedup_window_ms).
EnqueueArgs = tuple["StoredMessage", int, "str | None", int]


async def outcomes_of(futures: list[asyncio.Future[Any]]) -> list[Any]:
    """Each future's result, or the StoreError it failed with (`enqueue_many`); any
    other exception (a bug, a cancellation) is raised, and the futures not yet awaited
    are cancelled.

    Awaited one after another, not gathered: they are resolved together (one commit),
    so only the first await suspends, and no done-callback per future is scheduled.
    """
    outcomes: list[Any] = []
    try:
        for future in futures:
            try:
                outcomes.append(await future)
            except StoreError as exc:
                outcomes.append(exc)
    except BaseException:
        for future in futures:
            future.cancel()
        raise
    return outcomes


class DeliveredMarks:
    """Delivered marks (`mark_delivered_nowait`) held back from the database for up to
    `hold_s`, so that the ack that usually follows within milliseconds writes the mark
    in its own row update: one write per acked message instead of two (the mark's
    UPDATE was a third of a QoS 1 message's database time). A mark not acked within
    `hold_s` is written then; past `max_held` marks the oldest are written at once.

    Each backend's writer owns one (one thread or task touches it) and also answers
    `message_state` from it, so this instance's reads never lag; another instance sees a
    held mark at most `hold_s` late (README, admin API). A mark is best effort, as
    before: the ack records delivery even if a mark is lost with a failed batch.
    """

    __slots__ = ("_held", "hold_s", "max_held")

    def __init__(self, hold_s: float = 1.0, max_held: int = 100_000) -> None:
        self.hold_s = hold_s
        self.max_held = max_held
        # mid -> (first delivery time ms, monotonic time it is due); insertion order is
        # due order (hold_s is fixed), so the due ones are always at the front.
        self._held: dict[str, tuple[int, float]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, mids: list[str], now_ms: int) -> None:
        held = self._held
        due = time.monotonic() + self.hold_s
        for mid in mids:
            if mid not in held:  # the first delivery time is kept
                held[mid] = (now_ms, due)

    def get(self, mid: str) -> int | None:
        entry = self._held.get(mid)
        return None if entry is None else entry[0]

    def take(self, mid: str) -> int | None:
        """The held mark of `mid`, which its ack now writes (None: none held)."""
        entry = self._held.pop(mid, None)
        return None if entry is None else entry[0]

    def due_in(self) -> float | None:
        """Seconds until the oldest held mark is due (<= 0: now); None: none held."""
        for _, due in self._held.values():
            return due - time.monotonic()
        return None

    def take_due(self, everything: bool = False) -> tuple[list[str], list[int]]:
        """Take the marks to write now: the due ones and any past `max_held` (all of
        them with `everything`: a flush or close)."""
        held = self._held
        if everything:
            mids, entries = list(held), list(held.values())
            held.clear()
            return mids, [at for at, _ in entries]
        now = time.monotonic()
        over = len(held) - self.max_held
        mids_: list[str] = []
        times: list[int] = []
        for mid, (at, due) in held.items():
            if due > now and over <= 0:
                break
            mids_.append(mid)
            times.append(at)
            over -= 1
        for mid in mids_:
            del held[mid]
        return mids_, times


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
    meta: dict[str, str] | None = None  # docs/protocol.md §4.1, redelivered with it


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
    sig: bytes | None = None  # docs/protocol.md §5.1
    meta: dict[str, str] | None = None  # docs/protocol.md §4.1


@dataclass(frozen=True, slots=True)
class Undelivered:
    """A recipient with QoS 1 messages stored that the broker could not carry."""

    recipient: str
    since: int  # ms, when it was first marked
    mark: str  # the mid of the latest message marked


@dataclass(frozen=True, slots=True)
class Revocation:
    """A revoked node token: kind "jti" (one token, `subject` its jti) or "node" (every
    token of node `subject` whose iat, in ms, is before `issued_before`)."""

    id: int
    kind: str
    subject: str
    issued_before: int | None  # ms; "node" only
    created: int  # ms
    expires: int  # ms; the row is forgotten after this


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

    async def session_start(self, node_id: str, key: bytes | None,
                            meta: dict[str, Any] | None, now_ms: int, *,
                            registered_only: bool = False) -> tuple[NodeRecord | None, int]:
        """A node authenticated: its record as it was before this call (None: unknown)
        and its `count_pending` at `now_ms`, and, unless that record is banned (or, with
        `registered_only`, the allowlist mode, missing or not registered), `node_seen`.
        Group-committed with the queue writes and after those submitted before it: a
        reconnect storm is a few statements per batch of nodes, not three round trips
        (and a commit) per node."""

    async def put_node(self, node_id: str, meta: dict[str, Any], key: bytes | None,
                       now_ms: int) -> tuple[NodeRecord, bool]:
        """Register (or update) a node as an operator; returns (record, created)."""

    async def set_banned(self, node_id: str, banned: bool, now_ms: int) -> NodeRecord:
        """Ban or unban; a node never seen is created (a ban may precede the first
        connection)."""

    async def list_nodes(self, limit: int, after: str | None) -> list[NodeRecord]:
        """Nodes ordered by id, those with id > `after`, at most `limit`."""

    async def forget_node(self, node_id: str, now_ms: int) -> bool:
        """Forget what is known of a node (registration, meta, key): its row goes, or,
        when it is banned, stays with the ban alone. Its unacked QoS 1 messages expire
        at `now_ms` (state `expired`; never delivered again), also those enqueued
        before this call and not yet committed. Returns False when there was neither a
        row nor a pending message."""

    # -- token revocations (docs/protocol.md §2.4) -------------------------------------

    async def add_revocation(self, kind: str, subject: str, issued_before: int | None,
                             expires: int, now_ms: int) -> Revocation:
        """Store durably, before returning, one revocation (`kind` "jti" or "node"),
        merged with the row of the same (kind, subject): the later `issued_before` and
        `expires` win. The row gets an id above every id before it, and rows become
        visible in id order, so a reader paging with `revocations_since` never skips
        one. Rows expired at `now_ms` are deleted."""

    async def revocations_since(self, after_id: int, now_ms: int,
                                limit: int) -> list[Revocation]:
        """Unexpired revocations with id > `after_id`, by id, at most `limit`."""

    # -- QoS 1 queues ---------------------------------------------------------------

    async def enqueue(self, msg: StoredMessage, max_pending: int, *, cid: str | None = None,
                      dedup_window_ms: int = 0) -> str | None:
        """Store one message durably (group-committed) and return None; raise
        QueueFull when the recipient already holds `max_pending` unexpired unacked
        messages.

        With `cid` (docs/protocol.md §4.2): when (msg.sender, cid) is remembered, unexpired
        at msg.created, nothing is stored (nor counted against `max_pending`) and the mid
        remembered is returned (a repeat). Otherwise (sender, cid) -> msg.mid is
        remembered until msg.created + dedup_window_ms, in the transaction that stores
        the message, so it is remembered if and only if the message was stored. Calls
        are applied in call order, also within one group commit: a repeat behind its
        first gets the first's outcome (its mid if stored, or is stored itself if the
        first was refused). Across stores sharing a database, a repeat whose first is
        being committed by another waits for that commit."""

    async def enqueue_many(self, items: list[EnqueueArgs]) -> list[str | StoreError | None]:
        """`enqueue` of each item (message, max_pending, cid, dedup_window_ms), in call
        order, submitted together so that they share a group commit, with one outcome
        per item instead of one raise: what `enqueue` returns, or the StoreError it
        raises (QueueFull, StoreUnavailable, a refused value) for that message alone.
        The hub stores the QoS 1 sends of one read this way: one call, not one per
        message."""

    async def pending(self, node_id: str, now_ms: int, after_mid: str | None,
                      limit: int) -> list[StoredMessage]:
        """Unacked, unexpired messages for `node_id` in enqueue order, those enqueued
        after the message `after_mid` (None: from the start), at most `limit`."""

    async def count_pending(self, node_id: str, now_ms: int) -> int: ...

    async def pending_total(self, now_ms: int) -> int:
        """Unacked, unexpired messages of every recipient (the QoS 1 backlog gauge,
        sampled every few seconds): one query, not ordered after queued writes."""

    def pool_usage(self) -> tuple[int, int]:
        """(connections in use, most connections the store holds), for the metrics;
        no I/O, never raises."""

    def mark_delivered_nowait(self, mids: list[str], now_ms: int) -> None:
        """Record that these messages were written to the recipient (state
        `delivered`). Best effort, never raises; held up to `DeliveredMarks.hold_s` so
        that the ack writes it, else written with a later commit (`message_state` of
        this store sees it at once)."""

    async def ack(self, node_id: str, mids: list[str], now_ms: int) -> list[AckResult]:
        """Ack the listed messages that are addressed to `node_id` and not acked yet;
        return those acked now."""

    async def message_state(self, mid: str, now_ms: int) -> MessageState | None: ...

    async def purge_expired(self, now_ms: int) -> int:
        """Delete expired and long-acked rows, and `cid`s remembered past their window
        (housekeeping); return how many."""

    # -- delivery hints (docs/protocol.md §5: delivered while the recipient is online) --

    async def mark_undelivered(self, marks: list[tuple[str, str]], now_ms: int) -> None:
        """Note durably, before returning, each (recipient, mark): the recipient has
        QoS 1 messages stored that the broker could not carry, the latest of them
        `mark`. One row per recipient, whoever writes it: `since` is kept from the first
        mark, `mark` replaced. Written after the messages themselves are stored."""

    async def undelivered(self, limit: int) -> list[Undelivered]:
        """At most `limit` marks, oldest `since` first."""

    async def clear_undelivered(self, marks: list[tuple[str, str]]) -> int:
        """Delete the rows whose recipient and mark both match (a recipient marked again
        meanwhile keeps its row); return how many."""

    # -- topic history ----------------------------------------------------------------

    async def append_history(self, entry: HistoryEntry, keep: int, ttl_ms: int) -> int:
        """Number `entry` (its `seq` is ignored) with the topic's next sequence, 1, 2, 3,
        ..., taken in the same transaction that keeps it, and return that number; trim
        the topic to `keep` entries (`keep` = 0 keeps only the sequence). A topic's
        numbers commit in order, whichever process takes them, so once seq N is visible
        every seq below N is too (docs/protocol.md §6)."""

    async def history_since(self, topic: str, since: int, now_ms: int,
                            ttl_ms: int) -> list[HistoryEntry]:
        """Kept entries with seq > since, in seq order (entries older than ttl_ms are
        not returned)."""

    async def history_before(self, topic: str, before: int | None, limit: int, now_ms: int,
                             ttl_ms: int) -> list[HistoryEntry]:
        """The newest `limit` kept entries with seq < `before` (None: any), oldest first
        (docs/protocol.md §5.2; entries older than ttl_ms are not returned). Sees every
        append submitted before it."""

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
