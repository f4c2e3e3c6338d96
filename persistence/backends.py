"""Picks the `Store` backend named by `store.url` (`open_store`).

Kept apart from the contract (`store.py`) because it imports the backends, and the
backends import the contract: the factory sits above both, so neither imports the other.
Each backend is imported only when its URL is used (asyncpg is not loaded for SQLite).
"""

from __future__ import annotations

from openred.persistence.store import Store

__all__ = ["open_store"]


def open_store(url: str, *, auto_migrate: bool = True, pool_size: int = 10,
               retention_days: int = 30, read_url: str | None = None,
               timeout_s: float | None = None) -> Store:
    """Build (not yet open) the store named by `store.url`. `retention_days` bounds the
    partitioned PostgreSQL tables (dropped by day); SQLite purges rows instead.
    `read_url`: a PostgreSQL read replica (the config refuses it with SQLite).
    `timeout_s` (`store.timeout_s`): how long one call may wait for the database before
    it fails with StoreUnavailable (PostgreSQL's connect, pool, statement and in-doubt
    timeouts; SQLite's busy timeout); None keeps each backend's own defaults."""
    if url.startswith("sqlite:"):
        from openred.persistence.sqlite import SqliteStore

        lite = SqliteStore(url, auto_migrate=auto_migrate)
        if timeout_s is not None:
            lite.busy_timeout_ms = int(timeout_s * 1000)
        return lite
    if url.startswith(("postgresql:", "postgres:")):
        from openred.persistence.postgres import PostgresStore

        pg = PostgresStore(url, auto_migrate=auto_migrate, pool_size=pool_size,
                           retention_days=retention_days, read_url=read_url)
        if timeout_s is not None:
            # A black-holed server: a QoS 1 write is answered `unavailable` after about
            # this long (docs/benchmarks.md), not after 10 s per statement plus as long
            # again for the ROLLBACK.
            pg.connect_timeout_s = pg.command_timeout_s = timeout_s
            pg.acquire_timeout_s = pg.in_doubt_timeout_s = timeout_s
        store: Store = pg
        return store
    raise ValueError(f"store.url: unsupported scheme in {url.split(':', 1)[0]!r}; "
                     "use sqlite:/// or postgresql://")
