"""The OpenRed node client SDK: a node's session with an OpenRed hub.

    async with Client("ws://127.0.0.1:8765/v1/ws", key_file="node.key") as node:
        await node.send(peer, b"hi", qos=1)          # exactly once in effect (§4.2)
        async for msg in node:                        # direct messages
            async with msg:                           # acked when the block succeeds
                print(msg.sender, msg.body)

Modules: `client` (`Client`), `message` (`Message`), `streams` (`Subscription`,
`PresenceWatch`, `History`), `events` (typed events), `errors` (the `ClientError`
tree), `outbox` (the QoS 1 outbox), `crypto` (§12 signatures and encryption). The
reference is docs/sdk.md; the wire contract docs/protocol.md.
"""

from openred.client.client import (
    KICK_REPEAT_S,
    NO_RECONNECT_CODES,
    SESSION_STABLE_S,
    Client,
    backoff_delay,
    check_meta,
)
from openred.client.crypto import GroupKeys
from openred.client.errors import (
    AuthError,
    ClientError,
    ConnectError,
    ConnectionLost,
    ConnectTimeout,
    CryptoError,
    DecryptError,
    HubError,
    OutboxError,
    OutboxFull,
    RemoteError,
    RequestTimeout,
    SubscriptionError,
)
from openred.client.events import (
    Closed,
    Connected,
    Disconnected,
    Event,
    PresenceChanged,
    Receipt,
    StateEvent,
    SubscriptionRefused,
    TopicGap,
)
from openred.client.message import Message
from openred.client.outbox import Outbox, OutboxEntry
from openred.client.streams import History, PresenceWatch, Subscription
from openred.protocol.identity import Identity

__all__ = [
    "KICK_REPEAT_S",
    "NO_RECONNECT_CODES",
    "SESSION_STABLE_S",
    "AuthError",
    "Client",
    "ClientError",
    "Closed",
    "ConnectError",
    "ConnectTimeout",
    "Connected",
    "ConnectionLost",
    "CryptoError",
    "DecryptError",
    "Disconnected",
    "Event",
    "GroupKeys",
    "History",
    "HubError",
    "Identity",
    "Message",
    "Outbox",
    "OutboxEntry",
    "OutboxError",
    "OutboxFull",
    "PresenceChanged",
    "PresenceWatch",
    "Receipt",
    "RemoteError",
    "RequestTimeout",
    "StateEvent",
    "Subscription",
    "SubscriptionError",
    "SubscriptionRefused",
    "TopicGap",
    "backoff_delay",
    "check_meta",
]
