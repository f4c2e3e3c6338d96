"""Fixtures of the `Store` conformance suite: every test runs against every backend.

A backend is one `StoreFactory` subclass registered in `FACTORIES` and named in
`STORE_PARAMS`. To add PostgreSQL: write `PostgresFactory` (`tests.services.need_pg()`
for the DSN, a unique schema per test), register it as "postgres" and append "postgres"
to `STORE_PARAMS`. Backends are expected to take the keyword
`migrations_dir` (the migrations test edits a copy) and to expose `commits` (the number
of transactions committed, for the group-commit test).

Fixtures:
- `store`: an open store of each backend in `STORE_PARAMS`, closed after the test.
- `any_store`: the same plus the variants in `EXTRA_PARAMS` (SQLite `:memory:`), for the
  tests worth running on those too.
- `store_factory`: builds (and re-builds, on the same database) stores of one backend,
  for tests that close and reopen.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

import pytest

from persistence.sqlite import SqliteStore
from persistence.store import Store

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


FACTORIES: dict[str, type[StoreFactory]] = {
    "sqlite": SqliteFactory,
    "sqlite-memory": SqliteMemoryFactory,
}

# Every conformance test runs on each of these.
STORE_PARAMS = ["sqlite"]
# Variants that only the `any_store` tests also run on.
EXTRA_PARAMS = ["sqlite-memory"]


@pytest.fixture(params=STORE_PARAMS)
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    return FACTORIES[request.param](tmp_path)


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
    opened = await _open(FACTORIES[request.param](tmp_path))
    yield opened
    await opened.close()
