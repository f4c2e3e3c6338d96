"""Typed events the SDK reports: state changes of the connection, topic gaps, refused
subscriptions, presence changes and receipts. Frozen dataclasses, compared by value.

They reach the application through the `Client`'s callbacks (`on_state`, `on_event`,
`on_receipt`), a `Subscription` (`TopicGap`) and a `PresenceWatch` (`PresenceChanged`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Closed",
    "Connected",
    "Disconnected",
    "Event",
    "PresenceChanged",
    "Receipt",
    "StateEvent",
    "SubscriptionRefused",
    "TopicGap",
]


@dataclass(frozen=True, slots=True)
class Connected:
    """A session is open (§2 `welcome`): topics are held again and the outbox resent.
    `pending` is the number of stored QoS 1 messages the hub is about to deliver."""

    session: str
    pending: int
    node: str = ""


@dataclass(frozen=True, slots=True)
class Disconnected:
    """A session ended, or an attempt to open one failed. `code` is the close code
    (1006 for a drop or a failed attempt), `reason` short text. With `will_retry` the
    client makes attempt number `attempt` (1 for the first retry) after `delay_s`
    seconds; without it, a `Closed` follows."""

    code: int
    reason: str
    will_retry: bool
    attempt: int = 0
    delay_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Closed:
    """The client stopped for good: `close()`, a close code after which §9 says not to
    reconnect (4001, 4003, 4010, a repeated 4012), or `reconnect=False`. The last state event."""

    code: int
    reason: str


StateEvent = Connected | Disconnected | Closed


@dataclass(frozen=True, slots=True)
class TopicGap:
    """§5: the hub's history no longer held publications of `topic` after the position
    the SDK resubscribed from (`recovered: false`). Publications `from_seq..to_seq`
    (inclusive) are lost for this node; reload what the topic feeds from elsewhere."""

    topic: str
    from_seq: int
    to_seq: int


@dataclass(frozen=True, slots=True)
class SubscriptionRefused:
    """The hub refused a topic held by the client, when subscribing it again after a
    reconnect (§5: `forbidden`, `limit_exceeded`, ...). The topic is no longer held."""

    topic: str
    code: str


@dataclass(frozen=True, slots=True)
class PresenceChanged:
    """§6.1: `node` came online or went offline (`topic` is None), or subscribed to or
    left `topic`, at hub time `ts` (ms). `snapshot` marks a change the SDK found by
    comparing a `watch` snapshot after a reconnect with the last state it knew."""

    node: str
    online: bool
    ts: int
    topic: str | None = None
    snapshot: bool = False


@dataclass(frozen=True, slots=True)
class Receipt:
    """§4: the recipient acked a QoS 1 message sent with `receipt=True`."""

    mid: str
    to: str
    ts: int


Event = Connected | Disconnected | Closed | TopicGap | SubscriptionRefused | \
    PresenceChanged | Receipt
