"""docs/protocol.md §1 (transport) and §2 (identity and handshake) against a real hub:
challenge and welcome shapes, key and token auth, refusals and their close codes,
replacement, allowlist and bans, message-level protocol errors, batches in hello."""

from __future__ import annotations

import os
import time

import msgpack
import pytest
from openred.hub.tokens import TokenIssuer
from openred.protocol.identity import Identity
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.conftest import timeout
from tests.hub.nodes import RawNode

SECRET = "s" * 40
LIMITS_KEYS = {"max_frame_bytes", "max_body_bytes", "msgs_per_s", "burst", "max_topics"}


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def key_hello(node: RawNode, identity: Identity) -> dict:
    return {"t": "hello", "v": 1, "key": identity.public_key,
            "sig": identity.sign_auth(node.challenge["hub"], node.challenge["nonce"])}


async def assert_quiet(node: RawNode, wait: float = 0.3) -> None:
    with pytest.raises(TimeoutError):
        f = await node.recv(wait=wait)
        raise AssertionError(f"unexpected frame {f}")


def pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


# -- challenge and welcome (§2 steps 1 and 3) ---------------------------------------------


async def test_challenge_shape(make_hub):
    h = await make_hub(**{"server.hub_id": "test-hub"})
    node = await RawNode.open(h)
    c = node.challenge
    assert set(c) == {"t", "v", "hub", "nonce"}
    assert (c["t"], c["v"], c["hub"]) == ("challenge", 1, "test-hub")
    assert type(c["nonce"]) is bytes and len(c["nonce"]) == 32
    other = await RawNode.open(h)
    assert other.challenge["nonce"] != c["nonce"]  # fresh per connection
    await node.close()
    await other.close()


async def test_key_auth_welcome_shape(make_hub):
    h = await make_hub(**{"limits.max_topics": 7, "limits.hb_s": 11})
    ident = Identity.generate()
    node = await RawNode.connect(h, ident)
    w = node.welcome
    assert w["t"] == "welcome"
    assert w["node"] == ident.public_key.hex() == ident.node_id
    assert len(w["node"]) == 64
    assert type(w["session"]) is str and w["session"]
    assert type(w["hb"]) is int and w["hb"] == 11
    assert type(w["pending"]) is int and w["pending"] == 0
    limits = w["limits"]
    assert LIMITS_KEYS <= set(limits)
    cfg = h.cfg.limits
    assert limits["max_frame_bytes"] == cfg.max_frame_bytes
    assert limits["max_body_bytes"] == cfg.max_body_bytes
    assert limits["msgs_per_s"] == cfg.msgs_per_s
    assert limits["burst"] == cfg.burst
    assert limits["max_topics"] == 7
    # The session works.
    assert (await node.request({"t": "sub", "id": 1, "topic": "x"}))["t"] == "ok"
    await node.close()


async def test_token_auth(make_hub):
    h = await make_hub(**{"auth.jwt_secret": SECRET})
    token, _ = TokenIssuer(secret=SECRET).issue("n1", 60)
    node = await RawNode.connect(h, token=token)
    assert node.welcome["node"] == "n1"
    assert type(node.welcome["session"]) is str
    other = await RawNode.connect(h)
    ok = await other.request({"t": "send", "id": 1, "to": "n1", "body": b"hi"})
    assert (ok["t"], ok["status"]) == ("ok", "sent")
    msg = await node.recv()
    assert (msg["t"], msg["from"], msg["body"]) == ("msg", other.node_id, b"hi")
    await node.close()
    await other.close()


async def test_token_topics_claim_restricts_sub_and_pub(make_hub):
    h = await make_hub(**{"auth.jwt_secret": SECRET})
    token, _ = TokenIssuer(secret=SECRET).issue("n2", 60, topics=["a/*", "exact"])
    node = await RawNode.connect(h, token=token)
    for i, topic in enumerate(["a/x", "a/b/c", "exact"], 1):
        assert (await node.request({"t": "sub", "id": i, "topic": topic}))["t"] == "ok"
    for i, topic in enumerate(["b/x", "exactly", "a"], 10):
        r = await node.request({"t": "sub", "id": i, "topic": topic})
        assert (r["t"], r["code"]) == ("error", "forbidden"), r
    r = await node.request({"t": "pub", "id": 20, "topic": "b/x", "body": b"no"})
    assert (r["t"], r["code"]) == ("error", "forbidden")
    r = await node.request({"t": "pub", "id": 21, "topic": "a/y", "body": b"yes"})
    assert (r["t"], r["seq"]) == ("ok", 1)
    # Without an id, the forbidden error still comes, with a nil id.
    await node.send({"t": "pub", "topic": "zzz", "body": b"no"})
    f = await node.recv()
    assert f["t"] == "error" and f["code"] == "forbidden"
    assert "id" in f and f["id"] is None
    await node.close()


