"""Frames of the OpenRed wire protocol v1 and their msgpack codec (docs/protocol.md §1-§7).

Owned here: one immutable type per client frame, `decode_client()` which turns the bytes
of one WebSocket message into validated frames (or `FrameError` values for frames that
are answered with `error`), and the encoders of every hub frame. Validation of shape,
types and limits happens here once; nothing downstream re-validates.

Sans-I/O: no asyncio, no sockets. The decoder never raises anything but `DecodeError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, Final, NamedTuple, cast

import msgpack
from openred.protocol.errors import (
    BAD_FRAME,
    LIMIT_EXCEEDED,
    TOO_LARGE,
    UNKNOWN_TYPE,
    DecodeError,
    FrameError,
)
from openred.protocol.identity import is_node_id

__all__ = [
    "DEFAULT_HISTORY_LIMIT",
    "MAX_ACK_MIDS",
    "MAX_CID_CHARS",
    "MAX_HISTORY_LIMIT",
    "MAX_ID_CHARS",
    "MAX_META_BYTES",
    "MAX_META_DEPTH",
    "MAX_MSG_META_BYTES",
    "MAX_MSG_META_ENTRIES",
    "MAX_MSG_META_KEY_CHARS",
    "MAX_MSG_META_VALUE_CHARS",
    "MAX_PRESENCE_NODES",
    "MAX_SIG_BYTES",
    "MAX_SINCE",
    "MAX_TOPIC_CHARS",
    "Ack",
    "ClientFrame",
    "DecodeLimits",
    "Hello",
    "History",
    "Presence",
    "Pub",
    "Send",
    "Sub",
    "Unsub",
    "Unwatch",
    "Watch",
    "array_header",
    "batch_of",
    "decode_client",
    "decode_server",
    "encode",
    "encode_bye",
    "encode_challenge",
    "encode_error",
    "encode_history_item",
    "encode_history_ok",
    "encode_msg",
    "encode_ok",
    "encode_presence",
    "encode_receipt",
    "encode_topic_msg",
    "encode_welcome",
    "history_ok_overhead",
    "is_cid",
    "is_topic",
    "msg_meta_problem",
]

MAX_ID_CHARS: Final = 64
MAX_TOPIC_CHARS: Final = 200
MAX_META_BYTES: Final = 4096
# §3 hello: `meta` is stored as JSON and shown to operators as JSON, so it must be JSON
# (str keys, finite numbers). 16 levels of maps and arrays, `meta` itself the first, is far
# more than a descriptive record needs, and keeps every reader that recurses (the store's
# and the admin API's JSON codecs, the SDKs) far from its own stack limit.
MAX_META_DEPTH: Final = 16
MAX_PRESENCE_NODES: Final = 1000
MAX_SIG_BYTES: Final = 512  # §4: sig is passed through; bounded so it cannot grow queues
MAX_ACK_MIDS: Final = 10_000
# §4.1: `meta` of send and pub, passed through, stored and kept in history: bounded on its
# own (not against max_body_bytes) so headers cannot grow queues, rows or history.
MAX_MSG_META_ENTRIES: Final = 16
MAX_MSG_META_KEY_CHARS: Final = 64
MAX_MSG_META_VALUE_CHARS: Final = 512
MAX_MSG_META_BYTES: Final = 1024
MAX_CID_CHARS: Final = 64  # §4.2
MAX_HISTORY_LIMIT: Final = 1000  # §5.2
DEFAULT_HISTORY_LIMIT: Final = 100
_MAX_UINT64: Final = 2**64 - 1
_MIN_INT64: Final = -(2**63)
# §3 sub: topic sequences are signed 64-bit in the store (SQLite INTEGER, PostgreSQL
# bigint); a `since` above it could never be a seq, and would overflow there.
MAX_SINCE: Final = 2**63 - 1

_TOPIC_RE: Final = re.compile(r"[A-Za-z0-9._:/-]{1,200}")
_META_KEY_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
_CID_RE: Final = re.compile(r"[\x21-\x7e]{1,64}")


def is_cid(value: object) -> bool:
    """§4.2: a `str` of 1..64 printable ASCII characters (0x21..0x7e)."""
    return type(value) is str and _CID_RE.fullmatch(value) is not None


def msg_meta_problem(meta: object) -> str | None:
    """What makes `meta` break §4.1 (None: nothing): the hub's check, for clients to
    run before sending."""
    try:
        _msg_meta(meta)
    except _Bad as exc:
        return str(exc)
    return None


def is_topic(value: object) -> bool:
    """§5: 1..200 chars of [A-Za-z0-9._:/-]."""
    return type(value) is str and _TOPIC_RE.fullmatch(value) is not None


class DecodeLimits(NamedTuple):
    max_body_bytes: int = 65536
    max_presence_nodes: int = MAX_PRESENCE_NODES


# -- client frames -------------------------------------------------------------------


class Hello(NamedTuple):
    key: bytes | None
    sig: bytes | None
    token: str | None
    batch: bool
    meta: dict[str, Any] | None
    v: int | None
    id: int | str | None = None


class Send(NamedTuple):
    id: int | str | None
    to: str
    body: bytes
    qos: int
    ttl: int | None
    sig: bytes | None
    receipt: bool
    cid: str | None = None  # §4.2: QoS 1 only (None on QoS 0, where it is ignored)
    meta: dict[str, str] | None = None  # §4.1: None when absent or empty


class Ack(NamedTuple):
    mids: list[str]
    id: int | str | None = None


class Sub(NamedTuple):
    id: int | str | None
    topic: str
    since: int | None


class Unsub(NamedTuple):
    id: int | str | None
    topic: str


class Pub(NamedTuple):
    id: int | str | None
    topic: str
    body: bytes
    sig: bytes | None = None  # §5.1
    meta: dict[str, str] | None = None  # §4.1: None when absent or empty


class History(NamedTuple):
    """§5.2: the newest `limit` kept messages of `topic` below `before` (None: all)."""

    id: int | str
    topic: str
    limit: int
    before: int | None


class Presence(NamedTuple):
    id: int | str | None
    nodes: list[str]


class Watch(NamedTuple):
    """§6.1: start watching `nodes` (distinct valid node ids, None when absent) and/or
    the subscribers of `topic`."""

    id: int | str | None
    nodes: list[str] | None
    topic: str | None


class Unwatch(NamedTuple):
    """§6.1: stop watching `nodes` and/or `topic` (what is not watched is ignored)."""

    id: int | str | None
    nodes: list[str] | None
    topic: str | None


ClientFrame = Hello | Send | Ack | Sub | Unsub | Pub | Presence | History | Watch | Unwatch


class _Bad(Exception):
    """Internal: a field is missing or ill-typed; becomes a FrameError."""

    def __init__(self, msg: str, code: str = BAD_FRAME) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


def _unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except msgpack.ExtraData:
        raise DecodeError("trailing bytes after the msgpack value") from None
    except Exception as exc:  # msgpack raises ValueError, TypeError, StackError, ...
        raise DecodeError(f"undecodable msgpack ({type(exc).__name__})") from None


DEFAULT_LIMITS: Final = DecodeLimits()


def decode_client(data: bytes,
                  limits: DecodeLimits = DEFAULT_LIMITS) -> list[ClientFrame | FrameError]:
    """Decode one WebSocket message from a node: one frame or a batch (§1).

    Returns the frames in order; a frame that is wrong (but decodable) is replaced by a
    `FrameError` to answer. Raises `DecodeError` (close 1007) when the bytes are not
    exactly one msgpack value.
    """
    value = _unpack(data)
    if type(value) is list:
        return [_decode_one(item, limits) for item in value]
    return [_decode_one(value, limits)]


def _id_of(frame: dict[Any, Any]) -> int | str | None:
    fid = frame.get("id")
    if fid is None:
        return None
    t = type(fid)
    if t is int:
        if 0 <= fid <= _MAX_UINT64:
            return cast(int, fid)
    elif t is str and len(fid) <= MAX_ID_CHARS:
        return cast(str, fid)
    raise _Bad("id: must be a uint or a str of at most 64 chars")


def _decode_one(frame: object, limits: DecodeLimits) -> ClientFrame | FrameError:
    if type(frame) is not dict:
        return FrameError(None, BAD_FRAME, "frame is not a map")
    try:
        fid = _id_of(frame)
    except _Bad as bad:
        return FrameError(None, bad.code, bad.msg)
    t = frame.get("t")
    if type(t) is not str:
        return FrameError(fid, BAD_FRAME, "t: missing or not a str")
    parser = _PARSERS.get(t)
    if parser is None:
        return FrameError(fid, UNKNOWN_TYPE, "unknown frame type")
    try:
        return parser(frame, fid, limits)
    except _Bad as bad:
        return FrameError(fid, bad.code, bad.msg)


def _req_str(frame: dict[Any, Any], key: str) -> str:
    v = frame.get(key)
    if type(v) is not str:
        raise _Bad(f"{key}: missing or not a str")
    return v


def _req_bin(frame: dict[Any, Any], key: str) -> bytes:
    v = frame.get(key)
    if type(v) is not bytes:
        raise _Bad(f"{key}: missing or not bin")
    return v


def _opt_bin(frame: dict[Any, Any], key: str, max_len: int) -> bytes | None:
    v = frame.get(key)
    if v is None:
        return None
    if type(v) is not bytes:
        raise _Bad(f"{key}: not bin")
    if len(v) > max_len:
        raise _Bad(f"{key}: longer than {max_len} bytes")
    return v


def _opt_bool(frame: dict[Any, Any], key: str) -> bool:
    v = frame.get(key)
    if v is None:
        return False
    if type(v) is not bool:
        raise _Bad(f"{key}: not a bool")
    return v


def _opt_uint(frame: dict[Any, Any], key: str, minimum: int = 0) -> int | None:
    v = frame.get(key)
    if v is None:
        return None
    if type(v) is not int or v < minimum or v > _MAX_UINT64:
        raise _Bad(f"{key}: not an int >= {minimum}")
    return v


def _since(frame: dict[Any, Any]) -> int | None:
    v = frame.get("since")
    if v is None:
        return None
    if type(v) is not int or v < 0 or v > MAX_SINCE:
        raise _Bad("since: not an int in 0..2^63-1")
    return v


def _topic(frame: dict[Any, Any]) -> str:
    v = frame.get("topic")
    if not is_topic(v):
        raise _Bad("topic: missing or not 1..200 chars of [A-Za-z0-9._:/-]")
    return cast(str, v)


def _body(frame: dict[Any, Any], limits: DecodeLimits) -> bytes:
    body = _req_bin(frame, "body")
    if len(body) > limits.max_body_bytes:
        raise _Bad(f"body: larger than {limits.max_body_bytes} bytes", TOO_LARGE)
    return body


def _parse_hello(frame: dict[Any, Any], fid: int | str | None, limits: DecodeLimits) -> Hello:
    key = _opt_bin(frame, "key", 32)
    sig = _opt_bin(frame, "sig", 64)
    token = frame.get("token")
    if token is not None and type(token) is not str:
        raise _Bad("token: not a str")
    meta = frame.get("meta")
    if meta is not None:
        if type(meta) is not dict:
            raise _Bad("meta: not a map")
        _check_json(meta, 1)  # first: bounded depth, so re-packing below cannot recurse far
        if len(msgpack.packb(meta)) > MAX_META_BYTES:
            raise _Bad("meta: larger than 4 KiB", TOO_LARGE)
    v = _opt_uint(frame, "v")
    return Hello(key, sig, token, _opt_bool(frame, "batch"), meta, v, fid)


# What msgpack decodes that JSON cannot hold, named as the error says it.
_NOT_JSON: Final[dict[type, str]] = {
    bytes: "bin",
    msgpack.ExtType: "ext",
    msgpack.Timestamp: "a timestamp",
}


def _check_json(value: object, depth: int) -> None:
    """§3 hello `meta`: JSON-representable, nested at most MAX_META_DEPTH deep.
    `depth` is the nesting level of `value` when it is a map or an array."""
    t = type(value)
    if t is str or t is bool or value is None:
        return
    if t is dict or t is list:
        if depth > MAX_META_DEPTH:
            raise _Bad(f"meta: nested deeper than {MAX_META_DEPTH} levels")
        if t is dict:
            for k, v in cast(dict[object, object], value).items():
                if type(k) is not str:
                    raise _Bad(f"meta: a map key is {_kind(k)}, not a str")
                _check_json(v, depth + 1)
        else:
            for v in cast(list[object], value):
                _check_json(v, depth + 1)
    elif t is int:
        if not _MIN_INT64 <= cast(int, value) <= _MAX_UINT64:
            raise _Bad("meta: an int out of -2^63..2^64-1")
    elif t is float:
        if not math.isfinite(cast(float, value)):
            raise _Bad("meta: NaN or Infinity is not JSON")
    else:
        raise _Bad(f"meta: {_kind(value)} is not JSON")


def _kind(value: object) -> str:
    t = type(value)
    if t in _NOT_JSON:
        return _NOT_JSON[t]
    return {int: "an int", float: "a float", bool: "a bool", type(None): "nil",
            tuple: "an array"}.get(t, t.__name__)


# Node ids seen valid recently: a set look-up instead of a regex match per `send`
# (the hot path). Bounded: cleared when full.
_known_ids: set[str] = set()
_KNOWN_IDS_MAX: Final = 8192
_new = tuple.__new__  # NamedTuple's own __new__ is a Python-level call


def _valid_to(to: object) -> bool:
    if type(to) is not str:
        return False
    if to in _known_ids:
        return True
    if not is_node_id(to):
        return False
    if len(_known_ids) >= _KNOWN_IDS_MAX:
        _known_ids.clear()
    _known_ids.add(to)
    return True


def _parse_send(frame: dict[Any, Any], fid: int | str | None, limits: DecodeLimits) -> Send:
    get = frame.get
    to = get("to")
    if not _valid_to(to):
        raise _Bad("to: missing or not a node id")
    body = get("body")
    if type(body) is not bytes:
        raise _Bad("body: missing or not bin")
    qos = get("qos")
    if qos is None:
        qos = 0
    elif type(qos) is int and qos == 0:
        pass
    elif type(qos) is not int or qos != 1:
        raise _Bad("qos: must be 0 or 1")
    elif fid is None:
        raise _Bad("id: required for qos 1")
    if len(body) > limits.max_body_bytes:
        raise _Bad(f"body: larger than {limits.max_body_bytes} bytes", TOO_LARGE)
    # Most sends carry only t, to, body and maybe id and qos: then the five optional
    # fields are absent, known from the key count alone (a lookup each saved per frame,
    # the relay's hot path). A key present with a nil value takes the long way, same result.
    if len(frame) == 3 + (fid is not None) + (qos != 0 or "qos" in frame):
        return _new(Send, (fid, to, body, qos, None, None, False, None, None))
    ttl = None if get("ttl") is None else _opt_uint(frame, "ttl", 1)
    sig = None if get("sig") is None else _opt_bin(frame, "sig", MAX_SIG_BYTES)
    receipt = False if get("receipt") is None else _opt_bool(frame, "receipt")
    cid = get("cid")
    if cid is not None:
        if qos == 0:
            cid = None  # §4.2: ignored on QoS 0
        elif type(cid) is not str or _CID_RE.fullmatch(cid) is None:
            raise _Bad("cid: not a str of 1..64 printable ASCII chars")
    meta = get("meta")
    if meta is not None:
        meta = _msg_meta(meta)
    return _new(Send, (fid, to, body, qos, ttl, sig, receipt, cid, meta))


def _msg_meta(meta: object) -> dict[str, str] | None:
    """§4.1: the `meta` of a send or pub; None for an empty map (the same as none)."""
    if type(meta) is not dict:
        raise _Bad("meta: not a map")
    if not meta:
        return None
    if len(meta) > MAX_MSG_META_ENTRIES:
        raise _Bad(f"meta: more than {MAX_MSG_META_ENTRIES} entries")
    for k, v in cast(dict[object, object], meta).items():
        # Length first: it bounds the regex work on hostile input.
        if (type(k) is not str or len(k) > MAX_MSG_META_KEY_CHARS
                or _META_KEY_RE.fullmatch(k) is None):
            raise _Bad("meta: a key is not 1..64 chars of [A-Za-z0-9._-]")
        if type(v) is not str:
            raise _Bad(f"meta: the value of {k!r} is not a str")
        if len(v) > MAX_MSG_META_VALUE_CHARS:
            raise _Bad(f"meta: the value of {k!r} is longer than "
                       f"{MAX_MSG_META_VALUE_CHARS} chars")
    if len(_packb(meta)) > MAX_MSG_META_BYTES:
        raise _Bad(f"meta: larger than {MAX_MSG_META_BYTES} bytes encoded")
    return cast(dict[str, str], meta)


def _parse_ack(frame: dict[Any, Any], fid: int | str | None, limits: DecodeLimits) -> Ack:
    mid = frame.get("mid")
    mids = frame.get("mids")
    out: list[str] = []
    if mid is not None:
        if type(mid) is not str:
            raise _Bad("mid: not a str")
        out.append(mid)
    if mids is not None:
        if type(mids) is not list or len(mids) > MAX_ACK_MIDS:
            raise _Bad(f"mids: not a list of at most {MAX_ACK_MIDS} str")
        for m in mids:
            if type(m) is not str:
                raise _Bad("mids: not a list of str")
        out.extend(mids)
    if mid is None and mids is None:
        raise _Bad("mid: missing (mid or mids)")
    return Ack(out, fid)


def _parse_sub(frame: dict[Any, Any], fid: int | str | None, limits: DecodeLimits) -> Sub:
    return Sub(fid, _topic(frame), _since(frame))


def _parse_unsub(frame: dict[Any, Any], fid: int | str | None, limits: DecodeLimits) -> Unsub:
    return Unsub(fid, _topic(frame))


def _parse_pub(frame: dict[Any, Any], fid: int | str | None, limits: DecodeLimits) -> Pub:
    topic = _topic(frame)
    get = frame.get
    sig = None if get("sig") is None else _opt_bin(frame, "sig", MAX_SIG_BYTES)  # §5.1
    meta = get("meta")
    if meta is not None:
        meta = _msg_meta(meta)
    return _new(Pub, (fid, topic, _body(frame, limits), sig, meta))


def _parse_history(frame: dict[Any, Any], fid: int | str | None,
                   limits: DecodeLimits) -> History:
    if fid is None:
        raise _Bad("id: required for history")
    topic = _topic(frame)
    limit = frame.get("limit")
    if limit is None:
        limit = DEFAULT_HISTORY_LIMIT
    elif type(limit) is not int or not 1 <= limit <= MAX_HISTORY_LIMIT:
        raise _Bad(f"limit: not an int in 1..{MAX_HISTORY_LIMIT}")
    before = frame.get("before")
    if before is not None and (type(before) is not int or not 0 <= before <= MAX_SINCE):
        raise _Bad("before: not an int in 0..2^63-1")  # a seq, as `since` (§5)
    return History(fid, topic, limit, before)


def _parse_presence(frame: dict[Any, Any], fid: int | str | None,
                    limits: DecodeLimits) -> Presence:
    if fid is None:
        raise _Bad("id: required for presence")
    nodes = frame.get("nodes")
    if type(nodes) is not list:
        raise _Bad("nodes: missing or not a list")
    if len(nodes) > limits.max_presence_nodes:
        raise _Bad(f"nodes: more than {limits.max_presence_nodes}", LIMIT_EXCEEDED)
    for n in nodes:
        if type(n) is not str:
            raise _Bad("nodes: not a list of str")
    return Presence(fid, nodes)


def _watched(frame: dict[Any, Any]) -> tuple[list[str] | None, str | None]:
    """§6.1 watch/unwatch: `nodes` (valid node ids, repeats dropped) and/or `topic`.
    The count against `limits.max_watch` is the hub's: it depends on what the session
    already watches."""
    nodes = frame.get("nodes")
    out: list[str] | None = None
    if nodes is not None:
        if type(nodes) is not list:
            raise _Bad("nodes: not a list")
        for n in nodes:
            if not _valid_to(n):
                raise _Bad("nodes: not a list of node ids")
        out = list(dict.fromkeys(nodes))
    topic = None if frame.get("topic") is None else _topic(frame)
    if out is None and topic is None:
        raise _Bad("nodes or topic: at least one is required")
    return out, topic


def _parse_watch(frame: dict[Any, Any], fid: int | str | None, limits: DecodeLimits) -> Watch:
    return Watch(fid, *_watched(frame))


def _parse_unwatch(frame: dict[Any, Any], fid: int | str | None,
                   limits: DecodeLimits) -> Unwatch:
    return Unwatch(fid, *_watched(frame))


_PARSERS: Final[dict[str, Callable[[dict[Any, Any], int | str | None, DecodeLimits],
                                    ClientFrame]]] = {
    "hello": _parse_hello,
    "send": _parse_send,
    "ack": _parse_ack,
    "sub": _parse_sub,
    "unsub": _parse_unsub,
    "pub": _parse_pub,
    "presence": _parse_presence,
    "watch": _parse_watch,
    "unwatch": _parse_unwatch,
    "history": _parse_history,
}

# -- hub frames ----------------------------------------------------------------------

_packb: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True, autoreset=True).pack


def encode(frame: dict[str, Any]) -> bytes:
    """Encode one frame (a map with str keys) as msgpack."""
    return _packb(frame)


def encode_challenge(hub_id: str, nonce: bytes) -> bytes:
    return _packb({"t": "challenge", "v": 1, "hub": hub_id, "nonce": nonce})


def encode_welcome(node: str, session: str, hb: int, pending: int,
                   limits: dict[str, int]) -> bytes:
    return _packb({"t": "welcome", "node": node, "session": session, "hb": hb,
                   "pending": pending, "limits": limits})


def encode_ok(fid: int | str, **fields: Any) -> bytes:
    frame: dict[str, Any] = {"t": "ok", "id": fid}
    frame.update(fields)
    return _packb(frame)


def encode_error(fid: int | str | None, code: str, msg: str) -> bytes:
    return _packb({"t": "error", "id": fid, "code": code, "msg": msg})


def encode_msg(mid: str, sender: str, body: bytes, ts: int, qos: int,
               sig: bytes | None = None, meta: dict[str, str] | None = None) -> bytes:
    frame: dict[str, Any] = {"t": "msg", "mid": mid, "from": sender, "body": body,
                             "ts": ts, "qos": qos}
    if sig is not None:
        frame["sig"] = sig
    if meta:  # §4.1: a msg carries meta only when it has entries
        frame["meta"] = meta
    return _packb(frame)


def encode_topic_msg(mid: str, sender: str, topic: str, seq: int, body: bytes,
                     ts: int, sig: bytes | None = None,
                     meta: dict[str, str] | None = None) -> bytes:
    frame: dict[str, Any] = {"t": "msg", "mid": mid, "from": sender, "topic": topic,
                             "seq": seq, "body": body, "ts": ts, "qos": 0}
    if sig is not None:
        frame["sig"] = sig
    if meta:
        frame["meta"] = meta
    return _packb(frame)


def encode_history_item(mid: str, sender: str, topic: str, seq: int, body: bytes,
                        ts: int, sig: bytes | None = None,
                        meta: dict[str, str] | None = None) -> bytes:
    """One element of a `history` reply's `msgs` (§5.2): a topic msg's fields."""
    item: dict[str, Any] = {"mid": mid, "from": sender, "topic": topic, "seq": seq,
                            "body": body, "ts": ts}
    if sig is not None:
        item["sig"] = sig
    if meta:
        item["meta"] = meta
    return _packb(item)


def encode_history_ok(fid: int | str, seq: int, items: list[bytes], more: bool) -> bytes:
    """The `ok` of a `history` (§5.2) around already-encoded `msgs` elements
    (`encode_history_item`), without re-encoding them: the caller sized them against
    max_frame_bytes. Its length is `history_ok_overhead(...) + sum(map(len, items))`."""
    head = _packb({"t": "ok", "id": fid, "seq": seq, "more": more})  # a fixmap of 4
    return b"\x85" + head[1:] + b"\xa4msgs" + array_header(len(items)) + b"".join(items)


def history_ok_overhead(fid: int | str, seq: int, n: int) -> int:
    """Bytes of a `history` ok besides its `msgs` elements (see encode_history_ok)."""
    return len(_packb({"t": "ok", "id": fid, "seq": seq, "more": False})) + 5 + len(
        array_header(n))


def array_header(n: int) -> bytes:
    """The msgpack header of an array of `n` elements, for arrays joined from
    already-encoded elements (a §1 batch, a `history` reply's `msgs`)."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def encode_receipt(mid: str, to: str, ts: int) -> bytes:
    return _packb({"t": "receipt", "mid": mid, "to": to, "ts": ts})


def encode_presence(node: str, online: bool, ts: int, topic: str | None = None) -> bytes:
    """§6.1 / §10 `presence` event: a watched node's (or a watched topic's subscriber's)
    change; it answers no request."""
    frame: dict[str, Any] = {"t": "presence", "node": node, "online": online, "ts": ts}
    if topic is not None:
        frame["topic"] = topic
    return _packb(frame)


def encode_bye(reason: str, retry_ms: int | None = None) -> bytes:
    frame: dict[str, Any] = {"t": "bye", "reason": reason}
    if retry_ms is not None:
        frame["retry_ms"] = retry_ms
    return _packb(frame)


def batch_of(encoded: list[bytes]) -> bytes:
    """Join already-encoded frames into one msgpack array (§1 batch) without
    re-encoding them: an array header followed by the frames' bytes."""
    return array_header(len(encoded)) + b"".join(encoded)


def decode_server(data: bytes) -> list[dict[str, Any]]:
    """Decode one WebSocket message from the hub (client side): one frame or a batch.

    Raises `DecodeError` for bytes that are not one msgpack value, or frames that are
    not maps with a str `t`.
    """
    value = _unpack(data)
    frames = value if type(value) is list else [value]
    for f in frames:
        if type(f) is not dict or type(f.get("t")) is not str:
            raise DecodeError("hub frame is not a map with a str t")
    return frames
