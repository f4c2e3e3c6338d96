"""Suite-wide test set-up: uvloop as in production, and one timing factor.

- Every async test runs on uvloop (`pytest_asyncio_loop_factories`).
- `timeout()` scales every timeout in the suite (`OPENRED_TEST_TIMEOUT_FACTOR`, default
  1): timeouts are generous, and speed is measured in bench/, never asserted here.
- `redis_server`: a throw-away redis-server a test may kill and restart (the broker and
  cluster suites).
- Async hygiene: `RuntimeWarning`s (a never-awaited coroutine) are errors
  (pyproject `filterwarnings`), and the `loop_guard` fixture of tests/hub fails a test
  whose event loop reported an unhandled exception.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import uvloop

if TYPE_CHECKING:
    from tests.cluster.conftest import RedisServer

FACTOR = float(os.environ.get("OPENRED_TEST_TIMEOUT_FACTOR", "1"))


def timeout(seconds: float) -> float:
    return seconds * FACTOR


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Any]:
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    from tests.cluster.conftest import RedisServer, need_binary

    need_binary("redis-server")
    server = RedisServer(tmp_path)
    await server.start()
    yield server
    server.kill()