# -- transport (§1) ------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/v1", "/v1/ws/x", "/v2/ws", "/healthz"])
async def test_other_paths_get_404(hub, path):
    with pytest.raises(InvalidStatus) as info:
        await connect(f"ws://127.0.0.1:{hub.ws_port}{path}", open_timeout=timeout(5))
    assert info.value.response.status_code == 404


# -- refusals (§2 step 4) -------------------------------------------------------------


async def test_no_hello_in_time_closes_4002(make_hub):
    h = await make_hub(**{"auth.hello_timeout_s": 0.5})
    node = await RawNode.open(h)
    t0 = time.monotonic()
    code, frames = await node.closed(wait=5)
    assert code == 4002
    assert frames == []
    assert time.monotonic() - t0 < timeout(3)


async def test_frame_before_welcome_not_authenticated(hub):
    node = await RawNode.open(hub)
    await node.send({"t": "sub", "id": 7, "topic": "x"})
    code, frames = await node.closed()
    assert code == 4001
    assert len(frames) == 1
    f = frames[0]
    assert (f["t"], f["code"]) == ("error", "not_authenticated")
    assert "id" in f


async def test_frame_without_id_before_welcome(hub):
    node = await RawNode.open(hub)
    await node.send({"t": "send", "to": "x", "body": b""})
    code, frames = await node.closed()
    assert code == 4001
    assert [(f["t"], f["code"], f["id"]) for f in frames] == [
        ("error", "not_authenticated", None)]


async def test_hello_with_key_and_token_refused(make_hub):
    h = await make_hub(**{"auth.jwt_secret": SECRET})
    ident = Identity.generate()
    token, _ = TokenIssuer(secret=SECRET).issue("n3", 60)
    node = await RawNode.open(h)
    hello = key_hello(node, ident)
    hello["token"] = token
    await node.send(hello)
    code, frames = await node.closed()
    assert code == 4001
    assert [(f["t"], f["code"], f["id"]) for f in frames] == [("error", "auth_failed", None)]


async def test_meta_over_4k_refused(hub):
    ident = Identity.generate()
    node = await RawNode.open(hub)
    hello = key_hello(node, ident)
    hello["meta"] = {"x": "y" * 4200}
    await node.send(hello)
    code, frames = await node.closed()
    assert code == 4001
    assert [(f["t"], f["code"]) for f in frames] == [("error", "auth_failed")]


async def test_meta_of_4k_accepted(hub):
    ident = Identity.generate()
    meta = {"x": ""}
    meta["x"] = "y" * (4096 - len(pack(meta)) - 2)  # str8 header grows by 1..2 bytes
    while len(pack(meta)) < 4096:
        meta["x"] += "y"
    assert len(pack(meta)) == 4096
    node = await RawNode.connect(hub, ident, meta=meta)
    rec = await hub.node.store.get_node(node.node_id)
    assert rec is not None and rec.meta == meta
    await node.close()


async def test_replaced_session(hub):
    ident = Identity.generate()
    first = await RawNode.connect(hub, ident)
    second = await RawNode.connect(hub, ident)
    code, frames = await first.closed()
    assert code == 4010
    assert frames == [{"t": "bye", "reason": "replaced"}]
    assert second.welcome["node"] == first.welcome["node"]
    assert second.welcome["session"] != first.welcome["session"]
    other = await RawNode.connect(hub)
    r = await other.request({"t": "send", "id": 1, "to": ident.node_id, "body": b"to2"})
    assert r["t"] == "ok"
    msg = await second.recv()
    assert (msg["t"], msg["body"]) == ("msg", b"to2")
    r = await second.request({"t": "presence", "id": 2, "nodes": [ident.node_id]})
    assert r["online"] == {ident.node_id: True}
    await second.close()
    await other.close()


