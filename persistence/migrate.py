"""Schema migrations as files, shared by every `Store` backend.

Owned here: finding a backend's migration files (`persistence/migrations/<backend>/
NNNN_name.sql`, shipped as package data), their checksums, and the check every backend
runs against what its database recorded in `schema_migrations`: a migration the hub does
not know (a downgrade) or one whose file changed after it was applied is refused by
name. Running the statements is the backend's own business (`sqlite.py`, `postgres.py`):
each applies the pending ones in one transaction of its own.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

from openred.persistence.store import StoreError

__all__ = ["Migration", "check_applied", "load_migrations", "packaged_migrations"]


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str  # file name without ".sql", e.g. "0001_init"
    sql: str
    checksum: str  # sha256 hex of the file, line endings normalised


_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def packaged_migrations(backend: str) -> Traversable:
    """The folder of migrations shipped for `backend` ("sqlite", "postgres")."""
    return resources.files("openred.persistence").joinpath("migrations", backend)


def load_migrations(directory: Traversable) -> list[Migration]:
    """The migrations of `directory`, in version order."""
    found: dict[int, Migration] = {}
    for entry in directory.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _MIGRATION_NAME.match(entry.name)
        if match is None:
            raise StoreError(f"store: bad migration file name {entry.name!r} "
                             "(want NNNN_name.sql)")
        raw = entry.read_bytes()
        # A checkout with CRLF line endings is the same migration, not a changed one.
        normalised = raw.replace(b"\r\n", b"\n")
        migration = Migration(
            version=int(match.group(1)),
            name=entry.name[:-4],
            sql=normalised.decode("utf-8"),
            checksum=hashlib.sha256(normalised).hexdigest(),
        )
        if migration.version in found:
            raise StoreError(f"store: two migrations with version {migration.version:04d}")
        found[migration.version] = migration
    return [found[v] for v in sorted(found)]


def check_applied(migrations: list[Migration],
                  applied: Iterable[Sequence[Any]]) -> list[Migration]:
    """Refuse unknown or changed applied migrations; return the pending ones.

    `applied` holds the (version, name, checksum) rows of `schema_migrations`.
    """
    known = {m.version: m for m in migrations}
    done: set[int] = set()
    for version, name, checksum in sorted((int(r[0]), str(r[1]), str(r[2])) for r in applied):
        migration = known.get(version)
        if migration is None:
            raise StoreError(f"store: the database has migration {name}, unknown to "
                             "this hub version (downgrade?)")
        if migration.checksum != checksum:
            raise StoreError(f"store: migration {migration.name} changed after it was "
                             "applied (checksum mismatch); restore the file and put the "
                             "change in a new migration")
        done.add(version)
    return [m for m in migrations if m.version not in done]
