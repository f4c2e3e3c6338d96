"""The SDK's exception tree: everything `openred.client` raises at its callers, apart
from `ValueError` for arguments it refuses before anything is sent.

::

    ClientError                   base; the cause, when there is one, is chained
    ├── ConnectError              no session could be opened (refused TCP, HTTP 429/503,
    │   │                         bad URI, broken upgrade, hub broke the handshake)
    │   ├── ConnectTimeout        (also a TimeoutError) no session within
    │   │                         `connect_timeout_s`
    │   └── AuthError             the hub refused the hello (§2.5): `code`, `close_code`;
    │                             never retried with the same credentials
    ├── ConnectionLost            the session ended under a call (`code`, `reason`);
    │                             `final` when the client will not reconnect (§9)
    ├── HubError                  an `error` reply to one request (§3, §8): `code`, `msg`;
    │                             the session goes on
    ├── RequestTimeout            (also a TimeoutError) no reply within
    │                             `request_timeout_s` / the call's `timeout_s`
    ├── RemoteError               a §4.3 reply carried `meta.err`: the responder failed
    ├── SubscriptionError         the hub refused (again) a topic held (§5): `code`
    ├── OutboxFull                the QoS 1 outbox holds `outbox_max` messages already
    ├── OutboxError               the outbox file cannot be read or written
    └── CryptoError               §12: no key for a peer, or a key of the wrong size
        └── DecryptError          a body that cannot be opened (wrong key, tampered)

Messages are short and lowercase and never hold a body or key material.
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "ClientError",
    "ConnectError",
    "ConnectTimeout",
    "ConnectionLost",
    "CryptoError",
    "DecryptError",
    "HubError",
    "OutboxError",
    "OutboxFull",
    "RemoteError",
    "RequestTimeout",
    "SubscriptionError",
]


class ClientError(Exception):
    """Base of every exception the SDK raises (besides `ValueError` for bad arguments)."""


class ConnectError(ClientError):
    """No session could be opened. `__cause__` is the underlying error (OSError,
    websockets' InvalidStatus / InvalidURI / InvalidHandshake, a broken handshake)."""


class ConnectTimeout(ConnectError, TimeoutError):
    """No session within the connect timeout; `__cause__` is the last attempt's error."""


class AuthError(ConnectError):
    """The hub refused the `hello` (§2.5): `code` is `auth_failed` or `forbidden`,
    `close_code` 4001 or 4003. Retrying with the same credentials would fail again."""

    def __init__(self, code: str, close_code: int, reason: str) -> None:
        super().__init__(f"{code} (close {close_code})" + (f": {reason}" if reason else ""))
        self.code = code
        self.close_code = close_code
        self.reason = reason


class ConnectionLost(ClientError):
    """The session ended while a call depended on it. `final` is True when the client
    will not reconnect (§9: 4001, 4003, 4010, a repeated 4012, `close()`,
    `reconnect=False`)."""

    def __init__(self, code: int, reason: str, *, final: bool = False) -> None:
        super().__init__(f"connection lost ({code}{': ' + reason if reason else ''})")
        self.code = code
        self.reason = reason
        self.final = final


class HubError(ClientError):
    """An `error` frame answering one request (§3, §8). The session goes on."""

    def __init__(self, code: str, msg: str) -> None:
        super().__init__(f"{code}: {msg}" if msg else code)
        self.code = code
        self.msg = msg


class RequestTimeout(ClientError, TimeoutError):
    """No reply in time. For a QoS 1 `send` the message stays in the outbox and is
    still delivered (once, §4.2)."""


class RemoteError(ClientError):
    """The responder of a §4.3 request replied with `meta.err`."""

    def __init__(self, err: str, reply: object | None = None) -> None:
        super().__init__(f"remote error: {err}")
        self.err = err
        self.reply = reply


class SubscriptionError(ClientError):
    """The hub refused a topic (`forbidden`, `limit_exceeded`, ...), for example when
    subscribing it again after a reconnect; the topic is no longer held."""

    def __init__(self, topic: str, code: str) -> None:
        super().__init__(f"subscription to {topic} refused: {code}")
        self.topic = topic
        self.code = code


class OutboxFull(ClientError):
    """The QoS 1 outbox already holds `outbox_max` unacknowledged messages."""


class OutboxError(ClientError):
    """The outbox file cannot be read or written; the message names the path."""


class CryptoError(ClientError):
    """§12: no key is known for a peer, or a key has the wrong size."""


class DecryptError(CryptoError):
    """An encrypted body (§12 `box` or `secretbox`) that cannot be opened."""
