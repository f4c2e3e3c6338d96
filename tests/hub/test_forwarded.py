"""`server.trusted_proxies` and X-Forwarded-For (hub/forwarded.py), without sockets: which
address a connection stands for, for the per-IP handshake limit (docs/protocol.md §7) and
the audit trail. Standard handling: the right-most entry that is not a trusted proxy,
and the TCP peer whenever the header cannot be read."""

from __future__ import annotations

import pytest
from openred.hub.forwarded import MAX_FORWARDED_HOPS, TrustedProxies, parse_network

PROXIES = TrustedProxies(["127.0.0.1", "10.0.0.0/8", "2001:db8::/32"])


def test_no_trusted_proxies_ignores_the_header() -> None:
    none = TrustedProxies([])
    assert not none
    assert none.client_ip("127.0.0.1", ["203.0.113.7"]) == "127.0.0.1"


def test_untrusted_peer_ignores_the_header() -> None:
    assert PROXIES.client_ip("198.51.100.1", ["203.0.113.7"]) == "198.51.100.1"
    assert PROXIES.client_ip("11.0.0.1", ["203.0.113.7"]) == "11.0.0.1"


@pytest.mark.parametrize(("header", "client"), [
    (["203.0.113.7"], "203.0.113.7"),
    # What the client wrote itself (left of what the proxy appended) proves nothing.
    (["1.1.1.1, 203.0.113.7"], "203.0.113.7"),
    (["6.6.6.6,203.0.113.7"], "203.0.113.7"),
    # A chain of trusted proxies is walked back to the first untrusted address.
    (["1.1.1.1, 203.0.113.7, 10.1.2.3, 10.9.9.9"], "203.0.113.7"),
    # Several header fields are one list, in order (RFC 9110 §5.3).
    (["1.1.1.1", "203.0.113.7, 10.1.2.3"], "203.0.113.7"),
    # Ports and brackets, as some proxies write them; IPv6 normalised.
    (["203.0.113.7:52100"], "203.0.113.7"),
    (["[2001:DB9::0001]:443"], "2001:db9::1"),
    (["[2001:db9::1]"], "2001:db9::1"),
    (["2001:db9:0:0::1"], "2001:db9::1"),
    # IPv4-mapped IPv6 is the IPv4 address (one bucket per client, whatever the form).
    (["::ffff:203.0.113.7"], "203.0.113.7"),
    # Every hop trusted: the client is a trusted host itself; its own entry counts.
    (["10.0.0.5, 10.0.0.6"], "10.0.0.5"),
    (["  203.0.113.7  "], "203.0.113.7"),
])
def test_rightmost_untrusted_entry(header: list[str], client: str) -> None:
    assert PROXIES.client_ip("127.0.0.1", header) == client


@pytest.mark.parametrize("header", [
    [],  # no header: the proxy connected for itself
    [""],
    ["   "],
    ["203.0.113.7, "],  # an empty entry where the client should be
    ["unknown"],  # nginx writes nothing like it, other proxies do
    ["1.1.1.1, not-an-ip"],
    ["203.0.113.7:x:y"],
    ["[2001:db8::1"],
    ["[2001:db8::1]x"],
    ["203.0.113.7/24"],
    ["999.1.1.1"],
    ["\x00\xff"],
    ["," * 10_000],
])
def test_unreadable_header_keeps_the_peer(header: list[str]) -> None:
    assert PROXIES.client_ip("127.0.0.1", header) == "127.0.0.1"


def test_unreadable_entries_left_of_the_client_do_not_matter() -> None:
    assert PROXIES.client_ip("127.0.0.1", ["garbage, , 203.0.113.7"]) == "203.0.113.7"


def test_padding_with_trusted_addresses_keeps_the_peer() -> None:
    padded = ", ".join(["10.0.0.1"] * (MAX_FORWARDED_HOPS + 1))
    assert PROXIES.client_ip("127.0.0.1", [padded]) == "127.0.0.1"
    chain = ", ".join(["203.0.113.7"] + ["10.0.0.1"] * (MAX_FORWARDED_HOPS - 1))
    assert PROXIES.client_ip("127.0.0.1", [chain]) == "203.0.113.7"


def test_peer_forms() -> None:
    # A dual-stack listener reports an IPv4 proxy as ::ffff:a.b.c.d.
    assert PROXIES.trusts("::ffff:127.0.0.1")
    assert PROXIES.client_ip("::ffff:10.1.1.1", ["203.0.113.7"]) == "203.0.113.7"
    assert PROXIES.trusts("2001:db8::5")
    assert not PROXIES.trusts("?")  # the session's placeholder before connection_made
    assert PROXIES.client_ip("?", ["203.0.113.7"]) == "?"


def test_parse_network() -> None:
    assert str(parse_network(" 10.0.0.0/8 ")) == "10.0.0.0/8"
    assert str(parse_network("::1")) == "::1/128"
    for bad in ("10.0.0.1/8", "nginx", "", "1.2.3.4/33", "*"):
        with pytest.raises(ValueError):
            parse_network(bad)
