"""Picks the `Store` backend named by `store.url` (`open_store`).

Kept apart from the contract (`store.py`) because it imports the backends, and the
backends import the contract: the factory sits above both, so neither imports the other.
Each backend is imported only when its URL is used (asyncpg is not loaded for SQLite).
"""

from __future__ import annotations

from persistence.store import Store

__all__ = ["open_store"]


def open_store(url: str, *, auto_migrate: bool = True, pool_size: int = 10,
               retention_days: int = 30, read_url: str | None = None) -> Store:
    """Build (not yet open) the store named by `store.url`. `retention_days` bounds the
    partitioned PostgreSQL tables (dropped by day); SQLite purges rows instead.
    `read_url`: a PostgreSQL read replica (the config refuses it with SQLite)."""
    if url.startswith("sqlite:"):
        from persistence.sqlite import SqliteStore

        return SqliteStore(url, auto_migrate=auto_migrate)
    if url.startswith(("postgresql:", "postgres:")):
        from persistence.postgres import PostgresStore

        store: Store = PostgresStore(url, auto_migrate=auto_migrate, pool_size=pool_size,
                                     retention_days=retention_days, read_url=read_url)
        return store
    raise ValueError(f"store.url: unsupported scheme in {url.split(':', 1)[0]!r}; "
                     "use sqlite:/// or postgresql://")
