"""Rate limits shared by every instance (docs/protocol.md §8; README "Operator surface").

With the Redis broker a limit is one GCRA bucket per key in Redis: the key holds the
bucket's theoretical arrival time (microseconds of Redis' own clock, so instances need
not agree on the time), written with an expiry at the moment the bucket is full again,
so idle keys vanish by themselves. `_SCRIPT` checks one or several buckets atomically
(one EVALSHA, one round trip; the keys of one call share a hash slot on a Redis
Cluster). It computes what `hub.ratelimit.GcraTable` does, the in-process twin used with
the memory broker and whenever Redis is unreachable or slow: a limit then holds per
instance, never unlimited and never refusing everything.

Two users:

- `SharedLimiter.check(calls)` (async): the admin surface (admin_http/guard.py), one
  round trip per request.
- `HandshakeLimiter.allow(ip, now)` (sync): the upgrade path decides without waiting.
  Each instance keeps its own bucket per IP at the full rate (alone, it is the limit);
  what it admits is added to the shared bucket in Redis in the background (FORCE: all
  admissions of one loop turn in one pipeline), and when the shared bucket is in debt
  the IP is refused here until Redis says it is repaid. An IP that spreads over N
  instances gets at most the shared rate in the long run; the first burst may reach
  N x burst before the first answer comes back (one Redis round trip, well under a
  millisecond on a LAN), and that overdraft is then repaid before the IP is admitted
  again. Cost on the upgrade path: a few dict operations, under a microsecond with the
  reconciliation included (docs/benchmarks.md, "Shared limits and revocations").
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from openred.hub.broker import Broker, BrokerUnavailable
from openred.hub.broker_resp import RespError, command
from openred.hub.ratelimit import FORCE, Call, GcraTable, IpLimiter, Rate

__all__ = ["HandshakeLimiter", "SharedLimiter"]

log = logging.getLogger("openred.hub.ratelimit")

REDIS_TIMEOUT_S = 0.25  # a slower answer counts as "Redis unreachable": local limits
MAX_BLOCKED = 100_000

# KEYS: the buckets. ARGV, 4 per key: mode (p/t/f, hub.ratelimit), interval and
# tolerance (us), cost. Returns, per key, how far over its limit the call is (us, 0:
# within). PEEK/TAKE are all or nothing; FORCE is always written. string.format: a Lua
# number would be written as "%.14g", losing the microseconds.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local news, out, refused = {}, {}, false
for i = 1, #KEYS do
  local b = (i - 1) * 4
  local tat = tonumber(redis.call('GET', KEYS[i])) or 0
  if tat < now then tat = now end
  local new = tat + tonumber(ARGV[b + 4]) * tonumber(ARGV[b + 2])
  local over = new - now - tonumber(ARGV[b + 3])
  news[i] = new
  if over > 0 then
    out[i] = math.ceil(over)
    if ARGV[b + 1] ~= 'f' then refused = true end
  else
    out[i] = 0
  end
end
for i = 1, #KEYS do
  local mode = ARGV[(i - 1) * 4 + 1]
  if mode == 'f' or (mode == 't' and not refused) then
    local ttl = math.ceil((news[i] - now) / 1000)
    if ttl < 1 then ttl = 1 end
    redis.call('SET', KEYS[i], string.format('%.0f', news[i]), 'PX', ttl)
  end
end
return out
"""
_SHA = hashlib.sha1(_SCRIPT.encode()).hexdigest()


def _argv(calls: Sequence[Call]) -> list[str]:
    out: list[str] = []
    for _key, rate, cost, mode in calls:
        out += [mode, repr(rate.interval_us), repr(rate.tolerance_us), repr(float(cost))]
    return out


