"""The process-wide hub object: configuration, store, broker, metrics, the local registry
(node id -> session, topic -> sessions) and every routing decision.

Cluster-wide delivery always goes through the methods here (local registry first, broker
second), never around them; sessions (hub/session.py) reach the store and the broker
only through them. `HubNode` is also the broker's handler for traffic from other
instances, and the target of operator actions (kick, ban, server-side send). Who gets a
session at all is hub/admission.py's call.

Why this module is over 500 lines: it is the router, and every routing decision (direct,
QoS 1, topics, presence, operator actions, broker traffic) stays in one place on purpose,
so that no delivery can go around it. What is not a routing decision lives elsewhere:
admission, the QoS 1 inbox and resyncs, the WebSocket edge.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from functools import partial
from typing import Any

from openred.hub.admission import Admission
from openred.hub.broker import Broker, BrokerUnavailable
from openred.hub.claims import Claims
from openred.hub.config import Config, effective_limits
from openred.hub.forwarded import TrustedProxies
from openred.hub.handshake import ServerHandshake
from openred.hub.meta import direct_msg, history_item, topic_msg
from openred.hub.metrics import Metrics
from openred.hub.presence_watch import WATCHED_COMMAND, PresenceWatch
from openred.hub.resync import RESYNC_COMMAND, Resyncs
from openred.hub.session import ACTIVE, CLOSED, Q1Send, Session
from openred.hub.tokens import TokenVerifier
from openred.hub.topic_order import TopicOrder
from openred.hub.tracing import Tracing
from openred.hub.transport import CLOSED as CONN_CLOSED
from openred.hub.transport import OPEN, Connection
from openred.persistence.store import (
    EnqueueArgs,
    HistoryEntry,
    QueueFull,
    Store,
    StoredMessage,
    StoreError,
    StoreUnavailable,
)
from openred.protocol import errors as E
from openred.protocol.frames import (
    DecodeLimits,
    History,
    Send,
    encode_bye,
    encode_history_ok,
    encode_msg,
    encode_receipt,
    history_ok_overhead,
)
from openred.protocol.ids import MidGenerator

__all__ = ["ADMIN_SENDER", "HubNode"]

log = logging.getLogger("openred.hub")

# Work per slice of the once-a-second sweep (pings, idle and slow-consumer checks)
# before the loop runs other work: 100 sessions checked, or fewer with pings among them,
# as a ping (a socket write, ~19 us) counts as ten sessions checked (~1 us each, the
# sessions' objects being out of the CPU's caches). A slice is then at most
# ~0.3 ms, and that is what a message relayed during a sweep waits. With slices of 500
# (~0.6 ms, up to 1.2 ms) `latency` p99 with 19,000 idle sessions was 2.1 ms, with 100
# 0.85-1.13 ms (docs/benchmarks.md).
HOUSEKEEP_SLICE = 100
HOUSEKEEP_PING_COST = 10

ADMIN_SENDER = "$admin"  # §4: outside the node id alphabet, so no node can claim it
UNACKED_TRACKED = 10_000


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class HubNode:
    def __init__(self, cfg: Config, store: Store, broker: Broker, metrics: Metrics,
                 verifier: TokenVerifier | None) -> None:
        self.cfg = cfg
        self.store = store
        self.broker = broker
        self.metrics = metrics
        self.verifier = verifier
        # hub/tracing.py when tracing is on (set by hub/app.py at start-up), else None:
        # the one check the message path makes for it.
        self.tracing: Tracing | None = None
        self.loop = asyncio.get_running_loop()
        self.instance_id = cfg.server.instance_id
        self.clustered = not cfg.broker.url.startswith("memory:")
        self.allowlist = cfg.auth.mode == "allowlist"
        self.send_queue_max = cfg.limits.send_queue_max
        # QoS 1 mids a session remembers as written and unacked (hub/inbox.py):
        # no more than a node may have pending, and never more than UNACKED_TRACKED, so
        # a node that never acks costs at most about 1 MB here.
        self.max_unacked = min(cfg.limits.max_pending_per_node, UNACKED_TRACKED)
        self.message_ttl_s = cfg.store.message_ttl_s
        self.dedup_window_ms = cfg.store.dedup_window_s * 1000  # §4.2
        self.verify_body_sig = cfg.auth.verify_body_sig
        self.decode_limits = DecodeLimits(max_body_bytes=cfg.limits.max_body_bytes)
        self.welcome_limits = effective_limits(cfg)
        self.trusted_proxies = TrustedProxies(cfg.server.trusted_proxies)
        self.ws_extensions: list[Any] | None = None
        if cfg.server.compression:
            from websockets.extensions.permessage_deflate import (
                ServerPerMessageDeflateFactory,
            )

            self.ws_extensions = [ServerPerMessageDeflateFactory()]
        self.mid = MidGenerator()
        self.connections: set[Connection] = set()
        # The housekeeping sweep's wheel: second (tick) -> the connections it visits
        # then. A connection is due at its next ping, idle or write deadline, so a
        # second's work is the connections due in it, not every connection (`_sweep`).
        self._tick = 0
        self._wheel: dict[int, set[Connection]] = {}
        self.local: dict[str, Session] = {}
        self.topics: dict[str, set[Session]] = {}
        self.accepting = True
        self._all_closed: asyncio.Event | None = None
        self._route_n = 0
        self._dirty: list[Connection] = []
        self._dirty_scheduled = False
        self._interest: dict[str, asyncio.Future[Any]] = {}
        self._housekeeping: asyncio.Task[None] | None = None
        self._bg: set[asyncio.Task[Any]] = set()
        self.resyncs = Resyncs(self)
        self.claims = Claims(self)
        self.topic_order = TopicOrder(self)
        self.admission = Admission(self)
        self.presence_watch = PresenceWatch(self)  # §6.1 watch registry and events

    # -- lifecycle ----------------------------------------------------------------

    def new_connection(self) -> Connection:
        """The WebSocket server's protocol factory: one per accepted TCP connection."""
        return Connection(self)

    def new_session(self, conn: Connection) -> Session:
        return Session(self, conn)

    def connection_opened(self, conn: Connection) -> None:
        self.connections.add(conn)
        self._visit(conn, 1)

    def connection_closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        bucket = self._wheel.get(conn.sweep_at)
        if bucket is not None:
            bucket.discard(conn)
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()

    def new_handshake(self) -> ServerHandshake:
        return ServerHandshake(self.cfg.server.hub_id, self.verifier)

    def start(self) -> None:
        self._housekeeping = self.loop.create_task(self._housekeep())

    def background(self, coro: Any) -> asyncio.Task[Any]:
        """Run `coro` as the hub's own task (kept until done; not a session's)."""
        task = self.loop.create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)
        return task

    async def shutdown(self, grace_s: float) -> None:
        """§7 graceful shutdown: say bye (retry_ms), close 1012, let in-flight store
        writes finish within the grace period (nothing accepted is lost)."""
        self.accepting = False
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        # Stop reading first, so that what was accepted gets its `ok` before the bye.
        inflight: list[asyncio.Task[Any]] = []
        for c in list(self.connections):
            c.pause_reading()
            if c.session is not None:
                inflight.extend(c.session.pending_tasks())
        if inflight:
            await asyncio.wait(inflight, timeout=grace_s)
        # Marks of what was accepted are committed, hints still due sent (hub/resync.py).
        await self.resyncs.at_shutdown(min(grace_s, 2.0))
        for c in list(self.connections):
            # The close resumes reading, for the peer's close frame (§8).
            if c.session is not None and c.session.active:
                # §8: retry_ms is drawn per session, so the nodes of a restarting hub
                # spread their reconnects over the window instead of coming back at once.
                retry_ms = 1000 + int.from_bytes(os.urandom(2), "big") % 4000
                c.close(E.CLOSE_RESTART, "restart", (encode_bye("shutdown", retry_ms),))
            else:
                c.close(E.CLOSE_RESTART, "restart")
        if self.connections:
            self._all_closed = asyncio.Event()
            try:
                await asyncio.wait_for(self._all_closed.wait(), min(grace_s, 2.0))
            except TimeoutError:
                pass
        for c in list(self.connections):
            if c.transport is not None:
                c.transport.abort()

    async def _housekeep(self) -> None:
        """Once a second: pings every hb, idle close after 3 x hb, slow-consumer close
        after 3 x hb of a socket that does not drain (§8), for the connections due this
        second; every minute: purge expired messages."""
        while True:
            await asyncio.sleep(1.0)
            self._tick += 1
            due = self._wheel.pop(self._tick, None)
            if due:
                await self._sweep(due)
            self.resyncs.hint_if_due()
            self.claims.retry_if_due()
            self.presence_watch.recheck_if_due()
            if self._tick % 60 == 0:
                try:
                    await self.store.purge_expired(_now_ms())
                except StoreUnavailable:
                    pass
                except Exception:  # housekeeping must outlive any one failure
                    log.exception("housekeeping failed", extra={"event": "housekeeping_failed"})

    def _visit(self, c: Connection, seconds: int) -> None:
        """Have the sweep visit `c` in `seconds` (>= 1) seconds."""
        at = self._tick + seconds
        if c.sweep_at == at:
            return
        bucket = self._wheel.get(c.sweep_at)
        if bucket is not None:
            bucket.discard(c)
        c.sweep_at = at
        bucket = self._wheel.get(at)
        if bucket is None:
            self._wheel[at] = {c}
        else:
            bucket.add(c)

    async def _sweep(self, due: set[Connection]) -> None:
        """Visit the connections due this second, in slices with the loop's other work
        between them (in one go, 19,000 sessions stalled relaying for ~30 ms:
        docs/benchmarks.md, "Many sessions on one instance"), and say when each is due
        next. Every connection not yet closed stays in the wheel, as each was in the
        sweep over all of them. `due` is out of the wheel, so nothing changes it while
        this runs."""
        hb = self.cfg.limits.hb_s
        idle = 3 * hb
        now = self.loop.time()
        budget = HOUSEKEEP_SLICE
        for c in due:
            if budget <= 0:
                await asyncio.sleep(0)
                budget = HOUSEKEEP_SLICE
                now = self.loop.time()
            budget -= 1
            phase = c.phase
            if phase is not OPEN:
                if phase is not CONN_CLOSED:
                    self._visit(c, 1)  # upgrading, or closing: a grace timer ends it
                continue
            if c.write_paused and now - c.paused_at > idle:
                # §8: a socket that has not drained for 3 x hb is a slow consumer,
                # whatever the peer still sends (pings keep it from looking idle).
                c.slow_consumer()
                self._visit(c, 1)  # closing: looked at every second until it is closed
                continue
            s = c.session
            if s is None or s.state is not ACTIVE:
                self._visit(c, 1)  # in its handshake: looked at every second
                continue
            if now - c.last_rx > idle:
                s.close(E.CLOSE_IDLE, "idle timeout")
                self._visit(c, 1)
                continue
            if now - c.last_ping >= hb:
                c.last_ping = now
                c.send_ping()
                budget -= HOUSEKEEP_PING_COST
            # Due again at the first of its deadlines: visits are never early (a tick
            # is at least a second after the last), and one that finds the deadline
            # moved (the peer sent something) just says the new one.
            nxt = min(c.last_ping + hb, c.last_rx + idle)
            if c.write_paused:
                nxt = min(nxt, c.paused_at + idle)
            self._visit(c, max(1, math.ceil(nxt - now)))

    # -- the local registry ---------------------------------------------------------

    def attach(self, session: Session) -> None:
        """Make a session the node's route on this instance (hub/admission.py, before
        the welcome)."""
        self.local[session.node_id] = session
        self.metrics.connections += 1

    def detach(self, session: Session) -> None:
        node_id = session.node_id
        if self.local.get(node_id) is session:
            del self.local[node_id]
            self.claims.forget(session)
            if self.clustered:
                self.background(self.broker.release(node_id, session.session_id))
        self.metrics.connections -= 1
        for topic in session.topics:
            self._drop_subscriber(session, topic)
        self.presence_watch.forget(session)

    # -- routing ------------------------------------------------------------------

    def route0(self, session: Session, f: Send, mid: str, frame: bytes) -> None:
        """A QoS 0 direct message (§5): to the local session, else through the broker,
        else dropped (`no_route` when the frame has an id)."""
        target = self.local.get(f.to)
        if target is not None:
            metrics = self.metrics
            metrics.routed["local"] += 1
            metrics.frames_out["msg"] += 1
            target.conn.push(frame)
            self.sample_route(session.rx_time)
            if f.id is not None:
                session.reply_ok(f.id, mid=mid, status="sent")
        elif self.clustered:
            try:
                fut = self.broker.publish_to_node_nowait(f.to, frame, 0, mid, f.id is not None)
            except Exception:
                if f.id is not None:
                    session.reply_error(f.id, E.UNAVAILABLE, "broker unavailable")
                return
            self.metrics.routed["remote"] += 1
            if fut is not None:
                fut.add_done_callback(partial(_remote_result, session, f.id, mid))
        else:
            self.metrics.routed["dropped"] += 1
            if f.id is not None:
                session.reply_error(f.id, E.NO_ROUTE, "node is offline")

    async def send_q1(self, session: Session, items: list[Q1Send]) -> None:
        """QoS 1 direct messages (§5) of one read, (send, mid, ts, prev, routed) each,
        stored with one store call (they share a group commit), each `ok`'d once
        stored, then delivered behind the sender's earlier messages (`prev`, their
        `routed`). Each `routed` is resolved once its message is delivered or refused,
        whatever happens to the sender's session."""
        handed: set[int] = set()  # indexes whose `routed` a delivery task resolves
        deliveries: list[asyncio.Task[None]] = []
        try:
            stored = await self._store_q1(session, items)
            for i, ((f, mid, ts, prev, routed), first) in enumerate(zip(items, stored,
                                                                       strict=True)):
                if isinstance(first, tuple):  # refused: (code, text), answered in order
                    session.reply_error(f.id, *first)
                    routed.set_result(None)
                    continue
                if first != mid:
                    # §4.2: a repeat of a remembered cid gets the first's ok again, with
                    # its mid; it is neither stored nor delivered again.
                    session.reply_ok(f.id, mid=first, status="stored", dup=True)
                    routed.set_result(None)
                    continue
                # §5: a hint the broker cannot carry now is durable before the ok, too.
                await self.resyncs.before_ok(f.to, mid)
                session.reply_ok(f.id, mid=mid, status="stored")  # §5: stored before ok
                frame = direct_msg(mid, session.node_id, f.body, ts, 1, f.sig, f.meta)
                if (prev is None or prev.done()) and self._push_local(f.to, mid, frame):
                    # The common case, done here: nothing earlier of this sender's is
                    # still on its way and the recipient is on this instance, so the
                    # push cannot wait nor be cut off (no task, no shield per message).
                    routed.set_result(None)
                    continue
                # Accepted: from here on the delivery is the hub's, not the sender
                # session's: a task of the hub's own, so that the sender going away (its
                # tasks cancelled) does not keep an online recipient from a message it
                # was told is stored.
                handed.add(i)
                deliveries.append(self.background(
                    self._deliver_in_order(f.to, mid, frame, prev, routed)))
            for delivery in deliveries:
                await asyncio.shield(delivery)
        finally:
            for i, item in enumerate(items):
                routed = item[4]
                if i not in handed and not routed.done():
                    routed.set_result(None)  # refused (or cancelled): later ones need not wait

    async def _store_q1(self, session: Session, items: list[Q1Send]
                        ) -> list[str | tuple[str, str]]:
        """Store QoS 1 messages; for each, the mid it is stored under (its own, or the
        first's for a repeated cid, §4.2), or the error to answer (code, text)."""
        store = self.store
        unavailable = (E.UNAVAILABLE, "store unavailable")
        out: list[str | tuple[str, str]] = [unavailable] * len(items)
        todo: list[int] = []  # indexes sent to the store
        args: list[EnqueueArgs] = []
        max_pending = self.cfg.limits.max_pending_per_node
        registered: dict[str, bool] = {}  # allowlist mode: recipient -> registered
        try:
            for i, (f, mid, ts, _, _) in enumerate(items):
                if self.allowlist:
                    if f.to not in registered:
                        rec = await store.get_node(f.to)
                        registered[f.to] = rec is not None and rec.registered
                    if not registered[f.to]:
                        out[i] = (E.NO_ROUTE, "node is not registered")
                        continue
                ttl = f.ttl if f.ttl is not None else self.message_ttl_s
                msg = StoredMessage(mid, session.node_id, f.to, f.body, ts, ts + ttl * 1000,
                                    f.sig, f.receipt, f.meta)
                todo.append(i)
                # §4.2: the cid is remembered in the transaction that stores the message;
                # a repeat queued behind its first (same batch, or one being committed by
                # another instance) gets the first's outcome.
                args.append((msg, max_pending, f.cid, self.dedup_window_ms))
            # Timed (store_write_seconds, failures too) by the store's guard: hub/breaker.py.
            outcomes = await store.enqueue_many(args) if args else []
        except StoreUnavailable:  # the whole call (breaker open, an allowlist read)
            return out  # unavailable, but where the allowlist refused already
        for i, outcome in zip(todo, outcomes, strict=True):
            if outcome is None or isinstance(outcome, str):
                out[i] = items[i][1] if outcome is None else outcome
            elif isinstance(outcome, QueueFull):
                out[i] = (E.QUEUE_FULL, "recipient queue is full")
            elif isinstance(outcome, StoreUnavailable):
                out[i] = unavailable
            else:  # refused for this message alone (e.g. a duplicate mid)
                log.error("qos 1 store write refused", exc_info=outcome,
                          extra={"event": "store_refused"})
                out[i] = (E.INTERNAL, "message not stored")
        return out

    async def _deliver_in_order(self, node_id: str, mid: str, frame: bytes,
                                prev: asyncio.Future[Any] | None,
                                routed: asyncio.Future[None]) -> None:
        try:
            if prev is not None and not prev.done():
                await asyncio.wait((prev,))  # §5 order: the sender's earlier messages first
            await self.deliver_q1(node_id, mid, frame)
        finally:
            if not routed.done():
                routed.set_result(None)

    async def publish_to_node(self, node_id: str, frame: bytes, qos: int, mid: str) -> bool:
        t0 = time.perf_counter()
        ok = await self.broker.publish_to_node(node_id, frame, qos, mid)
        self.metrics.broker_publish_seconds.observe(time.perf_counter() - t0)
        self.metrics.routed["remote" if ok else "dropped"] += 1
        return ok

    def _push_local(self, node_id: str, mid: str, frame: bytes) -> bool:
        """A stored QoS 1 message to a recipient on this instance; False: not here."""
        target = self.local.get(node_id)
        if target is None:
            return False
        self.metrics.routed["local"] += 1
        target.push_q1(mid, frame)
        return True

    async def deliver_q1(self, node_id: str, mid: str, frame: bytes) -> None:
        """A stored QoS 1 message: push it to the recipient's session wherever it is;
        if none, it waits in the store for the next session."""
        if self._push_local(node_id, mid, frame):
            return
        if self.clustered:
            if self.resyncs.unreached(node_id):
                # An earlier message to it is stored unsent: this one must not overtake
                # it (§4 order). Both go with the resync when the broker is back.
                self.metrics.routed["queued"] += 1
                return
            try:
                if await self.publish_to_node(node_id, frame, 1, mid):
                    return
            except BrokerUnavailable:
                # Stored. The node may be online on another instance: it gets this once
                # the broker is back (on_broker_up), not only at its next session.
                self.resyncs.note_unreached(node_id, mid)
            except Exception:
                pass  # stored: delivered on the node's next session
        self.metrics.routed["queued"] += 1

    def push_to_sender(self, node_id: str, frame: bytes) -> None:
        target = self.local.get(node_id)
        if target is not None:
            target.push(frame)
        elif self.clustered:
            self.background(self.broker.publish_to_node(node_id, frame, 0, ""))

    async def ack(self, session: Session, mids: list[str], fid: int | str | None) -> None:
        try:
            acked = await self.store.ack(session.node_id, mids, _now_ms())
        except StoreUnavailable:
            # Not acked: redelivered on the next session (at least once).
            if fid is not None:
                session.reply_error(fid, E.UNAVAILABLE, "store unavailable")
            return
        session.reply_ok(fid)
        now = _now_ms()
        for a in acked:
            if a.receipt:
                self.metrics.frames_out["receipt"] += 1
                self.push_to_sender(a.sender, encode_receipt(a.mid, session.node_id, now))

    async def send_from_admin(self, to: str, body: bytes, qos: int,
                              ttl_s: int | None) -> tuple[str, str]:
        """Server-side send (`POST /v1/messages`): from = $admin. Returns (mid, status)."""
        now = _now_ms()
        mid = self.mid(now)
        if qos == 0:
            frame = encode_msg(mid, ADMIN_SENDER, body, now, 0)
            target = self.local.get(to)
            if target is not None:
                target.push(frame)
                return mid, "sent"
            if self.clustered and await self.publish_to_node(to, frame, 0, mid):
                return mid, "sent"
            return mid, "no_route"
        ttl = ttl_s if ttl_s is not None else self.cfg.store.message_ttl_s
        await self.store.enqueue(StoredMessage(mid, ADMIN_SENDER, to, body, now,
                                               now + ttl * 1000),
                                 self.cfg.limits.max_pending_per_node)
        await self.deliver_q1(to, mid, encode_msg(mid, ADMIN_SENDER, body, now, 1))
        return mid, "stored"

    # -- topics (§5) ----------------------------------------------------------------

    def subscribe(self, session: Session, topic: str) -> asyncio.Future[Any] | None:
        """Add a local subscriber. In a cluster, returns the pending broker subscription
        of the topic (shared by all who subscribe meanwhile): `sub` answers only once
        other instances' publications reach this one."""
        subs = self.topics.get(topic)
        if subs is None:
            subs = self.topics[topic] = set()
            self.topic_order.start(topic)
            if self.clustered:
                pending = asyncio.ensure_future(self.broker.interest(topic, True))
                self._interest[topic] = pending
                pending.add_done_callback(partial(self._interest_done, topic))
        subs.add(session)
        self.presence_watch.topic_changed(session.node_id, topic, True)  # §6.1
        return self._interest.get(topic)

    def _interest_done(self, topic: str, fut: asyncio.Future[Any]) -> None:
        if self._interest.get(topic) is fut:
            del self._interest[topic]
        if not fut.cancelled() and fut.exception() is not None:
            log.warning("topic subscription failed", extra={"event": "interest_failed"})

    def unsubscribe(self, session: Session, topic: str) -> None:
        self._drop_subscriber(session, topic)

    def _drop_subscriber(self, session: Session, topic: str) -> None:
        subs = self.topics.get(topic)
        if subs is None or session not in subs:
            return
        subs.discard(session)
        self.presence_watch.topic_changed(session.node_id, topic, False)  # §6.1
        if not subs:
            del self.topics[topic]
            self.topic_order.stop(topic)
            if self.clustered:
                self.background(self.broker.interest(topic, False))

    async def publish(self, session: Session | None, fid: int | str | None, topic: str,
                      body: bytes, sender: str | None = None, *, sig: bytes | None = None,
                      meta: dict[str, str] | None = None) -> tuple[str, int] | None:
        """Sequence, keep in history (with `sig` and `meta`, §5.1, §4.1), fan out
        (local, then other instances)."""
        sender = sender if sender is not None else session.node_id if session else ADMIN_SENDER
        ts = _now_ms()
        mid = self.mid(ts)
        try:
            # §6: the store numbers the publication in the transaction that keeps it in
            # history, so a topic is numbered without gaps or collisions across
            # instances, with or without the broker (local subscribers keep getting it
            # while the broker is away; others catch up from history when it is back).
            seq = await self.store.append_history(
                HistoryEntry(topic, 0, mid, sender, body, ts, sig, meta),
                self.cfg.store.topic_history, self.cfg.store.topic_history_ttl_s * 1000)
        except StoreUnavailable:
            if session is not None:
                session.reply_error(fid, E.UNAVAILABLE, "store unavailable")
            return None
        frame = topic_msg(mid, sender, topic, seq, body, ts, sig, meta)
        # To local subscribers in seq order (hub/topic_order.py), like the publications
        # of other instances.
        self.topic_order.deliver(topic, seq, frame, sender,
                                 session.rx_time if session is not None else None)
        if self.clustered:
            try:
                await self.broker.publish_to_topic(topic, seq, frame)
            except Exception:
                log.warning("topic publish to broker failed",
                            extra={"event": "broker_publish_failed"})
        if session is not None:
            session.reply_ok(fid, mid=mid, seq=seq)
        return mid, seq

    async def history_since(self, topic: str, since: int) -> list[HistoryEntry]:
        """What topic history holds after `since` (§6 recovery)."""
        return await self.store.history_since(
            topic, since, _now_ms(), self.cfg.store.topic_history_ttl_s * 1000)

    async def history(self, f: History) -> bytes | None:
        """§5.2: the encoded `ok` of a `history` request, None when the store cannot
        answer. The newest `limit` kept messages below `before`, oldest first; the
        oldest are left out until the reply fits in one message of max_frame_bytes."""
        try:
            # One more than asked: whether older messages remain (`more`).
            entries = await self.store.history_before(
                f.topic, f.before, f.limit + 1, _now_ms(),
                self.cfg.store.topic_history_ttl_s * 1000)
            seq = await self.store.last_seq(f.topic)  # after the read: >= every entry's
        except StoreError:
            return None
        more = len(entries) > f.limit
        if more:
            del entries[0]
        items = [history_item(e) for e in entries]
        room = self.cfg.limits.max_frame_bytes - history_ok_overhead(f.id, seq, len(items))
        size = sum(map(len, items))
        first = 0
        while size > room and first < len(items):
            size -= len(items[first])
            first += 1
        if first:
            items = items[first:]
            more = True
        return encode_history_ok(f.id, seq, items, more)

    async def topic_seq(self, topic: str) -> int:
        """The topic's current sequence, cluster wide (the store numbers topics)."""
        return await self.store.last_seq(topic)

    def topic_cursor(self, topic: str) -> int:
        """The seq this instance's cursor of `topic` hands out next (hub/topic_order.py):
        everything below it has been handed out or is gone."""
        return self.topic_order.cursor(topic)

    def topic_baseline(self, topic: str, seq: int) -> None:
        """A `sub` knows where its topic stands: local subscribers get what comes after
        `seq`, in order, if nobody here subscribed it before (hub/topic_order.py)."""
        self.topic_order.baseline(topic, seq)

    def mark_dirty(self, conn: Connection) -> None:
        """A connection has frames to write: all such are flushed by one callback at
        the end of this loop iteration (a fan-out to 10,000 sessions schedules one
        callback, not 10,000)."""
        self._dirty.append(conn)
        if not self._dirty_scheduled:
            self._dirty_scheduled = True
            self.loop.call_soon(self._flush_dirty)

    def _flush_dirty(self) -> None:
        self._dirty_scheduled = False
        dirty, self._dirty = self._dirty, []
        for c in dirty:
            c.flush()

    def sample_route(self, rx_time: float) -> None:
        """route_seconds: one message in 256 is timed from its read to the write of
        this loop iteration (the flush is scheduled before this callback)."""
        self._route_n += 1
        if not self._route_n & 255:
            self.loop.call_soon(self._observe_route, rx_time)

    def _observe_route(self, rx_time: float) -> None:
        self.metrics.route_seconds.observe(self.loop.time() - rx_time)

    def fanout(self, topic: str, seq: int, frame: bytes, sender: str | None,
               rx_time: float | None = None) -> None:
        """Write one publication to every local subscriber but its publisher (§6), in
        the order hub/topic_order.py hands them out."""
        subs = self.topics.get(topic)
        if not subs:
            return
        if rx_time is not None:
            self.sample_route(rx_time)
        n = 0
        # A copy: push_topic may drop a slow consumer, which leaves `subs` (§8).
        for s in tuple(subs):
            if s.node_id != sender:
                s.push_topic(topic, seq, frame)
                n += 1
        self.metrics.frames_out["msg"] += n
        self.metrics.routed["local"] += n

    # -- presence (§6) ----------------------------------------------------------------

    async def presence(self, nodes: list[str]) -> dict[str, bool]:
        online = {n: n in self.local for n in nodes}
        if self.clustered:
            others = [n for n, on in online.items() if not on]
            if others:
                online.update(await self.broker.presence(others))
        return online

    # -- operator actions -------------------------------------------------------------

    def close_node(self, node_id: str, code: int, reason: str) -> bool:
        """Close a node's local session (kick 4012, ban 4003); True if one was here."""
        s = self.local.get(node_id)
        if s is None or s.state is CLOSED:
            return False
        s.close(code, reason, bye=encode_bye(reason))
        return True

    # -- QoS 1 after a broker outage (hub/resync.py) ------------------------------------

    def resync(self, session: Session) -> None:
        self.resyncs.schedule(session)

    def on_broker_up(self) -> None:
        """The broker is reachable again (hub/broker.py): stored QoS 1 messages it could
        not carry (`Resyncs.on_broker_up`), and topic messages published elsewhere
        meanwhile (`TopicOrder.catch_up`)."""
        self.resyncs.on_broker_up(list(self.local.values()))
        self.claims.on_broker_up()  # one session per node again (hub/claims.py)
        self.presence_watch.on_broker_up()  # watches re-made, presence read again (§6.1)
        self.topic_order.catch_up()

    # -- broker handler (traffic from other instances) --------------------------------

    def on_node_frame(self, node_id: str, frame: bytes, qos: int, mid: str) -> None:
        s = self.local.get(node_id)
        if s is None:
            return
        if qos == 1:
            s.push_q1(mid, frame)
        else:
            s.push(frame)

    def on_topic_frame(self, topic: str, seq: int, frame: bytes) -> None:
        # The sender is on another instance (one session per node): nobody to exclude.
        self.topic_order.deliver(topic, seq, frame, None)

    def on_presence(self, node_id: str, online: bool, ts: int, topic: str | None) -> None:
        """A §6.1 event from another instance, for the watchers here."""
        self.presence_watch.on_remote(node_id, online, ts, topic)

    def on_control(self, node_id: str, command: str, session_id: str | None) -> None:
        s = self.local.get(node_id)
        if s is None or (session_id is not None and s.session_id == session_id):
            return
        if command == "replace":
            self.claims.on_replace(s, session_id)  # hub/claims.py: the newer one stays
        elif command == "kick":
            s.close(E.CLOSE_KICKED, "kicked", bye=encode_bye("kicked"))
        elif command == "ban":
            s.close(E.CLOSE_FORBIDDEN, "banned", bye=encode_bye("banned"))
        elif command == RESYNC_COMMAND:
            self.resync(s)
        elif command == WATCHED_COMMAND:  # §6.1: another instance watches this node
            self.presence_watch.watched_elsewhere(node_id)


def _remote_result(session: Session, fid: int | str | None, mid: str,
                   fut: asyncio.Future[bool]) -> None:
    """§5 QoS 0 across instances: `ok sent` if an instance held the node."""
    if session.state is not ACTIVE:
        return
    if fut.cancelled() or fut.exception() is not None:
        session.reply_error(fid, E.UNAVAILABLE, "broker unavailable")
    elif fut.result():
        session.reply_ok(fid, mid=mid, status="sent")
    else:
        session.reply_error(fid, E.NO_ROUTE, "node is offline")
