"""Fixtures for tests that run a real hub on free ports with real clients.

`make_hub(**overrides)` starts an in-process `RunningHub` (SQLite file in tmp_path,
memory broker, ports 0) with config overrides given as "section.key" -> value;
`hub` is one with defaults. `RawNode` (tests/hub/nodes.py) speaks raw frames.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from hub.app import RunningHub
from hub.config import load_config


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


def hub_config(tmp_path: Path, **overrides: Any) -> Any:
    base: dict[str, Any] = {
        "server.ws_port": 0,
        "server.admin_port": 0,
        "store.url": f"sqlite:///{tmp_path}/hub.db",
        "server.shutdown_grace_s": 2.0,
    }
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


@pytest.fixture
async def hub(make_hub: HubFactory) -> RunningHub:
    return await make_hub()
