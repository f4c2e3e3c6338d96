"""Who gets in: `Admission` decides at the TCP connect, at the HTTP upgrade and at the
hello (docs/protocol.md §1, §2, §8).

- At the connect: the instance's connection cap (`limits.max_connections`, 503) and the
  per-IP cap (`limits.max_connections_per_ip`, 429). Connections count from the TCP
  connect, upgraded or not, so connections that never finish their upgrade count too.
- At the upgrade: behind a trusted proxy the client IP it names (hub/forwarded.py) is
  counted instead; the per-IP handshake bucket (rate and burst both
  `limits.handshakes_per_s`, 429), checked before any signature; the `Origin` check
  (`server.allowed_origins`, 403).
- At the hello: the node handshake itself (`authenticate`), registration in the local
  registry (and the cluster claim), bans and the allowlist, the welcome.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from typing import TYPE_CHECKING

import msgpack
from openred.hub.handshake import Authenticated
from openred.hub.ratelimit import Rate
from openred.hub.ratelimit_shared import HandshakeLimiter, SharedLimiter
from openred.hub.revocations import Revocations
from openred.hub.tokens import MAX_TOKEN_CHARS, TOKEN_ERROR_REASONS
from openred.persistence.store import StoreUnavailable
from openred.protocol import errors as E
from openred.protocol.errors import FrameError
from openred.protocol.frames import Hello, encode_bye, encode_error, encode_welcome
from openred.protocol.identity import PUBLIC_KEY_BYTES, is_node_id
from openred.protocol.ids import mid_time_ms

if TYPE_CHECKING:
    from openred.hub.node import HubNode
    from openred.hub.session import Session
    from openred.hub.transport import Connection
    from websockets.http11 import Request

__all__ = ["Admission"]

log = logging.getLogger("openred.hub.admission")

Refusal = tuple[int, str]  # HTTP status and body of a refused upgrade


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Admission:
    def __init__(self, hub: HubNode) -> None:
        cfg = hub.cfg
        self.hub = hub
        self.max_connections = cfg.limits.max_connections
        self.max_per_ip = cfg.limits.max_connections_per_ip
        # docs/protocol.md §8: the bucket's burst is its rate, not limits.burst (the
        # per-session frame burst, 2,000 by default, would let a burst of 2,000
        # handshakes through).
        # With the Redis broker the bucket is shared by every instance
        # (hub/ratelimit_shared.py: local decision, reconciled through Redis).
        hs = cfg.limits.handshakes_per_s
        self.ip_limiter = HandshakeLimiter(Rate(hs, hs), SharedLimiter(hub.broker))
        # docs/protocol.md §2.4: revoked tokens, checked at every JWT handshake.
        self.revocations = Revocations(hub.store, hub.broker)
        self.trusted_proxies = hub.trusted_proxies
        origins = cfg.server.allowed_origins
        self.any_origin = "*" in origins
        self.origins = frozenset(origins)
        self.per_ip: dict[str, int] = {}  # open connections per counted IP

    # -- connect and upgrade ------------------------------------------------------------

    def on_connect(self, conn: Connection) -> Refusal | None:
        metrics = self.hub.metrics
        if len(self.hub.connections) > self.max_connections:
            metrics.handshakes["too_many_connections"] += 1
            return 503, "too many connections\n"
        if self.trusted_proxies and self.trusted_proxies.trusts(conn.ip):
            return None  # counted by the client IP the proxy names, at the upgrade
        return self._count(conn, conn.ip)

    def _count(self, conn: Connection, ip: str) -> Refusal | None:
        n = self.per_ip.get(ip, 0)
        if self.max_per_ip and n >= self.max_per_ip:
            self.hub.metrics.handshakes["too_many_connections_per_ip"] += 1
            return 429, "too many connections from this address\n"
        self.per_ip[ip] = n + 1
        conn.counted_ip = ip
        return None

    def on_disconnect(self, conn: Connection) -> None:
        ip = conn.counted_ip
        if ip is None:
            return
        conn.counted_ip = None
        n = self.per_ip.get(ip, 0) - 1
        if n > 0:
            self.per_ip[ip] = n
        else:
            self.per_ip.pop(ip, None)

    def on_request(self, conn: Connection, request: Request) -> Refusal | None:
        hub = self.hub
        if self.trusted_proxies and conn.counted_ip is None:
            # Behind a trusted proxy the peer is the proxy: limit and audit the client
            # it names, never a header from anyone else.
            conn.ip = self.trusted_proxies.client_ip(
                conn.ip, request.headers.get_all("X-Forwarded-For"))
            refusal = self._count(conn, conn.ip)
            if refusal is not None:
                return refusal
        if not self.ip_limiter.allow(conn.ip, hub.loop.time()):
            hub.metrics.handshakes["rate_limited"] += 1
            return 429, "Too Many Requests\n"
        origins = request.headers.get_all("Origin")
        if len(origins) > 1:  # RFC 6454 §7.3: one Origin; two is not a browser's request
            hub.metrics.handshakes["origin_refused"] += 1
            return 400, "more than one Origin header\n"
        if origins and not self.origin_allowed(origins[0]):
            # docs/protocol.md §1: a browser page from a site not listed must not reach
            # a hub (in open mode it could authenticate with a fresh key and read).
            hub.metrics.handshakes["origin_refused"] += 1
            return 403, "origin not allowed\n"
        return None

    def origin_allowed(self, origin: str) -> bool:
        return self.any_origin or origin.strip().lower().rstrip("/") in self.origins

    # -- the node handshake ---------------------------------------------------------------

    def refuse(self, session: Session, reason: str, code: str = E.AUTH_FAILED,
               close_code: int = E.CLOSE_AUTH_FAILED, node: str | None = None) -> None:
        """`node`: the node id proved, or (auth_failed) only claimed by the hello,
        unverified (README.md: `?node=` then finds attempts against a node)."""
        hub = self.hub
        m = hub.metrics
        m.handshakes["failed" if code == E.AUTH_FAILED else code] += 1
        if code == E.AUTH_FAILED:
            m.auth_failures[_reason_label(reason)] += 1
            log.info("node authentication failed", extra={
                "event": "auth_failed", "node": node, "ip": session.ip, "reason": reason})
        hub.store.audit_nowait("auth_failed" if code == E.AUTH_FAILED else "auth_refused",
                               node, session.ip, {"reason": reason, "code": code}, _now_ms())
        msg = "authentication failed" if code == E.AUTH_FAILED else reason
        session.close(close_code, code, error=encode_error(None, code, msg))

    def refuse_hello(self, session: Session, error: FrameError, data: bytes = b"") -> None:
        """A hello that does not decode as one. A `meta` that is not JSON-representable
        (docs/protocol.md §2) is the node's own data, not a credential: `bad_frame`,
        named. Any other flaw, a meta over 4 KiB included, is a refusal, `auth_failed`
        (§2: whatever the reason)."""
        if error.code == E.BAD_FRAME and error.msg.startswith("meta"):
            self.hub.metrics.handshakes["bad_frame"] += 1
            session.close(E.CLOSE_AUTH_FAILED, "bad hello",
                          error=encode_error(error.id, E.BAD_FRAME, error.msg))
            return
        self.refuse(session, error.msg, node=_claimed_in(data))

    async def authenticate(self, session: Session, hello: Hello) -> None:
        """Check the hello; register, claim and welcome the node, then replay its
        stored QoS 1 queue. Any failure of the store or the broker ends the handshake
        with an error frame and a close, never a hang."""
        try:
            await self._authenticate(session, hello)
        except Exception:
            log.exception("handshake failed", extra={"event": "handshake_failed"})
            self.hub.metrics.handshakes["internal"] += 1
            session.close(E.CLOSE_INTERNAL, "internal error",
                          error=encode_error(None, E.INTERNAL, "handshake failed"))

    async def _authenticate(self, session: Session, hello: Hello) -> None:
        from openred.hub.session import AUTH

        hub = self.hub
        if session.state is not AUTH:
            # Closed before this task ran (a frame after the hello, a slow consumer): it
            # must not register, nor replace the node's live session.
            return
        try:
            auth = session.handshake.check(hello)
        except E.HandshakeError as exc:
            self.refuse(session, exc.reason, node=claimed_node(hello.key, hello.token))
            return
        if auth.method == "token" and self.revocations.revoked(auth.node_id, auth.jti,
                                                               auth.iat):
            # docs/protocol.md §2.5: auth_failed, 4001
            self.refuse(session, "revoked", node=auth.node_id)
            return
        node_id = auth.node_id
        now = _now_ms()
        session_id = hub.mid(now)
        # Register first, check bans after: a ban committed after our read below finds
        # this session in the registry, so no ban can slip between check and register.
        # The node proved its identity already; replacing its old session is its right.
        old = hub.local.get(node_id)
        if old is not None and old is not session:
            hub.presence_watch.replaced(old)  # §6.1: a replace is no presence change
            old.close(E.CLOSE_REPLACED, "replaced", bye=encode_bye("replaced"))
        session.register(node_id, session_id)
        hub.attach(session)
        if hub.clustered:
            # Before welcome: from welcome on, other instances can reach the node. A
            # claim the broker cannot take now is asserted again later (hub/claims.py).
            await hub.claims.claim(session)
        store = hub.store
        try:
            # One group-committed call: the record as it was, `seen` unless banned (or
            # not registered, allowlist mode), and the count of what is queued.
            rec, pending = await store.session_start(node_id, hello.key, hello.meta, now,
                                                     registered_only=hub.allowlist)
        except StoreUnavailable:
            hub.metrics.handshakes["unavailable"] += 1
            session.close(E.CLOSE_INTERNAL, "store unavailable",
                          error=encode_error(None, E.UNAVAILABLE, "store unavailable"))
            return
        if session.state is not AUTH:  # the peer went away while we waited
            return
        if rec is not None and rec.banned:
            self.refuse(session, "banned", E.FORBIDDEN, E.CLOSE_FORBIDDEN, node_id)
            return
        if hub.allowlist and (rec is None or not rec.registered):
            self.refuse(session, "not registered", E.FORBIDDEN, E.CLOSE_FORBIDDEN, node_id)
            return
        if auth.key is None and rec is not None and rec.key is not None:
            # A token-authenticated node whose operator registered a key: the key is
            # still what body signatures are checked against (auth.verify_body_sig).
            auth = Authenticated(auth.node_id, rec.key, auth.topics, auth.batch, auth.meta,
                                 auth.method)
        hub.metrics.handshakes["ok"] += 1
        store.audit_nowait("auth_ok", node_id, session.ip, {"method": auth.method}, now)
        session.activate(auth, encode_welcome(node_id, session_id, hub.cfg.limits.hb_s,
                                              pending, hub.welcome_limits))
        hub.presence_watch.node_opened(session)  # §6.1: watchers learn it is online
        log.info("node connected", extra={
            "event": "node_connected", "node": node_id, "ip": session.ip,
            "session": session_id, "method": auth.method})
        # Replay even when `pending` was 0: with a concurrent store a message may have
        # been stored between the count and the registration above.
        await session.replay_queue()


    def disconnected(self, session: Session) -> None:
        """A welcomed session ends (hub/session.py `closing`): one info line, the pair of
        "node connected", with the close code sent or received (1006: none) and how
        long the session lasted."""
        session_id = session.session_id
        self.hub.presence_watch.node_closed(session)  # §6.1 (a replaced one is no change)
        log.info("node disconnected", extra={
            "event": "node_disconnected", "node": session.node_id, "ip": session.ip,
            "session": session_id, "close_code": session.conn.close_code,
            "duration_ms": max(0, _now_ms() - mid_time_ms(session_id))})


def claimed_node(key: object, token: object) -> str | None:
    """The node id a hello claims, unverified: its key's (hex), or its token's `sub`
    (read without checking the signature). None when it names none."""
    if isinstance(key, bytes) and len(key) == PUBLIC_KEY_BYTES:
        return key.hex()
    if isinstance(token, str) and len(token) <= MAX_TOKEN_CHARS and token.count(".") == 2:
        part = token.split(".")[1]
        try:
            claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
        except (ValueError, binascii.Error):
            return None
        sub = claims.get("sub") if isinstance(claims, dict) else None
        return sub if is_node_id(sub) else None
    return None


def _claimed_in(data: bytes) -> str | None:
    """`claimed_node` of a hello that did not validate (refuse_hello)."""
    try:
        v = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:
        return None
    if type(v) is list and v:
        v = v[0]
    return claimed_node(v.get("key"), v.get("token")) if type(v) is dict else None


def _reason_label(reason: str) -> str:
    """Bounded label values for auth_failures_total{reason}."""
    if reason in TOKEN_ERROR_REASONS:
        return reason
    if reason == "bad_signature" or reason.startswith(("sig", "key")):
        return "bad_signature"
    return "bad_hello"
