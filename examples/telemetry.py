"""A telemetry device and its collector, through hub restarts, each reading exactly once
(docs/protocol.md §4.2).

    python examples/telemetry.py collector --key collector.key      # prints its node id
    python examples/telemetry.py device COLLECTOR_ID --key dev.key --count 100
    python examples/telemetry.py demo --count 50                      # both, one process

The device sends each reading at QoS 1 with a `cid` naming it (`<device>:<n>`), through
an outbox kept in a file (`--outbox`, default `<key>.outbox`): a reading the hub had not
confirmed when the connection (or the device itself) went down is sent again with the
same `cid`, and the hub stores it once. The collector acks a reading once it has
handled it (`async with msg`), so one cut short comes again; the SDK drops the repeat by
`mid`. Both print the typed connection events (`Disconnected`, `Connected`, ...).
Restart the hub while they run: nothing is lost, nothing is counted twice.

Each reading is also published on the topic `telemetry/live` (a best-effort live feed,
§5). The collector follows it and prints a `TopicGap` when, after a reconnect, the hub's
history no longer held feed messages published while it was away.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

from openred.client import (
    Client,
    ClientError,
    Closed,
    Connected,
    Disconnected,
    Identity,
    StateEvent,
    Subscription,
    TopicGap,
)
from openred.protocol.identity import load_key_file, save_key_file

DEFAULT_URL = "ws://127.0.0.1:8765/v1/ws"
LIVE_TOPIC = "telemetry/live"


def show(who: str) -> Callable[[StateEvent], None]:
    def on_state(ev: StateEvent) -> None:
        if isinstance(ev, Disconnected):
            retry = (f"retry #{ev.attempt} in {ev.delay_s:.2f} s" if ev.will_retry
                     else "no retry")
            print(f"[{who}] disconnected: code {ev.code} {ev.reason!r}, {retry}",
                  flush=True)
        elif isinstance(ev, Connected):
            print(f"[{who}] connected: session {ev.session}, {ev.pending} pending",
                  flush=True)
        elif isinstance(ev, Closed):
            print(f"[{who}] closed: code {ev.code} {ev.reason!r}", flush=True)
    return on_state


def key_identity(path: str) -> Identity:
    if not Path(path).exists():
        save_key_file(Identity.generate(), path)
    return load_key_file(path)


async def device(url: str, identity: Identity, collector: str, count: int,
                 interval_s: float, outbox: str | None) -> int:
    name = identity.node_id[:8]
    async with Client(url, identity=identity, outbox_file=outbox,
                      connect_timeout_s=None, on_state=show("device")) as node:
        if node.outbox_size:
            print(f"[device] {node.outbox_size} readings from a previous run to resend",
                  flush=True)
        for n in range(count):
            reading = {"device": name, "n": n, "ts": time.time(),
                       "value": round(random.uniform(18.0, 24.0), 2)}
            # The cid names the reading: sent again after any failure, it is stored once.
            # Awaiting each send keeps the readings in order (and one in flight).
            while True:
                try:
                    await node.send(collector, json.dumps(reading).encode(), qos=1,
                                    cid=f"{name}:{n}")
                    break
                except ClientError as exc:  # a timeout: the reading stays in the outbox
                    print(f"[device] reading {n} not confirmed yet: {exc}", flush=True)
            try:  # the live feed is best effort: a reading lost there is in the outbox
                await node.publish(LIVE_TOPIC, json.dumps(reading).encode())
            except ClientError as exc:
                print(f"[device] live feed: {type(exc).__name__}", flush=True)
            if interval_s:
                await asyncio.sleep(interval_s)
        await node.flush()
        print(f"[device] {count} readings confirmed by the hub", flush=True)
    return 0


async def follow_live(feed: Subscription) -> None:
    """Drain the live feed (a subscription nobody reads would pause the client) and
    report what it lost."""
    async for item in feed:
        if isinstance(item, TopicGap):
            print(f"[collector] live feed: seq {item.from_seq}..{item.to_seq} lost "
                  "(the readings themselves come through the outbox)", flush=True)


async def collector(url: str, identity: Identity, expect: int | None,
                    ready: asyncio.Event | None = None) -> int:
    seen: dict[tuple[str, int], float] = {}
    repeats = 0
    async with Client(url, identity=identity, connect_timeout_s=None,
                      on_state=show("collector")) as node:
        print(f"[collector] {node.node_id} on {url}", flush=True)
        live = asyncio.create_task(follow_live(await node.subscribe(LIVE_TOPIC)))
        if ready is not None:
            ready.set()
        async for msg in node:
            async with msg:  # acked once handled; an exception leaves it to come again
                r = json.loads(msg.body)
                key = (str(r["device"]), int(r["n"]))
                if key in seen:
                    repeats += 1  # never happens: the hub stored each cid once
                seen[key] = float(r["value"])
                print(f"[collector] {key[0]} #{key[1]}: {r['value']}", flush=True)
            if expect is not None and len(seen) >= expect:
                break
        live.cancel()
    print(f"[collector] {len(seen)} readings, {repeats} counted twice", flush=True)
    return 0 if repeats == 0 else 1


async def demo(url: str, count: int) -> int:
    coll_id, dev_id = Identity.generate(), Identity.generate()
    ready = asyncio.Event()
    try:
        async with asyncio.timeout(60):
            coll = asyncio.create_task(collector(url, coll_id, count, ready))
            await ready.wait()
            dev = await device(url, dev_id, coll_id.node_id, count, 0.0, None)
            return max(dev, await coll)
    except (ClientError, TimeoutError) as exc:
        print(f"failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def main() -> int:
    p = argparse.ArgumentParser(description="A telemetry device and its collector.")
    p.add_argument("--url", default=DEFAULT_URL)
    cmd = p.add_subparsers(dest="cmd", required=True)
    c = cmd.add_parser("collector", help="print readings until Ctrl-C (or --expect)")
    c.add_argument("--key", default="collector.key", help="key file (created if missing)")
    c.add_argument("--expect", type=int, help="exit once this many readings arrived")
    d = cmd.add_parser("device", help="send readings to a collector")
    d.add_argument("collector", help="the collector's node id")
    d.add_argument("--key", default="device.key", help="key file (created if missing)")
    d.add_argument("--count", type=int, default=100)
    d.add_argument("--interval-s", type=float, default=0.5)
    d.add_argument("--outbox", help="outbox file (default: KEY.outbox)")
    m = cmd.add_parser("demo", help="a device and a collector in one process")
    m.add_argument("--count", type=int, default=50)
    args = p.parse_args()
    try:
        if args.cmd == "collector":
            return asyncio.run(collector(args.url, key_identity(args.key), args.expect))
        if args.cmd == "device":
            return asyncio.run(device(args.url, key_identity(args.key), args.collector,
                                      args.count, args.interval_s,
                                      args.outbox or f"{args.key}.outbox"))
        return asyncio.run(demo(args.url, args.count))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
