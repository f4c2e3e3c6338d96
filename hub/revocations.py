"""Revoked node tokens, checked at every JWT handshake (docs/protocol.md §2.4): a token
is refused (`auth_failed`, 4001) when its `jti` is revoked, or when its node's tokens
issued before some time are revoked and its `iat` (ms) is earlier (a token without
`iat` counts as issued before any such time).

Owned here: `Revocations`, this instance's copy of the list. The store holds it durably
(`Store.add_revocation`, migration 0002); every instance keeps it in memory, so the
check itself costs two dict look-ups and no I/O. Keeping the copies current:

- the instance that revokes writes the store, updates its own copy at once, then bumps
  a version counter in Redis (`<prefix>revocations`);
- with the Redis broker every instance reads that counter every `poll_s` (0.25 s) and,
  when it moved, reads the rows added since its last one from the store (`id` order;
  the store guarantees none is skipped). A revocation on one instance thus holds on all
  within `poll_s` plus one store read: well under the one second docs/protocol.md
  promises. While Redis is unreachable the store itself is read every `store_poll_s`
  (1 s), and every `full_poll_s` (30 s) regardless, should a counter bump be lost.
- with the memory broker there is one instance: its copy is the list.

Memory: one entry per revoked jti until its `expires`, one per node revoked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from openred.hub.broker import Broker, BrokerUnavailable
from openred.hub.broker_resp import RespError
from openred.persistence.store import Revocation, Store, StoreError

__all__ = ["JTI", "NEVER", "NODE", "Revocations"]

log = logging.getLogger("openred.hub.revocations")

JTI, NODE = "jti", "node"
NEVER = 2**63 - 1


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Revocations:
    poll_s = 0.25
    store_poll_s = 1.0
    full_poll_s = 30.0
    page = 10_000

    def __init__(self, store: Store, broker: Broker) -> None:
        self.store = store
        self._broker: Any = broker if getattr(broker, "shards", None) is not None else None
        self._key = f"{getattr(broker, 'prefix', '')}revocations"
        self._jti: dict[str, int] = {}  # jti -> expires (ms)
        self._nodes: dict[str, int] = {}  # node id -> tokens issued before this are out
        self._after = 0  # the highest row id read in order from the store
        self._version: Any = None
        self._task: asyncio.Task[None] | None = None
        self.loads = 0

    # -- the check (every JWT handshake) --------------------------------------------------

    def revoked(self, node_id: str, jti: str | None, iat: float | None) -> bool:
        if jti is not None:
            expires = self._jti.get(jti)
            if expires is not None and expires > _now_ms():
                return True
        before = self._nodes.get(node_id)
        return before is not None and (iat is None or round(iat * 1000) < before)

    # -- revoking ---------------------------------------------------------------------------

    async def revoke_jti(self, jti: str, expires_ms: int, now_ms: int) -> Revocation:
        return await self._add(JTI, jti, None, expires_ms, now_ms)

    async def revoke_node(self, node_id: str, before_ms: int, now_ms: int) -> Revocation:
        return await self._add(NODE, node_id, before_ms, NEVER, now_ms)

    async def _add(self, kind: str, subject: str, before: int | None, expires: int,
                   now_ms: int) -> Revocation:
        row = await self.store.add_revocation(kind, subject, before, expires, now_ms)
        self._apply(row)  # the cursor stays: rows of other instances may precede it
        if self._broker is not None:
            try:
                await self._broker.shards.call(self._key, "INCR", self._key)
            except (BrokerUnavailable, RespError, ConnectionError, OSError) as exc:
                # Stored all the same; the others read the store every full_poll_s,
                # and every store_poll_s while Redis is down.
                log.warning("revocation not announced", extra={
                    "event": "revocation_unannounced", "error": str(exc)})
        return row

    def _apply(self, row: Revocation) -> None:
        if row.kind == JTI:
            self._jti[row.subject] = max(row.expires, self._jti.get(row.subject, 0))
        elif row.kind == NODE and row.issued_before is not None:
            self._nodes[row.subject] = max(row.issued_before,
                                           self._nodes.get(row.subject, row.issued_before))

    # -- keeping the copy current --------------------------------------------------------------

    async def start(self) -> None:
        """Read the whole list (the store is open); with Redis, start following it."""
        await self.load()
        if self._broker is not None:
            self._task = asyncio.get_running_loop().create_task(self._follow())

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def load(self) -> int:
        """Read the rows added since the last one read; return how many."""
        now = _now_ms()
        total = 0
        while True:
            rows = await self.store.revocations_since(self._after, now, self.page)
            for row in rows:
                self._apply(row)
                self._after = max(self._after, row.id)
            total += len(rows)
            if len(rows) < self.page:
                break
        self.loads += 1
        expired = [j for j, exp in self._jti.items() if exp <= now]
        for j in expired:
            del self._jti[j]
        return total

    async def _follow(self) -> None:
        loop = asyncio.get_running_loop()
        last_store = last_full = loop.time()
        while True:
            await asyncio.sleep(self.poll_s)
            now = loop.time()
            try:
                if self._broker.up:
                    version = await self._broker.shards.call(self._key, "GET", self._key)
                    if version != self._version or now - last_full >= self.full_poll_s:
                        await self.load()
                        self._version = version
                        last_store = last_full = now
                elif now - last_store >= self.store_poll_s:
                    await self.load()
                    last_store = now
            except (BrokerUnavailable, RespError, StoreError, ConnectionError, OSError) as exc:
                log.debug("revocations not refreshed", extra={
                    "event": "revocations_stale", "error": str(exc) or type(exc).__name__})
            except Exception:  # the follower must outlive any one failure
                log.exception("revocations refresh failed",
                              extra={"event": "revocations_refresh_failed"})
