"""What the hub samples about itself, off the message path (hub/metrics.py exports it):

- the event-loop lag: a timer asks to run every `lag_every_s` and records how late it
  ran (`event_loop_lag_seconds`): a loop blocked by a long callback, a GC pause or CPU
  starvation shows there before anything else;
- backend health: the store and the broker are pinged every `health_every_s` through
  their guards (hub/breaker.py), so an idle hub notices an outage too (`backend_up`,
  and the pings feed the breakers: an idle hub's breaker probes with a ping, not with a
  node's message);
- the QoS 1 backlog, `Store.pending_total`, every `pending_every_s` (one count query,
  answered from the pending index on PostgreSQL).

One task and one timer per process; both stop with `stop()`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from openred.hub.metrics import Metrics

__all__ = ["Observer"]

log = logging.getLogger("openred.hub.observe")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Observer:
    def __init__(self, store: Any, broker: Any, metrics: Metrics, *, timeout_s: float,
                 lag_every_s: float = 0.25, health_every_s: float = 5.0,
                 pending_every_s: float = 15.0) -> None:
        self.store = store
        self.broker = broker
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.lag_every_s = lag_every_s
        self.health_every_s = health_every_s
        self.pending_every_s = pending_every_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._due = loop.time() + self.lag_every_s
        self._timer = loop.call_at(self._due, self._tick)
        self._task = loop.create_task(self._run(), name="openred-observe")

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    def _tick(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        self.metrics.event_loop_lag_seconds.observe(max(0.0, now - self._due))
        self._due = now + self.lag_every_s
        self._timer = loop.call_at(self._due, self._tick)

    async def _run(self) -> None:
        health_due = pending_due = 0.0
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            if now >= health_due:
                health_due = now + self.health_every_s
                await self._check("store", self.store)
                await self._check("broker", self.broker)
            if now >= pending_due:
                pending_due = now + self.pending_every_s
                await self._sample_pending()
            await asyncio.sleep(max(0.05, min(health_due, pending_due) - loop.time()))

    async def _check(self, name: str, backend: Any) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                await backend.ping()
        except Exception:
            self.metrics.backend_up[name] = 0
        else:
            self.metrics.backend_up[name] = 1

    async def _sample_pending(self) -> None:
        try:
            self.metrics.qos1_pending = await self.store.pending_total(_now_ms())
        except Exception:  # the store is down (backend_up says so): keep the last value
            pass
