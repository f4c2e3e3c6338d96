"""Property tests for protocol.frames: whatever bytes a peer sends, the decoder answers
with frames or FrameErrors, or raises DecodeError, and nothing else (docs/protocol.md §1, §3,
§8); what it does accept satisfies the contract."""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from openred.protocol.errors import ERROR_CODES, DecodeError, FrameError
from openred.protocol.frames import (
    MAX_ACK_MIDS,
    MAX_META_BYTES,
    MAX_SIG_BYTES,
    Ack,
    DecodeLimits,
    Hello,
    Presence,
    Pub,
    Send,
    Sub,
    Unsub,
    decode_client,
    decode_server,
    is_topic,
)
from openred.protocol.identity import is_node_id

UINT64_MAX = 2**64 - 1
DEFAULT_LIMITS = DecodeLimits()
FRAME_TYPES = (Hello, Send, Ack, Sub, Unsub, Pub, Presence, FrameError)
TYPES = ["hello", "send", "ack", "sub", "unsub", "pub", "presence"]
KEYS = ["t", "id", "key", "sig", "token", "batch", "meta", "v", "to", "body", "qos", "ttl",
        "receipt", "mid", "mids", "topic", "since", "nodes"]

# A few hundred examples each, the whole file well under 20 s; no example database
# written to the checkout.
FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ_SLOW = settings(FUZZ, max_examples=150)
FUZZ_BYTES = settings(FUZZ, max_examples=400)


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def valid_id(v: object) -> bool:
    return (type(v) is int and 0 <= v <= UINT64_MAX) or (type(v) is str and len(v) <= 64)


def check_result(out: object, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
    """The decoder's answer satisfies the contract, frame by frame."""
    assert type(out) is list
    for f in out:
        assert type(f) in FRAME_TYPES, f
        if type(f) is FrameError:
            assert f.code in ERROR_CODES
            assert f.id is None or valid_id(f.id)
            assert type(f.msg) is str and f.msg
        elif type(f) is Send:
            assert f.id is None or valid_id(f.id)
            assert is_node_id(f.to)
            assert type(f.body) is bytes and len(f.body) <= limits.max_body_bytes
            assert f.qos in (0, 1) and type(f.qos) is int
            assert f.qos == 0 or f.id is not None
            assert f.ttl is None or (type(f.ttl) is int and 1 <= f.ttl <= UINT64_MAX)
            assert f.sig is None or (type(f.sig) is bytes and len(f.sig) <= MAX_SIG_BYTES)
            assert type(f.receipt) is bool
        elif type(f) is Pub:
            assert f.id is None or valid_id(f.id)
            assert is_topic(f.topic)
            assert type(f.body) is bytes and len(f.body) <= limits.max_body_bytes
        elif type(f) is Sub:
            assert f.id is None or valid_id(f.id)
            assert is_topic(f.topic)
            assert f.since is None or (type(f.since) is int and 0 <= f.since <= UINT64_MAX)
        elif type(f) is Unsub:
            assert f.id is None or valid_id(f.id)
            assert is_topic(f.topic)
        elif type(f) is Ack:
            assert type(f.mids) is list
            assert all(type(m) is str for m in f.mids)
            assert len(f.mids) <= MAX_ACK_MIDS + 1
        elif type(f) is Presence:
            assert valid_id(f.id)
            assert type(f.nodes) is list and len(f.nodes) <= limits.max_presence_nodes
            assert all(type(n) is str for n in f.nodes)
        elif type(f) is Hello:
            assert f.key is None or (type(f.key) is bytes and len(f.key) <= 32)
            assert f.sig is None or (type(f.sig) is bytes and len(f.sig) <= 64)
            assert f.token is None or type(f.token) is str
            assert type(f.batch) is bool
            assert f.meta is None or (type(f.meta) is dict
                                      and len(msgpack.packb(f.meta)) <= MAX_META_BYTES)
            assert f.v is None or (type(f.v) is int and f.v >= 0)


def decode_or_decode_error(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> list[Any]:
    try:
        out = decode_client(data, limits)
    except DecodeError as exc:
        assert exc.close_code == 1007
        return []
    check_result(out, limits)
    return out


# --- random bytes ---------------------------------------------------------------------------

# Headers of containers and of long values, so random tails reach deep into the unpacker.
HEADERS = [b"", b"\x81", b"\x82", b"\x8f", b"\x91", b"\x9f", b"\xdc\x00\x03", b"\xde\x00\x02",
           b"\x81\xa1t", b"\x82\xa1t\xa4send", b"\x83\xa1t\xa3pub\xa5topic", b"\xc4", b"\xd9",
           b"\xdb", b"\xdd", b"\xdf", b"\xc7", b"\xc9", b"\xd4\xff", b"\xd7\xff"]


@FUZZ_BYTES
@given(st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    decode_or_decode_error(data)


@FUZZ_BYTES
@given(st.sampled_from(HEADERS), st.binary(max_size=200))
def test_random_bytes_after_a_header(header: bytes, tail: bytes) -> None:
    decode_or_decode_error(header + tail)


VALID_WIRE = [
    pack({"t": "send", "id": 1, "to": "node-1", "body": b"hello", "qos": 1, "ttl": 5,
          "sig": b"s" * 64, "receipt": True}),
    pack({"t": "pub", "id": "p", "topic": "a/b", "body": b"x" * 40}),
    pack({"t": "hello", "key": bytes(32), "sig": bytes(64), "meta": {"a": [1, 2]}, "v": 1}),
    pack([{"t": "sub", "id": 2, "topic": "t", "since": 3}, {"t": "ack", "mids": ["a", "b"]},
          {"t": "presence", "id": 3, "nodes": ["n1", "n2"]}, {"t": "unsub", "topic": "t"}]),
]


@FUZZ
@given(st.sampled_from(VALID_WIRE), st.data())
def test_mutated_valid_frames(data: bytes, draw: st.DataObject) -> None:
    buf = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 4))):
        op = draw.draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        i = draw.draw(st.integers(0, len(buf) - 1)) if buf else 0
        if op == "flip" and buf:
            buf[i] ^= 1 << draw.draw(st.integers(0, 7))
        elif op == "set" and buf:
            buf[i] = draw.draw(st.integers(0, 255))
        elif op == "insert":
            buf[i:i] = draw.draw(st.binary(min_size=1, max_size=4))
        elif buf:
            del buf[i]
    decode_or_decode_error(bytes(buf))


