"""Durable state of the hub: the `Store` contract (`store.py`) and its backends.

The public API is the contract and `open_store(url)`; backends (`sqlite.py`,
`postgres.py`) are picked by URL and imported only when used.
"""

from persistence.store import (
    AckResult,
    AuditEvent,
    HistoryEntry,
    MessageState,
    NodeRecord,
    QueueFull,
    Store,
    StoredMessage,
    StoreError,
    StoreUnavailable,
    open_store,
)

__all__ = [
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
    "open_store",
]
