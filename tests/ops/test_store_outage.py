"""A PostgreSQL that stops answering, through a real hub (hub/breaker.py): no
mocks, the real server behind a black-holing TCP proxy (tests/ops/conftest.py).

While the store is black-holed no QoS 1 send waits longer than `store.timeout_s` plus a
small margin (the waits are printed: `pytest -s`), handshakes fail fast, the outage shows
in the first scrape of /metrics, and every send answered `ok`, before, during or after
the cut, is delivered once the store is back; none answered `unavailable` is.
docs/benchmarks.md quotes the printed waits.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
from openred.protocol.identity import Identity
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import timeout
from tests.hub.nodes import RawNode, eventually
from tests.ops.conftest import BlackHole

STORE_TIMEOUT_S = 2.0  # store.timeout_s, the default
MARGIN_S = 0.75  # what a wait may exceed it by: the loop turn, the reply's write
OPEN_S = 2.0  # store.breaker_open_s (5 by default): a shorter test
RATE = 100  # QoS 1 sends per second


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else 0.0


async def scrape(port: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
            text = await r.text()
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(families: dict[str, Any], name: str, **labels: str) -> float:
    total = 0.0
    for s in families[name].samples:
        if s.name in (name, name + "_total") and all(s.labels.get(k) == v
                                                     for k, v in labels.items()):
            total += s.value
    return total


@pytest.mark.slow
async def test_black_holed_store_fails_fast_and_loses_nothing_accepted(
        pg_black_hole: tuple[BlackHole, str], make_hub: Any) -> None:
    # (pg_black_hole first: it is torn down after the hub)
    proxy, url = pg_black_hole
    hub = await make_hub(store__url=url, store__pool_size=4,
                         store__breaker_open_s=OPEN_S)
    assert hub.cfg.store.timeout_s == STORE_TIMEOUT_S
    sender = await RawNode.connect(hub)
    receiver_id = Identity.generate()
    receiver = await RawNode.connect(hub, receiver_id)
    to = receiver.node_id

    sent_at: dict[int, float] = {}
    replies: dict[int, tuple[str, float, float]] = {}  # id -> (outcome, sent, waited)
    delivered: set[int] = set()

    async def read_replies() -> None:
        while True:
            f = await sender.recv(wait=60)
            if f["t"] in ("ok", "error") and f.get("id") in sent_at:
                i = f["id"]
                outcome = "ok" if f["t"] == "ok" else f["code"]
                replies[i] = (outcome, sent_at[i], time.monotonic() - sent_at[i])

    async def receive(node: RawNode) -> None:
        while True:
            f = await node.recv(wait=60)
            if f["t"] == "msg":
                delivered.add(int(f["body"]))
                await node.send({"t": "ack", "mids": [f["mid"]]})

    async def send_for(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            i = len(sent_at) + 1
            sent_at[i] = time.monotonic()
            await sender.send({"t": "send", "id": i, "to": to, "body": str(i).encode(),
                               "qos": 1})
            await asyncio.sleep(1 / RATE)

    readers = [asyncio.create_task(read_replies()), asyncio.create_task(receive(receiver))]
    try:
        await send_for(1.0)
        proxy.black_hole()
        cut_at = time.monotonic()
        await send_for(STORE_TIMEOUT_S + 0.5)

        # The outage shows within one scrape interval (15 s in deploy/prometheus), in the
        # series the store alerts fire on (deploy/prometheus/rules.yml:
        # OpenRedHubStoreDown, OpenRedHubBreakerOpen).
        async with asyncio.timeout(timeout(10)):
            while True:
                families = await scrape(hub.admin_port)
                if sample(families, "openred_hub_backend_up", backend="store") == 0:
                    break
                await send_for(0.25)
        shown_s = time.monotonic() - cut_at
        assert shown_s < 15
        assert sample(families, "openred_hub_breaker_state", backend="store",
                      state="closed") == 0
        assert sample(families, "openred_hub_store_operations", op="enqueue_many",
                      outcome="timeout") > 0
        assert sample(families, "openred_hub_store_operations", op="enqueue_many",
                      outcome="rejected") > 0
        assert sample(families, "openred_hub_error_frames", code="unavailable") > 0

        # A handshake needs the store: refused at once while the breaker is open.
        started = time.monotonic()
        late = await RawNode.open(hub, Identity.generate())
        ident = late.identity
        assert ident is not None
        await late.send({"t": "hello", "v": 1, "key": ident.public_key,
                         "sig": ident.sign_auth(late.challenge["hub"], late.challenge["nonce"])})
        code, frames = await late.closed()
        handshake_wait = time.monotonic() - started
        assert code == 1011 and frames[-1]["code"] == "unavailable", (code, frames)

        await send_for(2 * OPEN_S)
        proxy.heal()
        healed_at = time.monotonic()
        # Sending on: the next half-open probe finds the store back.
        async with asyncio.timeout(timeout(OPEN_S + 2 * STORE_TIMEOUT_S + 5)):
            while not any(o == "ok" and s > healed_at for o, s, _ in replies.values()):
                await send_for(0.2)
        recovered_s = time.monotonic() - healed_at
        await send_for(1.0)
        await eventually(lambda: len(replies) == len(sent_at), 3 * STORE_TIMEOUT_S)

        # What is stored and unacked comes again on a new session (acks sent during the
        # cut failed); what was delivered live is already counted.
        await asyncio.sleep(1.0)
        readers[1].cancel()
        await receiver.close()
        receiver = await RawNode.connect(hub, receiver_id)
        readers[1] = asyncio.create_task(receive(receiver))
        ok = {i for i, (o, _, _) in replies.items() if o == "ok"}
        await eventually(lambda: ok <= delivered, 10)
        await asyncio.sleep(0.5)  # anything else that would come
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)

    unavailable = {i for i, (o, _, _) in replies.items() if o == "unavailable"}
    other = {i: o for i, (o, _, _) in replies.items() if o not in ("ok", "unavailable")}
    during = [w for _, s, w in replies.values() if cut_at <= s < healed_at]
    slow = sorted(((w, i) for i, (_, s, w) in replies.items() if cut_at <= s < healed_at),
                  reverse=True)[:3]
    print(f"\nblack-holed store, store.timeout_s={STORE_TIMEOUT_S}: sent {len(sent_at)}, "
          f"ok {len(ok)}, unavailable {len(unavailable)}, other {len(other)}, "
          f"delivered {len(delivered)}, ok not delivered {len(ok - delivered)}, "
          f"unavailable delivered {len(unavailable & delivered)}")
    print(f"waits of the {len(during)} sends made during the cut: "
          f"p50 {percentile(during, 0.5) * 1000:.0f} ms, "
          f"p99 {percentile(during, 0.99) * 1000:.0f} ms, max {max(during) * 1000:.0f} ms; "
          f"{sum(1 for w in during if w >= 1.0)} waited 1 s or more (slowest: "
          f"{', '.join(f'{w:.3f} s' for w, _ in slow)}); handshake refused in "
          f"{handshake_wait * 1000:.0f} ms; first ok {recovered_s:.2f} s after the heal; "
          f"/metrics showed it {shown_s:.2f} s after the cut")

    assert not other, other
    assert ok - delivered == set(), "a message answered ok was lost"
    assert unavailable & delivered == set(), "a message answered unavailable was delivered"
    assert unavailable and len(ok) + len(unavailable) == len(sent_at)
    assert max(during) <= STORE_TIMEOUT_S + timeout(MARGIN_S), slow
    # Fail fast: once the breaker is open, most sends are answered at once.
    assert percentile(during, 0.5) < 0.1
    assert handshake_wait < timeout(MARGIN_S)
