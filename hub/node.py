"""The process-wide hub object: configuration, store, broker, metrics, the local registry
(node id -> session, topic -> sessions) and every routing decision.

Cluster-wide delivery always goes through the methods here (local registry first, broker
second), never around them. `HubNode` is also the broker's handler for traffic from
other instances, and the target of operator actions (kick, ban, server-side send).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import deque
from functools import partial
from typing import Any

from hub.broker import Broker, BrokerUnavailable, MemoryBroker
from hub.config import Config, effective_limits
from hub.forwarded import TrustedProxies
from hub.metrics import Metrics
from hub.ratelimit import IpLimiter
from hub.session import ACTIVE, AUTH, CLOSING, Session
from persistence.store import Store, StoreUnavailable
from protocol import errors as E
from protocol.frames import (
    DecodeLimits,
    Hello,
    encode_bye,
    encode_error,
    encode_msg,
    encode_receipt,
    encode_topic_msg,
    encode_welcome,
)
from protocol.handshake import Authenticated, ServerHandshake
from protocol.ids import MidGenerator
from protocol.tokens import TokenVerifier

__all__ = ["ADMIN_SENDER", "HubNode"]

log = logging.getLogger("openred.hub")

MEMORY_SEQ_TOPICS = 100_000  # topic sequences cached by the memory broker
ADMIN_SENDER = "$admin"  # §4: outside the node id alphabet, so no node can claim it
# Broker control command: "read this node's stored QoS 1 queue again" (HubNode.resync).
# An instance that does not know it ignores it (on_control).
RESYNC = "resync"
UNACKED_TRACKED = 10_000
MAX_UNREACHED = 100_000  # recipients remembered for a resync hint (memory bound)
HINT_CHUNK = 1000  # resync hints queued per loop turn (one broker pipeline each)


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
        self.loop = asyncio.get_running_loop()
        self.instance_id = cfg.server.instance_id
        self.clustered = not cfg.broker.url.startswith("memory:")
        self.allowlist = cfg.auth.mode == "allowlist"
        self.send_queue_max = cfg.limits.send_queue_max
        # QoS 1 mids a session remembers as written and unacked (Session._in_flight):
        # no more than a node may have pending, and never more than UNACKED_TRACKED, so
        # a node that never acks costs at most about 1 MB here.
        self.max_unacked = min(cfg.limits.max_pending_per_node, UNACKED_TRACKED)
        self.message_ttl_s = cfg.store.message_ttl_s
        self.verify_body_sig = cfg.auth.verify_body_sig
        self.decode_limits = DecodeLimits(max_body_bytes=cfg.limits.max_body_bytes)
        self.welcome_limits = effective_limits(cfg)
        self.ip_limiter = IpLimiter(cfg.limits.handshakes_per_s, cfg.limits.burst)
        self.trusted_proxies = TrustedProxies(cfg.server.trusted_proxies)
        self.ws_extensions: list[Any] | None = None
        if cfg.server.compression:
            from websockets.extensions.permessage_deflate import (
                ServerPerMessageDeflateFactory,
            )

            self.ws_extensions = [ServerPerMessageDeflateFactory()]
        self.mid = MidGenerator()
        self.connections: set[Session] = set()
        self.local: dict[str, Session] = {}
        self.topics: dict[str, set[Session]] = {}
        self.accepting = True
        self._all_closed: asyncio.Event | None = None
        self._route_n = 0
        self._dirty: list[Session] = []
        self._dirty_scheduled = False
        self._interest: dict[str, asyncio.Future[Any]] = {}
        self._housekeeping: asyncio.Task[None] | None = None
        self._bg: set[asyncio.Task[Any]] = set()
        # Sessions waiting to read their stored queue again, and how many read now: at
        # most half the store's pool, the rest stays for live traffic.
        self._resync_wait: deque[Session] = deque()
        self._resync_queued: set[Session] = set()
        self._resync_running = 0
        self._resync_limit = max(1, cfg.store.pool_size // 2)
        # Recipients of QoS 1 that this instance stored but could not hand to the
        # broker: when it is back, their holders are told to resync.
        self._unreached: set[str] = set()
        self._hinting = False

    # -- lifecycle ----------------------------------------------------------------

    def new_session(self) -> Session:
        return Session(self)

    def connection_closed(self, session: Session) -> None:
        self.connections.discard(session)
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()

    def new_handshake(self) -> ServerHandshake:
        return ServerHandshake(self.cfg.server.hub_id, self.verifier)

    def start(self) -> None:
        self._housekeeping = self.loop.create_task(self._housekeep())

    def background(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def shutdown(self, grace_s: float) -> None:
        """§7 graceful shutdown: say bye (retry_ms), close 1012, let in-flight store
        writes finish within the grace period (nothing accepted is lost)."""
        self.accepting = False
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        retry_ms = 1000 + int.from_bytes(os.urandom(2), "big") % 4000
        bye = encode_bye("shutdown", retry_ms)
        # Stop reading first, so that what was accepted gets its `ok` before the bye.
        inflight: list[asyncio.Task[Any]] = []
        for s in list(self.connections):
            if s.transport is not None:
                s.transport.pause_reading()
            inflight.extend(t for t in s._tasks if not t.done())
        if inflight:
            await asyncio.wait(inflight, timeout=grace_s)
        for s in list(self.connections):
            s.close(E.CLOSE_RESTART, "restart", bye=bye)
            if s.transport is not None:
                s.transport.resume_reading()  # to read the peer's close frame (§7)
        if self.connections:
            self._all_closed = asyncio.Event()
            try:
                await asyncio.wait_for(self._all_closed.wait(), min(grace_s, 2.0))
            except TimeoutError:
                pass
        for s in list(self.connections):
            if s.transport is not None:
                s.transport.abort()

    async def _housekeep(self) -> None:
        """Once a second: pings every hb, idle close after 3 x hb (§7); every minute:
        purge expired messages."""
        hb = self.cfg.limits.hb_s
        idle = 3 * hb
        tick = 0
        while True:
            await asyncio.sleep(1.0)
            tick += 1
            now = self.loop.time()
            for s in list(self.connections):
                if s.state != ACTIVE:
                    continue
                if now - s.last_rx > idle:
                    s.close(E.CLOSE_IDLE, "idle timeout")
                elif now - s.last_ping >= hb:
                    s.last_ping = now
                    s.send_ping()
            if self._unreached and not self._hinting:
                self.background(self._send_resync_hints())
            if tick % 60 == 0:
                try:
                    await self.store.purge_expired(_now_ms())
                    if isinstance(self.broker, MemoryBroker):
                        await self.broker.trim(MEMORY_SEQ_TOPICS)
                except StoreUnavailable:
                    pass
                except Exception:  # housekeeping must outlive any one failure
                    log.exception("housekeeping failed", extra={"event": "housekeeping_failed"})

    # -- handshake (§2) -------------------------------------------------------------

    def auth_refused(self, session: Session, reason: str, code: str = E.AUTH_FAILED,
                     close_code: int = E.CLOSE_AUTH_FAILED, node: str | None = None) -> None:
        m = self.metrics
        m.handshakes["failed" if code == E.AUTH_FAILED else code] += 1
        if code == E.AUTH_FAILED:
            m.auth_failures[_reason_label(reason)] += 1
        self.store.audit_nowait("auth_failed" if code == E.AUTH_FAILED else "auth_refused",
                                node, session.ip, {"reason": reason, "code": code}, _now_ms())
        msg = "authentication failed" if code == E.AUTH_FAILED else reason
        session.close(close_code, code, error=encode_error(None, code, msg))

    async def authenticate(self, session: Session, hello: Hello) -> None:
        try:
            auth = session._handshake.check(hello)
        except E.HandshakeError as exc:
            self.auth_refused(session, exc.reason)
            return
        node_id = auth.node_id
        now = _now_ms()
        session_id = self.mid(now)
        # Register first, check bans after: a ban committed after our read below finds
        # this session in the registry, so no ban can slip between check and register.
        # The node proved its identity already; replacing its old session is its right.
        old = self.local.get(node_id)
        if old is not None and old is not session:
            old.close(E.CLOSE_REPLACED, "replaced", bye=encode_bye("replaced"))
        session.register(node_id, session_id)
        self.local[node_id] = session
        self.metrics.connections += 1
        if self.clustered:
            try:  # before welcome: from welcome on, other instances can reach the node
                await self.broker.claim(node_id, session_id)
            except Exception:
                log.warning("broker claim failed", extra={"event": "claim_failed"})
        try:
            rec = await self.store.get_node(node_id)
            if session.state != AUTH:  # the peer went away while we waited
                return
            if rec is not None and rec.banned:
                self.auth_refused(session, "banned", E.FORBIDDEN, E.CLOSE_FORBIDDEN, node_id)
                return
            if self.allowlist and (rec is None or not rec.registered):
                self.auth_refused(session, "not registered", E.FORBIDDEN, E.CLOSE_FORBIDDEN,
                                  node_id)
                return
            await self.store.node_seen(node_id, hello.key, hello.meta, now)
            pending = await self.store.count_pending(node_id, now)
        except StoreUnavailable:
            self.metrics.handshakes["unavailable"] += 1
            session.close(E.CLOSE_INTERNAL, "store unavailable",
                          error=encode_error(None, E.UNAVAILABLE, "store unavailable"))
            return
        if session.state != AUTH:
            return
        if auth.key is None and rec is not None and rec.key is not None:
            # A token-authenticated node whose operator registered a key: the key is
            # still what body signatures are checked against (auth.verify_body_sig).
            auth = Authenticated(auth.node_id, rec.key, auth.topics, auth.batch, auth.meta,
                                 auth.method)
        self.metrics.handshakes["ok"] += 1
        self.store.audit_nowait("auth_ok", node_id, session.ip, {"method": auth.method}, now)
        session.activate(auth, encode_welcome(node_id, session_id, self.cfg.limits.hb_s,
                                              pending, self.welcome_limits))
        # Replay even when `pending` was 0: with a concurrent store a message may have
        # been stored between the count and the registration above.
        await session.replay_queue()

    def detach(self, session: Session) -> None:
        node_id = session.node_id
        if self.local.get(node_id) is session:
            del self.local[node_id]
            if self.clustered:
                self.background(self.broker.release(node_id, session.session_id))
        self.metrics.connections -= 1
        for topic in session.topics:
            self._drop_subscriber(session, topic)

    # -- routing ------------------------------------------------------------------

    async def publish_to_node(self, node_id: str, frame: bytes, qos: int, mid: str) -> bool:
        t0 = time.perf_counter()
        ok = await self.broker.publish_to_node(node_id, frame, qos, mid)
        self.metrics.broker_publish_seconds.observe(time.perf_counter() - t0)
        self.metrics.routed["remote" if ok else "dropped"] += 1
        return ok

    async def deliver_q1(self, node_id: str, mid: str, frame: bytes) -> None:
        """A stored QoS 1 message: push it to the recipient's session wherever it is;
        if none, it waits in the store for the next session."""
        target = self.local.get(node_id)
        if target is not None:
            self.metrics.routed["local"] += 1
            target.push_q1(mid, frame)
            return
        if self.clustered:
            if node_id in self._unreached:
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
                self._note_unreached(node_id)
            except Exception:
                pass  # stored: delivered on the node's next session
        self.metrics.routed["queued"] += 1

    def _note_unreached(self, node_id: str) -> None:
        if len(self._unreached) < MAX_UNREACHED:
            self._unreached.add(node_id)
        elif node_id not in self._unreached:
            # Past the bound, the node gets it at its next session (or when its own
            # instance sees the broker come back), as before resync hints existed.
            log.debug("resync hint dropped", extra={"event": "resync_hint_dropped"})

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
        from persistence.store import StoredMessage

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
            if self.clustered:
                pending = asyncio.ensure_future(self.broker.interest(topic, True))
                self._interest[topic] = pending
                pending.add_done_callback(partial(self._interest_done, topic))
        subs.add(session)
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
        if subs is None:
            return
        subs.discard(session)
        if not subs:
            del self.topics[topic]
            if self.clustered:
                self.background(self.broker.interest(topic, False))

    async def publish(self, session: Session | None, fid: int | str | None, topic: str,
                      body: bytes, sender: str | None = None) -> tuple[str, int] | None:
        """Sequence, keep in history, fan out (local, then other instances)."""
        from persistence.store import HistoryEntry

        sender = sender if sender is not None else session.node_id if session else ADMIN_SENDER
        try:
            seq = await self.broker.next_seq(topic)
        except Exception:
            if session is not None:
                session.reply_error(fid, E.UNAVAILABLE, "broker unavailable")
            return None
        ts = _now_ms()
        mid = self.mid(ts)
        keep = self.cfg.store.topic_history
        try:
            await self.store.append_history(
                HistoryEntry(topic, seq, mid, sender, body, ts), keep,
                self.cfg.store.topic_history_ttl_s * 1000)
        except StoreUnavailable:
            if keep > 0:
                # §5 recovery promises what history holds; a message it cannot hold is
                # refused rather than sent around it.
                if session is not None:
                    session.reply_error(fid, E.UNAVAILABLE, "history store unavailable")
                return None
        frame = encode_topic_msg(mid, sender, topic, seq, body, ts)
        self.fanout(topic, seq, frame, session)
        if self.clustered:
            try:
                await self.broker.publish_to_topic(topic, seq, frame)
            except Exception:
                log.warning("topic publish to broker failed",
                            extra={"event": "broker_publish_failed"})
        if session is not None:
            session.reply_ok(fid, mid=mid, seq=seq)
        return mid, seq

    def mark_dirty(self, session: Session) -> None:
        """A session has frames to write: all such sessions are flushed by one callback
        at the end of this loop iteration (a fan-out to 10,000 sessions schedules one
        callback, not 10,000)."""
        self._dirty.append(session)
        if not self._dirty_scheduled:
            self._dirty_scheduled = True
            self.loop.call_soon(self._flush_dirty)

    def _flush_dirty(self) -> None:
        self._dirty_scheduled = False
        dirty, self._dirty = self._dirty, []
        for s in dirty:
            s._flush()

    def sample_route(self, rx_time: float) -> None:
        """route_seconds: one message in 256 is timed from its read to the write of
        this loop iteration (the flush is scheduled before this callback)."""
        self._route_n += 1
        if not self._route_n & 255:
            self.loop.call_soon(self._observe_route, rx_time)

    def _observe_route(self, rx_time: float) -> None:
        self.metrics.route_seconds.observe(self.loop.time() - rx_time)

    def fanout(self, topic: str, seq: int, frame: bytes, exclude: Session | None) -> None:
        subs = self.topics.get(topic)
        if not subs:
            return
        if exclude is not None:
            self.sample_route(exclude.rx_time)
        n = 0
        # A copy: push_topic may drop a slow consumer, which leaves `subs` (§7).
        for s in tuple(subs):
            if s is not exclude:
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
        if s is None or s.state >= CLOSING:
            return False
        s.close(code, reason, bye=encode_bye(reason))
        return True

    # -- QoS 1 after a broker outage ----------------------------------------------------

    def resync(self, session: Session) -> None:
        """Have a session read its stored QoS 1 queue again and get what it has not got
        in flight. Sessions take turns: at most `_resync_limit` read the store at once,
        so 10,000 sessions do not fire 10,000 queries when the broker comes back."""
        if session in self._resync_queued or not session.request_resync():
            return
        self._resync_queued.add(session)
        self._resync_wait.append(session)
        self._next_resyncs()

    def _next_resyncs(self) -> None:
        while self._resync_wait and self._resync_running < self._resync_limit:
            session = self._resync_wait.popleft()
            self._resync_queued.discard(session)
            task = session.start_resync()
            if task is not None:
                self._resync_running += 1
                task.add_done_callback(self._resync_done)

    def _resync_done(self, _task: asyncio.Task[Any]) -> None:
        self._resync_running -= 1
        self._next_resyncs()

    def on_broker_up(self) -> None:
        """The broker is reachable again (hub/broker.py). QoS 1 messages stored while it
        was not, for nodes online on some instance, were never brought to them: every
        local session reads its queue again, and the holders of nodes this instance
        could not reach are told to do the same (their instance may not have seen the
        broker go away at all)."""
        try:
            for s in list(self.local.values()):
                self.resync(s)
            if self._unreached and not self._hinting:
                self.background(self._send_resync_hints())
        except Exception:  # called from the broker's reader: never break it
            log.exception("resync after broker outage failed",
                          extra={"event": "resync_failed"})

    async def _send_resync_hints(self) -> None:
        """Tell the holders of the unreached nodes to resync them, a chunk at a time
        (the hints of one chunk share a broker round trip). Stops when the broker
        refuses a whole chunk; on_broker_up or housekeeping (every second, for a broker
        that refused while it was up, e.g. its backlog full) starts it again."""
        if self._hinting:
            return
        self._hinting = True
        try:
            while self._unreached:
                chunk = list(itertools.islice(self._unreached, HINT_CHUNK))
                sent = await asyncio.gather(*(self._send_resync_hint(n) for n in chunk))
                if not any(sent):
                    return
        finally:
            self._hinting = False

    async def _send_resync_hint(self, node_id: str) -> bool:
        # Forgotten in the same step as the hint is queued: a message routed after this
        # goes through the broker behind the hint (§4 order); one routed before was
        # stored before, so the holder's read finds it.
        self._unreached.discard(node_id)
        try:
            await self.broker.control(node_id, RESYNC)
        except Exception:
            self._note_unreached(node_id)
            return False
        return True

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
        self.fanout(topic, seq, frame, None)

    def on_control(self, node_id: str, command: str, session_id: str | None) -> None:
        s = self.local.get(node_id)
        if s is None or (session_id is not None and s.session_id == session_id):
            return
        if command == "replace":
            s.close(E.CLOSE_REPLACED, "replaced", bye=encode_bye("replaced"))
        elif command == "kick":
            s.close(E.CLOSE_KICKED, "kicked", bye=encode_bye("kicked"))
        elif command == "ban":
            s.close(E.CLOSE_FORBIDDEN, "banned", bye=encode_bye("banned"))
        elif command == RESYNC:
            self.resync(s)


def _reason_label(reason: str) -> str:
    """Bounded label values for auth_failures_total{reason}."""
    from protocol.tokens import TOKEN_ERROR_REASONS

    if reason in TOKEN_ERROR_REASONS:
        return reason
    if reason == "bad_signature" or reason.startswith(("sig", "key")):
        return "bad_signature"
    return "bad_hello"