class SharedLimiter:
    """GCRA buckets in Redis (the Redis broker's connections), or in this process.

    `check(calls)` answers, per call, how many seconds it is over (0.0: within); see
    `GcraTable` for the modes. Keys are given without the hub's prefix. On a Redis
    Cluster the keys of one call must share a hash slot (a `{tag}` in them)."""

    def __init__(self, broker: Broker, *, max_keys: int = 100_000) -> None:
        shards = getattr(broker, "shards", None)
        prefix = getattr(broker, "prefix", None)
        self._broker: Any = broker if shards is not None and prefix is not None else None
        self.prefix = f"{prefix}rl:" if prefix is not None else "rl:"
        self.local = GcraTable(max_keys)
        self.fallbacks = 0  # calls answered locally because Redis was not
        self.redis_calls = 0

    @property
    def shared(self) -> bool:
        """Whether limits are meant to be cluster wide (the broker is Redis)."""
        return self._broker is not None

    @property
    def up(self) -> bool:
        return self._broker is not None and bool(getattr(self._broker, "up", False))

    async def check(self, calls: Sequence[Call]) -> list[float]:
        if self.up:
            try:
                async with asyncio.timeout(REDIS_TIMEOUT_S):
                    (reply,) = await self._eval([calls])
                self.redis_calls += 1
                return [int(v) / 1e6 for v in reply]
            except (BrokerUnavailable, RespError, ConnectionError, OSError, TimeoutError,
                    TypeError, ValueError) as exc:
                self.fallbacks += 1
                log.debug("shared limit answered locally", extra={
                    "event": "ratelimit_local", "error": str(exc) or type(exc).__name__})
        return self.local.check(calls, time.monotonic() * 1e6)

    async def _eval(self, batches: Sequence[Sequence[Call]]) -> list[list[Any]]:
        """One EVALSHA per batch (its keys share a slot), all in one write per shard;
        NOSCRIPT (a restarted Redis) is answered by sending the script once more."""
        shards = self._broker.shards
        prefix = self.prefix

        def build(verb: str, script: str, idx: Sequence[int]) -> bytes:
            return b"".join(command(verb, script, len(batches[i]),
                                    *[prefix + c[0] for c in batches[i]], *_argv(batches[i]))
                            for i in idx)

        slots = [prefix + b[0][0] for b in batches]
        replies = await shards.per_shard(slots, lambda _s, idx: build("EVALSHA", _SHA, idx))
        missing = [i for i, r in enumerate(replies)
                   if isinstance(r, RespError) and str(r).startswith("NOSCRIPT")]
        if missing:
            again = await shards.per_shard([slots[i] for i in missing], lambda _s, idx: build(
                "EVAL", _SCRIPT, [missing[j] for j in idx]))
            for i, r in zip(missing, again, strict=True):
                replies[i] = r
        for r in replies:
            if isinstance(r, Exception):
                raise r
        return replies  # type: ignore[no-any-return]

    async def add_many(self, calls: Sequence[Call]) -> list[float]:
        """FORCE calls on independent keys (any slots), one EVALSHA each, one round
        trip; raises when Redis does not answer (the caller keeps its local view)."""
        async with asyncio.timeout(REDIS_TIMEOUT_S * 4):
            replies = await self._eval([[c] for c in calls])
        self.redis_calls += 1
        return [int(r[0]) / 1e6 for r in replies]


class HandshakeLimiter:
    """The per-IP handshake bucket (docs/protocol.md §8), decided synchronously on the
    upgrade path: this instance's own bucket, plus, with Redis, the refusals the shared
    bucket answered for IPs in debt (see the module docstring)."""

    def __init__(self, rate: Rate, shared: SharedLimiter, *,
                 max_ips: int = 100_000) -> None:
        self.rate = rate
        self.local = IpLimiter(rate.per_s, rate.burst, max_ips)
        self.shared = shared if shared.shared else None
        self.max_blocked = min(max_ips, MAX_BLOCKED)
        self._blocked: dict[str, float] = {}  # ip -> loop time the cluster admits it again
        self._pending: dict[str, int] = {}  # admissions not yet added to Redis
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.shared_refusals = 0

    def allow(self, ip: str, now: float) -> bool:
        until = self._blocked.get(ip)
        if until is not None:
            if now < until:
                self.shared_refusals += 1
                return False
            del self._blocked[ip]
        if not self.local.allow(ip, now):
            return False
        if self.shared is not None and not self._closed:
            self._pending[ip] = self._pending.get(ip, 0) + 1
            if self._task is None:
                self._task = asyncio.get_running_loop().create_task(self._reconcile())
        return True

    async def _reconcile(self) -> None:
        """Add what was admitted to the shared buckets, one pipeline per loop turn,
        until nothing is left; note the IPs the cluster says are in debt."""
        assert self.shared is not None
        loop = asyncio.get_running_loop()
        try:
            while self._pending and not self._closed:
                await asyncio.sleep(0)  # the rest of this loop turn's admissions
                batch, self._pending = self._pending, {}
                if not self.shared.up:
                    continue  # Redis down: the local bucket alone holds (never unlimited)
                calls = [(f"hs:{ip}", self.rate, float(n), FORCE) for ip, n in batch.items()]
                try:
                    overs = await self.shared.add_many(calls)
                except Exception as exc:  # Redis down, slow, or odd: the local bucket holds
                    self.shared.fallbacks += 1
                    log.debug("handshake limit not shared", extra={
                        "event": "ratelimit_local", "error": str(exc) or type(exc).__name__})
                    continue
                now = loop.time()
                for ip, over in zip(batch, overs, strict=True):
                    if over > 0:
                        self._block(ip, now + over)
        finally:
            self._task = None

    def _block(self, ip: str, until: float) -> None:
        blocked = self._blocked
        if ip not in blocked and len(blocked) >= self.max_blocked:
            now = asyncio.get_running_loop().time()
            for key in [k for k, t in blocked.items() if t <= now]:
                del blocked[key]
            if len(blocked) >= self.max_blocked:
                for key in list(blocked)[: self.max_blocked // 2]:
                    del blocked[key]
        blocked[ip] = until

    async def close(self) -> None:
        self._closed = True
        task = self._task
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
