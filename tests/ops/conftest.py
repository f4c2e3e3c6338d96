"""Fixtures for the operations tests (failures, metrics, logs): a real hub
(tests/hub's `make_hub`) and `BlackHole`, a TCP proxy that can stop forwarding without
closing anything, the way a network partition or a hung server looks to a client (no
refused connection, no reset: nothing answers)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.hub.conftest import loop_guard, make_hub  # noqa: F401  (re-exported fixtures)
from tests.persistence.conftest import with_schema
from tests.services import need_pg


class BlackHole:
    """A TCP proxy to `target`. `black_hole()`: from now on nothing goes through in
    either direction and nothing is closed (new connections are accepted and then
    ignored). `heal()`: forwarding resumes for new connections; those that lived through
    the hole are cut, as a middlebox that lost their state would (a real partition
    ends the same way once either side writes: with a reset).

    `hole_on`: bytes that, when a client sends them, start the hole; they reach the
    server first when `forward_trigger` (e.g. a COMMIT the server executes but whose
    answer never comes back), else they are lost with everything after."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.holed = False
        self.hole_on: bytes | None = None
        self.forward_trigger = True
        self.port = 0
        self._links: set[asyncio.StreamWriter] = set()
        self._frozen: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def dsn(self, dsn: str) -> str:
        parts = urlsplit(dsn)
        user = f"{parts.username}@" if parts.username else ""
        return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{self.port}"))

    def black_hole(self) -> None:
        self.holed = True
        self._frozen |= self._links

    def heal(self) -> None:
        self.holed = False
        for writer in self._frozen:
            writer.transport.abort()
        self._frozen.clear()

    async def close(self) -> None:
        for writer in self._links | self._frozen:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        if self.holed:  # accepted, never answered
            self._frozen.add(writer)
            try:
                while await reader.read(65536):
                    pass
            except OSError:
                pass
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._links.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer, upstream=True),
                             self._pipe(up_reader, writer))
        self._links.difference_update((writer, up_writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    upstream: bool = False) -> None:
        try:
            while data := await reader.read(65536):
                if upstream and self.hole_on is not None and self.hole_on in data:
                    self.hole_on = None
                    if self.forward_trigger:
                        writer.write(data)
                    self.black_hole()
                    continue
                if self.holed or writer in self._frozen:
                    continue  # dropped: the other side hears nothing
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            if not (self.holed or writer in self._frozen):
                writer.transport.abort()  # a close in the hole is not passed on


@pytest.fixture
async def pg_black_hole() -> AsyncIterator[tuple[BlackHole, str]]:
    """A black-hole proxy in front of the test PostgreSQL, and a store URL through it in
    a schema of its own (dropped afterwards)."""
    import asyncpg

    dsn = need_pg()
    parts = urlsplit(dsn)
    proxy = BlackHole(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    schema = f"o_{secrets.token_hex(6)}"
    yield proxy, with_schema(proxy.dsn(dsn), schema)
    await proxy.close()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
