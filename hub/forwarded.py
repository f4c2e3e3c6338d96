"""The client address of a connection that came through reverse proxies.

Owns `server.trusted_proxies` at run time: behind nginx (deploy/nginx/nginx.conf) every
TCP peer is the proxy, so the per-IP handshake limit (docs/protocol.md §7) and the `ip` of
audit events would lump every node together. Only when the TCP peer is a trusted proxy
is `X-Forwarded-For` read, and the client is its right-most address that is not itself
a trusted proxy (what nginx `real_ip_recursive on` and uvicorn's ProxyHeadersMiddleware
do): each proxy appends the address it saw, so entries left of the first untrusted one
(from the right) were written by the client and prove nothing.

Nothing here raises on header content: an entry that is not an IP address where the
client address should be means "cannot tell", and the TCP peer is kept.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final

__all__ = ["MAX_FORWARDED_HOPS", "TrustedProxies", "parse_network"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Entries looked at from the right. A longer run of trusted proxies is not a real chain
# but padding (the header is client-controlled left of the last hop); the peer is kept.
MAX_FORWARDED_HOPS: Final = 32


def parse_network(text: str) -> IPNetwork:
    """One `trusted_proxies` item: an address (a one-address network) or a CIDR
    network without host bits. Raises ValueError."""
    return ipaddress.ip_network(text.strip(), strict=True)


def _address(text: str) -> IPAddress | None:
    """An X-Forwarded-For entry, or None when it is not one. Accepts the forms proxies
    write: `1.2.3.4`, `2001:db8::1`, `[2001:db8::1]`, and either with a port."""
    s = text.strip()
    if s.startswith("["):
        end = s.find("]")
        if end < 0 or (end + 1 < len(s) and s[end + 1] != ":"):
            return None
        s = s[1:end]
    elif s.count(":") == 1:  # IPv4 with a port (a bare IPv6 address has several colons)
        s = s.split(":", 1)[0]
    try:
        addr = ipaddress.ip_address(s)
    except ValueError:
        return None
    return _unmapped(addr)


def _unmapped(addr: IPAddress) -> IPAddress:
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; they must match (and be
    # rate limited as) the IPv4 address.
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class TrustedProxies:
    """The configured proxies, and the client address a connection stands for."""

    __slots__ = ("_networks",)

    def __init__(self, networks: Iterable[str]) -> None:
        self._networks = tuple(parse_network(n) for n in networks)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def _trusted(self, addr: IPAddress) -> bool:
        # `in` is False across address families, never an error.
        return any(addr in net for net in self._networks)

    def trusts(self, peer: str) -> bool:
        addr = _address(peer)
        return addr is not None and self._trusted(addr)

    def client_ip(self, peer: str, forwarded_for: Iterable[str]) -> str:
        """The client address for a connection from `peer` (the TCP peer address)
        carrying these `X-Forwarded-For` header values (in order received). `peer`
        itself unless it is a trusted proxy and the header names a client."""
        if not self._networks or not self.trusts(peer):
            return peer
        # RFC 9110 §5.3: several fields of one name are one comma-separated list.
        hops = ",".join(forwarded_for).split(",")
        if hops == [""]:
            return peer  # no header: the proxy connected on its own behalf
        leftmost: IPAddress | None = None
        for raw in reversed(hops[-MAX_FORWARDED_HOPS:]):
            addr = _address(raw)
            if addr is None:
                return peer
            if not self._trusted(addr):
                return str(addr)
            leftmost = addr
        if len(hops) > MAX_FORWARDED_HOPS or leftmost is None:
            return peer
        # Every hop is a trusted proxy: the client is one of them (it connected to the
        # outermost proxy from a trusted address), and the first entry is its own.
        return str(leftmost)
