"""One session per node cluster wide, also after a partition (docs/protocol.md §2):
`Claims`, owned by the `HubNode`.

A session claims its node through the broker before its welcome (hub/admission.py), and
the previous holder, wherever it lives, closes with `bye replaced` and 4010. When the
broker cannot take the claim (down, or the call failed), the session goes on locally and
its claim stays *unconfirmed*: another instance may still hold an older session of the
node that nobody told to close (its link went silent, or it was cut off too). This
module makes such claims hold once the broker can carry them:
- every unconfirmed claim is re-asserted (`Broker.reassert`) when the broker comes back,
  and retried (RETRY_MIN_S doubling to RETRY_MAX_S) while it is up but refuses;
- on every broker "up", every local session is re-asserted too: what the broker knew
  may be gone (a restarted Redis keeps no owner records) or may have changed while this
  instance was cut off (a newer session elsewhere whose `replace` never reached us);
- a re-assert keeps the newer session by claim time (the session id starts with it):
  the older one is closed with `bye replaced` and 4010, here (the answer names another
  owner) or on its instance (the broker's `replace`);
- a `replace` that reaches an unconfirmed session does not close it outright: it is
  re-asserted, and the answer decides (the claimant may be the older of the two).
A session closed as replaced that had QoS 1 messages in flight (written, not acked:
perhaps into a link that went silent) has its node's holder told to read the stored
queue again (hub/resync.py), so those messages reach the live session now rather than
at its next one.

Claim times come from each instance's clock: instances should keep their clocks in
step (NTP), as a re-assert between two sessions created within the clocks' offset may
keep the one created first.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from openred.hub.broker import BrokerUnavailable
from openred.hub.resync import RESYNC_COMMAND
from openred.protocol import errors as E
from openred.protocol.frames import encode_bye

if TYPE_CHECKING:
    from openred.hub.node import HubNode
    from openred.hub.session import Session

__all__ = ["Claims"]

log = logging.getLogger("openred.hub")

REASSERT_CHUNK = 1000  # claims re-asserted per broker round trip
RETRY_MIN_S = 1.0  # first wait before a refused re-assert is tried again
RETRY_MAX_S = 10.0


class Claims:
    def __init__(self, hub: HubNode) -> None:
        self.hub = hub
        self.unconfirmed: dict[str, Session] = {}  # node id -> its local session
        self._inflight: set[Session] = set()  # re-asserts waiting for their answer
        self._recheck: set[Session] = set()  # told to replace while in flight: again
        self._running = False
        self._again = False
        self._retry_at = 0.0  # loop time
        self._retry_s = RETRY_MIN_S

    # -- the claim at the handshake -------------------------------------------------------

    async def claim(self, session: Session) -> None:
        """Claim the session's node before its welcome; when the broker cannot take it,
        the session goes on and its claim is re-asserted later."""
        try:
            await self.hub.broker.claim(session.node_id, session.session_id)
        except Exception as exc:
            self.unconfirmed[session.node_id] = session
            log.warning("broker claim failed; asserted again when the broker is back",
                        extra={"event": "claim_failed", "error": str(exc) or type(exc).__name__})

    def forget(self, session: Session) -> None:
        """The session left the local registry (hub/node.py `detach`)."""
        if self.unconfirmed.get(session.node_id) is session:
            del self.unconfirmed[session.node_id]
        self._recheck.discard(session)

    # -- re-asserting -------------------------------------------------------------------

    def on_broker_up(self) -> None:
        """Every local session is re-asserted (called from the broker's task: never
        raises)."""
        try:
            for session in self.hub.local.values():
                self.unconfirmed[session.node_id] = session
            self._retry_s = RETRY_MIN_S
            self._start()
        except Exception:
            log.exception("claims after broker outage failed", extra={"event": "claim_failed"})

    def retry_if_due(self) -> None:
        """Once a second (housekeeping): retry unconfirmed claims while the broker is up."""
        if (self.unconfirmed and not self._running and self._broker_up()
                and self.hub.loop.time() >= self._retry_at):
            self._start()

    def _broker_up(self) -> bool:
        return bool(getattr(self.hub.broker, "up", True))

    def _start(self) -> None:
        if self._running:
            self._again = True
            return
        self._running = True
        self.hub.background(self._run())

    async def _run(self) -> None:
        ok = True
        try:
            while True:
                self._again = False
                ok = await self._reassert_all()
                if not (ok and self._again):
                    break
        except Exception:
            ok = False
            log.exception("claim re-assert failed", extra={"event": "claim_failed"})
        finally:
            self._running = False
            now = self.hub.loop.time()
            if ok and not self.unconfirmed:
                self._retry_s = RETRY_MIN_S
            else:
                self._retry_at = now + self._retry_s
                self._retry_s = min(self._retry_s * 2, RETRY_MAX_S)

    async def _reassert_all(self) -> bool:
        """Re-assert every unconfirmed claim; False when the broker refused some."""
        hub = self.hub
        pending = list(self.unconfirmed.values())
        for i in range(0, len(pending), REASSERT_CHUNK):
            chunk = [s for s in pending[i:i + REASSERT_CHUNK]
                     if s.registered and hub.local.get(s.node_id) is s]
            if not chunk:
                continue
            self._inflight.update(chunk)
            try:
                owners = await hub.broker.reassert([(s.node_id, s.session_id) for s in chunk])
            except BrokerUnavailable:
                return False
            finally:
                self._inflight.difference_update(chunk)
            refused = False
            for session, owner in zip(chunk, owners, strict=True):
                if owner is None:
                    refused = True
                    continue
                if owner == session.session_id and session in self._recheck:
                    # A replace came meanwhile: the claimant may have won after this
                    # answer was made. Once more.
                    self._recheck.discard(session)
                    self._again = True
                    continue
                if self.unconfirmed.get(session.node_id) is session:
                    del self.unconfirmed[session.node_id]
                if owner != session.session_id and hub.local.get(session.node_id) is session:
                    self.close_replaced(session)
            if refused:
                return False
        return True

    # -- replace ---------------------------------------------------------------------------

    def on_replace(self, session: Session, owner: str | None) -> None:
        """Another instance claimed the node (`owner`: the owner the broker records now,
        or the claimant's session). An unconfirmed session is re-asserted instead of
        closed: of the two, the newer stays."""
        if owner is not None and owner == session.session_id:
            return
        if self.unconfirmed.get(session.node_id) is session or session in self._inflight:
            self.unconfirmed[session.node_id] = session
            if session in self._inflight:
                self._recheck.add(session)
            self._start()
            return
        self.close_replaced(session)

    def close_replaced(self, session: Session) -> None:
        """§2: `bye replaced` and 4010; QoS 1 messages it had in flight go to the node's
        holder now (a resync hint), not at the node's next session."""
        inbox = session.inbox
        in_flight = inbox is not None and not inbox.idle
        self.hub.presence_watch.replaced(session)  # §6.1: no presence change
        session.close(E.CLOSE_REPLACED, "replaced", bye=encode_bye("replaced"))
        log.info("session replaced", extra={"event": "session_replaced",
                                            "in_flight": in_flight})
        if in_flight and self.hub.clustered:
            self.hub.background(self._hint_holder(session.node_id))

    async def _hint_holder(self, node_id: str) -> None:
        try:
            await self.hub.broker.control(node_id, RESYNC_COMMAND)
        except Exception:
            # The broker went away again: the hint waits with the others (hub/resync.py).
            self.hub.resyncs.note_unreached(node_id)
