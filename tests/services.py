"""Where the real PostgreSQL and Redis of the test run are (scripts/test finds or starts
them and exports OPENRED_TEST_PG_DSN / OPENRED_TEST_REDIS_URL).

A test that needs a service calls `need_pg()` / `need_redis()`: without the service it
is skipped with the reason, except under CI=true, where it fails (a service test never
silently skips in CI).
"""

from __future__ import annotations

import os

import pytest

__all__ = ["missing", "need_pg", "need_redis"]


def missing(msg: str) -> None:
    """A service or binary the test needs is absent: skip, but fail under CI=true."""
    (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(msg)  # CI guard


def _missing(what: str, var: str) -> None:
    missing(f"{what} is not available ({var} is unset; run the suite through scripts/test)")


def need_pg() -> str:
    dsn = os.environ.get("OPENRED_TEST_PG_DSN")
    if not dsn:
        _missing("PostgreSQL", "OPENRED_TEST_PG_DSN")
    return dsn  # type: ignore[return-value]


def need_redis() -> str:
    url = os.environ.get("OPENRED_TEST_REDIS_URL")
    if not url:
        _missing("Redis", "OPENRED_TEST_REDIS_URL")
    return url  # type: ignore[return-value]
