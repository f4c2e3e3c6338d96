"""Suite-wide test set-up: uvloop as in production, and one timing factor.

- Every async test runs on uvloop (`pytest_asyncio_loop_factories`).
- `timeout()` scales every timeout in the suite (`OPENRED_TEST_TIMEOUT_FACTOR`, default
  1): timeouts are generous, and speed is measured in bench/, never asserted here.
- Async hygiene: `RuntimeWarning`s (a never-awaited coroutine) are errors
  (pyproject `filterwarnings`), and the `loop_guard` fixture of tests/hub fails a test
  whose event loop reported an unhandled exception.
"""

from __future__ import annotations

import os
from typing import Any

import uvloop

FACTOR = float(os.environ.get("OPENRED_TEST_TIMEOUT_FACTOR", "1"))


def timeout(seconds: float) -> float:
    return seconds * FACTOR


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Any]:
    return {"uvloop": uvloop.new_event_loop}
