"""The outbox file (openred.client.outbox, docs/protocol.md §4.2) without a hub: it
survives a reload, a record cut short by a crash is ignored, a damaged one before others
is refused, compaction keeps it bounded, and writes never interleave."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from openred.client import Outbox, OutboxEntry, OutboxError, OutboxFull


def entry(n: int, body: bytes = b"x" * 100) -> OutboxEntry:
    return OutboxEntry(f"cid-{n}", "bob", body, ttl=60, sig=b"s" * 64, receipt=True,
                       meta={"n": str(n)})


def size(path: Path) -> int:
    return path.stat().st_size


def files(folder: Path) -> list[Path]:
    return list(folder.iterdir())


async def test_reload_keeps_entries_in_order(tmp_path: Path) -> None:
    path = tmp_path / "box"
    box = Outbox(10, path)
    for n in range(5):
        box.add(entry(n))
    box.remove("cid-1")
    await box.persist()
    again = Outbox(10, path)
    assert [e.cid for e in again] == ["cid-0", "cid-2", "cid-3", "cid-4"]
    e = again.get("cid-2")
    assert e is not None
    assert (e.to, e.body, e.ttl, e.sig, e.receipt, e.meta) == (
        "bob", b"x" * 100, 60, b"s" * 64, True, {"n": "2"})
    assert e.frame() == {"t": "send", "to": "bob", "body": b"x" * 100, "qos": 1,
                         "cid": "cid-2", "ttl": 60, "sig": b"s" * 64, "receipt": True,
                         "meta": {"n": "2"}}


async def test_a_record_cut_short_is_ignored_and_compacted_away(tmp_path: Path) -> None:
    path = tmp_path / "box"
    box = Outbox(10, path)
    box.add(entry(0))
    await box.persist()
    box.add(entry(1))
    await box.persist()
    whole = path.read_bytes()
    path.write_bytes(whole[:-7])  # a crash in the middle of the last append
    cut = Outbox(10, path)
    assert [e.cid for e in cut] == ["cid-0"]  # the cut change never happened
    cut.add(entry(2))
    await cut.persist()  # rewrites the file whole (atomically): no garbage stays
    assert [e.cid for e in Outbox(10, path)] == ["cid-0", "cid-2"]
    assert files(tmp_path) == [path]  # no temporary file left


async def test_a_damaged_record_before_others_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "box"
    box = Outbox(10, path)
    for n in range(3):
        box.add(entry(n))
        await box.persist()
    data = bytearray(path.read_bytes())
    data[40] ^= 0xFF  # inside the first record
    path.write_bytes(bytes(data))
    with pytest.raises(OutboxError, match="damaged"):
        Outbox(10, path)
    path.write_bytes(b"something else")
    with pytest.raises(OutboxError, match="not an outbox"):
        Outbox(10, path)


async def test_compaction_keeps_the_file_bounded(tmp_path: Path) -> None:
    path = tmp_path / "box"
    box = Outbox(100, path)
    body = b"y" * 1000
    for n in range(2000):  # a long run: every message added, then confirmed
        box.add(entry(n, body))
        await box.persist()
        box.remove(f"cid-{n - 5}")
    await box.persist()
    assert len(box) == 5
    assert size(path) < 200 * 1024  # not 2000 records: compacted along the way
    assert [e.cid for e in Outbox(100, path)] == [f"cid-{n}" for n in range(1995, 2000)]


async def test_concurrent_persists_share_writes_and_stay_ordered(tmp_path: Path) -> None:
    path = tmp_path / "box"
    box = Outbox(1000, path)

    async def one(n: int) -> None:
        box.add(entry(n))
        await box.persist()
        if n % 2:
            box.remove(f"cid-{n}")
            await box.persist()

    await asyncio.gather(*(one(n) for n in range(200)))
    assert [e.cid for e in Outbox(1000, path)] == [f"cid-{n}" for n in range(0, 200, 2)]


async def test_cancelled_persist_does_not_interleave(tmp_path: Path) -> None:
    path = tmp_path / "box"
    box = Outbox(1000, path)
    for n in range(50):
        box.add(entry(n, b"z" * 10_000))
    task = asyncio.create_task(box.persist())
    await asyncio.sleep(0)
    task.cancel()
    box.add(entry(50))
    await box.persist()  # waits for the cancelled one's write, then writes
    assert len(Outbox(1000, path)) == 51


def test_bound(tmp_path: Path) -> None:
    box = Outbox(2)
    box.add(entry(0))
    assert box.add(entry(0)) is not None  # the same cid again: the one kept
    box.add(entry(1))
    with pytest.raises(OutboxFull):
        box.add(entry(2))
    assert len(box) == 2
