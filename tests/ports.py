"""Ports for servers the tests start (hubs, relays, Redis, PostgreSQL replicas...), and
for addresses where nothing listens: one helper for every test (tests/cluster/conftest.py
re-exports it)."""

from __future__ import annotations

import random
import socket

__all__ = ["free_port"]


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_EPHEMERAL_LOW = _ephemeral_low()
_handed: set[int] = set()


def free_port() -> int:
    """A free port for a server started later, and started again on it after a kill:
    below the kernel's ephemeral range, where the test's own outgoing connections (to
    Redis, PostgreSQL, the hubs) take their source ports, so none of them takes it in the
    meantime (a hub once failed to start on a port an outgoing connection held). Each
    port is handed out once per test run."""
    low = 10_000
    if _EPHEMERAL_LOW - low > 1000:
        for _ in range(200):
            port = random.randrange(low, _EPHEMERAL_LOW)
            if port in _handed:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed.add(port)
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
