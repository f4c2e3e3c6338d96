"""`LinkProxy`: a TCP link a test can break the ways networks break (STYLE.md "Faults are
tested for real"), between a hub and its Redis, or between a node and a hub.

Modes, switched at any time with `set_mode`:
- `forward`: bytes go through both ways;
- `reset`: every open link is reset, and new connections are accepted and reset at once
  (a Redis port whose server crashes on connect, a balancer with no backend);
- `blackhole`: links stay open and new ones are made, but nothing gets through either
  way (a link gone silent); what was sent meanwhile is delivered, in order, when the
  mode goes back to `forward` (as TCP does when a partition heals before it gives up).

`accepted` counts the connections accepted (a reconnect rate is measured with it).
"""

from __future__ import annotations

import asyncio

__all__ = ["LinkProxy"]

MODES = ("forward", "reset", "blackhole")


class LinkProxy:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.mode = "forward"
        self.port = 0
        self.accepted = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def url(self, scheme: str = "redis", path: str = "/0") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def set_mode(self, mode: str) -> None:
        assert mode in MODES, mode
        self.mode = mode
        if mode == "blackhole":
            self._flowing.clear()
        else:
            self._flowing.set()
        if mode == "reset":
            for writer in list(self._links):
                writer.transport.abort()
            self._links.clear()

    async def close(self) -> None:
        self.set_mode("reset")
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode == "reset":
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        if self.mode == "reset":  # reset while connecting
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self._links.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer, writer),
                             self._pipe(up_reader, writer, up_writer))
        self._links.discard(writer)
        self._links.discard(up_writer)
        writer.close()
        up_writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    other: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()  # a black hole: held until it heals
                if self.mode == "reset":
                    return
                writer.write(data)
                await writer.drain()
            await self._flowing.wait()
            if not writer.transport.is_closing() and writer.can_write_eof():
                writer.write_eof()  # a half close passes through
        except (OSError, RuntimeError, asyncio.IncompleteReadError):
            writer.transport.abort()
            other.transport.abort()
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
