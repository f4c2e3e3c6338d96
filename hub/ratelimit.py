"""Token buckets: per-session frame rate (PROTOCOL.md §7) and per-IP handshakes.

Plain arithmetic on a caller-supplied clock, so the per-frame check costs no syscall.
"""

from __future__ import annotations

__all__ = ["IpLimiter", "TokenBucket"]


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
