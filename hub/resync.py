"""QoS 1 after a broker outage: `Resyncs`, owned by the `HubNode`.

Messages stored while the broker could not carry them never reached recipients that are
online, here or on another instance (docs/protocol.md §5: redelivered until acked, not
only at the next session). This module owns how they get there:
- sessions read their stored queue again (hub/inbox.py), taking turns: at most half the
  store's pool reads at once, the rest stays for live traffic;
- the recipients this instance stored for but could not reach are remembered (bounded),
  and once the broker is back their holders are told to resync (a broker control
  command), in chunks that share a broker round trip.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hub.node import HubNode
    from hub.session import Session

__all__ = ["RESYNC_COMMAND", "Resyncs"]

log = logging.getLogger("openred.hub")

# Broker control command: "read this node's stored QoS 1 queue again". An instance that
# does not know it ignores it (HubNode.on_control).
RESYNC_COMMAND = "resync"
MAX_UNREACHED = 100_000  # recipients remembered for a resync hint (memory bound)
HINT_CHUNK = 1000  # resync hints queued per loop turn (one broker pipeline each)


class Resyncs:
    def __init__(self, hub: HubNode) -> None:
        self.hub = hub
        self.waiting: deque[Session] = deque()
        self._queued: set[Session] = set()
        self.running = 0
        self.limit = max(1, hub.cfg.store.pool_size // 2)
        self._unreached: set[str] = set()
        self._hinting = False

    def schedule(self, session: Session) -> None:
        """Have a session read its stored QoS 1 queue again and get what it has not got
        in flight, when its turn comes."""
        if session in self._queued or not session.active:
            return
        if not session.get_inbox().request_resync():
            session.drop_idle_inbox()
            return
        self._queued.add(session)
        self.waiting.append(session)
        self._next()

    def _next(self) -> None:
        while self.waiting and self.running < self.limit:
            session = self.waiting.popleft()
            self._queued.discard(session)
            inbox = session.inbox
            if inbox is not None and inbox.begin_resync():
                task = session.spawn(inbox.resync())
                self.running += 1
                task.add_done_callback(self._done)
                task.add_done_callback(session.drop_idle_inbox)

    def _done(self, _task: asyncio.Task[Any]) -> None:
        self.running -= 1
        self._next()

    def on_broker_up(self, sessions: list[Session]) -> None:
        """Every local session reads its queue again, and the holders of nodes this
        instance could not reach are told to do the same (their instance may not have
        seen the broker go away at all)."""
        try:
            for s in sessions:
                self.schedule(s)
            self.hint_if_due()
        except Exception:  # called from the broker's reader: never break it
            log.exception("resync after broker outage failed",
                          extra={"event": "resync_failed"})

    # -- hints to other instances ---------------------------------------------------------

    def unreached(self, node_id: str) -> bool:
        return node_id in self._unreached

    def note_unreached(self, node_id: str) -> None:
        if len(self._unreached) < MAX_UNREACHED:
            self._unreached.add(node_id)
        elif node_id not in self._unreached:
            # Past the bound, the node gets it at its next session (or when its own
            # instance sees the broker come back).
            log.debug("resync hint dropped", extra={"event": "resync_hint_dropped"})

    def hint_if_due(self) -> None:
        """Start sending hints unless none are due or a sender runs (also called once a
        second by housekeeping, for a broker that refused while it was up)."""
        if self._unreached and not self._hinting:
            self.hub.background(self._send_hints())

    async def _send_hints(self) -> None:
        """Tell the holders of the unreached nodes to resync them, a chunk at a time.
        Stops when the broker refuses a whole chunk."""
        if self._hinting:
            return
        self._hinting = True
        try:
            while self._unreached:
                chunk = list(itertools.islice(self._unreached, HINT_CHUNK))
                sent = await asyncio.gather(*(self._send_hint(n) for n in chunk))
                if not any(sent):
                    return
        finally:
            self._hinting = False

    async def _send_hint(self, node_id: str) -> bool:
        # Forgotten in the same step as the hint is queued: a message routed after this
        # goes through the broker behind the hint (§5 order); one routed before was
        # stored before, so the holder's read finds it.
        self._unreached.discard(node_id)
        try:
            await self.hub.broker.control(node_id, RESYNC_COMMAND)
        except Exception:
            self.note_unreached(node_id)
            return False
        return True
