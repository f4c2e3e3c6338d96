"""The `Broker` contract (cross-instance routing, cluster presence, claims) and
its in-process `memory` implementation. `backends.py` picks one from `broker.url`.

The router always asks its local registry first and the broker second, so a single
process and a cluster take the same code path; only the broker behind it differs.

Contract every implementation keeps (checked by one conformance suite):

- Topic sequences are not the broker's: the store numbers a publication with its
  history append (persistence/store.py), so topics need no broker to be numbered.
- `publish_to_node` delivers the frame to the instance holding the node's session, in
  call order per (caller, node); it returns False when no instance holds the node.
  It never delivers to the calling instance (the router already looked there).
- `publish_to_topic` reaches every other instance that declared `interest` in the topic.
- `claim(node)` makes this instance the holder of the node's one session; the previous
  holder on another instance gets `on_control(node, "replace", session)`.
- `reassert([(node, session)])` claims again sessions whose claim the backend could not
  take (or may have lost): each one becomes the node's owner unless a newer session
  (by claim time: a session id starts with its creation time) owns it, and then the
  previous holder gets `replace` as above. It answers each node's owner after the call
  (None where the backend did not answer), so the caller closes a session that lost.
- `control(node, command)` reaches the instance holding the node (kick, ban).
- Presence events (docs/protocol.md §6.1, hub/presence_watch.py):
  `publish_presence_nowait(node, online, ts, topic)` reaches every other instance that
  watches the node (`watch_node(node, True)`), or the topic when `topic` is given
  (`watch_topic`), as `on_presence(node, online, ts, topic)`; never the calling
  instance, and nobody at all when nobody watches (with `want_result`, a future tells
  whether some instance, this one included, watches). Events of one publisher keep
  their order. A watch is confirmed by the backend before `watch_*` returns, so every
  event published after it reaches this instance (while the backend is up: events are
  best effort, and the watcher re-checks presence to catch what it missed).
- A broker that cannot reach its backend raises `BrokerUnavailable`; local delivery
  never depends on it. When the backend is reachable again, the broker calls its
  handler's `on_broker_up()` (if the handler has one): whatever was published meanwhile
  was lost, and QoS 1 stored meanwhile must be read from the store again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Protocol

__all__ = ["Broker", "BrokerHandler", "BrokerUnavailable", "MemoryBroker"]


class BrokerUnavailable(Exception):
    """The broker's backend cannot be reached; the publish did not happen."""


class BrokerHandler(Protocol):
    """What an instance does with traffic the broker brings from other instances."""

    def on_node_frame(self, node_id: str, frame: bytes, qos: int, mid: str) -> None: ...

    def on_topic_frame(self, topic: str, seq: int, frame: bytes) -> None: ...

    def on_control(self, node_id: str, command: str, session_id: str | None) -> None: ...

    def on_presence(self, node_id: str, online: bool, ts: int, topic: str | None) -> None:
        """Optional: a presence event another instance published (§6.1), looked up with
        getattr like `on_broker_up`."""

    def on_broker_up(self) -> None:
        """Optional: the backend is reachable again (each down-to-up transition; a
        broker that starts down may also call it on its first connection). Called from
        the broker's own task, so it must neither block nor raise. Brokers look it up
        with getattr: a handler without it keeps working."""


class Broker(Protocol):
    async def start(self, instance_id: str, handler: BrokerHandler) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Return when the backend answers; raise BrokerUnavailable otherwise."""

    async def claim(self, node_id: str, session_id: str) -> None: ...

    async def reassert(self, claims: list[tuple[str, str]]) -> list[str | None]:
        """Claim (node, session) pairs again unless a newer session owns the node; the
        owner of each afterwards, None where unknown. Raises BrokerUnavailable when the
        backend is known to be down."""

    async def release(self, node_id: str, session_id: str) -> None: ...

    async def publish_to_node(self, node_id: str, frame: bytes, qos: int, mid: str) -> bool: ...

    def publish_to_node_nowait(self, node_id: str, frame: bytes, qos: int, mid: str,
                               want_result: bool = False) -> asyncio.Future[bool] | None:
        """Queue the frame without waiting (the hot path: no task per message). With
        `want_result`, a future telling whether an instance held the node. Raises
        BrokerUnavailable at once when the backend is known to be down."""

    async def publish_to_topic(self, topic: str, seq: int, frame: bytes) -> None: ...

    async def interest(self, topic: str, on: bool) -> None: ...

    async def presence(self, node_ids: Iterable[str]) -> dict[str, bool]:
        """Which of these nodes have a session on another instance."""

    async def control(self, node_id: str, command: str) -> bool:
        """Send kick/ban to the instance holding the node; False if none does."""

    async def watch_node(self, node_id: str, on: bool) -> None:
        """Receive (or stop receiving) other instances' presence events of the node."""

    async def watch_topic(self, topic: str, on: bool) -> None:
        """Receive (or stop receiving) other instances' events of the topic's
        subscribers."""

    def publish_presence_nowait(self, node_id: str, online: bool, ts: int,
                                topic: str | None = None,
                                want_result: bool = False) -> asyncio.Future[bool] | None:
        """Queue a presence event for the instances watching the node (or `topic`);
        with `want_result`, a future telling whether some instance watches it. Raises
        BrokerUnavailable when the backend is known to be down."""


class MemoryBroker:
    """One process, no other instance: routing beyond the local registry finds nobody."""

    async def start(self, instance_id: str, handler: BrokerHandler) -> None:
        self.instance_id = instance_id

    async def close(self) -> None:
        pass

    async def ping(self) -> None:
        pass

    async def claim(self, node_id: str, session_id: str) -> None:
        pass

    async def reassert(self, claims: list[tuple[str, str]]) -> list[str | None]:
        return [session_id for _, session_id in claims]

    async def release(self, node_id: str, session_id: str) -> None:
        pass

    async def publish_to_node(self, node_id: str, frame: bytes, qos: int, mid: str) -> bool:
        return False

    def publish_to_node_nowait(self, node_id: str, frame: bytes, qos: int, mid: str,
                               want_result: bool = False) -> asyncio.Future[bool] | None:
        if not want_result:
            return None
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        fut.set_result(False)
        return fut

    async def publish_to_topic(self, topic: str, seq: int, frame: bytes) -> None:
        pass

    async def interest(self, topic: str, on: bool) -> None:
        pass

    async def presence(self, node_ids: Iterable[str]) -> dict[str, bool]:
        return {}

    async def control(self, node_id: str, command: str) -> bool:
        return False

    async def watch_node(self, node_id: str, on: bool) -> None:
        pass

    async def watch_topic(self, topic: str, on: bool) -> None:
        pass

    def publish_presence_nowait(self, node_id: str, online: bool, ts: int,
                                topic: str | None = None,
                                want_result: bool = False) -> asyncio.Future[bool] | None:
        # Nobody else to watch: the same answer as a node nobody holds.
        return self.publish_to_node_nowait(node_id, b"", 0, "", want_result)
