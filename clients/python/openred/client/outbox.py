"""The QoS 1 outbox (docs/protocol.md §4.2): unacknowledged `send`s, kept in order, each
with its `cid`, so that after a reconnect (or a restart, with a file) they are sent again
with the same `cid` and the hub stores each once.

Bounded in entries (`OutboxFull` past the bound). Optionally kept in a file the
application names, as a journal: a header, then one record per change ("add" an entry,
"del" a cid), each written whole with its length and CRC-32 and fsynced. Rewriting the
whole outbox on every send would cost its full size per message (quadratic while a
backlog builds up during an outage); a record costs its own size. A crash can only cut
the last record short, and a cut record is recognised and ignored on load, so the file
always reads as the outbox after some prefix of the changes. When the journal grows past
twice the live entries it is compacted: the live entries are written to a temporary file
beside it, fsynced and renamed over it (atomic), so a reader sees the old journal or the
new one, never a mix. Writes are coalesced: concurrent `persist()` calls share one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from openred.client.errors import OutboxError, OutboxFull
from openred.protocol.frames import is_cid

__all__ = ["Outbox", "OutboxEntry", "new_cid"]

log = logging.getLogger("openred.client")

_MAGIC = b"openred-outbox/1\n"
_RECORD_HEAD = struct.Struct(">II")  # payload length, CRC-32 of the payload
_MAX_RECORD_BYTES = 1 << 24  # far above one entry (a body is at most a frame)
_COMPACT_MIN_BYTES = 64 * 1024  # below this, a journal is never worth compacting


def new_cid() -> str:
    """A fresh §4.2 `cid`: 22 URL-safe chars, within 0x21..0x7e."""
    return secrets.token_urlsafe(16)



@dataclass(eq=False)
class OutboxEntry:
    """One QoS 1 `send` waiting for its `ok`. `body` and `sig` are the wire bytes (the
    ciphertext when encrypted), so a file outbox never holds a sealed plaintext."""

    cid: str
    to: str
    body: bytes
    ttl: int | None = None
    sig: bytes | None = None
    receipt: bool = False
    meta: dict[str, str] | None = None
    created_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)
    # Runtime only: the connection it was last written to, and who waits for its `ok`.
    sent_on: object | None = field(default=None, repr=False)
    future: asyncio.Future[tuple[str, bool]] | None = field(default=None, repr=False)
    retries: int = field(default=0, repr=False)
    waiting: int = field(default=0, repr=False)  # send() calls awaiting `future`

    def frame(self) -> dict[str, Any]:
        f: dict[str, Any] = {"t": "send", "to": self.to, "body": self.body, "qos": 1,
                             "cid": self.cid}
        if self.ttl is not None:
            f["ttl"] = self.ttl
        if self.sig is not None:
            f["sig"] = self.sig
        if self.receipt:
            f["receipt"] = True
        if self.meta:
            f["meta"] = dict(self.meta)
        return f

    def _record(self) -> dict[str, Any]:
        return {"cid": self.cid, "to": self.to, "body": self.body, "ttl": self.ttl,
                "sig": self.sig, "receipt": self.receipt, "meta": self.meta,
                "created_ms": self.created_ms}


def _entry_of(rec: object) -> OutboxEntry:
    if not isinstance(rec, dict):
        raise TypeError("record is not a map")
    cid, to, body = rec.get("cid"), rec.get("to"), rec.get("body")
    ttl, sig, meta = rec.get("ttl"), rec.get("sig"), rec.get("meta")
    receipt, created = rec.get("receipt", False), rec.get("created_ms", 0)
    if (not is_cid(cid) or type(to) is not str or type(body) is not bytes
            or (ttl is not None and type(ttl) is not int)
            or (sig is not None and type(sig) is not bytes) or type(receipt) is not bool
            or type(created) is not int
            or (meta is not None and (type(meta) is not dict or not all(
                type(k) is str and type(v) is str for k, v in meta.items())))):
        raise TypeError("record has a field of the wrong type")
    return OutboxEntry(str(cid), to, body, ttl, sig, receipt, meta, created)


def _record(payload: object) -> bytes:
    data: bytes = msgpack.packb(payload, use_bin_type=True)
    return _RECORD_HEAD.pack(len(data), zlib.crc32(data)) + data


class Outbox:
    """Insertion-ordered QoS 1 sends by `cid`, at most `max_entries`, optionally kept
    in the journal file `path` (created mode 0600: it holds message bodies)."""

    def __init__(self, max_entries: int = 10_000,
                 path: str | os.PathLike[str] | None = None) -> None:
        if max_entries < 1:
            raise ValueError("outbox_max: must be >= 1")
        self.max_entries = max_entries
        self.path = Path(path) if path is not None else None
        self._entries: dict[str, OutboxEntry] = {}
        self._version = 0  # bumped on every change
        self._saved = 0  # the version on disk
        self._journal: list[bytes] = []  # records of the changes not written yet
        self._file_bytes = 0  # the journal's size on disk
        self._live_bytes = 0  # what a compacted journal would hold
        self._lock: asyncio.Lock | None = None
        self._drained: asyncio.Event | None = None
        if self.path is not None:
            self._load(self.path)

    def _load(self, path: Path) -> None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise OutboxError(f"cannot read outbox file {path}") from exc
        if not data.startswith(_MAGIC):
            raise OutboxError(f"outbox file {path} is not an outbox")
        pos = len(_MAGIC)
        try:
            while pos < len(data):
                if pos + _RECORD_HEAD.size > len(data):
                    break  # a record cut short by a crash: the change never happened
                size, crc = _RECORD_HEAD.unpack_from(data, pos)
                body = data[pos + _RECORD_HEAD.size:pos + _RECORD_HEAD.size + size]
                if size > _MAX_RECORD_BYTES:
                    raise ValueError("record too large")
                if len(body) < size:
                    break  # cut short, as above
                if zlib.crc32(body) != crc:
                    if pos + _RECORD_HEAD.size + size < len(data):
                        raise ValueError("a damaged record before others")
                    break  # the last record, damaged by a crash mid-write
                self._apply(msgpack.unpackb(body, raw=False))
                pos += _RECORD_HEAD.size + size
        except (TypeError, ValueError, msgpack.UnpackException) as exc:
            raise OutboxError(f"outbox file {path} is damaged") from exc
        if pos < len(data):
            log.warning("outbox file ends with a partial record", extra={
                "event": "outbox_torn_record", "path": str(path)})
        self._file_bytes = len(data)
        self._live_bytes = sum(len(_record(["add", e._record()]))
                               for e in self._entries.values())
        if pos < len(data):
            self._journal = []  # compacted at the next write (drops the cut record)
            self._file_bytes = 1 << 62

    def _apply(self, op: object) -> None:
        if not isinstance(op, list) or len(op) != 2:
            raise TypeError("record is not [op, arg]")
        kind, arg = op
        if kind == "add":
            e = _entry_of(arg)
            self._entries[e.cid] = e
        elif kind == "del":
            if type(arg) is not str:
                raise TypeError("del of a non-str cid")
            self._entries.pop(arg, None)
        else:
            raise TypeError("unknown record")

    # -- entries -----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[OutboxEntry]:
        return iter(list(self._entries.values()))

    def __contains__(self, cid: object) -> bool:
        return cid in self._entries

    def get(self, cid: str) -> OutboxEntry | None:
        return self._entries.get(cid)

    def add(self, entry: OutboxEntry) -> OutboxEntry:
        """Keep `entry`; an entry with the same `cid` already kept is returned instead
        (the caller repeats a send still in flight). `OutboxFull` past the bound."""
        kept = self._entries.get(entry.cid)
        if kept is not None:
            return kept
        if len(self._entries) >= self.max_entries:
            raise OutboxFull(f"outbox full ({self.max_entries} messages unacknowledged)")
        self._entries[entry.cid] = entry
        self._version += 1
        if self.path is not None:
            rec = _record(["add", entry._record()])
            self._journal.append(rec)
            self._live_bytes += len(rec)
        if self._drained is not None:
            self._drained.clear()
        return entry

    def remove(self, cid: str) -> OutboxEntry | None:
        entry = self._entries.pop(cid, None)
        if entry is not None:
            self._version += 1
            if self.path is not None:
                self._journal.append(_record(["del", cid]))
                self._live_bytes -= len(_record(["add", entry._record()]))
            if not self._entries and self._drained is not None:
                self._drained.set()
        return entry

    async def wait_empty(self) -> None:
        if self._drained is None:
            self._drained = asyncio.Event()
        if not self._entries:
            self._drained.set()
        await self._drained.wait()

    # -- the file ----------------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        return self.path is not None and self._saved < self._version

    def _plan(self) -> tuple[int, bytes | None, bytes]:
        """What the next write is: (version it brings the file to, a whole new file to
        rename in place or None, records to append)."""
        version, journal, self._journal = self._version, self._journal, []
        appended = sum(len(r) for r in journal)
        if (self._file_bytes == 0
                or (self._file_bytes + appended > 2 * (self._live_bytes + len(_MAGIC))
                    and self._file_bytes + appended > _COMPACT_MIN_BYTES)):
            snapshot = _MAGIC + b"".join(_record(["add", e._record()])
                                         for e in self._entries.values())
            return version, snapshot, b""
        return version, None, b"".join(journal)

    def _write(self, path: Path, snapshot: bytes | None, tail: bytes) -> None:
        if snapshot is not None:
            _atomic_write(path, snapshot)
            self._file_bytes = len(snapshot)
        elif tail:
            _append(path, tail)
            self._file_bytes += len(tail)

    async def persist(self) -> None:
        """Write the changes made so far (or later ones) to the file; no-op without a
        file. Writes happen one at a time, in order; concurrent calls share them."""
        if self.path is None:
            return
        target = self._version
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._saved >= target:
                return
            version, snapshot, tail = self._plan()
            write = asyncio.ensure_future(
                asyncio.to_thread(self._write, self.path, snapshot, tail))
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                # The thread goes on writing: keep the lock until it is done, so no
                # other write (a compaction, the one at close) can interleave with it.
                await asyncio.wait([write])
                if not write.cancelled() and write.exception() is not None:
                    self._file_bytes = 1 << 62
                raise
            except BaseException:
                self._file_bytes = 1 << 62  # unknown now: the next write compacts
                raise
            self._saved = version


def _write_synced(fd: int, data: bytes) -> None:
    """All of `data` to `fd`, then fsync; closes `fd`."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _append(path: Path, data: bytes) -> None:
    try:
        _write_synced(os.open(path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_BINARY", 0)),
                      data)
    except OSError as exc:
        raise OutboxError(f"cannot write outbox file {path}") from exc


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        _write_synced(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                              | getattr(os, "O_BINARY", 0), 0o600), data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutboxError(f"cannot write outbox file {path}") from exc
    if hasattr(os, "O_DIRECTORY"):
        # The rename itself survives a crash only once the directory is synced.
        try:
            dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return
        try:
            os.fsync(dfd)
        except OSError:
            pass
        finally:
            os.close(dfd)
