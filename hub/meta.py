"""The `msg` frames the hub writes for nodes' messages, and the one place their `meta`
is built (docs/protocol.md §4.1, §13).

Every `msg` made from a node's `send` or `pub` is encoded here, wherever the hub builds
it: a QoS 0 send (hub/session.py), a QoS 1 send delivered live (hub/node.py) or replayed
from the store (hub/inbox.py), a publication fanned out live (hub/node.py), recovered by
a `sub` (hub/session.py) or filled in from history (hub/topic_order.py), and the
messages of a `history` reply (hub/node.py). Each of them passes `meta` through
unchanged (§4.1). What is stored (a QoS 1 message, topic history) is the sender's `meta`
as received; the delivered frame is built again at each delivery (a redelivery hours
later included).

§13 with tracing on (hub/tracing.py) works on both sides of this module: the `send` or
`pub` reaches it with the hub's first span already in place of the node's
`traceparent` (so that is what is stored and encoded here), and the frames built here
get the span of each later hop (broker publish and receive, each QoS 1 delivery attempt)
as they are written, on the instance where that hop happens, since one frame built here
may be delivered by another instance, or several times.

A frame is encoded once per message, not per recipient: a publication's fan-out and a
message routed to another instance carry the bytes built here.
"""

from __future__ import annotations

from openred.persistence.store import HistoryEntry, StoredMessage
from openred.protocol.frames import encode_history_item, encode_msg, encode_topic_msg

__all__ = ["direct_msg", "history_item", "stored_msg", "topic_msg", "topic_msg_of"]


# §4.1: meta passes through unchanged, so the live frames are the encoders themselves
# (a wrapper would cost a call per relayed message).
direct_msg = encode_msg
topic_msg = encode_topic_msg


def stored_msg(m: StoredMessage) -> bytes:
    """A stored QoS 1 message, written again from the store (§4 redelivery)."""
    return encode_msg(m.mid, m.sender, m.body, m.created, 1, m.sig, m.meta)


def topic_msg_of(e: HistoryEntry) -> bytes:
    """A topic `msg` read back from history (§5 recovery, gaps filled)."""
    return encode_topic_msg(e.mid, e.sender, e.topic, e.seq, e.body, e.ts, e.sig,
                            e.meta)


def history_item(e: HistoryEntry) -> bytes:
    """One of the `msgs` of a `history` reply (§5.2)."""
    return encode_history_item(e.mid, e.sender, e.topic, e.seq, e.body, e.ts, e.sig,
                               e.meta)
