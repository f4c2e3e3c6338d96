"""Security properties against a real hub: forged, misdirected and replayed key hellos;
hostile tokens (alg none, algorithm confusion, expired, wrong audience); every refusal
audited (docs/protocol.md §2); bounded memory under slow consumers (§7); a hostile node
cannot disturb another node's session (§8)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import time

import msgpack
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from openred.hub.tokens import TokenIssuer
from openred.hub.transport import OPEN
from openred.protocol.identity import Identity
from websockets.exceptions import ConnectionClosed

from tests.conftest import timeout
from tests.hub.nodes import RawNode

SECRET = "k" * 48


def pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


async def assert_quiet(node: RawNode, wait: float = 0.3) -> None:
    with pytest.raises(TimeoutError):
        f = await node.recv(wait=wait)
        raise AssertionError(f"unexpected frame {f}")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_token(header: dict, payload: dict, key: bytes) -> str:
    signing_input = (b64url(json.dumps(header).encode()) + "."
                     + b64url(json.dumps(payload).encode()))
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(sig)


async def audit_count(h) -> int:
    return len(await h.node.store.audit_query(None, "auth_failed", None, 1000, None))


async def wait_audit(h, n: int) -> list:
    """Poll until at least `n` auth_failed events are stored (audit writes are
    group-committed asynchronously)."""
    deadline = time.monotonic() + timeout(5)
    while True:
        events = await h.node.store.audit_query(None, "auth_failed", None, 1000, None)
        if len(events) >= n or time.monotonic() > deadline:
            return events
        await asyncio.sleep(0.02)


async def refused(h, hello: dict | bytes, node: RawNode | None = None) -> None:
    """Send `hello` on a fresh connection: auth_failed, close 4001, one more audit event."""
    before = await audit_count(h)
    node = node or await RawNode.open(h)
    if isinstance(hello, bytes):
        await node.send_raw(hello)
    else:
        await node.send(hello)
    code, frames = await node.closed()
    assert code == 4001
    assert [(f["t"], f["code"], f["id"]) for f in frames] == [("error", "auth_failed", None)]
    events = await wait_audit(h, before + 1)
    assert len(events) == before + 1
    ev = events[0]  # newest first
    assert ev.kind == "auth_failed"
    assert ev.ip == "127.0.0.1"


# -- key hellos ------------------------------------------------------------------------


async def test_forged_signature(hub):
    ident = Identity.generate()
    node = await RawNode.open(hub)
    await refused(hub, {"t": "hello", "key": ident.public_key, "sig": os.urandom(64)}, node)


async def test_signature_of_another_key(hub):
    ident, other = Identity.generate(), Identity.generate()
    node = await RawNode.open(hub)
    sig = other.sign_auth(node.challenge["hub"], node.challenge["nonce"])
    await refused(hub, {"t": "hello", "key": ident.public_key, "sig": sig}, node)


async def test_signature_over_another_hub_id(make_hub):
    h = await make_hub(**{"server.hub_id": "hub-a"})
    ident = Identity.generate()
    node = await RawNode.open(h)
    assert node.challenge["hub"] == "hub-a"
    sig = ident.sign_auth("hub-b", node.challenge["nonce"])
    await refused(h, {"t": "hello", "key": ident.public_key, "sig": sig}, node)


async def test_signature_over_another_nonce(hub):
    ident = Identity.generate()
    node = await RawNode.open(hub)
    sig = ident.sign_auth(node.challenge["hub"], os.urandom(32))
    await refused(hub, {"t": "hello", "key": ident.public_key, "sig": sig}, node)


async def test_replayed_hello(hub):
    ident = Identity.generate()
    first = await RawNode.open(hub, ident)
    hello = pack({"t": "hello", "key": ident.public_key,
                  "sig": ident.sign_auth(first.challenge["hub"], first.challenge["nonce"])})
    await first.send_raw(hello)
    assert (await first.recv())["t"] == "welcome"
    await refused(hub, hello)  # same bytes, new connection (new nonce)
    # The victim's session is not replaced by the replay.
    r = await first.request({"t": "presence", "id": 1, "nodes": [ident.node_id]})
    assert r["online"] == {ident.node_id: True}
    await first.close()
    await refused(hub, hello)  # nor after it closed


@pytest.mark.parametrize("hello", [
    {"t": "hello"},
    {"t": "hello", "key": b"k" * 31, "sig": b"s" * 64},
    {"t": "hello", "key": b"k" * 32},
    {"t": "hello", "key": b"k" * 32, "sig": b"s" * 63},
    {"t": "hello", "key": "not-bin", "sig": b"s" * 64},
    {"t": "hello", "token": "a.b.c"},  # token auth not configured
    {"t": "hello", "token": 5},
], ids=["empty", "short-key", "no-sig", "short-sig", "str-key", "token-unconfigured",
        "int-token"])
async def test_malformed_hellos(hub, hello):
    await refused(hub, hello)


# -- token hellos ----------------------------------------------------------------------


def now_payload(**extra: object) -> dict:
    return {"sub": "n1", "exp": int(time.time()) + 60, **extra}


async def test_token_alg_none(make_hub):
    h = await make_hub(**{"auth.jwt_secret": SECRET})
    for header in ({"alg": "none", "typ": "JWT"}, {"alg": "None"}, {"alg": "NONE"}):
        token = (b64url(json.dumps(header).encode()) + "."
                 + b64url(json.dumps(now_payload()).encode()) + ".")
        await refused(h, {"t": "hello", "token": token})


async def test_token_other_secret_and_bad_claims(make_hub):
    h = await make_hub(**{"auth.jwt_secret": SECRET})
    hdr = {"alg": "HS256", "typ": "JWT"}
    key = SECRET.encode()
    tokens = [
        hs256_token(hdr, now_payload(), b"x" * 48),  # another secret
        hs256_token(hdr, {"sub": "n1"}, key),  # no exp
        hs256_token(hdr, now_payload(sub="bad sub!"), key),  # sub not a node id
        hs256_token(hdr, now_payload(sub=5), key),
        hs256_token(hdr, now_payload(topics="a/*"), key),  # topics not a list
        hs256_token(hdr, now_payload(nbf=int(time.time()) + 3600), key),
        hs256_token({"alg": "HS512", "typ": "JWT"}, now_payload(), key),
    ]
    for token in tokens:
        await refused(h, {"t": "hello", "token": token})
    # The same construction with the right secret and claims is accepted.
    node = await RawNode.connect(h, token=hs256_token(hdr, now_payload(), key))
    assert node.welcome["node"] == "n1"
    await node.close()


@pytest.fixture
def ed_keys(tmp_path):
    priv = ed25519.Ed25519PrivateKey.generate()
    pub_pem = priv.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
    priv_pem = priv.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    path = tmp_path / "jwt-public.pem"
    path.write_bytes(pub_pem)
    return path, pub_pem, priv_pem


@pytest.mark.parametrize("with_secret", [False, True], ids=["eddsa-only", "eddsa+hs256"])
async def test_token_algorithm_confusion(make_hub, ed_keys, with_secret):
    """An HS256 token whose HMAC key is the hub's public key PEM (the classic attack)."""
    path, pub_pem, priv_pem = ed_keys
    overrides = {"auth.jwt_algorithms": ["EdDSA"], "auth.jwt_public_key_file": str(path)}
    if with_secret:
        overrides.update({"auth.jwt_algorithms": ["EdDSA", "HS256"],
                          "auth.jwt_secret": SECRET})
    h = await make_hub(**overrides)
    forged = hs256_token({"alg": "HS256", "typ": "JWT"}, now_payload(), pub_pem)
    await refused(h, {"t": "hello", "token": forged})
    forged = hs256_token({"alg": "HS256", "typ": "JWT"}, now_payload(),
                         pub_pem.strip())
    await refused(h, {"t": "hello", "token": forged})
    # A real EdDSA token works.
    token, _ = TokenIssuer(private_key_pem=priv_pem).issue("n1", 60)
    node = await RawNode.connect(h, token=token)
    assert node.welcome["node"] == "n1"
    await node.close()


