"""Exactly once in effect (docs/protocol.md §4.2) through a real hub process that is
SIGKILLed in the middle of a burst: the sender's outbox resends what had no `ok` with
the same `cid`, the hub stores each once, and the receiver (dropping redeliveries by
`mid`, §4) gets every message exactly once."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from openred.client import Client, Connected, Disconnected, Event, Message
from openred.protocol.identity import Identity

from tests.cluster.conftest import HubProcess
from tests.conftest import timeout

N = 2000


@pytest.mark.slow
async def test_kill_9_during_a_burst_each_message_arrives_once(
        hub_process: HubProcess) -> None:
    await hub_process.start()
    opts = {"backoff_min_s": 0.05, "backoff_max_s": 0.5, "connect_timeout_s": timeout(60),
            "request_timeout_s": timeout(30)}
    sender_events: list[Event] = []
    got: list[bytes] = []
    mids: Counter[str] = Counter()
    rid = Identity.generate()
    async with Client(hub_process.url, identity=Identity.generate(),
                      on_state=sender_events.append, **opts) as a, \
            Client(hub_process.url, identity=rid, **opts) as b:
        all_in = asyncio.Event()
        written: Counter[str] = Counter()  # cid -> times written to a connection
        dups: list[str] = []
        write_entry, entry_reply = a._write_entry, a._entry_reply

        def count_write(conn: Any, entry: Any) -> None:
            written[entry.cid] += 1
            write_entry(conn, entry)

        def count_reply(entry: Any, frame: dict[str, Any]) -> None:
            if frame.get("dup") is True:
                dups.append(entry.cid)
            entry_reply(entry, frame)

        a._write_entry = count_write  # type: ignore[method-assign]
        a._entry_reply = count_reply  # type: ignore[method-assign]

        async def receive() -> None:
            m: Message
            async for m in b:
                got.append(m.body)
                mids[m.mid] += 1
                if len(set(got)) == N:
                    await m.ack()
                    all_in.set()

        receiver = asyncio.create_task(receive())
        confirmed = 0
        gate = asyncio.Semaphore(200)  # a burst: many sends in flight at once

        async def send(i: int) -> None:
            nonlocal confirmed
            async with gate:
                await a.send(rid.node_id, b"%d" % i, qos=1)
                confirmed += 1

        sends = [asyncio.create_task(send(i)) for i in range(N)]
        async with asyncio.timeout(timeout(30)):
            while confirmed < N // 4:  # noqa: ASYNC110 (progress of the burst)
                await asyncio.sleep(0.005)
        hub_process.kill()  # SIGKILL: replies in flight are lost with the process
        killed_at = confirmed
        await asyncio.sleep(0.3)
        await hub_process.start()
        await asyncio.wait_for(asyncio.gather(*sends), timeout(120))
        await a.flush(timeout(60))
        await asyncio.wait_for(all_in.wait(), timeout(60))
        await asyncio.sleep(0.5)  # any late duplicate would arrive meanwhile
        receiver.cancel()
        await asyncio.gather(receiver, return_exceptions=True)
    assert killed_at < N, "the kill came after the burst"
    # Sends cut by the kill were written again, with the same cid.
    assert sum(1 for n in written.values() if n > 1) > 0
    print(f"killed after {killed_at} ok; resent {sum(1 for n in written.values() if n > 1)}"
          f", answered dup {len(dups)}")
    assert any(isinstance(e, Disconnected) and e.will_retry for e in sender_events)
    assert sum(isinstance(e, Connected) for e in sender_events) >= 2
    counts = Counter(got)
    assert set(counts) == {b"%d" % i for i in range(N)}
    assert [body for body, n in counts.items() if n > 1] == []  # none twice
    assert all(n == 1 for n in mids.values())
