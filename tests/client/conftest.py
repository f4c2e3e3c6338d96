"""Fixtures of the client SDK's tests.

- `fake`: the fake hub of tests/client/fakehub.py (unit tests, no real hub).
- `make_hub` / `hub` / `loop_guard`: a real in-process hub, from tests/hub/conftest.py.
- `hub_process`: a real hub PROCESS (`python -m openred.hub serve`, SQLite file in
  tmp_path, fixed free ports; tests/cluster/conftest.py's HubProcess) that a test may
  SIGKILL and start again on the same ports.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.client.fakehub import FakeHub
from tests.cluster.conftest import HubProcess
from tests.hub.conftest import hub, loop_guard, make_hub  # noqa: F401 (fixtures)


@pytest.fixture
async def fake() -> AsyncIterator[FakeHub]:
    async with FakeHub() as h:
        yield h


@pytest.fixture
async def hub_process(tmp_path: Path) -> AsyncIterator[HubProcess]:
    """Not started: the test calls `start()` (so it can also start it late). A lone hub:
    its SQLite file in tmp_path, no Redis."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENRED_HUB_")}
    env.update({
        "OPENRED_HUB_STORE_URL": f"sqlite:///{tmp_path / 'hub.db'}",
        "OPENRED_HUB_SERVER_SHUTDOWN_GRACE_S": "2",
        "OPENRED_HUB_LOG_LEVEL": "warning",
        "OPENRED_HUB_LOG_FORMAT": "text",
    })
    h = HubProcess("hub", env, tmp_path)
    yield h
    await h.stop()