async def test_token_expired(make_hub):
    h = await make_hub(**{"auth.jwt_secret": SECRET, "auth.clock_skew_s": 30})
    issuer = TokenIssuer(secret=SECRET)
    token, _ = issuer.issue("n1", 60, now=time.time() - 3600)
    await refused(h, {"t": "hello", "token": token})
    token, _ = issuer.issue("n1", 60, now=time.time() - 60 - 31)  # just past the leeway
    await refused(h, {"t": "hello", "token": token})
    token, _ = issuer.issue("n1", 60, now=time.time() - 60 - 20)  # within the leeway
    node = await RawNode.connect(h, token=token)
    await node.close()


async def test_token_audience(make_hub):
    h = await make_hub(**{"auth.jwt_secret": SECRET, "auth.jwt_audience": "hub-a"})
    issuer = TokenIssuer(secret=SECRET)
    for aud in ("hub-b", None):  # wrong, or missing while configured
        token, _ = issuer.issue("n1", 60, audience=aud)
        await refused(h, {"t": "hello", "token": token})
    token = hs256_token({"alg": "HS256"}, now_payload(aud=["x", "y"]), SECRET.encode())
    await refused(h, {"t": "hello", "token": token})
    token, _ = issuer.issue("n1", 60, audience="hub-a")
    node = await RawNode.connect(h, token=token)
    assert node.welcome["node"] == "n1"
    await node.close()


