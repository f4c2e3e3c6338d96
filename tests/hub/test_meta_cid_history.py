"""Message meta, client message ids, signed publications and topic history through a
real hub (docs/protocol.md §4.1, §4.2, §5.1, §5.2): meta passed through on every path
(QoS 0, QoS 1 live and redelivered, topic live and recovered, history), every meta bound
at its limit and just past it, cid repeats answered `dup` and delivered once (same
batch, after an ack, across sessions and restarts), `pub.sig` passed through and checked,
and `history` pages (limit, before, more, trimmed to max_frame_bytes, forbidden,
unavailable, rate limited)."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from openred.hub.tokens import TokenIssuer
from openred.persistence.store import StoreUnavailable
from openred.protocol.identity import Identity

from tests.hub.nodes import RawNode, no_frame, recv_msgs

META = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "req": "r-1", "app.key_x-1": "é ü ∑"}
SECRET = "s" * 40


def meta_of_size(n_bytes: int, entries: int = 16) -> dict[str, str]:
    """A meta of `entries` entries that encodes (msgpack) to exactly `n_bytes`."""
    meta = {f"k{i:02d}": "" for i in range(entries)}
    last = f"k{entries - 1:02d}"
    while len(msgpack.packb(meta)) < n_bytes:
        meta[last] += "v"
        if len(meta[last]) > 512:  # spread over the values (each at most 512 chars)
            meta[last] = meta[last][:512]
            last = next(k for k, v in meta.items() if len(v) < 512)
    assert len(msgpack.packb(meta)) == n_bytes
    return meta


async def pair(hub: Any) -> tuple[RawNode, RawNode]:
    return await RawNode.connect(hub), await RawNode.connect(hub)


# -- meta (§4.1) --------------------------------------------------------------------------


async def test_meta_passes_through_qos0(hub):
    a, b = await pair(hub)
    ok = await a.request({"t": "send", "id": 1, "to": b.node_id, "body": b"x", "meta": META})
    assert ok["status"] == "sent"
    msg = await b.recv()
    assert (msg["mid"], msg["meta"], msg["qos"]) == (ok["mid"], META, 0)
    # §4.1: an empty map is none, and a msg carries meta only when it has entries.
    await a.send({"t": "send", "to": b.node_id, "body": b"y", "meta": {}})
    await a.send({"t": "send", "to": b.node_id, "body": b"z"})
    for m in await recv_msgs(b, 2):
        assert "meta" not in m


async def test_meta_passes_through_qos1_live_and_redelivered(hub):
    a = await RawNode.connect(hub)
    bid = Identity.generate()
    b = await RawNode.connect(hub, bid)
    ok = await a.request({"t": "send", "id": 1, "to": b.node_id, "body": b"x", "qos": 1,
                          "meta": META, "sig": b"s" * 64})
    live = await b.recv()
    assert (live["mid"], live["meta"], live["sig"]) == (ok["mid"], META, b"s" * 64)
    # Stored while offline, and redelivered after a reconnect (not acked): with meta.
    await b.close()
    ok2 = await a.request({"t": "send", "id": 2, "to": bid.node_id, "body": b"y", "qos": 1,
                           "meta": {"only": "one"}})
    b = await RawNode.connect(hub, bid)
    assert b.welcome["pending"] == 2
    got = await recv_msgs(b, 2)
    assert [(m["mid"], m["meta"]) for m in got] == [(ok["mid"], META),
                                                    (ok2["mid"], {"only": "one"})]
    await b.send({"t": "ack", "mids": [ok["mid"], ok2["mid"]]})


async def test_meta_passes_through_topics_live_recovered_and_in_history(hub):
    a, b = await pair(hub)
    await b.request({"t": "sub", "id": 1, "topic": "m/t"})
    ok = await a.request({"t": "pub", "id": 2, "topic": "m/t", "body": b"p", "meta": META})
    live = await b.recv()
    assert (live["seq"], live["meta"]) == (ok["seq"], META)
    await a.request({"t": "pub", "id": 3, "topic": "m/t", "body": b"q"})
    assert "meta" not in await b.recv()
    c = await RawNode.connect(hub)
    r = await c.request({"t": "sub", "id": 4, "topic": "m/t", "since": 0})
    assert r["recovered"] is True
    recovered = await recv_msgs(c, 2)
    assert recovered[0]["meta"] == META and "meta" not in recovered[1]
    h = await c.request({"t": "history", "id": 5, "topic": "m/t"})
    assert h["msgs"][0]["meta"] == META and "meta" not in h["msgs"][1]


ACCEPTED = {
    "16 entries, 1024 bytes": meta_of_size(1024),
    "key of 64 chars": {"k" * 64: "v"},
    "value of 512 chars": {"v": "x" * 512},
    "every key char": {"AZaz09._-": ""},
}
REFUSED = {
    "17 entries": ({f"k{i}": "v" for i in range(17)}, "meta: more than 16"),
    "1025 bytes": (meta_of_size(1025), "meta: larger than 1024"),
    "key of 65 chars": ({"k" * 65: "v"}, "meta: a key"),
    "empty key": ({"": "v"}, "meta: a key"),
    "key with a space": ({"a b": "v"}, "meta: a key"),
    "key not a str": ({1: "v"}, "meta: a key"),
    "value of 513 chars": ({"v": "x" * 513}, "meta: the value of 'v' is longer"),
    "value not a str": ({"v": 1}, "meta: the value of 'v' is not a str"),
    "value bin": ({"v": b"x"}, "meta: the value of 'v' is not a str"),
    "not a map": (["x"], "meta: not a map"),
}


@pytest.mark.parametrize("frame_type", ["send", "pub"])
async def test_meta_bounds_at_the_limit_and_past_it(hub, frame_type):
    a, b = await pair(hub)
    base: dict[str, Any] = ({"t": "send", "to": b.node_id, "body": b"x"} if frame_type == "send"
                            else {"t": "pub", "topic": "bounds", "body": b"x"})
    for i, (name, meta) in enumerate(ACCEPTED.items()):
        r = await a.request({**base, "id": i, "meta": meta})
        assert r["t"] == "ok", (name, r)
    for i, (name, (meta, start)) in enumerate(REFUSED.items(), 100):
        r = await a.request({**base, "id": i, "meta": meta})
        assert (r["t"], r["code"]) == ("error", "bad_frame"), (name, r)
        assert r["msg"].startswith(start), (name, r["msg"])
    if frame_type == "send":
        got = await recv_msgs(b, len(ACCEPTED))
        assert [m["meta"] for m in got] == list(ACCEPTED.values())
    await no_frame(b, 0.1)


# -- cid (§4.2) ---------------------------------------------------------------------------


async def test_a_repeated_cid_gets_the_first_mid_and_dup_and_is_delivered_once(hub):
    a, b = await pair(hub)
    frame = {"t": "send", "to": b.node_id, "body": b"once", "qos": 1, "cid": "c-1"}
    ok = await a.request({**frame, "id": 1})
    assert ok == {"t": "ok", "id": 1, "mid": ok["mid"], "status": "stored"}
    msg = await b.recv()
    assert msg["mid"] == ok["mid"]
    again = await a.request({**frame, "id": 2, "body": b"changed"})
    assert again == {"t": "ok", "id": 2, "mid": ok["mid"], "status": "stored", "dup": True}
    await no_frame(b)
    # After the ack: still remembered.
    await b.send({"t": "ack", "mid": ok["mid"]})
    await b.request({"t": "presence", "id": "sync", "nodes": []})
    third = await a.request({**frame, "id": 3})
    assert (third["mid"], third["dup"]) == (ok["mid"], True)
    await no_frame(b)
    # Another cid is another message.
    other = await a.request({**frame, "id": 4, "cid": "c-2"})
    assert other["mid"] != ok["mid"] and "dup" not in other
    assert (await b.recv())["mid"] == other["mid"]


async def test_repeats_sent_back_to_back_make_one_message(hub):
    a, b = await pair(hub)
    frames = [{"t": "send", "id": i, "to": b.node_id, "body": b"%d" % i, "qos": 1,
               "cid": "same"} for i in range(4)]
    await a.send(frames)  # one batch: read together, stored in one group commit
    await a.send({"t": "send", "id": 9, "to": b.node_id, "body": b"9", "qos": 1,
                  "cid": "same"})  # and one right behind it
    oks = [await a.recv_type("ok") for _ in range(5)]
    assert {ok["mid"] for ok in oks} == {oks[0]["mid"]}
    assert sorted(ok.get("dup", False) for ok in oks) == [False, True, True, True, True]
    assert next(ok for ok in oks if "dup" not in ok)["id"] == 0  # the first one is stored
    [msg] = await recv_msgs(b, 1)
    assert (msg["mid"], msg["body"]) == (oks[0]["mid"], b"0")
    await no_frame(b)


async def test_a_repeat_is_dup_across_sessions_and_restarts(make_hub):
    h = await make_hub()
    aid, bid = Identity.generate(), Identity.generate()
    a = await RawNode.connect(h, aid)
    frame = {"t": "send", "to": bid.node_id, "body": b"x", "qos": 1, "cid": "outbox-7"}
    ok = await a.request({**frame, "id": 1})
    await a.close()
    a = await RawNode.connect(h, aid)  # a new session: its ok may have been lost
    again = await a.request({**frame, "id": 1})
    assert (again["mid"], again["dup"]) == (ok["mid"], True)
    await a.close()
    await h.stop()
    h2 = await make_hub()
    a = await RawNode.connect(h2, aid)
    after = await a.request({**frame, "id": 1})
    assert (after["mid"], after["dup"]) == (ok["mid"], True)
    # Another sender with the same cid is not a repeat.
    c = await RawNode.connect(h2)
    theirs = await c.request({**frame, "id": 1})
    assert theirs["mid"] != ok["mid"] and "dup" not in theirs
    b = await RawNode.connect(h2, bid)
    assert b.welcome["pending"] == 2
    assert [m["mid"] for m in await recv_msgs(b, 2)] == [ok["mid"], theirs["mid"]]
    await no_frame(b)


@pytest.mark.parametrize("cid", ["x" * 65, "", "has space", "tab\t", "é", 7, b"bin"])
async def test_bad_cid_is_bad_frame(hub, cid):
    a, b = await pair(hub)
    r = await a.request({"t": "send", "id": 1, "to": b.node_id, "body": b"x", "qos": 1,
                         "cid": cid})
    assert (r["t"], r["code"]) == ("error", "bad_frame") and r["msg"].startswith("cid:")
    await no_frame(b, 0.1)


async def test_cid_of_64_printable_ascii_chars_is_accepted(hub):
    a, b = await pair(hub)
    cid = "".join(chr(c) for c in range(0x21, 0x7f))[:64]
    r = await a.request({"t": "send", "id": 1, "to": b.node_id, "body": b"x", "qos": 1,
                         "cid": cid})
    assert (r["t"], r["status"]) == ("ok", "stored")
    assert (await b.recv())["mid"] == r["mid"]


async def test_cid_on_qos0_is_ignored(hub):
    a, b = await pair(hub)
    for i, cid in enumerate(["same", "same", "x" * 100]):
        r = await a.request({"t": "send", "id": i, "to": b.node_id, "body": b"%d" % i,
                             "cid": cid})
        assert (r["t"], r["status"]) == ("ok", "sent") and "dup" not in r
    assert [m["body"] for m in await recv_msgs(b, 3)] == [b"0", b"1", b"2"]


# -- signed publications (§5.1) -------------------------------------------------------------


async def test_pub_sig_is_passed_through_and_kept_in_history(hub):
    a, b = await pair(hub)
    await b.request({"t": "sub", "id": 1, "topic": "sig/t"})
    await a.request({"t": "pub", "id": 2, "topic": "sig/t", "body": b"p", "sig": b"s" * 64})
    assert (await b.recv())["sig"] == b"s" * 64  # not checked: verify_body_sig is off
    h = await b.request({"t": "history", "id": 3, "topic": "sig/t"})
    assert h["msgs"][0]["sig"] == b"s" * 64
    r = await a.request({"t": "pub", "id": 4, "topic": "sig/t", "body": b"p",
                         "sig": b"s" * 513})
    assert (r["t"], r["code"]) == ("error", "bad_frame") and r["msg"].startswith("sig:")


async def test_pub_sig_is_verified_with_verify_body_sig(make_hub):
    h = await make_hub(**{"auth.verify_body_sig": True, "auth.jwt_secret": SECRET})
    ident = Identity.generate()
    a = await RawNode.connect(h, ident)
    b = await RawNode.connect(h)
    await b.request({"t": "sub", "id": 1, "topic": "signed"})
    good = ident.sign_topic("signed", b"body")
    ok = await a.request({"t": "pub", "id": 2, "topic": "signed", "body": b"body",
                          "sig": good})
    assert ok["t"] == "ok"
    assert (await b.recv())["sig"] == good
    wrong = {
        "missing": None,
        "other body": ident.sign_topic("signed", b"other"),
        "other topic": ident.sign_topic("other", b"body"),
        # A direct message's signature of the same bytes never passes as a publication's.
        "send context": ident.sign_body("signed", b"body"),
        "other key": Identity.generate().sign_topic("signed", b"body"),
    }
    for i, (name, sig) in enumerate(wrong.items(), 10):
        frame = {"t": "pub", "id": i, "topic": "signed", "body": b"body"}
        if sig is not None:
            frame["sig"] = sig
        r = await a.request(frame)
        assert (r["t"], r["code"]) == ("error", "forbidden"), name
    # A token node with no registered key cannot sign.
    token, _ = TokenIssuer(secret=SECRET).issue("keyless", 60)
    t = await RawNode.connect(h, token=token)
    r = await t.request({"t": "pub", "id": 1, "topic": "signed", "body": b"body",
                         "sig": good})
    assert (r["t"], r["code"]) == ("error", "forbidden")
    await no_frame(b, 0.1)


# -- history (§5.2) -----------------------------------------------------------------------


async def publish(node: RawNode, topic: str, n: int, body: bytes = b"") -> list[int]:
    seqs = []
    for i in range(n):
        ok = await node.request({"t": "pub", "id": f"p{i}", "topic": topic,
                                 "body": body or b"%d" % i})
        seqs.append(ok["seq"])
    return seqs


async def test_history_limit_before_and_more(hub):
    a, b = await pair(hub)
    await publish(a, "h/t", 10)
    r = await b.request({"t": "history", "id": 1, "topic": "h/t", "limit": 3})
    assert (r["t"], r["id"], r["seq"], r["more"]) == ("ok", 1, 10, True)
    assert [m["seq"] for m in r["msgs"]] == [8, 9, 10]
    m = r["msgs"][0]
    assert set(m) == {"mid", "from", "topic", "seq", "body", "ts"}
    assert (m["from"], m["topic"], m["body"]) == (a.node_id, "h/t", b"7")
    r = await b.request({"t": "history", "id": 2, "topic": "h/t", "limit": 3, "before": 8})
    assert ([m["seq"] for m in r["msgs"]], r["more"]) == ([5, 6, 7], True)
    r = await b.request({"t": "history", "id": 3, "topic": "h/t", "limit": 3, "before": 3})
    assert ([m["seq"] for m in r["msgs"]], r["more"]) == ([1, 2], False)
    r = await b.request({"t": "history", "id": 4, "topic": "h/t"})  # limit 100
    assert ([m["seq"] for m in r["msgs"]], r["more"]) == (list(range(1, 11)), False)
    r = await b.request({"t": "history", "id": 5, "topic": "h/t", "limit": 10})
    assert r["more"] is False  # exactly what is kept: nothing older
    r = await b.request({"t": "history", "id": 6, "topic": "nothing/here"})
    assert r == {"t": "ok", "id": 6, "seq": 0, "msgs": [], "more": False}
    # The publisher reads its own publications too (history is not a subscription).
    r = await a.request({"t": "history", "id": 7, "topic": "h/t", "limit": 1})
    assert [m["seq"] for m in r["msgs"]] == [10]


async def test_history_is_what_topic_history_keeps(make_hub):
    h = await make_hub(**{"store.topic_history": 4})
    a, b = await pair(h)
    await publish(a, "kept", 6)
    r = await b.request({"t": "history", "id": 1, "topic": "kept", "limit": 10})
    assert ([m["seq"] for m in r["msgs"]], r["more"], r["seq"]) == ([3, 4, 5, 6], False, 6)


async def test_history_drops_the_oldest_to_fit_max_frame_bytes(make_hub):
    h = await make_hub(**{"limits.max_frame_bytes": 4096, "limits.max_body_bytes": 1000})
    a, b = await pair(h)
    await publish(a, "big", 10, body=b"x" * 900)
    r = await b.request({"t": "history", "id": 1, "topic": "big", "limit": 10})
    seqs = [m["seq"] for m in r["msgs"]]
    assert seqs and seqs == list(range(11 - len(seqs), 11)) and len(seqs) < 10
    assert r["more"] is True
    assert len(msgpack.packb(r, use_bin_type=True)) <= 4096
    # One more would not have fitted.
    item = len(msgpack.packb(r["msgs"][0], use_bin_type=True))
    assert len(msgpack.packb(r, use_bin_type=True)) + item > 4096
    # Paging back from the first one returned reaches the rest.
    r2 = await b.request({"t": "history", "id": 2, "topic": "big", "limit": 10,
                          "before": seqs[0]})
    assert [m["seq"] for m in r2["msgs"]][-1] == seqs[0] - 1


async def test_history_forbidden_by_the_topics_claim(make_hub):
    h = await make_hub(**{"auth.jwt_secret": SECRET})
    token, _ = TokenIssuer(secret=SECRET).issue("reader", 60, topics=["open/*"])
    node = await RawNode.connect(h, token=token)
    r = await node.request({"t": "history", "id": 1, "topic": "closed"})
    assert (r["t"], r["code"]) == ("error", "forbidden")
    r = await node.request({"t": "history", "id": 2, "topic": "open/x"})
    assert (r["t"], r["msgs"]) == ("ok", [])


@pytest.mark.parametrize("extra", [{"limit": 0}, {"limit": 1001}, {"limit": -1},
                                   {"limit": "5"}, {"limit": True}, {"before": -1},
                                   {"before": 2**63}, {"before": "1"}, {"topic": "bad topic"},
                                   {"topic": None}])
async def test_history_bad_fields_are_bad_frame(hub, extra):
    a = await RawNode.connect(hub)
    r = await a.request({"t": "history", "id": 1, "topic": "t", **extra})
    assert (r["t"], r["code"]) == ("error", "bad_frame"), r


async def test_history_limit_bounds_accepted_and_id_required(hub):
    a = await RawNode.connect(hub)
    for i, limit in enumerate([1, 1000]):
        r = await a.request({"t": "history", "id": i, "topic": "t", "limit": limit})
        assert r["t"] == "ok"
    await a.send({"t": "history", "topic": "t"})
    r = await a.recv()
    assert (r["t"], r["code"], r["id"]) == ("error", "bad_frame", None)


async def test_history_store_failure_is_unavailable(hub, monkeypatch):
    a = await RawNode.connect(hub)

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("store: down for the test")

    monkeypatch.setattr(hub.node.store, "history_before", down)
    r = await a.request({"t": "history", "id": 1, "topic": "t"})
    assert (r["t"], r["code"]) == ("error", "unavailable")
    monkeypatch.undo()
    r = await a.request({"t": "history", "id": 2, "topic": "t"})  # the session goes on
    assert r["t"] == "ok"


async def test_history_is_rate_limited(make_hub):
    h = await make_hub(**{"limits.msgs_per_s": 1, "limits.burst": 1})
    a = await RawNode.connect(h)
    await a.send([{"t": "history", "id": i, "topic": "t"} for i in range(3)])
    got = sorted([await a.recv() for _ in range(3)], key=lambda f: f["id"])
    assert [f["t"] for f in got] == ["ok", "error", "error"]
    assert {f.get("code") for f in got[1:]} == {"rate_limited"}
