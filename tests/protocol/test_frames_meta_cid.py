"""Decoding and encoding of message meta, cid, pub sig and history, fed bytes (no I/O):
docs/protocol.md §4.1, §4.2, §5.1, §5.2, §10 and the §15 send vector."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from openred.protocol.errors import BAD_FRAME, UNKNOWN_TYPE, FrameError
from openred.protocol.frames import (
    DEFAULT_HISTORY_LIMIT,
    MAX_SINCE,
    History,
    Pub,
    Send,
    decode_client,
    encode_history_item,
    encode_history_ok,
    encode_msg,
    encode_topic_msg,
    history_ok_overhead,
)
from openred.protocol.identity import (
    BODY_CONTEXT,
    TOPIC_CONTEXT,
    Identity,
    topic_message,
    verify_signature,
)

NODE = "node-1"


def one(value: Any) -> Any:
    [out] = decode_client(msgpack.packb(value, use_bin_type=True))
    return out


def bad(value: Any) -> str:
    out = one(value)
    assert type(out) is FrameError and out.code == BAD_FRAME, out
    return out.msg


def test_section_15_send_vector_decodes_with_its_cid() -> None:
    data = bytes.fromhex("86a174a473656e64a2696401a2746fa3626f62a4626f6479c4026869a3716f7301"
                         "a3636964a3632d31")
    [f] = decode_client(data)
    assert f == Send(1, "bob", b"hi", 1, None, None, False, "c-1", None)
    assert (f.cid, f.meta) == ("c-1", None)


def test_send_and_pub_expose_meta_and_cid() -> None:
    meta = {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01", "req": "1"}
    s = one({"t": "send", "id": 1, "to": NODE, "body": b"x", "qos": 1, "cid": "c",
             "meta": meta})
    assert type(s) is Send and (s.cid, s.meta) == ("c", meta)
    p = one({"t": "pub", "id": 1, "topic": "a", "body": b"x", "sig": b"s" * 64,
             "meta": meta})
    assert type(p) is Pub and (p.sig, p.meta) == (b"s" * 64, meta)
    # Absent or empty: None (§4.1: the same as none).
    assert one({"t": "send", "to": NODE, "body": b"x", "meta": {}}).meta is None
    assert one({"t": "pub", "topic": "a", "body": b"x"}) == Pub(None, "a", b"x", None, None)


def test_cid_is_ignored_on_qos0_and_checked_on_qos1() -> None:
    assert one({"t": "send", "to": NODE, "body": b"x", "cid": 5}).cid is None
    assert one({"t": "send", "id": 1, "to": NODE, "body": b"x", "qos": 1,
                "cid": "~" * 64}).cid == "~" * 64
    for cid in ["", "x" * 65, " lead", "é", "nul\x00", 1, b"b", [], True]:
        msg = bad({"t": "send", "id": 1, "to": NODE, "body": b"x", "qos": 1, "cid": cid})
        assert msg.startswith("cid:")


@pytest.mark.parametrize("t", ["send", "pub"])
def test_meta_bounds(t: str) -> None:
    base: dict[str, Any] = ({"t": "send", "to": NODE, "body": b"x"} if t == "send"
                            else {"t": "pub", "topic": "a", "body": b"x"})
    ok = [{f"k{i}": "" for i in range(16)}, {"k" * 64: "v" * 512}, {"a.b-c_D9": "é" * 500}]
    for meta in ok:
        assert one({**base, "meta": meta}).meta == meta
    refused = [{f"k{i}": "" for i in range(17)}, {"k" * 65: ""}, {"": ""}, {"a/b": ""},
               {"k": "v" * 513}, {"k": 1}, {"k": None}, {"k": b"x"}, {1: "v"},
               {"k": "é" * 512, "l": "x"}, "meta", [1], 5]
    for meta in refused:
        assert bad({**base, "meta": meta}).startswith("meta:"), meta


def test_pub_sig_bound() -> None:
    assert one({"t": "pub", "topic": "a", "body": b"x", "sig": b"s" * 512}).sig == b"s" * 512
    assert bad({"t": "pub", "topic": "a", "body": b"x", "sig": b"s" * 513}).startswith("sig:")
    assert bad({"t": "pub", "topic": "a", "body": b"x", "sig": "str"}).startswith("sig:")


def test_history_decodes_with_defaults_and_bounds() -> None:
    assert one({"t": "history", "id": 1, "topic": "a"}) == History(1, "a",
                                                                   DEFAULT_HISTORY_LIMIT, None)
    assert one({"t": "history", "id": "x", "topic": "a", "limit": 1000,
                "before": MAX_SINCE}) == History("x", "a", 1000, MAX_SINCE)
    assert one({"t": "history", "id": 1, "topic": "a", "limit": 1, "before": 0}).limit == 1
    assert bad({"t": "history", "topic": "a"}).startswith("id:")
    for extra in ({"limit": 0}, {"limit": 1001}, {"limit": 1.0}, {"limit": False},
                  {"before": -1}, {"before": MAX_SINCE + 1}, {"before": "3"},
                  {"topic": "no spaces"}):
        bad({"t": "history", "id": 1, "topic": "a", **extra})
    out = one({"t": "histories", "id": 1})
    assert type(out) is FrameError and out.code == UNKNOWN_TYPE


def test_msg_encoders_carry_meta_and_sig_only_when_given() -> None:
    m = msgpack.unpackb(encode_msg("m", "a", b"x", 1, 0, None, {"k": "v"}))
    assert m["meta"] == {"k": "v"} and "sig" not in m
    assert "meta" not in msgpack.unpackb(encode_msg("m", "a", b"x", 1, 0, None, {}))
    tm = msgpack.unpackb(encode_topic_msg("m", "a", "t", 3, b"x", 1, b"s", {"k": "v"}))
    assert (tm["topic"], tm["seq"], tm["sig"], tm["meta"], tm["qos"]) == ("t", 3, b"s",
                                                                          {"k": "v"}, 0)
    assert set(msgpack.unpackb(encode_topic_msg("m", "a", "t", 3, b"x", 1))) == {
        "t", "mid", "from", "topic", "seq", "body", "ts", "qos"}


@pytest.mark.parametrize("n", [0, 1, 15, 16, 300])
def test_history_ok_is_one_map_of_its_items_and_sized_by_its_overhead(n: int) -> None:
    items = [encode_history_item(f"m{i}", "a", "t", i + 1, b"x" * i, 5,
                                 b"s" if i % 2 else None, {"k": "v"} if i % 3 else None)
             for i in range(n)]
    data = encode_history_ok("id-1", 99, items, True)
    got = msgpack.unpackb(data)
    assert (got["t"], got["id"], got["seq"], got["more"]) == ("ok", "id-1", 99, True)
    assert [m["seq"] for m in got["msgs"]] == list(range(1, n + 1))
    for i, m in enumerate(got["msgs"]):  # a topic msg's fields (§5.2), no `t`, no `qos`
        assert set(m) == ({"mid", "from", "topic", "seq", "body", "ts"}
                          | ({"sig"} if i % 2 else set()) | ({"meta"} if i % 3 else set()))
    assert len(data) <= history_ok_overhead("id-1", 99, n) + sum(map(len, items))


def test_topic_signature_has_its_own_context() -> None:
    ident = Identity.generate()
    sig = ident.sign_topic("news", b"body")
    assert topic_message("news", b"body") == TOPIC_CONTEXT + b"news\x00body"
    assert TOPIC_CONTEXT == b"openred-hub/v1/topic\x00" and TOPIC_CONTEXT != BODY_CONTEXT
    assert verify_signature(ident.public_key, topic_message("news", b"body"), sig)
    assert not verify_signature(ident.public_key, BODY_CONTEXT + b"news\x00body", sig)
