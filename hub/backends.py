"""Picks the `Broker` backend named by `broker.url` (`open_broker`).

Kept apart from the contract (`broker.py`) because it imports the backends, and the Redis
backend imports the contract: the factory sits above both, so neither imports the other.
`broker_redis.py` (and with it redis-py) is imported only when a `redis://` URL is used.
"""

from __future__ import annotations

from openred.hub.broker import Broker, MemoryBroker

__all__ = ["open_broker"]


def open_broker(url: str, hub_id: str = "openred") -> Broker:
    """Build (not yet started) the broker named by `broker.url`."""
    if url.startswith("memory:"):
        return MemoryBroker()
    if url.startswith(("redis://", "rediss://")):
        from openred.hub.broker_redis import RedisBroker

        broker: Broker = RedisBroker(url, hub_id=hub_id)
        return broker
    raise ValueError(f"broker.url: unsupported scheme {url.split(':', 1)[0]!r}")