# -- bounded memory under slow consumers (§7) -------------------------------------------


async def drain_until_closed(node: RawNode) -> tuple[int | None, dict | None]:
    """Read (and drop) everything until the close; return (close code, last frame)."""
    last = None
    try:
        async with asyncio.timeout(timeout(10)):
            while True:
                data = await node.ws.recv()
                # The flood's 8 KiB messages are dropped unread; small frames kept.
                last = msgpack.unpackb(data) if len(data) < 1024 else {"t": "msg"}
    except ConnectionClosed as exc:
        return (exc.rcvd.code if exc.rcvd is not None else None), last
    raise AssertionError("unreachable")


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_slow_consumers_dropped_memory_bounded(make_hub):
    h = await make_hub(**{"limits.send_queue_max": 100, "limits.msgs_per_s": 100000,
                          "limits.burst": 100000})
    publisher = await RawNode.connect(h)
    reader = await RawNode.connect(h)
    assert (await reader.request({"t": "sub", "id": 1, "topic": "flood"}))["t"] == "ok"
    slow: dict[int, RawNode] = {}  # by the client's local port
    for _ in range(50):
        s = await RawNode.connect(h)
        assert (await s.request({"t": "sub", "id": 1, "topic": "flood"}))["t"] == "ok"
        s.ws.transport.pause_reading()  # never reads again (until it is dropped)
        slow[s.ws.local_address[1]] = s

    n_msgs, window = 1500, 50
    body = os.urandom(8192)
    received: list[int] = []

    async def read_all() -> None:
        while len(received) < n_msgs:
            m = await reader.recv()
            assert (m["t"], m["topic"], len(m["body"])) == ("msg", "flood", 8192)
            received.append(m["seq"])

    reading = asyncio.create_task(read_all())
    closing: dict[int, asyncio.Task] = {}

    def resume_dropped() -> None:
        # A dropped slow consumer may read again, to see its bye and close code before
        # the hub's close grace runs out.
        for conn in list(h.node.connections):
            if conn.phase is OPEN or conn.transport is None:
                continue
            port = conn.transport.get_extra_info("peername")[1]
            s = slow.get(port)
            if s is not None and port not in closing:
                s.ws.transport.resume_reading()
                closing[port] = asyncio.create_task(drain_until_closed(s))

    rss0 = rss_bytes()
    peak = rss0
    for w in range(n_msgs // window):
        for i in range(window):
            await publisher.send({"t": "pub", "id": w * window + i, "topic": "flood",
                                  "body": body})
        oks = 0
        while oks < window:
            f = await publisher.recv()
            assert f["t"] == "ok", f
            oks += 1
        peak = max(peak, rss_bytes())
        resume_dropped()
    await asyncio.wait_for(reading, timeout(20))
    assert received == list(range(1, n_msgs + 1))  # everything, in order, no gap
    assert peak - rss0 < 100 * 2**20, f"RSS grew by {(peak - rss0) / 2**20:.0f} MiB"

    deadline = time.monotonic() + timeout(5)
    while len(closing) < 50 and time.monotonic() < deadline:
        resume_dropped()
        await asyncio.sleep(0.01)
    assert h.node.metrics.slow_consumer_disconnects == 50
    results = await asyncio.gather(*closing.values())
    assert len(results) == 50
    for code, last in results:
        assert code == 4009
        assert last == {"t": "bye", "reason": "slow_consumer"}
    # The hub holds no more of them; the reader and the publisher still work.
    r = await reader.request({"t": "presence", "id": 2, "nodes": [publisher.node_id]})
    assert r["online"] == {publisher.node_id: True}
    assert len(h.node.topics["flood"]) == 1
    await publisher.close()
    await reader.close()


# -- garbage from one node does not disturb another (§8) ----------------------------------


GARBAGE = [
    None, True, 0, -1, 2**64 - 1, 1.5, "text", b"bin", [], [[]], {}, {"t": None},
    {"t": b"send"}, {"t": "x" * 1000}, {1: 2}, {"t": "send"}, {"t": "send", "to": ""},
    {"t": "send", "to": "a" * 129, "body": b""}, {"t": "send", "to": "ok", "body": None},
    {"t": "send", "to": "ok", "body": b"", "qos": 2},
    {"t": "send", "to": "ok", "body": b"", "ttl": 0},
    {"t": "send", "to": "ok", "body": b"", "ttl": -5, "id": 1},
    {"t": "send", "to": "ok", "body": b"", "sig": "str"},
    {"t": "send", "to": "ok", "body": b"", "receipt": 1},
    {"t": "send", "to": "$admin", "body": b""},
    {"t": "ack", "mid": 5}, {"t": "ack", "mids": "x"}, {"t": "ack", "mids": [1]},
    {"t": "ack", "mid": "01HZZZZZZZZZZZZZZZZZZZZZZZ"},
    {"t": "sub", "topic": ""}, {"t": "sub", "topic": "a" * 201},
    {"t": "sub", "topic": "ok", "since": -1}, {"t": "sub", "topic": "ok", "since": "0"},
    {"t": "unsub"}, {"t": "pub", "topic": "ok"}, {"t": "pub", "topic": "ok", "body": "s"},
    {"t": "presence", "id": 1, "nodes": "x"}, {"t": "presence", "id": 1, "nodes": [1]},
    {"t": "hello", "key": b"k" * 32, "sig": b"s" * 64},
    {"t": "welcome"}, {"t": "msg", "mid": "x"}, {"t": "ok", "id": 1},
    {"t": "sub", "id": {"x": 1}, "topic": "ok"}, {"t": "sub", "id": [1], "topic": "ok"},
    {"t": "sub", "id": -(2**63), "topic": "ok"},
]


async def test_garbage_does_not_affect_other_sessions(hub):
    attacker = await RawNode.connect(hub)
    a = await RawNode.connect(hub)
    b = await RawNode.connect(hub)
    assert (await b.request({"t": "sub", "id": 1, "topic": "calm"}))["t"] == "ok"

    async def talk(i: int) -> None:
        r = await a.request({"t": "send", "id": i, "to": b.node_id, "body": b"%d" % i})
        assert r["t"] == "ok"
        r = await a.request({"t": "pub", "id": 1000 + i, "topic": "calm", "body": b"p"})
        assert r["t"] == "ok"

    await talk(1)
    for g in GARBAGE:
        await attacker.send(g)  # one by one
    await attacker.send(GARBAGE)  # and as one batch
    await attacker.send([[g] for g in GARBAGE])  # nested arrays are not frames
    await talk(2)
    # Every garbage frame got an error (none closed the attacker's session).
    errors = 0
    while True:
        try:
            f = await attacker.recv(wait=0.5)
        except TimeoutError:
            break
        assert f["t"] == "error", f
        errors += 1
    # All but: the empty batch `[]` sent alone (no frame), and an ack of an unknown mid
    # (not an error, §4), sent twice.
    assert errors == 3 * len(GARBAGE) - 3
    r = await attacker.request({"t": "presence", "id": "alive", "nodes": []})
    assert r["t"] == "ok"
    # Then the session-ending kinds: each ends only the attacker's own session.
    for data, expected in ((b"\xc1", 1007), ("text", 1003),
                           (pack({"t": "sub"}) + b"\x90", 1007)):
        atk = await RawNode.connect(hub)
        await atk.send_raw(data)
        code, _ = await atk.closed()
        assert code == expected
        await talk(3)
    got = [await b.recv() for _ in range(10)]
    direct = sorted(m["body"] for m in got if "topic" not in m)
    assert direct == [b"1", b"2", b"3", b"3", b"3"]
    assert [m["seq"] for m in got if "topic" in m] == [1, 2, 3, 4, 5]
    await assert_quiet(b)
    for n in (attacker, a, b):
        await n.close()