async def test_allowlist_mode(make_hub):
    h = await make_hub(**{"auth.mode": "allowlist"})
    stranger = Identity.generate()
    node = await RawNode.open(h)
    await node.send(key_hello(node, stranger))
    code, frames = await node.closed()
    assert code == 4003
    assert [(f["t"], f["code"], f["id"]) for f in frames] == [("error", "forbidden", None)]

    known = Identity.generate()
    await h.node.store.put_node(known.node_id, {}, None, _now_ms())
    node = await RawNode.connect(h, known)
    assert node.welcome["node"] == known.node_id
    await node.close()


async def test_banned_node_forbidden(hub):
    ident = Identity.generate()
    await hub.node.store.set_banned(ident.node_id, True, _now_ms())
    node = await RawNode.open(hub)
    await node.send(key_hello(node, ident))
    code, frames = await node.closed()
    assert code == 4003
    assert [(f["t"], f["code"], f["id"]) for f in frames] == [("error", "forbidden", None)]
    # Unbanned: welcome again.
    await hub.node.store.set_banned(ident.node_id, False, _now_ms())
    node = await RawNode.connect(hub, ident)
    assert node.welcome["node"] == ident.node_id
    await node.close()


async def test_banned_token_node_forbidden(make_hub):
    h = await make_hub(**{"auth.jwt_secret": SECRET})
    await h.node.store.set_banned("bad-node", True, _now_ms())
    token, _ = TokenIssuer(secret=SECRET).issue("bad-node", 60)
    node = await RawNode.open(h)
    await node.send({"t": "hello", "token": token})
    code, frames = await node.closed()
    assert code == 4003
    assert [(f["t"], f["code"]) for f in frames] == [("error", "forbidden")]


# -- message-level errors (§1) ----------------------------------------------------------


async def test_text_message_closes_1003(hub):
    node = await RawNode.connect(hub)
    await node.send_raw('{"t":"sub"}')
    code, _ = await node.closed()
    assert code == 1003


async def test_text_message_before_hello_closes_1003(hub):
    node = await RawNode.open(hub)
    await node.send_raw("hello")
    code, _ = await node.closed()
    assert code == 1003


@pytest.mark.parametrize("data", [
    b"\xc1",  # never used in msgpack
    b"\x82\xa1t",  # truncated map
    b"\xc4\x10abc",  # truncated bin
    pack({"t": "sub", "id": 1, "topic": "x"}) + b"\x00",  # trailing bytes
    pack({"t": "sub", "topic": "x"}) + pack({"t": "sub", "topic": "y"}),  # two values
    b"",  # no value at all
], ids=["c1", "truncated-map", "truncated-bin", "trailing", "two-values", "empty"])
async def test_undecodable_closes_1007(hub, data):
    node = await RawNode.connect(hub)
    await node.send_raw(data)
    code, frames = await node.closed()
    assert code == 1007
    assert frames == []


async def test_undecodable_hello_closes_1007(hub):
    node = await RawNode.open(hub)
    await node.send_raw(b"\x81\xa1t\xa5hello\x00")
    code, _ = await node.closed()
    assert code == 1007


def _frame_of_size(frame: dict, size: int) -> bytes:
    """`frame` padded with an unknown key (ignored by the hub, §8) to `size` bytes."""
    frame = dict(frame, pad=b"")
    base = len(pack(frame))
    pad = size - base
    for n in range(max(pad - 5, 0), pad + 1):  # the bin header grows with its length
        frame["pad"] = b"p" * n
        if len(pack(frame)) == size:
            return pack(frame)
    raise AssertionError("cannot pad to size")


