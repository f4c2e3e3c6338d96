"""Watching presence (docs/protocol.md §6.1): `PresenceWatch`, owned by the `HubNode`.

Owned here: this instance's watch registry (node id -> watching sessions, topic ->
watching sessions, session -> what it watches), the state of each watched node as this
instance last told its watchers, and turning what happens to sessions (a node's session
welcomed or closed, a topic subscribed or left) into `presence` events, for the local
watchers and, through the broker, for the other instances'. Sessions call in through
`watch`/`unwatch` (their control queue, in order with `sub` and `presence`); the router
(hub/node.py) calls the hooks. Events go into the watcher's send queue like any frame
(`Session.push`), so its bounds hold: a watcher that does not read is a slow consumer.

**The cross-instance path.** Events travel on channels of their own, one per watched
node and one per watched topic (`Broker.watch_node` / `watch_topic`; with Redis
`<prefix>wn:<node>` and `<prefix>wt:<topic>`), which an instance subscribes only while
it has a local watcher of that node or topic: only watching instances receive and
decode events, and nothing on the message path (send, pub, delivery) ever touches this
module. Events are queued into the broker's pipeline of the current loop turn (no task,
no round trip of their own). A node's holder publishes the session's open event
always, and learns from it whether anyone watches (Redis answers how many received
it); it publishes the close event only when some instance watches the node: the open
said so, or a watcher that began later told it (`WATCHED_COMMAND` on the node's own
channel, sent once the watch channel is confirmed, so one of the two always reaches
it). So a node nobody watches costs one pipelined PUBLISH per session, at its open
(next to the claim's own round trips), and nothing after. Topics are simpler: their
events are published at each local `sub` and `unsub` (control frames, not the message
path) and Redis drops those nobody watches; knowing of a topic's watchers ahead would
need a broadcast to every instance with subscribers.

**Loss and order.** Events are best effort. Each carries the publishing instance's
clock (`ts`, ms); the watching instance keeps, per watched node, the state and time it
last reported, drops an event older than that and never reports the same state twice.
A session closed as replaced (4010) publishes nothing: the newer session holds the node
(§6.1: no change). An instance that dies publishes nothing either, and an event sent
during a partition is lost, so every `hb` seconds (and at once when the broker is back)
each instance asks the broker for the presence of the remote nodes it watches (batched,
`MAX_PRESENCE_NODES` per query, one query at a time) and reports the differences: a
dead instance's nodes are reported offline within hb + 1 s, well inside the `3 x hb`
of §6.1 (Redis drops a dead instance's subscriptions, which are its nodes' presence, as
soon as its connection drops). Topic watchers get no such re-check (§6.1: a subscriber
on an instance that dies is not reported).

**Snapshot.** A node `watch` first registers the node (so changes are recorded from
then on) and waits for the broker to confirm the event channel, then reads presence;
an event applied while that read was in flight is newer than it and wins. The watcher
joins the node's watchers only when its `ok` is queued, so no event comes before the
`ok` and none is missed after it. When the broker cannot be asked the `watch` gets
`unavailable` and changes nothing, as `presence` does (§6).

**Online** means a welcomed session here (an `ACTIVE` one), or one the broker reports
on another instance.

**Bounds.** A session watches at most `limits.max_watch` nodes and topics; so the
registry holds at most (sessions x max_watch) entries, each dropped, with its broker
channel, when its last watcher leaves or closes. The re-check reads one batch at a
time, and the Redis broker refuses events past half its publish backlog
(hub/broker_redis.py), so a burst of them never crowds out messages.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any

from openred.hub.tokens import topic_allowed
from openred.protocol import errors as E
from openred.protocol.frames import MAX_PRESENCE_NODES, Unwatch, Watch, encode_presence

if TYPE_CHECKING:
    from openred.hub.node import HubNode
    from openred.hub.session import Session

__all__ = ["WATCHED_COMMAND", "PresenceWatch"]

log = logging.getLogger("openred.hub")

# The control command (Broker.control, on the node's channel) a watching instance sends
# to the node's holder: some instance watches this node, so publish its close (§6.1).
WATCHED_COMMAND = "watched"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class _Entry:
    """One watched node or topic on this instance."""

    __slots__ = ("held", "online", "pending", "ready", "sessions", "ts", "ver")

    def __init__(self) -> None:
        self.sessions: set[Session] = set()
        self.pending = 0  # watches of it still taking their snapshot: keep it meanwhile
        self.ready: asyncio.Future[Any] | None = None  # the broker's watch, being made
        self.held = False  # the broker confirmed the watch (else made again at broker up)
        # Nodes only: the state last told to the watchers here (None: not read yet),
        # its time (ms), and a counter of states applied (a snapshot read meanwhile
        # defers to them).
        self.online: bool | None = None
        self.ts = 0
        self.ver = 0


class _Watches:
    """What one session watches."""

    __slots__ = ("nodes", "topics")

    def __init__(self) -> None:
        self.nodes: set[str] = set()
        self.topics: set[str] = set()


class PresenceWatch:
    def __init__(self, hub: HubNode) -> None:
        self.hub = hub
        self.nodes: dict[str, _Entry] = {}
        self.topics: dict[str, _Entry] = {}
        self.sessions: dict[Session, _Watches] = {}
        self._replaced: Session | None = None
        # Local nodes some other instance watches: their close is published (at most one
        # per local session).
        self._watched_elsewhere: set[str] = set()
        self._recheck_at = 0.0  # loop time
        self._rechecking = False

    def size(self) -> tuple[int, int, int]:
        """(watched nodes, watched topics, watching sessions) on this instance."""
        return len(self.nodes), len(self.topics), len(self.sessions)

    # -- watch and unwatch (a session's control queue) ----------------------------------

    async def watch(self, session: Session, f: Watch) -> None:
        hub = self.hub
        topic = f.topic
        if topic is not None and not topic_allowed(session.topics_allowed, topic):
            session.reply_error(f.id, E.FORBIDDEN, "topic not allowed by token")
            return
        mine = self.sessions.get(session)
        nodes = f.nodes or []
        adds = sum(1 for n in nodes if mine is None or n not in mine.nodes)
        if topic is not None and (mine is None or topic not in mine.topics):
            adds += 1
        held = 0 if mine is None else len(mine.nodes) + len(mine.topics)
        limit = hub.cfg.limits.max_watch
        if held + adds > limit:
            session.reply_error(f.id, E.LIMIT_EXCEEDED,
                                f"at most {limit} watched nodes and topics")
            return
        # Registered first: from here on changes are recorded (and, in a cluster,
        # received once the broker confirms), so the snapshot below misses none.
        entries = [self._ref(self.nodes, n, True) for n in nodes]
        t_entry = self._ref(self.topics, topic, False) if topic is not None else None
        try:
            waits = [e.ready for e in (*entries, t_entry)
                     if e is not None and e.ready is not None and not e.ready.done()]
            if waits:
                await asyncio.wait(waits)  # shared: never cancelled by this wait
            vers = [e.ver for e in entries]
            t0 = _now_ms()
            online = await self._read(nodes) if nodes else {}
        except Exception:
            self._unref_all(nodes, entries, topic, t_entry)
            session.reply_error(f.id, E.UNAVAILABLE, "presence unavailable")
            return
        except BaseException:
            self._unref_all(nodes, entries, topic, t_entry)
            raise
        if not session.active:  # closed meanwhile: forget() has run already
            self._unref_all(nodes, entries, topic, t_entry)
            return
        mine = self.sessions.get(session)
        if mine is None:
            mine = self.sessions[session] = _Watches()
        snapshot: dict[str, bool] = {}
        for n, e, ver in zip(nodes, entries, vers, strict=True):
            if e.ver == ver or e.online is None:
                # Nothing newer arrived during the read: it is the state now (and the
                # other watchers here learn of a change it shows).
                self._apply(n, e, online.get(n, False), max(t0, e.ts))
            e.pending -= 1
            e.sessions.add(session)
            mine.nodes.add(n)
            snapshot[n] = bool(e.online)
        if topic is not None and t_entry is not None:
            t_entry.pending -= 1
            t_entry.sessions.add(session)
            mine.topics.add(topic)
        if f.nodes is not None:
            session.reply_ok(f.id, online=snapshot)
        else:
            session.reply_ok(f.id)

    async def unwatch(self, session: Session, f: Unwatch) -> None:
        mine = self.sessions.get(session)
        if mine is not None:
            for n in f.nodes or ():
                if n in mine.nodes:
                    mine.nodes.discard(n)
                    self._leave(self.nodes, n, session, True)
            if f.topic is not None and f.topic in mine.topics:
                mine.topics.discard(f.topic)
                self._leave(self.topics, f.topic, session, False)
            if not mine.nodes and not mine.topics:
                del self.sessions[session]
        session.reply_ok(f.id)

    def forget(self, session: Session) -> None:
        """The session left the registry (hub/node.py `detach`): its watches end."""
        if self._replaced is session:
            self._replaced = None
        if session.node_id not in self.hub.local:
            self._watched_elsewhere.discard(session.node_id)
        mine = self.sessions.pop(session, None)
        if mine is None:
            return
        for n in mine.nodes:
            self._leave(self.nodes, n, session, True)
        for t in mine.topics:
            self._leave(self.topics, t, session, False)

    async def _read(self, nodes: list[str]) -> dict[str, bool]:
        """Presence now: a welcomed session here, else what the broker says. Raises
        when the broker cannot be asked."""
        local = self.hub.local
        out: dict[str, bool] = {}
        remote: list[str] = []
        for n in nodes:
            s = local.get(n)
            if s is not None:
                out[n] = s.active  # one session per node: here, being welcomed or not
            else:
                out[n] = False
                remote.append(n)
        if remote and self.hub.clustered:
            for i in range(0, len(remote), MAX_PRESENCE_NODES):
                out.update(await self.hub.broker.presence(remote[i:i + MAX_PRESENCE_NODES]))
        return out

    # -- the registry -------------------------------------------------------------------

    def _ref(self, table: dict[str, _Entry], key: str, node: bool) -> _Entry:
        e = table.get(key)
        if e is None:
            e = table[key] = _Entry()
            self._hold(key, e, node)
        e.pending += 1
        return e

    def _hold(self, key: str, e: _Entry, node: bool) -> None:
        """Ask the broker for other instances' events of `key` (a cluster only)."""
        if not self.hub.clustered:
            e.held = True
            return
        broker = self.hub.broker
        coro = broker.watch_node(key, True) if node else broker.watch_topic(key, True)
        fut = e.ready = self.hub.background(coro)

        def done(f: asyncio.Future[Any]) -> None:
            ok = not f.cancelled() and f.exception() is None
            if e.ready is f:
                e.ready = None
                e.held = ok
            if ok and node and self.nodes.get(key) is e:
                self._tell_holder(key)

        fut.add_done_callback(done)

    def _unref_all(self, nodes: list[str], entries: list[_Entry], topic: str | None,
                   t_entry: _Entry | None) -> None:
        for n, e in zip(nodes, entries, strict=True):
            e.pending -= 1
            self._drop_if_unused(self.nodes, n, e, True)
        if topic is not None and t_entry is not None:
            t_entry.pending -= 1
            self._drop_if_unused(self.topics, topic, t_entry, False)

    def _leave(self, table: dict[str, _Entry], key: str, session: Session,
               node: bool) -> None:
        e = table.get(key)
        if e is not None:
            e.sessions.discard(session)
            self._drop_if_unused(table, key, e, node)

    def _drop_if_unused(self, table: dict[str, _Entry], key: str, e: _Entry,
                        node: bool) -> None:
        if e.sessions or e.pending or table.get(key) is not e:
            return
        del table[key]
        if self.hub.clustered:
            broker = self.hub.broker
            self._background(broker.watch_node(key, False) if node
                             else broker.watch_topic(key, False))

    def _tell_holder(self, node: str) -> None:
        """Tell the instance holding `node` (if any) that it is watched (after the watch
        channel is confirmed: an open published before that is answered by this)."""
        if node not in self.hub.local:
            self._background(self.hub.broker.control(node, WATCHED_COMMAND))

    def watched_elsewhere(self, node: str) -> None:
        """`WATCHED_COMMAND` came for a node held here (hub/node.py `on_control`)."""
        if node in self.hub.local:
            self._watched_elsewhere.add(node)

    def _background(self, coro: Coroutine[Any, Any, Any]) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception:  # the broker is away: its subscriptions went with it
                pass

        self.hub.background(run())

    # -- nodes: what changes their state --------------------------------------------------

    def replaced(self, session: Session) -> None:
        """The session is about to be closed as replaced (4010): a newer session of its
        node holds the node, which is no change (§6.1). Called right before the close."""
        self._replaced = session

    def node_opened(self, session: Session) -> None:
        """The session was welcomed (hub/admission.py)."""
        node, ts = session.node_id, _now_ms()
        if self.hub.clustered:
            fut = self._publish(node, True, ts, None, want_result=True)
            if fut is not None:
                fut.add_done_callback(partial(self._opened_heard, session))
        e = self.nodes.get(node)
        if e is not None:
            self._apply(node, e, True, max(ts, e.ts))

    def _opened_heard(self, session: Session, fut: asyncio.Future[bool]) -> None:
        """Whether another instance received the open: then it watches the node."""
        if fut.cancelled() or fut.exception() is not None or not fut.result():
            return
        if self.hub.local.get(session.node_id) is session and session.active:
            self._watched_elsewhere.add(session.node_id)

    def node_closed(self, session: Session) -> None:
        """A welcomed session ends (hub/admission.py `disconnected`)."""
        if self._replaced is session:
            self._replaced = None
            self._watched_elsewhere.discard(session.node_id)
            return
        node, ts = session.node_id, _now_ms()
        if node in self._watched_elsewhere:
            self._watched_elsewhere.discard(node)
            self._publish(node, False, ts, None)
        e = self.nodes.get(node)
        if e is not None:
            self._apply(node, e, False, max(ts, e.ts))

    def _apply(self, node: str, e: _Entry, online: bool, ts: int) -> None:
        """Record the node's state as of `ts`; tell the watchers here if it changed."""
        if ts < e.ts:
            return  # older than what the watchers were told
        e.ts = ts
        e.ver += 1
        if e.online is online:
            return
        told = e.online is not None
        e.online = online
        if told and e.sessions:
            self._push(e.sessions, encode_presence(node, online, ts), node)

    def _push(self, sessions: set[Session], frame: bytes, node: str) -> None:
        n = 0
        # A copy: a push may drop a slow consumer, which leaves `sessions` (§7).
        for s in tuple(sessions):
            if s.node_id != node:  # §6.1: a node's own events are not sent to it
                s.push(frame)
                n += 1
        self.hub.metrics.frames_out["presence"] += n

    def _publish(self, node: str, online: bool, ts: int, topic: str | None,
                 want_result: bool = False) -> asyncio.Future[bool] | None:
        try:
            return self.hub.broker.publish_presence_nowait(node, online, ts, topic,
                                                           want_result)
        except Exception:
            return None  # best effort: the watchers' re-check reports it (module docstring)

    # -- topics ---------------------------------------------------------------------------

    def topic_changed(self, node: str, topic: str, subscribed: bool) -> None:
        """A local session subscribed to `topic` or left it (hub/node.py)."""
        ts = _now_ms()
        if self.hub.clustered:
            self._publish(node, subscribed, ts, topic)
        self._topic_event(node, topic, subscribed, ts)

    def _topic_event(self, node: str, topic: str, subscribed: bool, ts: int) -> None:
        e = self.topics.get(topic)
        if e is not None and e.sessions:
            self._push(e.sessions, encode_presence(node, subscribed, ts, topic), node)

    # -- other instances --------------------------------------------------------------------

    def on_remote(self, node: str, online: bool, ts: int, topic: str | None) -> None:
        """An event another instance published (the broker's handler, hub/node.py)."""
        if topic is not None:
            self._topic_event(node, topic, online, ts)
            return
        e = self.nodes.get(node)
        if e is None:
            return
        s = self.hub.local.get(node)
        if s is not None and s.active:
            return  # the node's session is here now: that was about an older one
        self._apply(node, e, online, ts)

    def recheck_if_due(self) -> None:
        """Once a second (housekeeping): every hb, read the presence of the remote nodes
        watched here and report what changed unseen (a dead instance, a partition)."""
        hub = self.hub
        if not self.nodes or not hub.clustered or self._rechecking:
            return
        now = hub.loop.time()
        if now < self._recheck_at:
            return
        self._recheck_at = now + hub.cfg.limits.hb_s
        self._rechecking = True
        hub.background(self._recheck())

    async def _recheck(self) -> None:
        try:
            local = self.hub.local
            nodes = [n for n, e in self.nodes.items() if e.online is not None and n not in local]
            for i in range(0, len(nodes), MAX_PRESENCE_NODES):
                chunk = nodes[i:i + MAX_PRESENCE_NODES]
                vers = {n: self.nodes[n].ver for n in chunk if n in self.nodes}
                t0 = _now_ms()
                try:
                    online = await self.hub.broker.presence(chunk)
                except Exception:
                    return  # the broker is away: again in hb, or when it is back
                for n in chunk:
                    e = self.nodes.get(n)
                    if e is None or e.ver != vers.get(n) or n in local:
                        continue  # gone, changed meanwhile (newer), or here now
                    was = e.online
                    self._apply(n, e, online.get(n, False), max(t0, e.ts))
                    if e.online and not was:
                        self._tell_holder(n)  # its open was missed: so may its close be
        finally:
            self._rechecking = False

    def on_broker_up(self) -> None:
        """The broker is back: watches it could not take are made again, and what was
        missed meanwhile is read at the next housekeeping tick (never raises)."""
        try:
            self._recheck_at = 0.0
            for table, node in ((self.nodes, True), (self.topics, False)):
                for key, e in table.items():
                    if not e.held and e.ready is None:
                        self._hold(key, e, node)
        except Exception:
            log.exception("presence watch after broker outage failed",
                          extra={"event": "watch_failed"})
