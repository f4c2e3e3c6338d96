"""Token buckets: per-session frame rate (docs/protocol.md §7) and per-IP handshakes; and
`GcraTable`, the in-process twin of the cluster-wide limits of hub/ratelimit_shared.py
(the same GCRA, the same answers, used with the memory broker and whenever Redis is
unreachable).

Plain arithmetic on a caller-supplied clock, so the per-frame check costs no syscall.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["FORCE", "PEEK", "TAKE", "Call", "GcraTable", "IpLimiter", "Rate", "TokenBucket"]

# How a GCRA call treats its bucket (hub/ratelimit_shared.py uses the same letters).
PEEK = "p"  # would `cost` more fit? never written
TAKE = "t"  # take `cost` if every PEEK/TAKE call of the batch fits (all or nothing)
FORCE = "f"  # add `cost` whatever the state (it already happened); report the debt


class TokenBucket:
    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float, n: float = 1.0) -> bool:
        tokens = self.tokens + (now - self.stamp) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self.stamp = now
        if tokens >= n:
            self.tokens = tokens - n
            return True
        self.tokens = tokens
        return False


class IpLimiter:
    """One bucket per client IP, the table bounded: when full, buckets that have
    refilled completely (idle IPs) are dropped first, then the oldest half."""

    def __init__(self, rate: float, burst: float, max_ips: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_ips = max_ips
        self._buckets: dict[str, TokenBucket] = {}

    def allow(self, ip: str, now: float) -> bool:
        bucket = self._buckets.get(ip)
        if bucket is None:
            if len(self._buckets) >= self.max_ips:
                self._prune(now)
            bucket = self._buckets[ip] = TokenBucket(self.rate, self.burst, now)
        return bucket.take(now)

    def _prune(self, now: float) -> None:
        full = self.burst / self.rate
        for ip in [ip for ip, b in self._buckets.items() if now - b.stamp >= full]:
            del self._buckets[ip]
        if len(self._buckets) >= self.max_ips:
            for ip in list(self._buckets)[: self.max_ips // 2]:
                del self._buckets[ip]

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass(frozen=True, slots=True)
class Rate:
    """A GCRA limit: `per_s` units a second, `burst` units at once (a bucket of
    `burst` that refills at `per_s`). Times are in microseconds."""

    per_s: float
    burst: float

    @property
    def interval_us(self) -> float:
        return 1e6 / self.per_s

    @property
    def tolerance_us(self) -> float:
        return self.burst * 1e6 / self.per_s


Call = tuple[str, Rate, float, str]  # key, rate, cost, mode (PEEK / TAKE / FORCE)


class GcraTable:
    """GCRA buckets by key (the theoretical arrival time of each, in microseconds of a
    caller's clock), bounded to `max_keys`: when full, buckets that have refilled
    completely (exactly equivalent to no bucket) are dropped first, then the oldest half.

    `check(calls, now_us)` answers, per call, how many seconds it is over its limit
    (0.0: within). PEEK and TAKE calls are all or nothing: the TAKEs are written only
    when no PEEK or TAKE of the batch is over. FORCE calls are always written and answer
    the debt they leave. The Lua script of hub/ratelimit_shared.py does the same."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self._tat: dict[str, float] = {}

    def check(self, calls: Sequence[Call], now_us: float) -> list[float]:
        tats = self._tat
        news: list[float] = []
        overs: list[float] = []
        refused = False
        for key, rate, cost, mode in calls:
            tat = tats.get(key, 0.0)
            if tat < now_us:
                tat = now_us
            new = tat + cost * rate.interval_us
            over = new - now_us - rate.tolerance_us
            news.append(new)
            if over > 0:
                overs.append(over / 1e6)
                if mode != FORCE:
                    refused = True
            else:
                overs.append(0.0)
        for (key, _rate, _cost, mode), new in zip(calls, news, strict=True):
            if mode == FORCE or (mode == TAKE and not refused):
                if key not in tats and len(tats) >= self.max_keys:
                    self._prune(now_us)
                tats[key] = new
        return overs

    def _prune(self, now_us: float) -> None:
        tats = self._tat
        for key in [k for k, tat in tats.items() if tat <= now_us]:
            del tats[key]
        if len(tats) >= self.max_keys:
            for key in list(tats)[: self.max_keys // 2]:
                del tats[key]

    def __len__(self) -> int:
        return len(self._tat)
