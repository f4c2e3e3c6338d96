"""Durable state of the hub: the `Store` contract (`store.py`) and its backends.

The public API is the contract and `open_store(url)` (`backends.py`); backends
(`sqlite.py`, `postgres.py`) are picked by URL and imported only when used. Their shared
migration files and checks are `migrations.py`.
"""

from openred.persistence.backends import open_store
from openred.persistence.store import (
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
