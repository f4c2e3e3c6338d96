"""Abuse limits of the admin surface: per client IP, per token, and the lockout after bad
tokens (README "Operator surface"; keys `admin.requests_per_s`, `admin.requests_burst`,
`admin.max_auth_failures`, `admin.lockout_s`).

Owned here: `AdminGuard.check`, the one decision per `/v1/` request, made in ONE call
to the shared limiter (hub/ratelimit_shared.py: one Redis round trip with the Redis
broker, so every instance counts together; in process otherwise, or while Redis is
unreachable). The token was already checked locally, so the call knows which case it is:

- a bad token (`invalid`, `malformed`): TAKE one failure from the IP's failure bucket
  (burst `max_auth_failures`, refilled one per `lockout_s`) and the request's cost from
  the IP's bucket. Refused: 429 (locked out, or too fast); else the caller's 401. All or
  nothing and atomic, so N concurrent guesses from one IP get at most the configured
  number of 401s, on all instances together.
- anything else: PEEK the failure bucket (a locked-out IP gets 429 even with a good
  token, so the lockout is no oracle telling good tokens from bad), TAKE the cost from
  the IP's bucket and, with a token, from the token's.

Client IP: the TCP peer, or behind one of `server.trusted_proxies` the client it names
(hub/forwarded.py, as for WebSocket upgrades). IPv6 clients count by /64, the block
one host typically holds. The keys share the hash tag `{adm}`, so one script call
touches one Redis Cluster slot.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from openred.hub.ratelimit import PEEK, TAKE, Call, Rate
from openred.hub.ratelimit_shared import SharedLimiter
from prometheus_client import Counter
from prometheus_client.registry import CollectorRegistry

if TYPE_CHECKING:
    from openred.hub.config import AdminConfig
    from openred.hub.node import HubNode

__all__ = ["AdminGuard", "Verdict", "client_ip"]

BAD_TOKEN_REASONS = frozenset({"invalid", "malformed"})


@dataclass(frozen=True, slots=True)
class Verdict:
    """`limit` None: go on; else "lockout", "ip" or "token" and when to retry (s)."""

    limit: str | None = None
    retry_after_s: int = 0


OK = Verdict()


def client_ip(hub: HubNode, peer: str | None, forwarded_for: list[str]) -> str:
    peer = peer or "?"
    return hub.trusted_proxies.client_ip(peer, forwarded_for)


def _ip_key(ip: str) -> str:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        mapped = addr.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return ip


class AdminGuard:
    def __init__(self, cfg: AdminConfig, hub: HubNode,
                 registry: CollectorRegistry | None = None) -> None:
        self.limiter = SharedLimiter(hub.broker)
        self.rate = Rate(cfg.requests_per_s, cfg.requests_burst)
        self.failures = Rate(1 / cfg.lockout_s, cfg.max_auth_failures)
        self.auth_failures = Counter(
            "openred_hub_admin_auth_failures", "Admin requests refused 401, by reason.",
            ["reason"], registry=registry)
        self.refused = Counter(
            "openred_hub_admin_refused", "Admin requests refused 403 or 429, by reason "
            "(lockout, ip, token: 429; scope: 403).", ["reason"], registry=registry)

    async def check(self, ip: str, token: str | None, cost: float,
                    auth: str | None) -> Verdict:
        """`auth`: None for a route without auth, else the token check's outcome
        ("ok", "missing", "no_tokens", "invalid", "malformed")."""
        ipk = _ip_key(ip)
        calls: list[Call] = []
        if auth is not None:
            mode = TAKE if auth in BAD_TOKEN_REASONS else PEEK
            calls.append((f"{{adm}}:fail:{ipk}", self.failures, 1.0, mode))
        calls.append((f"{{adm}}:ip:{ipk}", self.rate, cost, TAKE))
        if token is not None:
            calls.append((f"{{adm}}:tok:{token}", self.rate, cost, TAKE))
        overs = await self.limiter.check(calls)
        names = (["lockout"] if auth is not None else []) + ["ip"] + (
            ["token"] if token is not None else [])
        for name, over in zip(names, overs, strict=True):
            if over > 0:
                self.refused.labels(name).inc()
                return Verdict(name, max(1, math.ceil(over)))
        return OK