@FUZZ_BYTES
@given(st.binary(max_size=200))
def test_decode_server_random_bytes(data: bytes) -> None:
    try:
        out = decode_server(data)
    except DecodeError:
        return
    assert type(out) is list
    assert all(type(f) is dict and type(f.get("t")) is str for f in out)


# --- well-typed but wrong frames -----------------------------------------------------------

_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
node_ids = st.text(alphabet=_ALNUM + "._:-", min_size=1, max_size=128)
topics = st.text(alphabet=_ALNUM + "._:/-", min_size=1, max_size=200)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), UINT64_MAX),
    st.sampled_from([0, 1, 2, -1, 64, 1000, 1001, UINT64_MAX]),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from([*TYPES, "node-1", "a/b", "x" * 64, "x" * 65, "x" * 201, "a b", "é"]),
    st.binary(max_size=70),
    st.sampled_from([bytes(32), bytes(64), bytes(65)]),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
    st.builds(msgpack.Timestamp, st.integers(-(2**33), 2**33), st.integers(0, 999_999_999)),
)
containers = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=4)), children,
                        max_size=3),
    ),
    max_leaves=4,
)
# Mostly scalars (what a field usually holds), sometimes a small nested value.
values = st.one_of(scalars, containers)
frames = st.builds(
    lambda t, rest: {**rest, "t": t} if t is not None else rest,
    st.one_of(st.sampled_from(TYPES), st.none(), scalars),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6),
                              st.integers(-(2**63), UINT64_MAX)),
                    values, max_size=6),
)


# Complete valid frames of each type, from which near-valid ones are derived: one or two
# fields replaced by a random value or dropped, so the parsers' field checks are reached.
TEMPLATES: list[dict[str, Any]] = [
    {"t": "hello", "key": bytes(32), "sig": bytes(64), "batch": True, "meta": {"a": 1},
     "v": 1},
    {"t": "hello", "token": "a.b.c", "batch": False},
    {"t": "send", "id": 1, "to": "node-1", "body": b"x", "qos": 1, "ttl": 5, "sig": b"s",
     "receipt": True},
    {"t": "ack", "mid": "m1", "mids": ["m2"]},
    {"t": "sub", "id": "s", "topic": "a/b", "since": 0},
    {"t": "unsub", "id": 0, "topic": "a"},
    {"t": "pub", "id": UINT64_MAX, "topic": "a", "body": b""},
    {"t": "presence", "id": "x" * 64, "nodes": ["n1", "n2"]},
]


@st.composite
def near_valid_frames(draw: st.DrawFn) -> dict[Any, Any]:
    frame = dict(draw(st.sampled_from(TEMPLATES)))
    for key in draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=2, unique=True)):
        if draw(st.integers(0, 3)) == 0:
            frame.pop(key, None)
        else:
            frame[key] = draw(values)
    return frame