async def test_frame_size_limit(make_hub):
    h = await make_hub(**{"limits.max_frame_bytes": 4096, "limits.max_body_bytes": 2048})
    a = await RawNode.connect(h)
    b = await RawNode.connect(h)
    exact = _frame_of_size({"t": "send", "id": 1, "to": b.node_id, "body": b"x" * 2048}, 4096)
    assert len(exact) == 4096
    await a.send_raw(exact)
    r = await a.request({"t": "presence", "id": 2, "nodes": []})  # a stays connected
    assert r["t"] == "ok"
    msg = await b.recv()
    assert (msg["t"], msg["body"]) == ("msg", b"x" * 2048)

    over = _frame_of_size({"t": "send", "id": 3, "to": b.node_id, "body": b"y"}, 4097)
    assert len(over) == 4097
    await a.send_raw(over)
    code, frames = await a.closed()
    assert code == 1009
    assert all(f.get("id") != 3 for f in frames)
    # b got nothing from the oversize message and still works.
    r = await b.request({"t": "presence", "id": 4, "nodes": []})
    assert r["t"] == "ok"
    await b.close()


async def test_oversize_hello_closes_1009(make_hub):
    h = await make_hub(**{"limits.max_frame_bytes": 4096, "limits.max_body_bytes": 2048})
    node = await RawNode.open(h)
    await node.send_raw(_frame_of_size({"t": "hello", "key": b"k" * 32}, 5000))
    code, _ = await node.closed()
    assert code == 1009


# -- what comes with and right after hello ----------------------------------------------


async def test_hello_as_batch_of_one(hub):
    ident = Identity.generate()
    node = await RawNode.open(hub, ident)
    await node.send([key_hello(node, ident)])
    w = await node.recv()
    assert (w["t"], w["node"]) == ("welcome", ident.node_id)
    assert (await node.request({"t": "sub", "id": 1, "topic": "x"}))["t"] == "ok"
    await node.close()


async def test_batch_of_hello_and_more_refused(hub):
    """§1 a batch is handled as if sent frame by frame, and §2 any frame but hello
    before welcome is not_authenticated (docs/protocol.md §11: the first message holds
    the hello and nothing else)."""
    ident = Identity.generate()
    peer = await RawNode.connect(hub)
    node = await RawNode.open(hub, ident)
    await node.send([
        key_hello(node, ident),
        {"t": "send", "id": 2, "to": peer.node_id, "body": b"early"},
    ])
    code, frames = await node.closed()
    assert code == 4001
    assert [(f["t"], f["code"], f["id"]) for f in frames] == [
        ("error", "not_authenticated", 2)]
    await assert_quiet(peer)
    r = await peer.request({"t": "presence", "id": 1, "nodes": [ident.node_id]})
    assert r["online"] == {ident.node_id: False}
    await peer.close()


async def test_batch_of_bad_hello_and_more_refused(hub):
    ident = Identity.generate()
    peer = await RawNode.connect(hub)
    node = await RawNode.open(hub, ident)
    hello = key_hello(node, ident)
    hello["sig"] = os.urandom(64)
    await node.send([hello, {"t": "send", "to": peer.node_id, "body": b"no"}])
    code, frames = await node.closed()
    assert code == 4001
    assert [(f["t"], f["code"], f["id"]) for f in frames] == [
        ("error", "not_authenticated", None)]
    await assert_quiet(peer)
    await peer.close()


async def test_frame_after_hello_before_welcome_refused(hub):
    """A frame sent right after the hello, while the hub still checks it, comes before
    welcome: not_authenticated and 4001 (§2), and it is not routed."""
    ident = Identity.generate()
    peer = await RawNode.connect(hub)
    node = await RawNode.open(hub, ident)
    # Both messages in one write, so they reach the hub together.
    node.ws.protocol.send_binary(pack(key_hello(node, ident)))
    node.ws.protocol.send_binary(pack({"t": "send", "id": 1, "to": peer.node_id,
                                       "body": b"early"}))
    node.ws.send_data()
    code, frames = await node.closed()
    assert code == 4001
    assert [(f["t"], f["code"], f["id"]) for f in frames] == [
        ("error", "not_authenticated", 1)]  # §3: answered with the frame's id
    await assert_quiet(peer)
    await peer.close()


async def test_undecodable_after_hello_before_welcome_closes_1007(hub):
    ident = Identity.generate()
    node = await RawNode.open(hub, ident)
    node.ws.protocol.send_binary(pack(key_hello(node, ident)))
    node.ws.protocol.send_binary(b"\xc1")
    node.ws.send_data()
    code, frames = await node.closed()
    assert code == 1007
    assert frames == []
