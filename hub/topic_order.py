"""Topic messages handed to local subscribers in `seq` order: `TopicOrder`, owned by the
`HubNode` (docs/protocol.md §6).

With publishers on several instances, an instance stores and fans out its own
publications at once, while a lower `seq` published elsewhere reaches it later through
the broker. Subscribers then saw sequences out of order, and a client that resumes with
`since` = the highest seq it handled skipped what arrived late. Here every topic with
local subscribers has a cursor, `next`, the seq it hands out next:
- a message with `seq == next` goes out at once (the common case: one comparison);
- a later one is held, and goes out when the ones before it have come;
- a gap not filled within `HOLD_S` is filled from topic history (every message is in
  history before it is published anywhere), in order, and history is read again every
  `HOLD_S` while the gap lasts (a publisher's store write may still be under way: a
  sequence number is taken before the message is stored). What is still missing after
  `SKIP_AFTER_S`, longer than a store write may take, is skipped: history off, or a
  publisher that died between numbering and storing;
- an earlier or repeated one is dropped.
The cursor starts at the topic's sequence as read when its first local subscriber
subscribes (`baseline`); messages arriving before that are held. When the broker comes
back after an outage, every cursor is caught up from history (`catch_up`): local
subscribers get what was published elsewhere meanwhile, without reconnecting.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from openred.hub.meta import topic_msg_of

if TYPE_CHECKING:
    from openred.hub.node import HubNode

__all__ = ["HELD_MAX", "HELD_MAX_BYTES", "HOLD_S", "SKIP_AFTER_S", "TopicOrder"]

log = logging.getLogger("openred.hub")

HOLD_S = 0.25  # how long a later message waits for an earlier one before history is read
SKIP_AFTER_S = 5.0  # a gap history has not filled in this long is skipped
HELD_MAX = 10_000  # messages held per topic before a gap is skipped at once
HELD_MAX_BYTES = 16 * 1024 * 1024  # ... or bytes of them (frames reach 128 KiB each)


class _Cursor:
    __slots__ = ("filling", "gap_since", "held", "held_bytes", "next", "timer")

    def __init__(self) -> None:
        self.next = 0  # 0: not known yet (no baseline): everything is held
        self.gap_since = 0.0  # loop time the current gap was first seen (0: none)
        self.held: dict[int, tuple[bytes, str | None]] = {}  # seq -> (frame, sender)
        self.held_bytes = 0
        self.timer: asyncio.TimerHandle | None = None
        self.filling = False

    def hold(self, seq: int, frame: bytes, sender: str | None) -> None:
        if seq not in self.held:
            self.held[seq] = (frame, sender)
            self.held_bytes += len(frame)

    def take(self, seq: int) -> tuple[bytes, str | None]:
        item = self.held.pop(seq)
        self.held_bytes -= len(item[0])
        return item

    @property
    def overfull(self) -> bool:
        return len(self.held) > HELD_MAX or self.held_bytes > HELD_MAX_BYTES


class TopicOrder:
    def __init__(self, hub: HubNode) -> None:
        self.hub = hub
        self._cursors: dict[str, _Cursor] = {}
        self.skipped = 0  # messages neither held nor in history when a gap was filled

    def start(self, topic: str) -> None:
        """The topic has its first local subscriber."""
        self._cursors.setdefault(topic, _Cursor())

    def stop(self, topic: str) -> None:
        """The topic has no local subscriber any more."""
        cur = self._cursors.pop(topic, None)
        if cur is not None and cur.timer is not None:
            cur.timer.cancel()

    def cursor(self, topic: str) -> int:
        """The seq handed out next for `topic` (0: no subscriber, or no baseline yet)."""
        cur = self._cursors.get(topic)
        return 0 if cur is None else cur.next

    def baseline(self, topic: str, seq: int) -> None:
        """The topic's sequence as read by a `sub`: the cursor starts after it, if it has
        not started yet. What arrived before, while the subscriptions were being set up,
        goes out first, in order: the subscribers, all still recovering, keep what they
        need of it (docs/protocol.md §6: a `since` recovery, from its history read on)."""
        cur = self._cursors.get(topic)
        if cur is None or cur.next:
            return
        early = sorted(s for s in cur.held if s <= seq)
        for s in early:
            frame, sender = cur.take(s)
            self.hub.fanout(topic, s, frame, sender)
        cur.next = seq + 1
        self._drain(topic, cur)

    def deliver(self, topic: str, seq: int, frame: bytes, sender: str | None,
                rx_time: float | None = None) -> None:
        """A publication (this instance's, after it is stored, or another's through the
        broker): to local subscribers, in seq order."""
        cur = self._cursors.get(topic)
        if cur is None:
            return  # no local subscriber
        if seq == cur.next and not cur.filling:
            cur.next = seq + 1
            self.hub.fanout(topic, seq, frame, sender, rx_time)
            if cur.held:
                self._drain(topic, cur)
            return
        if seq < cur.next:
            return  # handed out already (or skipped)
        cur.hold(seq, frame, sender)
        if not cur.gap_since:
            cur.gap_since = self.hub.loop.time()
        if cur.overfull:
            self._fill(topic, cur)
        elif cur.timer is None and cur.next and not cur.filling:
            cur.timer = self.hub.loop.call_later(HOLD_S, self._fill, topic, cur)

    def _drain(self, topic: str, cur: _Cursor) -> None:
        """Hand out the held messages that are next in line."""
        held = cur.held
        while cur.next in held:
            frame, sender = cur.take(cur.next)
            self.hub.fanout(topic, cur.next, frame, sender)
            cur.next += 1
        if not held:
            cur.gap_since = 0.0
        if cur.timer is not None and (not held or cur.filling):
            cur.timer.cancel()
            cur.timer = None
        elif held and cur.timer is None and not cur.filling:
            cur.timer = self.hub.loop.call_later(HOLD_S, self._fill, topic, cur)

    def _fill(self, topic: str, cur: _Cursor) -> None:
        if cur.timer is not None:
            cur.timer.cancel()
            cur.timer = None
        if cur.filling or not cur.next or self._cursors.get(topic) is not cur:
            return
        cur.filling = True
        self.hub.background(self._fill_from_history(topic, cur))

    async def _fill_from_history(self, topic: str, cur: _Cursor) -> None:
        try:
            entries: list[Any] = []
            try:
                entries = await self.hub.history_since(topic, cur.next - 1)
            except Exception:  # the store is away: hand out what is held, in order
                log.warning("topic gap not filled from history",
                            extra={"event": "topic_gap_unfilled", "topic": topic})
            if self._cursors.get(topic) is not cur:
                return
            now = self.hub.loop.time()
            overdue = ((cur.gap_since and now - cur.gap_since >= SKIP_AFTER_S)
                       or cur.overfull)
            for i, e in enumerate(entries):
                if e.seq < cur.next:
                    continue
                while cur.next < e.seq and cur.next in cur.held:
                    frame, sender = cur.take(cur.next)
                    self.hub.fanout(topic, cur.next, frame, sender)
                    cur.next += 1
                if cur.next < e.seq:  # a hole history does not fill (yet)
                    if not overdue:
                        # Hold what history has after it; read again in HOLD_S.
                        for later in entries[i:]:
                            cur.hold(later.seq, topic_msg_of(later), later.sender)
                        if not cur.gap_since:
                            cur.gap_since = now
                        break
                    self._skip(topic, cur, e.seq)
                held = cur.take(e.seq) if e.seq in cur.held else None
                frame = held[0] if held is not None else topic_msg_of(e)  # meta, sig kept
                self.hub.fanout(topic, e.seq, frame, e.sender)
                cur.next = e.seq + 1
            if overdue and cur.held and cur.next not in cur.held:
                self._skip(topic, cur, min(cur.held))
        finally:
            cur.filling = False
        if self._cursors.get(topic) is cur:
            self._drain(topic, cur)

    def _skip(self, topic: str, cur: _Cursor, to: int) -> None:
        """Give up on the messages before `to`: neither held nor in history in time."""
        self.skipped += to - cur.next
        log.warning("topic gap skipped", extra={
            "event": "topic_gap_skipped", "topic": topic, "count": to - cur.next})
        cur.next = to

    def catch_up(self) -> None:
        """The broker is back: read history after every cursor (what other instances
        published during the outage never came through the broker)."""
        for topic, cur in list(self._cursors.items()):
            self._fill(topic, cur)