def expected_id(frame: dict[Any, Any]) -> object:
    fid = frame.get("id")
    return fid if valid_id(fid) else None


@FUZZ
@given(st.one_of(frames, near_valid_frames()))
def test_random_frames_never_raise(frame: dict[Any, Any]) -> None:
    out = decode_client(pack(frame))
    check_result(out)
    assert len(out) == 1
    res = out[0]
    # §3: replies echo a valid id; an invalid id is answered with nil.
    if type(res) is FrameError or hasattr(res, "id"):
        assert res.id == expected_id(frame)  # type: ignore[union-attr]
    if not valid_id(frame.get("id")) and frame.get("id") is not None:
        assert type(res) is FrameError and res.id is None


@FUZZ_SLOW
@given(st.lists(st.one_of(frames, near_valid_frames(), values), max_size=4))
def test_random_batches_never_raise(batch: list[Any]) -> None:
    out = decode_client(pack(batch))
    check_result(out)
    assert len(out) == len(batch)
    for item, res in zip(batch, out, strict=True):
        if type(item) is not dict:
            assert type(res) is FrameError and res.id is None


@FUZZ_SLOW
@given(st.one_of(frames, near_valid_frames()), st.integers(0, 100), st.integers(0, 5))
def test_random_frames_with_small_limits(frame: dict[Any, Any], body: int, nodes: int) -> None:
    limits = DecodeLimits(max_body_bytes=body, max_presence_nodes=nodes)
    check_result(decode_client(pack(frame), limits), limits)


# --- valid frames round-trip ----------------------------------------------------------------

ids = st.one_of(st.none(), st.integers(0, UINT64_MAX), st.text(max_size=64))
bodies = st.binary(max_size=300)


@st.composite
def sends(draw: st.DrawFn) -> tuple[dict[str, Any], Send]:
    fid = draw(ids)
    qos = draw(st.sampled_from([0, 1])) if fid is not None else 0
    to = draw(node_ids)
    body = draw(bodies)
    ttl = draw(st.one_of(st.none(), st.integers(1, UINT64_MAX)))
    sig = draw(st.one_of(st.none(), st.binary(max_size=MAX_SIG_BYTES)))
    receipt = draw(st.booleans())
    frame: dict[str, Any] = {"t": "send", "to": to, "body": body}
    # Optional fields: absent, or present (nil counts as absent for the optional ones).
    for key, value, default in (("id", fid, None), ("qos", qos, 0), ("ttl", ttl, None),
                                ("sig", sig, None), ("receipt", receipt, False)):
        if value != default or draw(st.booleans()):
            frame[key] = value
    return frame, Send(fid, to, body, qos, ttl, sig, receipt)


@st.composite
def pubs(draw: st.DrawFn) -> tuple[dict[str, Any], Pub]:
    fid = draw(ids)
    topic = draw(topics)
    body = draw(bodies)
    frame: dict[str, Any] = {"t": "pub", "topic": topic, "body": body}
    if fid is not None or draw(st.booleans()):
        frame["id"] = fid
    return frame, Pub(fid, topic, body)


@FUZZ
@given(sends())
def test_valid_send_round_trips(case: tuple[dict[str, Any], Send]) -> None:
    frame, expected = case
    assert decode_client(pack(frame)) == [expected]


@FUZZ
@given(pubs())
def test_valid_pub_round_trips(case: tuple[dict[str, Any], Pub]) -> None:
    frame, expected = case
    assert decode_client(pack(frame)) == [expected]


@FUZZ_SLOW
@given(st.lists(st.one_of(sends(), pubs()), max_size=6))
def test_valid_batches_round_trip_in_order(cases: list[tuple[dict[str, Any], Any]]) -> None:
    assert decode_client(pack([f for f, _ in cases])) == [e for _, e in cases]


@FUZZ
@given(sends(), st.integers(0, 400))
def test_body_limit_is_exact(case: tuple[dict[str, Any], Send], limit: int) -> None:
    frame, expected = case
    assume(frame["body"])
    [res] = decode_client(pack(frame), DecodeLimits(max_body_bytes=limit))
    if len(frame["body"]) <= limit:
        assert res == expected
    else:
        assert type(res) is FrameError
        assert (res.id, res.code) == (expected.id, "too_large")


@FUZZ
@given(sends(), st.data())
def test_every_strict_prefix_of_a_valid_send_is_undecodable(
    case: tuple[dict[str, Any], Send], draw: st.DataObject
) -> None:
    data = pack(case[0])
    n = draw.draw(st.integers(0, len(data) - 1))
    try:
        decode_client(data[:n])
    except DecodeError:
        return
    raise AssertionError(f"prefix of {n} bytes decoded")
