"""Tests for protocol.frames: bytes in, frames out (docs/protocol.md §1-§8), and the hub-frame
encoders. No sockets: every test feeds bytes to the codec and asserts values."""

from __future__ import annotations

import json
import math
import tracemalloc
from typing import Any

import msgpack
import pytest
from openred.protocol.errors import (
    BAD_FRAME,
    CLOSE_UNDECODABLE,
    LIMIT_EXCEEDED,
    TOO_LARGE,
    UNKNOWN_TYPE,
    DecodeError,
    FrameError,
)
from openred.protocol.frames import (
    MAX_ACK_MIDS,
    MAX_META_BYTES,
    MAX_META_DEPTH,
    MAX_PRESENCE_NODES,
    MAX_SIG_BYTES,
    MAX_SINCE,
    Ack,
    DecodeLimits,
    Hello,
    Presence,
    Pub,
    Send,
    Sub,
    Unsub,
    Unwatch,
    Watch,
    batch_of,
    decode_client,
    decode_server,
    encode,
    encode_bye,
    encode_challenge,
    encode_error,
    encode_msg,
    encode_ok,
    encode_receipt,
    encode_topic_msg,
    encode_welcome,
    is_topic,
)

MAX_BODY = DecodeLimits().max_body_bytes
UINT64_MAX = 2**64 - 1
DEFAULT_LIMITS = DecodeLimits()
KEY = bytes(range(32))
SIG = bytes(range(64))
NODE = "node-1"
HEX_NODE = KEY.hex()


def pack(value: Any) -> bytes:
    """What a conforming node sends: msgpack with bin for bytes (§1)."""
    return msgpack.packb(value, use_bin_type=True)


def one(value: Any, limits: DecodeLimits = DEFAULT_LIMITS) -> Any:
    """Decode a single packed frame and return the one result."""
    out = decode_client(pack(value), limits)
    assert len(out) == 1
    return out[0]


