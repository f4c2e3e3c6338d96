"""Fixtures for tests that run a real hub on free ports with real clients.

`make_hub(**overrides)` starts an in-process `RunningHub` (SQLite file in tmp_path,
memory broker, ports 0) with config overrides given as "section.key" -> value;
`hub` is one with defaults. `RawNode` (tests/hub/nodes.py) speaks raw frames.

With OPENRED_TEST_HUB_STORE=postgres the same tests run on PostgreSQL instead (one
schema per test, shared by the hubs of that test so restarts keep their data, dropped
afterwards); scripts/test runs the hub suites both ways.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from openred.hub.app import RunningHub
from openred.hub.config import load_config

from tests.services import need_pg


@pytest.fixture
async def loop_guard() -> AsyncIterator[list[dict[str, Any]]]:
    """Fail the test when anything reaches the event loop's exception handler."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []

    def handler(lp: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        errors.append(context)
        lp.default_exception_handler(context)

    loop.set_exception_handler(handler)
    yield errors
    loop.set_exception_handler(None)
    if errors:
        msgs = "; ".join(f"{e.get('message')} {e.get('exception')!r}" for e in errors)
        pytest.fail(f"event loop reported errors: {msgs}")


HubFactory = Callable[..., Awaitable[RunningHub]]


STORE_BACKEND = os.environ.get("OPENRED_TEST_HUB_STORE", "sqlite")


def pg_schema_for(tmp_path: Path) -> str:
    return "h_" + hashlib.sha1(str(tmp_path).encode()).hexdigest()[:12]


def store_url_for(tmp_path: Path) -> str:
    if STORE_BACKEND == "postgres":
        dsn = need_pg()
        sep = "&" if "?" in dsn else "?"
        return f"{dsn}{sep}schema={pg_schema_for(tmp_path)}"
    return f"sqlite:///{tmp_path}/hub.db"


def hub_config(tmp_path: Path, **overrides: Any) -> Any:
    base: dict[str, Any] = {
        "server.ws_port": 0,
        "server.admin_port": 0,
        "store.url": store_url_for(tmp_path),
        "server.shutdown_grace_s": 2.0,
    }
    if STORE_BACKEND == "postgres":
        base["store.pool_size"] = 4  # many hubs per run; the server has max_connections
    base.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(None, env={}, overrides=base)


@pytest.fixture
async def make_hub(tmp_path: Path, loop_guard: list[Any],
                   monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[HubFactory]:
    monkeypatch.chdir(tmp_path)  # no ./hub.toml from the repo is picked up
    hubs: list[RunningHub] = []

    async def factory(**overrides: Any) -> RunningHub:
        h = RunningHub(hub_config(tmp_path, **overrides))
        await h.start()
        hubs.append(h)
        return h

    yield factory
    for h in reversed(hubs):
        await h.stop()
    if STORE_BACKEND == "postgres":
        import asyncpg

        conn = await asyncpg.connect(need_pg())
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{pg_schema_for(tmp_path)}" CASCADE')
        finally:
            await conn.close()


@pytest.fixture
async def hub(make_hub: HubFactory) -> RunningHub:
    return await make_hub()
