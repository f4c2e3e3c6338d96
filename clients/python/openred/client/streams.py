"""Per-topic and per-watch views of a client (docs/protocol.md §5, §5.2, §6.1):
`Subscription` (an async iterator of one topic's messages and gap events),
`PresenceWatch` (an async iterator of presence changes) and `History` (a page of a
topic's history).

The client's reader fills them; they never touch the connection themselves, except
to end a subscription or a watch through the client.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from openred.client.events import PresenceChanged, TopicGap
from openred.client.message import Message

__all__ = ["History", "PresenceWatch", "Subscription"]

log = logging.getLogger("openred.client")

T = TypeVar("T")


class _Stream(Generic[T]):
    """A bounded queue read by `async for`. `_put` never blocks: the client's reader
    checks `full` and stops reading the socket instead (§7 backpressure); with
    `drop_oldest` (presence events, best effort by §6.1) the oldest item goes."""

    def __init__(self, max_items: int, on_room: Callable[[], None] | None,
                 drop_oldest: bool = False) -> None:
        self._items: deque[T] = deque()
        self._max = max_items
        self._on_room = on_room
        self._drop_oldest = drop_oldest
        self._changed = asyncio.Event()
        self._end: BaseException | None = None
        self._ended = False

    @property
    def full(self) -> bool:
        return len(self._items) >= self._max

    def _put(self, item: T) -> None:
        if self._ended:
            return
        if self._drop_oldest and len(self._items) >= self._max:
            self._items.popleft()
            log.warning("event queue full: oldest dropped", extra={"event": "events_dropped"})
        self._items.append(item)
        self._changed.set()

    def _finish(self, error: BaseException | None = None) -> None:
        """End the stream once what is queued has been read: StopAsyncIteration, or
        `error` raised."""
        if self._ended:
            return
        self._ended = True
        self._end = error
        self._changed.set()

    def __aiter__(self) -> _Stream[T]:
        return self

    async def __anext__(self) -> T:
        while True:
            if self._items:
                was_full = self.full
                item = self._items.popleft()
                if was_full and self._on_room is not None:
                    self._on_room()
                return item
            if self._ended:
                if self._end is not None:
                    raise self._end
                raise StopAsyncIteration
            self._changed.clear()
            await self._changed.wait()


class Subscription(_Stream[Message | TopicGap]):
    """A topic held by the client (§5), and an async iterator of its publications, in
    `seq` order, with a `TopicGap` where history lost some across a reconnect.

    Iteration ends after `close()` (or `Client.unsubscribe`); it raises
    `SubscriptionError` when the hub refused the topic on a resubscribe, and the final
    `ConnectionLost` when the client stops for good (after `Client.close()` it ends).
    Messages of the topic go to this object only; iterate it (in a task of its own when
    the program also reads direct messages), or the reader stops at `max_queue`.
    """

    def __init__(self, topic: str, seq: int, recovered: bool | None, max_items: int,
                 on_room: Callable[[], None] | None,
                 unsubscribe: Callable[[str], Awaitable[None]]) -> None:
        super().__init__(max_items, on_room)
        self.topic = topic
        self.seq = seq  # the topic's seq in the hub's `ok`
        self.recovered = recovered  # `recovered` of that `ok` (None without `since`)
        self._unsubscribe = unsubscribe

    async def close(self) -> None:
        """Unsubscribe (§5); iteration ends after the messages already queued."""
        await self._unsubscribe(self.topic)

    def __aiter__(self) -> Subscription:
        return self

    def __repr__(self) -> str:
        return f"Subscription(topic={self.topic!r} seq={self.seq})"


class PresenceWatch(_Stream[PresenceChanged]):
    """A §6.1 watch: `online` is the state the client knows of each watched node
    (from the `watch` snapshot, then from events), and iterating yields each
    `PresenceChanged`. The client watches again after every reconnect and reports
    what changed meanwhile (`snapshot=True`). Events are best effort (§6.1): at most
    `max_queue` wait; past that the oldest is dropped."""

    def __init__(self, nodes: frozenset[str], topic: str | None, online: dict[str, bool],
                 max_items: int, unwatch: Callable[[PresenceWatch], Awaitable[None]]) -> None:
        super().__init__(max_items, None, drop_oldest=True)
        self.nodes = nodes
        self.topic = topic
        self.online = dict(online)
        self._unwatch = unwatch

    def _matches(self, ev: PresenceChanged) -> bool:
        if ev.topic is not None:
            return ev.topic == self.topic
        return ev.node in self.nodes

    def _deliver(self, ev: PresenceChanged) -> None:
        if ev.topic is None:
            self.online[ev.node] = ev.online
        self._put(ev)

    async def close(self) -> None:
        """Stop watching (§6.1 `unwatch`); iteration ends."""
        await self._unwatch(self)
        self._finish()

    def __aiter__(self) -> PresenceWatch:
        return self


@dataclass(frozen=True, slots=True)
class History:
    """A page of a topic's history (§5.2): `messages` oldest first; `seq` is the
    topic's current seq; with `more`, older ones exist (`before=messages[0].seq`)."""

    seq: int
    messages: list[Message]
    more: bool

