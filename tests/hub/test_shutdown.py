"""Graceful shutdown (docs/protocol.md §8): every session gets `bye shutdown` with a
`retry_ms` of its own, so the nodes of a restarting hub do not all come back at once."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.hub.nodes import RawNode


async def test_retry_ms_is_drawn_per_session(make_hub: Any) -> None:
    h = await make_hub()
    nodes = [await RawNode.connect(h) for _ in range(20)]
    closing = [asyncio.create_task(n.closed(wait=10)) for n in nodes]
    await h.stop()
    retry = []
    for task in closing:
        code, frames = await task
        assert code == 1012
        (bye,) = [f for f in frames if f["t"] == "bye"]
        assert bye["reason"] == "shutdown" and 1000 <= bye["retry_ms"] < 5000
        retry.append(bye["retry_ms"])
    print(f"20 sessions, {len(set(retry))} distinct retry_ms, "
          f"from {min(retry)} to {max(retry)} ms")
    # 20 draws from 4,000 values: all equal has a chance of 4000**-19.
    assert len(set(retry)) > 10
