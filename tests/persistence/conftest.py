"""Fixtures of the `Store` conformance suite: every test runs against every backend.

A backend is one `StoreFactory` subclass registered in `FACTORIES` and named in
`STORE_PARAMS`. Backends are expected to take the keyword `migrations_dir` (the
migrations test edits a copy) and to expose `commits` (the number of transactions
committed, for the group-commit test).

PostgreSQL (`PostgresFactory`) runs on the real server of `tests.services.need_pg()`
(skipped without it, failed under CI): each test gets its own schema `t_<random>`
(created by the store's `migrate()`, named in the URL as `?schema=`, so a subprocess
using `factory.url` lands in it too), dropped with CASCADE after the test.

Fixtures:
- `store`: an open store of each backend in `STORE_PARAMS`, closed after the test.
- `any_store`: the same plus the variants in `EXTRA_PARAMS` (SQLite `:memory:`), for the
  tests worth running on those too.
- `store_factory`: builds (and re-builds, on the same database) stores of one backend,
  for tests that close and reopen.
- `pg_factory`: a `PostgresFactory` alone, for the PostgreSQL-only tests
  (test_postgres.py).
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from openred.persistence.postgres import PostgresStore
from openred.persistence.sqlite import SqliteStore
from openred.persistence.store import Store

from tests.services import need_pg

PACKAGE_MIGRATIONS = Path(__file__).resolve().parents[2] / "persistence" / "migrations"


class StoreFactory:
    """Builds not-yet-open stores of one backend, all on the same database."""

    name: ClassVar[str]
    migrations_subdir: ClassVar[str]  # under persistence/migrations/
    durable: ClassVar[bool] = True  # the database outlives close() (reopen tests)

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path

    @property
    def url(self) -> str:
        raise NotImplementedError

    def make(self, *, auto_migrate: bool = True, migrations_dir: Path | None = None) -> Store:
        raise NotImplementedError

    async def cleanup(self) -> None:
        """Remove the database after the test (every store built is closed by then)."""

    def copy_migrations(self) -> Path:
        """A private copy of this backend's migrations, for tests that edit them."""
        target = self.tmp_path / f"migrations-{self.name}"
        shutil.copytree(PACKAGE_MIGRATIONS / self.migrations_subdir, target)
        return target


class SqliteFactory(StoreFactory):
    name = "sqlite"
    migrations_subdir = "sqlite"

    @property
    def url(self) -> str:
        # tmp_path is absolute: sqlite:// + "//abs/path" is the absolute-path form.
        return f"sqlite:///{self.tmp_path / 'hub.db'}"

    def make(self, *, auto_migrate: bool = True, migrations_dir: Path | None = None) -> Store:
        return SqliteStore(self.url, auto_migrate=auto_migrate, migrations_dir=migrations_dir)


class SqliteMemoryFactory(SqliteFactory):
    name = "sqlite-memory"
    durable = False

    @property
    def url(self) -> str:
        return "sqlite://:memory:"


def with_schema(dsn: str, schema: str) -> str:
    """`dsn` with `schema=NAME` added to its query."""
    parts = urlsplit(dsn)
    query = f"{parts.query}&schema={schema}" if parts.query else f"schema={schema}"
    return urlunsplit(parts._replace(query=query))


class PostgresFactory(StoreFactory):
    name = "postgres"
    migrations_subdir = "postgres"

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.dsn = need_pg()
        self.schema = f"t_{secrets.token_hex(6)}"
        # Small pools: the suite opens many stores, the server has max_connections.
        self.pool_size = 4

    @property
    def url(self) -> str:
        return with_schema(self.dsn, self.schema)

    def make(self, *, auto_migrate: bool = True, migrations_dir: Path | None = None) -> Store:
        return self.make_pg(auto_migrate=auto_migrate, migrations_dir=migrations_dir)

    def make_pg(self, *, auto_migrate: bool = True, migrations_dir: Path | None = None,
                url: str | None = None) -> PostgresStore:
        """A store on this test's schema (`url`: reach the server another way, e.g.
        through a proxy)."""
        return PostgresStore(url or self.dsn, schema=self.schema, auto_migrate=auto_migrate,
                             pool_size=self.pool_size, migrations_dir=migrations_dir)

    async def cleanup(self) -> None:
        # A lock left by a store a failed test did not close must not hang the suite.
        conn = await asyncpg.connect(self.dsn, server_settings={"lock_timeout": "10s"})
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        finally:
            await conn.close()


FACTORIES: dict[str, type[StoreFactory]] = {
    "sqlite": SqliteFactory,
    "sqlite-memory": SqliteMemoryFactory,
    "postgres": PostgresFactory,
}

# Every conformance test runs on each of these.
STORE_PARAMS = ["sqlite", "postgres"]
# Variants that only the `any_store` tests also run on.
EXTRA_PARAMS = ["sqlite-memory"]


@pytest.fixture(params=STORE_PARAMS)
async def store_factory(request: pytest.FixtureRequest,
                        tmp_path: Path) -> AsyncIterator[StoreFactory]:
    factory = FACTORIES[request.param](tmp_path)
    yield factory
    await factory.cleanup()


async def _open(factory: StoreFactory) -> Store:
    store = factory.make()
    await store.open()
    return store


@pytest.fixture
async def store(store_factory: StoreFactory) -> AsyncIterator[Store]:
    opened = await _open(store_factory)
    yield opened
    await opened.close()


@pytest.fixture(params=STORE_PARAMS + EXTRA_PARAMS)
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    factory = FACTORIES[request.param](tmp_path)
    opened = await _open(factory)
    yield opened
    await opened.close()
    await factory.cleanup()


@pytest.fixture
async def pg_factory(tmp_path: Path) -> AsyncIterator[PostgresFactory]:
    """PostgreSQL only: a fresh schema for the backend-specific tests."""
    factory = PostgresFactory(tmp_path)
    yield factory
    await factory.cleanup()