def err(value: Any, limits: DecodeLimits = DEFAULT_LIMITS) -> FrameError:
    res = one(value, limits)
    assert type(res) is FrameError, res
    return res


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def send(**kw: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {"t": "send", "to": NODE, "body": b"hi"}
    frame.update(kw)
    return frame


def pub(**kw: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {"t": "pub", "topic": "a/b", "body": b"hi"}
    frame.update(kw)
    return frame


# A valid frame of every client type, used where the type itself does not matter.
VALID_FRAMES: dict[str, dict[str, Any]] = {
    "hello": {"t": "hello", "key": KEY, "sig": SIG},
    "send": {"t": "send", "id": 1, "to": NODE, "body": b"x"},
    "ack": {"t": "ack", "mid": "01ARZ3NDEKTSV4RRFFQ69G5FAV"},
    "sub": {"t": "sub", "id": 1, "topic": "a"},
    "unsub": {"t": "unsub", "id": 1, "topic": "a"},
    "pub": {"t": "pub", "id": 1, "topic": "a", "body": b"x"},
    "presence": {"t": "presence", "id": 1, "nodes": [NODE]},
    "watch": {"t": "watch", "id": 1, "nodes": [NODE], "topic": "a"},
    "unwatch": {"t": "unwatch", "id": 1, "nodes": [NODE]},
}


# --- every client frame type decodes ------------------------------------------------------


class TestHello:
    def test_key_and_sig(self) -> None:
        assert one({"t": "hello", "key": KEY, "sig": SIG}) == Hello(
            key=KEY, sig=SIG, token=None, batch=False, meta=None, v=None
        )

    def test_token(self) -> None:
        assert one({"t": "hello", "token": "a.b.c"}) == Hello(
            key=None, sig=None, token="a.b.c", batch=False, meta=None, v=None
        )

    def test_all_optional_fields(self) -> None:
        meta = {"name": "sensor-7", "tags": ["x", "y"], "n": 3, "on": True, "r": 0.5}
        res = one({"t": "hello", "key": KEY, "sig": SIG, "batch": True, "meta": meta, "v": 1})
        assert res == Hello(key=KEY, sig=SIG, token=None, batch=True, meta=meta, v=1)
        assert type(res.batch) is bool

    def test_batch_false_explicit(self) -> None:
        assert one({"t": "hello", "token": "x", "batch": False}).batch is False

    def test_nil_optional_fields_are_absent(self) -> None:
        res = one({"t": "hello", "token": "x", "key": None, "sig": None, "batch": None,
                   "meta": None, "v": None})
        assert res == Hello(None, None, "x", False, None, None)

    def test_neither_key_nor_token_still_decodes(self) -> None:
        # Refusing it is the handshake's job (§2.4), not the decoder's.
        assert one({"t": "hello"}) == Hello(None, None, None, False, None, None)

    def test_key_of_31_bytes_decodes(self) -> None:
        # The handshake refuses it (tests/protocol/test_handshake.py).
        assert one({"t": "hello", "key": KEY[:31], "sig": SIG}).key == KEY[:31]

    @pytest.mark.parametrize(
        "field",
        [
            {"key": "k" * 32},  # str, not bin
            {"key": bytes(33)},
            {"sig": "s" * 64},
            {"sig": bytes(65)},
            {"token": b"a.b.c"},
            {"token": 5},
            {"batch": 1},
            {"batch": "true"},
            {"meta": [1, 2]},
            {"meta": "m"},
            {"meta": b"m"},
            {"v": -1},
            {"v": "1"},
            {"v": True},
            {"v": 1.0},
        ],
    )
    def test_ill_typed_fields(self, field: dict[str, Any]) -> None:
        frame = {"t": "hello", "token": "x", "id": 3}
        frame.update(field)
        res = err(frame)
        assert (res.id, res.code) == (3, BAD_FRAME)

    def test_meta_exactly_4_kib_accepted(self) -> None:
        meta = {"k": "x" * (MAX_META_BYTES - 6)}  # fixmap 1 + fixstr "k" 2 + str16 3
        assert len(msgpack.packb(meta)) == MAX_META_BYTES
        assert one({"t": "hello", "token": "x", "meta": meta}).meta == meta

    def test_meta_over_4_kib_refused(self) -> None:
        meta = {"k": "x" * (MAX_META_BYTES - 5)}
        assert len(msgpack.packb(meta)) == MAX_META_BYTES + 1
        res = err({"t": "hello", "token": "x", "meta": meta})
        assert res.id is None
        assert res.code == TOO_LARGE



def nested(depth: int, leaf: Any = 1) -> dict[str, Any]:
    """A meta whose maps and arrays are nested `depth` deep (meta itself the first)."""
    value: Any = leaf
    for level in range(depth - 1, 0, -1):
        value = {"a": value} if level % 2 else [value]
    return {"m": value}


class TestHelloMeta:
    """§3 hello: `meta` is JSON-representable (the store keeps it as JSON, the admin API
    shows it as JSON), else the hello is refused with `bad_frame` naming `meta`."""

    def refused(self, meta: Any) -> str:
        res = err({"t": "hello", "token": "x", "id": 3, "meta": meta})
        assert (res.id, res.code) == (3, BAD_FRAME)
        assert res.msg.startswith("meta: ")
        return res.msg

    def test_every_json_kind_is_accepted(self) -> None:
        meta = {"s": "é\x00", "i": -(2**63), "u": UINT64_MAX, "f": -0.5, "t": True,
                "n": None, "l": [1, "a", [], {}], "m": {"k": {"k": []}}, "": ""}
        assert one({"t": "hello", "token": "x", "meta": meta}).meta == meta
        json.dumps(meta, allow_nan=False)

    def test_int_beyond_uint64_cannot_even_be_sent(self) -> None:
        with pytest.raises(OverflowError):
            pack({"t": "hello", "meta": {"i": 2**64}})

    @pytest.mark.parametrize("meta", [{b"k": 1}, {"a": {b"k": 1}}, {"a": [{b"k": 1}]}])
    def test_bin_key(self, meta: Any) -> None:
        assert self.refused(meta) == "meta: a map key is bin, not a str"

    @pytest.mark.parametrize("meta", [{1: "a"}, {"a": {-1: 1}}, {None: 1}, {1.5: 1},
                                      {True: 1}])
    def test_other_keys_that_are_not_str(self, meta: Any) -> None:
        assert self.refused(meta).endswith("not a str")

    @pytest.mark.parametrize("meta", [{"k": b"v"}, {"k": [b""]}, {"a": {"b": b"x"}}])
    def test_bin_value(self, meta: Any) -> None:
        assert self.refused(meta) == "meta: bin is not JSON"

    @pytest.mark.parametrize("meta", [{"e": msgpack.ExtType(5, b"abc")},
                                      {"e": [msgpack.ExtType(127, b"")]}])
    def test_ext(self, meta: Any) -> None:
        assert self.refused(meta) == "meta: ext is not JSON"

    @pytest.mark.parametrize("meta", [{"ts": msgpack.Timestamp(1, 2)},
                                      {"a": {"ts": msgpack.Timestamp(0)}}])
    def test_timestamp(self, meta: Any) -> None:
        assert self.refused(meta) == "meta: a timestamp is not JSON"

    @pytest.mark.parametrize("x", [math.nan, math.inf, -math.inf])
    def test_nan_and_infinities(self, x: float) -> None:
        assert self.refused({"x": x}) == "meta: NaN or Infinity is not JSON"
        assert self.refused({"l": [[x]]}) == "meta: NaN or Infinity is not JSON"

    def test_nan_as_float32(self) -> None:
        data = b"\x83\xa1t\xa5hello\xa5token\xa1x\xa4meta\x81\xa1x\xca\x7f\xc0\x00\x00"
        res = decode_client(data)[0]
        assert type(res) is FrameError and res.msg == "meta: NaN or Infinity is not JSON"

    def test_depth_16_accepted(self) -> None:
        meta = nested(MAX_META_DEPTH)
        assert MAX_META_DEPTH == 16
        assert one({"t": "hello", "token": "x", "meta": meta}).meta == meta

    @pytest.mark.parametrize("meta", [nested(17), nested(16, []), nested(16, {}),
                                      nested(100), nested(990)])
    def test_deeper_than_16_refused(self, meta: Any) -> None:
        assert self.refused(meta) == "meta: nested deeper than 16 levels"

    def test_depth_is_checked_before_the_size(self) -> None:
        # ~990 levels in 4 KiB: refused for its depth, never by re-packing it.
        data = b"\x82\xa1t\xa5hello\xa4meta" + b"\x81\xa1a" * 990 + b"\xc0"
        res = decode_client(data)[0]
        assert type(res) is FrameError and res.msg == "meta: nested deeper than 16 levels"


class TestSend:
    def test_minimal_qos0(self) -> None:
        assert one({"t": "send", "to": NODE, "body": b"hi"}) == Send(
            id=None, to=NODE, body=b"hi", qos=0, ttl=None, sig=None, receipt=False
        )

    def test_qos0_explicit_with_id(self) -> None:
        assert one(send(id=7, qos=0)) == Send(7, NODE, b"hi", 0, None, None, False)

    def test_qos1_with_every_option(self) -> None:
        frame = send(id="req-1", qos=1, ttl=60, sig=SIG, receipt=True)
        assert one(frame) == Send(
            id="req-1", to=NODE, body=b"hi", qos=1, ttl=60, sig=SIG, receipt=True
        )

    def test_hex_node_id(self) -> None:
        assert one(send(to=HEX_NODE)).to == HEX_NODE

    def test_empty_body(self) -> None:
        assert one(send(body=b"")).body == b""

    def test_nil_qos_is_qos0(self) -> None:
        assert one(send(qos=None)).qos == 0

    def test_ttl_one_accepted(self) -> None:
        assert one(send(ttl=1)).ttl == 1

    def test_sig_of_max_bytes_accepted_one_more_refused(self) -> None:
        assert one(send(sig=bytes(MAX_SIG_BYTES))).sig == bytes(MAX_SIG_BYTES)
        assert err(send(sig=bytes(MAX_SIG_BYTES + 1))).code == BAD_FRAME

    def test_qos1_without_id_is_bad_frame(self) -> None:
        res = err(send(qos=1))
        assert (res.id, res.code) == (None, BAD_FRAME)

    def test_qos1_with_nil_id_is_bad_frame(self) -> None:
        res = err(send(qos=1, id=None))
        assert (res.id, res.code) == (None, BAD_FRAME)

    @pytest.mark.parametrize(
        "field",
        [
            {"body": "hi"},  # str body (§3 example)
            {"body": None},
            {"body": 5},
            {"body": [1]},
            {"to": 5},  # int node id (§3 example)
            {"to": b"node-1"},
            {"to": None},
            {"to": ""},
            {"to": "a b"},
            {"to": "x" * 129},
            {"to": "$admin"},
            {"to": "nœud"},
            {"to": "node/1"},
            {"to": "node\n"},
            {"qos": 2},
            {"qos": -1},
            {"qos": True},
            {"qos": False},
            {"qos": "1"},
            {"qos": 1.0},
            {"ttl": 0},
            {"ttl": -1},
            {"ttl": "60"},
            {"ttl": 1.5},
            {"ttl": True},
            {"sig": "sig"},
            {"receipt": 1},
            {"receipt": "yes"},
        ],
    )
    def test_ill_typed_fields(self, field: dict[str, Any]) -> None:
        res = err(send(id=9, **field))
        assert (res.id, res.code) == (9, BAD_FRAME)

    @pytest.mark.parametrize("missing", ["to", "body"])
    def test_missing_required(self, missing: str) -> None:
        frame = send(id="m")
        del frame[missing]
        res = err(frame)
        assert (res.id, res.code) == ("m", BAD_FRAME)

    def test_to_of_128_chars_accepted(self) -> None:
        assert one(send(to="x" * 128)).to == "x" * 128

    def test_body_exactly_max_accepted(self) -> None:
        body = bytes(MAX_BODY)
        assert one(send(id=1, body=body)).body == body

    def test_body_one_over_max_is_too_large(self) -> None:
        res = err(send(id=1, body=bytes(MAX_BODY + 1)))
        assert (res.id, res.code) == (1, TOO_LARGE)

    def test_body_too_large_without_id(self) -> None:
        res = err(send(body=bytes(MAX_BODY + 1)))
        assert (res.id, res.code) == (None, TOO_LARGE)

    def test_custom_body_limit(self) -> None:
        limits = DecodeLimits(max_body_bytes=10)
        assert one(send(body=bytes(10)), limits).body == bytes(10)
        res = err(send(id="x", body=bytes(11)), limits)
        assert (res.id, res.code) == ("x", TOO_LARGE)


class TestAck:
    def test_mid(self) -> None:
        assert one({"t": "ack", "mid": "M1"}) == Ack(["M1"])

    def test_mids(self) -> None:
        assert one({"t": "ack", "mids": ["M1", "M2", "M3"]}) == Ack(["M1", "M2", "M3"])

    def test_mid_and_mids_both(self) -> None:
        assert one({"t": "ack", "mid": "M0", "mids": ["M1"]}).mids == ["M0", "M1"]

    def test_empty_mids(self) -> None:
        assert one({"t": "ack", "mids": []}) == Ack([])

    def test_max_mids_accepted_one_more_refused(self) -> None:
        assert len(one({"t": "ack", "mids": ["m"] * MAX_ACK_MIDS}).mids) == MAX_ACK_MIDS
        assert err({"t": "ack", "mids": ["m"] * (MAX_ACK_MIDS + 1)}).code == BAD_FRAME

    @pytest.mark.parametrize(
        "fields",
        [
            {},
            {"mid": 5},
            {"mid": b"M1"},
            {"mids": "M1"},  # mids not a list
            {"mids": {"a": 1}},
            {"mids": ["M1", 2]},  # mids containing an int
            {"mids": [None]},
            {"mid": "M1", "mids": "M2"},
        ],
    )
    def test_bad(self, fields: dict[str, Any]) -> None:
        res = err({"t": "ack", "id": 4, **fields})
        assert (res.id, res.code) == (4, BAD_FRAME)

    def test_ack_with_id_keeps_it_for_the_ok(self) -> None:
        # §3: "A client frame MAY carry id. When it does, the hub answers that frame with
        # exactly one ok or error". An ack with an id must therefore keep it, or the hub
        # can never send the ok that the client waits for.
        res = one({"t": "ack", "id": 11, "mid": "M1"})
        assert type(res) is Ack
        assert getattr(res, "id", None) == 11


class TestSub:
    def test_without_since(self) -> None:
        assert one({"t": "sub", "topic": "a/b"}) == Sub(id=None, topic="a/b", since=None)

    def test_with_since(self) -> None:
        assert one({"t": "sub", "id": 2, "topic": "a/b", "since": 41}) == Sub(2, "a/b", 41)

    def test_since_zero(self) -> None:
        assert one({"t": "sub", "topic": "a", "since": 0}).since == 0

    def test_since_int64_max(self) -> None:
        # §3: a seq is a signed 64-bit value in the store.
        assert MAX_SINCE == 2**63 - 1
        assert one({"t": "sub", "topic": "a", "since": 2**63 - 1}).since == 2**63 - 1

    @pytest.mark.parametrize("since", [2**63, UINT64_MAX, -1, -(2**63)])
    def test_since_out_of_range(self, since: int) -> None:
        res = err({"t": "sub", "id": 2, "topic": "a", "since": since})
        assert (res.id, res.code, res.msg) == (2, BAD_FRAME, "since: not an int in 0..2^63-1")

    @pytest.mark.parametrize("since", [-1, "1", 1.0, True, [1], b"1"])
    def test_bad_since(self, since: Any) -> None:
        res = err({"t": "sub", "id": 2, "topic": "a", "since": since})
        assert (res.id, res.code) == (2, BAD_FRAME)


class TestUnsub:
    def test_unsub(self) -> None:
        assert one({"t": "unsub", "topic": "a/b"}) == Unsub(id=None, topic="a/b")

    def test_unsub_with_id(self) -> None:
        assert one({"t": "unsub", "id": "u", "topic": "x.y:z"}) == Unsub("u", "x.y:z")


class TestPub:
    def test_pub(self) -> None:
        assert one(pub()) == Pub(id=None, topic="a/b", body=b"hi")

    def test_pub_with_id(self) -> None:
        assert one(pub(id=UINT64_MAX, body=b"\x00\xff")) == Pub(UINT64_MAX, "a/b", b"\x00\xff")

    def test_body_exactly_max_accepted(self) -> None:
        assert one(pub(body=bytes(MAX_BODY))).body == bytes(MAX_BODY)

    def test_body_one_over_max_is_too_large(self) -> None:
        res = err(pub(id="p", body=bytes(MAX_BODY + 1)))
        assert (res.id, res.code) == ("p", TOO_LARGE)

    def test_custom_body_limit(self) -> None:
        limits = DecodeLimits(max_body_bytes=3)
        assert one(pub(body=b"abc"), limits).body == b"abc"
        assert err(pub(body=b"abcd"), limits).code == TOO_LARGE

    @pytest.mark.parametrize("body", ["hi", None, 1, [b"x"]])
    def test_bad_body(self, body: Any) -> None:
        res = err(pub(id=1, body=body))
        assert (res.id, res.code) == (1, BAD_FRAME)

    def test_missing_body(self) -> None:
        assert err({"t": "pub", "id": 1, "topic": "a"}).code == BAD_FRAME


class TestTopics:
    @pytest.mark.parametrize(
        "topic",
        ["a", "A", "0", "a/b/c", "x.y:z_w-v", "/", "-", "x" * 200,
         "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:/-"],
    )
    @pytest.mark.parametrize("t", ["sub", "unsub", "pub"])
    def test_valid(self, t: str, topic: str) -> None:
        frame: dict[str, Any] = {"t": t, "id": 1, "topic": topic}
        if t == "pub":
            frame["body"] = b""
        assert one(frame).topic == topic
        assert is_topic(topic)

    @pytest.mark.parametrize(
        "topic",
        ["", "x" * 201, "a b", " ", "é", "\uff41", "\u0663", "a\n", "a\x00", "a*", "a#", "a+b",
         "a\\b", "a,b", "$sys", b"a", 1, None, ["a"]],
    )
    @pytest.mark.parametrize("t", ["sub", "unsub", "pub"])
    def test_invalid(self, t: str, topic: Any) -> None:
        frame: dict[str, Any] = {"t": t, "id": 1, "topic": topic}
        if t == "pub":
            frame["body"] = b""
        res = err(frame)
        assert (res.id, res.code) == (1, BAD_FRAME)
        assert not is_topic(topic)

    @pytest.mark.parametrize("t", ["sub", "unsub", "pub"])
    def test_missing(self, t: str) -> None:
        frame: dict[str, Any] = {"t": t, "id": 1, "body": b""}
        assert err(frame).code == BAD_FRAME


class TestPresence:
    def test_presence(self) -> None:
        res = one({"t": "presence", "id": 5, "nodes": [NODE, HEX_NODE]})
        assert res == Presence(id=5, nodes=[NODE, HEX_NODE])

    def test_empty(self) -> None:
        assert one({"t": "presence", "id": "p", "nodes": []}) == Presence("p", [])

    def test_1000_nodes_accepted(self) -> None:
        nodes = [f"n{i}" for i in range(MAX_PRESENCE_NODES)]
        assert one({"t": "presence", "id": 1, "nodes": nodes}).nodes == nodes

    def test_1001_nodes_limit_exceeded(self) -> None:
        nodes = [f"n{i}" for i in range(MAX_PRESENCE_NODES + 1)]
        res = err({"t": "presence", "id": 1, "nodes": nodes})
        assert (res.id, res.code) == (1, LIMIT_EXCEEDED)

    def test_custom_limit(self) -> None:
        limits = DecodeLimits(max_presence_nodes=2)
        assert one({"t": "presence", "id": 1, "nodes": ["a", "b"]}, limits).nodes == ["a", "b"]
        assert err({"t": "presence", "id": 1, "nodes": ["a", "b", "c"]}, limits).code == (
            LIMIT_EXCEEDED
        )

    @pytest.mark.parametrize("nodes", ["n1", None, 5, {"n1": True}, [1], ["a", None], [b"a"]])
    def test_bad_nodes(self, nodes: Any) -> None:
        res = err({"t": "presence", "id": 1, "nodes": nodes})
        assert (res.id, res.code) == (1, BAD_FRAME)

    def test_missing_nodes(self) -> None:
        assert err({"t": "presence", "id": 1}).code == BAD_FRAME

    def test_without_id_is_bad_frame(self) -> None:
        # §6 shows id as part of presence (the reply is an ok carrying "online").
        res = err({"t": "presence", "nodes": [NODE]})
        assert (res.id, res.code) == (None, BAD_FRAME)


# --- ids (§3) --------------------------------------------------------------------------


VALID_IDS = [0, 1, 255, 2**32, UINT64_MAX, "", "a", "req-1", "x" * 64, "é" * 64]
INVALID_IDS = [True, False, -1, -(2**63), 1.5, 0.0, "x" * 65, "é" * 65, [1], [], {"a": 1},
               b"id", msgpack.ExtType(1, b"x")]


@pytest.mark.parametrize("fid", VALID_IDS)
@pytest.mark.parametrize("t", ["send", "sub", "unsub", "pub", "presence"])
def test_valid_ids_are_kept(t: str, fid: Any) -> None:
    frame = dict(VALID_FRAMES[t], id=fid)
    res = one(frame)
    assert type(res) is not FrameError, res
    assert res.id == fid
    assert type(res.id) is type(fid)


@pytest.mark.parametrize("fid", VALID_IDS)
def test_valid_ids_are_echoed_in_frame_errors(fid: Any) -> None:
    assert err({"t": "send", "id": fid, "to": 5, "body": b""}).id == fid
    assert err({"t": "nope", "id": fid}).id == fid
    assert err({"id": fid}).id == fid


@pytest.mark.parametrize("fid", INVALID_IDS, ids=repr)
@pytest.mark.parametrize("t", sorted(VALID_FRAMES))
def test_invalid_id_is_bad_frame_with_nil_id(t: str, fid: Any) -> None:
    res = err(dict(VALID_FRAMES[t], id=fid))
    assert res.id is None
    assert res.code == BAD_FRAME


@pytest.mark.parametrize("fid", INVALID_IDS, ids=repr)
def test_invalid_id_wins_over_other_errors(fid: Any) -> None:
    for frame in ({"t": "nope"}, {}, {"t": 5}, {"t": "send"}):
        res = err(dict(frame, id=fid))
        assert (res.id, res.code) == (None, BAD_FRAME)


def test_nil_id_is_no_id() -> None:
    assert one({"t": "sub", "id": None, "topic": "a"}).id is None


# --- frame-level errors ----------------------------------------------------------------


NOT_MAPS = [0, 5, -1, "send", b"\x80", None, True, 1.5, msgpack.ExtType(1, b"")]


@pytest.mark.parametrize("value", NOT_MAPS, ids=repr)
def test_not_a_map_at_top_level(value: Any) -> None:
    out = decode_client(pack(value))
    assert len(out) == 1
    assert type(out[0]) is FrameError
    assert (out[0].id, out[0].code) == (None, BAD_FRAME)


@pytest.mark.parametrize("value", [*NOT_MAPS, [], [{"t": "ack", "mid": "m"}]], ids=repr)
def test_not_a_map_inside_a_batch(value: Any) -> None:
    out = decode_client(pack([value]))
    assert len(out) == 1
    assert type(out[0]) is FrameError
    assert (out[0].id, out[0].code) == (None, BAD_FRAME)


def test_missing_t() -> None:
    res = err({"id": 3, "to": NODE, "body": b""})
    assert (res.id, res.code) == (3, BAD_FRAME)
    assert err({})[:2] == (None, BAD_FRAME)


@pytest.mark.parametrize("t", [1, None, b"send", True, ["send"], {"t": "send"}, 1.0])
def test_t_not_str(t: Any) -> None:
    res = err({"t": t, "id": "q", "to": NODE, "body": b""})
    assert (res.id, res.code) == ("q", BAD_FRAME)


@pytest.mark.parametrize(
    "t", ["", "nope", "SEND", "Send", "send ", "challenge", "welcome", "ok", "error", "msg",
          "receipt", "bye"]
)
def test_unknown_type(t: str) -> None:
    res = err({"t": t, "id": 8})
    assert (res.id, res.code) == (8, UNKNOWN_TYPE)
    assert err({"t": t}).id is None


@pytest.mark.parametrize("t", sorted(VALID_FRAMES))
def test_unknown_keys_are_ignored(t: str) -> None:
    frame = VALID_FRAMES[t]
    noisy = dict(frame, zz=1, extra={"a": [1, 2]}, _=b"\x00", T="pub", from_="x")
    noisy[5] = "int key"  # non-str keys are unknown keys too
    assert one(noisy) == one(frame)
    assert type(one(frame)) is not FrameError


def test_frame_with_from_key_does_not_set_anything() -> None:
    # §4: `from` is never a value a frame set; Send has no such field at all.
    res = one(send(**{"from": "mallory"}))
    assert type(res) is Send
    assert "from" not in res._fields


# --- batches (§1) ----------------------------------------------------------------------


def test_batch_decodes_in_order_with_errors_interleaved() -> None:
    data = pack([
        {"t": "send", "id": 1, "to": NODE, "body": b"a"},
        7,
        {"t": "sub", "id": 2, "topic": "t"},
        {"t": "nope", "id": 3},
        {"t": "ack", "mids": ["m1", "m2"]},
        {"t": "pub", "id": 4, "topic": "bad topic", "body": b""},
        {"t": "pub", "id": 5, "topic": "t", "body": b"b"},
        {"t": "presence", "id": 6, "nodes": ["x"] * 1001},
        {"t": "send", "id": True, "to": NODE, "body": b""},
        {"t": "pub", "id": 7, "topic": "t", "body": bytes(MAX_BODY + 1)},
        {"t": "unsub", "topic": "t"},
        {"t": "hello", "token": "tok"},
    ])
    out = decode_client(data)
    assert [type(f).__name__ for f in out] == [
        "Send", "FrameError", "Sub", "FrameError", "Ack", "FrameError", "Pub", "FrameError",
        "FrameError", "FrameError", "Unsub", "Hello",
    ]
    assert out[0] == Send(1, NODE, b"a", 0, None, None, False)
    assert out[1][:2] == (None, BAD_FRAME)
    assert out[2] == Sub(2, "t", None)
    assert out[3][:2] == (3, UNKNOWN_TYPE)
    assert out[4] == Ack(["m1", "m2"])
    assert out[5][:2] == (4, BAD_FRAME)
    assert out[6] == Pub(5, "t", b"b")
    assert out[7][:2] == (6, LIMIT_EXCEEDED)
    assert out[8][:2] == (None, BAD_FRAME)
    assert out[9][:2] == (7, TOO_LARGE)
    assert out[10] == Unsub(None, "t")
    assert out[11] == Hello(None, None, "tok", False, None, None)


def test_empty_batch() -> None:
    assert decode_client(pack([])) == []


def test_batch_of_one_equals_single_frame() -> None:
    frame = VALID_FRAMES["send"]
    assert decode_client(pack([frame])) == decode_client(pack(frame))


def test_large_batch_keeps_order() -> None:
    frames = [{"t": "sub", "id": i, "topic": f"t{i}"} for i in range(5000)]
    out = decode_client(pack(frames))
    assert out == [Sub(i, f"t{i}", None) for i in range(5000)]


# --- undecodable messages: DecodeError, close 1007 (§1) ----------------------------------


def decode_error(data: bytes) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode_client(data)
    assert info.value.close_code == CLOSE_UNDECODABLE
    return info.value


@pytest.mark.parametrize(
    "frame",
    [VALID_FRAMES["send"], [VALID_FRAMES["sub"], VALID_FRAMES["pub"]],
     {"t": "hello", "key": KEY, "sig": SIG, "meta": {"a": [1, 2.5, None]}, "v": 1},
     send(id=UINT64_MAX, body=bytes(300))],
)
def test_every_prefix_of_a_valid_frame_is_undecodable(frame: Any) -> None:
    data = pack(frame)
    decode_client(data)  # the whole is fine
    for n in range(len(data)):
        decode_error(data[:n])


def test_empty_bytes() -> None:
    decode_error(b"")


@pytest.mark.parametrize("extra", [b"\x00", b"\xc0", b"\x90", pack(VALID_FRAMES["ack"])])
def test_trailing_bytes(extra: bytes) -> None:
    decode_error(pack(VALID_FRAMES["ack"]) + extra)


@pytest.mark.parametrize(
    "data",
    [
        b"\xa2\xff\xfe",  # top-level str
        b"\xa3\xed\xa0\x80",  # an encoded UTF-16 surrogate
        b"\xa2\xc3\x28",
        b"\x82\xa1t\xa4send\xa2to\xa2\xff\xfe",  # in a field value
        b"\x81\xa2\xff\xfe\x01",  # in a map key
        b"\x81\xa1t\xa3\xc3\x28a",  # in t
    ],
)
def test_invalid_utf8_in_str(data: bytes) -> None:
    decode_error(data)


@pytest.mark.parametrize("depth", [1025, 10_000, 100_000])
def test_deep_nesting_of_arrays(depth: int) -> None:
    decode_error(b"\x91" * depth + b"\xc0")


@pytest.mark.parametrize("depth", [1025, 10_000])
def test_deep_nesting_of_maps(depth: int) -> None:
    decode_error(b"\x81\xa1a" * depth + b"\xc0")


def test_deep_nesting_inside_a_field() -> None:
    decode_error(b"\x82\xa1t\xa5hello\xa4meta" + b"\x81\xa1a" * 10_000 + b"\xc0")


def test_moderate_nesting_never_escapes_as_another_exception() -> None:
    # Depths around the unpacker's stack limit: either a decoded result or DecodeError,
    # never RecursionError / ValueError from re-packing `meta`.
    for depth in range(990, 1030):
        data = b"\x82\xa1t\xa5hello\xa4meta\x81\xa1a" + b"\x91" * depth + b"\x80"
        try:
            out = decode_client(data)
        except DecodeError:
            continue
        assert type(out[0]) in (Hello, FrameError)


@pytest.mark.parametrize(
    "data",
    [
        b"\xdb\xff\xff\xff\xff",  # str32 claiming 4 GiB
        b"\xc6\xff\xff\xff\xff",  # bin32
        b"\xdd\xff\xff\xff\xff",  # array32
        b"\xdf\xff\xff\xff\xff",  # map32
        b"\xc9\xff\xff\xff\xff\x01",  # ext32
        b"\xdd\xff\xff\xff\xff" + b"\xc0" * 100,
        b"\x82\xa1t\xa4send\xa4body\xc6\xff\xff\xff\xff",
        b"\x91\xdf\xff\xff\xff\xff",
        b"\xda\xff\xff",  # str16
        b"\xdc\xff\xff",  # array16
    ],
)
def test_huge_declared_lengths_fail_without_allocating(data: bytes) -> None:
    tracemalloc.start()
    try:
        decode_error(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_decode_error_is_not_recursion_error() -> None:
    with pytest.raises(DecodeError) as info:
        decode_client(b"\x91" * 10_000 + b"\xc0")
    assert not isinstance(info.value, RecursionError)
    assert info.value.__cause__ is None


@pytest.mark.parametrize(
    "data",
    [
        b"\x81\x91\x01\x01",  # an array as a map key
        b"\x81\x81\x01\x01\x01",  # a map as a map key
        b"\x91\x81\x91\x01\x01",
    ],
)
def test_unhashable_map_keys(data: bytes) -> None:
    # Valid msgpack that Python cannot hold as a dict: refused, one way or the other.
    try:
        out = decode_client(data)
    except DecodeError:
        return
    assert all(type(f) is FrameError for f in out)


# --- ext types and timestamps ----------------------------------------------------------


EXTS = [msgpack.ExtType(1, b"abc"), msgpack.ExtType(0, b""), msgpack.ExtType(127, b"x" * 300),
        msgpack.Timestamp(0, 0), msgpack.Timestamp(2**34, 5), msgpack.Timestamp(-1, 0)]


def ext_outcome(data: bytes) -> list[Any] | None:
    """The codec's answer: a list of frames/FrameErrors, or None for DecodeError."""
    try:
        out = decode_client(data)
    except DecodeError:
        return None
    assert type(out) is list
    for f in out:
        assert type(f) in (FrameError, Hello, Send, Ack, Sub, Unsub, Pub, Presence, Watch,
                           Unwatch)
    return out


@pytest.mark.parametrize("ext", EXTS, ids=repr)
def test_ext_at_top_level(ext: Any) -> None:
    out = ext_outcome(pack(ext))
    assert out is None or out[0][:2] == (None, BAD_FRAME)
    out = ext_outcome(pack([ext, VALID_FRAMES["ack"]]))
    assert out is None or (out[0][:2] == (None, BAD_FRAME) and type(out[1]) is Ack)


@pytest.mark.parametrize("ext", EXTS, ids=repr)
@pytest.mark.parametrize("field", ["t", "id", "to", "body", "qos", "ttl", "sig", "receipt"])
def test_ext_in_send_fields(ext: Any, field: str) -> None:
    frame = send(id=1, qos=1)
    frame[field] = ext
    out = ext_outcome(pack(frame))
    if out is not None:
        assert type(out[0]) is FrameError
        assert out[0].code == BAD_FRAME
        assert out[0].id == (None if field == "id" else 1)


@pytest.mark.parametrize("ext", EXTS, ids=repr)
@pytest.mark.parametrize("t", sorted(VALID_FRAMES))
def test_ext_as_unknown_key_value(ext: Any, t: str) -> None:
    out = ext_outcome(pack(dict(VALID_FRAMES[t], extra=ext)))
    assert out is None or out == decode_client(pack(VALID_FRAMES[t]))


@pytest.mark.parametrize(
    "data",
    [
        b"\xd4\xff\x00",  # timestamp ext with a 1-byte payload (invalid)
        b"\xc7\x03\xff\x00\x00\x00",  # timestamp ext with a 3-byte payload
        b"\xd7\xff" + b"\xff" * 8,  # timestamp64 with nanoseconds out of range
        b"\x81\xa1t\xd4\xff\x00",
        b"\xd4\xfb\x00",  # a reserved (negative) ext type code
        b"\x82\xa1t\xa4sync\xa2id\xd5\x80\x00\x00",
    ],
)
def test_malformed_timestamps(data: bytes) -> None:
    ext_outcome(data)


# --- encoders: hub frames decode to exactly the docs/protocol.md shape -----------------------


def shape(frame: dict[str, Any]) -> dict[str, type]:
    return {k: type(v) for k, v in frame.items()}


def test_encode_challenge() -> None:
    nonce = bytes(range(32))
    frame = unpack(encode_challenge("hub-1", nonce))
    assert frame == {"t": "challenge", "v": 1, "hub": "hub-1", "nonce": nonce}
    assert shape(frame) == {"t": str, "v": int, "hub": str, "nonce": bytes}


def test_encode_welcome() -> None:
    limits = {"max_frame_bytes": 131072, "max_body_bytes": 65536, "msgs_per_s": 100,
              "burst": 200, "max_topics": 1000}
    frame = unpack(encode_welcome(HEX_NODE, "sess-1", 20, 3, limits))
    assert frame == {"t": "welcome", "node": HEX_NODE, "session": "sess-1", "hb": 20,
                     "pending": 3, "limits": limits}
    assert shape(frame) == {"t": str, "node": str, "session": str, "hb": int,
                            "pending": int, "limits": dict}


@pytest.mark.parametrize("fid", [0, 7, UINT64_MAX, "", "req-1", "x" * 64])
def test_encode_ok(fid: int | str) -> None:
    assert unpack(encode_ok(fid)) == {"t": "ok", "id": fid}
    frame = unpack(encode_ok(fid, mid="M", status="sent"))
    assert frame == {"t": "ok", "id": fid, "mid": "M", "status": "sent"}
    assert type(frame["id"]) is type(fid)


def test_encode_ok_pub_and_sub_and_presence_fields() -> None:
    assert unpack(encode_ok(1, mid="M", seq=5)) == {"t": "ok", "id": 1, "mid": "M", "seq": 5}
    assert unpack(encode_ok(2, seq=9, recovered=False)) == {
        "t": "ok", "id": 2, "seq": 9, "recovered": False}
    online = {"a": True, HEX_NODE: False}
    assert unpack(encode_ok(3, online=online)) == {"t": "ok", "id": 3, "online": online}


@pytest.mark.parametrize("fid", [None, 0, 5, "x", UINT64_MAX])
def test_encode_error_always_has_id(fid: Any) -> None:
    data = encode_error(fid, BAD_FRAME, "t: missing")
    frame = unpack(data)
    assert frame == {"t": "error", "id": fid, "code": BAD_FRAME, "msg": "t: missing"}
    assert "id" in frame
    assert shape(frame) == {"t": str, "id": type(fid), "code": str, "msg": str}


def test_encode_error_nil_id_is_msgpack_nil() -> None:
    assert b"\xa2id\xc0" in encode_error(None, TOO_LARGE, "m")


def test_encode_msg_direct() -> None:
    frame = unpack(encode_msg("M1", HEX_NODE, b"\x00body", 1_700_000_000_000, 1))
    assert frame == {"t": "msg", "mid": "M1", "from": HEX_NODE, "body": b"\x00body",
                     "ts": 1_700_000_000_000, "qos": 1}
    assert shape(frame) == {"t": str, "mid": str, "from": str, "body": bytes, "ts": int,
                            "qos": int}


def test_encode_msg_with_sig() -> None:
    frame = unpack(encode_msg("M1", "$admin", b"", 1, 0, sig=SIG))
    assert frame["sig"] == SIG
    assert type(frame["sig"]) is bytes
    assert frame["from"] == "$admin"
    assert "sig" not in unpack(encode_msg("M1", "a", b"", 1, 0))


def test_encode_topic_msg() -> None:
    frame = unpack(encode_topic_msg("M2", NODE, "a/b", 42, b"pl", 123))
    assert frame == {"t": "msg", "mid": "M2", "from": NODE, "topic": "a/b", "seq": 42,
                     "body": b"pl", "ts": 123, "qos": 0}
    assert shape(frame) == {"t": str, "mid": str, "from": str, "topic": str, "seq": int,
                            "body": bytes, "ts": int, "qos": int}


def test_encode_receipt() -> None:
    frame = unpack(encode_receipt("M3", NODE, 99))
    assert frame == {"t": "receipt", "mid": "M3", "to": NODE, "ts": 99}
    assert shape(frame) == {"t": str, "mid": str, "to": str, "ts": int}


def test_encode_bye() -> None:
    assert unpack(encode_bye("replaced")) == {"t": "bye", "reason": "replaced"}
    assert unpack(encode_bye("slow_consumer")) == {"t": "bye", "reason": "slow_consumer"}
    frame = unpack(encode_bye("shutdown", retry_ms=1500))
    assert frame == {"t": "bye", "reason": "shutdown", "retry_ms": 1500}
    assert type(frame["retry_ms"]) is int


def test_encode_generic_uses_bin_for_bytes() -> None:
    data = encode({"t": "hello", "key": KEY, "sig": SIG, "v": 1})
    assert unpack(data) == {"t": "hello", "key": KEY, "sig": SIG, "v": 1}
    assert b"\xc4\x20" + KEY in data  # bin8 header, not str
    assert one({"t": "hello", "key": KEY, "sig": SIG, "v": 1}) == decode_client(data)[0]


def test_encoders_use_bin_not_str_for_bytes() -> None:
    assert b"\xc4\x04\x00\x01\x02\x03" in encode_challenge("h", bytes(range(4)))
    assert b"\xc4\x02hi" in encode_msg("m", "f", b"hi", 1, 0)
    assert b"\xc4\x02hi" in encode_topic_msg("m", "f", "t", 1, b"hi", 1)


def test_encoders_output_is_one_decodable_value() -> None:
    for data in (encode_challenge("h", bytes(32)), encode_welcome("n", "s", 1, 0, {}),
                 encode_ok(1), encode_error(None, "internal", "m"),
                 encode_msg("m", "f", b"", 1, 0), encode_topic_msg("m", "f", "t", 1, b"", 1),
                 encode_receipt("m", "n", 1), encode_bye("shutdown", 10)):
        assert len(decode_server(data)) == 1


# --- batch_of ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 15, 16, 17, 255, 65535, 65536, 65537])
def test_batch_of_sizes(n: int) -> None:
    frames = [encode_ok(i) for i in range(min(n, 20))]
    encoded = [frames[i % len(frames)] for i in range(n)] if n else []
    data = batch_of(encoded)
    decoded = unpack(data)
    assert type(decoded) is list
    assert len(decoded) == n
    assert decoded == [unpack(f) for f in encoded]
    assert decode_server(data) == decoded


@pytest.mark.parametrize(("n", "header"), [(0, b"\x90"), (15, b"\x9f"), (16, b"\xdc\x00\x10"),
                                           (65535, b"\xdc\xff\xff"),
                                           (65536, b"\xdd\x00\x01\x00\x00")])
def test_batch_of_header(n: int, header: bytes) -> None:
    f = encode_bye("x")
    assert batch_of([f] * n) == header + f * n


def test_batch_of_mixed_frames_is_what_a_batch_client_decodes() -> None:
    parts = [encode_msg("m1", "a", b"1", 1, 0), encode_ok("r", mid="m2", status="stored"),
             encode_error(None, "rate_limited", "slow down"), encode_topic_msg("m3", "b", "t",
                                                                               1, b"", 2)]
    assert decode_server(batch_of(parts)) == [unpack(p) for p in parts]


# --- decode_server -----------------------------------------------------------------------


def test_decode_server_single() -> None:
    assert decode_server(encode_ok(1, mid="M")) == [{"t": "ok", "id": 1, "mid": "M"}]


def test_decode_server_batch() -> None:
    data = pack([{"t": "ok", "id": 1}, {"t": "msg", "mid": "m", "body": b"b"}])
    assert decode_server(data) == [{"t": "ok", "id": 1}, {"t": "msg", "mid": "m", "body": b"b"}]


def test_decode_server_empty_batch() -> None:
    assert decode_server(pack([])) == []


@pytest.mark.parametrize(
    "value",
    [5, "ok", b"ok", None, True, 1.5, [5], [{"t": "ok"}, 5], {}, {"t": 5}, {"t": None},
     {"t": b"ok"}, [{"id": 1}], [[{"t": "ok"}]]],
    ids=repr,
)
def test_decode_server_rejects_non_map_frames(value: Any) -> None:
    with pytest.raises(DecodeError):
        decode_server(pack(value))


@pytest.mark.parametrize("data", [b"", b"\x91", b"\x80\x80", b"\xa2\xff\xfe",
                                  b"\x91" * 10_000 + b"\x80", b"\xdd\xff\xff\xff\xff"])
def test_decode_server_undecodable(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_server(data)


# --- client frames round-trip through the generic encoder --------------------------------


@pytest.mark.parametrize("t", sorted(VALID_FRAMES))
def test_encode_then_decode_client(t: str) -> None:
    assert decode_client(encode(VALID_FRAMES[t])) == decode_client(pack(VALID_FRAMES[t]))
