"""hub/topic_order.py alone, with a stand-in for the HubNode it reports to (our own
boundary): the bounds on what a gap may hold."""

from __future__ import annotations

import asyncio
from typing import Any

from openred.hub.topic_order import HELD_MAX_BYTES, TopicOrder


class _Hub:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.out: list[int] = []
        self.tasks: list[asyncio.Task[Any]] = []

    def fanout(self, topic: str, seq: int, frame: bytes, sender: Any,
               rx_time: Any = None) -> None:
        self.out.append(seq)

    def background(self, coro: Any) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro)
        self.tasks.append(task)
        return task

    async def history_since(self, topic: str, since: int) -> list[Any]:
        return []  # history off: a gap can only be skipped


async def test_a_gap_holds_no_more_than_its_byte_bound() -> None:
    """Large messages behind a seq that never comes: once they pass HELD_MAX_BYTES the
    gap is given up at once (not after SKIP_AFTER_S), and what was held goes out in
    order, so memory stays bounded whatever the frame size."""
    hub = _Hub()
    order = TopicOrder(hub)  # type: ignore[arg-type]
    order.start("t")
    order.baseline("t", 0)
    frame = b"x" * (1024 * 1024)
    n = HELD_MAX_BYTES // len(frame) + 1  # one frame past the bound
    for seq in range(2, 2 + n):  # seq 1 never arrives
        order.deliver("t", seq, frame, None)
    assert hub.out == []
    await asyncio.gather(*hub.tasks)
    assert hub.out == list(range(2, 2 + n))
    assert order.skipped == 1 and order.cursor("t") == 2 + n
