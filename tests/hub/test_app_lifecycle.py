"""`RunningHub.start` unwinds what it opened when a step fails, with the real
store and servers: the error propagates, and no task, store thread or listening socket of
the failed start is left behind, so the same hub can start again once the cause is gone.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openred.hub.app import RunningHub
from openred.persistence.store import StoreError

from tests.hub.conftest import STORE_BACKEND, hub_config


@pytest.fixture
def taken_port() -> Iterator[tuple[socket.socket, int]]:
    """A port some other program listens on."""
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    try:
        yield blocker, blocker.getsockname()[1]
    finally:
        blocker.close()


def running_tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if not t.done()}


def store_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("openred-store")]


def assert_port_free(port: int) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # no ./hub.toml from the repo is picked up
    return tmp_path


async def start_fails(h: RunningHub, error: type[BaseException]) -> BaseException:
    tasks, threads = running_tasks(), store_threads()
    with pytest.raises(error) as info:
        await h.start()
    assert running_tasks() - tasks == set()
    assert store_threads() == threads
    assert h.node is None
    return info.value


@pytest.mark.parametrize("key", ["admin_port", "ws_port"])
async def test_a_taken_port_unwinds_the_start(here: Path, loop_guard: list[Any], key: str,
                                              taken_port: tuple[socket.socket, int]) -> None:
    blocker, port = taken_port
    h = RunningHub(hub_config(here, **{f"server__{key}": port}))
    err = await start_fails(h, OSError)
    assert isinstance(err, OSError)
    if key == "admin_port":
        assert_port_free(h.ws_port)  # the WebSocket server bound before it was closed
    # Once the port is free the same hub starts: the store opens again, the metrics
    # collectors register again.
    blocker.close()
    await h.start()
    try:
        assert h.node is not None
        await h.node.store.ping()
        assert (h.ws_port if key == "ws_port" else h.admin_port) == port
    finally:
        await h.stop()
    await h.stop()  # idempotent
    assert store_threads() == []


@pytest.mark.skipif(STORE_BACKEND != "sqlite", reason="a fresh SQLite file is unmigrated")
async def test_a_store_that_refuses_to_open_is_released(here: Path,
                                                         loop_guard: list[Any]) -> None:
    h = RunningHub(hub_config(here, store__auto_migrate=False))
    err = await start_fails(h, StoreError)
    assert "openred-hub migrate" in str(err)
    assert h.ws_port == 0  # it failed before any server was opened


async def test_stop_releases_everything(here: Path, loop_guard: list[Any]) -> None:
    tasks, threads = running_tasks(), store_threads()
    h = RunningHub(hub_config(here))
    await h.start()
    ports = (h.ws_port, h.admin_port)
    await h.stop()
    assert running_tasks() - tasks == set()
    assert store_threads() == threads
    assert h.node is None
    for port in ports:
        assert_port_free(port)


def test_serve_settles_the_heap_once_up(tmp_path: Path) -> None:
    """`serve` (the hub's process) freezes what startup allocated and collects the
    middle generation every 100 young collections (hub/app.py `settle_heap`): checked
    in a process of its own, as the collector's state is the process's."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import asyncio, gc, os, signal
        from openred.hub import app
        from openred.hub.config import load_config

        async def main():
            async def look():
                for _ in range(100):  # serve() is up within 5 s
                    if gc.get_freeze_count():
                        break
                    await asyncio.sleep(0.05)
                print(gc.get_threshold(), gc.get_freeze_count() > 10_000, flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
            watcher = asyncio.ensure_future(look())
            code = await app.serve(load_config(None, env={}, overrides={
                "store.url": "sqlite://:memory:", "server.ws_port": 0,
                "server.admin_port": 0}))
            await watcher
            return code

        print("threshold before", gc.get_threshold(), flush=True)
        raise SystemExit(asyncio.run(main()))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["threshold before (700, 10, 10)",
                                       "(700, 100, 20) True"]
