"""QoS 1 after a broker outage: `Resyncs`, owned by the `HubNode`.

Messages stored while the broker could not carry them never reached recipients that are
online, here or on another instance (docs/protocol.md §5: redelivered until acked, not
only at the next session). This module owns how they get there:
- sessions read their stored queue again (hub/inbox.py), taking turns: at most half the
  store's pool reads at once, the rest stays for live traffic;
- the recipients this instance stored for but could not reach are remembered (bounded),
  and once the broker is back their holders are told to resync (a broker control
  command), in chunks that share a broker round trip;
- the same recipients are also marked in the store (`Store.mark_undelivered`, one row
  per recipient), so the hint survives this process: when the broker is known to be
  down, the mark is written before the `ok` (`before_ok`); when a publish fails after
  the `ok`, right after. Any instance whose broker is up reads the marks (at once when
  its broker comes back, which includes its start, then every MARK_SCAN_S), tells each
  recipient's holder to resync and deletes the mark it read. So what an instance
  accepted while cut off reaches online recipients within seconds of the broker's
  return, even if that instance was restarted or killed meanwhile, and whether or not
  the recipients' instance saw an outage itself;
- at shutdown, marks being written are committed and pending hints sent (`at_shutdown`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from openred.persistence.store import StoreError, Undelivered

if TYPE_CHECKING:
    from openred.hub.node import HubNode
    from openred.hub.session import Session

__all__ = ["RESYNC_COMMAND", "Resyncs"]

log = logging.getLogger("openred.hub")

# Broker control command: "read this node's stored QoS 1 queue again". An instance that
# does not know it ignores it (HubNode.on_control).
RESYNC_COMMAND = "resync"
MAX_UNREACHED = 100_000  # recipients remembered for a resync hint (memory bound)
HINT_CHUNK = 1000  # resync hints queued per loop turn (one broker pipeline each)
MARK_SCAN_S = 5.0  # how often an instance whose broker is up reads the stored marks
MARK_SCAN_PASSES = 10  # chunks read per scan at most (marks written meanwhile wait)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Resyncs:
    def __init__(self, hub: HubNode) -> None:
        self.hub = hub
        self.waiting: deque[Session] = deque()
        self._queued: set[Session] = set()
        self.running = 0
        self.limit = max(1, hub.cfg.store.pool_size // 2)
        self._unreached: set[str] = set()
        self._hinting = False
        self._hint_task: asyncio.Task[None] | None = None
        # Durable marks: recipient -> mid waiting for the next store write, the future
        # that write resolves, and the marks this instance wrote and has not cleared.
        self._to_mark: dict[str, str] = {}
        self._mark_written: asyncio.Future[bool] | None = None
        self._marking: asyncio.Task[None] | None = None  # the store write running
        self._marked: dict[str, str] = {}
        self._to_clear: list[tuple[str, str]] = []
        self._scanning = False
        self._scan_again = False
        self._scan_at = 0.0  # loop time of the next periodic scan

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
        instance (or any instance, by the stored marks) could not reach are told to do
        the same (their instance may not have seen the broker go away at all)."""
        try:
            for s in sessions:
                self.schedule(s)
            self.hint_if_due()
            self.scan_marks()
        except Exception:  # called from the broker's reader: never break it
            log.exception("resync after broker outage failed",
                          extra={"event": "resync_failed"})

    # -- hints to other instances ---------------------------------------------------------

    def unreached(self, node_id: str) -> bool:
        return node_id in self._unreached

    def note_unreached(self, node_id: str, mid: str | None = None) -> None:
        """The broker could not carry a stored message to `node_id` (`mid`: mark it in
        the store too, so the hint survives this process)."""
        if mid is not None:
            self._mark_nowait(node_id, mid)
        if len(self._unreached) < MAX_UNREACHED:
            self._unreached.add(node_id)
        elif node_id not in self._unreached:
            # Past the bound, the node gets it through the stored mark (or at its next
            # session, or when its own instance sees the broker come back).
            log.debug("resync hint dropped", extra={"event": "resync_hint_dropped"})

    def hint_if_due(self) -> None:
        """Start sending hints unless none are due or a sender runs (also called once a
        second by housekeeping, for a broker that refused while it was up); every
        MARK_SCAN_S, read the stored marks (an instance that marked may be gone)."""
        if self._unreached and not self._hinting:
            self._hint_task = self.hub.background(self._send_hints())
        if self.hub.loop.time() >= self._scan_at:
            self.scan_marks()

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
                await self._clear_marks()
                if not any(sent):
                    return
        finally:
            self._hinting = False

    async def _send_hint(self, node_id: str) -> bool:
        # Forgotten in the same step as the hint is queued: a message routed after this
        # goes through the broker behind the hint (§5 order); one routed before was
        # stored before, so the holder's read finds it. So was every message whose mark
        # this instance wrote before now: that mark can go once the hint is out.
        self._unreached.discard(node_id)
        mark = self._marked.pop(node_id, None)
        try:
            await self.hub.broker.control(node_id, RESYNC_COMMAND)
        except Exception:
            self.note_unreached(node_id)
            if mark is not None:
                self._marked.setdefault(node_id, mark)
            return False
        if mark is not None:
            self._to_clear.append((node_id, mark))
        return True

    # -- durable marks (Store.mark_undelivered) -------------------------------------------

    def _broker_up(self) -> bool:
        return bool(getattr(self.hub.broker, "up", True))

    async def before_ok(self, node_id: str, mid: str) -> None:
        """Called between the store write of a QoS 1 message and its `ok`: when the
        broker cannot carry it now (known down, or an earlier message to the node waits
        for a hint), the mark is durable before the `ok` (docs/protocol.md §5), so the
        hint survives even a kill -9 of this process. A mark the store refuses is only
        logged: the message itself is stored, and the in-memory hint still goes."""
        hub = self.hub
        if not hub.clustered or node_id in hub.local:
            return
        if self._broker_up() and node_id not in self._unreached:
            return
        await asyncio.shield(self._mark_nowait(node_id, mid))

    def _mark_nowait(self, node_id: str, mid: str) -> asyncio.Future[bool]:
        """Queue a mark for the next store write (one in flight at a time: marks
        arriving meanwhile share the next one); the future tells whether it was
        written."""
        self._to_mark[node_id] = mid
        fut = self._mark_written
        if fut is None:
            fut = self._mark_written = self.hub.loop.create_future()
        if self._marking is None:
            self._marking = self.hub.background(self._write_marks())
        return fut

    async def _write_marks(self) -> None:
        fut: asyncio.Future[bool] | None = None
        try:
            while self._to_mark:
                batch, self._to_mark = self._to_mark, {}
                fut, self._mark_written = self._mark_written, None
                ok = await self._write(batch)
                if fut is not None and not fut.done():
                    fut.set_result(ok)
                fut = None
        finally:
            self._marking = None
            if fut is not None and not fut.done():
                fut.set_result(False)
            if self._to_mark:  # stopped (cancelled) with marks queued: not written
                self._to_mark.clear()
                queued, self._mark_written = self._mark_written, None
                if queued is not None and not queued.done():
                    queued.set_result(False)

    async def _write(self, batch: dict[str, str]) -> bool:
        error: Exception | None = None
        for _ in range(2):  # once more: a lost connection of the pool, a deadlock
            try:
                await self.hub.store.mark_undelivered(list(batch.items()), _now_ms())
            except StoreError as exc:
                error = exc
                continue
            for node_id, mid in batch.items():
                if node_id in self._marked or len(self._marked) < MAX_UNREACHED:
                    self._marked[node_id] = mid
            return True
        log.warning("delivery hint not stored", extra={
            "event": "undelivered_mark_failed", "nodes": len(batch), "error": str(error)})
        return False

    async def _clear_marks(self) -> None:
        marks, self._to_clear = self._to_clear, []
        if marks:
            try:
                await self.hub.store.clear_undelivered(marks)
            except StoreError:
                pass  # the periodic scan hints them once more, then clears them

    def scan_marks(self) -> None:
        """Read the stored marks and hint their holders, unless a scan runs (then it
        reads once more when done). Only with the broker up: hints need it."""
        hub = self.hub
        if not hub.clustered or not self._broker_up():
            return
        if self._scanning:
            self._scan_again = True
            return
        self._scanning = True
        hub.background(self._scan())

    async def _scan(self) -> None:
        try:
            while True:
                self._scan_again = False
                self._scan_at = self.hub.loop.time() + MARK_SCAN_S
                done = await self._scan_once()
                if not (done and self._scan_again):
                    return
        except Exception:  # a background task: log, the next tick scans again
            log.exception("delivery hint scan failed", extra={"event": "resync_failed"})
        finally:
            self._scanning = False

    async def _scan_once(self) -> bool:
        """One scan: False when the store or the broker refused (the marks stay)."""
        store = self.hub.store
        for _ in range(MARK_SCAN_PASSES):
            try:
                marks = await store.undelivered(HINT_CHUNK)
            except StoreError:
                return False
            if not marks:
                return True
            sent = await asyncio.gather(*(self._hint_mark(u) for u in marks))
            await self._clear_marks()
            done = [(u.recipient, u.mark) for u, ok in zip(marks, sent, strict=True) if ok]
            if done:
                log.info("delivery hints sent", extra={"event": "undelivered_hinted",
                                                       "nodes": len(done)})
                try:
                    await store.clear_undelivered(done)
                except StoreError:
                    return False
            if len(done) < len(marks):
                return False
            if len(marks) < HINT_CHUNK:
                return True
        return True

    async def _hint_mark(self, u: Undelivered) -> bool:
        session = self.hub.local.get(u.recipient)
        if session is not None:  # held here: no broker round trip
            self.schedule(session)
            return True
        return await self._send_hint(u.recipient)

    async def at_shutdown(self, timeout_s: float) -> None:
        """At shutdown: marks being written are committed, and hints still due are sent
        while the broker is up (else the marks wait for whichever instance sees the
        broker next)."""
        try:
            async with asyncio.timeout(timeout_s):
                running = [t for t in (self._marking, self._hint_task)
                           if t is not None and not t.done()]
                if running:
                    await asyncio.wait(running)
                if self._unreached and self._broker_up():
                    await self._send_hints()
        except TimeoutError:
            log.warning("delivery hints left at shutdown", extra={
                "event": "resync_hints_left", "nodes": len(self._unreached)})
