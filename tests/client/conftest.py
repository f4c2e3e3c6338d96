"""Fixtures of the client SDK's tests.

- `fake`: the fake hub of tests/client/fakehub.py (unit tests, no real hub).
- `make_hub` / `hub` / `loop_guard`: a real in-process hub, from tests/hub/conftest.py.
- `hub_process`: a real hub PROCESS (`python -m openred.hub serve`, SQLite file in
  tmp_path, fixed free ports) that a test may SIGKILL and start again on the same ports.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.client.fakehub import FakeHub
from tests.conftest import timeout
from tests.hub.conftest import hub, loop_guard, make_hub  # noqa: F401 (fixtures)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def fake() -> AsyncIterator[FakeHub]:
    async with FakeHub() as h:
        yield h


class HubProcess:
    """One hub process; its ports and its SQLite file stay across restarts."""

    def __init__(self, tmp_path: Path, **env: str) -> None:
        self.ws_port = free_port()
        self.admin_port = free_port()
        self.db = tmp_path / "hub.db"
        self.log = tmp_path / "hub.log"
        self.cwd = tmp_path
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("OPENRED_HUB_")}
        self.env.update({
            "OPENRED_HUB_STORE_URL": f"sqlite:///{self.db}",
            "OPENRED_HUB_SERVER_WS_PORT": str(self.ws_port),
            "OPENRED_HUB_SERVER_ADMIN_PORT": str(self.admin_port),
            "OPENRED_HUB_SERVER_SHUTDOWN_GRACE_S": "2",
            "OPENRED_HUB_LOG_LEVEL": "warning",
            "OPENRED_HUB_LOG_FORMAT": "text",
            **{f"OPENRED_HUB_{k.upper()}": v for k, v in env.items()},
        })
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/v1/ws"

    def spawn(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "openred.hub", "serve"], cwd=self.cwd, env=self.env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    async def ready(self, wait: float = 20.0) -> None:
        assert self.proc is not None
        deadline = asyncio.get_running_loop().time() + timeout(wait)
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"hub exited with {self.proc.returncode}:\n"
                                     f"{self.log.read_text()[-3000:]}")
            try:
                _r, w = await asyncio.open_connection("127.0.0.1", self.ws_port)
                w.close()
                return
            except OSError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"hub not listening within {wait} s")
            await asyncio.sleep(0.05)

    async def start(self) -> None:
        self.spawn()
        await self.ready()

    def kill(self) -> None:
        """SIGKILL: no bye, no clean close, no flush."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    async def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
async def hub_process(tmp_path: Path) -> AsyncIterator[HubProcess]:
    """Not started: the test calls `start()` (so it can also start it late)."""
    h = HubProcess(tmp_path)
    yield h
    await h.stop()
