"""QoS 1 delivery to one session: the `Inbox` (docs/protocol.md §5).

It owns what a session must remember to deliver stored messages at least once, in their
original order, without writing one twice within the session:
- the replay of the stored queue at the start of a session, page by page and flow
  controlled, with live messages held back meanwhile and let through after it with no
  gap and no duplicate;
- the mids written and not yet acked (a resync after a broker outage must not write
  them again);
- resyncs: reading the queue again when messages may have been stored without reaching
  the session (the hub schedules them, hub/node.py `resync`).

It needs a store (`pending`, `mark_delivered_nowait`) and a sink (the session: `push`,
`active`, `has_room`, `wait_room`), nothing else, so it is tested with a real store and
no socket.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Protocol

from openred.hub.meta import stored_msg
from openred.persistence.store import StoredMessage, StoreUnavailable

__all__ = ["BACKLOG_PAGE", "Inbox", "Sink"]

REPLAY_RETRY_S = 0.1  # first wait before a replay page is read again (store unavailable)
REPLAY_RETRY_MAX_S = 2.0
BACKLOG_PAGE = 500


class Sink(Protocol):
    """Where the inbox writes: a session."""

    @property
    def active(self) -> bool: ...

    def push(self, frame: bytes) -> None: ...

    def has_room(self) -> bool: ...

    async def wait_room(self) -> bool: ...


class InboxStore(Protocol):
    async def pending(self, node_id: str, now_ms: int, after: str | None,
                      limit: int) -> list[StoredMessage]: ...

    def mark_delivered_nowait(self, mids: list[str], now_ms: int) -> None: ...


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Inbox:
    __slots__ = (
        "_acked_in_replay", "_backlog", "_backlog_bytes", "_backlog_overflow", "_replay_again",
        "_replaying", "_unacked", "_unacked_lost", "frames_out", "max_backlog",
        "max_backlog_bytes", "max_unacked", "node_id", "sink", "store",
    )

    def __init__(self, node_id: str, store: InboxStore, sink: Sink,
                 frames_out: defaultdict[str, int], *, max_unacked: int,
                 max_backlog: int, max_backlog_bytes: int) -> None:
        self.node_id = node_id
        self.store = store
        self.sink = sink
        self.frames_out = frames_out
        self.max_unacked = max_unacked
        self.max_backlog = max_backlog
        self.max_backlog_bytes = max_backlog_bytes
        self._backlog: dict[str, bytes] | None = None  # live QoS 1 held during a replay
        self._backlog_bytes = 0
        self._backlog_overflow = False
        # QoS 1 mids written to the session and not acked by it: a resync must not write
        # them again. Created on the first message (idle sessions stay small); None with
        # `_unacked_lost` once it outgrew what a queue can hold.
        self._unacked: set[str] | None = None
        self._unacked_lost = False
        self._acked_in_replay: set[str] | None = None  # see acked()
        self._replaying = False  # a replay of the stored queue is queued or running
        self._replay_again = False  # ... and one more pass is wanted after it

    @property
    def replaying(self) -> bool:
        return self._replaying

    @property
    def replay_again(self) -> bool:
        return self._replay_again

    @property
    def idle(self) -> bool:
        """Nothing to remember: no replay, nothing held, nothing unacked in flight, and
        tracking not given up (that must be remembered)."""
        return (not self._replaying and self._backlog is None and not self._unacked
                and not self._unacked_lost and self._acked_in_replay is None)

    @property
    def tracks_unacked(self) -> bool:
        """False once the unacked set outgrew its bound (resyncs are off for good)."""
        return not self._unacked_lost

    # -- live messages --------------------------------------------------------------

    def live(self, mid: str, frame: bytes) -> None:
        """A live QoS 1 message for the session (already stored)."""
        backlog = self._backlog
        if backlog is not None:
            if (len(backlog) >= self.max_backlog
                    or self._backlog_bytes + len(frame) > self.max_backlog_bytes):
                # Too much arrived during the replay: drop the copies; the replay reads
                # them from the store (they are durable) before it ends.
                backlog.clear()
                self._backlog_bytes = 0
                self._backlog_overflow = True
            elif not self._backlog_overflow:
                backlog[mid] = frame
                self._backlog_bytes += len(frame)
            return
        if not self._in_flight(mid):
            return  # a resync wrote it already (and may have been overtaken by the broker)
        self.frames_out["msg"] += 1
        self.sink.push(frame)
        self.store.mark_delivered_nowait([mid], _now_ms())

    def _in_flight(self, mid: str) -> bool:
        """Record that `mid` is being written to the session; False when it already was
        and is not acked: docs/protocol.md §5, the hub does not retransmit within a
        session (a client may take a repeat for a lost ack and process it twice)."""
        unacked = self._unacked
        if unacked is None:
            if self._unacked_lost:
                return True
            unacked = self._unacked = set()
        elif mid in unacked:
            return False
        if len(unacked) >= self.max_unacked:
            # More than the store lets a node have pending (some of these expired
            # unacked, and which ones cannot be told here), or more than is worth the
            # memory: stop tracking and, with it, resyncs of this session; its stored
            # messages come at its next session.
            self._unacked = None
            self._unacked_lost = True
            return True
        unacked.add(mid)
        return True

    def acked(self, mids: list[str]) -> None:
        """The session acked `mids` (the store is told by the hub)."""
        unacked = self._unacked
        if unacked is None:
            return
        if self._replaying:
            # A replay may have read these from the store before the ack reached it:
            # they stay in flight for it, or it would write them again.
            acked = [m for m in mids if m in unacked]
            if acked:
                if self._acked_in_replay is None:
                    self._acked_in_replay = set()
                self._acked_in_replay.update(acked)
        else:
            # Not in flight any more, even if the store misses the ack (then the message
            # comes again: at least once). A replay started later reads the store after
            # the ack was submitted, so it sees it.
            unacked.difference_update(mids)
            if not unacked:
                self._unacked = None

    # -- replay and resync --------------------------------------------------------------

    def hold_live(self) -> None:
        """Hold live QoS 1 messages until a replay has delivered the stored ones."""
        self._backlog = {}
        self._backlog_bytes = 0
        self._backlog_overflow = False

    async def replay(self) -> None:
        """§5: deliver stored QoS 1 messages in their original order, then switch to
        live delivery with no gap and no duplicate."""
        self._replaying = True
        await self._replay()

    def request_resync(self) -> bool:
        """The stored queue may hold messages that never reached the session (stored
        while the broker could not bring them): hold live QoS 1 from now on, so that
        they come first (§5 order) when the queue is read again. True when the hub
        should schedule that read (`resync`); False when none is needed or one is
        coming anyway."""
        if not self.sink.active or self._unacked_lost:
            return False
        if self._replaying:
            # The replay running now may have read past them already: one more pass.
            self._replay_again = True
            return False
        if self._backlog is None:
            self.hold_live()
        return True

    def begin_resync(self) -> bool:
        """The hub's turn for this session came: True when the caller should run
        `resync()` now; False when a replay runs anyway (it will read once more)."""
        if not self.sink.active:
            return False
        if self._replaying:
            self._replay_again = True
            return False
        self._replaying = True  # now, not when the task starts: no second pass meanwhile
        return True

    async def resync(self) -> None:
        await self._replay()

    async def _replay(self) -> None:
        try:
            while True:
                await self._replay_pass()
                if not self._replay_again or not self.sink.active:
                    return
                # Asked for while this pass ran: hold live QoS 1 again before any of it
                # can be written (no await since the pass ended).
                self._replay_again = False
                if self._backlog is None:
                    self.hold_live()
        finally:
            self._replaying = False
            self._replay_again = False
            acked, self._acked_in_replay = self._acked_in_replay, None
            if acked and self._unacked is not None:
                self._unacked.difference_update(acked)

    async def _replay_pass(self) -> None:
        sink = self.sink
        if self._backlog is None:
            self._backlog = {}
        after: str | None = None
        # §8: a page never fills the send queue by itself (a backlog larger than
        # send_queue_max is flow controlled, not taken for a slow consumer).
        page_size = max(1, min(BACKLOG_PAGE, self.max_backlog // 2))
        delay = REPLAY_RETRY_S
        try:
            while sink.active:
                if not sink.has_room() and not await sink.wait_room():
                    return
                now = _now_ms()
                try:
                    page = await self.store.pending(self.node_id, now, after, page_size)
                except StoreUnavailable:
                    # §5: redelivered until acked, not until the next session. The store
                    # is busy (a reconnect storm) or away: read the page again later,
                    # live QoS 1 still held behind it (bounded: _backlog_overflow).
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, REPLAY_RETRY_MAX_S)
                    continue
                delay = REPLAY_RETRY_S
                backlog = self._backlog
                mids: list[str] = []
                for m in page:
                    held = backlog.pop(m.mid, None)
                    if held is not None:
                        self._backlog_bytes -= len(held)
                    if self._in_flight(m.mid):  # a resync skips what is unacked in flight
                        if not sink.has_room():
                            # Bytes, not only frames (limits.send_queue_max_bytes): a
                            # page of large bodies waits for the socket between messages.
                            self._delivered(mids, now)
                            mids = []
                            if not await sink.wait_room():
                                return
                        sink.push(stored_msg(m))  # with its meta (§4.1)
                        mids.append(m.mid)
                self._delivered(mids, now)
                if page:
                    after = page[-1].mid
                if (len(page) < page_size and not self._backlog_overflow and sink.has_room()
                        and len(backlog) <= self.max_backlog // 2
                        and self._backlog_bytes <= self.max_backlog_bytes // 2):
                    # Everything stored before this read was in the pages; what arrived
                    # since is in the backlog, in commit order, and fits in the send
                    # queue's free half. (Else one more page reads them from the store.)
                    rest = [(mid, frame) for mid, frame in backlog.items()
                            if self._in_flight(mid)]
                    self._backlog = None
                    self._backlog_bytes = 0
                    for _mid, frame in rest:
                        sink.push(frame)
                    self._delivered([m for m, _ in rest], now)
                    return
                self._backlog_overflow = False
        except BaseException:
            self._backlog = None
            raise

    def _delivered(self, mids: list[str], now: int) -> None:
        if mids:
            self.frames_out["msg"] += len(mids)
            self.store.mark_delivered_nowait(mids, now)
